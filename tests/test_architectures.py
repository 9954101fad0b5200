"""Unmodified torchvision models: every weight matrix's statistics against an independent computation.

Random initialisation, two 32×32 images: what is checked is that every weight matrix the model
multiplies by is found, reached and given exactly the second moment of its real inputs. VGG-11-BN,
whose first classifier layer has d = 25,088 (a 2.5 GB float32 covariance), has its own test that
checks each second moment through products with random vectors, and edits the model.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_err
from deepunlearn import Statistics, collect_statistics, unlearn
from deepunlearn.layers import find_targets
from test_covariance import unrolled_attention

tv = pytest.importorskip("torchvision.models")

MODELS = {
    "vit_b_16": lambda: tv.vit_b_16(image_size=32),
    "resnet50": lambda: tv.resnet50(),
    "convnext_tiny": lambda: tv.convnext_tiny(),
    "swin_t": lambda: tv.swin_t(),
    "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(),
    "efficientnet_b0": lambda: tv.efficientnet_b0(),
}


def independent_moments(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw inputs captured with plain hooks; conv patches by F.unfold; attention unrolled by hand."""
    out, handles = {}, []

    def add(name, rows):
        rows = rows.double()
        out[name] = out.get(name, 0) + rows.T @ rows

    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            def mha_hook(mod, args, kwargs, _o, name=name):
                q = args[0]
                add(f"{name}.in_proj", q.reshape(-1, q.shape[-1]))
                with torch.no_grad():
                    add(f"{name}.out_proj", unrolled_attention(mod, q, q, q))
            handles.append(m.register_forward_hook(mha_hook, with_kwargs=True))
        elif isinstance(m, nn.Linear) and not name.endswith("out_proj"):
            handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: add(name, a[0].reshape(-1, a[0].shape[-1]))))
        elif isinstance(m, nn.Conv2d):
            def conv_hook(mod, a, name=name):
                u = F.unfold(a[0], mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, C*k*k, L)
                g, dg = mod.groups, u.shape[1] // mod.groups
                u = u.reshape(u.shape[0], g, dg, u.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, dg)
                rows = u.double()
                out[name] = out.get(name, 0) + rows.transpose(1, 2) @ rows
            handles.append(m.register_forward_pre_hook(conv_hook))
    # torchvision's swin applies its attention's qkv and proj weights through F.linear, not their
    # modules: record those calls' inputs by wrapping the module's F
    import torchvision.models.swin_transformer as swin

    linears = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    real_f = swin.F

    class RecordingF:
        def __getattr__(self, attr):
            return getattr(real_f, attr)

        @staticmethod
        def linear(inp, weight, bias=None):
            if id(weight) in linears:
                add(linears[id(weight)], inp.reshape(-1, inp.shape[-1]))
            return real_f.linear(inp, weight, bias)

    swin.F = RecordingF()
    try:
        with torch.no_grad():
            model(x)
    finally:
        swin.F = real_f
        for h in handles:
            h.remove()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_statistics_of_every_weight_matrix_match_an_independent_computation(name):
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()  # float64: fused and unfused attention kernels agree to rounding
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    stats = collect_statistics(model, x)
    ref = independent_moments(model, x)
    targets, skipped = find_targets(model)
    owners = [model.get_submodule(s.name.rpartition(".")[0]) for s in skipped]
    assert not [o for o in owners if isinstance(o, (nn.Linear, nn.Conv2d))]  # no weight matrix left out
    for t in targets:  # every one reached, swin_t's weights applied through F.linear included
        cov, n = stats.covariance(t)
        key = t.slots[0] if t.kind == "attention-in" else t.slots[-1]
        assert cov is not None and n > 0, t.name
        expected = ref[key] if torch.is_tensor(ref[key]) and ref[key].dim() == 3 else ref[key][None]
        assert rel_err(cov, expected) < 1e-9, t.name


@pytest.mark.slow
def test_unlearn_runs_unchanged_on_mobilenet_v3_small():
    torch.manual_seed(0)
    model = tv.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = unlearn(model, x[:4], x[4:], inplace=False, alpha_r=100, alpha_f=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    depthwise = [layer for layer in r.layers if layer.groups > 1]
    assert depthwise and all(layer.d == 9 or layer.d == 25 for layer in depthwise)
    assert all(torch.isfinite(p).all() for p in r.model.parameters())


def test_the_automatic_call_runs_on_regnet_y_400mf_whose_group_convolutions_run_at_1x1():
    # at 32×32 the last stage's 3×3 group convolutions see one position: only their centre taps read
    # data, the rest of each group's second moment is zeros, on which float32 divide and conquer
    # need not converge (projection.ZERO_ROW_EIGENVALUE)
    torch.manual_seed(0)
    model = tv.regnet_y_400mf(num_classes=4).eval()
    gen = torch.Generator().manual_seed(0)
    forget, retain = torch.randn(40, 3, 32, 32, generator=gen) + 0.5, torch.randn(120, 3, 32, 32, generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = unlearn(model, forget, retain, inplace=False, classes=[0], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.alpha_choice is not None and r.alpha_choice.alpha_r > 0
    assert any(layer.groups > 1 and layer.relative_change > 0 for layer in r.layers)
    assert all(torch.isfinite(p).all() for p in r.model.parameters())


@pytest.mark.slow
def test_vgg11_bn_statistics_including_its_25088_wide_classifier_and_the_edit():
    """VGG-11-BN's first classifier layer has d = 25,088 (a 2.5 GB float32 second moment): from two
    images its vectors are kept, never the d × d sum. Every layer's statistics are checked through
    products with random vectors against the raw inputs; then the model is edited from them."""
    from deepunlearn.moments import SampleRows
    from deepunlearn.weight_side import vectors_pay

    torch.manual_seed(0)
    model = tv.vgg11_bn().eval()
    x = torch.randn(4, 3, 32, 32)
    rows: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def conv_hook(mod, a, name=name):
                u = F.unfold(a[0], mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                rows[name] = u.transpose(1, 2).reshape(-1, u.shape[1]).double()
            handles.append(m.register_forward_pre_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: rows.__setitem__(name, a[0].double())))
    with torch.no_grad():
        model(x[:2])
    for h in handles:
        h.remove()
    stats = collect_statistics(model, x[:2], dtype=torch.float32)
    targets, skipped = find_targets(model)
    assert not skipped and {t.name for t in targets} == set(rows)
    assert max(t.in_features for t in targets) == 25088
    for t in targets:
        moment, n = stats.moment(t)
        r = rows[t.name]
        v = torch.randn(r.shape[1], 3, dtype=torch.float64)
        assert n == r.shape[0]
        kept = isinstance(moment, SampleRows)
        # the classifier below its width; a conv where the sample-space solve costs fewer flops
        pays = t.kind == "linear" or vectors_pay(t.in_features, n, t.as_matrices(t.weight()).shape[1])
        assert kept == (n < t.in_features and pays), t.name
        product = moment.rows[0].T @ (moment.rows[0] @ v.float()) if kept else moment[0] @ v.float()
        assert rel_err(product, r.T @ (r @ v)) < 1e-5, t.name
    report = unlearn(model, x[:2], x[2:], alpha_r=100, alpha_f=3)
    assert {layer.name for layer in report.layers} == set(rows)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert report.layers[-3].d == 25088 and report.layers[-3].relative_change > 0


TIMM_MODELS = {  # small inputs where the architecture allows them (timm rebuilds position tables for img_size)
    "vit_small_patch16_224": {"img_size": 32},
    "deit_tiny_patch16_224": {"img_size": 32},
    "convnext_atto": {},
    "efficientnet_b0": {},
    "resnet18": {},
    "swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models_every_weight_matrix_matches_an_independent_computation_and_is_edited(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).double().eval()
    size = kwargs.get("img_size", 32)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    check_every_matrix_and_edit(model, x)


def check_every_matrix_and_edit(model: nn.Module, x: torch.Tensor) -> Statistics:
    """Statistics of every weight matrix on ``x[:2]`` against :func:`independent_moments`, only
    tokens and tables skipped; then every matrix edited (forget ``x[:2]``, retain ``x[2:]``).
    Returns the statistics."""
    stats = collect_statistics(model, x[:2])
    ref = independent_moments(model, x[:2])
    targets, skipped = find_targets(model)
    owners = [model.get_submodule(s.name.rpartition(".")[0]) for s in skipped]
    assert not [o for o in owners if isinstance(o, (nn.Linear, nn.Conv2d))]  # only tokens and tables are skipped
    for t in targets:
        cov, n = stats.covariance(t)
        key = t.slots[0] if t.kind == "attention-in" else t.slots[-1]
        expected = ref[key] if ref[key].dim() == 3 else ref[key][None]
        assert cov is not None and rel_err(cov, expected) < 1e-9, t.name
    before = {t.name: t.weight().detach().clone() for t in targets}
    report = unlearn(model, x[:2], x[2:], alpha_r=100, alpha_f=3, inplace=False)
    assert {r.name for r in report.layers} == set(before)
    edited = {t.name: t.weight() for t in find_targets(report.model)[0]}
    assert all(torch.isfinite(w).all() and not torch.equal(w, before[k]) for k, w in edited.items())
    return stats


def _hf_models():
    transformers = pytest.importorskip("transformers")
    common = dict(num_labels=5, image_size=32, num_channels=3)
    return {
        "ViTForImageClassification": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
            patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, **common)),
        "ConvNextForImageClassification": lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **common)),
        "SwinForImageClassification": lambda: transformers.SwinForImageClassification(transformers.SwinConfig(
            patch_size=4, embed_dim=12, depths=[1, 1], num_heads=[2, 2], window_size=2, **common)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViTForImageClassification", "ConvNextForImageClassification", "SwinForImageClassification"])
def test_transformers_models_every_weight_matrix_matches_an_independent_computation_and_is_edited(name):
    """Hugging Face models at random init (as the command line's --hf wraps them): every Linear and
    conv weight's statistics against plain hooks (ViT's separate query, key and value share one),
    and every one edited."""
    from deepunlearn.cli.model_files import HFClassifier

    torch.manual_seed(0)
    model = HFClassifier(_hf_models()[name]()).double().eval()
    stats = check_every_matrix_and_edit(model, torch.randn(4, 3, 32, 32, dtype=torch.float64))
    if name == "ViTForImageClassification":  # key and value read query's input: one statistic for the three
        assert len(stats.aliases) == 2 * 2
