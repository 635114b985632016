"""Checkpoints of a training run: everything needed to continue to the identical result.

A checkpoint holds the model's, optimizer's, learning-rate schedule's and engine's
state dicts, the engine's update log, the completed epoch count, the metrics and
step times so far, every random generator's state (torch's global one and CUDA's,
the shuffling generator, Python's ``random``, numpy's global one) and the run's
configuration. It is written to a temporary file and renamed, so an interrupted
save never leaves a truncated checkpoint, and read with ``weights_only=True`` (no
code runs on load): numpy's state is stored as tensors for that reason.

Load order matters for the csr layout, whose structure is in the model's state:
the model is loaded first (each CsrLinear takes the checkpoint's structure into
its fixed-capacity buffers), then the optimizer, then the engine (which checks
each layer's nonzero count against the model's). Checkpoints of format 1 (before
CsrLinear and the per-layer engine state) are refused with a message.
"""

import dataclasses
import os
import random
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from ..sparsity.engine import UpdateRecord
from .loop import ConfigError, Run

__all__ = ["FORMAT", "IGNORED_ON_RESUME", "load_checkpoint", "restore", "save_checkpoint"]

# 2: the engine's state per layer view, CsrLinear's fixed-capacity storage.
FORMAT = 2
#: Options that do not change what is computed, so a resumed run may change them.
IGNORED_ON_RESUME = frozenset({"resume", "save", "json", "plot", "threads", "progress", "compare_dense",
                               "eval_batch_size"})


def save_checkpoint(path: Path, run: Run, config: Dict) -> None:
    """Write ``run``'s full state after its last completed epoch to ``path`` (atomically)."""
    np_state = np.random.get_state()
    state = {
        "format": FORMAT,
        "config": config,
        "epoch": run.epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "engine": None if run.engine is None else run.engine.state_dict(),
        "engine_history": [] if run.engine is None else [dataclasses.asdict(r) for r in run.engine.history],
        "history": run.history,
        "step_times": torch.tensor(run.step_times, dtype=torch.float64),
        "update_times": torch.tensor(run.update_times, dtype=torch.float64),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None,
            "shuffle": run.shuffle.get_state(),
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Dict:
    """Read a checkpoint written by :func:`save_checkpoint`; ConfigError naming ``--resume`` if it is not one."""
    if not path.is_file():
        raise ConfigError(f"--resume {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint
        raise ConfigError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"--resume {path}: not a checkpoint of this training command (format {FORMAT})")
    return state


def restore(run: Run, state: Dict, config: Dict, defaults: Dict, path: Path) -> None:
    """Load ``state`` into ``run``, which must have been built from the same options.

    Raises ConfigError listing the options (other than :data:`IGNORED_ON_RESUME`) whose
    values differ from the checkpoint's: a resumed run with other settings would not
    be the same run. An option the checkpoint does not record (added to the command
    since it was written) must be at its value in ``defaults``.
    """
    saved = state["config"]
    differ = sorted(k for k in config if k not in IGNORED_ON_RESUME
                    and saved.get(k, defaults.get(k)) != config[k])
    if differ:
        listing = "; ".join(f"--{k.replace('_', '-')}: checkpoint {saved.get(k, defaults.get(k))!r}, "
                            f"now {config[k]!r}" for k in differ)
        raise ConfigError(f"--resume {path} was written by a run with other options ({listing}); "
                          "resume with the same options")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.engine is not None:
        run.engine.load_state_dict(state["engine"])
        run.engine.history = [UpdateRecord(**r) for r in state["engine_history"]]
    run.epoch = state["epoch"]
    run.history = state["history"]
    run.step_times = state["step_times"].tolist()
    run.update_times = state["update_times"].tolist()
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.shuffle.set_state(rng["shuffle"])
    random.setstate(rng["python"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
