"""Tests for the CIFAR-10 python-version loader, on small batch files written here."""

import pickle

import numpy as np
import pytest

from sparsemom_ext.data import cifar, load_cifar10


def batch_dict(n, seed, bytes_keys=True):
    """A CIFAR-10 batch as the official files hold it: rows of R, G, B 32x32 planes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    d = {"batch_label": "testing batch", "labels": labels, "data": data,
         "filenames": [f"img_{i}.png" for i in range(n)]}
    # The official files were pickled by Python 2: loaded with encoding="bytes" their keys are bytes.
    return {k.encode(): v for k, v in d.items()} if bytes_keys else d


def write_cifar(root, n_per_batch=4, protocol=2, bytes_keys=True, numpy1_names=False):
    """Write data_batch_1..5 and test_batch under root; return {name: dict written}.

    ``numpy1_names`` spells numpy's array constructor as numpy < 2 (which wrote the
    official files) does: protocol 2 names globals as text, so a byte replacement does it.
    """
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for seed, name in enumerate(cifar.CIFAR10_FILES["train"] + cifar.CIFAR10_FILES["test"]):
        d = batch_dict(n_per_batch, seed, bytes_keys)
        raw = pickle.dumps(d, protocol=protocol)
        if numpy1_names:
            assert protocol == 2 and b"numpy._core.multiarray\n" in raw
            raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        (root / name).write_bytes(raw)
        written[name] = d
    return written


def plain(d):
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


@pytest.mark.parametrize("protocol,bytes_keys,numpy1_names",
                         [(2, True, True), (2, True, False), (pickle.HIGHEST_PROTOCOL, False, False)])
def test_loads_train_and_test_in_file_order(tmp_path, protocol, bytes_keys, numpy1_names):
    written = write_cifar(tmp_path, n_per_batch=3, protocol=protocol, bytes_keys=bytes_keys,
                          numpy1_names=numpy1_names)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.uint8
    assert y.shape == (15,) and y.dtype == np.int64
    expected = [plain(written[n]) for n in cifar.CIFAR10_FILES["train"]]
    np.testing.assert_array_equal(y, np.concatenate([e["labels"] for e in expected]))
    # Channel-first: image 0's red plane is the first 1024 bytes of its row.
    first = expected[0]["data"][0]
    np.testing.assert_array_equal(x[0, 0], first[:1024].reshape(32, 32))
    np.testing.assert_array_equal(x[0, 2], first[2048:].reshape(32, 32))
    np.testing.assert_array_equal(x[3], expected[1]["data"][0].reshape(3, 32, 32))
    x_test, y_test = load_cifar10(tmp_path, "test")
    assert x_test.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(y_test, plain(written["test_batch"])["labels"])


def test_accepts_the_parent_of_the_extracted_folder(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    x, _ = load_cifar10(tmp_path, "test")
    assert x.shape == (4, 3, 32, 32)


def test_missing_directory_and_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 missing"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_cifar10(tmp_path, "validation")


class Evil:
    def __reduce__(self):
        return (print, ("side effect",))


@pytest.mark.parametrize("content,message", [
    (b"not a pickle", "not a CIFAR-10 python-version batch"),
    (pickle.dumps([1, 2, 3]), "expected a pickled dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "no 'labels' entry"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"shape \(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images but 1 labels"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "labels are 0..9"),
    (pickle.dumps({b"data": Evil(), b"labels": []}), "refusing to load builtins.print"),
])
def test_malformed_batches_raise_value_errors_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_cifar10(tmp_path, "test")
    assert str(path) in str(info.value)
    assert "side effect" not in capsys.readouterr().out
