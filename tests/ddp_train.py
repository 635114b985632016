"""A DistributedDataParallel training script, as a user writes one, that also checks after
every topology update that every rank holds the same model and optimizer state.

Run with two processes (tests/test_distributed.py does)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_train.py \
        --configs momentum:csr,gse:mask:uniform --out result.json

Each config is ``growth:layout[:sampling[:optimizer[:scope[:model]]]]``, model ``mlp`` (the
default), ``cnn`` (two convs and a linear layer: csr convolutions in the csr layout) or ``cnn_bn``
(conv, batch norm, in-place ReLU, pooling, activations batch innermost). Each rank trains on its own
batches (as a DistributedSampler gives), so any signal built from one rank's batch and not
reduced makes the ranks' updates differ. Rank 0 writes, per config, whether the ranks were
identical after each update and each layer's nonzeros after it.
"""

import argparse
import json

import torch
import torch.distributed as dist
from torch import nn

import sparsemom_ext as sm


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5)),
            (20,)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 5)),
            (3, 8, 8)),
    # VGG's block: conv, batch norm, in-place ReLU, pooling; trained with activations batch
    # innermost, as the training command does for --layout csr.
    "cnn_bn": (lambda: nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
                                     nn.MaxPool2d(2), nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                     nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(16 * 4 * 4, 5)),
               (3, 8, 8)),
}
BATCH_INNERMOST = {"cnn_bn"}


def build(layout, optimizer_name, model_name):
    model = MODELS[model_name][0]()
    model = sm.sparsify(model, density=0.25, layout=layout, generator=torch.Generator().manual_seed(0))
    if model_name in BATCH_INNERMOST:
        sm.nn.keep_batch_innermost(model)
    ddp_model = nn.parallel.DistributedDataParallel(model)
    if optimizer_name == "adam":
        optimizer = sm.optim.Adam(ddp_model.parameters(), lr=1e-2)
    else:
        optimizer = sm.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return model, ddp_model, optimizer


def everything(model, optimizer):
    """The model's state and the optimizer's, as tensors, in a fixed order. Batch norms'
    running statistics are left out: each rank's last forward updated its own from its own
    batch, and DDP makes them rank 0's at the start of the next forward."""
    running = {f"{name}.{buffer}" for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for buffer in ("running_mean", "running_var", "num_batches_tracked")}
    tensors = [t.detach().clone() for name, t in model.state_dict().items() if name not in running]
    for group in optimizer.param_groups:
        for p in group["params"]:
            tensors += [t.clone() for t in optimizer.state[p].values() if torch.is_tensor(t)]
    return tensors


def same_on_every_rank(tensors) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tensors)
    return all(len(other) == len(tensors) and all(torch.equal(a, b) for a, b in zip(other, tensors))
               for other in gathered)


def run(config, seed, steps=14):
    growth, layout, sampling, optimizer_name, scope, model_name = (config.split(":") + ["grabo", "sgd", "layer", "mlp"][
        len(config.split(":")) - 2:])[:6]
    torch.manual_seed(0)
    model, ddp_model, optimizer = build(layout, optimizer_name, model_name)
    engine = sm.SparseMomentum(ddp_model, optimizer, prune_rate=0.4, update_every=3, total_steps=steps + 1,
                               growth=growth, sampling=sampling, scope=scope, window=2, seed=seed)
    data = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own batches
    loss_fn = nn.CrossEntropyLoss()
    identical, nnz = [], []
    for _ in range(steps):
        x, y = torch.randn(16, *MODELS[model_name][1], generator=data), torch.randint(0, 5, (16,), generator=data)
        optimizer.zero_grad()
        loss = loss_fn(ddp_model(x), y)
        loss.backward()
        optimizer.step()
        updates = engine.updates
        engine.step()
        if engine.updates != updates:
            identical.append(same_on_every_rank(everything(model, optimizer)))
            nnz.append([r.nnz for r in engine.history[-len(engine.weights):]])
    classes = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()})
    return {"config": config, "identical": identical, "nnz": nnz, "loss": loss.item(), "classes": classes}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed-per-rank", action="store_true",
                        help="a mistake to be caught: each rank builds its engine with its own seed")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    seed = dist.get_rank() if args.seed_per_rank else 0
    results = [run(config, seed) for config in args.configs.split(",")]
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()  # both ranks shut the group down together
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
