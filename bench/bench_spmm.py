"""One sparse linear layer, forward and forward+backward, vs dense (CPU fp32, or CUDA).

``y = x @ W.T`` with ``x`` ``(batch, in)`` and ``W`` ``(out, in)`` at a given density,
no bias. "fwd" is one training forward (autograd on, graph recorded); "fwd+bwd" is that
forward plus ``y.backward(grad)`` with a fixed random ``grad``, computing the gradient of
the input and of the weight (its nonzero values for the sparse rows); gradients are set
to None before every call, as ``optimizer.zero_grad()`` does. The problem (mask, weight,
input, grad) is drawn on the CPU with a fixed seed, so both devices time the same
numbers. Rows, ``--device cpu`` (the default; float32 throughout):

- ``dense``: ``F.linear`` with the dense (masked) weight: the baseline.
- ``torch_sparse_autograd``: ``torch.sparse.mm(W, x.T)`` on a CSR weight that requires
  grad, plain autograd: what a user gets without writing a kernel (COO backward works on
  CPU too, but is several times slower than CSR).
- ``torch_sparse_composed``: PyTorch's own CSR ops composed by hand in an
  ``autograd.Function``: forward ``torch.sparse.mm(W_csr, x.T)``, grad-input with the
  transposed CSR structure built once outside the timed region (its values gathered
  through a permutation every step), grad-weight with ``torch.sparse.sampled_addmm``.
- ``sparseprop``: ``sparseprop.modules.SparseLinear`` (PyPI ``sparseprop``), if importable.
- ``ours``: ``sparsemom_ext.ops.csr_linear`` on a structure from ``csr_from_mask`` and
  ``csr_transpose``, built outside the timed region.

``--device cuda`` (one GPU; the extension built with its CUDA kernels) times, on tensors
made on the GPU, with TF32 off for everything but ``dense_tf32``
(``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``):

- ``dense`` (float32, TF32 off): the baseline of every speed-up.
- ``dense_tf32`` (float32 storage, TF32 tensor-core matmuls): TF32 is allowed only while
  its own call runs (forward and backward) and restored after, since rows are interleaved.
- ``dense_bf16`` (bfloat16 weight, input, output and gradients; converted once, outside
  the timed region).
- ``torch_sparse_autograd``, ``torch_sparse_composed`` (float32): as on the CPU (cuSPARSE).
- ``ours`` (float32) and ``ours_bf16`` (bfloat16 values, input and gradients; the CUDA
  kernels accumulate in float32).

``sparseprop`` is CPU-only and skipped there; ``--threads`` only sets torch's CPU threads.
A GPU call takes tens of microseconds, so on CUDA each timed sample runs the call
back to back enough times to last about ``--sample-ms`` (calibrated per row and op,
``calls_per_sample`` in the records), between two ``torch.cuda.synchronize``; the times
reported are per call.

Every row's output, input gradient and weight gradient are first checked against a
float64 dense reference (relative to the largest reference entry: 1e-4 for float32,
5e-3 for TF32, 2e-2 for bfloat16); a row that disagrees (or raises) is reported as an
error and not timed. All rows of one (shape, density) are timed interleaved in one
process; the speed-up is the ratio of medians against ``dense``. Useful GFLOP/s count
2*batch*nnz per matmul (1 for fwd, 3 for fwd+bwd); ``dense_gflops`` is the dense row's
rate on 2*batch*in*out per matmul, the roofline a sparse kernel could reach on its useful
FLOPs. ``--threads`` also governs sparseprop's OpenMP loops (it shares torch's libgomp).
Writes one JSON record per op x shape x density x impl, with its ``device`` and
``dtype`` (``--json``; default ``bench/results/bench_spmm.json``, or
``bench_spmm_cuda.json`` on CUDA) and a plot of speed-up vs sparsity (``--plot``, needs
matplotlib; default the same name with ``.png``). Benchmarks never assert a speed.

    python bench/bench_spmm.py                                   # all shapes, 2 threads
    python bench/bench_spmm.py --quick --shapes 128x4096x4096 --densities 0.05
    python bench/bench_spmm.py --threads 1 --plot bench/results/spmm_1t.png
    python bench/bench_spmm.py --device cuda                     # GPU rows, all shapes
"""

import argparse
import contextlib
import functools
import importlib.metadata
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsemom_ext as sm

from common import environment, print_table, summarize, time_interleaved, write_json

SHAPES = ["128x784x300", "128x4096x4096", "256x1024x4096"]
DENSITIES = [0.5, 0.2, 0.1, 0.05, 0.01]
OPS = ["fwd", "fwd+bwd"]
MATMULS = {"fwd": 1, "fwd+bwd": 3}
# Check tolerances, relative to the largest entry of the float64 reference (and per entry).
TOLERANCE = {"float32": 1e-4, "tf32": 5e-3, "bfloat16": 2e-2}
MAX_CALLS_PER_SAMPLE = 200


def make_problem(batch, n_in, n_out, density, seed=0, device="cpu"):
    """Mask with exactly round(density * out * in) positions, masked weight, input, grad.

    Drawn on the CPU (the same numbers for every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    numel = n_out * n_in
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=g)[: max(1, round(density * numel))]] = True
    mask = mask.view(n_out, n_in)
    # Values bounded away from 0, so that "nonzero" and "in the mask" are the same set
    # (sparseprop reads its structure from the nonzeros of the dense weight).
    magnitude = torch.rand(n_out, n_in, generator=g) + 0.5
    sign = torch.randint(0, 2, (n_out, n_in), generator=g) * 2 - 1
    weight = torch.where(mask, magnitude * sign / math.sqrt(density * n_in), 0.0)
    x = torch.randn(batch, n_in, generator=g)
    grad = torch.randn(batch, n_out, generator=g)
    return tuple(t.to(device) for t in (mask, weight, x, grad))


class Impl:
    """A layer under test: ``forward(x) -> y``, its trainable leaves, and how to read
    the weight gradient as a vector of nonzero values in row-major (CSR) order."""

    def __init__(self, forward, params, weight_grad):
        self.forward, self.params, self.weight_grad = forward, params, weight_grad


class Row:
    """How to build one row's ``Impl`` from ``(mask, weight)``, the dtype its input,
    weight and gradients are in, and whether its matmuls may use TF32."""

    def __init__(self, make, dtype=torch.float32, tf32=False):
        self.make, self.dtype, self.tf32 = make, dtype, tf32

    @property
    def dtype_name(self):
        return str(self.dtype).removeprefix("torch.")

    @property
    def tolerance(self):
        return TOLERANCE["tf32" if self.tf32 else self.dtype_name]

    def context(self):
        """Entered around every call of the row (forward and backward): TF32 allowed for
        the rows that use it, restored after, since the rows are timed interleaved."""
        return allow_tf32() if self.tf32 else contextlib.nullcontext()


@contextlib.contextmanager
def allow_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def dense_impl(mask, weight, dtype=torch.float32):
    w = weight.to(dtype, copy=True).requires_grad_()
    return Impl(lambda x: F.linear(x, w), [w], lambda: w.grad[mask])


def torch_sparse_autograd_impl(mask, weight):
    w = weight.to_sparse_csr().requires_grad_()
    return Impl(lambda x: torch.sparse.mm(w, x.T).T, [w], lambda: w.grad.values())


class _ComposedCSRLinear(torch.autograd.Function):
    """``x @ W.T`` from PyTorch CSR ops; the transposed structure is cached by the caller."""

    @staticmethod
    def forward(ctx, x, values, crow, col, t_crow, t_col, perm, shape):
        ctx.save_for_backward(x, values, crow, col, t_crow, t_col, perm)
        ctx.shape = shape
        w = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
        return torch.sparse.mm(w, x.T.contiguous()).T

    @staticmethod
    def backward(ctx, grad):
        x, values, crow, col, t_crow, t_col, perm = ctx.saved_tensors
        n_out, n_in = ctx.shape
        grad_x = grad_values = None
        grad_t = grad.T.contiguous()
        if ctx.needs_input_grad[0]:
            w_t = torch.sparse_csr_tensor(t_crow, t_col, values[perm], (n_in, n_out), check_invariants=False)
            grad_x = torch.sparse.mm(w_t, grad_t).T
        if ctx.needs_input_grad[1]:
            pattern = torch.sparse_csr_tensor(crow, col, values, ctx.shape, check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad_t, x, beta=0.0).values()
        return grad_x, grad_values, None, None, None, None, None, None


def torch_sparse_composed_impl(mask, weight):
    w = weight.to_sparse_csr()
    crow, col = w.crow_indices(), w.col_indices()
    # Transposed structure, once: a stable sort by column keeps the rows increasing within
    # a column; t_perm[j] is the CSR position of entry j of W.T.
    rows = torch.repeat_interleave(torch.arange(mask.shape[0], device=crow.device), crow.diff())
    t_perm = torch.sort(col, stable=True).indices
    t_crow = torch.cat([crow.new_zeros(1), torch.bincount(col, minlength=mask.shape[1]).cumsum(0)])
    t_col = rows[t_perm]
    # int32 indices: torch's CPU CSR kernels run faster on them than on int64.
    crow, col, t_crow, t_col = (t.int() for t in (crow, col, t_crow, t_col))
    values = w.values().clone().requires_grad_()
    shape = tuple(mask.shape)
    return Impl(lambda x: _ComposedCSRLinear.apply(x, values, crow, col, t_crow, t_col, t_perm, shape),
                [values], lambda: values.grad)


def sparseprop_impl(mask, weight):
    from sparseprop.modules import SparseLinear

    layer = SparseLinear(dense_weight=weight.clone())
    if layer.W_val.numel() != int(mask.sum()):
        raise RuntimeError(f"sparseprop found {layer.W_val.numel()} nonzeros, mask has {int(mask.sum())}")
    return Impl(layer, [layer.W_val], lambda: layer.W_val.grad)


def ours_impl(mask, weight, dtype=torch.float32):
    ops = sm.ops
    row_ptr, col_idx = ops.csr_from_mask(mask)
    col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, mask.shape[1])
    values = ops.csr_values_from_dense(weight.to(dtype), row_ptr, col_idx).requires_grad_()
    return Impl(lambda x: ops.csr_linear(x, values, None, row_ptr, col_idx, col_ptr, row_idx, perm),
                [values], lambda: values.grad)


def sparseprop_version():
    try:
        import sparseprop.modules  # noqa: F401
    except Exception as exc:  # ImportError, or a backend that does not load
        print(f"# sparseprop: not importable ({type(exc).__name__}: {exc}); its row is skipped. "
              "Install it with `pip install sparseprop`.")
        return None
    return importlib.metadata.version("sparseprop")


def impl_factories(device, with_sparseprop):
    """{row name: Row}, in the order the rows are timed and printed."""
    factories = {"dense": Row(dense_impl)}
    if device == "cuda":
        factories["dense_tf32"] = Row(dense_impl, tf32=True)
        factories["dense_bf16"] = Row(functools.partial(dense_impl, dtype=torch.bfloat16),
                                      dtype=torch.bfloat16)
    factories["torch_sparse_autograd"] = Row(torch_sparse_autograd_impl)
    factories["torch_sparse_composed"] = Row(torch_sparse_composed_impl)
    if with_sparseprop:
        factories["sparseprop"] = Row(sparseprop_impl)
    factories["ours"] = Row(ours_impl)
    if device == "cuda":
        factories["ours_bf16"] = Row(functools.partial(ours_impl, dtype=torch.bfloat16),
                                     dtype=torch.bfloat16)
    return factories


def run_once(impl, row, x, grad):
    """Forward and backward once; (y, grad of x, grad of the weight values)."""
    x = x.detach().to(row.dtype, copy=True).requires_grad_()
    grad = grad.to(row.dtype)
    for p in impl.params:
        p.grad = None
    with row.context():
        y = impl.forward(x)
        y.backward(grad)
    return y.detach(), x.grad, impl.weight_grad().detach()


def check(impl, row, x, grad, expected):
    """None if output, input gradient and weight gradient match the float64 reference."""
    got = run_once(impl, row, x, grad)
    tol = row.tolerance
    for what, actual, ref in zip(["output", "grad input", "grad weight"], got, expected):
        if actual is None:
            return f"{what} is None"
        if actual.shape != ref.shape:
            return f"{what} has shape {tuple(actual.shape)}, dense {tuple(ref.shape)}"
        try:
            # Sums of up to `in` (or `batch`) terms in any order, inputs rounded to the
            # row's precision: relative to the scale.
            torch.testing.assert_close(actual.float(), ref.float(), rtol=tol,
                                       atol=tol * max(ref.abs().max().item(), 1.0))
        except AssertionError as exc:
            detail = "; ".join(line for line in str(exc).splitlines()[1:4] if line)
            return f"{what} does not match dense: {detail}"
    return None


def timed_fns(impl, row, x, grad):
    x = x.detach().to(row.dtype, copy=True).requires_grad_()
    grad = grad.to(row.dtype)
    leaves = [x, *impl.params]

    def fwd():
        impl.forward(x)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        impl.forward(x).backward(grad)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def repeated(fn, row, calls):
    """One timed sample on CUDA: ``calls`` calls back to back, in the row's context."""
    def sample():
        with row.context():
            for _ in range(calls):
                fn()

    return sample


def calls_per_sample(fn, row, sample_ms):
    """How many back-to-back calls of ``fn`` last about ``sample_ms`` (CUDA, synchronised).

    A first guess from single calls (which pay a synchronisation each), corrected once
    by timing that many back to back (where the launches overlap the GPU's work)."""
    def best_ms(calls, tries):
        sample = repeated(fn, row, calls)
        best = math.inf
        for _ in range(tries):
            torch.cuda.synchronize()
            start = time.perf_counter()
            sample()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) * 1e3)
        return best

    def clamp(calls):
        return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(calls)))

    best_ms(1, 2)  # warm-up: allocator, library handles, kernel selection
    calls = clamp(sample_ms / max(best_ms(1, 3), 1e-6))
    if calls > 1:
        calls = clamp(calls * sample_ms / max(best_ms(calls, 1), 1e-6))
    return calls


def bench_one(shape_text, density, factories, repeats, warmup, device="cpu", sample_ms=1.0):
    batch, n_in, n_out = (int(v) for v in shape_text.split("x"))
    mask, weight, x, grad = make_problem(batch, n_in, n_out, density, device=device)
    nnz = int(mask.sum())
    fields = dict(shape=shape_text, batch=batch, in_features=n_in, out_features=n_out,
                  density=density, nnz=nnz, device=device, dtype="float32")

    def row_fields(name):  # the row's own dtype, in the place of the default one
        extra = {"tf32": factories[name].tf32} if device == "cuda" else {}
        return {**fields, "dtype": factories[name].dtype_name, **extra}

    w64, x64 = weight.double().requires_grad_(), x.double().requires_grad_()
    y64 = F.linear(x64, w64)
    y64.backward(grad.double())
    expected = (y64.detach(), x64.grad, w64.grad[mask])

    fns, failed = {}, []
    for name, row in factories.items():
        try:
            impl = row.make(mask, weight)
            error = check(impl, row, x, grad, expected)
        except Exception as exc:  # a missing or broken kernel: report it, keep going
            error = f"{type(exc).__name__}: {str(exc).split('. ')[0][:200]}"
        if error is None:
            fns[name] = timed_fns(impl, row, x, grad)
        else:
            print(f"# ERROR {shape_text} density {density} {name}: {error}", flush=True)
            failed += [{**row_fields(name), "op": op, "impl": name, "status": "error", "error": error,
                        "median_ms": None, "min_ms": None, "max_ms": None,
                        "speedup_vs_dense": None, "gflops": None} for op in OPS]

    records = []
    if "dense" not in fns:
        print(f"# ERROR {shape_text} density {density}: dense baseline failed, nothing timed")
        return failed
    for op in OPS:
        if device == "cuda":
            # Each sample: `calls` back-to-back calls, so that it lasts about sample_ms;
            # times are divided back to one call.
            calls = {name: calls_per_sample(f[op], factories[name], sample_ms) for name, f in fns.items()}
            samples = {name: repeated(f[op], factories[name], calls[name]) for name, f in fns.items()}
            times = time_interleaved(samples, device, repeats, warmup)
            times = {name: [t / calls[name] for t in ts] for name, ts in times.items()}
        else:
            calls = None
            times = time_interleaved({name: f[op] for name, f in fns.items()}, device, repeats, warmup)
        dense_gflops = MATMULS[op] * 2 * batch * n_in * n_out / statistics.median(times["dense"]) / 1e6
        for r in summarize(times, baseline="dense", op=op, **fields):
            r.update(row_fields(r["impl"]))
            if calls is not None:
                r["calls_per_sample"] = calls[r["impl"]]
            r["status"] = "ok"
            r["speedup_vs_dense"] = r["speedup_vs_baseline"]
            r["gflops"] = MATMULS[op] * 2 * batch * nnz / r["median_ms"] / 1e6
            r["dense_gflops"] = dense_gflops
            r["useful_rate_vs_dense"] = r["gflops"] / dense_gflops
            r["GFLOP/s"] = f"{r['gflops']:.1f}"
            records.append(r)
        print(f"# {shape_text} density {density} {op}: "
              + ", ".join(f"{r['impl']} {r['speedup_vs_dense']:.2f}x" for r in records[-len(fns):]),
              flush=True)
    return records + failed


def plot(records, path, title="sparse linear layer vs dense, CPU fp32"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    except ImportError:
        print("# matplotlib is not installed: no plot (`pip install matplotlib` to get one)")
        return
    ok = [r for r in records if r["status"] == "ok" and r["impl"] != "dense"]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    if not shapes:
        return
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    colors = {name: f"C{i}" for i, name in enumerate(impls)}
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for name in impls:
            for op, style in (("fwd+bwd", "-"), ("fwd", "--")):
                pts = sorted((r["density"], r["speedup_vs_dense"]) for r in ok
                             if r["shape"] == shape and r["impl"] == name and r["op"] == op)
                if pts:
                    ax.plot([d for d, _ in pts], [s for _, s in pts], style, marker="o",
                            color=colors[name], label=f"{name} {op}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        densities = sorted({r["density"] for r in ok if r["shape"] == shape})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(densities, [f"{100 * (1 - d):g}" for d in densities])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.invert_xaxis()  # sparsity grows to the right
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sparsity %")
        ax.set_ylabel("speed-up vs dense")
        batch, n_in, n_out = shape.split("x")
        ax.set_title(f"batch {batch}, {n_in} -> {n_out}")
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4 if len(handles) <= 8 else 6, fontsize=8)
    fig.suptitle(f"{title} (solid: fwd+bwd, dashed: fwd)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="BATCHxINxOUT, e.g. 128x4096x4096")
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples (default: 15 on cpu, 30 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed samples first (default: 2 on cpu, 3 on cuda)")
    parser.add_argument("--sample-ms", type=float, default=1.0,
                        help="cuda only: back-to-back calls per timed sample to last about this long")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up: a smoke run")
    parser.add_argument("--json", default=None,
                        help="default bench/results/bench_spmm.json (cpu), bench/results/bench_spmm_cuda.json (cuda)")
    parser.add_argument("--plot", default=None,
                        help="PNG path; '' for none (default: the --json default with .png)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if args.repeats is None:
        args.repeats = 30 if cuda else 15
    if args.warmup is None:
        args.warmup = 3 if cuda else 2
    if args.quick:
        args.repeats, args.warmup = 3, 1
    stem = "bench/results/bench_spmm_cuda" if cuda else "bench/results/bench_spmm"
    if args.json is None:
        args.json = stem + ".json"
    if args.plot is None:
        args.plot = stem + ".png"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

    env = environment(args.threads)
    env["device"] = args.device
    if cuda:
        # The baseline and every row but dense_tf32 (which allows it around its own calls).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        env["torch_cuda"] = torch.version.cuda
        env["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["calls_per_sample"] = f"about {args.sample_ms} ms of back-to-back calls per sample, at most {MAX_CALLS_PER_SAMPLE}"
        for key in ("device", "torch_cuda", "cuda_capability"):
            print(f"# {key}: {env[key]}")
        if not sm.build_info().get("cuda_kernels_registered", False):
            print("# WARNING: sparsemom_ext has no CUDA kernels (built without CUDA?): the ours rows will "
                  "fail. Rebuild with `SPARSEMOM_FORCE_CUDA=1 pip install --no-build-isolation -e .`",
                  flush=True)
        env["sparseprop"] = None
        print("# sparseprop: CPU-only, skipped on cuda")
    else:
        env["sparseprop"] = sparseprop_version()
        print(f"# sparseprop: {env['sparseprop']}")
    factories = impl_factories(args.device, env["sparseprop"] is not None)

    records = []
    for shape_text in args.shapes:
        for density in args.densities:
            records += bench_one(shape_text, density, factories, args.repeats, args.warmup,
                                 device=args.device, sample_ms=args.sample_ms)

    print_table([r for r in records if r["status"] == "ok"], ["shape", "density", "op"],
                tail=["GFLOP/s"])
    for r in records:
        if r["status"] != "ok" and r["op"] == OPS[0]:
            print(f"# not timed: {r['impl']} at {r['shape']} density {r['density']}: {r['error']}")
    for r in records:
        r.pop("GFLOP/s", None)
    write_json(args.json, env, records)
    if args.plot:
        if cuda:
            plot(records, args.plot, f"sparse linear layer vs dense fp32 (TF32 off), {env['gpu']}")
        else:
            plot(records, args.plot)


if __name__ == "__main__":
    main()
