"""Data shipped with sparsemom_ext (MNIST) and a numpy-only IDX loader.

Nothing in this package downloads anything; see :mod:`sparsemom_ext.data.idx`.
"""

from .idx import (
    IDX_DTYPES,
    MNIST_MD5,
    SPLITS,
    load_idx_dataset,
    load_mnist,
    mnist_dir,
    read_idx,
)

__all__ = [
    "IDX_DTYPES",
    "MNIST_MD5",
    "SPLITS",
    "load_idx_dataset",
    "load_mnist",
    "mnist_dir",
    "read_idx",
]
