"""What SparseLinear's sparse backend pays to see mask writes its version counter misses.

Before each forward that reuses its cached structure, ``SparseLinear(backend="sparse")``
checks that the mask still holds it (``sparsemom_ext.ops.mask_matches_csr``, one pass over
the mask), so a mask written through ``.data``, numpy or DLPack is never computed with a
stale structure. Rows, interleaved, CPU float32, one training forward + backward of a
layer at ``--density`` on a batch of ``--batch`` (gradients set to None before each):

- ``checked``: the layer as users call it (the check, then ``ops.masked_linear``);
- ``unchecked``: ``ops.masked_linear`` on the same cached structure, without the check;
- ``check_only``: ``ops.mask_matches_csr`` alone.

The overhead is ``checked / unchecked - 1`` (ratio of medians). Writes JSON (``--json``).

    python bench/bench_mask_check.py                   # 4096x4096 and 1024x1024, 2 threads
"""

import argparse

import torch

import sparsemom_ext as sm
from sparsemom_ext import ops

from common import environment, print_table, summarize, time_interleaved, write_json


def impls(n_out, n_in, density, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = sm.nn.SparseLinear(n_in, n_out, density=density, backend="sparse", generator=g)
    x = torch.randn(batch, n_in, generator=g, requires_grad=True)
    grad = torch.randn(batch, n_out, generator=g)
    layer(x)  # builds the structure
    structure = layer._mask_structure()

    def step(forward):
        x.grad = layer.weight.grad = layer.bias.grad = None
        forward().backward(grad)

    return {
        "checked": lambda: step(lambda: layer(x)),
        "unchecked": lambda: step(lambda: ops.masked_linear(x, layer.weight, layer.bias, *structure)),
        "check_only": lambda: ops.mask_matches_csr(layer.mask, structure[0], structure[1]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "1024x1024"], help="OUTxIN weights")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="bench/results/mask_check.json")
    args = parser.parse_args()

    env = environment(args.threads)
    records = []
    for shape_text in args.shapes:
        n_out, n_in = (int(v) for v in shape_text.split("x"))
        times = time_interleaved(impls(n_out, n_in, args.density, args.batch), "cpu", args.repeats, args.warmup)
        rows = summarize(times, baseline="unchecked", shape=shape_text, density=args.density, batch=args.batch)
        overhead = rows[0]["median_ms"] / rows[1]["median_ms"] - 1
        for row in rows:
            row["check_overhead"] = round(overhead, 4)
        records += rows
    print_table(records, ["shape", "density", "batch"], ["check_overhead"])
    write_json(args.json, env, records)


if __name__ == "__main__":
    main()
