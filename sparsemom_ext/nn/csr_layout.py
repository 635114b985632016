"""The always-sparse (csr) layout: CsrLinear and CsrConv2d, on one storage class, CsrLayer.

Only the active weights and their structure are stored: nothing of the dense weight's
size exists in a training step. A layer's weight is an ``(n_rows, n_cols)`` matrix in
CSR: a linear layer's ``(out_features, in_features)``, a conv's ``(out_channels,
in_channels * kh * kw)`` (columns in the order of ``weight.reshape(out_channels, -1)`` of
an ``nn.Conv2d``: the unfolded patch entries). Forward and backward cost O(nnz x batch)
(:func:`sparsemom_ext.ops.csr_linear`, :func:`sparsemom_ext.ops.csr_conv2d`, the latter
times the output positions).

Storage is sized for topology changes. ``values`` (the Parameter) has a fixed number of
slots, ``capacity``; the first ``nnz`` hold the active weights in CSR (row-major) order
and the rest are exact zeros that no forward reads and whose gradient is zero. A topology
update rewrites the tensors in place and never changes a shape, so the previous step's
graph may still be alive (``loss`` kept past the step), the optimizer keeps its
parameter, DDP's reducer keeps its buckets and torch.compile sees the same shapes. The
structure buffers are the same: ``row_ptr`` (``n_rows + 1``), ``col_idx`` (``capacity``,
the first ``nnz`` used) and the cached transpose ``col_ptr`` / ``row_idx`` / ``perm``
(rebuilt, never saved). The price is ``capacity - nnz`` idle slots in the values, their
gradient and the optimizer state: by default ``capacity`` is 1.5x the initial nnz, and in
a model made by ``sparsify`` at least a quarter of the model's nonzeros (at most the
weight's size): that is what redistribution may grow a layer to. The fused optimizers of
:mod:`sparsemom_ext.optim` step the used slots only.

:class:`CsrLayer` holds all of that (storage, topology changes, state_dict with the mask
layout's keys, copies and devices, the structure API the engine reads); a subclass gives
the weight's shape, its forward, and the three batch computations the engine's growth
needs (:meth:`CsrLayer.batch_weight_grad_at`, :meth:`CsrLayer.batch_dense_weight_grad`,
:meth:`CsrLayer.grabo_factors`), so each rule lives with the layer it belongs to.
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

__all__ = ["CsrConv2d", "CsrLayer", "CsrLinear", "check_csr_conv_options", "default_capacity"]

#: Value slots per initial nonzero when ``capacity`` is not given: room for
#: redistribution to grow a layer by half. Slots cost memory like nonzeros (the values,
#: their gradient and optimizer state, the structure: 24 bytes each with SGD momentum),
#: so at 95% sparsity 1.5x keeps a model's training memory near 0.15x dense.
CAPACITY_FACTOR = 1.5
#: In a model (``sparsify``), a layer also gets at least a share of the model's nonzeros
#: as slots: momentum redistribution moves budget to the small layers (in the mask layout
#: LeNet-300-100 at 10% takes its 10 x 100 layer to 100% density and its 100 x 300 one from
#: 10% to 38%, 43% of the model's nonzeros, where csr stops at 25%), and slots of a small
#: layer cost little. The share is a quarter, or ``1 / L`` in a model of ``L > 4`` sparse
#: weights, so these floors add at most the model's nonzeros: a quarter each gave VGG-16's
#: 16 layers 3.1x its nonzeros in slots (training memory 0.31x dense), ``1 / 16`` gives 1.8x.
MODEL_SHARE = 0.25
#: The dtypes of the csr conv kernels (CPU).
_CONV_DTYPES = (torch.float32, torch.float64)


def default_capacity(nnz: int, numel: int, model_nnz: int = 0, model_layers: int = 1) -> int:
    """The default number of value slots of a layer with ``nnz`` of ``numel`` weights active,
    in a model of ``model_layers`` sparse weights with ``model_nnz`` nonzeros in all:
    ``CAPACITY_FACTOR * nnz``, or the layer's share of ``model_nnz`` when that is more
    (``MODEL_SHARE``, at most ``1 / model_layers``), at most ``numel``."""
    share = min(MODEL_SHARE, 1 / max(1, model_layers))
    return min(numel, max(nnz, math.ceil(CAPACITY_FACTOR * nnz), math.ceil(share * model_nnz)))


def _check_capacity(capacity, nnz: int, numel: int) -> int:
    if capacity is None:
        return default_capacity(nnz, numel)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not nnz <= capacity <= numel:
        raise ValueError(f"capacity must be None or an int in [nnz = {nnz}, the weight's {numel} entries], "
                         f"got {capacity!r}")
    return capacity


class CsrLayer(nn.Module):
    """The storage of the csr layout, shared by :class:`CsrLinear` and :class:`CsrConv2d`.

    Public structure API (what the engine uses): ``nnz``, ``capacity``, ``density``,
    ``weight_shape`` and its matrix view ``n_rows`` x ``n_cols`` (flat index ``row *
    n_cols + col``), :meth:`structure`, :meth:`active_values`, :meth:`active_flat`,
    :meth:`set_topology`; ``mask`` and :meth:`dense_weight` (``weight_shape``) are built
    on request. There is no ``weight``: code that reads ``.weight`` of every torch layer
    would misread these layers, so they are not ``nn.Linear`` / ``nn.Conv2d`` subclasses.

    A subclass sets its dimensions in :meth:`_set_dims` (called with the dense weight's
    shape), defines ``forward`` and the batch computations of growth.
    """

    layout = "csr"
    #: Set by the sparse-training engine while it reads this layer's batches
    #: (:class:`~sparsemom_ext.sparsity.taps.GradientTap`), else None.
    gradient_tap = None

    # ------------------------------------------------------------------ shape (subclasses)
    @property
    def weight_shape(self) -> torch.Size:
        """The shape of the dense weight this layer stands for."""
        raise NotImplementedError

    def _set_dims(self, weight_shape: torch.Size) -> None:
        """Take the layer's dimensions from the dense weight's shape."""
        raise NotImplementedError

    @property
    def n_rows(self) -> int:
        """Rows of the weight matrix: output units (features, channels)."""
        return self.weight_shape[0]

    @property
    def n_cols(self) -> int:
        """Columns of the weight matrix: inputs (features, or a conv's unfolded patch entries)."""
        return math.prod(self.weight_shape[1:])

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_parts(cls, weight, mask, bias, capacity: int, training: bool, **attrs):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, value in attrs.items():
            setattr(new, name, value)
        new._install(weight, mask, bias, capacity)
        new.train(training)
        return new

    def _install(self, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor], capacity: int) -> None:
        """Take copies of the active entries of ``weight`` (``mask``, the same shape) and of ``bias``."""
        self._set_dims(weight.shape)
        n_rows, n_cols = self.n_rows, self.n_cols
        matrix = weight.detach().reshape(n_rows, n_cols)
        row_ptr, col_idx = csr_from_mask(mask.reshape(n_rows, n_cols))
        nnz = col_idx.numel()
        values = matrix.new_zeros(capacity)
        values[:nnz] = csr_values_from_dense(matrix, row_ptr, col_idx)
        self.values = nn.Parameter(values, requires_grad=weight.requires_grad)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        int_opts = {"dtype": torch.int32, "device": col_idx.device}
        self.register_buffer("row_ptr", row_ptr, persistent=True)
        self.register_buffer("col_idx", torch.zeros(capacity, **int_opts), persistent=True)
        self.register_buffer("col_ptr", torch.zeros(n_cols + 1, **int_opts), persistent=False)
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
    def density(self) -> float:
        """``nnz`` over the dense weight's size (0.0 for a layer with no entries)."""
        numel = self.n_rows * self.n_cols
        return self.nnz / numel if numel else 0.0

    def structure(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(row_ptr, col_idx)`` of the active weights (views of the layer's buffers)."""
        return self.row_ptr, self.col_idx[: self.nnz]

    def active_values(self) -> torch.Tensor:
        """The active weights in CSR order (a detached view of ``values``)."""
        return self.values.detach()[: self.nnz]

    def active_flat(self) -> torch.Tensor:
        """The sorted int64 flat indices ``row * n_cols + col`` of the active weights."""
        return flat_indices(*self.structure(), self.n_cols)

    @property
    def mask(self) -> torch.Tensor:
        """A new dense bool mask of ``weight_shape`` (the dense weight's size: not for a training step)."""
        return csr_to_mask(*self.structure(), self.n_cols).reshape(self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """A new dense tensor of ``weight_shape``: the weight, zero off the structure."""
        return csr_to_dense(self.active_values(), *self.structure(), self.n_cols).reshape(self.weight_shape)

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
        row_ptr, col_idx = structure_from_flat(plan.flat.to(self.row_ptr.device), self.n_rows, self.n_cols)
        self._install_structure(row_ptr, col_idx)

    def _install_structure(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> None:
        """Copy a canonical structure of at most ``capacity`` nonzeros into the buffers and
        rebuild the cached transpose."""
        nnz = col_idx.numel()
        col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, self.n_cols)
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

    # ------------------------------------------------------------------ growth's batch computations
    def batch_weight_grad_at(self, x: torch.Tensor, grad_out: torch.Tensor, row_ptr: torch.Tensor,
                             col_idx: torch.Tensor) -> torch.Tensor:
        """The weight gradient of one batch (the layer's input ``x`` and its output's gradient
        ``grad_out``) at the positions of the structure ``(row_ptr, col_idx)``: ``(nnz,)``,
        without forming the dense gradient (GSE's and csr momentum's candidate gradients)."""
        raise NotImplementedError

    def batch_dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The dense ``(n_rows, n_cols)`` weight gradient of one batch (RigL's signal, made on
        the update step only: the one place the csr layout forms the dense size)."""
        raise NotImplementedError

    def grabo_factors(self, x: torch.Tensor, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """GraBo's ``(g, f)`` of one batch: summed |output gradient| per row (``n_rows``) and
        summed |input| per column (``n_cols``) of the weight matrix."""
        raise NotImplementedError

    # ------------------------------------------------------------------ nn.Module
    def reset_parameters(self) -> None:
        """The torch layer's distribution on the active weights (and the bias): nn.Linear's and
        nn.Conv2d's default are both U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = ``n_cols``."""
        bound = 1.0 / math.sqrt(self.n_cols) if self.n_cols > 0 else 0.0
        with torch.no_grad():
            self.values[: self.nnz].uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _check_input_dtype(self, input: torch.Tensor) -> None:
        if input.dtype != self.values.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(f"input must have the layer's dtype {self.values.dtype}, got {input.dtype}")

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
        """``state_dict`` with a mask-layout layer's ``weight`` and ``mask`` (a SparseLinear's or
        SparseConv2d's) under ``prefix`` replaced by this layout's ``values``, ``row_ptr``,
        ``col_idx``, else ``state_dict`` itself. The values keep this layer's capacity when the
        saved nonzeros fit in it, else get :func:`default_capacity` slots (a new shape: load
        before building the optimizer)."""
        weight_key, mask_key = prefix + "weight", prefix + "mask"
        if weight_key not in state_dict or mask_key not in state_dict or prefix + "values" in state_dict:
            return state_dict
        weight, mask = state_dict[weight_key], state_dict[mask_key]
        if weight.shape != self.weight_shape or mask.shape != self.weight_shape or mask.dtype != torch.bool:
            raise ValueError(f"weight and mask must have shape {tuple(self.weight_shape)} (the layer's weight) "
                             f"and mask dtype bool, got weight {tuple(weight.shape)} and mask {mask.dtype} "
                             f"{tuple(mask.shape)}")
        weight = weight.reshape(self.n_rows, self.n_cols)
        row_ptr, col_idx = csr_from_mask(mask.reshape(self.n_rows, self.n_cols))
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
        if row_ptr.dim() != 1 or row_ptr.numel() != self.n_rows + 1:
            raise ValueError(f"row_ptr must have one entry per output unit plus one ({self.n_rows + 1}), got "
                             f"{row_ptr.numel()}")
        nnz = int(row_ptr[-1])
        if not 0 <= nnz <= col_idx.numel():
            raise ValueError(f"row_ptr must end at nnz <= capacity = {col_idx.numel()}, got {nnz}")
        check_canonical_structure(row_ptr, col_idx[:nnz], self.n_rows, self.n_cols)
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

    def _density_repr(self) -> str:
        density = "?" if self.values.is_meta else f"{self.density:.4g}"
        return f"density={density}, capacity={self.capacity}"


class CsrLinear(CsrLayer):
    """A linear layer that stores its active weights only (the csr layout).

    ``y = x W^T + b`` for ``x`` of shape ``(*, in_features)``, with ``W`` the
    ``(out_features, in_features)`` matrix that is ``values`` on the structure
    (``row_ptr``, ``col_idx``) and zero elsewhere. Construction draws exactly what
    ``SparseLinear(in_features, out_features, bias, density=density, generator=generator)``
    draws (nn.Linear's initialisation, then the mask), so the same seed gives the same
    function in both layouts; ``density=1.0`` is every position.
    :func:`sparsemom_ext.nn.to_layout` converts between the layouts.

    The structure API is :class:`CsrLayer`'s. It is not an ``nn.Linear`` (no ``weight``),
    so ``sparsify`` gives the layers that modules read as ``.weight`` themselves
    (``nn.MultiheadAttention``'s ``out_proj``) the mask layout.

    ``capacity``: the number of value slots (None: :func:`default_capacity`); it bounds
    the nonzeros a topology update may give the layer. ``values`` carries its used slots
    (:func:`~sparsemom_ext.sparsity.masks.used_slots_of`) for the fused optimizers.
    """

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

    @property
    def weight_shape(self) -> torch.Size:
        """The shape of the (dense) weight: ``(out_features, in_features)``."""
        return torch.Size((self.out_features, self.in_features))

    def _set_dims(self, weight_shape) -> None:
        self.out_features, self.in_features = weight_shape

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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(f"input must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(input.shape)}")
        self._check_input_dtype(input)
        # All the value slots: csr_linear reads the first nnz and gives the idle ones a zero
        # gradient. A slice here would cost its backward a zero fill and a copy of every slot
        # (4% of a 4096 x 4096 layer's forward + backward at 5%, batch 128).
        col_idx, row_idx, perm = self._used_structure
        output = ops.csr_linear(input, self.values, self.bias, self.row_ptr, col_idx, self.col_ptr, row_idx, perm)
        tap = self.gradient_tap
        return output if tap is None else tap(input, output)

    # A linear layer on (*, in) inputs: every leading dimension is batch.
    def batch_weight_grad_at(self, x, grad_out, row_ptr, col_idx):
        return ops.csr_sddmm(grad_out.reshape(-1, self.n_rows), x.reshape(-1, self.n_cols), row_ptr, col_idx)

    def batch_dense_weight_grad(self, x, grad_out):
        return grad_out.reshape(-1, self.n_rows).t().mm(x.reshape(-1, self.n_cols))

    def grabo_factors(self, x, grad_out):
        return grad_out.reshape(-1, self.n_rows).abs().sum(0), x.reshape(-1, self.n_cols).abs().sum(0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._density_repr()}")


def _pair(value, name: str, minimum: int) -> Tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


#: CsrConv2d's output layouts (:attr:`CsrConv2d.output_layout`).
OUTPUT_LAYOUTS = ("contiguous", "batch_innermost")


def check_csr_conv_options(kernel_size, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """``(kernel_size, stride, padding)`` as pairs if the csr conv kernels compute this
    ``nn.Conv2d`` configuration, else a ValueError naming the argument and what is supported:
    dilation 1, groups 1, ``padding_mode="zeros"``, padding an int, a pair or ``"valid"`` (0)."""
    if isinstance(groups, bool) or groups != 1:
        raise ValueError(f"groups must be 1 in the csr layout (grouped and depthwise convolutions are not "
                         f"supported), got {groups!r}")
    if _pair(dilation, "dilation", 1) != (1, 1):
        raise ValueError(f"dilation must be 1 in the csr layout, got {dilation!r}")
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' in the csr layout, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding != "valid":
            raise ValueError(f"padding must be an int, a pair of ints or 'valid' in the csr layout, got "
                             f"{padding!r} (for 'same' with an odd kernel k, pass padding=(k - 1) // 2)")
        padding = 0
    return _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1), _pair(padding, "padding", 0)


class CsrConv2d(CsrLayer):
    """A 2-D convolution that stores its active weights only (the csr layout).

    ``y = conv2d(x, W, b, stride, padding)`` for ``x`` of shape ``(n, in_channels, h, w)``,
    ``W`` the ``(out_channels, in_channels, kh, kw)`` weight that is ``values`` on the
    structure and zero elsewhere; the structure is the ``(out_channels, in_channels * kh *
    kw)`` matrix ``W.reshape(out_channels, -1)`` (a row per output channel, a column per
    unfolded patch entry). Construction draws exactly what ``SparseConv2d(...)`` draws with
    the same arguments (nn.Conv2d's initialisation, then the mask from ``generator``), so the
    same seed gives the same function in both layouts. ``weight_shape``, ``mask`` and
    :meth:`dense_weight` are 4-D, as SparseConv2d's.

    The kernels (:func:`sparsemom_ext.ops.csr_conv2d`) run on the CPU in float32 and
    float64; they read and write activations batch innermost. The output is contiguous by
    default; ``output_layout="batch_innermost"`` leaves it in the kernels' layout, which the
    next csr conv reads without a copy (see :attr:`output_layout`; use ``torch.flatten`` /
    ``reshape`` on it, not ``view``). Supported: dilation 1, groups 1, zero padding (an int,
    a pair or ``"valid"``); anything else raises a ValueError naming the argument (use the
    mask layout, :class:`~sparsemom_ext.nn.SparseConv2d`, for it).
    """

    __constants__ = ["in_channels", "out_channels", "kernel_size", "stride", "padding"]
    #: nn.Conv2d's attributes for code that reads them (always these values here).
    dilation = (1, 1)
    groups = 1
    padding_mode = "zeros"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 *, density: float = 1.0, capacity: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, output_layout: str = "contiguous"):
        # Everything is checked before nn.Conv2d draws from torch's RNG.
        if output_layout not in OUTPUT_LAYOUTS:
            raise ValueError(f"output_layout must be one of {OUTPUT_LAYOUTS}, got {output_layout!r}")
        density = check_density(density)
        check_generator(generator)
        kernel_size, stride, padding = check_csr_conv_options(kernel_size, stride, padding, dilation, groups,
                                                              padding_mode)
        numel = in_channels * out_channels * kernel_size[0] * kernel_size[1] \
            if in_channels >= 0 and out_channels >= 0 else 0
        count = exact_count(density, numel)
        capacity = _check_capacity(capacity, count, numel)
        # SparseConv2d's draws, in its order: nn.Conv2d's initialisation, then the mask.
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, 1, 1, bias, "zeros", device,
                          dtype)
        mask = random_mask(dense.weight.shape, count, generator, device=dense.weight.device)
        super().__init__()
        self.stride, self.padding = stride, padding
        self.output_layout = output_layout
        self._install(dense.weight, mask, dense.bias, capacity)

    @property
    def weight_shape(self) -> torch.Size:
        """The shape of the (dense) weight: ``(out_channels, in_channels, kh, kw)``."""
        return torch.Size((self.out_channels, self.in_channels) + self.kernel_size)

    def _set_dims(self, weight_shape) -> None:
        self.out_channels, self.in_channels, kh, kw = weight_shape
        self.kernel_size = (kh, kw)

    @classmethod
    def _options_of(cls, module: nn.Module) -> dict:
        kernel_size, stride, padding = check_csr_conv_options(module.kernel_size, module.stride, module.padding,
                                                              module.dilation, module.groups, module.padding_mode)
        return {"stride": stride, "padding": padding}

    @classmethod
    def from_dense(cls, module: nn.Conv2d, density: float = 1.0, *, capacity: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> "CsrConv2d":
        """A csr conv with a copy of ``module``'s parameters at ``round(density * numel)``
        positions drawn from ``generator`` (as ``SparseConv2d.from_dense`` draws them); its
        stride and padding, device, dtype, ``requires_grad`` and train/eval mode are
        ``module``'s, and ``module`` is not modified. ValueError for a configuration the csr
        layout does not compute (:func:`check_csr_conv_options`)."""
        density = check_density(density)
        check_generator(generator)
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module must be a torch.nn.Conv2d, got {type(module).__name__}")
        options = cls._options_of(module)
        weight = module.weight
        count = exact_count(density, weight.numel())
        capacity = _check_capacity(capacity, count, weight.numel())
        mask = random_mask(weight.shape, count, generator, device=weight.device)
        return cls._from_parts(weight, mask, module.bias, capacity, module.training, **options)

    @classmethod
    def from_mask_layer(cls, layer: nn.Module, capacity: Optional[int] = None) -> "CsrConv2d":
        """The csr conv computing what a mask-layout conv ``layer`` computes (a SparseConv2d,
        or any nn.Conv2d-like module with its 4-D ``weight``, bool ``mask`` and ``bias``)."""
        options = cls._options_of(layer)
        weight, mask = layer.weight, layer.mask
        count = int(mask.count_nonzero())
        return cls._from_parts(weight, mask, layer.bias, _check_capacity(capacity, count, weight.numel()),
                               layer.training, **options)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """The output's spatial size for an input of ``height`` x ``width``."""
        return tuple(ops.conv_output_size(size, k, s, p)
                     for size, k, s, p in zip((height, width), self.kernel_size, self.stride, self.padding))

    def _check_input(self, input: torch.Tensor) -> None:
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(f"input must be 4-D (batch, in_channels={self.in_channels}, height, width), got shape "
                             f"{tuple(input.shape)}")
        for what, tensor in (("input", input), ("the layer's values", self.values)):
            if tensor.device.type not in ("cpu", "meta"):
                raise RuntimeError(f"CsrConv2d runs on the CPU only (its kernels have no CUDA version yet), "
                                   f"got {what} on {tensor.device}: train convolutions on the GPU in the mask "
                                   "layout (sparsemom_ext.SparseConv2d, sparsify(..., layout='mask'))")
        self._check_input_dtype(input)
        if input.dtype not in _CONV_DTYPES and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(f"CsrConv2d computes in float32 or float64, got {input.dtype}")
        h, w = input.shape[2:]
        if min(self.output_size(h, w)) < 1:
            raise ValueError(f"input of {h}x{w} pixels is smaller than the kernel {self.kernel_size} with padding "
                             f"{self.padding}")

    @property
    def output_layout(self) -> str:
        """The memory layout of the output: ``"contiguous"`` (default) or ``"batch_innermost"``.

        The kernels write batch innermost (``(n, c, h, w)`` stored ``(c, h, w, n)``) and
        read it without a copy, so a stack of csr convs through elementwise ops is fastest
        with ``"batch_innermost"``. But torch's CPU batch norm and pooling run 2-4x slower on
        that layout than on a contiguous tensor (BatchNorm2d on 128 x 128 x 32 x 32: 241 ms
        against 65 ms forward) and ``view`` refuses it, so by default the output is made
        contiguous, a blocked transpose (about 1.4 ms for 32 x 256 x 16 x 16, 2 threads).
        """
        return self.__dict__.get("_output_layout", "contiguous")

    @output_layout.setter
    def output_layout(self, value: str) -> None:
        if value not in OUTPUT_LAYOUTS:
            raise ValueError(f"output_layout must be one of {OUTPUT_LAYOUTS}, got {value!r}")
        self.__dict__["_output_layout"] = value

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``(n, out_channels, oh, ow)`` in :attr:`output_layout`."""
        self._check_input(input)
        # All the value slots, as in CsrLinear.forward: the op reads the first nnz.
        col_idx, row_idx, perm = self._used_structure
        output = ops.csr_conv2d(input, self.values, self.bias, self.row_ptr, col_idx, self.col_ptr, row_idx, perm,
                                self.kernel_size, self.stride, self.padding)
        if self.output_layout == "contiguous":
            output = ops.contiguous_from_batch_innermost(output)
        tap = self.gradient_tap
        return output if tap is None else tap(input, output)

    # The conv as a linear layer on unfolded patches: the batch and the output positions are
    # its "batch"; nothing here unfolds the whole batch.
    def batch_weight_grad_at(self, x, grad_out, row_ptr, col_idx):
        return ops.csr_conv2d_weight_grad(grad_out, x, row_ptr, col_idx, self.kernel_size, self.stride,
                                          self.padding)

    def batch_dense_weight_grad(self, x, grad_out):
        grad = torch.nn.grad.conv2d_weight(x, self.weight_shape, grad_out, self.stride, self.padding)
        return grad.reshape(self.n_rows, self.n_cols)

    def grabo_factors(self, x, grad_out):
        # The sum over the batch commutes with unfolding (a linear map of |x|), so one
        # image's worth of patches is unfolded: (1, c * kh * kw, positions).
        patches = torch.nn.functional.unfold(x.abs().sum(0, keepdim=True), self.kernel_size, 1, self.padding,
                                             self.stride)
        return grad_out.abs().sum(dim=(0, 2, 3)), patches.sum(dim=(0, 2))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, {self._density_repr()}")
