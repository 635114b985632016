"""Gradient taps: what the engine reads from a layer's backward passes, as autograd gradients.

A layer's growth signals are functions of its input ``x`` and output gradient ``grad_out``:
the gradients at a candidate set (a csr layer's SDDMM), the dense weight gradient (RigL
in the csr layout) and GraBo's factors. The engine gives each layer that may need them a
:class:`GradientTap` (``layer.gradient_tap``) and, after every ``step()``, arms it with
what the next step needs. An armed tap puts a differentiable identity on the layer's
output whose backward computes the armed signals with the layer's own batch
computations and hands them to autograd as the gradients of leaf tensors the tap owns
(plain tensors with ``requires_grad``, not Parameters: optimizers and DDP never see
them). Nothing is kept from the backward pass and there is no hook, so torch.compile
captures it, ``fullgraph=True`` included: one graph per combination of armed signals
(at most three per growth method) once the candidate count has become symbolic.

Autograd accumulates into the leaves' ``.grad``: with several backward passes per
optimizer step (gradient accumulation) each signal is their sum, as a weight's gradient is.
"""

from typing import Dict, Optional, Tuple

import torch

from .sampling import grabo_factors

__all__ = ["GradientTap"]


def _leaf(like: torch.Tensor, shape) -> torch.Tensor:
    # An expanded zero: a leaf of the signal's shape that stores nothing (its .grad is the signal).
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(shape).requires_grad_()


class _Tap(torch.autograd.Function):
    """The identity on ``output`` (in place: marked dirty, no copy, so a later in-place op on
    the output, ReLU(inplace=True), is allowed); its backward returns the armed signals as
    the gradients of the tap's leaves."""

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
        # Under autocast the batch may be in a lower precision than the leaves.
        dtype = tap.dtype
        xs, gs = x.to(dtype), grad.to(dtype)
        at = dense = rows = cols = None
        if tap.at is not None:
            at = layer.batch_weight_grad_at(xs, gs, row_ptr, col_idx)
        if tap.dense is not None:
            dense = layer.batch_dense_weight_grad(xs, gs)
        if tap.rows is not None:
            rows, cols = grabo_factors(layer, xs, gs)
        return grad, None, None, None, at, dense, rows, cols, None


class GradientTap:
    """One layer's tap: what the engine armed it with, and the leaves that receive it.

    ``layer`` computes the signals (``batch_weight_grad_at`` and ``batch_dense_weight_grad``
    for a csr layer; GraBo's factors for any sparse layer); ``n_rows x n_cols`` is its weight
    matrix and ``like`` gives dtype and device. The layer calls the tap with its input and
    output: the output comes back tapped when something is armed, grad is enabled and it
    requires grad (evaluation batches are not seen), else untouched; ``torch.jit.trace`` and
    ``torch.export`` never see a tap.
    """

    def __init__(self, layer: torch.nn.Module, n_rows: int, n_cols: int, like: torch.Tensor):
        self.layer, self.n_rows, self.n_cols = layer, n_rows, n_cols
        self.dtype, self._like = like.dtype, like
        self.structure: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.at = self.dense = self.rows = self.cols = None

    def arm(self, structure: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, dense: bool = False,
            grabo: bool = False) -> None:
        """What the following backward passes hand over: the weight gradient at the positions of
        ``structure`` (``(row_ptr, col_idx)``), the dense weight gradient, GraBo's factors.
        Leaves of an unchanged request are kept (a compiled graph keeps its inputs' shapes)."""
        if structure is None:
            self.at = None
        elif self.structure is None or structure[1] is not self.structure[1] or self.at is None:
            self.at = _leaf(self._like, (structure[1].numel(),))
        self.structure = structure
        self.dense = (self.dense if self.dense is not None else _leaf(self._like, (self.n_rows, self.n_cols))
                      ) if dense else None
        if grabo:
            if self.rows is None:
                self.rows, self.cols = _leaf(self._like, (self.n_rows,)), _leaf(self._like, (self.n_cols,))
        else:
            self.rows = self.cols = None

    @property
    def armed(self) -> bool:
        return self.at is not None or self.dense is not None or self.rows is not None

    def __call__(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not (self.armed and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.requires_grad):
            return output
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return output  # a traced or exported graph is the model's, without the engine's leaves
        row_ptr, col_idx = self.structure if self.structure is not None else (None, None)
        return _Tap.apply(output, x.detach(), row_ptr, col_idx, self.at, self.dense, self.rows, self.cols, self)

    def take(self) -> Dict[str, object]:
        """The signals received since the last call (``"at"``, ``"dense"``, ``"factors"``; only
        those a backward pass delivered), leaving the leaves empty for the next ones."""
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
