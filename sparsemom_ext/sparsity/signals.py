"""The momentum signal of each optimizer family, as the engine reads and accumulates it.

SGD's signal is its ``momentum_buffer``; Adam/AdamW's is ``exp_avg / (sqrt(exp_avg_sq) +
eps)`` (the step direction without the learning rate). csr-layout momentum growth also
accumulates candidates' gradients into state of the same kind, with the optimizer's own
betas, so a grown weight can start with it.
"""

from typing import Dict, Optional

import torch

__all__ = ["AdamFamily", "OptimizerFamily", "SgdFamily", "optimizer_family"]

SUPPORTED = ("torch.optim.SGD (momentum > 0 for a momentum signal; Nesterov or not), Adam, AdamW and their "
             "sparsemom_ext.optim versions")


def param_group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Dict:
    """The param group of ``optimizer`` that holds ``param``."""
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


class OptimizerFamily:
    """What the engine knows of one optimizer family: its momentum signal and its state."""

    #: The per-weight state tensors a grown weight may start with (csr momentum windows).
    window_keys: tuple = ()

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def check_has_momentum(self) -> None:
        """Raise ValueError when this optimizer keeps no momentum to grow or redistribute by."""

    def momentum(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """The momentum signal of ``param`` (same shape), or a RuntimeError when the optimizer
        has not stepped yet."""
        raise NotImplementedError

    def new_window_state(self, n: int, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {key: torch.zeros(n, dtype=like.dtype, device=like.device) for key in self.window_keys}

    def accumulate(self, state: Dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> None:
        """Fold one step's gradient ``grad`` into the window ``state``, as the optimizer would."""
        raise NotImplementedError

    def window_signal(self, state: Dict[str, torch.Tensor], param: torch.Tensor) -> torch.Tensor:
        """The momentum signal of a window's accumulated ``state``."""
        raise NotImplementedError

    def _state(self, param: torch.Tensor, key: str, name: str) -> torch.Tensor:
        tensor = self.optimizer.state.get(param, {}).get(key)
        if tensor is None:
            raise RuntimeError(f"no {key} for {name!r} yet: call optimizer.step() before the first topology update")
        return tensor

    def _group(self, param: torch.Tensor) -> Dict:
        return param_group_of(self.optimizer, param)


class SgdFamily(OptimizerFamily):
    window_keys = ("momentum_buffer",)

    def check_has_momentum(self) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            if group["momentum"] == 0:
                raise ValueError(f"SGD param_groups[{index}] has momentum=0, so there is no momentum to grow or "
                                 "redistribute by; use momentum > 0, or growth='random' / 'gradient' with "
                                 f"redistribution other than 'momentum'. Supported: {SUPPORTED}")

    def momentum(self, param, name):
        return self._state(param, "momentum_buffer", name)

    def accumulate(self, state, grad, param):
        group = self._group(param)
        if group.get("maximize", False):
            grad = -grad
        state["momentum_buffer"].mul_(group["momentum"]).add_(grad, alpha=1 - group["dampening"])

    def window_signal(self, state, param):
        return state["momentum_buffer"]


class AdamFamily(OptimizerFamily):
    window_keys = ("exp_avg", "exp_avg_sq")

    def momentum(self, param, name):
        return self._signal(self._state(param, "exp_avg", name), self._state(param, "exp_avg_sq", name), param)

    def _signal(self, exp_avg, exp_avg_sq, param):
        return exp_avg / (exp_avg_sq.sqrt() + self._group(param)["eps"])

    def accumulate(self, state, grad, param):
        group = self._group(param)
        if group.get("maximize", False):
            grad = -grad
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    def window_signal(self, state, param):
        return self._signal(state["exp_avg"], state["exp_avg_sq"], param)


def optimizer_family(optimizer: torch.optim.Optimizer) -> Optional[OptimizerFamily]:
    """The family of ``optimizer`` (AdamW subclasses Adam), or None for another optimizer."""
    if isinstance(optimizer, torch.optim.SGD):
        return SgdFamily(optimizer)
    if isinstance(optimizer, torch.optim.Adam):
        return AdamFamily(optimizer)
    return None
