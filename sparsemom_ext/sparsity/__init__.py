"""Sparsity: masks attached to parameters, mask initialisation, and the dynamic-sparsity engine."""

from .masks import attach_mask, detach_mask, mask_of
from .init import layer_counts, layer_densities, random_mask
from .engine import SparseMomentum

__all__ = ["SparseMomentum", "attach_mask", "detach_mask", "layer_counts", "layer_densities", "mask_of",
           "random_mask"]
