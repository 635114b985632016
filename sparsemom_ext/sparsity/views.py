"""The engine's view of one sparse layer, in either layout, and the probe that sees its batches.

A view addresses the layer's weight as an ``(n_rows, n_cols)`` matrix by flat index
``row * n_cols + col`` (a conv's columns are its unfolded patch entries) and exposes
what a topology update needs, the same for both layouts:

- ``active_flat()`` / ``active_values(flat)`` / ``at_active(tensor, flat)``: what is
  active now (sorted flat indices, the weights, a per-weight tensor such as a momentum
  buffer, at those positions);
- ``batch_gradient_at(probe, positions)``, and for dense-score growth
  ``dense_batch_gradient(probe)``: the weight gradient of the last batch;
- ``commit(plan, optimizer_state)``: install the new topology.

:class:`MaskView` wraps a dense weight with an attached bool mask (SparseLinear,
SparseConv2d, or any parameter given a mask); :class:`CsrView` a csr layer
(:class:`~sparsemom_ext.nn.CsrLinear`, :class:`~sparsemom_ext.nn.CsrConv2d`) through its
public structure API, the batch computations included (the layer knows how its weight
gradient is formed: an SDDMM for a linear layer, the conv's SDDMM for a conv).
"""

from typing import Callable, Dict, List, Optional

import torch

from .. import ops
from ..csr_structure import Relayout, structure_from_flat
from ..nn.csr_layout import CsrLayer
from .masks import mask_of

__all__ = ["BatchProbe", "CsrView", "MaskView", "find_views", "last_batch"]


class BatchProbe:
    """Forward hook + output-gradient hook on one layer.

    Keeps the last training batch's input and output gradient (references, no copy:
    O(batch x width) memory) in ``last`` and calls ``on_batch(x, grad_out)`` for each
    backward through the layer. Batches run without grad (evaluation) are not seen.

    torch.compile cannot capture the hook (it keeps tensors from the backward pass): a
    compiled model breaks its graph at each probed layer and runs the hook eagerly, and
    ``fullgraph=True`` fails with the reason below.
    """

    def __init__(self, module: torch.nn.Module, keep_last: bool, name: str = "",
                 on_batch: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None):
        self.keep_last = keep_last
        self.on_batch = on_batch
        self.last = None
        hook = torch.compiler.disable(self._forward_hook, reason=(
            f"the sparse-training engine reads the batches of {name!r} through a hook torch.compile cannot "
            "capture (growth 'momentum', 'gradient' or 'gse' in the csr layout, or sampling='grabo'): compile "
            "without fullgraph=True (the graph breaks at that layer), or use growth='random' or the mask layout "
            "with sampling='uniform'"))
        self._handle = module.register_forward_hook(hook)

    def _forward_hook(self, module, inputs, output):
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        x = inputs[0].detach()
        shape = output.shape
        # A layer's output may be a reshape of its op's result (a csr linear on 3-D input, a
        # csr conv's contiguous output): an autograd view. A hook on a view is lost when the
        # next module modifies it in place (ReLU(inplace=True)), so it goes on the result the
        # view reshapes, whose gradient is the output's gradient reshaped.
        base = output._base
        target = base if base is not None and base.grad_fn is not None and base.numel() == output.numel() else output

        def on_grad(grad):
            grad_out = grad.detach().reshape(shape)
            if self.keep_last:
                self.last = (x, grad_out)
            if self.on_batch is not None:
                self.on_batch(x, grad_out)

        target.register_hook(on_grad)

    def remove(self) -> None:
        self._handle.remove()
        self.last = None


def last_batch(probe: Optional[BatchProbe], name: str):
    """The probe's last ``(input, output gradient)``, or a RuntimeError saying what is missing."""
    if probe is None or probe.last is None:
        raise RuntimeError(f"no training batch has gone through {name!r} since the engine was built (or its "
                           "hooks were removed): run a forward and backward pass before the update")
    return probe.last


class MaskView:
    """A dense weight Parameter and its attached bool mask (updated in place).

    The weight gradient is dense in this layout, so growth reads it directly (no probe).
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

    def batch_gradient_at(self, probe, positions: torch.Tensor) -> torch.Tensor:
        return self.dense_batch_gradient(probe).reshape(-1)[positions.to(self.param.device)]

    def dense_batch_gradient(self, probe) -> torch.Tensor:
        if self.param.grad is None:
            raise RuntimeError(f"the gradient of {self.name!r} is None: update before optimizer.zero_grad()")
        return self.param.grad

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

    def batch_gradient_at(self, probe, positions: torch.Tensor) -> torch.Tensor:
        """The last batch's weight gradient at the flat ``positions`` (sorted), computed there only."""
        x, grad_out = last_batch(probe, self.name)
        row_ptr, col_idx = structure_from_flat(positions.to(x.device), self.n_rows, self.n_cols)
        return self.module.batch_weight_grad_at(x, grad_out, row_ptr, col_idx)

    def dense_batch_gradient(self, probe) -> torch.Tensor:
        """RigL's signal: the dense ``(n_rows, n_cols)`` weight gradient of the probe's last batch
        (made on the update step only)."""
        x, grad_out = last_batch(probe, self.name)
        return self.module.batch_dense_weight_grad(x, grad_out)

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
