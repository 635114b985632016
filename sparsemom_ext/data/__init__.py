"""Data shipped with sparsemom_ext (MNIST), a numpy-only IDX loader and a CIFAR-10 loader.

Nothing in this package downloads anything; see :mod:`sparsemom_ext.data.idx` and
:mod:`sparsemom_ext.data.cifar`.
"""

from .cifar import CIFAR10_FILES, CIFAR10_SHAPE, load_cifar10, read_cifar_batch
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
    "CIFAR10_FILES",
    "CIFAR10_SHAPE",
    "IDX_DTYPES",
    "MNIST_MD5",
    "SPLITS",
    "load_cifar10",
    "load_idx_dataset",
    "load_mnist",
    "mnist_dir",
    "read_cifar_batch",
    "read_idx",
]
