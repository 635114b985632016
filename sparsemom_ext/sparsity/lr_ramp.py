"""The learning-rate ramp after each topology update (docs/algorithms.md, section 6).

Grown weights start at zero with large gradients; at LeNet-5-Caffe's lr 0.1 the first
optimizer steps on them blew the network up (training loss 0.22, 1.86, 22.4 over the three
steps after the first update of seed 0) and the third update's blow-up left it at chance.
Ramping every group's lr from ``start * lr`` to ``lr`` over the ``steps`` optimizer steps after
each update trained that seed (1.72% test error after 5 epochs).

The ramp scales ``param_groups[i]["lr"]`` only for the duration of ``optimizer.step()``
(an optimizer step pre-hook scales, a post-hook restores), so outside a step the lr is
the user's or the scheduler's own: a scheduler never sees, and never compounds, the scaled
value.
"""

from typing import List, Optional

import torch

__all__ = ["LrRamp", "check_lr_ramp"]


def check_lr_ramp(steps, start) -> None:
    """ValueErrors naming ``lr_ramp_steps`` / ``lr_ramp_start`` when they are not a
    non-negative int and a number in (0, 1]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"lr_ramp_steps must be a non-negative int (0: no ramp); got {steps!r}")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 < start <= 1.0:
        raise ValueError(f"lr_ramp_start must be a number in (0, 1], the lr fraction of the first step "
                         f"after an update; got {start!r}")


class LrRamp:
    """Scales each group's lr by :meth:`factor` inside ``optimizer.step()`` (``steps`` and
    ``start`` as :func:`check_lr_ramp` accepts them; ``steps=0`` adds no hook).

    ``steps_since_update()`` is read at every optimizer step: the number of optimizer
    steps completed since the last update (0 for the first step after it), or ``None``
    before the first update. The factor is ``start + (1 - start) * k / steps`` for ``k`` steps
    since the update, 1 from ``k = steps`` on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, start: float, steps_since_update):
        self.steps, self.start = steps, float(start)
        self._since = steps_since_update
        self._saved: Optional[List] = None
        self._handles = []
        if steps:
            self._handles = [optimizer.register_step_pre_hook(self._scale),
                             optimizer.register_step_post_hook(self._restore)]

    def factor(self) -> float:
        """The lr factor of the coming optimizer step."""
        k = self._since()
        if k is None or k >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * k / self.steps

    def _scale(self, optimizer, args, kwargs) -> None:
        self._restore(optimizer, args, kwargs)  # a step that raised skipped its post-hook
        f = self.factor()
        if f == 1.0:
            return
        self._saved = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self._saved):
            group["lr"] = lr * f

    def _restore(self, optimizer, args, kwargs) -> None:
        if self._saved is None:
            return
        for group, lr in zip(optimizer.param_groups, self._saved):
            group["lr"] = lr
        self._saved = None

    def remove(self) -> None:
        """Take the hooks off the optimizer (no ramp from then on)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
