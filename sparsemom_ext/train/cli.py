"""The training command: ``python -m sparsemom_ext.train`` (installed as ``sparsemom-train``).

Trains a model with sparse momentum (or SET / RigL-style growth, or dense with
``--dense``) and reports the test error, each layer's density, the time per epoch and
two speed-ups over dense side by side: the paper's estimate and the measured wall
clock (see :mod:`sparsemom_ext.train.speedup`). The defaults are the settings of the
paper's reference code: SGD with Nesterov momentum 0.9, lr 0.1, weight decay 5e-4,
batch 100, lr x0.1 every 25,000 iterations, 100 epochs, density 0.05 with a uniform
initial distribution, prune rate 0.5 decayed by cosine to 0.005, topology updates at
every epoch end, the last 10% of the training set held out for validation. Every one can
be overridden. Beyond the reference, the connectivity rule is on (``--connectivity
reference`` turns it off), the lr ramps up over the 50 steps after each topology update
(``--lr-ramp-steps 0`` turns it off) and a run that collapses to chance stops like a
diverged one.

Bad arguments (an unknown model, a density outside (0, 1], a learning rate that is not
finite, a missing data directory, data with no test images or labels out of range,
options the engine rejects together, ``--device cuda`` without CUDA, an output path
that cannot be written, a damaged or foreign ``--resume`` checkpoint, ...) end the
command with a one-line message naming the option and exit status 2, before the first
epoch: nothing trains to fail at the end.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

import sparsemom_ext as sm

from ..nn import LAYOUTS
from ..sparsity.growth import GROWTHS
from ..sparsity.options import PRUNES, REDISTRIBUTIONS, SCOPES
from ..sparsity.schedule import DECAYS
from ..sparsity.init import DISTRIBUTIONS
from ..sparsity.sampling import SAMPLINGS
from . import checkpoint, models, plots, report
from ..sparsity.connectivity import CONNECTIVITIES
from .data import DATASETS, VAL_SPLIT_MODES, DataError, load_dataset
from .loop import ConfigError, Run, TrainingStopped

__all__ = ["DEFAULT_LR", "build_parser", "console_main", "main", "run_command"]

#: The learning rate when ``--lr`` is not given: the paper's SGD rate, Adam's usual one.
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
#: The largest ``--lr``: far past any rate that trains (a run diverges, and says so, well below
#: it), and low enough that the steps' arithmetic stays finite.
MAX_LR = 1e6


def _number(kind, low=None, high=None, low_open=False, high_open=False, what=""):
    """An argparse type: ``kind`` (int or float) within the bounds, else a message stating them."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def _model_name(text: str) -> str:
    try:
        return models.check_model_name(text)
    except models.ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _widths(text: str):
    parts = text.replace("-", ",").split(",")
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected hidden widths like 4096,4096,4096, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"hidden widths must be positive integers, got {text!r}")
    return widths


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (usage: {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None / False of optional values and flags."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the training command (defaults: the paper's reference settings)."""
    p = _Parser(
        prog="sparsemom-train",
        description="Train a sparse network from scratch with sparse momentum (or dense with --dense) and report "
                    "test error, per-layer density and the speed-up over dense: estimated (the paper's method) "
                    "and measured (wall clock).",
        formatter_class=_HelpFormatter)
    positive_int = _number(int, low=1, what="a positive integer")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", type=_model_name, default="lenet300",
                   help=f"one of {', '.join(models.MODEL_NAMES)}, or wrn-DEPTH-WIDTH")
    g.add_argument("--widths", type=_widths, default=",".join(map(str, models.DEFAULT_MLP_WIDTHS)),
                   help="hidden widths of --model mlp, e.g. 4096,4096,4096")
    g.add_argument("--dropout", type=_number(float, 0.0, 1.0, high_open=True, what="in [0, 1)"), default=0.3,
                   help="dropout between the convs of a wide-resnet block (the reference code's 0.3)")
    g.add_argument("--dataset", choices=DATASETS, default="mnist",
                   help="mnist: the copy inside the package; idx: a directory of IDX files (--data-dir); "
                        "cifar10: the python-version batches in --data-dir")
    g.add_argument("--data-dir", type=Path, default=None, help="folder of the data set's files")
    g.add_argument("--val-split", type=_number(float, 0.0, 1.0, high_open=True, what="in [0, 1)"), default=0.1,
                   help="fraction of the training images held out for validation")
    g.add_argument("--val-split-mode", choices=VAL_SPLIT_MODES, default="last",
                   help="last: the last images of the training set (the reference code's split, the same for "
                        "every seed); random: a permutation seeded by --seed")
    g.add_argument("--train-size", type=positive_int, default=None,
                   help="use only the first N training images (before the validation split)")
    g.add_argument("--test-size", type=positive_int, default=None, help="use only the first N test images")
    g.add_argument("--augment", action="store_true",
                   help="random crop (zero padding 4) and horizontal flip of training images, as the reference "
                        "code's --augment (for cifar10)")

    g = p.add_argument_group("sparsity")
    g.add_argument("--dense", action="store_true",
                   help="train the dense model with the same settings (the sparsity options are then ignored)")
    g.add_argument("--density", type=_number(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=0.05,
                   help="fraction of active weights over all conv/linear layers")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default="uniform", help="initial density per layer")
    g.add_argument("--connectivity", choices=CONNECTIVITIES, default="floor",
                   help="floor: no output unit of a layer is ever left without an input, at initialisation or "
                        "at an update (docs/algorithms.md, section 5); reference: the reference code's behaviour")
    g.add_argument("--layout", choices=LAYOUTS, default="mask",
                   help="mask: dense weight + mask (exact sparse momentum); csr: always-sparse storage")
    g.add_argument("--growth", choices=tuple(GROWTHS), default="momentum",
                   help="which inactive weights to activate: largest momentum (sparse momentum; in the csr "
                        "layout accumulated over a window for sampled candidates), random (SET), largest gradient "
                        "(RigL), largest gradient among sampled candidates (GSE)")
    g.add_argument("--prune", choices=PRUNES, default="magnitude",
                   help="which active weights to remove: smallest magnitude, or closest to 0 on each side (SET)")
    g.add_argument("--redistribution", choices=REDISTRIBUTIONS, default="momentum",
                   help="how the removed weights are shared among layers for regrowth")
    unit = _number(float, 0.0, 1.0, what="in [0, 1]")
    g.add_argument("--prune-rate", type=unit, default=0.5, help="initial fraction of active weights pruned per update")
    g.add_argument("--final-prune-rate", type=unit, default=0.005, help="the prune rate the decay ends at")
    g.add_argument("--prune-decay", choices=DECAYS, default="cosine",
                   help="schedule of the prune rate over the run")
    g.add_argument("--update-every", type=positive_int, default=None,
                   help="update the topology every N steps instead of at each epoch end")
    g.add_argument("--decay-end", type=_number(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=1.0,
                   help="fraction of the run at which the prune rate reaches its final value (GSE: 0.6)")
    g.add_argument("--scope", choices=SCOPES, default="layer",
                   help="layer: prune per layer and redistribute; global: prune and grow across all layers")
    g.add_argument("--sampling", choices=SAMPLINGS, default="grabo",
                   help="how gse and csr-layout momentum draw candidates: grabo (|input| x |output gradient| "
                        "of the last batch) or uniform")
    g.add_argument("--candidates", type=_number(float, 0.0, 1e6, low_open=True, what="> 0"), default=1.0,
                   help="candidate-set size as a multiple of a layer's active weights (GSE's gamma)")
    g.add_argument("--window", type=positive_int, default=100,
                   help="steps over which csr-layout momentum accumulates its candidates' momentum before an update")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=100, help="passes over the training split")
    g.add_argument("--batch-size", type=positive_int, default=100, help="training batch size")
    g.add_argument("--eval-batch-size", type=positive_int, default=1000,
                   help="batch size of validation and test evaluation (does not change results)")
    g.add_argument("--optimizer", choices=tuple(DEFAULT_LR), default="sgd",
                   help="sparsemom_ext.optim SGD / Adam / AdamW (steps fused with the masks)")
    g.add_argument("--lr", type=_number(float, 0.0, MAX_LR, low_open=True, what="in (0, 1e6]"), default=None,
                   help="learning rate (default: 0.1 for sgd, 0.001 for adam/adamw)")
    g.add_argument("--momentum", type=_number(float, 0.0, 1.0, high_open=True, what="in [0, 1)"), default=0.9,
                   help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum (sgd)")
    g.add_argument("--weight-decay", type=unit, default=5e-4,
                   help="L2 penalty (decoupled for adamw)")
    g.add_argument("--lr-schedule", choices=("step", "cosine"), default="step",
                   help="step: x--lr-decay every --lr-decay-every iterations; cosine: to 0 over the run")
    g.add_argument("--lr-decay-every", type=positive_int, default=25000, help="iterations between lr steps")
    g.add_argument("--lr-decay", type=_number(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=0.1,
                   help="factor of each lr step")
    g.add_argument("--lr-ramp-steps", type=_number(int, 0, what="a non-negative integer"), default=50,
                   help="after each topology update, ramp the lr linearly from --lr-ramp-start x lr to lr over "
                        "this many steps (docs/algorithms.md, section 6); 0: the reference code's constant lr")
    g.add_argument("--lr-ramp-start", type=_number(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=0.02,
                   help="the lr fraction of the first step after a topology update")
    g.add_argument("--seed", type=_number(int, 0, what="a non-negative integer"), default=0,
                   help="seeds the initial weights, masks, shuffling, the engine and a random validation split")

    g = p.add_argument_group("machine and output")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model and data live")
    g.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    g.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=True,
                   help="flush denormal floats to zero on the CPU (torch.set_flush_denormal). Momentum of weights "
                        "whose gradient stays 0 (dead units) decays through the denormal range, which made "
                        "LeNet-300-100 steps 2.6x slower after a few epochs without it")
    g.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, make glibc's malloc keep freed memory (sm.keep_freed_cpu_memory), so a step's "
                        "large activations are not mapped and faulted in afresh every step (a csr VGG-16 step "
                        "took 407 ms without it, 352 ms with it); for the whole process, which then keeps its "
                        "peak heap until it exits")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar per epoch on stderr (default: when stderr is a terminal)")
    g.add_argument("--compare-dense", type=_number(int, 0, what="a non-negative integer"), default=50,
                   metavar="N", help="time N training steps of the dense model to measure the speed-up (0: off)")
    g.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write config, per-epoch metrics, test error, densities, timing and speed-ups")
    g.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help=f"write {', '.join(plots.PLOT_FILES)} (needs matplotlib)")
    g.add_argument("--save", type=Path, default=None, metavar="PATH",
                   help="checkpoint after every epoch; '{epoch}' in PATH keeps one file per epoch")
    g.add_argument("--resume", type=Path, default=None, metavar="PATH",
                   help="continue a run from its checkpoint (same options) to the identical result")
    return p


def _config(args) -> dict:
    """The options as JSON- and checkpoint-safe values."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in vars(args).items()}


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"no GPU is visible to torch {torch.__version__}")
        raise ConfigError(f"--device cuda: CUDA is not available ({why})")
    return torch.device(name)


def run_command(args, argv: List[str]) -> dict:
    """Run the training ``args`` describe: print progress and the final report; return the results."""
    started = time.perf_counter()
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    device = _device(args.device)
    if args.plot is not None:
        try:
            plots.require_matplotlib()
        except ImportError as exc:
            raise ConfigError(str(exc)) from exc
    _check_outputs(args)
    threads = torch.get_num_threads()
    try:
        # Both are process-wide settings: put back afterwards, for callers of main() in a
        # running process (the tests). The denormal mode first: it is a per-thread CPU
        # flag that worker threads inherit only when they are created after it is set.
        torch.set_flush_denormal(args.flush_denormal)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        # Not put back: glibc cannot return to its adaptive thresholds once they are set.
        freed_memory_kept = device.type == "cpu" and args.keep_freed_memory and sm.keep_freed_cpu_memory()
        return _train_and_report(args, argv, device, started, freed_memory_kept)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def _check_writable(option: str, path: Path, directory: bool = False, given: Optional[Path] = None) -> None:
    """ConfigError naming ``option`` unless files can be written at ``path`` (``directory``: in the
    folder ``path``): found before the first epoch instead of after the run, whose results would be lost.
    ``given``: the option's value as given, named in the message (default ``path``)."""
    given = path if given is None else given
    folder = path if directory else path.parent
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {given}: exists and is not a directory")
    if not directory and path.is_dir():
        raise ConfigError(f"{option} {given}: is a directory; give the path of a file")
    if not directory and path.exists() and not path.is_file():
        raise ConfigError(f"{option} {given}: exists and is not a regular file")
    if not directory and path.is_file() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {given}: the file is not writable")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {given}: {existing} is not a directory")
    try:  # a few bytes, flushed to the device: a read-only or full one refuses them
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise ConfigError(f"{option} {given}: cannot write in {existing} ({exc.strerror or exc})") from exc


def _check_outputs(args) -> None:
    if args.save is not None:
        _check_writable("--save", Path(str(args.save).replace("{epoch}", "1")), given=args.save)
    if args.json is not None:
        _check_writable("--json", args.json)
    if args.plot is not None:
        _check_writable("--plot", args.plot, directory=True)
        for name in plots.PLOT_FILES:
            _check_writable("--plot", args.plot / name)


@contextlib.contextmanager
def _writing(option: str, path: Path):
    """An output that fails after the checks (the device filled up during the run) as a ConfigError."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write it ({exc.strerror or exc})") from exc


def _train_and_report(args, argv: List[str], device: torch.device, started: float,
                      freed_memory_kept: bool) -> dict:
    data = load_dataset(args.dataset, args.data_dir, args.val_split, args.seed, args.train_size,
                        args.test_size, args.val_split_mode).to(device)
    run = Run(args, data, device)
    config = _config(args)
    print(report.header(args, data, run.steps_per_epoch, torch.get_num_threads(), freed_memory_kept), flush=True)
    if args.resume is not None:
        defaults = _config(build_parser().parse_args([]))
        checkpoint.restore(run, checkpoint.load_checkpoint(args.resume), config, defaults, args.resume)
        print(f"resumed from {args.resume} after epoch {run.epoch}", flush=True)
    try:
        while run.epoch < args.epochs:
            record = run.train_epoch(args.progress)
            print(report.epoch_line(record, args.epochs), flush=True)
            if args.save is not None:
                path = Path(str(args.save).replace("{epoch}", str(run.epoch)))
                with _writing("--save", path):
                    checkpoint.save_checkpoint(path, run, config)
    except TrainingStopped as exc:
        # What was learnt up to the divergence or collapse still goes to --json, marked as such.
        _write_json(args, {exc.kind: exc.facts(), "epochs": run.history,
                           "topology_updates": [] if run.engine is None else [vars(r) for r in run.engine.history],
                           **_run_facts(args, argv, config, device, started, freed_memory_kept)})
        raise
    results = run.finish()
    results.update(_run_facts(args, argv, config, device, started, freed_memory_kept))
    print()
    print(report.final_report(args, results), flush=True)
    _write_json(args, results)
    if args.plot is not None:
        title = f"{args.model} on {args.dataset}, " + ("dense" if args.dense else f"density {args.density}")
        with _writing("--plot", args.plot):
            for path in plots.write_plots(results, args.plot, title):
                print(f"wrote {path}")
    return results


def _run_facts(args, argv: List[str], config: dict, device: torch.device, started: float,
               freed_memory_kept: bool) -> dict:
    return {"config": config, "command": argv,
            "environment": {"torch": torch.__version__, "sparsemom_ext": sm.__version__,
                            "threads": torch.get_num_threads(), "device": str(device), "build": sm.build_info(),
                            "freed_cpu_memory_kept": freed_memory_kept},
            "wall_s": time.perf_counter() - started}


def _write_json(args, results: dict) -> None:
    if args.json is not None:
        with _writing("--json", args.json):
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default: the command line), train, report; 0 on success.

    Bad options exit with status 2 and a one-line message naming the option (SystemExit). A run
    whose training loss becomes NaN or infinite (or whose topology update meets NaN or inf),
    or that collapses (an epoch's training loss no better than chance after a better one),
    stops at the end of that epoch with a one-line message and returns 1; its checkpoints
    end at the last epoch before, and ``--json`` holds what happened (``"diverged"`` or
    ``"collapsed"``) and the epochs trained.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_command(args, argv)
    except (ConfigError, DataError) as exc:
        parser.exit(2, f"{parser.prog}: error: {_one_line(exc)}\n")
    except TrainingStopped as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0


def console_main() -> None:
    """Entry point of the ``sparsemom-train`` console script."""
    sys.exit(main())
