"""The engine under torch.distributed: every rank takes the same topology decision.

Under DistributedDataParallel the weights' gradients are averaged across ranks, so a
growth signal read from them (the mask layout's dense momentum and gradient) is the same
on every rank already, and so are the optimizer state and the engine's generator (seeded
alike on every process). The signals the engine builds from a layer's own batches are
not: the csr layout's candidate gradients (SDDMM), its dense RigL gradient, and GraBo's
sampling factors. :class:`RankGroup` reduces those with the collectives of
torch.distributed, the way DDP reduces gradients: gradients are averaged (the gradient of
the global batch, as DDP gives the weights), GraBo's sums of magnitudes are summed.

The cost, per update: one all-reduce of the candidates' gradients (GSE: ``gamma x nnz``
floats per layer), or of the dense gradient (csr RigL: ``in x out`` floats per layer,
RigL's own price), one of GraBo's factors (``in + out`` floats per layer), and one
all-gather of a fingerprint of every layer's new topology (3 int64 per layer), which
turns a disagreement into an error before anything is written. csr-layout momentum
growth also all-reduces its candidates' gradients once per step inside a window, one
flat buffer for all layers (``gamma x nnz`` floats per layer), as DDP does for the weights.
"""

from typing import List, Optional, Sequence

import torch

__all__ = ["RankGroup", "rank_group_of"]


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return (any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
            or any(isinstance(p, DTensor) for p in model.parameters()))


class RankGroup:
    """The process group whose ranks must agree, or one process (every method a no-op)."""

    def __init__(self, group=None, world_size: int = 1):
        self.group, self.world_size = group, world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over the ranks, in place (one collective for all of them)."""
        self._all_reduce(tensors, average=True)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place (one collective for all of them)."""
        self._all_reduce(tensors, average=False)

    def _all_reduce(self, tensors: Sequence[torch.Tensor], average: bool) -> None:
        tensors = [t for t in tensors if t.numel()]
        if not self.distributed or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        if average:
            flat.div_(self.world_size)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def check_same_topology(self, names: List[str], flats: List[torch.Tensor]) -> None:
        """Raise RuntimeError, on every rank, when the ranks' new topologies differ."""
        if not self.distributed:
            return
        import torch.distributed as dist

        fingerprint = torch.tensor([_fingerprint(f) for f in flats], dtype=torch.int64)
        device = flats[0].device if flats and dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        fingerprint = fingerprint.to(device)
        gathered = [torch.empty_like(fingerprint) for _ in range(self.world_size)]
        dist.all_gather(gathered, fingerprint, group=self.group)
        for rank, other in enumerate(gathered):
            differs = (other != gathered[0]).any(dim=1).nonzero().reshape(-1).tolist()
            if differs:
                raise RuntimeError(
                    f"the ranks disagree on the new topology of {[names[i] for i in differs]} (rank {rank} vs "
                    "rank 0): the weights' gradients must be averaged across ranks (wrap the model in "
                    "DistributedDataParallel) and every rank must build the engine with the same seed")


def _fingerprint(flat: torch.Tensor) -> List[int]:
    """Count and two sums of a layer's sorted flat indices: equal topologies give equal ones,
    and unequal ones almost never do."""
    flat = flat.to(torch.int64).cpu()
    mixed = (flat * 2654435761) % 2147483647  # a multiplicative hash, so moved entries change the sum
    return [flat.numel(), int(flat.sum()), int(mixed.sum())]


def rank_group_of(model: torch.nn.Module, process_group=None) -> RankGroup:
    """The ranks of ``model``'s training: ``process_group``, else a DistributedDataParallel
    model's, else the default group when torch.distributed is initialized; one process
    otherwise. FSDP shards the weights, whose topology the engine needs whole: refused."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given, but torch.distributed is not initialized: call "
                             "torch.distributed.init_process_group first")
        return RankGroup()
    if _is_fsdp(model):
        raise ValueError("the engine does not support FSDP (FullyShardedDataParallel / fully_shard): it needs "
                         "each sparse layer's whole weight and optimizer state on every rank; use "
                         "DistributedDataParallel, whose replicas it keeps identical")
    import torch.distributed as dist

    group: Optional[object] = process_group
    if group is None:
        group = getattr(model, "process_group", None) if isinstance(
            model, torch.nn.parallel.DistributedDataParallel) else None
    if group is None:
        group = dist.group.WORLD
    return RankGroup(group, dist.get_world_size(group))
