"""Reader for IDX files (the MNIST family format) using only numpy and the stdlib.

IDX layout: two zero bytes, one type-code byte, one byte ``n`` giving the number
of dimensions, ``n`` big-endian int32 sizes, then the data, big-endian, in C order.
Files may be gzip-compressed. Nothing here ever downloads anything: MNIST is
shipped inside the package (see :func:`mnist_dir`) and every other IDX data set
(Fashion-MNIST, KMNIST, EMNIST, ...) is read from a directory the user names.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

__all__ = [
    "IDX_DTYPES",
    "MNIST_MD5",
    "SPLITS",
    "read_idx",
    "load_idx_dataset",
    "mnist_dir",
    "load_mnist",
]

PathLike = Union[str, "os.PathLike[str]"]

#: IDX type code -> big-endian numpy dtype as stored on disk.
IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: MD5 of the *decompressed* MNIST files (from the packaged README). The
#: decompressed bytes are hashed rather than the .gz files because gzip output
#: depends on the compressor (level, mtime, file name field); the IDX payload
#: does not.
MNIST_MD5: Dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Valid ``split`` values -> file-name stems tried, in order. ``t10k`` is the
#: MNIST/Fashion-MNIST/KMNIST spelling, ``test`` the EMNIST one.
SPLITS: Dict[str, Tuple[str, ...]] = {
    "train": ("train",),
    "test": ("t10k", "test"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_payload(path: Path) -> bytes:
    """Return the file's bytes, gunzipped if it starts with the gzip magic."""
    raw = path.read_bytes()
    # Sniff the content instead of trusting the suffix: extracted archives are
    # often left with a stale ".gz" name, and gzipped files get renamed.
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise ValueError(f"{path}: truncated gzip stream ({exc})") from exc
    except (OSError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc


def _parse_idx(buf: bytes, path: Path) -> np.ndarray:
    if len(buf) < 4:
        raise ValueError(
            f"{path}: truncated IDX file: {len(buf)} bytes, the header needs at least 4"
        )
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{path}: bad IDX magic: first two bytes are {buf[:2].hex(' ')}, expected 00 00"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(
            f"{path}: unknown IDX type code 0x{code:02X} (known: {known})"
        )
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"file has {len(buf)}"
        )
    dims = struct.unpack(f">{ndim}i", buf[4:header_len])
    if any(d < 0 for d in dims):
        raise ValueError(f"{path}: negative dimension in IDX header {dims}")
    dtype = IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d  # Python int: no overflow for absurd headers
    expected = count * dtype.itemsize
    actual = len(buf) - header_len
    if actual < expected:
        raise ValueError(
            f"{path}: truncated IDX data: dims {dims} of {dtype.newbyteorder('=').name} "
            f"need {expected} bytes, file has {actual}"
        )
    if actual > expected:
        raise ValueError(
            f"{path}: IDX size mismatch: dims {dims} of {dtype.newbyteorder('=').name} "
            f"need {expected} bytes, file has {actual} ({actual - expected} trailing)"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=header_len)
    # Always copy to native order: callers hand these to torch.from_numpy,
    # which rejects non-native byte order and warns on read-only buffers.
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file into a native-endian, writable numpy array.

    Args:
        path: the IDX file, plain or gzip-compressed. Compression is detected
            from the magic bytes ``1f 8b``, not from the file name.

    Returns:
        An array whose shape is the header's dimensions and whose dtype follows
        the type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
        0x0D float32, 0x0E float64.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated (header or data), its first two bytes
            are not zero, its type code is unknown, the data size disagrees
            with the header's dimensions, or the gzip stream is corrupt. The
            message starts with the file's path.
    """
    p = Path(path)
    return _parse_idx(_read_payload(p), p)


def _canonical_name(name: str) -> str:
    """Map ``train-images.idx3-ubyte[.gz]`` and friends to the MNIST_MD5 key style."""
    if name.endswith(".gz"):
        name = name[:-3]
    return name.replace(".idx", "-idx")


def _candidates(stem: str, kind: str, ndim: int):
    """File names tried for one part, most preferred first.

    Plain files come before ``.gz`` so that a directory holding both (as left by
    an extraction) is read without decompressing.
    """
    names = (f"{stem}-{kind}-idx{ndim}-ubyte", f"{stem}-{kind}.idx{ndim}-ubyte")
    return [*names, *(n + ".gz" for n in names)]


def existing_directory(root: Union[str, os.PathLike], what: str) -> Path:
    """``root`` as a Path; FileNotFoundError / NotADirectoryError naming ``what`` data
    (e.g. "IDX", "CIFAR-10") when it does not exist or is not a directory."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} data directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} data root {root} is not a directory")
    return root


def _find(root: Path, split: str, prefix: str, kind: str, ndim: int) -> Path:
    looked_for = []
    for stem in SPLITS[split]:
        for name in _candidates(prefix + stem, kind, ndim):
            looked_for.append(name)
            candidate = root / name
            if candidate.is_file():
                return candidate
    # Listing what is there turns "wrong prefix" (e.g. EMNIST's
    # "emnist-letters-") from a puzzle into an obvious fix.
    present = sorted(
        p.name for p in root.iterdir() if p.is_file() and "idx" in p.name
    )
    hint = f"; IDX-like files present: {', '.join(present)}" if present else ""
    raise FileNotFoundError(
        f"no {kind} file for split {split!r} in directory {root}: "
        f"looked for {', '.join(looked_for)}{hint}"
    )


def _load_part(path: Path, verify: bool) -> np.ndarray:
    buf = _read_payload(path)
    if verify:
        key = _canonical_name(path.name)
        want = MNIST_MD5.get(key)
        if want is None:
            raise ValueError(
                f"{path}: verify=True but no known MD5 for this file name "
                f"(known: {', '.join(MNIST_MD5)})"
            )
        got = hashlib.md5(buf).hexdigest()
        if got != want:
            raise ValueError(
                f"{path}: MD5 mismatch for decompressed {key}: got {got}, expected {want}"
            )
    return _parse_idx(buf, path)


def _is_packaged_mnist(root: Path) -> bool:
    try:
        return root.resolve() == mnist_dir().resolve()
    except OSError:
        return False


def load_idx_dataset(
    root: PathLike,
    split: str = "train",
    verify: Optional[bool] = None,
    prefix: str = "",
) -> Tuple[np.ndarray, np.ndarray]:
    """Load the images and labels of one split from a directory of IDX files.

    Works for MNIST and every data set using its layout (Fashion-MNIST, KMNIST,
    EMNIST, ...). For split ``"train"`` the files looked for are
    ``{prefix}train-images-idx3-ubyte`` and ``{prefix}train-labels-idx1-ubyte``;
    for ``"test"`` the stem is ``t10k`` or, failing that, ``test``. Both naming
    styles ``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte`` are
    accepted, each with or without ``.gz``; plain files are preferred when both
    exist.

    Args:
        root: directory holding the files.
        split: ``"train"`` or ``"test"``.
        verify: ``True`` checks each decompressed file against
            :data:`MNIST_MD5` (the file name must then be an MNIST name).
            ``False`` never checks. ``None`` (default) checks only when
            ``root`` is the packaged MNIST directory (:func:`mnist_dir`). The
            decision is made on the directory rather than on the file name
            because Fashion-MNIST and KMNIST ship under exactly the MNIST file
            names, so a name-based rule would reject them.
        prefix: prepended to the stem, e.g. ``"emnist-letters-"`` for EMNIST's
            ``emnist-letters-train-images-idx3-ubyte.gz``. (EMNIST images are
            stored transposed; this loader returns them as stored.)

    Returns:
        ``(images, labels)``: images a uint8 array of shape ``(N, H, W)``,
        labels an int64 array of shape ``(N,)``.

    Raises:
        ValueError: ``split`` is not a valid split; a file is malformed (see
            :func:`read_idx`); images are not 3-D uint8 or labels not 1-D
            integers; image and label counts differ; or an MD5 check fails.
            Messages name the file or argument concerned.
        FileNotFoundError: ``root`` does not exist, or no file of the split was
            found (the message names the directory, the split and the names
            looked for).
        NotADirectoryError: ``root`` exists but is not a directory.
    """
    if split not in SPLITS:
        raise ValueError(
            f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}"
        )
    if verify not in (True, False, None):
        raise ValueError(f"verify must be True, False or None; got {verify!r}")
    root = existing_directory(root, "IDX")

    images_path = _find(root, split, prefix, "images", 3)
    labels_path = _find(root, split, prefix, "labels", 1)
    do_verify = _is_packaged_mnist(root) if verify is None else verify

    images = _load_part(images_path, do_verify)
    labels = _load_part(labels_path, do_verify)

    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, H, W), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{labels_path}: expected 1-D integer labels, "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"image/label count mismatch for split {split!r}: "
            f"{images_path} has {images.shape[0]} images, "
            f"{labels_path} has {labels.shape[0]} labels"
        )
    # int64 because that is what torch's cross-entropy expects for targets.
    return images, labels.astype(np.int64)


def mnist_dir() -> Path:
    """Return the directory holding the MNIST files shipped with the package."""
    # A plain path rather than importlib.resources: the loader needs real files,
    # and the package is installed unzipped (it carries a compiled extension).
    return Path(__file__).resolve().parent / "mnist"


def load_mnist(
    split: str = "train", root: Optional[PathLike] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Load MNIST, always checking the MD5s; nothing is downloaded.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: a directory with the four MNIST files; defaults to the copy
            shipped with the package (:func:`mnist_dir`).

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.
    """
    return load_idx_dataset(
        mnist_dir() if root is None else root, split=split, verify=True
    )
