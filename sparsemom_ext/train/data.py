"""The data sets of the training command, held in memory as tensors.

Images stay uint8 ``(N, C, H, W)`` (a quarter of the memory of float32) and are
converted and normalised one batch at a time by :meth:`Dataset.batch`. The
validation split is, by default, the last images of the training files (the reference
code's split: the same for every seed); ``val_split_mode="random"`` draws it from a
permutation seeded by ``seed`` instead.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from .. import data as sm_data

__all__ = ["DATASETS", "MAX_CLASSES", "VAL_SPLIT_MODES", "DataError", "Dataset", "load_dataset"]

DATASETS = ("mnist", "idx", "cifar10")
#: How the validation images are chosen: the last ones of the training files, or a seeded permutation.
VAL_SPLIT_MODES = ("last", "random")

# Normalisation constants of the reference code (sparse_learning): MNIST's pixel mean
# and std, and the per-channel CIFAR-10 values it uses.
_MNIST_MEAN_STD = ((0.1307,), (0.3081,))
_CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_CROP_PADDING = 4
#: Labels must be below this: a label is a class index, and the classifier has one output per
#: class, so a stray huge label would ask for a huge model.
MAX_CLASSES = 2**16


class DataError(ValueError):
    """The data set cannot be loaded as asked (missing folder or files, bad files, bad split)."""


@dataclass
class Dataset:
    """One data set in memory: uint8 images ``(N, C, H, W)`` and int64 labels per split.

    ``val_x`` is empty when no validation split is held out. ``mean`` / ``std`` are
    per-channel normalisation constants applied to pixel values scaled to [0, 1].
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> Tuple[int, int, int]:
        """The shape (C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device) -> "Dataset":
        """A copy of this data set with every tensor on ``device`` (tensors already there are shared)."""
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Dataset(**fields)

    def batch(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Float32 network input for uint8 ``images``: scaled to [0, 1], normalised per channel.

        With ``generator``, each image is first augmented as the reference code's
        ``--augment`` does: a crop of the original size at a random offset of the image
        zero-padded by 4 pixels, and a horizontal flip with probability 1/2, drawn
        from ``generator``.
        """
        if generator is not None:
            images = _random_crop_and_flip(images, generator)
        x = images.float().div_(255.0)
        return x.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))


def _random_crop_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = images.shape
    pad = _CROP_PADDING
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    # One offset pair and one flip bit per image, drawn on the CPU generator so the
    # draw is the same whatever the device.
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    rows = oy[:, None] + torch.arange(h, device=images.device)
    cols = ox[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index_n = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    index_c = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[index_n, index_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def _as_nchw(images) -> torch.Tensor:
    x = torch.from_numpy(images)
    return x.unsqueeze(1) if x.dim() == 3 else x  # IDX images are (N, H, W): one channel


def _read(name: str, data_dir: Optional[Path], split: str):
    try:
        if name == "mnist":
            return sm_data.load_mnist(split, root=data_dir)
        if name == "idx":
            return sm_data.load_idx_dataset(data_dir, split)
        return sm_data.load_cifar10(data_dir, split)
    except (OSError, ValueError) as exc:  # FileNotFoundError, NotADirectoryError, malformed files
        raise DataError(f"--dataset {name}" + (f" --data-dir {data_dir}" if data_dir else "") + f": {exc}") from exc


def _check_split(name: str, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """DataError unless the split has images of at least one pixel, one integer label in
    [0, MAX_CLASSES) per image: checked before a model is built from them."""
    where = f"--dataset {name}: the {split} split"
    if len(images) == 0:
        raise DataError(f"{where} has no images")
    if images.dim() != 4 or 0 in images.shape[1:]:
        raise DataError(f"{where} has images of shape {tuple(images.shape[1:])}; they must be (C, H, W) with at "
                        "least one pixel")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{where} has {len(images)} images and labels of shape {tuple(labels.shape)}; it needs "
                        "one label per image")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"{where} has {labels.dtype} labels; they must be integer class indices")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= MAX_CLASSES:
        raise DataError(f"{where} has labels in [{low}, {high}]; they must be class indices in [0, {MAX_CLASSES})")


def load_dataset(name: str, data_dir: Optional[Path] = None, val_split: float = 0.1, seed: int = 0,
                 train_size: Optional[int] = None, test_size: Optional[int] = None,
                 val_split_mode: str = "last") -> Dataset:
    """Load ``name`` ("mnist", "idx" or "cifar10") and hold out a validation split.

    ``mnist`` is the copy shipped with the package (or the MNIST files in
    ``data_dir``), checksums verified; ``idx`` any directory of IDX files (MNIST
    layout: Fashion-MNIST, KMNIST, ...); ``cifar10`` the python-version batches in
    ``data_dir``. ``train_size`` / ``test_size`` keep only the first images of the
    training / test files (for quick runs). Then ``round(val_split * n)`` training
    images become the validation set: with ``val_split_mode="last"`` (default, the
    reference code's split) the last ones, the same for every ``seed``, and the first ones
    train in file order; with ``"random"`` those of a permutation seeded with ``seed``.

    MNIST and CIFAR-10 are normalised with the reference code's constants; an IDX
    data set with the per-channel mean and std of its training images (after the
    validation split, so validation pixels do not leak into them). The number of
    classes is the largest label + 1.

    Raises :class:`DataError` (a ValueError) naming the option for a missing
    directory, missing or malformed files, a split that leaves nothing to train on, no
    test images, images without pixels, or labels that are not class indices in
    ``[0, MAX_CLASSES)``.
    """
    if name not in DATASETS:
        raise DataError(f"--dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if val_split_mode not in VAL_SPLIT_MODES:
        raise DataError(f"--val-split-mode must be one of {', '.join(VAL_SPLIT_MODES)}; got {val_split_mode!r}")
    if name != "mnist" and data_dir is None:
        raise DataError(f"--dataset {name} needs --data-dir (the folder holding its files)")
    data_dir = None if data_dir is None else Path(data_dir)
    train_images, train_labels = _read(name, data_dir, "train")
    test_images, test_labels = _read(name, data_dir, "test")
    x, y = _as_nchw(train_images)[:train_size], torch.from_numpy(train_labels)[:train_size]
    test_x, test_y = _as_nchw(test_images)[:test_size], torch.from_numpy(test_labels)[:test_size]
    _check_split(name, "training", x, y)
    _check_split(name, "test", test_x, test_y)
    if test_x.shape[1:] != x.shape[1:]:
        raise DataError(f"--dataset {name}: training images are {tuple(x.shape[1:])}, test images "
                        f"{tuple(test_x.shape[1:])}; they must have the same shape")
    n_val = round(val_split * len(x))
    if len(x) - n_val < 1:
        raise DataError(f"--val-split {val_split} of {len(x)} training images leaves none to train on")
    if val_split_mode == "last":
        order = torch.arange(len(x))
        train_idx, val_idx = order[:len(x) - n_val], order[len(x) - n_val:]
    else:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
    train_x, train_y = x[train_idx], y[train_idx]
    if name == "mnist":
        mean, std = _MNIST_MEAN_STD
    elif name == "cifar10":
        mean, std = _CIFAR10_MEAN_STD
    else:
        pixels = train_x.transpose(0, 1).reshape(train_x.shape[1], -1).double().div_(255.0)
        mean, std = pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-6).tolist()
    num_classes = max(int(y.max()), int(test_y.max())) + 1
    return Dataset(name, train_x, train_y, x[val_idx], y[val_idx], test_x, test_y,
                   torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32), num_classes)
