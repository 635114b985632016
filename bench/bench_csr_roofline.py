"""How fast the CSR forward can run when its input rows come from L1 or L2 (CPU, fp32).

The roofline of ``csr_spmm`` on this machine, measured with the kernel itself. Each
nonzero multiplies a 512-byte row of the feature-major input (128 batch lanes) into its
output row, so the kernel's speed is set by where those input rows come from. Here the
layer keeps its shape (``--shape``, default 128x4096->4096) and its nonzeros per row (the
density), but every row draws its columns (distinct, sorted) from the first ``window``
input features only: the input rows the kernel reads then span ``window * 512`` bytes,
32 KiB for a window of 64 features (L1), 512 KiB for 1024 (L2), and the whole 2 MiB input
for the full width (the real layer; the kernel then takes the columns in L2-sized chunks,
see ``csr_cpu.cpp``). Windows narrower than a row's nonzeros are skipped. The same number
of nonzeros does the same useful work in every row, so the fastest window is the best this
kernel's loop does on this machine, and its speed-up over dense ``F.linear`` (timed
interleaved in the same run) is the ceiling of the forward at that density.

Every structure's output is first checked against ``F.linear`` with the dense weight. Writes
one JSON record per density and window (``--json``, default
``bench/results/bench_csr_roofline.json``) with the median time, nanoseconds per nonzero
and thread, and useful GFLOP/s (2 * batch * nnz per forward); the dense record's GFLOP/s
counts the dense work. Never asserts a speed.

    python bench/bench_csr_roofline.py --threads 2
    python bench/bench_csr_roofline.py --densities 0.01 --windows 64 1024
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, summarize, time_interleaved, write_json  # noqa: E402

from sparsemom_ext import ops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FULL = 0  # the --windows value that stands for all input features


def windowed_structure(n_out, n_in, row_nnz, window, generator):
    """CSR (row_ptr, col_idx) with ``row_nnz`` distinct sorted columns per row, all below ``window``."""
    keys = torch.rand(n_out, window, generator=generator)
    cols = keys.topk(row_nnz, dim=1).indices.sort(dim=1).values.to(torch.int32)
    row_ptr = torch.arange(n_out + 1, dtype=torch.int32) * row_nnz
    return row_ptr, cols.reshape(-1).contiguous()


def bench_density(shape, density, windows, repeats, warmup, seed=0):
    batch, n_in, n_out = shape
    row_nnz = max(1, round(density * n_in))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g)
    # The feature-major layout the kernel reads, made once outside the timing.
    xt = torch.ops.sparsemom.transpose_contiguous(x).t()
    impls, nnz = {}, {}
    for window in windows:
        width = n_in if window == FULL else window
        if width < row_nnz or width > n_in:
            print(f"# density {density}: window {width} skipped ({row_nnz} nonzeros per row, {n_in} features)")
            continue
        row_ptr, col_idx = windowed_structure(n_out, n_in, row_nnz, width, g)
        values = torch.randn(col_idx.numel(), generator=g)
        dense = torch.zeros(n_out, n_in)
        dense[torch.arange(n_out).repeat_interleave(row_nnz), col_idx.long()] = values
        out = ops.csr_spmm(xt, row_ptr, col_idx, values, None, None)
        torch.testing.assert_close(out, F.linear(x, dense), rtol=1e-4, atol=1e-4)
        name = f"window_{width}"
        impls[name] = lambda row_ptr=row_ptr, col_idx=col_idx, values=values: ops.csr_spmm(
            xt, row_ptr, col_idx, values, None, None)
        nnz[name] = col_idx.numel()
    weight = torch.randn(n_out, n_in, generator=g)
    impls = {"dense": lambda: F.linear(x, weight), **impls}
    times = time_interleaved(impls, "cpu", repeats, warmup)
    records = summarize(times, "dense", shape=f"{batch}x{n_in}x{n_out}", density=density,
                        row_nnz=row_nnz, op="fwd", device="cpu", dtype="float32")
    threads = torch.get_num_threads()
    for r in records:
        seconds = r["median_ms"] / 1e3
        if r["impl"] == "dense":
            r.update(window=None, input_rows_kib=None, ns_per_nonzero_thread=None,
                     gflops=2 * batch * n_in * n_out / seconds / 1e9)
        else:
            width = int(r["impl"].split("_")[1])
            r.update(window=width, input_rows_kib=width * min(batch, 128) * 4 / 1024,
                     ns_per_nonzero_thread=seconds * 1e9 * threads / nnz[r["impl"]],
                     gflops=2 * batch * nnz[r["impl"]] / seconds / 1e9)
        r["gflops"] = round(r["gflops"], 1)
        if r["ns_per_nonzero_thread"] is not None:
            r["ns_per_nonzero_thread"] = round(r["ns_per_nonzero_thread"], 2)
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128x4096x4096", help="BATCHxINxOUT")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.01])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256, 512, 1024, 2048, FULL],
                        help=f"input features the columns are drawn from ({FULL}: all of them)")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS / "bench_csr_roofline.json"))
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.lower().split("x"))
    if len(shape) != 3 or min(shape) < 1:
        parser.error(f"--shape must be BATCHxINxOUT with positive sizes, got {args.shape!r}")
    for density in args.densities:
        if not 0 < density <= 1:
            parser.error(f"--densities must be in (0, 1], got {density}")
    env = environment(args.threads)
    records = []
    for density in args.densities:
        recs = bench_density(shape, density, args.windows, args.repeats, args.warmup)
        records += recs
        print_table(recs, ["density", "window", "input_rows_kib"], ["ns_per_nonzero_thread", "gflops"])
        dense_gflops = next(r["gflops"] for r in recs if r["impl"] == "dense")
        best = max((r for r in recs if r["impl"] != "dense"), key=lambda r: r["gflops"], default=None)
        if best is not None:
            print(f"# density {density}: fastest window {best['window']} ({best['gflops']} useful GFLOP/s, "
                  f"{best['speedup_vs_baseline']:.2f}x dense at {dense_gflops} GFLOP/s)")
    write_json(args.json, env, records)


if __name__ == "__main__":
    main()
