"""The dynamic-sparsity engine: sparse momentum (and SET / RigL-style growth) on mask-layout layers.

Usage::

    model = sm.sparsify(model, density=0.05)
    optimizer = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    engine = sm.SparseMomentum(model, optimizer, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(); loss_fn(model(x), y).backward()
            optimizer.step(); engine.step()
        engine.end_of_epoch()

The engine is an explicit object the user steps; it patches nothing. Its sparse
weights are the parameters of ``model`` that carry a mask
(:func:`sparsemom_ext.attach_mask`, done by SparseLinear / SparseConv2d / sparsify).
The algorithm is ALGORITHMS.md section 1 (Dettmers & Zettlemoyer 2019), exactly:
prune ``ceil(p_t * nnz_l)`` weights per layer, redistribute the freed budget over
layers by a statistic, grow it back by a score, so each layer's count changes
only by redistribution and the global count never drifts.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import ops
from .masks import mask_of

__all__ = ["SparseMomentum", "prune_rate_at", "apportion"]

GROWTH = ("momentum", "random", "gradient")
PRUNE = ("magnitude", "set")
REDISTRIBUTION = ("momentum", "magnitude", "nonzeros", "none")
DECAY = ("cosine", "linear", "constant")
SUPPORTED_OPTIMIZERS = "torch.optim.SGD (momentum > 0, Nesterov or not), Adam, AdamW and their sparsemom_ext.optim versions"


def _check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def prune_rate_at(step: int, total_steps: Optional[int], initial: float, final: float, decay: str) -> float:
    """Prune rate at ``step`` of ``total_steps``: cosine or linear decay from ``initial`` to ``final``.

    ``constant`` (or no ``total_steps``) keeps ``initial``. Past ``total_steps`` the rate stays ``final``.
    """
    if decay == "constant" or not total_steps:
        return initial
    progress = min(max(step / total_steps, 0.0), 1.0)
    if decay == "cosine":
        return final + 0.5 * (initial - final) * (1.0 + math.cos(math.pi * progress))
    return initial + (final - initial) * progress


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


@dataclass
class _SparseWeight:
    name: str
    param: torch.nn.Parameter
    mask: torch.Tensor


@dataclass
class UpdateRecord:
    """What one topology update did to one layer."""

    step: int
    layer: str
    prune_rate: float
    statistic: float
    pruned: int
    grown: int
    nnz: int
    density: float


@dataclass
class _Schedule:
    prune_rate: float
    final_prune_rate: float
    decay: str
    total_steps: Optional[int]
    update_every: Optional[int]


class SparseMomentum:
    """Sparse momentum: prune by magnitude, redistribute by momentum, grow by momentum.

    Args:
        model: a model whose sparse weights carry masks (see :func:`sparsemom_ext.sparsify`).
        optimizer: the optimizer of ``model``; it must hold every sparse weight. The
            momentum signal is SGD's ``momentum_buffer`` or Adam/AdamW's
            ``exp_avg / (sqrt(exp_avg_sq) + eps)``; needed for ``growth`` or
            ``redistribution`` ``"momentum"``.
        prune_rate: initial fraction p_0 of each layer's active weights pruned per update.
        final_prune_rate: the rate the decay ends at (0.005 as in the paper).
        update_every: update the topology every k optimizer steps; ``None`` (default):
            only at :meth:`end_of_epoch`, as the paper does.
        total_steps: the number of optimizer steps of the run; the decay spans it and no
            update happens at or after it (so the last epoch's end does not update).
        growth: ``"momentum"`` (largest |momentum|), ``"random"`` (SET: uniform among
            inactive, from ``seed``), ``"gradient"`` (RigL: largest |grad| of the last batch).
        prune: ``"magnitude"`` (smallest |w|) or ``"set"`` (closest to zero on each side of zero).
        redistribution: ``"momentum"`` (mean |momentum| over active weights),
            ``"magnitude"`` (mean |w|), ``"nonzeros"`` (keeps layer densities) or
            ``"none"`` (each layer regrows what it pruned).
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` prune-rate schedule.
        seed: seed of the engine's generator (random growth): the same on every process.

    After every update each layer's count is its previous count minus what it pruned
    plus what it grew, the global count is unchanged, no grown position was active
    after pruning, and weights are zero wherever masks are False.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, prune_rate: float = 0.5,
                 update_every: Optional[int] = None, total_steps: Optional[int] = None,
                 growth: str = "momentum", prune: str = "magnitude", redistribution: str = "momentum",
                 decay: str = "cosine", final_prune_rate: float = 0.005, seed: int = 0):
        _check_choice("growth", growth, GROWTH)
        _check_choice("prune", prune, PRUNE)
        _check_choice("redistribution", redistribution, REDISTRIBUTION)
        _check_choice("decay", decay, DECAY)
        for name, value in (("prune_rate", prune_rate), ("final_prune_rate", final_prune_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
        for name, value in (("update_every", update_every), ("total_steps", total_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int; got {value!r}")
        if decay != "constant" and total_steps is None:
            raise ValueError(f"decay={decay!r} needs total_steps (the number of optimizer steps of the run); "
                             "pass total_steps or decay='constant'")
        self.model = model
        self.optimizer = optimizer
        self.growth, self.prune, self.redistribution = growth, prune, redistribution
        self.schedule = _Schedule(float(prune_rate), float(final_prune_rate), decay, total_steps, update_every)
        self.weights = self._find_sparse_weights(model, optimizer)
        self.needs_momentum = growth == "momentum" or redistribution == "momentum"
        if self.needs_momentum:
            self._check_optimizer_kind(optimizer)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.updates = 0
        # One UpdateRecord per layer per update; dataclasses.asdict() gives JSON-ready
        # rows for plotting, format_history() a printable table.
        self.history: List[UpdateRecord] = []

    # ------------------------------------------------------------------ setup checks
    @staticmethod
    def _find_sparse_weights(model, optimizer) -> List[_SparseWeight]:
        csr = [name or "model" for name, m in model.named_modules() if getattr(m, "layout", None) == "csr"]
        if csr:
            raise ValueError(
                f"SparseMomentum works on layout='mask' layers; {', '.join(csr)} "
                "use layout='csr', whose topology updates are not implemented yet: convert them with "
                "layer.to_layout('mask') (or sparsify(..., layout='mask'))"
            )
        weights = [_SparseWeight(name, p, mask_of(p)) for name, p in model.named_parameters()
                   if mask_of(p) is not None]
        if not weights:
            raise ValueError("model has no sparse weights (no parameter carries a mask); "
                             "convert it with sparsemom_ext.sparsify(model, density=...) first")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for w in weights:
            if id(w.param) not in held:
                raise ValueError(f"the optimizer does not hold the sparse weight {w.name!r}; "
                                 "build the optimizer from model.parameters()")
        return weights

    @staticmethod
    def _check_optimizer_kind(optimizer):
        if isinstance(optimizer, torch.optim.SGD):
            for index, group in enumerate(optimizer.param_groups):
                if group["momentum"] == 0:
                    raise ValueError(f"SGD param_groups[{index}] has momentum=0, so there is no momentum "
                                     "to grow or redistribute by; use momentum > 0, or growth='random' / "
                                     f"'gradient' with redistribution other than 'momentum'. Supported: {SUPPORTED_OPTIMIZERS}")
        elif not isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
            raise ValueError(f"{type(optimizer).__name__} keeps no momentum the engine can read; "
                             f"supported optimizers: {SUPPORTED_OPTIMIZERS}")

    # ------------------------------------------------------------------ signals
    def _momentum(self, w: _SparseWeight) -> torch.Tensor:
        state = self.optimizer.state.get(w.param, {})
        if isinstance(self.optimizer, torch.optim.SGD):
            buf = state.get("momentum_buffer")
            if buf is None:
                raise RuntimeError(f"no momentum for {w.name!r} yet: call optimizer.step() before the first "
                                   "topology update")
            return buf
        if "exp_avg" not in state:
            raise RuntimeError(f"no Adam moments for {w.name!r} yet: call optimizer.step() before the first "
                               "topology update")
        eps = next(g["eps"] for g in self.optimizer.param_groups if any(p is w.param for p in g["params"]))
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + eps)

    def _statistic(self, w: _SparseWeight, momentum: Optional[torch.Tensor]) -> float:
        nnz = int(w.mask.sum())
        if nnz == 0:
            return 0.0
        if self.redistribution == "momentum":
            return float(momentum.abs()[w.mask].mean())
        if self.redistribution == "magnitude":
            return float(w.param.detach().abs()[w.mask].mean())
        return float(nnz)  # nonzeros; unused for "none"

    def _growth_score(self, w: _SparseWeight, momentum: Optional[torch.Tensor]) -> torch.Tensor:
        if self.growth == "momentum":
            return momentum
        if self.growth == "gradient":
            if w.param.grad is None:
                raise RuntimeError(f"growth='gradient' needs the gradient of {w.name!r}, which is None: update "
                                   "before optimizer.zero_grad()")
            return w.param.grad
        # random: i.i.d. uniform scores from the engine's generator pick a uniform subset.
        return torch.rand(w.mask.shape, generator=self.generator).to(w.mask.device)

    # ------------------------------------------------------------------ stepping
    def prune_rate(self) -> float:
        """The prune rate p_t at the current step."""
        s = self.schedule
        return prune_rate_at(self.steps, s.total_steps, s.prune_rate, s.final_prune_rate, s.decay)

    def _before_end(self) -> bool:
        return self.schedule.total_steps is None or self.steps < self.schedule.total_steps

    def step(self) -> None:
        """Call after ``optimizer.step()``: re-applies the masks and updates every ``update_every`` steps."""
        from ..optim import _MaskedStepMixin

        if not isinstance(self.optimizer, _MaskedStepMixin):  # the fused optimizers mask already
            with torch.no_grad():
                for w in self.weights:
                    ops.mask_apply_(w.param.data, w.mask)
        self.steps += 1
        every = self.schedule.update_every
        if every is not None and self.steps % every == 0 and self._before_end():
            self.update()

    def end_of_epoch(self) -> None:
        """Call at the end of each epoch: updates the topology (unless ``update_every`` is set or the run is over)."""
        if self.schedule.update_every is None and self._before_end():
            self.update()

    @torch.no_grad()
    def update(self) -> List[UpdateRecord]:
        """Prune, redistribute and grow now; returns (and appends to ``history``) one record per layer.

        Everything is computed before anything is written, so an error leaves masks and
        weights as they were.
        """
        rate = self.prune_rate()
        counts = [int(w.mask.sum()) for w in self.weights]
        momenta = [self._momentum(w) if self.needs_momentum else None for w in self.weights]
        stats = [self._statistic(w, m) for w, m in zip(self.weights, momenta)]
        total_stat = sum(stats)
        shares = [s / total_stat if total_stat > 0 else 0.0 for s in stats]
        n_prune = [math.ceil(rate * c) for c in counts]
        pruned_masks = []
        for w, k in zip(self.weights, n_prune):
            prune_op = ops.magnitude_prune if self.prune == "magnitude" else ops.set_prune
            pruned_masks.append(prune_op(w.param.detach(), w.mask, k))
        free = [w.mask.numel() - (c - k) for w, c, k in zip(self.weights, counts, n_prune)]
        if self.redistribution == "none":
            n_grow = list(n_prune)
        else:
            n_grow = apportion(sum(n_prune), shares, free)
        new_masks = [ops.momentum_grow(self._growth_score(w, m), pm, g)
                     for w, m, pm, g in zip(self.weights, momenta, pruned_masks, n_grow)]
        records = []
        for w, new_mask, stat, k, g in zip(self.weights, new_masks, shares, n_prune, n_grow):
            w.mask.copy_(new_mask)  # in place: layers and optimizers keep the same mask tensor
            ops.mask_apply_(w.param.data, w.mask)  # pruned weights to 0; grown ones are 0 already
            nnz = int(w.mask.sum())
            records.append(UpdateRecord(self.steps, w.name, rate, stat, k, g, nnz, nnz / w.mask.numel()))
        self.updates += 1
        self.history.extend(records)
        return records

    def format_history(self, last: Optional[int] = None) -> str:
        """The per-layer log of the topology updates as an aligned table (``last`` updates only)."""
        records = self.history[-last * len(self.weights):] if last else self.history
        header = ("step", "layer", "prune_rate", "statistic", "pruned", "grown", "nnz", "density")
        rows = [(str(r.step), r.layer, f"{r.prune_rate:.4f}", f"{r.statistic:.4f}", str(r.pruned),
                 str(r.grown), str(r.nnz), f"{r.density:.4f}") for r in records]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict:
        """Masks, counters, schedule and generator: enough for a resumed run to continue identically."""
        return {
            "steps": self.steps,
            "updates": self.updates,
            "masks": {w.name: w.mask.clone() for w in self.weights},
            "generator": self.generator.get_state(),
            "schedule": vars(self.schedule).copy(),
            "options": {"growth": self.growth, "prune": self.prune, "redistribution": self.redistribution},
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore what :meth:`state_dict` saved (masks are copied into the layers' own mask tensors)."""
        names = {w.name for w in self.weights}
        if set(state["masks"]) != names:
            raise ValueError(f"state_dict masks are for layers {sorted(state['masks'])}, this engine has {sorted(names)}")
        for w in self.weights:
            saved = state["masks"][w.name]
            if saved.shape != w.mask.shape:
                raise ValueError(f"state_dict mask of {w.name!r} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(w.mask.shape)}")
        with torch.no_grad():
            for w in self.weights:
                w.mask.copy_(state["masks"][w.name])
                ops.mask_apply_(w.param.data, w.mask)
        self.steps = state["steps"]
        self.updates = state["updates"]
        self.generator.set_state(state["generator"])
        self.schedule = _Schedule(**state["schedule"])
        self.growth = state["options"]["growth"]
        self.prune = state["options"]["prune"]
        self.redistribution = state["options"]["redistribution"]
