"""transformers' ``Conv1D`` (the GPT-2 family): a linear layer whose weight is stored ``(in, out)``.

The oracle is the same model with every ``Conv1D`` replaced by the ``nn.Linear`` it equals
(weight transposed): statistics, edits and the automatic choice must agree with it.
"""
import copy

import pytest
import torch
from torch import nn

from conftest import rel_err
from deepunlearn import collect_statistics, unlearn
from deepunlearn.layers import find_targets

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, LENGTH, CLASSES = 40, 12, 4


def tiny_gpt2(**config) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, pad_token_id=0,
                                  bos_token_id=None, eos_token_id=None, num_labels=CLASSES, **config)
    return transformers.GPT2ForSequenceClassification(cfg).eval()


def as_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``Conv1D`` replaced by the equal ``nn.Linear``."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.nx, module.nf, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def marked_sequences(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences whose class is the one marker token (1 + class) placed somewhere among
    random other tokens (never the padding token 0)."""
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    x = torch.randint(CLASSES + 1, VOCAB, (n, LENGTH), generator=generator)
    x[torch.arange(n), torch.randint(0, LENGTH, (n,), generator=generator)] = 1 + y
    return x, y


def test_every_conv1d_is_a_target_read_through_its_transposed_weight():
    model = tiny_gpt2()
    targets, skipped = find_targets(model)
    conv1d = [t for t in targets if isinstance(t.module, Conv1D)]
    assert len(conv1d) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    for t in conv1d:
        assert t.kind == "linear" and t.transposed
        assert t.weight().shape == (t.module.nf, t.module.nx) and t.in_features == t.module.nx
        assert t.weight().data_ptr() == t.module.weight.data_ptr()  # a view: writes reach the parameter
    assert {s.name for s in skipped} == {"transformer.wte.weight", "transformer.wpe.weight"}  # token and position tables


def test_statistics_and_fixed_edit_equal_the_model_with_linear_layers():
    torch.manual_seed(0)
    model = tiny_gpt2().double()
    twin = as_linear(model)
    x = torch.randint(1, VOCAB, (6, LENGTH))
    stats, twin_stats = collect_statistics(model, x[:3]), collect_statistics(twin, x[:3])
    for t, u in zip(find_targets(model)[0], find_targets(twin)[0]):
        assert t.name == u.name
        assert rel_err(stats.covariance(t)[0], twin_stats.covariance(u)[0]) < 1e-12, t.name
    layout = {n: (p.shape, p.stride()) for n, p in model.named_parameters()}
    report = unlearn(model, x[:3], x[3:], alpha_r=30, alpha_f=10)
    twin_report = unlearn(twin, x[:3], x[3:], alpha_r=30, alpha_f=10)
    assert [r.name for r in report.layers] == [r.name for r in twin_report.layers] and len(report.layers) == 9
    assert {n: (p.shape, p.stride()) for n, p in model.named_parameters()} == layout  # stored as it was, (in, out)
    for t, u in zip(find_targets(model)[0], find_targets(twin)[0]):
        assert rel_err(t.weight(), u.weight()) < 1e-10, t.name
    changed = [r for r in report.layers if isinstance(model.get_submodule(r.name), Conv1D)]
    assert len(changed) == 8 and all(r.relative_change > 0 for r in changed)


def test_the_default_call_makes_a_trained_gpt2_classifier_forget_a_class():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = marked_sequences(4000, generator)
    x_test, y_test = marked_sequences(2000, generator)
    model = tiny_gpt2().train()
    optimiser = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(400):
        batch = torch.randint(0, len(x_train), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x_train[batch]).logits, y_train[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    def accuracies(m: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            right = m(x_test).logits.argmax(-1) == y_test
        return 100 * right[y_test == 0].float().mean().item(), 100 * right[y_test != 0].float().mean().item()

    forget_before, retain_before = accuracies(model)
    assert forget_before > 95 and retain_before > 95  # the task was learnt
    original = copy.deepcopy(model)
    forget = x_train[y_train == 0][:600]  # enough that none recognised bounds the held-out rate at a quarter of 1 %
    retain = torch.cat([x_train[y_train == c][:100] for c in range(1, CLASSES)])
    report = unlearn(model, forget, retain)
    forget_after, retain_after = accuracies(model)
    assert forget_after <= 1.0 and retain_after >= retain_before - 1.0, (forget_after, retain_after, report.alpha_choice)
    assert any(isinstance(model.get_submodule(r.name), Conv1D) and r.relative_change > 0 for r in report.layers)
    # the classifier reads the last position: the choice found it and used that position's statistics
    choice = report.alpha_choice
    assert choice.first_token and choice.token_position == -1 and choice.every_position_skipped
    # a fixed call with the chosen scales and kind repeats the chosen edit (all but the head's correction)
    fixed = unlearn(original, forget, retain, alpha_r=choice.alpha_r, alpha_f=choice.alpha_f,
                    alpha_f_head=choice.alpha_f_head, first_token=True, token_position=-1,
                    keep_retain_mean=choice.keep_retain_mean, skip_first_layer=True, inplace=False)
    for name, p in model.named_parameters():
        if not name.startswith("score."):
            assert rel_err(p, fixed.model.get_parameter(name)) < 1e-5, name
