"""Sparse layers and model conversion.

- :class:`SparseLinear`, :class:`SparseConv2d`: drop-in ``nn.Linear`` / ``nn.Conv2d``
  with a bool ``mask`` buffer attached to the weight (layout ``"mask"``);
- :func:`sparsify`: convert a model's Linear/Conv2d layers at a global density with a
  uniform / er / erk distribution;
- :func:`density_report`: per-layer and total active-weight counts.
"""

from .convert import DensityReport, DensityRow, density_report, sparsify
from .modules import LAYOUTS, SparseConv2d, SparseLinear

__all__ = [
    "LAYOUTS",
    "DensityReport",
    "DensityRow",
    "SparseConv2d",
    "SparseLinear",
    "density_report",
    "sparsify",
]
