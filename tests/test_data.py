"""Tests for the packaged MNIST copy and the numpy-only IDX loader."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from sparsemom_ext.data import idx


# Written independently of the loader (explicit big-endian via struct/numpy)
# so a symmetric bug in reader and writer cannot cancel out.
TYPE_CASES = {
    0x08: (np.uint8, [0, 1, 127, 128, 255, 7]),
    0x09: (np.int8, [-128, -1, 0, 1, 127, 42]),
    0x0B: (np.int16, [-32768, -1, 0, 1, 32767, 258]),
    0x0C: (np.int32, [-(2**31), -1, 0, 1, 2**31 - 1, 16909060]),
    0x0D: (np.float32, [-1.5, 0.0, 3.25, np.inf, -np.inf, 1e-30]),
    0x0E: (np.float64, [-1.5, 0.0, 3.25, np.inf, 1e300, -1e-300]),
}


def idx_bytes(arr, code):
    arr = np.asarray(arr)
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, data, gz=False):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_split(root, split_stem, images, labels, style="dash", gz=False, prefix=""):
    sep = "-" if style == "dash" else "."
    suffix = ".gz" if gz else ""
    write(root / f"{prefix}{split_stem}-images{sep}idx3-ubyte{suffix}", idx_bytes(images, 0x08), gz)
    write(root / f"{prefix}{split_stem}-labels{sep}idx1-ubyte{suffix}", idx_bytes(labels, 0x08), gz)


def small_set(n=5, h=3, w=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, size=(n, h, w), dtype=np.uint8),
        rng.integers(0, 10, size=n, dtype=np.uint8),
    )


# ---------------------------------------------------------------- packaged MNIST


@pytest.fixture(scope="module")
def mnist_train():
    # load_mnist verifies the MD5s, so this also checks the shipped bytes.
    return idx.load_mnist("train")


@pytest.fixture(scope="module")
def mnist_test():
    return idx.load_mnist("test")


def test_packaged_files_present():
    d = idx.mnist_dir()
    assert d.is_dir()
    for name in idx.MNIST_MD5:
        assert (d / (name + ".gz")).is_file(), name
    readme = (d / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme
    for name, md5 in idx.MNIST_MD5.items():
        assert md5 in readme and name in readme


def test_mnist_train(mnist_train):
    x, y = mnist_train
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    assert set(np.unique(y).tolist()) == set(range(10))
    # Histogram instead of x / 255.0: same exact statistics without a 376 MB float copy.
    counts = np.bincount(x.ravel(), minlength=256).astype(np.float64)
    v = np.arange(256) / 255.0
    mean = (counts * v).sum() / counts.sum()
    std = np.sqrt((counts * v * v).sum() / counts.sum() - mean**2)
    assert mean == pytest.approx(0.1307, abs=1e-4)
    assert std == pytest.approx(0.3081, abs=1e-4)


def test_mnist_test(mnist_test):
    x, y = mnist_test
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert 0 <= y.min() and y.max() <= 9
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_default_verify_matches_explicit(mnist_test):
    # verify=None on the packaged directory verifies; result must equal load_mnist.
    x, y = idx.load_idx_dataset(idx.mnist_dir(), "test")
    assert np.array_equal(x, mnist_test[0]) and np.array_equal(y, mnist_test[1])


def test_mnist_md5_table():
    assert set(idx.MNIST_MD5) == {
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    }
    assert all(len(v) == 32 for v in idx.MNIST_MD5.values())


# ---------------------------------------------------------------- read_idx round trips


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("code", sorted(TYPE_CASES), ids=lambda c: f"0x{c:02X}")
def test_read_idx_roundtrip(tmp_path, code, gz):
    dtype, values = TYPE_CASES[code]
    arr = np.array(values, dtype=dtype).reshape(2, 3)
    p = write(tmp_path / ("a.idx" + (".gz" if gz else "")), idx_bytes(arr, code), gz)
    out = idx.read_idx(p)
    assert out.dtype == np.dtype(dtype)
    assert out.dtype.isnative
    assert out.flags.writeable
    assert out.shape == (2, 3)
    assert np.array_equal(out, arr)


def test_read_idx_nan_and_str_path(tmp_path):
    arr = np.array([np.nan, 1.0, -np.nan], dtype=np.float32)
    p = write(tmp_path / "nan.idx", idx_bytes(arr, 0x0D))
    out = idx.read_idx(str(p))
    assert np.isnan(out[0]) and out[1] == 1.0 and np.isnan(out[2])


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (1, 2, 1, 3), (0, 5)])
def test_read_idx_shapes(tmp_path, shape):
    arr = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape) - 3
    p = write(tmp_path / "s.idx", idx_bytes(arr, 0x0B))
    out = idx.read_idx(p)
    assert out.shape == shape and np.array_equal(out, arr)


def test_gzip_detected_by_magic_not_name(tmp_path):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    data = idx_bytes(arr, 0x0C)
    gz_no_suffix = write(tmp_path / "gzipped-but-no-suffix", data, gz=True)
    plain_with_suffix = write(tmp_path / "plain-but-named.gz", data, gz=False)
    assert gz_no_suffix.read_bytes()[:2] == b"\x1f\x8b"
    assert np.array_equal(idx.read_idx(gz_no_suffix), arr)
    assert np.array_equal(idx.read_idx(plain_with_suffix), arr)


# ---------------------------------------------------------------- read_idx errors


def test_truncated_header(tmp_path):
    p = write(tmp_path / "short.idx", b"\x00\x00")
    with pytest.raises(ValueError, match=r"short\.idx.*truncated"):
        idx.read_idx(p)


def test_truncated_dims(tmp_path):
    p = write(tmp_path / "dims.idx", bytes([0, 0, 8, 3]) + struct.pack(">i", 5))
    with pytest.raises(ValueError, match=r"dims\.idx.*truncated"):
        idx.read_idx(p)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_truncated_data(tmp_path, gz):
    data = idx_bytes(np.arange(100, dtype=np.uint8).reshape(10, 10), 0x08)[:-7]
    p = write(tmp_path / "cut.idx", data, gz)
    with pytest.raises(ValueError, match=r"cut\.idx.*truncated"):
        idx.read_idx(p)


def test_truncated_gzip_stream(tmp_path):
    data = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32), 0x0C))
    p = write(tmp_path / "cut.idx.gz", data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.idx\.gz.*truncated"):
        idx.read_idx(p)


def test_bad_magic(tmp_path):
    data = bytearray(idx_bytes(np.zeros(4, dtype=np.uint8), 0x08))
    data[1] = 0x01
    p = write(tmp_path / "magic.idx", bytes(data))
    with pytest.raises(ValueError, match=r"magic\.idx.*magic"):
        idx.read_idx(p)


@pytest.mark.parametrize("code", [0x00, 0x0A, 0x0F, 0xFF])
def test_unknown_type_code(tmp_path, code):
    data = bytes([0, 0, code, 1]) + struct.pack(">i", 4) + bytes(4)
    p = write(tmp_path / "type.idx", data)
    with pytest.raises(ValueError, match=rf"type\.idx.*unknown.*0x{code:02X}"):
        idx.read_idx(p)


def test_size_mismatch_trailing_bytes(tmp_path):
    p = write(tmp_path / "big.idx", idx_bytes(np.zeros((2, 2), dtype=np.int16), 0x0B) + b"\x00")
    with pytest.raises(ValueError, match=r"big\.idx.*size mismatch"):
        idx.read_idx(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        idx.read_idx(tmp_path / "nope.idx")


# ---------------------------------------------------------------- load_idx_dataset


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("style", ["dash", "dot"])
@pytest.mark.parametrize("split,stem", [("train", "train"), ("test", "t10k"), ("test", "test")])
def test_load_idx_dataset_naming(tmp_path, style, gz, split, stem):
    images, labels = small_set()
    write_split(tmp_path, stem, images, labels, style=style, gz=gz)
    x, y = idx.load_idx_dataset(tmp_path, split)
    assert x.dtype == np.uint8 and x.shape == (5, 3, 4)
    assert y.dtype == np.int64 and y.shape == (5,)
    assert np.array_equal(x, images) and np.array_equal(y, labels)


def test_load_idx_dataset_prefix_emnist_style(tmp_path):
    images, labels = small_set(n=4, h=2, w=2)
    write_split(tmp_path, "test", images, labels, gz=True, prefix="emnist-letters-")
    with pytest.raises(FileNotFoundError, match="emnist-letters-test-images-idx3-ubyte.gz"):
        idx.load_idx_dataset(tmp_path, "test")  # hint lists the files present
    x, y = idx.load_idx_dataset(tmp_path, "test", prefix="emnist-letters-")
    assert np.array_equal(x, images) and np.array_equal(y, labels)


def test_plain_preferred_over_gz(tmp_path):
    a, la = small_set(seed=1)
    b, lb = small_set(seed=2)
    write_split(tmp_path, "train", a, la, gz=False)
    write_split(tmp_path, "train", b, lb, gz=True)
    x, y = idx.load_idx_dataset(tmp_path, "train")
    assert np.array_equal(x, a) and np.array_equal(y, la)


def test_mnist_names_elsewhere_not_verified_by_default(tmp_path):
    # Fashion-MNIST/KMNIST use the MNIST file names: default must not reject them.
    images, labels = small_set()
    write_split(tmp_path, "train", images, labels, gz=True)
    x, _ = idx.load_idx_dataset(tmp_path, "train")
    assert np.array_equal(x, images)
    x, _ = idx.load_idx_dataset(tmp_path, "train", verify=False)
    assert np.array_equal(x, images)


def test_md5_mismatch_verify_true(tmp_path):
    images, labels = small_set()
    write_split(tmp_path, "train", images, labels, gz=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*MD5 mismatch"):
        idx.load_idx_dataset(tmp_path, "train", verify=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*MD5 mismatch"):
        idx.load_mnist("train", root=tmp_path)


def test_md5_mismatch_dot_style(tmp_path):
    images, labels = small_set()
    write_split(tmp_path, "train", images, labels, style="dot")
    with pytest.raises(ValueError, match=r"train-images\.idx3-ubyte.*MD5 mismatch"):
        idx.load_idx_dataset(tmp_path, "train", verify=True)


def test_verify_true_unknown_name(tmp_path):
    images, labels = small_set()
    write_split(tmp_path, "test", images, labels)  # "test-..." is not an MNIST name
    with pytest.raises(ValueError, match=r"test-images-idx3-ubyte.*no known MD5"):
        idx.load_idx_dataset(tmp_path, "test", verify=True)


def test_count_mismatch(tmp_path):
    images, _ = small_set(n=5)
    _, labels = small_set(n=6)
    write_split(tmp_path, "train", images, labels)
    with pytest.raises(ValueError, match=r"mismatch.*train-images-idx3-ubyte.*5.*train-labels-idx1-ubyte.*6"):
        idx.load_idx_dataset(tmp_path, "train")


def test_images_wrong_rank_or_dtype(tmp_path):
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((5, 12), np.uint8), 0x08))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8), 0x08))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*\(N, H, W\)"):
        idx.load_idx_dataset(tmp_path, "train")
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((5, 2, 2), np.float32), 0x0D))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*uint8"):
        idx.load_idx_dataset(tmp_path, "train")


def test_labels_wider_int_type_become_int64(tmp_path):
    images, _ = small_set(n=3)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images, 0x08))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.array([-1, 300, 70000], np.int32), 0x0C))
    _, y = idx.load_idx_dataset(tmp_path, "train")
    assert y.dtype == np.int64 and y.tolist() == [-1, 300, 70000]


def test_malformed_file_in_dataset_names_file(tmp_path):
    images, labels = small_set()
    write_split(tmp_path, "train", images, labels)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*truncated"):
        idx.load_idx_dataset(tmp_path, "train")


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        idx.load_idx_dataset(missing, "train")


def test_root_is_a_file(tmp_path):
    f = write(tmp_path / "afile", b"x")
    with pytest.raises(NotADirectoryError, match="afile"):
        idx.load_idx_dataset(f, "train")


def test_missing_file_message(tmp_path):
    images, labels = small_set()
    write_split(tmp_path, "train", images, labels)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        idx.load_idx_dataset(tmp_path, "train")
    msg = str(ei.value)
    assert str(tmp_path) in msg and "'train'" in msg
    for name in ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte",
                 "train-labels-idx1-ubyte.gz", "train-labels.idx1-ubyte.gz"):
        assert name in msg


def test_missing_test_split_lists_both_stems(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        idx.load_idx_dataset(tmp_path, "test")
    msg = str(ei.value)
    assert "'test'" in msg and "t10k-images-idx3-ubyte" in msg and "test-images.idx3-ubyte.gz" in msg


@pytest.mark.parametrize("split", ["val", "Train", "", "t10k"])
def test_bad_split(tmp_path, split):
    with pytest.raises(ValueError, match=r"split.*'train'.*'test'"):
        idx.load_idx_dataset(tmp_path, split)
    with pytest.raises(ValueError, match="split"):
        idx.load_mnist(split)


def test_bad_verify_value(tmp_path):
    with pytest.raises(ValueError, match="verify"):
        idx.load_idx_dataset(tmp_path, "train", verify="yes")
