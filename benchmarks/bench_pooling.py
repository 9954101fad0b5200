"""Max pooling in the package's forward passes (``deepunlearn.pooling``) against torch's kernel, and
what it does to whole forward passes, in one run on the CPU.

    python benchmarks/bench_pooling.py [--networks NAME ...] [--out benchmarks/results/pooling_cpu]

Per pooling layer shape of the networks the benchmarks use (VGG-11-BN at 32×32, the suite's
SmallCNN, the ImageNet ResNet stem; batch as collected): the median time of ``F.max_pool2d`` on a
contiguous ``(N, C, H, W)`` map and of :func:`~deepunlearn.pooling.fast_max_pool2d` (the two
timed in turn), checked equal. Then one forward pass of each whole network at that batch, plain
and with its pooling layers by :func:`~deepunlearn.pooling.pooling_by_maxima`, as ``eval_no_grad``
runs it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, paired_median_times, write_results  # noqa: E402

from deepunlearn.pooling import fast_max_pool2d, pooling_by_maxima  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (name, input shape, kernel, stride, padding)
LAYERS = [
    ("vgg11_bn_cifar.pool1", (100, 64, 32, 32), 2, 2, 0),
    ("vgg11_bn_cifar.pool2", (100, 128, 16, 16), 2, 2, 0),
    ("vgg11_bn_cifar.pool3", (100, 256, 8, 8), 2, 2, 0),
    ("vgg11_bn_cifar.pool5", (100, 512, 2, 2), 2, 2, 0),
    ("smallcnn.pool1", (225, 16, 28, 28), 2, 2, 0),
    ("smallcnn.pool3", (225, 64, 7, 7), 2, 2, 0),
    ("resnet_imagenet.stem_pool", (25, 64, 112, 112), 3, 2, 1),
]


NETWORKS = ("vgg11_bn_cifar", "smallcnn", "resnet18_224")


def networks(names: tuple[str, ...] = NETWORKS) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """``(name, model, input batch)`` of the networks named, in the order of ``NETWORKS``."""
    import torchvision

    from bench_solver import build_model
    from deepunlearn.experiments.models import SmallCNN

    torch.manual_seed(0)
    make = {"vgg11_bn_cifar": lambda: (build_model("vgg11_bn_cifar"), torch.randn(100, 3, 32, 32)),
            "smallcnn": lambda: (SmallCNN().eval(), torch.randn(225, 1, 28, 28)),
            "resnet18_224": lambda: (torchvision.models.resnet18(weights=None).eval(), torch.randn(25, 3, 224, 224))}
    return [(name, *make[name]()) for name in NETWORKS if name in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=15, help="timed rounds per pair (medians)")
    p.add_argument("--networks", nargs="*", choices=NETWORKS, default=list(NETWORKS),
                   help="the whole networks timed (none: the pooling layers alone)")
    p.add_argument("--out", type=Path, default=RESULTS / "pooling_cpu")
    a = p.parse_args(argv)
    cpu = torch.device("cpu")
    result = {"device_name": device_name(cpu), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "layers": [], "networks": []}
    with torch.no_grad():
        for name, shape, k, s, pad in LAYERS:
            x = torch.randn(shape)
            if not torch.equal(F.max_pool2d(x, k, s, pad), fast_max_pool2d(x, k, s, pad)):
                raise AssertionError(f"{name}: the maxima differ from torch's")
            torch_s, ours_s = paired_median_times([lambda: F.max_pool2d(x, k, s, pad), lambda: fast_max_pool2d(x, k, s, pad)],
                                                  cpu, a.repeat)
            result["layers"].append({"layer": name, "shape": list(shape), "kernel": k, "stride": s, "padding": pad,
                                     "torch_ms": 1e3 * torch_s, "ours_ms": 1e3 * ours_s, "speedup": torch_s / ours_s})
            print(f"{name:28s} torch {1e3 * torch_s:8.2f} ms  ours {1e3 * ours_s:7.2f} ms  {torch_s / ours_s:5.1f}x", flush=True)

        def pooled(model, x):
            with pooling_by_maxima(model):
                return model(x)

        for name, model, x in networks(tuple(a.networks)):
            if not torch.equal(model(x), pooled(model, x)):
                raise AssertionError(f"{name}: the forward pass differs with pooling by maxima")
            plain_s, ours_s = paired_median_times([lambda: model(x), lambda: pooled(model, x)], cpu, max(3, a.repeat // 3))
            result["networks"].append({"network": name, "batch": x.shape[0], "plain_ms": 1e3 * plain_s,
                                       "pooled_ms": 1e3 * ours_s, "speedup": plain_s / ours_s})
            print(f"{name:28s} forward {1e3 * plain_s:8.1f} ms  pooled {1e3 * ours_s:8.1f} ms  {plain_s / ours_s:5.2f}x", flush=True)
    write_results(a.out, result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Max pooling: torch's kernel and elementwise maxima ({result['device_name']}, torch {result['torch']})", "", "Medians of paired rounds in one run; the outputs are checked equal.", "",
             "| layer | input | kernel / stride / padding | torch (ms) | ours (ms) | speedup |", "|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {'×'.join(map(str, r['shape']))} | {r['kernel']} / {r['stride']} / {r['padding']} | "
                     f"{r['torch_ms']:.2f} | {r['ours_ms']:.2f} | {r['speedup']:.1f}× |")
    lines += ["", "| network | batch | forward (ms) | forward, pooling by maxima (ms) | speedup |", "|---|---|---|---|---|"]
    for r in result["networks"]:
        lines.append(f"| {r['network']} | {r['batch']} | {r['plain_ms']:.1f} | {r['pooled_ms']:.1f} | {r['speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
