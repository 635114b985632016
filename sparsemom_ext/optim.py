"""Drop-in optimizers whose step is fused with the mask of sparse parameters.

``sparsemom_ext.optim.SGD``, ``Adam`` and ``AdamW`` subclass the torch.optim classes
with the same constructor arguments and the same ``state_dict`` format. A parameter
that carries a mask (:func:`sparsemom_ext.attach_mask`) is updated by one fused
kernel (optimizer arithmetic + mask, one pass over memory); every other parameter
goes through the parent class's step unchanged. Swapping the import is all a user
does::

    from sparsemom_ext.optim import SGD   # instead of torch.optim.SGD

The momentum of inactive positions keeps being updated (sparse momentum grows from
it); the weights of inactive positions are exactly zero after every step. The values of
a :class:`~sparsemom_ext.nn.CsrLinear` carry their used slots
(:func:`sparsemom_ext.sparsity.masks.used_slots_of`) and are stepped, fused, on those
slots only: the idle ones (zero weight, gradient and state) cost nothing.

Every group's hyperparameters are checked (finite, in range; ValueError naming
``param_groups[i][...]``) before any parameter moves: torch.optim takes NaN and inf at
construction and would step the groups before a bad one.

Parameters whose group uses ``capturable``, ``differentiable`` or ``fused=True``,
with a sparse gradient or one of another dtype, or of a dtype the kernels do not
handle (complex), take the parent's step followed by a masked fill: same result,
not fused.
"""

import math

import torch

from . import ops
from .sparsity.masks import MaskingOptimizer, mask_of, used_slots_of

__all__ = ["SGD", "Adam", "AdamW"]

_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _parent_step(cls):
    """``cls.step`` without torch's hook wrapper.

    torch.optim wraps ``step`` of each optimizer class it instantiates to run the
    step pre/post hooks; our own ``step`` is wrapped the same way, so calling a
    wrapped parent step from it would run the user's hooks twice.
    """
    step = cls.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


def _check_finite(what: str, value, low=None, high_open=None) -> None:
    """Raise ValueError naming ``what`` unless ``value`` is a finite number at least ``low``
    and below ``high_open``."""
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return  # reading it would synchronise with the device (and fail under CUDA graph capture)
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
        number = None
    bounds = ("" if low is None else f" >= {low:g}") + ("" if high_open is None else f" and < {high_open:g}")
    if (number is None or not math.isfinite(number) or (low is not None and number < low)
            or (high_open is not None and number >= high_open)):
        raise ValueError(f"{what} must be a finite number{bounds}, got {value!r}")


class _MaskedStepMixin:
    """Shared step logic: split masked parameters off, fuse their update."""

    _parent_cls: type

    def _check_hyperparameters(self) -> None:
        """Every group's hyperparameters, checked before any parameter moves: torch.optim
        accepts NaN and inf at construction (and from a loaded state_dict) and would step
        the groups before a bad one."""
        for index, group in enumerate(self.param_groups):
            self._check_group(index, group)

    def _fusable(self, group, p) -> bool:
        return (
            p.dtype in _FUSED_DTYPES
            and p.grad.dtype == p.dtype
            and p.grad.layout == torch.strided
            and not group.get("capturable", False)
            and not group.get("differentiable", False)
            and not group.get("fused", False)
        )

    def _masked_params(self):
        """[(group, param, mask, used, fusable)] for params with a gradient and a mask, or
        with used slots (a CsrLinear's values: ``used`` leading entries, the rest idle).

        Every mask is validated here, before any parameter is touched, so a bad
        mask leaves the whole model and the optimizer state as they were.
        """
        found = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                mask, used = mask_of(p), used_slots_of(p)
                if p.grad is None or (mask is None and used is None):
                    continue
                if mask is None:
                    found.append((group, p, None, used, self._fusable(group, p)))
                    continue
                if mask.dtype != torch.bool or mask.shape != p.shape or mask.device != p.device:
                    raise ValueError(
                        f"the mask attached to a parameter of param_groups[{index}] must be a bool "
                        f"tensor of shape {tuple(p.shape)} on {p.device}, got {mask.dtype} "
                        f"{tuple(mask.shape)} on {mask.device}; re-attach it with "
                        "sparsemom_ext.attach_mask after moving the model"
                    )
                found.append((group, p, mask, None, self._fusable(group, p)))
        return found

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` as in torch.optim."""
        self._check_hyperparameters()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masked = self._masked_params()
        fused = [(group, p, mask, used) for group, p, mask, used, fusable in masked if fusable]
        # The parent's step skips parameters without a gradient: hide the fused
        # ones from it, and restore their gradients whatever happens.
        hidden = [(p, p.grad) for _, p, _, _ in fused]
        for p, _ in hidden:
            p.grad = None
        try:
            _parent_step(self._parent_cls)(self)
        finally:
            for p, grad in hidden:
                p.grad = grad
        for _, p, mask, _, fusable in masked:
            if not fusable and mask is not None:
                p.masked_fill_(~mask, 0)
        for group, p, mask, used in fused:
            # Views of the used slots: idle slots (zero weight, gradient and state) stay as they are.
            view = (lambda t: t) if used is None else (lambda t, n=used: None if t is None else t[:n])
            self._fused_update(group, p, mask, view)
        return loss


class SGD(_MaskedStepMixin, torch.optim.SGD):
    """``torch.optim.SGD`` with the step of masked parameters fused with their mask."""

    _parent_cls = torch.optim.SGD

    def _check_group(self, index, group):
        _check_finite(f"param_groups[{index}]['lr']", group["lr"], low=0)
        _check_finite(f"param_groups[{index}]['momentum']", group["momentum"], low=0)
        _check_finite(f"param_groups[{index}]['dampening']", group["dampening"])
        _check_finite(f"param_groups[{index}]['weight_decay']", group["weight_decay"], low=0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"param_groups[{index}]: nesterov=True requires momentum > 0 and dampening == 0, "
                             f"got momentum={group['momentum']!r}, dampening={group['dampening']!r}")

    def _fused_update(self, group, p, mask, view):
        momentum = group["momentum"]
        buf = None
        fresh = False
        if momentum != 0:  # torch.optim.SGD keeps no state without momentum
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh = True
        ops.fused_sgd_step_(
            view(p), view(p.grad), view(buf), mask,
            lr=float(group["lr"]), momentum=momentum, dampening=group["dampening"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            maximize=group["maximize"], init_momentum_buffer=fresh,
        )
        if fresh:
            self.state[p]["momentum_buffer"] = buf


class Adam(_MaskedStepMixin, torch.optim.Adam):
    """``torch.optim.Adam`` with the step of masked parameters fused with their mask."""

    _parent_cls = torch.optim.Adam
    _decoupled = False

    def _check_group(self, index, group):
        _check_finite(f"param_groups[{index}]['lr']", group["lr"], low=0)
        _check_finite(f"param_groups[{index}]['eps']", group["eps"], low=0)
        _check_finite(f"param_groups[{index}]['weight_decay']", group["weight_decay"], low=0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"param_groups[{index}]['betas'] must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            _check_finite(f"param_groups[{index}]['betas'][{i}]", beta, low=0, high_open=1)

    def _fused_update(self, group, p, mask, view):
        state = self.state[p]
        if len(state) == 0:
            # The layout torch.optim.Adam creates (non-capturable), so state_dicts
            # load into either class.
            scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", self._decoupled)
        ops.fused_adam_step_(
            view(p), view(p.grad), view(state["exp_avg"]), view(state["exp_avg_sq"]),
            view(state.get("max_exp_avg_sq")) if group["amsgrad"] else None, mask,
            step=int(state["step"].item()), lr=float(group["lr"]), beta1=float(beta1),
            beta2=float(beta2), eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=decoupled, maximize=group["maximize"],
        )


class AdamW(Adam, torch.optim.AdamW):
    """``torch.optim.AdamW`` with the step of masked parameters fused with their mask."""

    _parent_cls = torch.optim.AdamW
    _decoupled = True


for _cls in (SGD, Adam, AdamW):
    MaskingOptimizer.register(_cls)
