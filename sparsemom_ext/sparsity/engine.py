"""The dynamic-sparsity engine: sparse momentum, SET, RigL and GSE, in the mask and csr layouts.

Usage::

    model = sm.sparsify(model, density=0.05)                 # or layout="csr": always sparse
    optimizer = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    engine = sm.SparseMomentum(model, optimizer, total_steps=epochs * len(loader),
                               steps_per_epoch=len(loader))
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            engine.step()
        engine.end_of_epoch()

The engine is an explicit object the user steps; it patches nothing (it sets a gradient
tap, :mod:`.taps`, on the layers whose growth signal needs their batches). Its sparse weights are the
parameters of ``model`` that carry a mask (:func:`sparsemom_ext.attach_mask`, done by
SparseLinear / SparseConv2d / sparsify) and the ``values`` of csr layers (CsrLinear,
CsrConv2d). At each
update it prunes ``ceil(p_t * nnz_l)`` weights per layer, redistributes the freed budget
over layers by a statistic and grows it back by a score (docs/algorithms.md), so each
layer's count changes only by redistribution and the global count never drifts. This
module is the orchestration; the parts are :mod:`.schedule` (when and how much),
:mod:`.growth` (where to grow), :mod:`.signals` (the optimizer's momentum) and
:mod:`.views` (each layer, in its layout).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..csr_structure import relayout_plan
from .connectivity import best_per_row, empty_rows_of_flat, floor_counts
from .growth import CandidateSampler, keep_after_prune, make_growth, top_scores
from .distributed import rank_group_of
from .lr_ramp import LrRamp
from .masks import MaskingOptimizer
from .options import EngineOptions
from .schedule import PruneSchedule, apportion, prune_rate_at
from .signals import SUPPORTED, optimizer_family
from .taps import GradientTap
from .views import CsrView, find_views

__all__ = ["NonFiniteSignalError", "SparseMomentum", "UpdateRecord", "apportion", "prune_rate_at"]


class NonFiniteSignalError(RuntimeError):
    """A topology update found NaN or infinite values in what it reads (a layer's weights,
    momentum or growth scores): it raised before writing anything, so the model, masks and
    optimizer state are as they were. The training has diverged."""

@dataclass
class UpdateRecord:
    """What one topology update did to one layer. ``units_without_input``: the output units
    (rows) holding no active weight after it (0 under ``connectivity="floor"``; None in
    records saved before it was kept)."""

    step: int
    layer: str
    prune_rate: float
    statistic: float
    pruned: int
    grown: int
    nnz: int
    density: float
    units_without_input: Optional[int] = None


class SparseMomentum:
    """Dynamic sparse training: prune by magnitude, redistribute, grow by momentum (or SET/RigL/GSE).

    Args:
        model: a model whose sparse weights carry masks or are csr layers (CsrLinear, CsrConv2d; see
            :func:`sparsemom_ext.sparsify`); both layouts may be mixed.
        optimizer: the optimizer of ``model``; it must hold every sparse weight. The
            momentum signal is SGD's ``momentum_buffer`` or Adam/AdamW's
            ``exp_avg / (sqrt(exp_avg_sq) + eps)``; needed for ``growth`` or
            ``redistribution`` ``"momentum"``. csr layers need SGD, Adam or AdamW
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
            ``"gradient"``: RigL, the largest |weight gradient| of the update's step (csr
            layout: one dense gradient of the layer, computed on the update's step only).
            ``"gse"``: GSE, ``ceil(candidates * nnz)`` inactive candidates drawn at the
            update (``sampling``), their gradient of the update's step computed at the
            candidates only (SDDMM; nothing of size in x out), the largest grow. A layer
            then prunes at most as many weights as it has candidates. In the csr layout
            the candidates are drawn after the step before the update (GraBo: from that
            step's batches), since their gradient is computed during the update's step.
            A gradient "of a step" is summed over its backward passes, as ``.grad`` is.
        prune: ``"magnitude"`` (smallest |w|) or ``"set"`` (closest to zero on each side of zero).
        redistribution: ``"momentum"`` (mean |momentum| over active weights; csr layout:
            the compact optimizer state), ``"magnitude"`` (mean |w|), ``"nonzeros"`` (keeps
            layer densities) or ``"none"`` (each layer regrows what it pruned). A csr layer
            grows to at most its ``capacity``; the excess goes to the other layers.
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` prune-rate schedule.
        seed: seed of the engine's generator (random growth, candidate sampling): the same
            on every process.
        steps_per_epoch: the number of ``step()`` calls per epoch; with updates at epoch
            ends it tells the engine which steps precede an update: csr-layout momentum
            and gse open their candidate windows, RigL taps its dense gradient and GraBo
            its factors on those steps only (default: learnt at the first
            :meth:`end_of_epoch`; until then every step of the first epoch is tapped).
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
        connectivity: ``"floor"`` (default): no update leaves an output unit (a row of the
            weight matrix, a conv's output channel) without an input, so a layer keeps at
            least its ``n_rows`` weights whatever redistribution asks: each row pruning
            empties regrows one position of its own row, the one its growth ranks first
            there, out of the layer's share of the regrowth (docs/algorithms.md, section 5).
            The engine keeps the rule, it does not create it: every layer must satisfy it
            when the engine is built and at each update (``sparsify`` draws such masks),
            else a ValueError names the layer. ``"reference"``: the reference code's
            update, which may empty rows and whole layers.
        process_group: the torch.distributed group whose ranks train this model (default:
            a DistributedDataParallel model's, else the default group once
            torch.distributed is initialized). The growth signals built from each rank's
            batches are reduced over it, so every rank makes the same update (the
            reductions and their cost: :mod:`sparsemom_ext.sparsity.distributed`); every
            rank must build the engine with the same arguments and ``seed``. FSDP is not
            supported (a ValueError says so).
        lr_ramp_steps: for this many optimizer steps after each update, every param group's
            lr ramps linearly from ``lr_ramp_start * lr`` up to ``lr`` (0, the default: no
            ramp, as the paper). The lr is scaled only inside ``optimizer.step()``, so
            schedulers and ``param_groups`` keep their own values. On LeNet-5-Caffe at 5%,
            lr 0.1, 50 steps trained the seeds whose first steps on the grown weights blew
            the network up (docs/algorithms.md, section 6); the training command uses 50.
        lr_ramp_start: the lr fraction of the first optimizer step after an update, in (0, 1].

    GSE as in its paper: ``growth="gse", prune_rate=0.2, final_prune_rate=0.0,
    decay_end=0.6, update_every=1000, redistribution="none"`` (``scope="global"`` for
    its global variant).

    After every update each layer's count is its previous count minus what it pruned
    plus what it grew, the global count is unchanged, no grown position was active
    after pruning, weights are zero wherever masks are False, and (``connectivity="floor"``)
    every output unit has an input. Growth signals that
    need a layer's batches come from the gradient tap the engine sets on those layers
    (``layer.gradient_tap``, :mod:`sparsemom_ext.sparsity.taps`; torch.compile captures it,
    ``fullgraph=True`` included), armed after each ``step()`` for the steps that need
    them (:meth:`remove_hooks` takes them off).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, prune_rate: float = 0.5,
                 update_every: Optional[int] = None, total_steps: Optional[int] = None,
                 growth: str = "momentum", prune: str = "magnitude", redistribution: str = "momentum",
                 decay: str = "cosine", final_prune_rate: float = 0.005, seed: int = 0, *,
                 steps_per_epoch: Optional[int] = None, decay_end: float = 1.0, scope: str = "layer",
                 candidates: float = 1.0, sampling: str = "grabo", window: int = 100, process_group=None,
                 connectivity: str = "floor", lr_ramp_steps: int = 0, lr_ramp_start: float = 0.02):
        self.options = EngineOptions(growth, prune, redistribution, scope, candidates, sampling, window,
                                     connectivity, lr_ramp_steps, lr_ramp_start)
        schedule = PruneSchedule(prune_rate, final_prune_rate, decay, total_steps, update_every, decay_end,
                                 steps_per_epoch)
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.ranks = rank_group_of(model, process_group)
        self.weights = find_views(model, optimizer)
        self._check_connected([w.active_flat() for w in self.weights])
        self.family = optimizer_family(optimizer)
        if self.options.needs_momentum:
            if self.family is None:
                raise ValueError(f"{type(optimizer).__name__} keeps no momentum the engine can read; "
                                 f"supported optimizers: {SUPPORTED}")
            self.family.check_has_momentum()
        if self.family is None and any(isinstance(w, CsrView) for w in self.weights):
            raise ValueError(f"{type(optimizer).__name__}: the engine re-lays out the optimizer state of csr "
                             f"layers (CsrLinear, CsrConv2d) when their topology changes and knows how for {SUPPORTED}; use one of "
                             "them, or the mask layout")
        self.generator = torch.Generator().manual_seed(seed)
        sampler = CandidateSampler(sampling, self.options.candidates, self.generator, self.ranks)
        self.growth_method = make_growth(growth, self.family, sampler, self.generator, self.ranks,
                                         self.options.window)
        self._window_views = self.growth_method.window_layers(self.weights)
        self.steps = 0
        self.updates = 0
        self.last_update: Optional[int] = None  # the value of ``steps`` at the last update
        self._taps: Dict[str, GradientTap] = {}
        # Per layer, the signals its tap delivered and the step they are of (``"step"``).
        self._tapped: Dict[str, Dict] = {}
        self._add_taps()
        self.lr_ramp = LrRamp(optimizer, self.options.lr_ramp_steps, self.options.lr_ramp_start,
                              lambda: None if self.last_update is None else self.steps - self.last_update)
        # One UpdateRecord per layer per update; dataclasses.asdict() gives JSON-ready
        # rows for plotting, format_history() a printable table.
        self.history: List[UpdateRecord] = []
        if self._window_views and self.schedule.next_update(0) == 1:
            # An update at step 1 needs its windows before any batch (GraBo: drawn uniform).
            for w in self._window_views:
                self.growth_method.open_window(w, {}, before_any_batch=True)
        self._arm_taps()

    # ------------------------------------------------------------------ taps
    def _add_taps(self) -> None:
        """A gradient tap on each layer whose growth signal comes from its batches."""
        for w in self.weights:
            wanted = w in self._window_views or any(self.growth_method.taps_for(w, True, True))
            if not wanted:
                continue
            if not hasattr(type(w.module), "gradient_tap"):
                hint = "; use sampling='uniform'" if w.dense_gradient and self.options.growth == "gse" else ""
                raise ValueError(f"growth={self.options.growth!r} with sampling={self.options.sampling!r} reads the "
                                 f"batches of {w.name!r}, which is not the weight of a sparsemom_ext layer "
                                 f"(SparseLinear, SparseConv2d, CsrLinear, CsrConv2d){hint}")
            tap = GradientTap(w.module, w.n_rows, w.n_cols, w.param)
            w.module.gradient_tap = tap
            self._taps[w.name] = tap

    def _arm_taps(self) -> None:
        """Arm each tap with what the next step must deliver: the open window's candidate
        gradients, and the dense gradient or GraBo's factors when an update or a window
        opening may follow that step (every step while the epoch length is unknown)."""
        if not self._taps:
            return
        upcoming = self.steps + 1
        may_update = self.schedule.may_update_at(upcoming)
        window_may_open = self._window_may_open(upcoming, may_update)
        for w in self.weights:
            tap = self._taps.get(w.name)
            if tap is None:
                continue
            dense, grabo = self.growth_method.taps_for(w, may_update, window_may_open)
            window = self.growth_method.windows.get(w.name)
            tap.arm(None if window is None else (window.row_ptr, window.col_idx), dense, grabo)

    def _take_taps(self) -> None:
        """Collect what the taps received since the last step (the backward passes of step
        ``steps + 1``): window gradients go to the growth, the rest is kept for the update."""
        for name, tap in self._taps.items():
            got = tap.take()
            if not got:
                continue
            at = got.pop("at", None)
            if at is not None:
                self.growth_method.receive(name, at)
            got["step"] = self.steps + 1
            self._tapped[name] = got

    def _fresh(self, name: str) -> Dict:
        """The layer's tapped signals if they are of the step just made (or of a backward pass
        since), else nothing."""
        got = self._tapped.get(name, {})
        return got if got.get("step", -1) >= self.steps else {}

    def remove_hooks(self) -> None:
        """Take the engine's gradient taps off the layers (the engine cannot update after this
        with a growth that reads batches) and its lr ramp's hooks off the optimizer."""
        self.lr_ramp.remove()
        for w in self.weights:
            if w.name in self._taps:
                w.module.gradient_tap = None
        self._taps.clear()
        self._tapped.clear()

    # ------------------------------------------------------------------ stepping
    def prune_rate(self) -> float:
        """The prune rate p_t at the current step."""
        return self.schedule.rate(self.steps)

    def step(self) -> None:
        """Call after ``optimizer.step()``: re-applies the masks and updates every ``update_every`` steps."""
        self._take_taps()
        if not isinstance(self.optimizer, MaskingOptimizer):  # the fused optimizers mask already
            for w in self.weights:
                w.zero_inactive()
        self.growth_method.before_update(self.weights)
        self.steps += 1
        if self.schedule.updates_at_step(self.steps):
            self.update()
        if not self.schedule.epoch_update_pending(self.steps):  # end_of_epoch() opens the next window
            self._maybe_open_windows()
        self._arm_taps()

    def end_of_epoch(self) -> None:
        """Call at the end of each epoch: updates the topology (unless ``update_every`` is set or the run is over)."""
        if self.schedule.update_every is None and self.schedule.steps_per_epoch is None:
            self.schedule.steps_per_epoch = self.steps  # learnt from the first epoch
        if self.schedule.update_every is None and self.schedule.before_end(self.steps):
            self.update()
            self._maybe_open_windows()
        self._arm_taps()

    def _window_opens(self, step: int) -> bool:
        """Whether windows open after ``step`` (when none is open): the next update is at most
        the growth's window length ahead, or the epoch length is still unknown (the first
        window then spans the whole first epoch)."""
        if not self._window_views or not self.schedule.before_end(step):
            return False
        if self.schedule.update_every is None and self.schedule.steps_per_epoch is None:
            return True
        upcoming = self.schedule.next_update(step)
        return upcoming is not None and upcoming - step <= self.growth_method.window_length

    def _window_may_open(self, step: int, may_update: bool) -> bool:
        """Whether windows may open after ``step``: none is open, or an update may close them then."""
        return (not self.growth_method.windows or may_update) and self._window_opens(step)

    def _maybe_open_windows(self) -> None:
        if self.growth_method.windows or not self._window_opens(self.steps):
            return
        for w in self._window_views:
            self.growth_method.open_window(w, self._fresh(w.name))

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self) -> List[UpdateRecord]:
        """Prune, redistribute and grow now; returns (and appends to ``history``) one record per layer.

        Everything is computed before anything is written, so an error leaves masks,
        weights and optimizer state as they were: a :class:`NonFiniteSignalError` naming the
        layer when its weights, momentum or growth scores hold NaN or inf, a ValueError when
        ``connectivity="floor"`` finds a layer with an output unit without an input.
        """
        self._take_taps()
        rate = self.prune_rate()
        self.growth_method.before_update(self.weights)
        flats = [w.active_flat() for w in self.weights]
        self._check_connected(flats)
        pools = [self.growth_method.pool(w, self._fresh(w.name)) for w in self.weights]
        values = [w.active_values(f) for w, f in zip(self.weights, flats)]
        self._check_finite(values, pools)
        plan = self._plan_global if self.options.scope == "global" else self._plan_layers
        keeps, grown, n_prune, shares = plan(rate, flats, values, pools)
        commits = [_relayout(f, k, g, s, p.may_regrow) for f, k, (g, s), p in zip(flats, keeps, grown, pools)]
        self.ranks.check_same_topology([w.name for w in self.weights], [plan.flat for plan, _ in commits])
        records = []
        for w, (layout, grown_state), share, k, (g, _) in zip(self.weights, commits, shares, n_prune, grown):
            w.commit(layout, self.optimizer.state.get(w.param, {}), grown_state)
            nnz = w.count()
            cut = empty_rows_of_flat(layout.flat, w.n_rows, w.n_cols).numel() if w.n_cols else 0
            records.append(UpdateRecord(self.steps, w.name, rate, share, k, g.numel(), nnz,
                                        nnz / w.numel if w.numel else 0.0, cut))
        self.growth_method.windows.clear()
        self.updates += 1
        self.last_update = self.steps
        self.history.extend(records)
        self._arm_taps()
        return records

    def _plan_layers(self, rate, flats, values, pools):
        """Layer scope: each layer prunes ``ceil(p_t * nnz_l)``, the total regrows by shares."""
        counts = [f.numel() for f in flats]
        stats = [self._statistic(w, f, v) for w, f, v in zip(self.weights, flats, values)]
        total_stat = sum(stats)
        shares = [s / total_stat if total_stat > 0 else 0.0 for s in stats]
        # Candidate-based growth can regrow at most its candidates: prune no more.
        n_prune = [_at_most(math.ceil(rate * c), p.limit) for c, p in zip(counts, pools)]
        keeps = [keep_after_prune(v, k, self.options.prune) for v, k in zip(values, n_prune)]
        keeps, picks = self._reconnect(flats, values, keeps, pools)
        n_prune = [int((~k).sum()) for k in keeps]
        n_picked = [pos.numel() for pos, _ in picks]
        room = [_at_most(min(w.capacity, w.numel) - int(k.sum()), p.limit)
                for w, k, p in zip(self.weights, keeps, pools)]
        n_grow = list(n_prune) if self.options.redistribution == "none" else apportion(sum(n_prune), shares, room)
        # The picks come out of the layer's share; a share smaller than its picks is raised to
        # them, from the others' surplus (each picked row lost a weight, so the picks fit).
        n_grow = floor_counts(n_grow, n_picked, [w.name for w in self.weights])
        grown = [_with_picks(pick, p.select(_taken(f[k], pick[0]), g - e))
                 for p, f, k, g, e, pick in zip(pools, flats, keeps, n_grow, n_picked, picks)]
        return keeps, grown, n_prune, shares

    def _plan_global(self, rate, flats, values, pools):
        """Global scope: prune the smallest weights of all layers, grow the largest scores of all."""
        counts = [f.numel() for f in flats]
        total = math.ceil(rate * sum(counts))
        limits = [p.limit for p in pools if p.limit is not None]
        if limits:
            total = min(total, sum(limits))
        device = values[0].device
        all_values = torch.cat([v.to(device) for v in values])
        while True:
            keep_all = keep_after_prune(all_values, total, self.options.prune)
            keeps = [k.to(f.device) for k, f in zip(keep_all.split(counts), flats)]
            keeps, picks = self._reconnect(flats, values, keeps, pools)
            pruned = sum(int((~k).sum()) for k in keeps)
            rest = pruned - sum(pos.numel() for pos, _ in picks)
            offers = []
            for w, f, k, p, (pick, _) in zip(self.weights, flats, keeps, pools, picks):
                positions, scores, state = p.scored(_taken(f[k], pick))
                room = min(w.capacity, w.numel) - int(k.sum()) - pick.numel()
                if positions.numel() > room:  # a layer never takes more than its room: offer its best
                    best = top_scores(scores, room)
                    positions, scores = positions[best], scores[best]
                    state = {key: t[best] for key, t in state.items()}
                offers.append((positions, scores, state))
            offered = sum(pos.numel() for pos, _, _ in offers)
            if offered >= rest:
                break
            # Candidates cut to their layers' room can fall short of what was pruned: prune
            # only what can regrow (fewer pruned leave less room, so repeat; total falls each time).
            total -= rest - offered
        chosen_all = top_scores(torch.cat([s.to(device) for _, s, _ in offers]), rest)
        chosen = chosen_all.split([s.numel() for _, s, _ in offers])
        grown = [_with_picks(pick, (pos[c.to(pos.device)], {key: t[c.to(t.device)] for key, t in state.items()} or None))
                 for (pos, _, state), c, pick in zip(offers, chosen, picks)]
        n_prune = [int((~k).sum()) for k in keeps]
        return keeps, grown, n_prune, [0.0] * len(self.weights)

    def _reconnect(self, flats, values, keeps, pools):
        """The connectivity rule after pruning (docs/algorithms.md, section 5): ``(keeps,
        picks)``, with each layer's ``picks`` the positions (and their starting state) that
        regrow the rows pruning emptied, one per row, and ``keeps`` with the largest weight
        of each emptied row its growth offers no position in left unpruned. Under
        ``"reference"`` the keeps as they were and no picks."""
        picks = []
        for w, flat, value, keep, pool in zip(self.weights, flats, values, keeps, pools):
            nothing = (flat[:0], None)
            if self.options.connectivity != "floor" or w.n_cols == 0:
                picks.append(nothing)
                continue
            rows = empty_rows_of_flat(flat[keep], w.n_rows, w.n_cols)  # every row had a weight before
            if rows.numel() == 0:
                picks.append(nothing)
                continue
            positions, state, missing = pool.row_picks(rows, w.n_cols, self.generator)
            picks.append((positions, state))
            if missing.numel():
                keep[best_per_row(torch.div(flat, w.n_cols, rounding_mode="floor"), value, missing)] = True
        return keeps, picks

    def _check_connected(self, flats) -> None:
        """Under ``connectivity="floor"``: a ValueError naming the first layer with an output
        unit (a row) that holds no active weight."""
        if self.options.connectivity != "floor":
            return
        for w, flat in zip(self.weights, flats):
            if w.n_cols == 0:
                continue
            empty = empty_rows_of_flat(flat, w.n_rows, w.n_cols)
            if empty.numel():
                shown = ", ".join(str(int(r)) for r in empty[:5]) + (", ..." if empty.numel() > 5 else "")
                raise ValueError(
                    f"connectivity='floor': {w.name!r} has {empty.numel()} of its {w.n_rows} output units without "
                    f"an input (rows {shown}); the engine keeps every unit connected but does not connect them: "
                    "draw the masks with sparsemom_ext.sparsify(..., connectivity='floor'), or build the engine "
                    "with connectivity='reference'")

    def _check_finite(self, values, pools) -> None:
        """A :class:`NonFiniteSignalError` naming the first layer whose weights, momentum or growth
        scores (what this update reads) hold NaN or inf."""
        for w, v, pool in zip(self.weights, values, pools):
            signals = [("weights", v)]
            if self.options.needs_momentum:
                signals.append(("momentum", self.family.momentum(w.param, w.name)))
            score = getattr(pool, "score", None)  # random growth has no scores
            if score is not None:
                signals.append((f"{self.options.growth} growth scores", score))
            for what, tensor in signals:
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise NonFiniteSignalError(
                        f"the topology update at step {self.steps} found {bad} NaN or infinite {what} in "
                        f"{w.name!r}; nothing was changed: the training has diverged (lower the learning rate)")

    def _statistic(self, w, flat, values) -> float:
        if flat.numel() == 0:
            return 0.0
        if self.options.redistribution == "momentum":
            return float(w.at_active(self.family.momentum(w.param, w.name), flat).abs().mean())
        if self.options.redistribution == "magnitude":
            return float(values.abs().mean())
        return float(flat.numel())  # nonzeros; unused for "none"

    def format_history(self, last: Optional[int] = None) -> str:
        """The per-layer log of the topology updates as an aligned table (``last`` updates only)."""
        records = self.history[-last * len(self.weights):] if last else self.history
        header = ("step", "layer", "prune_rate", "statistic", "pruned", "grown", "nnz", "density",
                  "units_without_input")
        rows = [(str(r.step), r.layer, f"{r.prune_rate:.4f}", f"{r.statistic:.4f}", str(r.pruned),
                 str(r.grown), str(r.nnz), f"{r.density:.4f}",
                 "?" if r.units_without_input is None else str(r.units_without_input)) for r in records]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict:
        """Each layer's topology, counters, schedule, generator, options and open candidate
        windows: enough for a resumed run to continue identically. csr layers' structures
        are in the model's state_dict; the engine keeps their nnz to check the load order."""
        return {
            "steps": self.steps,
            "updates": self.updates,
            "last_update": self.last_update,
            "layers": {w.name: w.saved_topology() for w in self.weights},
            "windows": self.growth_method.window_state_dict(),
            "generator": self.generator.get_state(),
            "schedule": vars(self.schedule).copy(),
            "options": vars(self.options).copy(),
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore what :meth:`state_dict` saved, whole or not at all: every entry is checked
        (a ValueError naming it) before anything is written. Load the model's state_dict
        first: csr layers take their structure from it. The saved options must be this
        engine's (build it with the same arguments), and the optimizer must still fit them
        (its state_dict may have been loaded since the engine was built).
        """
        schedule, windows = self._checked_state(state)
        for w in self.weights:
            w.load_saved_topology(state["layers"][w.name])
        self.steps, self.updates, self.last_update = state["steps"], state["updates"], state["last_update"]
        self.generator.set_state(state["generator"])
        self.schedule = schedule
        self.growth_method.windows = windows
        self._tapped.clear()
        self._arm_taps()

    def _checked_state(self, state: Dict):
        """``state`` checked entry by entry as :meth:`load_state_dict` needs it; returns the
        schedule and candidate windows built from it (nothing of the engine is touched)."""
        if not isinstance(state, dict):
            raise ValueError(f"state_dict must be a dict from SparseMomentum.state_dict(), got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}: it must have the entries of "
                             f"SparseMomentum.state_dict() {list(_STATE_KEYS)}")
        for key in ("steps", "updates"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict['{key}'] must be a non-negative int, got {value!r}")
        last = state["last_update"]
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= state["steps"]):
            raise ValueError(f"state_dict['last_update'] must be None or an int in [0, steps={state['steps']}], "
                             f"got {last!r}")
        layers = state["layers"]
        names = sorted(w.name for w in self.weights)
        if not isinstance(layers, dict) or sorted(layers) != names:
            got = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
            raise ValueError(f"state_dict['layers'] is for layers {got}, this engine has {names}")
        for w in self.weights:
            w.check_saved_topology(layers[w.name])
        options = _built("options", EngineOptions, state["options"])
        if options != self.options:
            raise ValueError(f"state_dict is of an engine with options {state['options']}, this one has "
                             f"{vars(self.options)}: build the engine with the same arguments")
        if self.options.needs_momentum:
            self.family.check_has_momentum()
        schedule = _built("schedule", PruneSchedule, state["schedule"])
        try:
            torch.Generator().set_state(state["generator"])
        except (TypeError, RuntimeError) as exc:
            raise ValueError("state_dict['generator'] must be a CPU torch.Generator state (a uint8 tensor from "
                             f"get_state()): {' '.join(str(exc).split())}") from exc
        self._check_saved_windows(state["windows"])
        return schedule, self.growth_method.windows_from_state_dict(state["windows"],
                                                                    {w.name: w for w in self.weights})

    def _check_saved_windows(self, saved) -> None:
        """Each saved candidate window: of a layer that keeps windows here, sorted distinct int64
        flat indices in the layer, and the optimizer state the window accumulates, one entry each."""
        views = {w.name: w for w in self._window_views}
        if not isinstance(saved, dict) or not set(saved) <= set(views):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"state_dict['windows'] must map layers that keep candidate windows "
                             f"({sorted(views)}) to windows, got {got}")
        keys = list(self.growth_method.window_keys())
        for name, entry in saved.items():
            where = f"state_dict['windows'][{name!r}]"
            flat = entry.get("flat") if isinstance(entry, dict) else None
            if not isinstance(flat, torch.Tensor) or flat.dtype != torch.int64 or flat.dim() != 1:
                raise ValueError(f"{where}['flat'] must be a 1-D int64 tensor of flat indices")
            n = views[name].numel
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n or not bool((flat.diff() > 0).all())):
                raise ValueError(f"{where}['flat'] must be sorted, distinct flat indices in [0, {n})")
            window_state = entry.get("state")
            if not isinstance(window_state, dict) or sorted(window_state) != keys:
                got = sorted(window_state) if isinstance(window_state, dict) else type(window_state).__name__
                raise ValueError(f"{where}['state'] must hold {keys}, got {got}")
            for key, t in window_state.items():
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != flat.shape:
                    raise ValueError(f"{where}['state'][{key!r}] must be a float tensor with one entry per "
                                     f"candidate ({flat.numel()})")


_STATE_KEYS = ("steps", "updates", "last_update", "layers", "windows", "generator", "schedule", "options")


def _built(name: str, cls, fields):
    """``cls(**fields)`` from the saved ``state_dict[name]``, its errors as ValueErrors naming it."""
    if not isinstance(fields, dict):
        raise ValueError(f"state_dict['{name}'] must be a dict, got {type(fields).__name__}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:  # TypeError: a field cls does not have
        raise ValueError(f"state_dict['{name}']: {exc}") from exc


def _at_most(count: int, limit: Optional[int]) -> int:
    return count if limit is None else min(count, limit)


def _taken(kept_flat, picks):
    """The sorted positions a layer's growth may no longer choose: its kept weights and the rule's picks."""
    return kept_flat if picks.numel() == 0 else torch.sort(torch.cat([kept_flat, picks.to(kept_flat.device)])).values


def _with_picks(picks, grown):
    """A layer's grown positions and starting state with the connectivity rule's picks merged
    in (sorted by position)."""
    (pick, pick_state), (positions, state) = picks, grown
    if pick.numel() == 0:
        return positions, state
    merged = torch.cat([pick.to(positions.device), positions])
    order = torch.argsort(merged)
    if not state and not pick_state:
        return merged[order], state
    keys = (state or pick_state).keys()
    combined = {key: torch.cat([pick_state[key], state[key]])[order] for key in keys}
    return merged[order], combined


def _relayout(flat, keep, grown_flat, grown_state, may_regrow: bool):
    """The relayout of one layer, and its grown weights' starting state. A weight pruned
    and regrown in the same update stays as it was, value and optimizer state (in the
    mask layout its mask bit ends up unchanged)."""
    if not may_regrow:  # candidates were inactive before pruning: all of them are new
        return relayout_plan(flat, keep, grown_flat), grown_state
    regrown = torch.isin(grown_flat, flat)
    if bool(regrown.any()):
        keep = keep.clone()
        keep[torch.searchsorted(flat, grown_flat[regrown])] = True
        grown_flat = grown_flat[~regrown]
        if grown_state:
            grown_state = {key: t[~regrown] for key, t in grown_state.items()}
    return relayout_plan(flat, keep, grown_flat), grown_state
