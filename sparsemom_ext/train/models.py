"""The models of the training command, built from plain torch layers.

Every model here uses ``nn.Linear`` / ``nn.Conv2d`` for its weights, so
:func:`sparsemom_ext.sparsify` turns all of them sparse, the first and the last
included, as the paper and its reference code (``sparse_learning``) do; biases and
BatchNorm parameters stay dense. Every model takes images ``(N, C, H, W)`` and returns
logits (the reference's ``log_softmax`` + ``nll_loss`` is the same loss as
``cross_entropy`` on logits).

- ``lenet300``: LeNet-300-100, 784-300-100-10 with ReLU (any input size: flattened).
- ``lenet5``: the Caffe variant of LeNet-5: conv 20 5x5 (no padding), max-pool 2,
  conv 50 5x5, max-pool 2, fc 500, fc 10, ReLU after each conv and the first fc.
- ``mlp``: fully connected, hidden widths given (default 4096-4096-4096), ReLU.
- ``vgg16``: VGG-16 "D" with batch norm for 32x32 inputs as in the reference code:
  thirteen 3x3 convs (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M), each
  followed by BatchNorm and ReLU, then 512-512-classes fully connected with ReLU and
  BatchNorm1d after each hidden layer (instead of dropout).
- ``wrn-D-K`` (``wrn-16-8``, ``wrn-22-8``, ``wrn-28-2``, any D with (D - 4) % 6 == 0):
  the wide residual network of Zagoruyko & Komodakis with pre-activation basic blocks,
  widths 16K, 32K, 64K, dropout between the two convs of a block (0.3 in the
  reference code; ``dropout=`` here), He-normal conv init, global average pooling.
"""

import math
import re
from collections import OrderedDict
from typing import Sequence, Tuple

from torch import nn
from torch.nn import functional as F

__all__ = ["MODEL_NAMES", "ModelError", "WideResNet", "build_model", "check_model_name", "lenet5", "lenet300",
           "mlp", "vgg16", "wide_resnet"]

#: Names accepted by :func:`build_model`; ``wrn-D-K`` also takes other depths and widths.
MODEL_NAMES = ("lenet300", "lenet5", "mlp", "vgg16", "wrn-16-8", "wrn-22-8", "wrn-28-2")
DEFAULT_MLP_WIDTHS = (4096, 4096, 4096)
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")
_VGG16_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, input it cannot take)."""


def check_model_name(name: str) -> str:
    """``name`` if :func:`build_model` knows it, else a ModelError listing the names."""
    if name in MODEL_NAMES:
        return name
    match = _WRN.match(name)
    if match is None:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} (or wrn-DEPTH-WIDTH)")
    depth, widen = map(int, match.groups())
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ModelError(f"wide resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...); got {name!r}")
    if widen < 1:
        raise ModelError(f"wide resnet width factor must be at least 1; got {name!r}")
    return name


def lenet300(in_shape: Tuple[int, int, int], num_classes: int) -> nn.Module:
    """LeNet-300-100: flatten, fc1 300, fc2 100, fc3 classes (the reference code's names)."""
    return mlp(in_shape, num_classes, (300, 100))


def mlp(in_shape: Tuple[int, int, int], num_classes: int, widths: Sequence[int] = DEFAULT_MLP_WIDTHS) -> nn.Module:
    """A ReLU MLP on the flattened input with the given hidden widths; layers fc1, fc2, ..."""
    layers = [("flatten", nn.Flatten())]
    features = math.prod(in_shape)
    for i, width in enumerate(widths, 1):
        layers += [(f"fc{i}", nn.Linear(features, width)), (f"relu{i}", nn.ReLU())]
        features = width
    layers.append((f"fc{len(widths) + 1}", nn.Linear(features, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def lenet5(in_shape: Tuple[int, int, int], num_classes: int) -> nn.Module:
    """LeNet-5 as in Caffe: conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc classes."""
    channels, height, width = in_shape
    side_h, side_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
    if side_h < 1 or side_w < 1:
        raise ModelError(f"lenet5 needs inputs of at least 12x12 pixels; got {height}x{width}")
    return nn.Sequential(OrderedDict([  # the reference code's layer names
        ("conv1", nn.Conv2d(channels, 20, 5)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(20, 50, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc3", nn.Linear(50 * side_h * side_w, 500)), ("relu3", nn.ReLU()),
        ("fc4", nn.Linear(500, num_classes)),
    ]))


def vgg16(in_shape: Tuple[int, int, int], num_classes: int) -> nn.Module:
    """VGG-16 "D" with batch norm for 32x32 inputs (the reference code's CIFAR variant)."""
    channels, height, width = in_shape
    if (height, width) != (32, 32):
        raise ModelError(f"vgg16 is the 32x32-input variant (five 2x2 poolings down to 1x1); got {height}x{width} "
                         "images: use it with cifar10")
    layers = []
    for v in _VGG16_D:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
        nn.Linear(512, num_classes),
    )


class _WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus the shortcut.

    When the width or stride changes, the shortcut is a 1x1 conv applied to the
    pre-activated input (as in the original wide-resnet code), else the identity.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: conv 16, three groups of (depth - 4) / 6 blocks (16k, 32k, 64k wide;
    strides 1, 2, 2), BN-ReLU, global average pooling, fc."""

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, planes = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            group = [_WideBasicBlock(planes if i == 0 else width, width, stride if i == 0 else 1, dropout)
                     for i in range(blocks)]
            groups.append(nn.Sequential(*group))
            planes = width
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init over the fan-out, as the wide-resnet code does
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wide_resnet(in_shape: Tuple[int, int, int], num_classes: int, depth: int, widen: int,
                dropout: float = 0.3) -> nn.Module:
    """A :class:`WideResNet` for ``in_shape`` images."""
    return WideResNet(depth, widen, in_shape[0], num_classes, dropout)


def build_model(name: str, in_shape: Tuple[int, int, int], num_classes: int,
                widths: Sequence[int] = DEFAULT_MLP_WIDTHS, dropout: float = 0.3) -> nn.Module:
    """The dense model ``name`` for images of shape ``in_shape`` (C, H, W) and ``num_classes`` classes.

    ``widths`` are the mlp's hidden widths; ``dropout`` the wide resnets' dropout rate.
    Draws its initial weights from torch's global generator (seed it first).
    Raises :class:`ModelError` for an unknown name or an input the model cannot take.
    """
    check_model_name(name)
    if name == "lenet300":
        return lenet300(in_shape, num_classes)
    if name == "lenet5":
        return lenet5(in_shape, num_classes)
    if name == "mlp":
        return mlp(in_shape, num_classes, widths)
    if name == "vgg16":
        return vgg16(in_shape, num_classes)
    depth, widen = map(int, _WRN.match(name).groups())
    return wide_resnet(in_shape, num_classes, depth, widen, dropout)

