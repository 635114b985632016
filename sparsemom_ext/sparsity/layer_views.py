"""The engine's view of one sparse layer, in either layout.

:class:`MaskLayer` wraps a dense weight with an attached bool mask (``layout="mask"``:
SparseLinear, SparseConv2d, or any parameter given a mask); :class:`CsrLayer` wraps a
``SparseLinear(layout="csr")`` whose Parameter ``values`` holds the active weights. Both
expose the same steps of a topology update, over the layer's active weights in flat
(row-major) order:

- ``active_flat()`` / ``active_values()`` / ``active_signal(m)``: what is active now;
- ``commit_*``: install the new topology.

A :class:`BatchProbe` hooks a layer to see the input and the output gradient of each
training batch: the always-sparse growth signals (GSE, csr-layout momentum, RigL on a
csr layer) and GraBo sampling are computed from them, never from a dense weight gradient.
"""

import math
from typing import Callable, Dict, Optional

import torch

from .. import ops
from .topology import Relayout, flat_indices, structure_from_flat

__all__ = ["BatchProbe", "CsrLayer", "MaskLayer", "candidate_count", "keep_after_prune", "last_batch", "top_scores"]


class BatchProbe:
    """Forward hook + output-gradient hook on one layer.

    Keeps the last training batch's input and output gradient (references, no copy:
    O(batch x width) memory) in ``last`` and calls ``on_batch(x, grad_out)`` for each
    backward through the layer. Batches run without grad (evaluation) are not seen.
    """

    def __init__(self, module: torch.nn.Module, keep_last: bool,
                 on_batch: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None):
        self.keep_last = keep_last
        self.on_batch = on_batch
        self.last = None
        self._handle = module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module, inputs, output):
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        x = inputs[0].detach()

        def on_grad(grad_out):
            grad_out = grad_out.detach()
            if self.keep_last:
                self.last = (x, grad_out)
            if self.on_batch is not None:
                self.on_batch(x, grad_out)

        output.register_hook(on_grad)

    def remove(self) -> None:
        self._handle.remove()
        self.last = None


class _LayerView:
    """What both views share: the weight seen as an ``(n_rows, n_cols)`` matrix (a conv's
    columns are its unfolded patch entries), addressed by flat index ``row * n_cols + col``."""

    layout: str
    name: str
    module: Optional[torch.nn.Module]
    param: torch.nn.Parameter
    n_rows: int
    n_cols: int

    @property
    def numel(self) -> int:
        return self.n_rows * self.n_cols

    def batch_gradient_at(self, probe: Optional[BatchProbe], positions: torch.Tensor) -> torch.Tensor:
        """The weight gradient of the probe's last batch at the sorted flat ``positions``."""
        raise NotImplementedError


class MaskLayer(_LayerView):
    """A dense weight Parameter and its attached bool mask (updated in place)."""

    layout = "mask"

    def __init__(self, name: str, param: torch.nn.Parameter, mask: torch.Tensor,
                 module: Optional[torch.nn.Module] = None):
        self.name, self.param, self.mask, self.module = name, param, mask, module
        self.n_rows = param.shape[0] if param.dim() else 1
        self.n_cols = param.numel() // self.n_rows if self.n_rows else 0

    def count(self) -> int:
        return int(self.mask.sum())

    def active_flat(self) -> torch.Tensor:
        return self.mask.reshape(-1).nonzero().reshape(-1)

    def active_values(self, flat: torch.Tensor) -> torch.Tensor:
        """The weights at the active positions ``flat`` (from :meth:`active_flat`)."""
        return self.param.detach().reshape(-1)[flat]

    def active_signal(self, signal: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``signal`` (dense, the weight's shape) at the active positions ``flat``."""
        return signal.reshape(-1)[flat]

    def pruned_mask(self, flat: torch.Tensor, keep: torch.Tensor,
                    grown: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mask after pruning: the active positions ``flat`` whose ``keep`` is False
        removed (and, when given, the flat positions ``grown`` added)."""
        pruned = self.mask.clone()
        pruned.view(-1)[flat[~keep]] = False
        if grown is not None:
            pruned.view(-1)[grown] = True
        return pruned

    def batch_gradient_at(self, probe, positions):
        # The mask layout has its dense weight gradient anyway: read it (no probe needed).
        if self.param.grad is None:
            raise RuntimeError(f"the gradient of {self.name!r} is None: update before optimizer.zero_grad()")
        return self.param.grad.reshape(-1)[positions.to(self.param.device)]

    @torch.no_grad()
    def commit(self, new_mask: torch.Tensor) -> None:
        self.mask.copy_(new_mask)  # in place: layers and optimizers keep the same mask tensor
        ops.mask_apply_(self.param.data, self.mask)  # pruned weights to 0; grown ones are 0 already


class CsrLayer(_LayerView):
    """A ``SparseLinear(layout="csr")``: the Parameter ``values`` and the CSR buffers."""

    layout = "csr"

    def __init__(self, name: str, module: torch.nn.Module):
        self.name, self.module = name, module
        self.n_rows, self.n_cols = module.out_features, module.in_features

    @property
    def param(self) -> torch.nn.Parameter:
        return self.module.values

    @property
    def mask(self) -> torch.Tensor:
        """The dense bool mask (built on request; the update never uses it)."""
        return self.module.mask

    def count(self) -> int:
        return self.module.values.numel()

    def active_flat(self) -> torch.Tensor:
        return flat_indices(self.module.row_ptr, self.module.col_idx, self.n_cols)

    def active_values(self, flat: torch.Tensor) -> torch.Tensor:
        return self.module.values.detach()

    def active_signal(self, signal: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``signal`` (compact: one entry per nonzero) as it is."""
        return signal

    def batch_gradient_at(self, probe, positions):
        x, grad_out = last_batch(probe, self.name)
        row_ptr, col_idx = structure_from_flat(positions.to(x.device), self.n_rows, self.n_cols)
        return ops.csr_sddmm(grad_out.reshape(-1, self.n_rows), x.reshape(-1, self.n_cols), row_ptr, col_idx)

    def dense_batch_gradient(self, probe) -> torch.Tensor:
        """RigL's signal: the dense ``(out, in)`` weight gradient of the probe's last batch."""
        x, grad_out = last_batch(probe, self.name)
        return grad_out.reshape(-1, self.n_rows).t().mm(x.reshape(-1, self.n_cols))

    @torch.no_grad()
    def commit(self, plan: Relayout, optimizer: torch.optim.Optimizer,
               grown_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Re-lay out ``values`` (same Parameter object) and every per-nonzero tensor of its
        optimizer state by ``plan``, then install the new structure and its transpose.

        Kept positions keep their value and state; grown ones start with value 0 and the
        state in ``grown_state`` (key -> one entry per grown position), else 0. The gradient
        (of the old size) is dropped.
        """
        values = self.module.values
        old_nnz = values.numel()
        state = optimizer.state.get(values, {})
        for key, tensor in list(state.items()):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and tensor.numel() == old_nnz:
                fill = (grown_state or {}).get(key)
                state[key] = plan.apply(tensor, None if fill is None else fill.to(tensor.device))
        values.data = plan.apply(values.data)
        values.grad = None
        row_ptr, col_idx = structure_from_flat(plan.flat, self.n_rows, self.n_cols)
        self.module._set_structure(row_ptr.to(values.device), col_idx.to(values.device))


def last_batch(probe: Optional[BatchProbe], name: str):
    """The probe's last ``(input, output gradient)``, or a RuntimeError saying what is missing."""
    if probe is None or probe.last is None:
        raise RuntimeError(f"no training batch has gone through {name!r} since the engine was built (or its "
                           "hooks were removed): run a forward and backward pass before the update")
    return probe.last


def keep_after_prune(values: torch.Tensor, k: int, prune: str) -> torch.Tensor:
    """Bool over ``values`` (active weights, flat order): False for the ``k`` pruned ones."""
    everything = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    prune_op = ops.magnitude_prune if prune == "magnitude" else ops.set_prune
    return prune_op(values, everything, k)


def top_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool over ``scores``: True for the ``k`` largest |score| (ties to the lower index)."""
    return ops.momentum_grow(scores, torch.zeros(scores.shape, dtype=torch.bool, device=scores.device), k)


def candidate_count(gamma: float, nnz: int) -> int:
    """GSE's candidate-set size ``ceil(gamma * |A|)``."""
    return math.ceil(gamma * nnz)

