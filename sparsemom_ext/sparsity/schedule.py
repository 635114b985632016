"""When the topology changes and by how much: the prune-rate schedule, and apportioning.

:class:`PruneSchedule` says at which optimizer steps the engine updates and the prune
rate p_t there (cosine or linear decay from p_0 to a final rate over the run).
:func:`apportion` splits the freed budget over layers in exact integers, so the global
count of active weights never drifts.
"""

import math
from dataclasses import dataclass
from typing import List, Optional

from .init import check_choice

__all__ = ["DECAYS", "PruneSchedule", "apportion", "prune_rate_at"]

DECAYS = ("cosine", "linear", "constant")


def prune_rate_at(step: int, total_steps: Optional[int], initial: float, final: float, decay: str,
                  decay_end: float = 1.0) -> float:
    """Prune rate at ``step`` of ``total_steps``: cosine or linear decay from ``initial`` to ``final``,
    reached at ``decay_end * total_steps`` (GSE decays to 0 at 60% of training: ``decay_end=0.6``).

    ``constant`` (or no ``total_steps``) keeps ``initial``. After the decay the rate stays ``final``.
    """
    if decay == "constant" or not total_steps:
        return initial
    progress = min(max(step / (decay_end * total_steps), 0.0), 1.0)
    if decay == "cosine":
        return final + 0.5 * (initial - final) * (1.0 + math.cos(math.pi * progress))
    return initial + (final - initial) * progress


@dataclass
class PruneSchedule:
    """The prune rate over the run and the steps at which the topology is updated.

    Updates happen every ``update_every`` steps, or (``update_every`` None) at each
    epoch end, ``steps_per_epoch`` apart once that is known; never at or after
    ``total_steps``.
    """

    prune_rate: float
    final_prune_rate: float
    decay: str
    total_steps: Optional[int]
    update_every: Optional[int]
    decay_end: float = 1.0
    steps_per_epoch: Optional[int] = None

    def __post_init__(self):
        """Every field checked (a ValueError naming it), also for a schedule loaded from a state_dict."""
        check_choice("decay", self.decay, DECAYS)
        for name in ("prune_rate", "final_prune_rate", "decay_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number; got {value!r}")
            setattr(self, name, float(value))
        for name in ("prune_rate", "final_prune_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]; got {getattr(self, name)!r}")
        if not 0.0 < self.decay_end <= 1.0:
            raise ValueError(f"decay_end must be in (0, 1] (a fraction of total_steps); got {self.decay_end!r}")
        for name in ("update_every", "total_steps", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int; got {value!r}")
        if self.decay != "constant" and self.total_steps is None:
            raise ValueError(f"decay={self.decay!r} needs total_steps (the number of optimizer steps of the run); "
                             "pass total_steps or decay='constant'")

    def rate(self, step: int) -> float:
        """p_t at ``step``."""
        return prune_rate_at(step, self.total_steps, self.prune_rate, self.final_prune_rate, self.decay,
                             self.decay_end)

    def before_end(self, step: int) -> bool:
        """Whether an update may still happen at ``step``."""
        return self.total_steps is None or step < self.total_steps

    def updates_at_step(self, step: int) -> bool:
        """Whether ``step()`` at ``step`` updates (an ``update_every`` schedule)."""
        return self.update_every is not None and step % self.update_every == 0 and self.before_end(step)

    def epoch_update_pending(self, step: int) -> bool:
        """Whether ``step`` ends an epoch whose update ``end_of_epoch()`` is about to make."""
        return (self.update_every is None and self.steps_per_epoch is not None
                and step % self.steps_per_epoch == 0 and self.before_end(step))

    def may_update_at(self, step: int) -> bool:
        """Whether ``step()`` at ``step``, or the ``end_of_epoch()`` after it, may update: by
        the schedule, or (True) while the epoch length is not known yet."""
        if not self.before_end(step):
            return False
        period = self.update_every or self.steps_per_epoch
        return period is None or step % period == 0

    def next_update(self, step: int) -> Optional[int]:
        """The step of the next update after ``step``, or None (unknown, or past the end)."""
        period = self.update_every or self.steps_per_epoch
        if period is None:
            return None
        upcoming = (step // period + 1) * period
        return upcoming if self.before_end(upcoming) else None


def apportion(total: int, weights: List[float], capacity: List[int]) -> List[int]:
    """Split the integer ``total`` over slots in proportion to ``weights``, capped by ``capacity``.

    Each round hands out what is left by largest remainders (ties to the lower index)
    among the slots with room; a capped slot's excess goes to the others in proportion
    to their weights, until nothing is left. The result sums to ``total`` exactly
    (``total`` must not exceed ``sum(capacity)``). Slots with weight 0 get nothing while
    a slot with positive weight has room; then the rest is spread by free capacity.
    """
    if total > sum(capacity):
        raise ValueError(f"cannot place {total} weights in {sum(capacity)} free slots")
    given = [0] * len(weights)
    remaining = total
    while remaining > 0:
        open_slots = [i for i in range(len(weights)) if given[i] < capacity[i]]
        shares = [weights[i] for i in open_slots]
        if sum(shares) <= 0:  # only zero-weight slots have room: fill by free capacity
            shares = [capacity[i] - given[i] for i in open_slots]
        total_share = sum(shares)
        exact = [remaining * (s / total_share) for s in shares]  # s / total first: no overflow
        part = [math.floor(e) for e in exact]
        leftover = remaining - sum(part)
        order = sorted(range(len(open_slots)), key=lambda j: (-(exact[j] - part[j]), j))
        for j in order[:leftover]:
            part[j] += 1
        for j, i in enumerate(open_slots):
            take = min(part[j], capacity[i] - given[i])
            given[i] += take
            remaining -= take
    return given
