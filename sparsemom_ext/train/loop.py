"""The training run: model, optimizer, schedules, engine, epochs, evaluation, final results.

One :class:`Run` holds everything a checkpoint needs. Every source of randomness is
explicit so that a run resumed from a checkpoint reproduces the uninterrupted one
exactly: the model is initialised from torch's global generator seeded with
``seed``, the masks are drawn from a generator seeded with ``seed``, a random
validation split from a permutation seeded with ``seed`` (see :mod:`.data`), and the shuffling
(and augmentation) of each epoch from a generator seeded with ``seed + 1`` that the
checkpoint saves.

Per step: zero_grad, forward, cross-entropy, backward, ``optimizer.step()`` (fused
with the masks for sparse weights), the learning-rate schedule's step (per
iteration, as the reference code), ``engine.step()``. After each epoch: evaluation
on the validation split, then ``engine.end_of_epoch()`` (the topology update; the
engine's ``total_steps`` is the run's, so the last epoch's end does not update).

A run stops (:class:`TrainingStopped`, before the epoch's evaluation, update and
checkpoint) when it has diverged (an epoch's training loss is NaN or infinite, or the
engine's update meets NaN or inf) or collapsed (an epoch's training loss is no better
than chance, after an earlier epoch's was).
"""

import math
import random
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn import functional as F

import sparsemom_ext as sm

from . import models, speedup
from .data import Dataset

__all__ = ["ConfigError", "Run", "TrainingCollapsed", "TrainingDiverged", "TrainingStopped", "chance_loss",
           "make_optimizer", "make_scheduler", "training_step"]

#: Dense steps run before the timed ones of ``--compare-dense`` (allocator and caches warm up).
COMPARE_WARMUP_STEPS = 5
#: An epoch's training loss at or above this fraction of :func:`chance_loss` is "at chance":
#: the network does about as well as predicting the class frequencies whatever its input (a
#: disconnected network outputs its last bias), or worse. 2% below chance: an epoch that
#: is learning anything at all is well below it.
CHANCE_FRACTION = 0.98


class ConfigError(ValueError):
    """Options that cannot be run together (the command line reports it and exits with 2)."""


class TrainingStopped(RuntimeError):
    """A run that cannot go on (the command prints the message and exits with 1).

    Raised at the end of an epoch, before its evaluation, topology update and
    checkpoint, so the last checkpoint written is the last healthy state. ``kind`` is
    the key of ``--json`` that holds :meth:`facts`."""

    kind = "stopped"

    def facts(self) -> dict:
        raise NotImplementedError


class TrainingDiverged(TrainingStopped):
    """The training loss of an epoch was not finite (NaN or infinite), or the topology update
    at its end met NaN or inf (``cause``: the engine's message): the weights cannot recover."""

    kind = "diverged"

    def __init__(self, epoch: int, train_loss: float, lr: float, cause: Optional[str] = None):
        self.epoch, self.train_loss, self.lr, self.cause = epoch, train_loss, lr, cause
        what = cause if cause is not None else f"the training loss of epoch {epoch} is {train_loss}"
        super().__init__(f"training diverged: {what} (learning rate {lr:g}); lower --lr or try another --seed")

    def facts(self) -> dict:
        facts = {"epoch": self.epoch, "train_loss": str(self.train_loss), "lr": self.lr}
        if self.cause is not None:
            facts["cause"] = self.cause
        return facts


class TrainingCollapsed(TrainingStopped):
    """An epoch's training loss was at chance (:data:`CHANCE_FRACTION` of :func:`chance_loss`
    or more) after an earlier epoch's was below it: the network has stopped using its input
    (at 5% density, a fully connected layer that lost its units does this)."""

    kind = "collapsed"

    def __init__(self, epoch: int, train_loss: float, chance: float, best_epoch: int, best_loss: float, lr: float):
        self.epoch, self.train_loss, self.chance, self.lr = epoch, train_loss, chance, lr
        self.best_epoch, self.best_loss = best_epoch, best_loss
        super().__init__(f"training collapsed: the training loss of epoch {epoch} is {train_loss:.4f}, no better "
                         f"than chance ({chance:.4f}, predicting the class frequencies), after {best_loss:.4f} at "
                         f"epoch {best_epoch} (learning rate {lr:g}); lower --lr or try another --seed")

    def facts(self) -> dict:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "chance_loss": self.chance,
                "best_epoch": self.best_epoch, "best_train_loss": self.best_loss, "lr": self.lr}


def chance_loss(labels: torch.Tensor) -> float:
    """The cross-entropy of the best prediction that ignores the input: the entropy of the
    class frequencies of ``labels`` (ln 10 for 10 balanced classes)."""
    p = torch.bincount(labels.reshape(-1).cpu()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def make_optimizer(args, params) -> torch.optim.Optimizer:
    """``sm.optim.SGD`` / ``Adam`` / ``AdamW`` with the command line's settings (fused masked steps)."""
    lr = args.lr
    if args.optimizer == "sgd":
        return sm.optim.SGD(params, lr=lr, momentum=args.momentum, nesterov=args.nesterov,
                            weight_decay=args.weight_decay)
    cls = sm.optim.Adam if args.optimizer == "adam" else sm.optim.AdamW
    return cls(params, lr=lr, weight_decay=args.weight_decay)


def make_scheduler(args, optimizer, total_steps: int):
    """The per-iteration learning-rate schedule: x``lr_decay`` every ``lr_decay_every`` steps, or cosine to 0."""
    if args.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_decay_every, gamma=args.lr_decay)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def training_step(model, optimizer, scheduler, engine, x, y) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step; returns (logits, loss). The same function is timed for the run and the dense baseline."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    scheduler.step()
    if engine is not None:
        engine.step()
    return logits, loss


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress_bar(progress: Optional[bool], total: int, description: str):
    """A tqdm bar on stderr, or None: ``progress`` None shows one when stderr is a terminal.

    tqdm is imported only when a bar is shown, so runs without one (logs, tests)
    do not need it.
    """
    if not (sys.stderr.isatty() if progress is None else progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)


class Run:
    """A training run as the command line describes it (``args``), on ``data``, on ``device``.

    ``args.dense`` trains the dense model (no sparsify, no engine). Everything else is
    built here; :class:`ConfigError` is raised for a combination the library rejects
    (e.g. a layout or growth the engine does not support), with the library's message.
    """

    def __init__(self, args, data: Dataset, device: torch.device):
        self.args, self.data, self.device = args, data, device
        self.steps_per_epoch = math.ceil(len(data.train_y) / args.batch_size)
        self.total_steps = args.epochs * self.steps_per_epoch
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.model = self.build_model(dense=args.dense)
        try:
            self.optimizer = make_optimizer(args, self.model.parameters())
        except ValueError as exc:
            raise ConfigError(f"--optimizer {args.optimizer}: {exc}") from exc
        self.scheduler = make_scheduler(args, self.optimizer, self.total_steps)
        self.engine = None
        if not args.dense:
            try:
                self.engine = sm.SparseMomentum(
                    self.model, self.optimizer, prune_rate=args.prune_rate, final_prune_rate=args.final_prune_rate,
                    update_every=args.update_every, total_steps=self.total_steps, growth=args.growth,
                    prune=args.prune, redistribution=args.redistribution, decay=args.prune_decay, seed=args.seed,
                    steps_per_epoch=self.steps_per_epoch, decay_end=args.decay_end, scope=args.scope,
                    candidates=args.candidates, sampling=args.sampling, window=args.window,
                    connectivity=args.connectivity, lr_ramp_steps=args.lr_ramp_steps,
                    lr_ramp_start=args.lr_ramp_start)
            except ValueError as exc:
                raise ConfigError(f"the sparsity engine rejects these options: {exc}") from exc
        self.shuffle = torch.Generator().manual_seed(args.seed + 1)
        self.chance_loss = chance_loss(data.train_y)
        self.epoch = 0  # epochs completed
        self.history: List[dict] = []  # one record per completed epoch
        self.step_times: List[float] = []  # seconds, every training step of the run
        self.update_times: List[float] = []  # seconds, every end-of-epoch topology update

    # ---------------------------------------------------------------- setup
    def build_model(self, dense: bool) -> torch.nn.Module:
        """The model from torch's global generator as it stands; sparsified unless ``dense``."""
        args = self.args
        try:
            model = models.build_model(args.model, self.data.in_shape, self.data.num_classes,
                                       widths=args.widths, dropout=args.dropout)
        except models.ModelError as exc:
            raise ConfigError(f"--model {args.model}: {exc}") from exc
        if not dense:
            try:
                sm.sparsify(model, density=args.density, distribution=args.distribution, layout=args.layout,
                            generator=torch.Generator().manual_seed(args.seed), connectivity=args.connectivity)
            except ValueError as exc:
                raise ConfigError(f"cannot sparsify {args.model} with --density {args.density} "
                                  f"--distribution {args.distribution} --layout {args.layout} "
                                  f"--connectivity {args.connectivity}: {exc}") from exc
            convs = [name for name, m in model.named_modules() if isinstance(m, sm.CsrConv2d)]
            if convs and self.device.type != "cpu":
                raise ConfigError(f"--layout csr --device {self.device.type}: the csr convolutions of {args.model} "
                                  f"({', '.join(convs[:3])}{', ...' if len(convs) > 3 else ''}) run on the CPU only; "
                                  "use --layout mask on the GPU")
            if convs:  # no transposes between the csr convs (VGG-16: 2.81x dense against 2.42x)
                sm.nn.keep_batch_innermost(model)
        return model.to(self.device)

    def layer_densities(self) -> Dict[str, float]:
        """Each conv/linear layer's fraction of active weights (1.0 for dense layers)."""
        return {name: speedup.weight_density(m) for name, m in speedup.weight_layers(self.model)}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float, Dict[str, float]]:
        """(mean loss, accuracy, input density per conv/linear layer) over ``images`` in eval mode.

        The input density of a layer is the fraction of nonzero entries of everything
        it received: the activation density the paper's speed-up estimate uses.
        """
        layers = speedup.weight_layers(self.model)
        nonzero = {name: torch.zeros((), dtype=torch.int64, device=self.device) for name, _ in layers}
        total = dict.fromkeys(nonzero, 0)

        def count(name):
            def hook(module, args):
                nonzero[name] += torch.count_nonzero(args[0])
                total[name] += args[0].numel()
            return hook

        handles = [m.register_forward_pre_hook(count(name)) for name, m in layers]
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        try:
            for start in range(0, len(labels), self.args.eval_batch_size):
                x = self.data.batch(images[start:start + self.args.eval_batch_size])
                y = labels[start:start + self.args.eval_batch_size]
                logits = self.model(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
        finally:
            for h in handles:
                h.remove()
            self.model.train()
        n = len(labels)
        density = {name: int(nonzero[name]) / total[name] if total[name] else 1.0 for name in nonzero}
        return float(loss_sum) / n, int(correct) / n, density

    # ---------------------------------------------------------------- training
    def train_epoch(self, progress: Optional[bool]) -> dict:
        """Train one epoch, evaluate, update the topology; append and return the epoch's record."""
        args, data, device = self.args, self.data, self.device
        epoch = self.epoch + 1
        self.model.train()
        order = torch.randperm(len(data.train_y), generator=self.shuffle)
        augment = self.shuffle if args.augment else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        step_times = []
        bar = _progress_bar(progress, self.steps_per_epoch, f"epoch {epoch}/{args.epochs}")
        started = time.perf_counter()
        for i in range(self.steps_per_epoch):
            index = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = data.batch(data.train_x[index], augment)
            y = data.train_y[index]
            _synchronize(device)
            t0 = time.perf_counter()
            try:  # with --update-every the engine updates inside the step
                logits, loss = training_step(self.model, self.optimizer, self.scheduler, self.engine, x, y)
            except sm.NonFiniteSignalError as exc:
                raise TrainingDiverged(epoch, float(loss_sum) / max(seen, 1), self.optimizer.param_groups[0]["lr"],
                                       cause=str(exc)) from exc
            _synchronize(device)
            step_times.append(time.perf_counter() - t0)
            with torch.no_grad():
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if bar is not None:
                bar.update()
                if i % 20 == 19 or i == self.steps_per_epoch - 1:  # reading the sums synchronises: not every step
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{100 * int(correct) / seen:.2f}%")
        if bar is not None:
            bar.close()
        train_s = time.perf_counter() - started
        lr = self.optimizer.param_groups[0]["lr"]
        if not math.isfinite(float(loss_sum)):
            raise TrainingDiverged(epoch, float(loss_sum) / seen, lr)
        self._check_not_collapsed(epoch, float(loss_sum) / seen, lr)

        record = {"epoch": epoch, "train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen,
                  "val_loss": None, "val_acc": None, "input_density": None,
                  "lr": self.optimizer.param_groups[0]["lr"], "steps": self.steps_per_epoch * epoch}
        started = time.perf_counter()
        if len(data.val_y):
            record["val_loss"], record["val_acc"], record["input_density"] = self.evaluate(data.val_x, data.val_y)
        record["eval_s"] = time.perf_counter() - started
        # The densities each layer trained with this epoch (before this epoch's update).
        record["layer_density"] = self.layer_densities()
        record["prune_rate"], record["update_s"] = None, 0.0
        if self.engine is not None:
            updates, rate = self.engine.updates, self.engine.prune_rate()
            started = time.perf_counter()
            try:
                self.engine.end_of_epoch()
            except sm.NonFiniteSignalError as exc:  # nothing was changed: stop as a divergence
                raise TrainingDiverged(epoch, record["train_loss"], lr, cause=str(exc)) from exc
            record["update_s"] = time.perf_counter() - started
            if self.engine.updates > updates:
                record["prune_rate"] = rate
        record.update(train_s=train_s, step_median_s=statistics.median(step_times))
        self.epoch = epoch
        self.history.append(record)
        self.step_times.extend(step_times)
        self.update_times.append(record["update_s"])
        return record

    def _check_not_collapsed(self, epoch: int, train_loss: float, lr: float) -> None:
        """:class:`TrainingCollapsed` when ``train_loss`` is at chance and an earlier epoch's
        (``history``, restored on resume) was below it."""
        threshold = CHANCE_FRACTION * self.chance_loss
        earlier = [(r["train_loss"], r["epoch"]) for r in self.history if r["train_loss"] < threshold]
        if train_loss >= threshold and earlier:
            best_loss, best_epoch = min(earlier)
            raise TrainingCollapsed(epoch, train_loss, self.chance_loss, best_epoch, best_loss, lr)

    # ---------------------------------------------------------------- final results
    def compare_dense(self, steps: int) -> List[float]:
        """Step times of the same model trained dense with the same settings, after a warm-up.

        Runs inside a forked RNG state on batches of its own generator, so the run's
        random streams (and a later resume) are untouched.
        """
        args, data = self.args, self.data
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(args.seed)
            model = self.build_model(dense=True)
            optimizer = make_optimizer(args, model.parameters())
            scheduler = make_scheduler(args, optimizer, self.total_steps)
            sampler = torch.Generator().manual_seed(args.seed + 2)
            batches = []
            for _ in range(COMPARE_WARMUP_STEPS + steps):
                index = torch.randint(0, len(data.train_y), (min(args.batch_size, len(data.train_y)),),
                                      generator=sampler)
                batches.append((data.batch(data.train_x[index], sampler if args.augment else None),
                                data.train_y[index]))
            times = speedup.time_steps(lambda x, y: training_step(model, optimizer, scheduler, None, x, y),
                                       batches, COMPARE_WARMUP_STEPS, self.device)
        return times

    def finish(self) -> dict:
        """Test evaluation, speed-up accounting (estimated and measured): the results dict."""
        args, data = self.args, self.data
        test_loss, test_acc, test_input_density = self.evaluate(data.test_x, data.test_y)
        sample = data.batch(data.test_x[:args.batch_size])
        timings = speedup.time_layers(self.model, sample, test_input_density)
        dense_s = {t.name: t.dense_s for t in timings}
        kinds = {t.name: t.kind for t in timings}
        for record in self.history:
            record["estimated_speedup"] = (
                None if record["input_density"] is None else
                speedup.estimated_speedup(dense_s, kinds, record["layer_density"], record["input_density"]))
        run_step = statistics.median(self.step_times)
        # The median, not the mean, of the steps: robust to other jobs on the machine, like the
        # dense baseline's median it is compared with; the updates' whole cost is spread over the steps.
        amortised = run_step + sum(self.update_times) / len(self.step_times)
        dense_times = self.compare_dense(args.compare_dense) if not args.dense and args.compare_dense > 0 else []
        dense_step = statistics.median(dense_times) if dense_times else None
        results = {
            "test": {"loss": test_loss, "accuracy": test_acc, "error": 1.0 - test_acc},
            "layers": {name: {"density": d, "input_density": test_input_density[name]}
                       for name, d in self.layer_densities().items()},
            "density_report": None if self.engine is None else sm.density_report(self.model).to_dict(),
            "epochs": self.history,
            "timing": {
                "steps": len(self.step_times),
                "step_median_s": run_step,
                "step_amortised_s": amortised,
                "train_s": sum(r["train_s"] for r in self.history),
                "update_s": sum(self.update_times),
                # Wall clock of the training loops (batch preparation included) and updates, per step.
                "wall_per_step_s": (sum(r["train_s"] for r in self.history) + sum(self.update_times))
                                   / len(self.step_times),
                "epoch_train_s": [r["train_s"] for r in self.history],
            },
            "speedup": speedup.summarise(timings, run_step, amortised, dense_step, len(dense_times)),
            "topology_updates": [] if self.engine is None else [vars(r) for r in self.engine.history],
        }
        if args.dense:
            results["speedup"]["measured_training"] = {"note": "the run is dense: nothing to compare"}
        return results
