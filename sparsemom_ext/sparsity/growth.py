"""Growth: where a layer may grow at an update, with what score and what starting state.

Each growth method is a class answering the same question for one layer view at one
update, with a :class:`GrowthPool`:

- :class:`MomentumGrowth`: sparse momentum. Mask layout: the optimizer's momentum of
  every inactive weight (exact; the weight gradient is dense every step). csr layout:
  a candidate set drawn ``window`` steps before each update, whose gradients are
  accumulated (SDDMM) into optimizer-like momentum; grown candidates start with it.
- :class:`RandomGrowth`: SET, uniform among the inactive positions, from the engine's generator.
- :class:`GradientGrowth`: RigL, the largest |weight gradient| of the update's step.
- :class:`GseGrowth`: GSE, candidates drawn at the update (csr layout: one step before it;
  uniform or GraBo), their gradient of the update's step computed at the candidates only.

What a growth reads from a csr layer's batches (candidate gradients, the dense weight
gradient, GraBo's factors) comes from its gradient tap (:mod:`.taps`), armed by the
engine for the steps that need it (:meth:`Growth.taps_for`).

A pool is chosen from with :meth:`GrowthPool.select` (layer scope) or offers its scored
positions to :meth:`GrowthPool.scored` (global scope).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .. import ops
from ..csr_structure import structure_from_flat
from .connectivity import best_per_row
from .distributed import RankGroup
from .sampling import sample_inactive
from .signals import OptimizerFamily

__all__ = ["GROWTHS", "GrowthPool", "candidate_count", "keep_after_prune", "make_growth", "top_scores"]


def top_scores(scores: torch.Tensor, k: int, excluded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool over ``scores``: True for the ``k`` largest |score| (ties to the lower index),
    none where ``excluded`` (bool, or None) is True."""
    if excluded is None:
        return ops.momentum_grow(scores, torch.zeros(scores.shape, dtype=torch.bool, device=scores.device), k)
    return ops.momentum_grow(scores, excluded, k) & ~excluded


def keep_after_prune(values: torch.Tensor, k: int, prune: str) -> torch.Tensor:
    """Bool over ``values`` (active weights, flat order): False for the ``k`` pruned ones."""
    eligible = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    prune_op = ops.magnitude_prune if prune == "magnitude" else ops.set_prune
    return prune_op(values, eligible, k)


def candidate_count(gamma: float, nnz: int) -> int:
    """GSE's candidate-set size ``ceil(gamma * |A|)``."""
    return math.ceil(gamma * nnz)


def _dense_from_flat(flat: torch.Tensor, shape, device) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask.view(-1)[flat.to(device)] = True
    return mask


class GrowthPool:
    """Where one layer may grow at one update. ``limit``: the most it can grow (None: no
    limit but its free positions), known before pruning so the layer prunes no more.
    ``may_regrow``: whether it may choose a position pruned in the same update."""

    limit: Optional[int] = None
    may_regrow = True

    def select(self, kept_flat: torch.Tensor, k: int) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """The ``k`` positions to grow (sorted flat indices, none in ``kept_flat``) and the
        optimizer state each starts with (key -> one entry per position), or None."""
        raise NotImplementedError

    def scored(self, kept_flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Every growable position (sorted, none in ``kept_flat``), its score and its starting state."""
        raise NotImplementedError

    def row_picks(self, rows: torch.Tensor, n_cols: int, generator: torch.Generator
                  ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]], torch.Tensor]:
        """The connectivity rule's growth: for ``rows`` (sorted), each left without a weight by
        pruning, the one position of that row this growth offers first. Returns the positions
        (sorted flat indices, at most one per row), their starting state (or None) and the
        rows it offers none in (the engine keeps their largest weight unpruned instead)."""
        raise NotImplementedError


@dataclass
class CandidatePool(GrowthPool):
    """Candidates drawn among the positions inactive before pruning (never kept ones)."""

    positions: torch.Tensor
    score: torch.Tensor
    start_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    may_regrow = False

    @property
    def limit(self) -> int:
        return self.positions.numel()

    def _free(self, kept_flat):
        # Candidates are never kept; kept_flat can hold the rule's picks among them.
        return ~torch.isin(self.positions, kept_flat.to(self.positions.device))

    def select(self, kept_flat, k):
        chosen = top_scores(self.score, k, excluded=~self._free(kept_flat))
        return self.positions[chosen], {key: t[chosen] for key, t in self.start_state.items()}

    def scored(self, kept_flat):
        free = self._free(kept_flat)
        return self.positions[free], self.score[free], {key: t[free] for key, t in self.start_state.items()}

    def row_picks(self, rows, n_cols, generator):
        # The best candidate of each row; a row without one (a csr window drawn before the
        # update, or gse's draw, found none there) gets no position from this pool.
        best = best_per_row(torch.div(self.positions, n_cols, rounding_mode="floor"), self.score, rows)
        missing = rows[~torch.isin(rows, torch.div(self.positions[best], n_cols, rounding_mode="floor"))]
        return self.positions[best], {key: t[best] for key, t in self.start_state.items()}, missing


@dataclass
class DenseScorePool(GrowthPool):
    """A score for every position of the layer (mask layout momentum / RigL, csr RigL):
    the free positions after pruning (pruned ones included) compete."""

    score: torch.Tensor

    def _kept_mask(self, kept_flat):
        return _dense_from_flat(kept_flat, self.score.shape, self.score.device)

    def select(self, kept_flat, k):
        kept = self._kept_mask(kept_flat)
        grown = ops.momentum_grow(self.score, kept, k) & ~kept
        return grown.reshape(-1).nonzero().reshape(-1), None

    def scored(self, kept_flat):
        positions = (~self._kept_mask(kept_flat)).reshape(-1).nonzero().reshape(-1)
        return positions, self.score.reshape(-1)[positions], {}

    def row_picks(self, rows, n_cols, generator):
        # The rows are empty after pruning: every position of each competes (pruned ones too).
        rows = rows.to(self.score.device)
        best = self.score.reshape(-1, n_cols)[rows].abs().argmax(dim=1)  # ties: the first
        return rows * n_cols + best, None, rows[:0]


@dataclass
class RandomPool(GrowthPool):
    """SET: uniform among the free positions after pruning, from the engine's generator."""

    n_rows: int
    n_cols: int
    generator: torch.Generator

    def select(self, kept_flat, k):
        grown = sample_inactive(self.n_rows, self.n_cols, kept_flat.cpu(), k, self.generator)
        return grown.to(kept_flat.device), None

    def scored(self, kept_flat):
        raise ValueError("random growth has no scores to compare across layers (scope='global')")

    def row_picks(self, rows, n_cols, generator):
        cols = torch.randint(n_cols, (rows.numel(),), generator=generator).to(rows.device)
        return rows * n_cols + cols, None, rows[:0]


class CandidateSampler:
    """Draws candidate positions among a layer's inactive ones: ``"uniform"``, or
    ``"grabo"`` (probability of (out i, in j) proportional to the summed |output gradient
    i| times the summed |input j| of a step's batches: an O(|S|) product distribution).
    Under torch.distributed the factors are summed over the ranks' batches, so every rank
    draws the same candidates from the same generator."""

    def __init__(self, sampling: str, gamma: float, generator: torch.Generator, ranks: RankGroup):
        self.sampling, self.gamma, self.generator, self.ranks = sampling, gamma, generator, ranks

    def needs_batches(self) -> bool:
        return self.sampling == "grabo"

    def draw(self, view, flat: torch.Tensor, tapped: Dict, before_any_batch: bool = False) -> torch.Tensor:
        """Candidates for ``view`` (active positions ``flat``); GraBo reads the factors in
        ``tapped``, the layer's signals of the step just made (``before_any_batch``: there is
        none yet, the draw is uniform)."""
        count = candidate_count(self.gamma, flat.numel())
        factors = ()
        if self.sampling == "grabo" and not before_any_batch:
            factors = _tapped(tapped, "factors", view, "GraBo's factors")
            self.ranks.sum_(factors)
        return sample_inactive(view.n_rows, view.n_cols, flat.cpu(), count, self.generator, *factors).to(flat.device)


def _tapped(tapped: Dict, key: str, view, what: str):
    """``tapped[key]``, or a RuntimeError saying why the engine does not have it."""
    if key not in tapped:
        raise RuntimeError(
            f"{what} of {view.name!r} were not tapped from the step before this update: the engine taps a "
            "layer's batches on the steps its schedule needs them (after engine.step() or end_of_epoch() "
            "arms the next step), so update through engine.step() / end_of_epoch() with a forward and "
            "backward pass before each step, keep steps_per_epoch true to the loop, and do not call "
            "engine.remove_hooks() before an update")
    return tapped[key]


class Growth:
    """One growth method. ``pool(view, tapped)`` is its answer for a layer at an update;
    ``tapped`` holds the layer's signals from the step just made (see :meth:`taps_for`)."""

    name: str

    def __init__(self, family: Optional[OptimizerFamily], sampler: CandidateSampler, generator: torch.Generator,
                 ranks: RankGroup, window: int):
        self.family, self.sampler, self.generator, self.ranks = family, sampler, generator, ranks
        # Candidate windows, by layer name: open from a window's start to the update that
        # consumes them (csr momentum and gse; the engine drives them).
        self.windows: Dict[str, "CandidateWindow"] = {}
        self.window_length = window

    def taps_for(self, view, may_update: bool, window_may_open: bool) -> Tuple[bool, bool]:
        """``(dense, grabo)``: whether the layer's next step must tap its dense weight gradient
        and GraBo's factors, given whether an update and whether a window opening may follow
        it. (A layer's open window is tapped at its candidates whatever the growth.)"""
        return False, False

    def pool(self, view, tapped: Dict) -> GrowthPool:
        raise NotImplementedError

    def before_update(self, views) -> None:
        """Called by the engine with its layer views after each step and before each update."""

    def window_layers(self, views) -> list:
        """The views that keep candidate windows."""
        return []

    def window_keys(self) -> Tuple[str, ...]:
        """The per-candidate state a window keeps (saved in the engine's state_dict)."""
        return ()

    def open_window(self, view, tapped: Dict, before_any_batch: bool = False) -> None:
        """A new candidate set for ``view``, drawn now among its inactive positions."""
        positions = self.sampler.draw(view, view.active_flat(), tapped, before_any_batch)
        device = view.param.device
        positions = positions.to(device)
        row_ptr, col_idx = structure_from_flat(positions, view.n_rows, view.n_cols)
        state = self.family.new_window_state(positions.numel(), view.param) if self.window_keys() else {}
        self.windows[view.name] = CandidateWindow(positions, row_ptr, col_idx, state)

    def receive(self, name: str, at: torch.Tensor) -> None:
        """A step's gradient at the candidates of ``name``'s window (summed over its backward passes)."""
        self.windows[name].step_gradient = at

    def _window_of(self, view) -> "CandidateWindow":
        window = self.windows.get(view.name)
        if window is None:
            raise RuntimeError(
                f"growth={self.name!r} on the csr layer {view.name!r} has no candidate window open, so no training "
                "batch has given its candidates' gradients: the engine opens a window before each update its "
                "schedule expects (update_every / steps_per_epoch) and taps the steps in it: call engine.step() "
                "after every optimizer step and check steps_per_epoch")
        return window

    def window_state_dict(self) -> Dict:
        return {name: {"flat": w.flat.clone(), "state": {k: t.clone() for k, t in w.state.items()}}
                for name, w in self.windows.items()}

    def windows_from_state_dict(self, saved: Dict, views_by_name) -> Dict[str, "CandidateWindow"]:
        """The windows :meth:`window_state_dict` saved, rebuilt (nothing is installed)."""
        unknown = sorted(set(saved) - set(views_by_name))
        if unknown:
            raise ValueError(f"state_dict has candidate windows of layers this engine does not have: {unknown}")
        windows = {}
        for name, entry in saved.items():
            view = views_by_name[name]
            device = view.param.device
            flat = entry["flat"].to(device)
            row_ptr, col_idx = structure_from_flat(flat, view.n_rows, view.n_cols)
            windows[name] = CandidateWindow(flat, row_ptr, col_idx,
                                            {k: t.to(device) for k, t in entry["state"].items()})
        return windows


class RandomGrowth(Growth):
    name = "random"

    def pool(self, view, tapped):
        return RandomPool(view.n_rows, view.n_cols, self.generator)


class GradientGrowth(Growth):
    """RigL. Mask layout: the weight's own gradient; csr layout: the dense weight gradient
    tapped on the step before an update only, averaged over the ranks."""

    name = "gradient"

    def taps_for(self, view, may_update, window_may_open):
        return not view.dense_gradient and may_update, False

    def pool(self, view, tapped):
        if view.dense_gradient:
            if view.param.grad is None:
                raise RuntimeError(f"growth='gradient' needs the gradient of {view.name!r}, which is None: update "
                                   "before optimizer.zero_grad()")
            return DenseScorePool(view.param.grad)
        grad = _tapped(tapped, "dense", view, "The dense weight gradient")
        self.ranks.mean_([grad])
        return DenseScorePool(grad)


class GseGrowth(Growth):
    """GSE. Mask layout: candidates drawn at the update, scored by the weight's own gradient
    there. csr layout: a one-step window: the candidates are drawn after the step before the
    update (GraBo: from that step's factors) and their gradient is tapped on the update's step."""

    name = "gse"

    def __init__(self, *args):
        super().__init__(*args)
        self.window_length = 1

    def window_layers(self, views):
        return [v for v in views if not v.dense_gradient]

    def taps_for(self, view, may_update, window_may_open):
        grabo = self.sampler.needs_batches() and (window_may_open if not view.dense_gradient else may_update)
        return False, grabo

    def before_update(self, views) -> None:
        """Average the windows' step gradients over the ranks (one collective); each window
        scores its candidates by the latest."""
        pending = [w for w in self.windows.values() if w.step_gradient is not None]
        if pending:
            self.ranks.mean_([w.step_gradient for w in pending])
            for window in pending:
                window.gradient, window.step_gradient = window.step_gradient, None

    def pool(self, view, tapped):
        if view.dense_gradient:
            positions = self.sampler.draw(view, view.active_flat(), tapped)
            if view.param.grad is None:
                raise RuntimeError(f"growth='gse' needs the gradient of {view.name!r}, which is None: update "
                                   "before optimizer.zero_grad()")
            return CandidatePool(positions, view.param.grad.reshape(-1)[positions.to(view.param.device)])
        window = self._window_of(view)
        if window.gradient is None:
            raise RuntimeError(f"growth='gse' on the csr layer {view.name!r}: no backward pass went through it "
                               "since its candidates were drawn: run a forward and backward pass before the update")
        return CandidatePool(window.flat, window.gradient)


@dataclass
class CandidateWindow:
    """One csr layer's candidate set (sorted flat indices and their CSR structure, which its
    tap computes gradients at), the momentum state accumulated for them (csr momentum), the
    gradient of the current step (summed over its backward passes) and, for gse, the last
    step's gradient."""

    flat: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    state: Dict[str, torch.Tensor]
    step_gradient: Optional[torch.Tensor] = None
    gradient: Optional[torch.Tensor] = None


class MomentumGrowth(Growth):
    """Sparse momentum: dense momentum in the mask layout, candidate windows in the csr layout."""

    name = "momentum"

    def window_layers(self, views):
        return [v for v in views if not v.dense_gradient]

    def window_keys(self):
        return tuple(sorted(self.family.window_keys))

    def taps_for(self, view, may_update, window_may_open):
        return False, not view.dense_gradient and self.sampler.needs_batches() and window_may_open

    def pool(self, view, tapped):
        if view.dense_gradient:
            return DenseScorePool(self.family.momentum(view.param, view.name))
        window = self._window_of(view)
        return CandidatePool(window.flat, self.family.window_signal(window.state, view.param), window.state)

    @torch.no_grad()
    def before_update(self, views) -> None:
        """Fold each window's step gradient into its momentum, as the optimizer does once per
        step with the weights' gradient (averaged over the ranks first, in one collective)."""
        pending = [(name, w) for name, w in self.windows.items() if w.step_gradient is not None]
        if not pending:
            return
        self.ranks.mean_([w.step_gradient for _, w in pending])
        params = {view.name: view.param for view in views}
        for name, window in pending:
            self.family.accumulate(window.state, window.step_gradient, params[name])
            window.step_gradient = None


GROWTHS = {cls.name: cls for cls in (MomentumGrowth, RandomGrowth, GradientGrowth, GseGrowth)}


def make_growth(name: str, family, sampler, generator, ranks: RankGroup, window: int) -> Growth:
    return GROWTHS[name](family, sampler, generator, ranks, window)
