import gzip
import struct

import numpy as np
import pytest

from deepunlearn.experiments.fashion_mnist import DEBIAN_ROOT, fashion_mnist, read_idx


def write_idx(path, arr: np.ndarray, code: int):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype).tobytes())


def test_read_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a, 0x08)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    b = np.arange(5, dtype=np.int32) - 2
    write_idx(tmp_path / "b.gz", b, 0x0C)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), b)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="holds 3 elements"):
        read_idx(tmp_path / "y")


def test_missing_files_give_an_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation", tmp_path)


@pytest.mark.skipif(not (DEBIAN_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    test = fashion_mnist("test")
    x, y = test.tensors
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert sorted(y.unique().tolist()) == list(range(10)) and (y.bincount() == 1000).all()
    assert abs(float(x.mean())) < 0.05 and 0.9 < float(x.std()) < 1.1  # normalised with train statistics


def test_the_sample_draw_is_class_balanced_and_a_generator_draws_on():
    """draw_samples: every kept class equally in the retain sample, the forget sample spread over the
    forgotten classes; a seed and a generator seeded alike draw the same, the generator left advanced
    (the suite draws its other samples from it); bad requests are refused by name."""
    import torch

    from deepunlearn.sampling import draw_samples

    labels = torch.arange(5).repeat_interleave(40)[torch.randperm(200, generator=torch.Generator().manual_seed(3))]
    forget, retain = draw_samples(labels, [1, 3], 7, None, 11)
    assert torch.bincount(labels[retain], minlength=5).tolist() == [7, 0, 7, 0, 7]
    assert torch.bincount(labels[forget], minlength=5).tolist() == [0, 11, 0, 10, 0]  # 21 spread over two classes
    g = torch.Generator().manual_seed(11)
    assert draw_samples(labels, [1, 3], 7, None, g) == (forget, retain)
    assert not torch.equal(torch.randperm(50, generator=g), torch.randperm(50, generator=torch.Generator().manual_seed(11)))
    for classes, per_class, n_forget, match in (([], 7, None, "no class"), ([9], 7, None, "do not occur"),
                                                ([1], 0, None, "retain_per_class"), ([1], 7, 0, "forget_samples"),
                                                ([0, 1, 2, 3, 4], 7, None, "nothing to retain")):
        with pytest.raises(ValueError, match=match):
            draw_samples(labels, classes, per_class, n_forget, 0)
