"""Gradient taps: what the engine reads from a layer's backward passes, as autograd gradients.

A layer's growth signals are functions of its input ``x`` and output gradient ``grad_out``
(the candidates' gradients, the dense weight gradient, GraBo's factors). A
:class:`GradientTap` set on a layer (``layer.gradient_tap``; None when no signal is wanted)
puts a differentiable identity on the layer's output whose backward computes them with
the layer's own batch computations and hands them to autograd as the gradients of
leaf tensors the tap owns (plain tensors with ``requires_grad``, not Parameters:
optimizers and DDP never see them). Nothing is kept from the backward pass and there is
no hook, so torch.compile captures it (``fullgraph=True`` included): a graph per tap
state, which the engine keeps to a few.

Autograd accumulates into the leaves' ``.grad``: with several backward passes per
optimizer step (gradient accumulation) each signal is the sum over them, as a weight's
gradient is. That is the candidates' gradient of the step for a momentum window; for
the signals that were "of the last batch" (GSE's and RigL's gradient, GraBo's factors) it
is the sum over the backward passes since the last ``engine.step()``.
"""

from typing import Dict, Optional, Tuple

import torch

from ..nn.csr_layout import CsrLayer
from .sampling import grabo_factors

__all__ = ["GradientTap"]


def _leaf(like: torch.Tensor, shape) -> torch.Tensor:
    # An expanded zero: a leaf of the signal's shape that stores nothing (its .grad is the signal).
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(shape).requires_grad_()


class _Tap(torch.autograd.Function):
    """The identity on ``output`` (in place: marked dirty, no copy, and a later in-place op on
    the output, ReLU(inplace=True), is allowed); its backward returns the tap's signals as
    the gradients of its leaves."""

    @staticmethod
    def forward(ctx, output, x, row_ptr, col_idx, at, dense, rows, cols, tap):
        ctx.save_for_backward(x, row_ptr, col_idx)
        ctx.tap = tap
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, grad):
        x, row_ptr, col_idx = ctx.saved_tensors
        tap = ctx.tap
        layer = tap.layer
        at = dense = rows = cols = None
        if tap.at is not None:
            at = layer.batch_weight_grad_at(x, grad, row_ptr, col_idx)
        if tap.dense is not None:
            dense = layer.batch_dense_weight_grad(x, grad)
        if tap.rows is not None:
            rows, cols = grabo_factors(layer, x, grad)
        return grad, None, None, None, at, dense, rows, cols, None


class GradientTap:
    """The signals wanted from one layer's backward passes, and the leaves that receive them.

    ``structure``: ``(row_ptr, col_idx)`` of candidate positions whose weight gradient is
    wanted (a csr layer's SDDMM there; leaf ``at``, one entry per position); ``dense``: the
    dense ``(n_rows, n_cols)`` weight gradient (a csr layer's); ``grabo``: GraBo's factors
    (leaves ``rows`` and ``cols``). Call it with the layer's input and output: the output,
    tapped when grad is enabled and it requires grad (evaluation batches are not seen).
    """

    def __init__(self, layer: torch.nn.Module, n_rows: int, n_cols: int, like: torch.Tensor,
                 structure: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, dense: bool = False,
                 grabo: bool = False):
        if (structure is not None or dense) and not isinstance(layer, CsrLayer):
            raise ValueError("only a csr layer computes candidate or dense weight gradients from its batches")
        self.layer = layer
        self.structure = structure
        self.at = _leaf(like, (structure[1].numel(),)) if structure is not None else None
        self.dense = _leaf(like, (n_rows, n_cols)) if dense else None
        self.rows = _leaf(like, (n_rows,)) if grabo else None
        self.cols = _leaf(like, (n_cols,)) if grabo else None

    def __call__(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return output
        row_ptr, col_idx = self.structure if self.structure is not None else (None, None)
        return _Tap.apply(output, x.detach(), row_ptr, col_idx, self.at, self.dense, self.rows, self.cols, self)

    def take(self) -> Dict[str, object]:
        """The signals received since the last call (``"at"``, ``"dense"``, ``"factors"``; only
        those of a backward pass), leaving the leaves empty for the next ones."""
        got = {}
        if self.at is not None and self.at.grad is not None:
            got["at"] = self.at.grad
        if self.dense is not None and self.dense.grad is not None:
            got["dense"] = self.dense.grad
        if self.rows is not None and self.rows.grad is not None:
            got["factors"] = (self.rows.grad, self.cols.grad)
        for leaf in (self.at, self.dense, self.rows, self.cols):
            if leaf is not None:
                leaf.grad = None
        return got
