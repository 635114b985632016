"""Growth: where a layer may grow at an update, with what score and what starting state.

Each growth method is a class answering the same question for one layer view at one
update, with a :class:`GrowthPool`:

- :class:`MomentumGrowth`: sparse momentum. Mask layout: the optimizer's momentum of
  every inactive weight (exact; the weight gradient is dense every step). csr layout:
  a candidate set drawn ``window`` steps before each update, whose gradients are
  accumulated (SDDMM) into optimizer-like momentum; grown candidates start with it.
- :class:`RandomGrowth`: SET, uniform among the inactive positions, from the engine's generator.
- :class:`GradientGrowth`: RigL, the largest |weight gradient| of the last batch.
- :class:`GseGrowth`: GSE, candidates drawn on the update step (uniform or GraBo), their
  gradient of the last batch computed at the candidates only.

A pool is chosen from with :meth:`GrowthPool.select` (layer scope) or offers its scored
positions to :meth:`GrowthPool.scored` (global scope).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .. import ops
from ..csr_structure import structure_from_flat
from .distributed import RankGroup
from .sampling import grabo_factors, sample_inactive
from .signals import OptimizerFamily
from .views import BatchProbe, last_batch

__all__ = ["GROWTHS", "GrowthPool", "candidate_count", "keep_after_prune", "make_growth", "top_scores"]


def top_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool over ``scores``: True for the ``k`` largest |score| (ties to the lower index)."""
    return ops.momentum_grow(scores, torch.zeros(scores.shape, dtype=torch.bool, device=scores.device), k)


def keep_after_prune(values: torch.Tensor, k: int, prune: str, protected: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """Bool over ``values`` (active weights, flat order): False for the ``k`` pruned ones.

    ``protected`` (bool over ``values``, or None): weights that are never pruned (the
    connectivity rule's); ``k`` is then at most the number of the others."""
    eligible = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if protected is not None:
        eligible &= ~protected.to(values.device)
    prune_op = ops.magnitude_prune if prune == "magnitude" else ops.set_prune
    keep = prune_op(values, eligible, k)
    return keep if protected is None else keep | protected.to(values.device)


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
        """Every growable position (sorted), its score and its starting state."""
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

    def select(self, kept_flat, k):
        chosen = top_scores(self.score, k)
        return self.positions[chosen], {key: t[chosen] for key, t in self.start_state.items()}

    def scored(self, kept_flat):
        return self.positions, self.score, self.start_state


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


class CandidateSampler:
    """Draws candidate positions among a layer's inactive ones: ``"uniform"``, or
    ``"grabo"`` (probability of (out i, in j) proportional to the summed |output gradient
    i| times the summed |input j| of the last batch: an O(|S|) product distribution).
    Under torch.distributed the factors are summed over the ranks' batches, so every rank
    draws the same candidates from the same generator."""

    def __init__(self, sampling: str, gamma: float, generator: torch.Generator, ranks: RankGroup):
        self.sampling, self.gamma, self.generator, self.ranks = sampling, gamma, generator, ranks

    def needs_batches(self) -> bool:
        return self.sampling == "grabo"

    def draw(self, view, flat: torch.Tensor, probe: Optional[BatchProbe]) -> torch.Tensor:
        count = candidate_count(self.gamma, flat.numel())
        factors = ()
        if self.sampling == "grabo":
            x, grad_out = last_batch(probe, view.name)
            factors = grabo_factors(view.module, x, grad_out)
            self.ranks.sum_(factors)
        return sample_inactive(view.n_rows, view.n_cols, flat.cpu(), count, self.generator, *factors).to(flat.device)


class Growth:
    """One growth method. ``pool(view, probe)`` is its answer for a layer at an update."""

    name: str

    def __init__(self, family: Optional[OptimizerFamily], sampler: CandidateSampler, generator: torch.Generator,
                 ranks: RankGroup):
        self.family, self.sampler, self.generator, self.ranks = family, sampler, generator, ranks
        # Candidate windows, by layer name: open between a window's start and the update
        # that consumes them (csr momentum only; the engine drives them).
        self.windows: Dict[str, "CandidateWindow"] = {}

    def keeps_last_batch(self, view) -> bool:
        """Whether the layer's probe must keep its last batch for this growth."""
        return False

    def pool(self, view, probe: Optional[BatchProbe]) -> GrowthPool:
        raise NotImplementedError

    def batch_gradient(self, view, probe: Optional[BatchProbe], positions: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """The weight gradient of the last batch at ``positions`` (None: dense), the same on
        every rank: a mask-layout weight's gradient is DDP's average already, a csr layer's
        is computed from this rank's batch and averaged here."""
        if positions is None:
            grad = view.dense_batch_gradient(probe)
        else:
            grad = view.batch_gradient_at(probe, positions)
        if not view.dense_gradient:
            self.ranks.mean_([grad])
        return grad

    def before_update(self, views) -> None:
        """Called by the engine with its layer views after each step and before each update."""

    def window_layers(self, views) -> list:
        """The views that accumulate candidate windows."""
        return []

    def open_window(self, view, probe: Optional[BatchProbe]) -> None:
        raise NotImplementedError(f"growth {self.name!r} keeps no candidate windows")

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

    def pool(self, view, probe):
        return RandomPool(view.n_rows, view.n_cols, self.generator)


class GradientGrowth(Growth):
    name = "gradient"

    def keeps_last_batch(self, view):
        return not view.dense_gradient

    def pool(self, view, probe):
        if view.dense_gradient and view.param.grad is None:
            raise RuntimeError(f"growth='gradient' needs the gradient of {view.name!r}, which is None: update "
                               "before optimizer.zero_grad()")
        return DenseScorePool(self.batch_gradient(view, probe))


class GseGrowth(Growth):
    name = "gse"

    def keeps_last_batch(self, view):
        return not view.dense_gradient or self.sampler.needs_batches()

    def pool(self, view, probe):
        positions = self.sampler.draw(view, view.active_flat(), probe)
        return CandidatePool(positions, self.batch_gradient(view, probe, positions))


@dataclass
class CandidateWindow:
    """One csr layer's candidate set (sorted flat indices and their CSR structure, for the
    SDDMM), the momentum state accumulated for them, and the gradient of the current step
    (summed over its backward passes; folded into the state once per step)."""

    flat: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    state: Dict[str, torch.Tensor]
    step_gradient: Optional[torch.Tensor] = None


class MomentumGrowth(Growth):
    """Sparse momentum: dense momentum in the mask layout, candidate windows in the csr layout."""

    name = "momentum"

    def window_layers(self, views):
        return [v for v in views if not v.dense_gradient]

    def keeps_last_batch(self, view):
        return not view.dense_gradient and self.sampler.needs_batches()

    def pool(self, view, probe):
        if view.dense_gradient:
            return DenseScorePool(self.family.momentum(view.param, view.name))
        window = self.windows.get(view.name)
        if window is None:
            raise RuntimeError(
                f"growth='momentum' on the csr layer {view.name!r} has no candidate window open: the engine "
                "opens it `window` steps before each update it expects (update_every / steps_per_epoch): call "
                "engine.step() after every optimizer step and check steps_per_epoch")
        return CandidatePool(window.flat, self.family.window_signal(window.state, view.param), window.state)

    def open_window(self, view, probe: Optional[BatchProbe]) -> None:
        positions = self.sampler.draw(view, view.active_flat(), probe)
        device = view.param.device
        positions = positions.to(device)
        row_ptr, col_idx = structure_from_flat(positions, view.n_rows, view.n_cols)
        self.windows[view.name] = CandidateWindow(positions, row_ptr, col_idx,
                                                  self.family.new_window_state(positions.numel(), view.param))

    @torch.no_grad()
    def accumulate(self, view, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Backward hook of a csr layer: the candidates' gradient (the layer's SDDMM at the
        window's structure), summed over the step's backward passes as the weights' gradients are."""
        window = self.windows.get(view.name)
        if window is None:
            return
        grad = view.module.batch_weight_grad_at(x, grad_out, window.row_ptr, window.col_idx)
        if window.step_gradient is None:
            window.step_gradient = grad
        else:
            window.step_gradient += grad

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


def make_growth(name: str, family, sampler, generator, ranks: RankGroup) -> Growth:
    return GROWTHS[name](family, sampler, generator, ranks)
