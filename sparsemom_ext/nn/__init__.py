"""Sparse layers and model conversion.

- :class:`SparseLinear`, :class:`SparseConv2d`: drop-in ``nn.Linear`` / ``nn.Conv2d``
  with a bool ``mask`` buffer attached to the dense weight (the mask layout);
- :class:`CsrLinear`: a linear layer that stores only its active weights (the
  always-sparse csr layout);
- :func:`sparsify`: convert a model's Linear/Conv2d layers at a global density with a
  uniform / er / erk distribution, in either layout;
- :func:`to_layout`: one layer in the other layout, computing the same function;
- :func:`density_report`: per-layer and total active-weight counts.
"""

from .convert import DensityReport, DensityRow, density_report, sparsify, to_layout
from .csr_layout import CsrLinear
from .mask_layout import LAYOUTS, SparseConv2d, SparseLinear

__all__ = [
    "LAYOUTS",
    "CsrLinear",
    "DensityReport",
    "DensityRow",
    "SparseConv2d",
    "SparseLinear",
    "density_report",
    "sparsify",
    "to_layout",
]
