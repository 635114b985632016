"""Fused masked optimizer steps vs what users do today.

Today: ``torch.optim.SGD(momentum=0.9, nesterov=True, foreach=True).step()`` (or
Adam) followed by ``weight.mul_(mask)``. Ours: ``sparsemom_ext.optim.SGD`` (or Adam),
whose step is one fused pass per masked parameter; the raw op is timed too, to show
the Python overhead of the optimizer wrapper. Also ``mask_apply_`` vs ``mul_(mask)``.

    python bench/bench_fused_optim.py                  # 4096x4096, 2 threads
    python bench/bench_fused_optim.py --shapes 4096x4096 1024x1024 --device cuda
"""

import argparse

import torch

import sparsemom_ext as sm

from common import environment, print_table, summarize, time_interleaved, write_json


def make_param(shape, density, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(shape, generator=g) < density).to(device)
    weight = torch.nn.Parameter(torch.randn(shape, generator=g).to(device=device, dtype=dtype) * mask)
    weight.grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return weight, mask


def sgd_impls(shape, density, device, dtype):
    kwargs = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    w_torch, mask = make_param(shape, density, device, dtype, 0)
    opt_torch = torch.optim.SGD([w_torch], foreach=True, **kwargs)
    w_ours, _ = make_param(shape, density, device, dtype, 0)
    sm.attach_mask(w_ours, mask)
    opt_ours = sm.optim.SGD([w_ours], **kwargs)
    w_op, _ = make_param(shape, density, device, dtype, 0)
    buf = torch.zeros_like(w_op)

    def torch_then_mask():
        opt_torch.step()
        with torch.no_grad():
            w_torch.mul_(mask)

    return {
        "torch.optim.SGD(foreach)+mul_(mask)": torch_then_mask,
        "sparsemom_ext.optim.SGD": opt_ours.step,
        "op fused_sgd_step_": lambda: sm.fused_sgd_step_(w_op.data, w_op.grad, buf, mask, **kwargs),
    }


def adam_impls(shape, density, device, dtype):
    kwargs = dict(lr=1e-3, weight_decay=1e-2)
    w_torch, mask = make_param(shape, density, device, dtype, 1)
    opt_torch = torch.optim.AdamW([w_torch], foreach=True, **kwargs)
    w_ours, _ = make_param(shape, density, device, dtype, 1)
    sm.attach_mask(w_ours, mask)
    opt_ours = sm.optim.AdamW([w_ours], **kwargs)
    w_op, _ = make_param(shape, density, device, dtype, 1)
    m, v = torch.zeros_like(w_op), torch.zeros_like(w_op)
    step = [0]

    def torch_then_mask():
        opt_torch.step()
        with torch.no_grad():
            w_torch.mul_(mask)

    def op():
        step[0] += 1
        sm.fused_adam_step_(w_op.data, w_op.grad, m, v, None, mask, step=step[0],
                            decoupled_weight_decay=True, **kwargs)

    return {
        "torch.optim.AdamW(foreach)+mul_(mask)": torch_then_mask,
        "sparsemom_ext.optim.AdamW": opt_ours.step,
        "op fused_adam_step_": op,
    }


def mask_impls(shape, density, device, dtype):
    w1, mask = make_param(shape, density, device, dtype, 2)
    w2, _ = make_param(shape, density, device, dtype, 2)
    return {
        "weight.mul_(mask)": lambda: w1.data.mul_(mask),
        "op mask_apply_": lambda: sm.mask_apply_(w2.data, mask),
    }


BENCHES = {"sgd": sgd_impls, "adamw": adam_impls, "mask_apply": mask_impls}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096"], help="ROWSxCOLS weights")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="bench/results/fused_optim.json")
    args = parser.parse_args()

    env = environment(args.threads)
    dtype = getattr(torch, args.dtype)
    records = []
    with torch.no_grad():
        for shape_text in args.shapes:
            shape = tuple(int(x) for x in shape_text.split("x"))
            for op, make in BENCHES.items():
                impls = make(shape, args.density, args.device, dtype)
                times = time_interleaved(impls, args.device, args.repeats, args.warmup)
                records += summarize(times, baseline=next(iter(impls)), op=op, shape=shape_text,
                                     density=args.density, device=args.device, dtype=args.dtype)
    print_table(records, ["op", "shape", "device", "dtype"])
    write_json(args.json, env, records)


if __name__ == "__main__":
    main()
