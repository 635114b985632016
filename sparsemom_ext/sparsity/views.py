"""The engine's view of one sparse layer, in either layout.

A view addresses the layer's weight as an ``(n_rows, n_cols)`` matrix by flat index
``row * n_cols + col`` (a conv's columns are its unfolded patch entries) and exposes
what a topology update needs, the same for both layouts:

- ``active_flat()`` / ``active_values(flat)`` / ``at_active(tensor, flat)``: what is
  active now (sorted flat indices, the weights, a per-weight tensor such as a momentum
  buffer, at those positions);
- ``commit(plan, optimizer_state)``: install the new topology.

:class:`MaskView` wraps a dense weight with an attached bool mask (SparseLinear,
SparseConv2d, or any parameter given a mask); :class:`CsrView` a csr layer
(:class:`~sparsemom_ext.nn.CsrLinear`, :class:`~sparsemom_ext.nn.CsrConv2d`) through its
public structure API. What growth reads from a csr layer's batches comes from its
gradient tap (:mod:`.taps`), computed by the layer itself.
"""

from typing import Dict, List, Optional

import torch

from .. import ops
from ..csr_structure import Relayout
from ..nn.csr_layout import CsrLayer
from .masks import mask_of

__all__ = ["CsrView", "MaskView", "find_views"]


class MaskView:
    """A dense weight Parameter and its attached bool mask (updated in place).

    The weight gradient is dense in this layout, so growth reads it directly.
    """

    dense_gradient = True

    def __init__(self, name: str, param: torch.nn.Parameter, mask: torch.Tensor,
                 module: Optional[torch.nn.Module] = None):
        self.name, self.param, self.mask, self.module = name, param, mask, module
        self.n_rows = param.shape[0] if param.dim() else 1
        self.n_cols = param.numel() // self.n_rows if self.n_rows else 0
        self.numel = self.n_rows * self.n_cols
        self.capacity = self.numel

    def count(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def zero_inactive(self) -> None:
        """After a plain torch.optim step, which moves inactive weights too: zero them again."""
        ops.mask_apply_(self.param.data, self.mask)

    def active_flat(self) -> torch.Tensor:
        return self.mask.reshape(-1).nonzero().reshape(-1)

    def active_values(self, flat: torch.Tensor) -> torch.Tensor:
        return self.param.detach().reshape(-1)[flat]

    def at_active(self, tensor: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the weight's shape) at the active positions ``flat``."""
        return tensor.reshape(-1)[flat]

    @torch.no_grad()
    def commit(self, plan: Relayout, optimizer_state: Dict, grown_state: Optional[Dict[str, torch.Tensor]]) -> None:
        """The mask becomes ``plan.flat`` (in place: layers and optimizers keep the same mask
        tensor); pruned weights go to 0, regrown ones keep their value, new ones are 0 already.
        The optimizer state is dense and stays as it is (the momentum of every position is
        the growth signal)."""
        self.mask.zero_()
        self.mask.view(-1)[plan.flat.to(self.mask.device)] = True
        ops.mask_apply_(self.param.data, self.mask)

    def saved_topology(self) -> Dict:
        return {"mask": self.mask.clone()}

    def check_saved_topology(self, saved: Dict) -> None:
        mask = saved.get("mask") if isinstance(saved, dict) else None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != self.mask.shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"state_dict mask of {self.name!r} must be a bool tensor of shape "
                             f"{tuple(self.mask.shape)}, got {got}")

    @torch.no_grad()
    def load_saved_topology(self, saved: Dict) -> None:
        self.mask.copy_(saved["mask"])
        ops.mask_apply_(self.param.data, self.mask)


class CsrView:
    """A csr layer (:class:`~sparsemom_ext.nn.CsrLinear`, :class:`~sparsemom_ext.nn.CsrConv2d`):
    the Parameter ``values`` and its structure, its weight the layer's ``(n_rows, n_cols)`` matrix."""

    dense_gradient = False

    def __init__(self, name: str, module: CsrLayer):
        self.name, self.module = name, module
        self.n_rows, self.n_cols = module.n_rows, module.n_cols
        self.numel = self.n_rows * self.n_cols

    @property
    def param(self) -> torch.nn.Parameter:
        return self.module.values

    @property
    def capacity(self) -> int:
        return self.module.capacity

    @property
    def mask(self) -> torch.Tensor:
        """The dense bool mask (built on request; the update never uses it)."""
        return self.module.mask

    def count(self) -> int:
        return self.module.nnz

    def zero_inactive(self) -> None:
        """Nothing to do: inactive positions are not stored, and idle slots stay zero under
        any optimizer step (zero weight, gradient and state)."""

    def active_flat(self) -> torch.Tensor:
        return self.module.active_flat()

    def active_values(self, flat: torch.Tensor) -> torch.Tensor:
        return self.module.active_values()

    def at_active(self, tensor: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``tensor`` (one entry per value slot) at the active slots."""
        return tensor[: self.module.nnz]

    def commit(self, plan: Relayout, optimizer_state: Dict, grown_state: Optional[Dict[str, torch.Tensor]]) -> None:
        """Re-lay out ``values`` and every per-weight tensor of its optimizer state by ``plan``:
        kept positions keep value and state, grown ones start at value 0 with the state in
        ``grown_state`` (key -> one entry per grown position), else 0."""
        values = self.module.values
        grown_state = grown_state or {}
        companions = [(tensor, grown_state.get(key)) for key, tensor in optimizer_state.items()
                      if isinstance(tensor, torch.Tensor) and tensor.shape == values.shape]
        self.module.set_topology(plan, companions)

    def saved_topology(self) -> Dict:
        return {"nnz": self.count()}  # the structure itself is in the model's state_dict

    def check_saved_topology(self, saved: Dict) -> None:
        nnz = saved.get("nnz") if isinstance(saved, dict) else None
        if nnz != self.count():
            raise ValueError(f"{type(self.module).__name__} {self.name!r} has {self.count()} nonzeros, the state_dict {nnz}: load the "
                             "model's state_dict (which holds the structure) before the engine's")

    def load_saved_topology(self, saved: Dict) -> None:
        pass


def find_views(model, optimizer) -> List:
    """A view of every sparse weight of ``model`` (mask-carrying parameters and the values of
    csr layers, in ``named_parameters()`` order), checked to be held by ``optimizer``."""
    csr_layers = {id(m.values): m for m in model.modules() if isinstance(m, CsrLayer)}
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    views = []
    for name, p in model.named_parameters():
        if id(p) in csr_layers:
            views.append(CsrView(name, csr_layers[id(p)]))
        elif mask_of(p) is not None:
            views.append(MaskView(name, p, mask_of(p), owners.get(id(p))))
    if not views:
        raise ValueError("model has no sparse weights (no parameter carries a mask and no layer is in the csr layout); "
                         "convert it with sparsemom_ext.sparsify(model, density=...) first")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for w in views:
        if id(w.param) not in held:
            raise ValueError(f"the optimizer does not hold the sparse weight {w.name!r}; "
                             "build the optimizer from model.parameters() (after sparsifying)")
    return views
