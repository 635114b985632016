"""Sparse layers and model conversion.

- :class:`SparseLinear`, :class:`SparseConv2d`: drop-in ``nn.Linear`` / ``nn.Conv2d``
  with a bool ``mask`` buffer attached to the dense weight (the mask layout);
- :class:`CsrLinear`, :class:`CsrConv2d`: a linear layer and a 2-D convolution that
  store only their active weights (the always-sparse csr layout; :class:`CsrLayer`, their
  shared storage);
- :func:`sparsify`: convert a model's Linear/Conv2d layers at a global density with a
  uniform / er / erk distribution, in either layout;
- :func:`to_layout`: one layer in the other layout, computing the same function;
- :class:`SparseMultiheadAttention`: ``nn.MultiheadAttention`` with masked input projections;
- :func:`keep_batch_innermost`: keep activations in the csr convs' layout through batch
  norm and pooling (:mod:`.batch_innermost`: :class:`BatchNorm2d`, :class:`MaxPool2d`, ...);
- :func:`density_report`: per-weight and total active-weight counts of the whole model;
- :func:`densify`: a plain torch copy of a sparse model; :func:`sparse_csr_weight`: a
  layer's weight as a ``torch.sparse_csr_tensor``.
"""

from .attention import SparseMultiheadAttention
from .batch_innermost import AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, MaxPool2d, is_batch_innermost, keep_batch_innermost
from .convert import DensityReport, DensityRow, density_report, sparsify, to_layout
from .csr_layout import CsrConv2d, CsrLayer, CsrLinear
from .export import densify, sparse_csr_weight
from .mask_layout import LAYOUTS, SparseConv2d, SparseLinear

__all__ = [
    "LAYOUTS",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm2d",
    "MaxPool2d",
    "CsrConv2d",
    "CsrLayer",
    "CsrLinear",
    "DensityReport",
    "DensityRow",
    "SparseConv2d",
    "SparseLinear",
    "SparseMultiheadAttention",
    "densify",
    "density_report",
    "is_batch_innermost",
    "keep_batch_innermost",
    "sparse_csr_weight",
    "sparsify",
    "to_layout",
]
