"""Reader for CIFAR-10 in its "python version" format (pickled batches), numpy only.

The archive ``cifar-10-python.tar.gz`` extracts to a folder ``cifar-10-batches-py``
holding ``data_batch_1`` ... ``data_batch_5`` (the 50,000 training images) and
``test_batch`` (10,000). Each file is a pickled dict with ``data``, a uint8 array of
shape (10000, 3072) whose rows are the red, green and blue 32x32 planes in turn, and
``labels``, a list of ints in 0..9. Nothing here downloads anything: the user names
the folder.

The files are pickles, and unpickling runs whatever a pickle names. So they are read
with an unpickler that resolves only the few names a CIFAR batch needs (numpy's array
reconstruction and ``_codecs.encode``, which Python 3 protocol-2 pickles use for
bytes); a file naming anything else is rejected instead of executed.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from .idx import existing_directory

__all__ = ["CIFAR10_FILES", "CIFAR10_SHAPE", "load_cifar10", "read_cifar_batch"]

PathLike = Union[str, "os.PathLike[str]"]

#: ``split`` -> the batch files it is made of, in order.
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

#: The shape of one image as returned: channels, height, width.
CIFAR10_SHAPE = (3, 32, 32)

# numpy pickles arrays as a call of its `_reconstruct` function (pickle protocols
# up to 4) or `_frombuffer` (protocol 5), under the module name of the numpy that
# wrote the file ("numpy.core" before numpy 2, "numpy._core" since). The functions
# themselves are taken from ndarray's own reduce, so no deprecated module is
# imported to find them.
_RECONSTRUCT = np.zeros(1).__reduce_ex__(2)[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR batch needs."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "lists, strings and numbers"
            ) from None


def read_cifar_batch(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable pickle, names anything beyond numpy
            arrays, is not a dict with ``data`` and ``labels``, or their shapes, types
            or values are wrong. The message starts with the file's path.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        # encoding="bytes": the official files were written by Python 2, whose str
        # keys and array payloads must come back as raw bytes, not be decoded as text.
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "not a batch"
        raise ValueError(f"{path}: not a CIFAR-10 python-version batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise ValueError(f"{path}: batch has no {' or '.join(map(repr, missing))} entry "
                         f"(keys: {', '.join(map(repr, sorted(map(str, batch))))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != int(np.prod(CIFAR10_SHAPE)):
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(batch["labels"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: 'labels' is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must be a list of integers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: CIFAR-10 labels are 0..9, found values in "
                         f"[{labels.min()}, {labels.max()}]")
    return data.reshape(-1, *CIFAR10_SHAPE).copy(), labels.astype(np.int64)


def load_cifar10(root: PathLike, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """Load one split of CIFAR-10 from a local folder of python-version batches.

    Args:
        root: the extracted ``cifar-10-batches-py`` folder, or a folder containing it.
        split: ``"train"`` (``data_batch_1`` .. ``data_batch_5``, concatenated in
            that order) or ``"test"`` (``test_batch``).

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` (channels first, as torch
        wants them) and int64 ``(N,)``.

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``, or a batch file is
            malformed (see :func:`read_cifar_batch`).
        FileNotFoundError: ``root`` does not exist, or a batch file of the split is
            missing (the message names the folder and the missing files).
        NotADirectoryError: ``root`` is not a directory.
    """
    if split not in CIFAR10_FILES:
        raise ValueError(f"split must be one of {', '.join(map(repr, CIFAR10_FILES))}; got {split!r}")
    root = existing_directory(root, "CIFAR-10")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = CIFAR10_FILES[split]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} split: {', '.join(missing)} missing in {root} (expected the "
            "'python version' batches data_batch_1..5 and test_batch, as extracted from "
            "cifar-10-python.tar.gz)"
        )
    parts = [read_cifar_batch(root / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
