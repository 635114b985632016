"""The dynamic-sparsity engine: sparse momentum, SET, RigL and GSE, in the mask and csr layouts.

Usage::

    model = sm.sparsify(model, density=0.05)                 # or layout="csr": always sparse
    optimizer = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    engine = sm.SparseMomentum(model, optimizer, total_steps=epochs * len(loader),
                               steps_per_epoch=len(loader))
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(); loss_fn(model(x), y).backward()
            optimizer.step(); engine.step()
        engine.end_of_epoch()

The engine is an explicit object the user steps; it patches nothing (it adds forward
hooks to the layers whose growth signal needs their batches). Its sparse weights are
the parameters of ``model`` that carry a mask (:func:`sparsemom_ext.attach_mask`, done
by SparseLinear / SparseConv2d / sparsify) and the ``values`` of csr-layout SparseLinear
layers. The algorithm is ALGORITHMS.md sections 1-3 (Dettmers & Zettlemoyer 2019; Heddes
et al., GSE): prune ``ceil(p_t * nnz_l)`` weights per layer, redistribute the freed budget
over layers by a statistic, grow it back by a score, so each layer's count changes only
by redistribution and the global count never drifts.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import ops
from .layer_views import (BatchProbe, CsrLayer, MaskLayer, candidate_count, keep_after_prune, last_batch,
                          top_scores)
from .masks import mask_of
from .sampling import SAMPLINGS, grabo_factors, sample_inactive
from .topology import relayout_plan, structure_from_flat

__all__ = ["SparseMomentum", "UpdateRecord", "prune_rate_at", "apportion"]

GROWTH = ("momentum", "random", "gradient", "gse")
PRUNE = ("magnitude", "set")
REDISTRIBUTION = ("momentum", "magnitude", "nonzeros", "none")
DECAY = ("cosine", "linear", "constant")
SCOPES = ("layer", "global")
SUPPORTED_OPTIMIZERS = "torch.optim.SGD (momentum > 0, Nesterov or not), Adam, AdamW and their sparsemom_ext.optim versions"
CSR_OPTIMIZERS = "torch.optim.SGD (with or without momentum, Nesterov or not), Adam, AdamW and their sparsemom_ext.optim versions"


def _check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


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
    decay_end: float = 1.0
    steps_per_epoch: Optional[int] = None


@dataclass
class _CandidateWindow:
    """One csr layer's candidate set (sorted flat indices and their CSR structure, for the
    SDDMM) and the momentum state accumulated for them."""

    flat: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    state: Dict[str, torch.Tensor]


@dataclass
class _CandidatePool:
    """Where candidate-based growth may grow in one layer at an update: the candidates
    (sorted flat indices), their scores, and the optimizer state each would start with."""

    flat: torch.Tensor
    score: torch.Tensor
    grown_state: Dict[str, torch.Tensor]



class SparseMomentum:
    """Dynamic sparse training: prune by magnitude, redistribute, grow by momentum (or SET/RigL/GSE).

    Args:
        model: a model whose sparse weights carry masks or are csr-layout SparseLinear
            layers (see :func:`sparsemom_ext.sparsify`); both layouts may be mixed.
        optimizer: the optimizer of ``model``; it must hold every sparse weight. The
            momentum signal is SGD's ``momentum_buffer`` or Adam/AdamW's
            ``exp_avg / (sqrt(exp_avg_sq) + eps)``; needed for ``growth`` or
            ``redistribution`` ``"momentum"``. csr-layout layers need SGD, Adam or AdamW
            (their state is re-laid out when the topology changes).
        prune_rate: initial fraction p_0 of each layer's active weights pruned per update.
        final_prune_rate: the rate the decay ends at (0.005 as in the paper).
        update_every: update the topology every k optimizer steps; ``None`` (default):
            only at :meth:`end_of_epoch`, as the paper does.
        total_steps: the number of optimizer steps of the run; the decay spans it and no
            update happens at or after it (so the last epoch's end does not update).
        growth: how inactive positions are scored, grown largest first:
            ``"momentum"``: sparse momentum. Mask layout: the optimizer's momentum of every
            inactive weight (exact; it needs the dense weight gradient every step). csr
            layout (always sparse): ``window`` steps before each update a candidate set of
            ``ceil(candidates * nnz)`` inactive positions is drawn (``sampling``), their
            gradients are computed each step by SDDMM and accumulated with the optimizer's
            momentum (SGD: ``buf = momentum * buf + (1 - dampening) * grad``; Adam/AdamW:
            both moments), and the candidates with the largest signal grow, starting with
            that accumulated state (the optimizer state of kept weights is kept, that of
            other new positions starts at 0). Uses ``update_every`` or ``steps_per_epoch``
            to know when a window starts; without either, the first epoch's length is
            learnt at its end, and the first window spans that whole epoch.
            ``"random"``: SET, uniform among inactive positions, from ``seed``.
            ``"gradient"``: RigL, the largest |weight gradient| of the last batch (csr
            layout: one dense gradient of the layer, computed on the update step only).
            ``"gse"``: GSE, ``ceil(candidates * nnz)`` inactive candidates drawn on the
            update step (``sampling``), their gradient of the last batch computed at the
            candidates only (SDDMM; nothing of size in x out), the largest grow. A layer
            then prunes at most as many weights as it has candidates.
        prune: ``"magnitude"`` (smallest |w|) or ``"set"`` (closest to zero on each side of zero).
        redistribution: ``"momentum"`` (mean |momentum| over active weights; csr layout:
            the compact optimizer state), ``"magnitude"`` (mean |w|), ``"nonzeros"`` (keeps
            layer densities) or ``"none"`` (each layer regrows what it pruned).
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` prune-rate schedule.
        seed: seed of the engine's generator (random growth, candidate sampling): the same
            on every process.
        steps_per_epoch: the number of ``step()`` calls per epoch; with updates at epoch
            ends it tells csr-layout momentum growth when to open its window (default:
            learnt at the first :meth:`end_of_epoch`).
        decay_end: the fraction of ``total_steps`` at which the decay reaches
            ``final_prune_rate`` (then stays there).
        scope: ``"layer"``: each layer prunes ``ceil(p_t * nnz_l)`` and the budget is
            redistributed; ``"global"``: the ``ceil(p_t * nnz)`` smallest weights of all
            layers are pruned and the same number of the largest scores of all layers
            grow, so layer densities follow the scores (``redistribution`` is not used;
            not with ``"random"`` growth).
        candidates: GSE's gamma, the candidate-set size as a multiple of the layer's nnz.
        sampling: how candidates are drawn: ``"grabo"`` (default: probability of (out i,
            in j) proportional to the summed |output gradient i| times the summed |input j|
            of the last batch) or ``"uniform"``. On MNIST (LeNet-300-100, 5% density, 10
            epochs, 3 seeds) GraBo candidates gave 0.35-0.4 points lower test error than
            uniform ones for both ``gse`` and csr ``momentum``.
        window: steps over which csr-layout momentum growth accumulates its candidates'
            momentum before each update (shorter when updates are closer).

    GSE as in its paper: ``growth="gse", prune_rate=0.2, final_prune_rate=0.0,
    decay_end=0.6, update_every=1000, redistribution="none"`` (``scope="global"`` for
    its global variant).

    After every update each layer's count is its previous count minus what it pruned
    plus what it grew, the global count is unchanged, no grown position was active
    after pruning, and weights are zero wherever masks are False. Growth signals that
    need a layer's batches come from forward hooks the engine adds to those layers
    (:meth:`remove_hooks` takes them off).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, prune_rate: float = 0.5,
                 update_every: Optional[int] = None, total_steps: Optional[int] = None,
                 growth: str = "momentum", prune: str = "magnitude", redistribution: str = "momentum",
                 decay: str = "cosine", final_prune_rate: float = 0.005, seed: int = 0, *,
                 steps_per_epoch: Optional[int] = None, decay_end: float = 1.0, scope: str = "layer",
                 candidates: float = 1.0, sampling: str = "grabo", window: int = 100):
        _check_choice("growth", growth, GROWTH)
        _check_choice("prune", prune, PRUNE)
        _check_choice("redistribution", redistribution, REDISTRIBUTION)
        _check_choice("decay", decay, DECAY)
        _check_choice("scope", scope, SCOPES)
        _check_choice("sampling", sampling, SAMPLINGS)
        for name, value in (("prune_rate", prune_rate), ("final_prune_rate", final_prune_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
        for name, value in (("decay_end", decay_end), ("candidates", candidates)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1e6:
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        if decay_end > 1.0:
            raise ValueError(f"decay_end must be in (0, 1] (a fraction of total_steps); got {decay_end!r}")
        for name, value in (("update_every", update_every), ("total_steps", total_steps),
                            ("steps_per_epoch", steps_per_epoch), ("window", window)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be {'a' if name == 'window' else 'None or a'} positive int; "
                                 f"got {value!r}")
        if decay != "constant" and total_steps is None:
            raise ValueError(f"decay={decay!r} needs total_steps (the number of optimizer steps of the run); "
                             "pass total_steps or decay='constant'")
        if scope == "global" and growth == "random":
            raise ValueError("scope='global' grows by comparing scores across layers; growth='random' has "
                             "none: use scope='layer' or another growth")
        self.model = model
        self.optimizer = optimizer
        self.growth, self.prune, self.redistribution, self.scope = growth, prune, redistribution, scope
        self.candidates, self.sampling, self.window = float(candidates), sampling, window
        self.schedule = _Schedule(float(prune_rate), float(final_prune_rate), decay, total_steps, update_every,
                                  float(decay_end), steps_per_epoch)
        self.weights = self._find_sparse_weights(model, optimizer)
        self.needs_momentum = growth == "momentum" or redistribution == "momentum"
        if self.needs_momentum:
            self._check_optimizer_kind(optimizer)
        if any(w.layout == "csr" for w in self.weights):
            self._check_csr_optimizer(optimizer)
        self._window_layers = [w for w in self.weights if w.layout == "csr" and growth == "momentum"]
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.updates = 0
        self._windows: Dict[str, _CandidateWindow] = {}
        self._probes: Dict[str, BatchProbe] = {}
        self._add_probes()
        # One UpdateRecord per layer per update; dataclasses.asdict() gives JSON-ready
        # rows for plotting, format_history() a printable table.
        self.history: List[UpdateRecord] = []

    # ------------------------------------------------------------------ setup checks
    @staticmethod
    def _find_sparse_weights(model, optimizer) -> List:
        owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        csr_modules = {id(m.values): m for m in model.modules()
                       if getattr(m, "layout", None) == "csr" and isinstance(getattr(m, "values", None), torch.Tensor)}
        weights = []
        for name, p in model.named_parameters():
            if id(p) in csr_modules:
                weights.append(CsrLayer(name, csr_modules[id(p)]))
            elif mask_of(p) is not None:
                weights.append(MaskLayer(name, p, mask_of(p), owners.get(id(p))))
        if not weights:
            raise ValueError("model has no sparse weights (no parameter carries a mask and no layer has "
                             "layout='csr'); convert it with sparsemom_ext.sparsify(model, density=...) first")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for w in weights:
            if id(w.param) not in held:
                raise ValueError(f"the optimizer does not hold the sparse weight {w.name!r}; "
                                 "build the optimizer from model.parameters() (after sparsifying)")
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

    @staticmethod
    def _check_csr_optimizer(optimizer):
        if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
            raise ValueError(f"{type(optimizer).__name__}: the engine re-lays out the optimizer state of "
                             "csr-layout layers when their topology changes and knows how for "
                             f"{CSR_OPTIMIZERS}; use one of them, or the mask layout")

    def _add_probes(self) -> None:
        for w in self.weights:
            keeps_batch = ((w.layout == "csr" and self.growth in ("gradient", "gse"))
                           or (self.sampling == "grabo" and (self.growth == "gse" or w in self._window_layers)))
            accumulates = w in self._window_layers
            if not (keeps_batch or accumulates):
                continue
            if not isinstance(w.module, (torch.nn.Linear, torch.nn.Conv2d)):
                raise ValueError(f"growth={self.growth!r} with sampling={self.sampling!r} reads the batches of "
                                 f"{w.name!r}, which is not the weight of a Linear or Conv2d layer"
                                 + ("; use sampling='uniform'" if w.layout == "mask" and self.growth == "gse" else ""))
            on_batch = (lambda x, g, w=w: self._accumulate_candidates(w, x, g)) if accumulates else None
            self._probes[w.name] = BatchProbe(w.module, keep_last=keeps_batch, on_batch=on_batch)

    def remove_hooks(self) -> None:
        """Take the engine's forward hooks off the layers (the engine cannot update after this
        with a growth that needs them)."""
        for probe in self._probes.values():
            probe.remove()
        self._probes.clear()

    # ------------------------------------------------------------------ signals
    def _group_of(self, param) -> Dict:
        return next(g for g in self.optimizer.param_groups if any(p is param for p in g["params"]))

    def _momentum(self, w) -> torch.Tensor:
        """The momentum signal of ``w``: dense for a mask layer, one entry per nonzero for csr."""
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
        return self._adam_signal(state["exp_avg"], state["exp_avg_sq"], self._group_of(w.param)["eps"])

    @staticmethod
    def _adam_signal(exp_avg, exp_avg_sq, eps):
        return exp_avg / (exp_avg_sq.sqrt() + eps)

    def _statistic(self, w, flat, momentum: Optional[torch.Tensor]) -> float:
        if flat.numel() == 0:
            return 0.0
        if self.redistribution == "momentum":
            return float(w.active_signal(momentum, flat).abs().mean())
        if self.redistribution == "magnitude":
            return float(w.active_values(flat).abs().mean())
        return float(flat.numel())  # nonzeros; unused for "none"

    def _dense_score(self, w, momentum: Optional[torch.Tensor]) -> torch.Tensor:
        """The dense growth score of a mask layer (momentum / gradient / random)."""
        if self.growth == "momentum":
            return momentum
        if self.growth == "gradient":
            if w.param.grad is None:
                raise RuntimeError(f"growth='gradient' needs the gradient of {w.name!r}, which is None: update "
                                   "before optimizer.zero_grad()")
            return w.param.grad
        # random: i.i.d. uniform scores from the engine's generator pick a uniform subset.
        return torch.rand(w.mask.shape, generator=self.generator).to(w.mask.device)

    def _sample_candidates(self, w, flat: torch.Tensor, count: int) -> torch.Tensor:
        if self.sampling == "grabo":
            x, grad_out = last_batch(self._probes.get(w.name), w.name)
            rows, cols = grabo_factors(w.module, x, grad_out)
            return sample_inactive(w.n_rows, w.n_cols, flat, count, self.generator, rows, cols)
        return sample_inactive(w.n_rows, w.n_cols, flat, count, self.generator)

    def _candidate_pool(self, w, flat: torch.Tensor) -> Optional[_CandidatePool]:
        """The candidates ``w`` may grow at (GSE, csr momentum); None for growth by a dense score."""
        if self.growth == "gse":
            positions = self._sample_candidates(w, flat, candidate_count(self.candidates, flat.numel()))
            positions = positions.to(flat.device)
            return _CandidatePool(positions, w.batch_gradient_at(self._probes.get(w.name), positions), {})
        if w in self._window_layers:
            window = self._windows.get(w.name)
            if window is None:
                raise RuntimeError(
                    f"growth='momentum' on the csr layer {w.name!r} has no candidate window open: the engine "
                    f"opens it {self.window} steps before each update it expects (update_every / "
                    "steps_per_epoch): call engine.step() after every optimizer step and check steps_per_epoch")
            if isinstance(self.optimizer, torch.optim.SGD):
                score = window.state["momentum_buffer"]
            else:
                score = self._adam_signal(window.state["exp_avg"], window.state["exp_avg_sq"],
                                          self._group_of(w.param)["eps"])
            return _CandidatePool(window.flat, score, window.state)
        return None

    # ------------------------------------------------------------------ candidate windows
    def _open_windows(self) -> None:
        for w in self._window_layers:
            flat = w.active_flat()
            positions = self._sample_candidates(w, flat, candidate_count(self.candidates, flat.numel()))
            device = w.param.device
            row_ptr, col_idx = structure_from_flat(positions.to(device), w.n_rows, w.n_cols)
            keys = ("momentum_buffer",) if isinstance(self.optimizer, torch.optim.SGD) else ("exp_avg", "exp_avg_sq")
            state = {k: torch.zeros(positions.numel(), dtype=w.param.dtype, device=device) for k in keys}
            self._windows[w.name] = _CandidateWindow(positions.to(device), row_ptr, col_idx, state)

    @torch.no_grad()
    def _accumulate_candidates(self, w, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Backward hook of a csr layer: the candidates' gradient (SDDMM) into their momentum."""
        window = self._windows.get(w.name)
        if window is None:
            return
        grad = ops.csr_sddmm(grad_out.reshape(-1, w.n_rows), x.reshape(-1, w.n_cols), window.row_ptr, window.col_idx)
        group = self._group_of(w.param)
        if group.get("maximize", False):
            grad = -grad
        if isinstance(self.optimizer, torch.optim.SGD):
            window.state["momentum_buffer"].mul_(group["momentum"]).add_(grad, alpha=1 - group["dampening"])
        else:
            beta1, beta2 = group["betas"]
            window.state["exp_avg"].lerp_(grad, 1 - beta1)
            window.state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    def _next_update(self) -> Optional[int]:
        period = self.schedule.update_every or self.schedule.steps_per_epoch
        if period is None:
            return None
        upcoming = (self.steps // period + 1) * period
        total = self.schedule.total_steps
        return upcoming if total is None or upcoming < total else None

    def _maybe_open_windows(self) -> None:
        if not self._window_layers or self._windows or not self._before_end():
            return
        if self.schedule.update_every is None and self.schedule.steps_per_epoch is None:
            self._open_windows()  # epoch length unknown until the first end_of_epoch(): accumulate all of it
            return
        upcoming = self._next_update()
        if upcoming is not None and upcoming - self.steps <= self.window:
            self._open_windows()

    # ------------------------------------------------------------------ stepping
    def prune_rate(self) -> float:
        """The prune rate p_t at the current step."""
        s = self.schedule
        return prune_rate_at(self.steps, s.total_steps, s.prune_rate, s.final_prune_rate, s.decay, s.decay_end)

    def _before_end(self) -> bool:
        return self.schedule.total_steps is None or self.steps < self.schedule.total_steps

    def step(self) -> None:
        """Call after ``optimizer.step()``: re-applies the masks and updates every ``update_every`` steps."""
        from ..optim import _MaskedStepMixin

        if not isinstance(self.optimizer, _MaskedStepMixin):  # the fused optimizers mask already
            with torch.no_grad():
                for w in self.weights:
                    if w.layout == "mask":
                        ops.mask_apply_(w.param.data, w.mask)
        self.steps += 1
        every, per_epoch = self.schedule.update_every, self.schedule.steps_per_epoch
        if every is not None and self.steps % every == 0 and self._before_end():
            self.update()
        epoch_end_update_pending = (every is None and per_epoch is not None and self.steps % per_epoch == 0
                                    and self._before_end())
        if not epoch_end_update_pending:  # end_of_epoch() opens the next window after its update
            self._maybe_open_windows()

    def end_of_epoch(self) -> None:
        """Call at the end of each epoch: updates the topology (unless ``update_every`` is set or the run is over)."""
        if self.schedule.update_every is None and self.schedule.steps_per_epoch is None:
            self.schedule.steps_per_epoch = self.steps  # learnt from the first epoch
        if self.schedule.update_every is None and self._before_end():
            self.update()
            self._maybe_open_windows()

    @torch.no_grad()
    def update(self) -> List[UpdateRecord]:
        """Prune, redistribute and grow now; returns (and appends to ``history``) one record per layer.

        Everything is computed before anything is written, so an error leaves masks,
        weights and optimizer state as they were.
        """
        rate = self.prune_rate()
        flats = [w.active_flat() for w in self.weights]
        counts = [f.numel() for f in flats]
        momenta = [self._momentum(w) if self.needs_momentum else None for w in self.weights]
        pools = [self._candidate_pool(w, f) for w, f in zip(self.weights, flats)]
        values = [w.active_values(f) for w, f in zip(self.weights, flats)]
        if self.scope == "global":
            keeps, grown, n_grow = self._select_global(rate, flats, counts, values, momenta, pools)
            n_prune = [int((~k).sum()) for k in keeps]
            shares = [0.0] * len(self.weights)
        else:
            stats = [self._statistic(w, f, m) for w, f, m in zip(self.weights, flats, momenta)]
            total_stat = sum(stats)
            shares = [s / total_stat if total_stat > 0 else 0.0 for s in stats]
            n_prune = [math.ceil(rate * c) for c in counts]
            # Candidate-based growth can regrow at most its candidates: prune no more.
            n_prune = [k if p is None else min(k, p.flat.numel()) for k, p in zip(n_prune, pools)]
            keeps = [keep_after_prune(v, k, self.prune) for v, k in zip(values, n_prune)]
            capacity = [w.numel - (c - k) for w, c, k in zip(self.weights, counts, n_prune)]
            capacity = [cap if p is None else min(cap, p.flat.numel()) for cap, p in zip(capacity, pools)]
            if self.redistribution == "none":
                n_grow = list(n_prune)
            else:
                n_grow = apportion(sum(n_prune), shares, capacity)
            grown = [self._select_in_layer(w, f, k, m, p, g)
                     for w, f, k, m, p, g in zip(self.weights, flats, keeps, momenta, pools, n_grow)]
        commits = [self._prepare_commit(w, f, k, p, g) for w, f, k, p, g in zip(self.weights, flats, keeps, pools, grown)]
        records = []
        for w, commit, share, k, g in zip(self.weights, commits, shares, n_prune, n_grow):
            commit()
            nnz = w.count()
            records.append(UpdateRecord(self.steps, w.name, rate, share, k, g, nnz, nnz / w.numel if w.numel else 0.0))
        self._windows.clear()
        self.updates += 1
        self.history.extend(records)
        return records

    def _select_in_layer(self, w, flat, keep, momentum, pool, n_grow):
        """What layer scope grows in ``w``: a bool over the pool's candidates, a new dense
        mask (mask layer, dense score), or the grown flat indices (csr, dense score)."""
        if pool is not None:
            return top_scores(pool.score, n_grow)
        if w.layout == "mask":
            return ops.momentum_grow(self._dense_score(w, momentum), w.pruned_mask(flat, keep), n_grow)
        if self.growth == "random":
            return sample_inactive(w.n_rows, w.n_cols, flat[keep], n_grow, self.generator).to(flat.device)
        free, score = self._csr_rigl_candidates(w, flat, keep)
        new_mask = ops.momentum_grow(score, ~free, n_grow)
        return (new_mask & free).nonzero().reshape(-1)

    def _csr_rigl_candidates(self, w, flat, keep):
        """RigL on a csr layer: the flat bool of positions free after pruning, and the
        layer's dense gradient as their score (computed on the update step only)."""
        free = torch.ones(w.numel, dtype=torch.bool, device=flat.device)
        free[flat[keep]] = False
        return free, w.dense_batch_gradient(self._probes.get(w.name)).reshape(-1)

    def _select_global(self, rate, flats, counts, values, momenta, pools):
        """Global scope: prune the smallest weights of all layers, grow the largest scores of all."""
        total_prune = math.ceil(rate * sum(counts))
        if self.growth == "gse" or any(p is not None for p in pools):
            total_prune = min(total_prune, sum(p.flat.numel() for p in pools if p is not None))
        device = values[0].device
        keep_all = keep_after_prune(torch.cat([v.to(device) for v in values]), total_prune, self.prune)
        keeps = [k.to(f.device) for k, f in zip(keep_all.split(counts), flats)]
        # Every layer's growable positions and their scores, in one pool across layers.
        pool_positions, pool_scores = [], []
        for w, f, k, m, p in zip(self.weights, flats, keeps, momenta, pools):
            if p is not None:
                pool_positions.append(p.flat)
                pool_scores.append(p.score)
                continue
            if w.layout == "mask":
                free = ~w.pruned_mask(f, k).reshape(-1)
                score = self._dense_score(w, m).reshape(-1)
            else:
                free, score = self._csr_rigl_candidates(w, f, k)
            positions = free.nonzero().reshape(-1)
            pool_positions.append(positions)
            pool_scores.append(score[positions])
        chosen_all = top_scores(torch.cat([s.to(device) for s in pool_scores]), total_prune)
        chosen = [c.to(s.device) for c, s in zip(chosen_all.split([s.numel() for s in pool_scores]), pool_scores)]
        grown = []
        for w, f, k, p, positions, c in zip(self.weights, flats, keeps, pools, pool_positions, chosen):
            if p is not None:
                grown.append(c)
            elif w.layout == "mask":
                grown.append(w.pruned_mask(f, k, positions[c]))
            else:
                grown.append(positions[c])
        return keeps, grown, [int(c.sum()) for c in chosen]

    def _prepare_commit(self, w, flat, keep, pool, grown):
        """A closure that installs the new topology of ``w`` (nothing is written before all are ready)."""
        if w.layout == "mask":
            if pool is not None:  # grown: bool over the candidates
                new_mask = w.pruned_mask(flat, keep, pool.flat[grown])
            else:
                new_mask = grown
            return lambda: w.commit(new_mask)
        if pool is not None:  # candidates were inactive before pruning: all of them are new
            grown_flat = pool.flat[grown]
            grown_state = {key: t[grown] for key, t in pool.grown_state.items()}
        else:
            # A weight pruned and regrown in the same update stays as it was, value and
            # optimizer state (as in the mask layout, where its mask bit ends up unchanged).
            grown_flat, grown_state = grown, None
            regrown = torch.isin(grown_flat, flat)
            if bool(regrown.any()):
                keep = keep.clone()
                keep[torch.searchsorted(flat, grown_flat[regrown])] = True
                grown_flat = grown_flat[~regrown]
        plan = relayout_plan(flat, keep, grown_flat)
        return lambda: w.commit(plan, self.optimizer, grown_state)

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
        """Masks, counters, schedule, generator and open candidate windows: enough for a resumed
        run to continue identically. csr layers' structures are in the model's state_dict."""
        return {
            "steps": self.steps,
            "updates": self.updates,
            "masks": {w.name: w.mask.clone() for w in self.weights if w.layout == "mask"},
            "nnz": {w.name: w.count() for w in self.weights if w.layout == "csr"},
            "windows": {name: {"flat": win.flat.clone(), "state": {k: t.clone() for k, t in win.state.items()}}
                        for name, win in self._windows.items()},
            "generator": self.generator.get_state(),
            "schedule": vars(self.schedule).copy(),
            "options": {"growth": self.growth, "prune": self.prune, "redistribution": self.redistribution,
                        "scope": self.scope, "candidates": self.candidates, "sampling": self.sampling,
                        "window": self.window},
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore what :meth:`state_dict` saved (masks are copied into the layers' own mask tensors).

        Load the model's state_dict first: csr layers take their structure from it, and
        their nnz must be the saved one.
        """
        mask_layers = [w for w in self.weights if w.layout == "mask"]
        csr_layers = [w for w in self.weights if w.layout == "csr"]
        names = {w.name for w in mask_layers}
        if set(state["masks"]) != names:
            raise ValueError(f"state_dict masks are for layers {sorted(state['masks'])}, this engine has {sorted(names)}")
        for w in mask_layers:
            saved = state["masks"][w.name]
            if saved.shape != w.mask.shape:
                raise ValueError(f"state_dict mask of {w.name!r} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(w.mask.shape)}")
        saved_nnz = state.get("nnz", {})
        if set(saved_nnz) != {w.name for w in csr_layers}:
            raise ValueError(f"state_dict csr layers are {sorted(saved_nnz)}, this engine has "
                             f"{sorted(w.name for w in csr_layers)}")
        for w in csr_layers:
            if saved_nnz[w.name] != w.count():
                raise ValueError(f"csr layer {w.name!r} has {w.count()} nonzeros, the state_dict {saved_nnz[w.name]}: "
                                 "load the model's state_dict (which holds the structure) before the engine's")
        with torch.no_grad():
            for w in mask_layers:
                w.mask.copy_(state["masks"][w.name])
                ops.mask_apply_(w.param.data, w.mask)
        self.steps = state["steps"]
        self.updates = state["updates"]
        self.generator.set_state(state["generator"])
        self.schedule = _Schedule(**state["schedule"])
        options = state["options"]
        self.growth, self.prune, self.redistribution = options["growth"], options["prune"], options["redistribution"]
        self.scope = options.get("scope", "layer")
        self.candidates = options.get("candidates", 1.0)
        self.sampling = options.get("sampling", "uniform")
        self.window = options.get("window", self.window)
        self._windows.clear()
        by_name = {w.name: w for w in self.weights}
        for name, saved in state.get("windows", {}).items():
            w = by_name[name]
            device = w.param.device
            flat = saved["flat"].to(device)
            row_ptr, col_idx = structure_from_flat(flat, w.n_rows, w.n_cols)
            self._windows[name] = _CandidateWindow(flat, row_ptr, col_idx,
                                                   {k: t.to(device) for k, t in saved["state"].items()})
