"""Training-step time and memory of a wide sparse MLP vs the dense one (always-sparse training).

The model is an MLP (default 784-4096-4096-4096-10, ReLU) trained on MNIST batches with
SGD (Nesterov, momentum 0.9, weight decay 5e-4) and cross-entropy. Rows:

- ``dense``: ``nn.Linear`` layers and ``torch.optim.SGD``: the baseline;
- ``compiled/dense``, ``compiled/csr/<growth>`` (``--compile``): the same under ``torch.compile``
  (the model's forward and backward; the engine steps eagerly);
- ``csr/<growth>``: every layer a ``CsrLinear`` (``sparsify(layout="csr")``) at ``--density``,
  ``sm.optim.SGD`` and a ``SparseMomentum`` engine with that growth, updating the
  topology every ``--period`` steps (default 540: once per MNIST epoch at batch 100, the
  engine's default frequency) with its default window / candidate settings.

One training step is zero_grad, forward, loss, backward, ``optimizer.step()`` and
``engine.step()``. Every sparse method runs whole update periods, each step timed, so
the per-step time includes the topology update (and csr momentum's candidate window)
at its real frequency: ``amortised_ms`` is a period's total time / period length. The
dense model runs ``--dense-steps`` steps per repeat. Methods are interleaved (one period
or one dense block each, in turn) for ``--repeats`` rounds. Every row's ``amortised_ms``
is the median over rounds of its mean step time (a sparse round is a whole period, a
dense one ``--dense-steps`` steps): means on both sides, so contention spikes weigh alike;
the speed-up is the ratio of those. Medians of single steps are reported too. Memory counts the bytes of
parameters, gradients, optimizer state and the CSR structure buffers after a step.
Writes JSON; never asserts a speed.

    python bench/bench_training.py --threads 2
    python bench/bench_training.py --widths 784,1024,1024,10 --period 50 --repeats 2   # quick
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparsemom_ext as sm

from common import environment, write_json


def mlp(widths):
    layers = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def training_memory(model, optimizer) -> int:
    """Bytes of parameters, gradients, optimizer state and buffers (the CSR structure)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


class Run:
    """One model, its optimizer and engine, stepping through the data."""

    def __init__(self, name, widths, density, growth, period, device, data, seed=0, compiled=False):
        torch.manual_seed(seed)
        self.name, self.data, self.cursor = name, data, 0
        self.model = mlp(widths).to(device)
        sgd = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        if growth is None:
            self.optimizer = torch.optim.SGD(self.model.parameters(), **sgd)
            self.engine = None
        else:
            sm.sparsify(self.model, density=density, layout="csr", generator=torch.Generator().manual_seed(seed))
            self.optimizer = sm.optim.SGD(self.model.parameters(), **sgd)
            self.engine = sm.SparseMomentum(self.model, self.optimizer, update_every=period,
                                            total_steps=1 << 40, growth=growth)
        # fullgraph: the growths that read batches do it through gradient taps, which compile.
        self.forward = torch.compile(self.model, fullgraph=True) if compiled else self.model

    def step(self):
        x, y = self.data[self.cursor % len(self.data)]
        self.cursor += 1
        self.optimizer.zero_grad()
        F.cross_entropy(self.forward(x), y).backward()
        self.optimizer.step()
        if self.engine is not None:
            self.engine.step()


def timed_steps(run, steps, sync):
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        run.step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="784,4096,4096,4096,10")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--period", type=int, default=540, help="steps between topology updates")
    parser.add_argument("--growth", default="momentum,gse,gradient,random")
    parser.add_argument("--repeats", type=int, default=2, help="update periods per sparse method")
    parser.add_argument("--dense-steps", type=int, default=30, help="dense steps per repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", default="",
                        help="growths (comma-separated) whose csr model also runs under torch.compile, "
                             "beside a compiled dense model")
    parser.add_argument("--json", default="bench/results/training.json")
    args = parser.parse_args()
    env = environment(args.threads)
    # Denormal momentum and gradient entries make x86 arithmetic many times slower; both
    # models run with them flushed to zero (as the training command does by default).
    torch.set_flush_denormal(True)
    env["flush_denormal"] = True
    widths = [int(w) for w in args.widths.split(",")]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    images, labels = sm.data.load_mnist("train")
    x = torch.from_numpy(images).float().div_(255.0).sub_(0.1307).div_(0.3081).reshape(len(images), -1)
    if widths[0] != x.shape[1]:
        raise SystemExit(f"--widths must start with {x.shape[1]} (MNIST pixels), got {widths[0]}")
    y = torch.from_numpy(labels).long()
    n_batches = len(x) // args.batch
    data = [(x[i * args.batch:(i + 1) * args.batch].to(args.device), y[i * args.batch:(i + 1) * args.batch].to(args.device))
            for i in range(n_batches)]

    runs = {"dense": Run("dense", widths, 1.0, None, args.period, args.device, data)}
    for growth in args.growth.split(","):
        runs[f"csr/{growth}"] = Run(f"csr/{growth}", widths, args.density, growth, args.period, args.device, data)
    if args.compile:
        # Each compiled model with an engine compiles its own graphs (its layers' gradient
        # taps are its own objects), at most six, and dynamo counts them per code object,
        # shared by models of one class: raise its limit of 8 to fit them all.
        torch._dynamo.config.recompile_limit = 8 * (1 + len(args.compile.split(",")))
        runs["compiled/dense"] = Run("compiled/dense", widths, 1.0, None, args.period, args.device, data,
                                     compiled=True)
        for growth in args.compile.split(","):
            runs[f"compiled/csr/{growth}"] = Run(f"compiled/csr/{growth}", widths, args.density, growth,
                                                 args.period, args.device, data, compiled=True)
    for run in runs.values():  # warm-up; also creates the optimizer state measured below
        timed_steps(run, 3, sync)
    memory = {name: training_memory(run.model, run.optimizer) for name, run in runs.items()}

    step_times = {name: [] for name in runs}
    amortised = {name: [] for name in runs}
    update_steps = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            if run.engine is None:
                times = timed_steps(run, args.dense_steps, sync)
            else:
                # Align to a whole period: from just after an update to the next one, inclusive.
                while run.engine.steps % args.period:
                    run.step()
                updates = run.engine.updates
                times = timed_steps(run, args.period, sync)
                assert run.engine.updates == updates + 1, "a period must contain exactly one update"
                update_steps[name].append(times[-1])
            step_times[name] += times
            amortised[name].append(sum(times) / len(times))
            print(f"# repeat {repeat + 1}/{args.repeats} {name}: median step {statistics.median(times):.1f} ms, "
                  f"mean {amortised[name][-1]:.1f} ms", flush=True)

    dense_step = statistics.median(amortised["dense"])
    records = []
    for name in runs:
        per_step = statistics.median(amortised[name])
        records.append({
            "impl": name, "widths": widths, "density": 1.0 if name.endswith("dense") else args.density,
            "batch": args.batch, "period": args.period, "device": args.device,
            "median_step_ms": statistics.median(step_times[name]),
            "amortised_ms": per_step,
            "amortised_per_repeat_ms": amortised[name],
            "update_step_ms": update_steps[name],
            "speedup_vs_dense": dense_step / per_step,
            "memory_bytes": memory[name], "memory_vs_dense": memory[name] / memory["dense"],
        })
    header = ["impl", "median step ms", "mean step ms (incl. updates)", "update step ms", "speed-up",
              "memory MiB", "memory vs dense"]
    rows = [[r["impl"], f"{r['median_step_ms']:.1f}", f"{r['amortised_ms']:.1f}",
             f"{statistics.median(r['update_step_ms']):.0f}" if r["update_step_ms"] else "-",
             f"{r['speedup_vs_dense']:.2f}x", f"{r['memory_bytes'] / 2**20:.1f}", f"{r['memory_vs_dense']:.3f}"]
            for r in records]
    widths_ = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths_)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths_)))
    write_json(args.json, env, records)


if __name__ == "__main__":
    main()
