"""Sparsity: masks attached to parameters, mask initialisation, and the dynamic-sparsity engine.

- :mod:`.masks`, :mod:`.init`: which parameters carry a mask, and how masks are drawn;
- :mod:`.engine`: :class:`SparseMomentum`, the orchestration of a topology update, built
  from :mod:`.schedule`, :mod:`.growth`, :mod:`.signals`, :mod:`.sampling` and :mod:`.views`;
- :mod:`.connectivity`: the rule that keeps every output unit of a layer connected.
"""

from .masks import attach_mask, detach_mask, mask_of
from .init import layer_counts, layer_densities, random_mask
from .engine import NonFiniteSignalError, SparseMomentum

__all__ = ["NonFiniteSignalError", "SparseMomentum", "attach_mask", "detach_mask", "layer_counts", "layer_densities", "mask_of",
           "random_mask"]
