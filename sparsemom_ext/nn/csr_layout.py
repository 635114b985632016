"""CsrLinear: the always-sparse layout of a linear layer.

Only the active weights and their structure are stored: nothing of size
``in_features x out_features`` exists in a training step. Forward and backward cost
O(nnz x batch) (:func:`sparsemom_ext.ops.csr_linear`).

Storage is sized for topology changes. ``values`` (the Parameter) has a fixed number of
slots, ``capacity``; the first ``nnz`` hold the active weights in CSR (row-major) order
and the rest are exact zeros that no forward reads and whose gradient is zero. A topology
update rewrites the tensors in place and never changes a shape, so the previous step's
graph may still be alive (``loss`` kept past the step), the optimizer keeps its
parameter, DDP's reducer keeps its buckets and torch.compile sees the same shapes. The
structure buffers are the same: ``row_ptr`` (``out_features + 1``), ``col_idx``
(``capacity``, the first ``nnz`` used) and the cached transpose ``col_ptr`` / ``row_idx``
/ ``perm`` (rebuilt, never saved). The price is ``capacity - nnz`` idle slots in the
values, their gradient and the optimizer state: by default ``capacity`` is 1.5x the
initial nnz, and in a model made by ``sparsify`` at least a quarter of the model's
nonzeros (at most ``in x out``): that is what redistribution may grow a layer to. The
fused optimizers of :mod:`sparsemom_ext.optim` step the used slots only.
"""

import math
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..csr_structure import (Relayout, check_canonical_structure, csr_from_mask, csr_to_dense, csr_to_mask,
                             csr_values_from_dense, flat_indices, structure_from_flat)
from ..sparsity.init import check_density, check_generator, exact_count, random_mask
from ..sparsity.masks import UsedSlots, attach_used_slots

__all__ = ["CsrLinear", "default_capacity"]

#: Value slots per initial nonzero when ``capacity`` is not given: room for
#: redistribution to grow a layer by half. Slots cost memory like nonzeros (the values,
#: their gradient and optimizer state, the structure: 24 bytes each with SGD momentum),
#: so at 95% sparsity 1.5x keeps a model's training memory near 0.15x dense.
CAPACITY_FACTOR = 1.5
#: In a model (``sparsify``), a layer also gets at least this fraction of the model's
#: nonzeros as slots: momentum redistribution moves budget to the small layers (in the
#: mask layout LeNet-300-100 at 10% takes its 10 x 100 layer to 100% density and its
#: 100 x 300 one from 10% to 38%, 43% of the model's nonzeros, where csr stops at 25%),
#: and slots of a small layer cost little.
MODEL_SHARE = 0.25


def default_capacity(nnz: int, numel: int, model_nnz: int = 0) -> int:
    """The default number of value slots of a layer with ``nnz`` of ``numel`` weights active:
    ``CAPACITY_FACTOR * nnz``, or ``MODEL_SHARE * model_nnz`` when that is more (the
    nonzeros of all the model's sparse layers), at most ``numel``."""
    return min(numel, max(nnz, math.ceil(CAPACITY_FACTOR * nnz), math.ceil(MODEL_SHARE * model_nnz)))


def _check_capacity(capacity, nnz: int, numel: int) -> int:
    if capacity is None:
        return default_capacity(nnz, numel)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not nnz <= capacity <= numel:
        raise ValueError(f"capacity must be None or an int in [nnz = {nnz}, in_features * out_features = "
                         f"{numel}], got {capacity!r}")
    return capacity


class CsrLinear(nn.Module):
    """A linear layer that stores its active weights only (the csr layout).

    ``y = x W^T + b`` for ``x`` of shape ``(*, in_features)``, with ``W`` the
    ``(out_features, in_features)`` matrix that is ``values`` on the structure
    (``row_ptr``, ``col_idx``) and zero elsewhere. Construction draws exactly what
    ``SparseLinear(in_features, out_features, bias, density=density, generator=generator)``
    draws (nn.Linear's initialisation, then the mask), so the same seed gives the same
    function in both layouts; ``density=1.0`` is every position.
    :func:`sparsemom_ext.nn.to_layout` converts between the layouts.

    Public structure API (what the engine uses): ``nnz``, ``capacity``, ``density``,
    :meth:`structure`, :meth:`active_values`, :meth:`active_flat`, :meth:`set_topology`;
    ``mask`` and :meth:`dense_weight` are built on request. There is no ``weight``: the
    layer is not an ``nn.Linear`` (code that reads ``.weight`` of every ``nn.Linear``
    would misread it), so ``sparsify`` gives the layers that modules read as ``.weight``
    themselves (``nn.MultiheadAttention``'s ``out_proj``) the mask layout.

    ``capacity``: the number of value slots (None: :func:`default_capacity`); it bounds
    the nonzeros a topology update may give the layer. ``values`` carries its used slots
    (:func:`~sparsemom_ext.sparsity.masks.used_slots_of`) for the fused optimizers.
    """

    layout = "csr"
    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, density: float = 1.0, capacity: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        density = check_density(density)
        check_generator(generator)
        numel = in_features * out_features if in_features >= 0 and out_features >= 0 else 0
        count = exact_count(density, numel)
        capacity = _check_capacity(capacity, count, numel)
        # SparseLinear's draws, in its order: nn.Linear's initialisation, then the mask.
        dense = nn.Linear(in_features, out_features, bias, device, dtype)
        mask = random_mask(dense.weight.shape, count, generator, device=dense.weight.device)
        super().__init__()
        self._install(dense.weight, mask, dense.bias, capacity)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, module: nn.Linear, density: float = 1.0, *, capacity: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> "CsrLinear":
        """A csr layer with a copy of ``module``'s parameters at ``round(density * numel)``
        positions drawn from ``generator`` (as ``SparseLinear.from_dense`` draws them);
        device, dtype, ``requires_grad`` and train/eval mode are ``module``'s, and
        ``module`` is not modified."""
        density = check_density(density)
        check_generator(generator)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be a torch.nn.Linear, got {type(module).__name__}")
        weight = module.weight
        count = exact_count(density, weight.numel())
        capacity = _check_capacity(capacity, count, weight.numel())
        mask = random_mask(weight.shape, count, generator, device=weight.device)
        return cls._from_parts(weight, mask, module.bias, capacity, module.training)

    @classmethod
    def from_mask_layer(cls, layer: nn.Module, capacity: Optional[int] = None) -> "CsrLinear":
        """The csr layer computing what a mask-layout linear ``layer`` computes (a
        SparseLinear, or any module with a 2-D ``weight``, its bool ``mask`` and ``bias``)."""
        weight, mask = layer.weight, layer.mask
        count = int(mask.count_nonzero())
        return cls._from_parts(weight, mask, layer.bias, _check_capacity(capacity, count, weight.numel()),
                               layer.training)

    @classmethod
    def _from_parts(cls, weight, mask, bias, capacity: int, training: bool) -> "CsrLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._install(weight, mask, bias, capacity)
        new.train(training)
        return new

    def _install(self, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor], capacity: int) -> None:
        """Take copies of the active entries of ``weight`` (``mask``) and of ``bias``."""
        self.out_features, self.in_features = weight.shape
        row_ptr, col_idx = csr_from_mask(mask)
        nnz = col_idx.numel()
        values = weight.detach().new_zeros(capacity)
        values[:nnz] = csr_values_from_dense(weight.detach(), row_ptr, col_idx)
        self.values = nn.Parameter(values, requires_grad=weight.requires_grad)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        int_opts = {"dtype": torch.int32, "device": col_idx.device}
        self.register_buffer("row_ptr", row_ptr, persistent=True)
        self.register_buffer("col_idx", torch.zeros(capacity, **int_opts), persistent=True)
        self.register_buffer("col_ptr", torch.zeros(self.in_features + 1, **int_opts), persistent=False)
        self.register_buffer("row_idx", torch.zeros(capacity, **int_opts), persistent=False)
        self.register_buffer("perm", torch.zeros(capacity, **int_opts), persistent=False)
        self._slots = UsedSlots(0)
        attach_used_slots(self.values, self._slots)
        self._install_structure(row_ptr, col_idx)

    # ------------------------------------------------------------------ structure API
    @property
    def nnz(self) -> int:
        """The number of active weights."""
        return self._slots.count

    @property
    def capacity(self) -> int:
        """The number of value slots: the most nonzeros the layer can hold."""
        return self.values.numel()

    @property
    def weight_shape(self) -> torch.Size:
        """The shape of the (dense) weight: ``(out_features, in_features)``."""
        return torch.Size((self.out_features, self.in_features))

    @property
    def density(self) -> float:
        """``nnz / (in_features * out_features)`` (0.0 for a layer with no entries)."""
        numel = self.in_features * self.out_features
        return self.nnz / numel if numel else 0.0

    def structure(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(row_ptr, col_idx)`` of the active weights (views of the layer's buffers)."""
        return self.row_ptr, self.col_idx[: self.nnz]

    def active_values(self) -> torch.Tensor:
        """The active weights in CSR order (a detached view of ``values``)."""
        return self.values.detach()[: self.nnz]

    def active_flat(self) -> torch.Tensor:
        """The sorted int64 flat indices ``row * in_features + col`` of the active weights."""
        return flat_indices(*self.structure(), self.in_features)

    @property
    def mask(self) -> torch.Tensor:
        """A new dense bool mask of the active positions (O(in x out): not for a training step)."""
        return csr_to_mask(*self.structure(), self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """A new dense ``(out_features, in_features)`` tensor: the weight, zero off the structure."""
        return csr_to_dense(self.active_values(), *self.structure(), self.in_features)

    @torch.no_grad()
    def set_topology(self, plan: Relayout, companions: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]] = ()
                     ) -> None:
        """Move to the nonzeros ``plan.flat``, in place (no tensor changes shape or identity).

        ``values`` and its gradient (when present) are re-laid out by ``plan``: kept
        weights keep their value, grown ones start at 0. Each ``(tensor, fill)`` of
        ``companions`` is a tensor with one entry per value slot (an optimizer state such
        as ``momentum_buffer``) re-laid out the same way, its grown entries ``fill`` (one per
        grown position) or 0. Slots past the new nnz are zeroed. Everything is checked
        before anything is written.
        """
        companions = list(companions)
        if plan.nnz > self.capacity:
            raise ValueError(f"the new topology has {plan.nnz} nonzeros, more than the layer's capacity "
                             f"{self.capacity}")
        if plan.kept.numel() and int(plan.kept[-1]) >= self.nnz:
            raise ValueError(f"plan keeps nonzero {int(plan.kept[-1])} of a layer with {self.nnz}")
        for tensor, fill in companions:
            if tensor.shape != self.values.shape or tensor.device != self.values.device:
                raise ValueError(f"every companion tensor must have one entry per value slot "
                                 f"({self.capacity},) on {self.values.device}, got {tuple(tensor.shape)} on "
                                 f"{tensor.device}")
            if fill is not None and fill.shape != (plan.n_grown,):
                raise ValueError(f"a companion's fill must have one entry per grown position ({plan.n_grown}), "
                                 f"got shape {tuple(fill.shape)}")
        old_nnz, nnz = self.nnz, plan.nnz
        grad = self.values.grad
        targets = [(self.values.data, None)] + ([(grad, None)] if grad is not None else []) + companions
        for tensor, fill in targets:
            moved = plan.apply(tensor[:old_nnz], None if fill is None else fill.to(tensor.device))
            tensor[:nnz] = moved
            tensor[nnz:] = 0
        row_ptr, col_idx = structure_from_flat(plan.flat.to(self.row_ptr.device), self.out_features,
                                               self.in_features)
        self._install_structure(row_ptr, col_idx)

    def _install_structure(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> None:
        """Copy a canonical structure of at most ``capacity`` nonzeros into the buffers and
        rebuild the cached transpose."""
        nnz = col_idx.numel()
        col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, self.in_features)
        self.row_ptr.copy_(row_ptr)
        for buffer, head in ((self.col_idx, col_idx), (self.row_idx, row_idx), (self.perm, perm)):
            buffer[:nnz] = head
            buffer[nnz:] = 0
        self.col_ptr.copy_(col_ptr)
        self._slots.count = nnz
        self._refresh_used_views()

    def _refresh_used_views(self) -> None:
        # The used heads of the index buffers, as views whose length is nnz. The forward reads
        # these, not a slice by the Python int nnz: torch.compile guards on an int's value and
        # would recompile at every topology update, but makes a tensor's changing length
        # symbolic after the first change (two graphs over a run).
        nnz = self._slots.count
        self._used_structure = (self.col_idx[:nnz], self.row_idx[:nnz], self.perm[:nnz])

    # ------------------------------------------------------------------ nn.Module
    def reset_parameters(self) -> None:
        """nn.Linear's distribution on the active weights (and the bias): U(-1/sqrt(in), 1/sqrt(in))."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.values[: self.nnz].uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(f"input must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(input.shape)}")
        if input.dtype != self.values.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(f"input must have the layer's dtype {self.values.dtype}, got {input.dtype}")
        # All the value slots: csr_linear reads the first nnz and gives the idle ones a zero
        # gradient. A slice here would cost its backward a zero fill and a copy of every slot
        # (4% of a 4096 x 4096 layer's forward + backward at 5%, batch 128).
        col_idx, row_idx, perm = self._used_structure
        return ops.csr_linear(input, self.values, self.bias, self.row_ptr, col_idx, self.col_ptr, row_idx, perm)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        try:
            state_dict = self._csr_keys_from_mask_layout(state_dict, prefix)
        except (ValueError, TypeError) as exc:
            error_msgs.append(f"invalid mask-layout weight for {prefix or 'the layer'}: {exc}")
            return
        keys = [prefix + k for k in ("values", "row_ptr", "col_idx")]
        if all(k in state_dict for k in keys):
            values, row_ptr, col_idx = (state_dict[k] for k in keys)
            try:
                nnz = self._check_saved_structure(values, row_ptr, col_idx)
            except (ValueError, TypeError, RuntimeError) as exc:
                error_msgs.append(f"invalid CSR structure for {prefix or 'the layer'}: {exc}")
                return
            if values.numel() != self.capacity:
                # Another capacity: the tensors take the checkpoint's (same objects). Load
                # before building the optimizer, whose state is sized by the old capacity.
                self.values.data = self.values.data.new_zeros(values.numel())
                for name in ("col_idx", "row_idx", "perm"):
                    setattr(self, name, getattr(self, name).new_zeros(values.numel()))
        else:
            nnz = None  # missing keys are reported by the default loader
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if nnz is not None:
            with torch.no_grad():
                self.values[nnz:] = 0
            self._install_structure(self.row_ptr.clone(), self.col_idx[:nnz].clone())

    def _csr_keys_from_mask_layout(self, state_dict, prefix: str):
        """``state_dict`` with a mask-layout layer's ``weight`` and ``mask`` (a SparseLinear's)
        under ``prefix`` replaced by this layout's ``values``, ``row_ptr``, ``col_idx``, else
        ``state_dict`` itself. The values keep this layer's capacity when the saved nonzeros
        fit in it, else get :func:`default_capacity` slots (a new shape: load before building
        the optimizer)."""
        weight_key, mask_key = prefix + "weight", prefix + "mask"
        if weight_key not in state_dict or mask_key not in state_dict or prefix + "values" in state_dict:
            return state_dict
        weight, mask = state_dict[weight_key], state_dict[mask_key]
        if weight.shape != self.weight_shape or mask.shape != self.weight_shape or mask.dtype != torch.bool:
            raise ValueError(f"weight and mask must have shape (out_features, in_features) = "
                             f"{tuple(self.weight_shape)} and mask dtype bool, got weight {tuple(weight.shape)} "
                             f"and mask {mask.dtype} {tuple(mask.shape)}")
        row_ptr, col_idx = csr_from_mask(mask)
        nnz = col_idx.numel()
        capacity = self.capacity if nnz <= self.capacity else default_capacity(nnz, mask.numel())
        values = weight.new_zeros(capacity)
        values[:nnz] = csr_values_from_dense(weight, row_ptr, col_idx)
        slots = col_idx.new_zeros(capacity)
        slots[:nnz] = col_idx
        converted = {k: v for k, v in state_dict.items() if k not in (weight_key, mask_key)}
        converted.update({prefix + "values": values, prefix + "row_ptr": row_ptr, prefix + "col_idx": slots})
        return converted

    def _check_saved_structure(self, values, row_ptr, col_idx) -> int:
        """The nnz of a saved (values, row_ptr, col_idx), or a ValueError saying what is wrong."""
        if values.dim() != 1 or values.shape != col_idx.shape:
            raise ValueError(f"values and col_idx must be 1-D with one entry per value slot, got shapes "
                             f"{tuple(values.shape)} and {tuple(col_idx.shape)}")
        if row_ptr.dim() != 1 or row_ptr.numel() != self.out_features + 1:
            raise ValueError(f"row_ptr must have out_features + 1 = {self.out_features + 1} entries, got "
                             f"{row_ptr.numel()}")
        nnz = int(row_ptr[-1])
        if not 0 <= nnz <= col_idx.numel():
            raise ValueError(f"row_ptr must end at nnz <= capacity = {col_idx.numel()}, got {nnz}")
        check_canonical_structure(row_ptr, col_idx[:nnz], self.out_features, self.in_features)
        return nnz

    def _apply(self, fn, recurse=True):
        # .to()/.double() may replace the values Parameter: the used slots follow it.
        result = super()._apply(fn, recurse)
        attach_used_slots(self.values, self._slots)
        self._refresh_used_views()
        return result

    def __setstate__(self, state):
        # Parameter.__deepcopy__ and pickling drop the attribute the used slots hang on.
        super().__setstate__(state)
        if "values" in self._parameters and "_slots" in self.__dict__:
            attach_used_slots(self.values, self._slots)
            self._refresh_used_views()

    def extra_repr(self) -> str:
        density = "?" if self.values.is_meta else f"{self.density:.4g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={density}, capacity={self.capacity}")

