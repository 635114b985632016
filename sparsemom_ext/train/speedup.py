"""Speed-up accounting of a training run: the paper's estimate next to the wall clock.

**Estimated** (what the paper reports, computed as its reference code's
``SparseSpeedupBench`` does): each conv/linear layer's *dense forward* is timed on
real inputs, t_l; a sparse implementation is assumed to take t_l x d_l, the layer's
weight density, times a_l, the density of its input activations (the fraction of
nonzero inputs), for conv layers; linear layers get no activation factor. The
estimate is ``sum_l t_l / sum_l t_l * d_l [* a_l]``: forward only, no backward, no
optimizer, no topology updates, and a perfect sparse kernel that costs exactly its
share of the dense one. The reference code times conv layers only; here every
conv/linear layer counts, so MLPs get an estimate too.

**Measured**: the wall-clock time of whole training steps (zero_grad, forward, loss,
backward, optimizer step and the engine's step) of the run itself, against the same
model trained dense with the same optimizer settings for a number of steps in the same
process (``--compare-dense N``), after a warm-up. Reported as the ratio of medians,
and amortised: the run's median step plus the time of all its end-of-epoch topology
updates divided by its number of steps. Next to these, each layer's own forward (the sparse
kernels, where the layer uses them) is timed on the same inputs as the estimate, so the
estimate can be compared layer by layer with what the kernels really do.
"""

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import CsrConv2d, CsrLinear

__all__ = ["LayerTiming", "estimated_speedup", "summarise", "time_layers", "time_steps", "weight_density",
           "weight_layers"]


@dataclass
class LayerTiming:
    """One conv/linear layer's forward times (seconds, medians) and densities."""

    name: str
    kind: str  # "conv" or "linear"
    shape: Tuple[int, ...]
    weight_density: float
    input_density: float
    dense_s: float  # the dense layer's forward on the same input
    estimated_s: float  # dense_s x weight density [x input density for conv]
    measured_s: float  # this layer's own forward (sparse kernels where it uses them)

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


def weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The conv/linear layers of ``model``: torch's, the mask-layout ones (their subclasses), CsrLinear and
    CsrConv2d."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, CsrLinear, CsrConv2d))]


def weight_density(module: nn.Module) -> float:
    """The fraction of active weights of a sparse layer; 1.0 for a dense torch layer."""
    return float(module.density) if hasattr(module, "nnz") else 1.0


def estimated_speedup(dense_s: Dict[str, float], kinds: Dict[str, str], weight_densities: Dict[str, float],
                      input_densities: Dict[str, float]) -> float:
    """``sum t_l / sum t_l * d_l [* a_l for conv]`` over the layers in ``dense_s`` (see the module docstring)."""
    sparse = sum(t * weight_densities[n] * (input_densities[n] if kinds[n] == "conv" else 1.0)
                 for n, t in dense_s.items())
    return sum(dense_s.values()) / sparse if sparse > 0 else float("inf")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, budget_s: float = 0.25,
                 min_repeats: int = 3, max_repeats: int = 25) -> float:
    """Median wall time of ``fn()`` after one warm-up call; as many repeats as fit in ``budget_s``."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    first = time.perf_counter() - start
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_layers(model: nn.Module, x: torch.Tensor, input_densities: Dict[str, float]) -> List[LayerTiming]:
    """Time every conv/linear layer of ``model`` on its input for the batch ``x``.

    One forward of ``x`` in eval mode captures each layer's input (eval mode: no
    batch-norm statistics or dropout draw changes, so training is not disturbed).
    Then each layer's dense forward (``F.linear`` / the conv with the layer's dense
    weight and its stride, padding, dilation, groups) and the layer's own forward
    are timed on that input. ``input_densities`` (fraction of nonzero inputs per
    layer, measured over a whole evaluation) enter the estimate of conv layers.
    """
    layers = weight_layers(model)
    inputs: Dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
               for name, m in layers]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    timings = []
    for name, m in layers:
        inp = inputs[name]
        kind = "conv" if isinstance(m, (nn.Conv2d, CsrConv2d)) else "linear"
        weight = m.dense_weight() if hasattr(m, "dense_weight") else m.weight.detach()
        if kind == "conv":
            dense = lambda m=m, inp=inp, w=weight: nn.Conv2d._conv_forward(m, inp, w, m.bias)  # noqa: E731
        else:
            dense = lambda m=m, inp=inp, w=weight: F.linear(inp, w, m.bias)  # noqa: E731
        dense_s = _median_time(dense, x.device)
        measured_s = _median_time(lambda m=m, inp=inp: m(inp), x.device)
        wd = weight_density(m)
        ad = input_densities.get(name, 1.0)
        estimated = dense_s * wd * (ad if kind == "conv" else 1.0)
        timings.append(LayerTiming(name, kind, tuple(weight.shape), wd, ad, dense_s, estimated, measured_s))
    model.train(was_training)
    return timings


def time_steps(step: Callable[[torch.Tensor, torch.Tensor], object],
               batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], warmup: int,
               device: torch.device) -> List[float]:
    """Wall time (seconds) of ``step(x, y)`` for each batch after the first ``warmup`` ones."""
    times = []
    for i, (x, y) in enumerate(batches):
        _synchronize(device)
        start = time.perf_counter()
        step(x, y)
        _synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def summarise(timings: List[LayerTiming], run_step_s: float, run_amortised_s: float,
              dense_step_s: Optional[float], dense_steps: int) -> dict:
    """The JSON-ready speed-up record: per layer, estimated, measured forward and measured training step.

    ``dense_step_s`` None (no dense steps timed) leaves ``measured_training`` None.
    """
    dense_total = sum(t.dense_s for t in timings)
    estimated_total = sum(t.estimated_s for t in timings)
    measured_total = sum(t.measured_s for t in timings)
    measured = None
    if dense_step_s is not None:
        measured = {
            "dense_steps_timed": dense_steps,
            "dense_step_median_s": dense_step_s,
            "step_median_s": run_step_s,
            "step_amortised_s": run_amortised_s,
            "speedup_median": dense_step_s / run_step_s,
            "speedup_amortised": dense_step_s / run_amortised_s,
        }
    return {
        "layers": [t.to_dict() for t in timings],
        "estimated": {"dense_forward_s": dense_total, "sparse_forward_s": estimated_total,
                      "speedup": dense_total / estimated_total if estimated_total > 0 else float("inf")},
        "measured_forward": {"dense_forward_s": dense_total, "forward_s": measured_total,
                             "speedup": dense_total / measured_total},
        "measured_training": measured,
    }
