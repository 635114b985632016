"""Checkpoints of a training run: everything needed to continue to the identical result.

A checkpoint holds the model's, optimizer's, learning-rate schedule's and engine's
state dicts, the engine's update log, the completed epoch count, the metrics and
step times so far, every random generator's state (torch's global one and CUDA's,
the shuffling generator, Python's ``random``, numpy's global one) and the run's
configuration. It is written to a temporary file and renamed, so an interrupted
save never leaves a truncated checkpoint, and read with ``weights_only=True`` (no
code runs on load): numpy's state is stored as tensors for that reason. The file is
``{"format", "sha256", "payload"}``: the state serialised by ``torch.save`` (as a uint8
tensor: stored as raw bytes) and the sha256 of those bytes, which ``--resume`` verifies
before it reads anything, so a damaged file is refused rather than trained on.

Load order matters for the csr layout, whose structure is in the model's state:
the model is loaded first (each CsrLinear takes the checkpoint's structure into
its fixed-capacity buffers), then the optimizer, then the engine (which checks
each layer's nonzero count against the model's, and its masks against the model's).
Checkpoints of an older format (1: before CsrLinear and the per-layer engine state; 2:
before the integrity check) are refused with a message.
"""

import dataclasses
import hashlib
import io
import os
import random
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from ..sparsity.engine import UpdateRecord
from .loop import ConfigError, Run

__all__ = ["FORMAT", "IGNORED_ON_RESUME", "checkpoint_state", "load_checkpoint", "restore", "save_checkpoint",
           "write_checkpoint"]

# 2: the engine's state per layer view, CsrLinear's fixed-capacity storage. 3: the sha256 of the payload.
FORMAT = 4
# The entries of a checkpoint's state and the types restore() needs them to have.
_ENTRIES = {"config": dict, "epoch": int, "model": dict, "optimizer": dict, "scheduler": dict,
            "engine": (dict, type(None)), "engine_history": list, "history": list, "step_times": torch.Tensor,
            "update_times": torch.Tensor, "rng": dict}
_RNG_ENTRIES = ("torch", "cuda", "shuffle", "python", "numpy")
#: Options that do not change what is computed, so a resumed run may change them.
IGNORED_ON_RESUME = frozenset({"resume", "save", "json", "plot", "threads", "progress", "compare_dense",
                               "eval_batch_size"})


def checkpoint_state(run: Run, config: Dict) -> Dict:
    """``run``'s full state after its last completed epoch, as a checkpoint holds it."""
    np_state = np.random.get_state()
    return {
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


def write_checkpoint(path: Path, state: Dict) -> None:
    """Write ``state`` (as :func:`checkpoint_state` makes it) to ``path`` atomically, with its sha256."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "sha256": digest, "payload": torch.frombuffer(payload, dtype=torch.uint8)}, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, run: Run, config: Dict) -> None:
    """Write ``run``'s full state after its last completed epoch to ``path`` (atomically)."""
    write_checkpoint(path, checkpoint_state(run, config))


def _torch_load(path: Path, source) -> object:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint
        # Only the kind of failure: torch's text suggests weights_only=False, which would run
        # whatever code the file holds.
        raise ConfigError(f"--resume {path}: not a checkpoint of this training command (torch.load with "
                          f"weights_only=True cannot read it: {type(exc).__name__})") from exc


def load_checkpoint(path: Path) -> Dict:
    """Read a checkpoint written by :func:`save_checkpoint`, its sha256 verified and its entries
    checked; ConfigError naming ``--resume`` (one line) if it is not one, or is damaged."""
    if not path.is_file():
        raise ConfigError(f"--resume {path}: no such file")
    outer = _torch_load(path, path)
    version = outer.get("format") if isinstance(outer, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and 0 < version < FORMAT:
        raise ConfigError(f"--resume {path}: a checkpoint of format {version}, written by an older version of this "
                          f"command; this one reads format {FORMAT}")
    payload = outer.get("payload") if version == FORMAT else None
    if (not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1
            or not isinstance(outer.get("sha256"), str)):
        raise ConfigError(f"--resume {path}: not a checkpoint of this training command (format {FORMAT})")
    payload = payload.numpy()
    if hashlib.sha256(payload).hexdigest() != outer["sha256"]:
        raise ConfigError(f"--resume {path}: the checkpoint is damaged (the sha256 of its payload does not match "
                          "the one stored with it); resume from another checkpoint")
    state = _torch_load(path, io.BytesIO(payload.tobytes()))
    if not isinstance(state, dict):
        raise ConfigError(f"--resume {path}: not a checkpoint of this training command (format {FORMAT})")
    for key, kind in _ENTRIES.items():
        if key not in state:
            raise ConfigError(f"--resume {path}: the checkpoint has no {key!r} entry")
        if not isinstance(state[key], kind) or (kind is int and (isinstance(state[key], bool) or state[key] < 0)):
            raise ConfigError(f"--resume {path}: the checkpoint's {key!r} entry is a {type(state[key]).__name__}, "
                              "not what this command writes")
    missing = [key for key in _RNG_ENTRIES if key not in state["rng"]]
    if missing:
        raise ConfigError(f"--resume {path}: the checkpoint's 'rng' entry has no {missing}")
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
    part = "the model"
    try:
        _check_model_dtypes(run.model, state["model"])
        run.model.load_state_dict(state["model"])
        part = "the engine"
        if run.engine is not None:
            _check_engine_masks(run.engine, state["engine"])
        part = "the optimizer"
        run.optimizer.load_state_dict(state["optimizer"])
        part = "the learning-rate schedule"
        run.scheduler.load_state_dict(state["scheduler"])
        part = "the engine"
        if run.engine is not None:
            run.engine.load_state_dict(state["engine"])
            run.engine.history = [UpdateRecord(**r) for r in state["engine_history"]]
        part = "the random generators"
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        run.shuffle.set_state(rng["shuffle"])
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    except (ConfigError, RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # A checkpoint that passed its sha256 but does not fit this run (edited, or of another version).
        raise ConfigError(f"--resume {path}: the checkpoint's state of {part} does not fit this run: "
                          f"{' '.join(str(exc).split())}") from exc
    run.epoch = state["epoch"]
    run.history = state["history"]
    run.step_times = state["step_times"].tolist()
    run.update_times = state["update_times"].tolist()


def _check_model_dtypes(model, saved: Dict) -> None:
    """Each saved tensor of the model's dtype: load_state_dict would cast silently (a float mask
    of 0.5 becoming True)."""
    current = model.state_dict()
    for key, value in saved.items():
        if key in current and isinstance(value, torch.Tensor) and value.dtype != current[key].dtype:
            raise ValueError(f"its {key!r} is {value.dtype}, the model's is {current[key].dtype}")


def _check_engine_masks(engine, saved: Dict) -> None:
    """The engine state's masks must be the ones the model just loaded: the engine's load would
    otherwise replace them, and which of the two the run had is unknown."""
    layers = saved.get("layers") if isinstance(saved, dict) else None
    for w in engine.weights:
        entry = layers.get(w.name) if isinstance(layers, dict) else None
        mask = entry.get("mask") if isinstance(entry, dict) else None
        if (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == w.mask.shape
                and not torch.equal(mask, w.mask.cpu())):
            raise ValueError(f"the engine's mask of {w.name!r} differs from the model's")
