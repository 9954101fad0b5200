"""The ``deepunlearn`` command line on image trees built from real photographs.

The trees hold the 20 ImageNet validation photographs (512x512 JPEG) that the ``foolbox``
package ships in its ``data/`` folder; the class index is in each file name
(``imagenet_07_609.jpg``: class 609). Folders are named by class index, so the partial tree
keeps torchvision's 1000-class output order.
"""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import deepunlearn
from deepunlearn.cli import main
from deepunlearn.cli.image_tree import image_tree
from deepunlearn.search import ALPHA_F_GRID, ALPHA_R_GRID

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from models_for_tests import EveryKind  # noqa: E402

from conftest import rel_err  # noqa: E402

FORGET = "609"  # the one class with two photographs


def foolbox_images() -> list[tuple[int, Path]]:
    spec = importlib.util.find_spec("foolbox")
    assert spec is not None, "the foolbox package (test data: 20 ImageNet photographs) is not installed"
    data = Path(spec.submodule_search_locations[0]) / "data"
    found = [(int(m.group(1)), p) for p in sorted(data.iterdir()) if (m := re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", p.name))]
    assert len(found) == 20, f"expected 20 ImageNet photographs in {data}, found {len(found)}"
    return found


pytestmark = pytest.mark.xdist_group("test_cli")  # one worker (-n): its module fixtures built once


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet") / "train"
    for label, path in foolbox_images():
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / str(label) / path.name)
    return root


@pytest.fixture
def pickled_model(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(EveryKind(classes=1000), path)
    return path


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


# on the CPU wherever the tests run, so that the library run on the CPU is an exact reference
SMALL = ("--image-size", "32", "--workers", "0", "--no-progress", "--device", "cpu", "--dtype", "float64")


def test_image_tree_maps_numeric_folders_to_class_indices(tree):
    ds = image_tree(tree, 32)
    assert sorted(set(ds.targets)) == sorted({label for label, _ in foolbox_images()})
    assert ds.targets.count(609) == 2
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == ds.targets[0] == 129  # folders in name order: "129" < "22"


def test_forget_then_evaluate_a_pickled_module(tree, pickled_model, tmp_path, capsys):
    out = tmp_path / "forgot.pt"
    assert run("forget", "--model", pickled_model, "--data", tree, "--forget", FORGET, "--out", out, *SMALL) == 0
    report = json.loads((tmp_path / "forgot.pt.json").read_text())
    assert report["forget_classes"] == [609]
    assert report["forget_images"] == 2 and report["retain_images"] == 18  # one image per retain class
    choice = report["report"]["alpha_choice"]  # no --alpha-r / --alpha-f: chosen on held-out images, scored by labels
    assert choice["scoring"] == "labels" and (report["alpha_r"], report["alpha_f"]) == (choice["alpha_r"], choice["alpha_f"])
    assert report["seconds"]["choose_alpha"] > 0
    names = {layer["name"] for layer in report["report"]["layers"]}
    assert {"grouped", "attn.in_proj.q", "attn.out_proj", "query", "key", "head"} <= names
    # alpha chosen: the layer the images reach first is left as it was (--first-layer auto)
    assert "conv" not in names and [s[0] for s in report["report"]["skipped"]] == ["conv"]
    assert all(layer["relative_change"] > 0 for layer in report["report"]["layers"])
    assert set(report["seconds"]) >= {"collect_forget", "collect_retain", "decompose", "edit"}
    edited = torch.load(out, weights_only=False)
    assert isinstance(edited, EveryKind)
    original = torch.load(pickled_model, weights_only=False)
    assert not torch.equal(edited.head.weight, original.head.weight)

    # the same edit through the library, from the same draw
    ds = image_tree(tree, 32)
    f_idx, r_idx = deepunlearn.api.draw_samples(torch.as_tensor(ds.targets), [609], 1, None, 0)
    ref = deepunlearn.unlearn(original, Subset(ds, f_idx), Subset(ds, r_idx), classes=[609], dtype=torch.float64).model
    for (k, a), b in zip(edited.state_dict().items(), ref.state_dict().values()):
        assert rel_err(a, b) < 1e-10, k

    capsys.readouterr()
    ev = tmp_path / "eval.json"
    assert run("evaluate", "--model", out, "--data", tree, "--forget", FORGET, "--report", ev, *SMALL[:-2]) == 0
    blob = json.loads(ev.read_text())
    assert blob["images"] == 20 and blob["forget_images"] == 2 and blob["retain_images"] == 18
    assert "retain accuracy" in capsys.readouterr().out


def test_stats_build_show_and_forget_from_stored_statistics(tree, pickled_model, tmp_path, capsys):
    stats = tmp_path / "stats.pt"
    assert run("stats", "build", "--model", pickled_model, "--data", tree, "--per-class", 2, "--out", stats, *SMALL) == 0
    capsys.readouterr()
    assert run("stats", "show", stats) == 0
    shown = capsys.readouterr().out
    assert "19 classes" in shown and "checksum verified" in shown and "shared by key" in shown
    assert run("stats", "show", stats, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "per-class statistics" and len(info["classes"]) == 19

    out = tmp_path / "from-stats.pt"
    # sums, not images: alpha cannot be chosen on held-out images, so both scales are needed
    assert run("forget", "--model", pickled_model, "--stats", stats, "--forget", FORGET, "--out", out, *SMALL) == 2
    assert "give --alpha-r and --alpha-f" in capsys.readouterr().err and not out.exists()
    assert run("forget", "--model", pickled_model, "--stats", stats, "--forget", FORGET, "--out", out,
               "--alpha-r", 100, "--alpha-f", 10, *SMALL) == 0
    # equals a fresh computation over the samples the store was built from
    store = deepunlearn.ClassStatistics.load(stats)
    ds = image_tree(tree, 32)
    f_idx = store.indices[609]
    r_idx = sorted(i for c, v in store.indices.items() if c != 609 for i in v)
    original = torch.load(pickled_model, weights_only=False)
    ref = deepunlearn.unlearn(original, Subset(ds, f_idx), Subset(ds, r_idx), alpha_r=100, alpha_f=10).model
    edited = torch.load(out, weights_only=False)
    for (k, a), b in zip(edited.state_dict().items(), ref.state_dict().values()):
        # float64 sums in another order: equal up to the float32 rounding of the stored weights
        assert rel_err(a, b) < 1e-6, k


def test_search_picks_alphas_on_held_out_images(tree, pickled_model, tmp_path):
    out = tmp_path / "searched.pt"
    # every photograph goes into the samples, so the held-out images come from --search-data
    assert run("forget", "--model", pickled_model, "--data", tree, "--forget", FORGET, "--search", "--out", out, *SMALL) == 2
    assert run("forget", "--model", pickled_model, "--data", tree, "--forget", FORGET, "--search", "--search-per-class", 1,
               "--search-data", tree, "--out", out, *SMALL) == 0
    report = json.loads((tmp_path / "searched.pt.json").read_text())
    assert len(report["search"]) == len(ALPHA_R_GRID) * len(ALPHA_F_GRID) and report["search_images"] == 19
    assert (report["alpha_r"], report["alpha_f"]) in {(r["alpha_r"], r["alpha_f"]) for r in report["search"]}


@pytest.mark.parametrize("argv, message", [
    (["--forget", "123"], "class '123' is neither a folder"),
    (["--forget", FORGET, "--alpha-f", "-1"], "alpha_f must be"),
    (["--forget", FORGET, "--retain-per-class", "0"], "--retain-per-class must be at least 1"),
    (["--forget", FORGET, "--alpha-r", "100", "--alpha-f", "10", "--refit-head", "yes"], "needs the automatic choice"),
    (["--forget", FORGET, "--device", "cuda:7"] if not torch.cuda.is_available() else ["--forget", "999999"], "cuda|neither"),
])
def test_bad_requests_exit_2_with_a_message_and_write_nothing(tree, pickled_model, tmp_path, capsys, argv, message):
    out = tmp_path / "never.pt"
    assert run("forget", "--model", pickled_model, "--data", tree, "--out", out, *SMALL, *argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "never.pt.json").exists()


def test_files_are_never_overwritten_by_mistake(tree, pickled_model, tmp_path, capsys):
    before = pickled_model.read_bytes()
    assert run("forget", "--model", pickled_model, "--data", tree, "--forget", FORGET, "--out", pickled_model, *SMALL) == 2
    assert "is an input file" in capsys.readouterr().err
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    assert run("forget", "--model", pickled_model, "--data", tree, "--forget", FORGET, "--out", existing, *SMALL) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me" and pickled_model.read_bytes() == before


def test_model_files_of_the_wrong_kind_are_named(tree, tmp_path, capsys):
    sd = tmp_path / "sd.pt"
    torch.save(EveryKind().state_dict(), sd)
    assert run("forget", "--model", sd, "--data", tree, "--forget", FORGET, "--out", tmp_path / "o.pt", *SMALL) == 2
    assert "holds a state dict, not a module" in capsys.readouterr().err
    assert run("forget", "--arch", "resnet18", "--weights", sd, "--data", tree, "--forget", FORGET,
               "--out", tmp_path / "o.pt", *SMALL) == 2
    assert "do not fit resnet18" in capsys.readouterr().err
    assert run("forget", "--arch", "resnet5", "--data", tree, "--forget", FORGET, "--out", tmp_path / "o.pt", *SMALL) == 2
    assert "unknown architecture 'resnet5'" in capsys.readouterr().err
    assert run("forget", "--model", sd, "--arch", "resnet18", "--data", tree, "--forget", FORGET,
               "--out", tmp_path / "o.pt", *SMALL) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert run("evaluate", "--arch", "resnet18", "--data", tmp_path / "nowhere", "--forget", "1", *SMALL[:-2]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    exe = shutil.which("deepunlearn")
    assert exe is not None, "the deepunlearn console script is not installed (pip install -e .)"
    for cmd in ([exe, "--help"], [sys.executable, "-m", "deepunlearn", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "forget" in proc.stdout and "stats" in proc.stdout, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_b_16", "resnet50"])
def test_imagenet_architectures_end_to_end(tree, tmp_path, arch):
    """torchvision's models at random initialisation, 224x224, through the console script."""
    out = tmp_path / f"{arch}.pth"
    cmd = [sys.executable, "-m", "deepunlearn", "forget", "--arch", arch, "--data", str(tree), "--forget", FORGET,
           "--out", str(out), "--dtype", "float32", "--autocast", "bf16", "--batch-size", "8", "--workers", "2",
           "--no-progress", "--alpha-r", "100", "--alpha-f", "10"]  # the fixed pair: this checks the layers
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # threads: the worker's share (conftest.py)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.with_name(out.name + ".json").read_text())
    assert report["forget_images"] == 2 and report["retain_images"] == 18 and report["autocast"] == "bf16"
    layers = report["report"]["layers"]
    import torchvision

    model = torchvision.models.get_model(arch, weights=None)
    expected = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    if arch == "vit_b_16":  # out_proj is a Linear; the packed in_proj adds q, k, v per block
        expected += 3 * len(model.encoder.layers)
        assert {s[0] for s in report["report"]["skipped"]} == {"class_token", "encoder.pos_embedding"}
    assert len(layers) == expected
    zero_init = {"heads.head"}  # torchvision initialises ViT's classifier to zeros: nothing to project
    assert all(layer["relative_change"] > 0 for layer in layers if layer["name"] not in zero_init)
    state = torch.load(out, weights_only=True)
    model.load_state_dict(state)  # strict: the saved file is a complete state dict of the architecture


def test_first_layer_option_skips_or_edits_the_stem(tree, pickled_model, tmp_path):
    fixed = ("--alpha-r", 100, "--alpha-f", 10)
    for choice, skipped in (("auto", []), ("skip", ["conv"])):  # both scales given: auto edits every layer
        out = tmp_path / f"{choice}.pt"
        assert run("forget", "--model", pickled_model, "--data", tree, "--forget", FORGET, "--out", out,
                   "--first-layer", choice, "--first-token", "yes" if choice == "skip" else "auto",
                   "--keep-retain-mean", "yes" if choice == "skip" else "auto", *fixed, *SMALL) == 0
        report = json.loads((tmp_path / f"{choice}.pt.json").read_text())["report"]
        assert [s[0] for s in report["skipped"]] == skipped, choice
        assert report["keep_retain_mean"] == (choice == "skip")
    original = torch.load(pickled_model, weights_only=False)
    assert torch.equal(torch.load(tmp_path / "skip.pt", weights_only=False).conv.weight, original.conv.weight)
    assert not torch.equal(torch.load(tmp_path / "auto.pt", weights_only=False).conv.weight, original.conv.weight)
    # --keep-retain-mean yes shifts the biases of the edited layers; both scales given, auto keeps them
    assert not torch.equal(torch.load(tmp_path / "skip.pt", weights_only=False).attn.out_proj.bias, original.attn.out_proj.bias)
    assert torch.equal(torch.load(tmp_path / "auto.pt", weights_only=False).attn.out_proj.bias, original.attn.out_proj.bias)
    # --first-token yes: the attention layers saw one vector per image (the first position)
    rows = {r["name"]: r for r in json.loads((tmp_path / "skip.pt.json").read_text())["report"]["layers"]}
    assert rows["attn.out_proj"]["forget_vectors"] == 2


def test_timm_architecture_with_safetensors_weights_keeps_the_format(tree, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    original = timm.create_model("resnet18", pretrained=False).eval()
    weights = tmp_path / "r18.safetensors"
    st.save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(weights))
    fixed = ("--alpha-r", 100, "--alpha-f", 10)
    base = ("forget", "--timm", "resnet18", "--weights", weights, "--data", tree, "--forget", FORGET)
    # the output keeps the input's format: a .pth name for safetensors weights is refused before any work
    assert run(*base, "--out", tmp_path / "o.pth", *fixed, *SMALL) == 2
    assert "name --out with the .safetensors suffix" in capsys.readouterr().err and not (tmp_path / "o.pth").exists()
    out = tmp_path / "forgot.safetensors"
    assert run(*base, "--out", out, *fixed, *SMALL) == 0
    edited = st.load_file(str(out))
    assert edited.keys() == original.state_dict().keys()
    # equal to the library's edit of the same model on the same draw
    ds = image_tree(tree, 32)
    f_idx, r_idx = deepunlearn.api.draw_samples(torch.as_tensor(ds.targets), [609], 1, None, 0)
    ref = deepunlearn.unlearn(original, Subset(ds, f_idx), Subset(ds, r_idx), alpha_r=100, alpha_f=10, dtype=torch.float64,
                              inplace=False).model.state_dict()
    for k, v in ref.items():
        assert rel_err(edited[k], v) < 1e-10 if v.is_floating_point() else torch.equal(edited[k], v), k
    assert not torch.equal(edited["fc.weight"], original.state_dict()["fc.weight"])
    # timm's own error for an unknown name, with close names
    assert run("forget", "--timm", "resnet5", "--data", tree, "--forget", FORGET, "--out", tmp_path / "x.pt", *SMALL) == 2
    assert "unknown timm architecture 'resnet5'" in capsys.readouterr().err
    assert run("forget", "--timm", "resnet18", "--arch", "resnet18", "--data", tree, "--forget", FORGET,
               "--out", tmp_path / "x.pt", *SMALL) == 2
    assert "exactly one of --model FILE, --arch NAME, --timm NAME or --hf DIR" in capsys.readouterr().err


def _tiny_hf_vit(num_labels: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=48, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers, transformers.ViTForImageClassification(config).eval()


def test_hugging_face_directory_in_and_out(tree, tmp_path, capsys):
    """--hf: a save_pretrained directory in, the edited model written as one (never over the input),
    equal to the library's edit; the directory's image mean and std are used; evaluate takes it too."""
    ds = image_tree(tree, 32)
    transformers, original = _tiny_hf_vit(max(ds.targets) + 1)
    src = tmp_path / "vit"
    original.save_pretrained(src)
    (src / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    weights_before = (src / "model.safetensors").read_bytes()
    fixed = ("--alpha-r", 100, "--alpha-f", 10)
    base = ("forget", "--hf", src, "--data", tree, "--forget", FORGET)
    for bad, says in ((src, "is an input folder"), (tmp_path, "holds the input"), (tmp_path / "o.safetensors", "name --out as a folder")):
        assert run(*base, "--out", bad, "--overwrite", *fixed, *SMALL) == 2
        assert says in capsys.readouterr().err
    assert run(*base, "--weights", tmp_path / "w.pt", "--out", tmp_path / "x", *fixed, *SMALL) == 2
    assert "--weights and --num-classes go with --arch or --timm, not with --hf" in capsys.readouterr().err
    out = tmp_path / "forgot"
    assert run(*base, "--out", out, *fixed, *SMALL) == 0
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (src / "model.safetensors").read_bytes() == weights_before  # the input is never written
    edited = transformers.AutoModelForImageClassification.from_pretrained(out, local_files_only=True).eval()
    assert (out / "preprocessor_config.json").read_text() == (src / "preprocessor_config.json").read_text()
    assert not list(tmp_path.glob(".forgot*"))  # no temporary folder left
    # equal to the library's edit of the same model on the same draw, with the directory's normalisation
    ds = image_tree(tree, 32, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    f_idx, r_idx = deepunlearn.api.draw_samples(torch.as_tensor(ds.targets), [609], 1, None, 0)
    from deepunlearn.cli.model_files import HFClassifier

    ref = deepunlearn.unlearn(HFClassifier(original), Subset(ds, f_idx), Subset(ds, r_idx), alpha_r=100, alpha_f=10,
                              dtype=torch.float64, inplace=False).model.hf.state_dict()
    got, before = edited.state_dict(), original.state_dict()
    for k, v in ref.items():
        assert rel_err(got[k], v) < 1e-10 if v.is_floating_point() else torch.equal(got[k], v), k
    matrices = [k for k, v in before.items() if v.dim() >= 2 and not k.endswith(("cls_token", "position_embeddings"))]
    assert len(matrices) == 14  # 2 blocks × (q, k, v, o, fc1, fc2), the patch projection, the classifier
    assert all(not torch.equal(got[k], before[k]) for k in matrices)
    # --overwrite replaces a previous output directory whole; evaluate reads the directory
    assert run(*base, "--out", out, "--overwrite", *fixed, *SMALL) == 0
    assert run("evaluate", "--hf", out, "--data", tree, "--forget", FORGET, "--report", tmp_path / "ev.json", *SMALL[:-2]) == 0
    evaluated = json.loads((tmp_path / "ev.json").read_text())
    assert evaluated["images"] == len(ds) and evaluated["forget_images"] == 2
    assert run("stats", "build", "--hf", out, "--data", tree, "--per-class", "1", "--out", tmp_path / "s.pt", *SMALL) == 0
    assert deepunlearn.ClassStatistics.load(tmp_path / "s.pt").classes
    assert run("forget", "--hf", tmp_path / "nothing", "--data", tree, "--forget", FORGET, "--out", tmp_path / "y", *SMALL) == 2
    assert "not a save_pretrained directory" in capsys.readouterr().err
