"""sparsemom_ext: sparse momentum and dynamic sparse training for PyTorch.

The compiled extension (``sparsemom_ext._C``) registers the ``torch.ops.sparsemom``
operators on import; this package wraps them with typed Python functions
(:mod:`sparsemom_ext.ops`), gives each a pure-PyTorch reference
(:mod:`sparsemom_ext.reference`), and builds on them: optimizers whose step is fused
with the mask (:mod:`sparsemom_ext.optim`) and the packaged MNIST data
(:mod:`sparsemom_ext.data`).
"""

from ._version import __version__  # noqa: E402

import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from . import _C  # noqa: F401  (loads the shared library: registers torch.ops.sparsemom)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "sparsemom_ext: the compiled extension sparsemom_ext._C is missing or does not load "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` after installing torch."
    ) from exc

from . import data, ops, optim, reference  # noqa: E402
from ._build import build_info  # noqa: E402
from .allocator import keep_freed_cpu_memory  # noqa: E402
from .ops import (  # noqa: E402
    fused_adam_step_,
    fused_sgd_step_,
    magnitude_prune,
    mask_apply_,
    momentum_grow,
    set_prune,
)
from .sparsity import NonFiniteSignalError, SparseMomentum, attach_mask, detach_mask, mask_of  # noqa: E402
from . import nn  # noqa: E402
from .nn import (CsrConv2d, CsrLinear, SparseConv2d, SparseLinear, SparseMultiheadAttention, densify,  # noqa: E402
                 density_report, sparsify)

__all__ = [
    "CsrConv2d",
    "CsrLinear",
    "NonFiniteSignalError",
    "SparseConv2d",
    "SparseLinear",
    "SparseMomentum",
    "SparseMultiheadAttention",
    "__version__",
    "attach_mask",
    "build_info",
    "data",
    "densify",
    "density_report",
    "detach_mask",
    "fused_adam_step_",
    "fused_sgd_step_",
    "keep_freed_cpu_memory",
    "magnitude_prune",
    "mask_apply_",
    "mask_of",
    "momentum_grow",
    "nn",
    "ops",
    "optim",
    "reference",
    "set_prune",
    "sparsify",
]
