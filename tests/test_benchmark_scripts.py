"""The benchmark scripts run end to end (tiny sizes on the CPU) and write their JSON and table."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_imagenet_benchmark_smoke(tmp_path):
    import bench_imagenet

    out = tmp_path / "imagenet_cpu"
    assert bench_imagenet.main(["--device", "cpu", "--archs", "mobilenet_v3_small", "--images", "2", "--batch-size", "2",
                                "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["ceilings"]) == {"copy_GBps", "bf16_matmul_TFLOPs", "tf32_matmul_TFLOPs", "fp32_matmul_TFLOPs"}
    (arch,) = result["archs"]
    for method in ("deepunlearn", "pure"):
        r = arch[method]
        assert r["total"] > 0 and r["layers"] > 50
        assert r["total"] >= r["solve"] + r["edit"]
    assert arch["paper"]["images_per_side"] == 2 and arch["paper_over_deepunlearn"] > 0
    assert "| mobilenet_v3_small | paper | 2 |" in out.with_suffix(".md").read_text()
