"""Which parameters carry a mask.

A parameter carries a mask when :func:`attach_mask` was called on it. The fused
optimizers of :mod:`sparsemom_ext.optim` look masks up with :func:`mask_of` at every
step and keep such parameters zero at inactive positions.
"""

import abc

import torch

_MASK_ATTR = "_sparsemom_mask"
_SLOTS_ATTR = "_sparsemom_used_slots"


class MaskingOptimizer(abc.ABC):
    """Optimizers whose step keeps masked parameters zero at inactive positions (the fused
    optimizers of :mod:`sparsemom_ext.optim` register here): the engine then does not mask
    again. An abstract base to register with, so the optimizers' MRO stays torch's."""


def attach_mask(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attach the bool ``mask`` to ``param`` (same shape and device) and return ``param``.

    The mask is stored by reference, so later in-place changes to it (a topology
    update) are seen by the optimizers. ``param`` itself is not modified: call
    :func:`sparsemom_ext.mask_apply_` to zero its inactive positions now.
    """
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a tensor, got {type(param).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != param.shape:
        raise ValueError(f"mask must have the shape of param {tuple(param.shape)}, got {tuple(mask.shape)}")
    if mask.device != param.device:
        raise ValueError(f"mask must be on the device of param ({param.device}), got {mask.device}")
    setattr(param, _MASK_ATTR, mask)
    return param


def mask_of(param: torch.Tensor):
    """The mask attached to ``param``, or ``None``."""
    return getattr(param, _MASK_ATTR, None)


def detach_mask(param: torch.Tensor) -> None:
    """Forget the mask of ``param`` (it becomes a dense parameter again)."""
    if hasattr(param, _MASK_ATTR):
        delattr(param, _MASK_ATTR)


class UsedSlots:
    """How many leading entries of a 1-D parameter are in use: a CsrLinear's ``values`` has
    a fixed number of slots, the first ``count`` active and the rest idle zeros. The layer
    updates ``count``; the fused optimizers read it and step only those entries."""

    def __init__(self, count: int):
        self.count = count


def attach_used_slots(param: torch.Tensor, slots: UsedSlots) -> torch.Tensor:
    """Attach ``slots`` (by reference) to the 1-D ``param`` and return ``param``."""
    if not isinstance(param, torch.Tensor) or param.dim() != 1:
        raise ValueError(f"param must be a 1-D tensor, got {type(param).__name__}"
                         + (f" of shape {tuple(param.shape)}" if isinstance(param, torch.Tensor) else ""))
    setattr(param, _SLOTS_ATTR, slots)
    return param


def used_slots_of(param: torch.Tensor):
    """The number of used leading entries of ``param`` (see :class:`UsedSlots`), or ``None``."""
    slots = getattr(param, _SLOTS_ATTR, None)
    return None if slots is None else slots.count


def non_bool_masks(state_dict, keys) -> list:
    """Error messages for the entries ``keys`` of a state_dict that are masks of another
    dtype than bool: loading copies into the bool buffers, which would turn 0.5 into True."""
    return [f"{key} must be a bool tensor, got {state_dict[key].dtype}" for key in keys
            if isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].dtype != torch.bool]
