"""Prune + grow selection on one layer: ``torch.topk`` vs the O(n) selection ops.

One update step of sparse momentum on a layer: remove the k = ceil(0.5 * nnz) active
weights of smallest |w|, then add k inactive positions of largest |momentum|.

- ``torch.topk``: prune with ``topk(k, largest=False)`` over |w| with inactive
  positions set to +inf, grow with ``topk(k)`` over |score| with active positions set
  to -inf (``sorted=False``: nothing needs the order), new masks built with scatter.
- ``sparsemom_ext``: ``magnitude_prune`` then ``momentum_grow``.

Both are timed interleaved in one process; on random data (no ties) both give the
same masks, which is checked once per density.

    python bench/bench_selection.py                          # 4096x4096 fp32, 2 threads
    python bench/bench_selection.py --ops prune grow prune+grow --device cuda
"""

import argparse
import math

import torch

import sparsemom_ext as sm

from common import environment, print_table, summarize, time_interleaved, write_json


def make_layer(shape, density, device, dtype, seed):
    """Weight, momentum and a mask with exactly round(density * numel) active positions."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=g)[: round(density * numel)]] = True
    weight = torch.randn(shape, generator=g).to(dtype) * mask.view(shape)
    score = torch.randn(shape, generator=g).to(dtype)
    return weight.to(device), score.to(device), mask.view(shape).to(device)


def topk_prune(weight, mask, k):
    flat = mask.reshape(-1)
    magnitude = weight.abs().reshape(-1).masked_fill(~flat, float("inf"))
    drop = torch.topk(magnitude, k, largest=False, sorted=False).indices
    return flat.scatter(0, drop, False).view_as(mask)


def topk_grow(score, mask, k):
    flat = mask.reshape(-1)
    magnitude = score.abs().reshape(-1).masked_fill(flat, -float("inf"))
    add = torch.topk(magnitude, k, sorted=False).indices
    return flat.scatter(0, add, True).view_as(mask)


def impls(op, weight, score, mask, k):
    """{name: callable}, the torch.topk baseline first."""
    if op == "prune":
        return {"torch.topk": lambda: topk_prune(weight, mask, k),
                "sparsemom_ext": lambda: sm.magnitude_prune(weight, mask, k)}
    if op == "grow":
        return {"torch.topk": lambda: topk_grow(score, mask, k),
                "sparsemom_ext": lambda: sm.momentum_grow(score, mask, k)}
    return {"torch.topk": lambda: topk_grow(score, topk_prune(weight, mask, k), k),
            "sparsemom_ext": lambda: sm.momentum_grow(score, sm.magnitude_prune(weight, mask, k), k)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x4096", help="ROWSxCOLS of the layer")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1, 0.05, 0.01])
    parser.add_argument("--ops", nargs="+", default=["prune+grow"], choices=["prune", "grow", "prune+grow"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default="bench/results/selection.json")
    args = parser.parse_args()

    env = environment(args.threads)
    dtype = getattr(torch, args.dtype)
    shape = tuple(int(x) for x in args.shape.split("x"))
    records = []
    with torch.no_grad():
        for density in args.densities:
            weight, score, mask = make_layer(shape, density, args.device, dtype, seed=0)
            nnz = int(mask.sum())
            k = math.ceil(0.5 * nnz)
            for op in args.ops:
                fns = impls(op, weight, score, mask, k)
                results = [fn() for fn in fns.values()]
                agree = all(torch.equal(results[0], r) for r in results[1:])
                times = time_interleaved(fns, args.device, args.repeats, args.warmup)
                records += summarize(times, baseline="torch.topk", op=op, shape=args.shape,
                                     density=density, nnz=nnz, k=k, device=args.device,
                                     dtype=args.dtype, results_agree=agree)
                print(f"# density {density} {op}: k={k}, results agree: {agree}", flush=True)
    print_table(records, ["op", "shape", "density", "device"])
    write_json(args.json, env, records)


if __name__ == "__main__":
    main()
