"""Shared benchmark plumbing: environment header, interleaved timing, JSON and tables.

Benchmarks never assert a speed. They time each implementation many times,
interleaving implementations within every repeat so that machine noise hits all
of them alike, and report median / min / max in milliseconds plus the ratio of
medians against the baseline measured in the same run.
"""

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import sparsemom_ext as sm


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(threads: int) -> dict:
    torch.set_num_threads(threads)
    info = sm.build_info()
    env = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_isa": info["cpu_isa"],
        "extension_cuda": info["cuda"],
        "cuda_archs": info["cuda_archs"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
    }
    for key, value in env.items():
        print(f"# {key}: {value}")
    return env


def time_interleaved(impls: dict, device: str, repeats: int, warmup: int) -> dict:
    """Time each callable in ``impls`` ``repeats`` times, interleaved; {name: [ms, ...]}."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times: dict, baseline: str, **fields) -> list:
    """One record per implementation, with the speed-up over ``baseline`` (ratio of medians)."""
    base = statistics.median(times[baseline])
    records = []
    for name, samples in times.items():
        median = statistics.median(samples)
        records.append({**fields, "impl": name, "median_ms": median, "min_ms": min(samples),
                        "max_ms": max(samples), "repeats": len(samples),
                        "speedup_vs_baseline": base / median, "baseline": baseline})
    return records


def print_table(records: list, keys: list, tail: list = ()) -> None:
    """One row per record: ``keys`` columns, impl and timings, then ``tail`` columns."""
    if not records:
        return
    tail = list(tail)
    header = keys + ["impl", "median_ms", "min_ms", "max_ms", "speedup"] + tail
    rows = [[str(r[k]) for k in keys] + [r["impl"], f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}",
                                         f"{r['max_ms']:.3f}", f"{r['speedup_vs_baseline']:.2f}x"]
            + [str(r[k]) for k in tail]
            for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def write_json(path, env: dict, records: list) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "records": records}, indent=2))
    print(f"# wrote {path}")
