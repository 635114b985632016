"""Initial masks: per-layer densities (uniform / er / erk), exact counts, seeded draws.

Three steps, kept separate so the engine, :func:`sparsemom_ext.nn.sparsify` and a user
can each use the part they need:

1. :func:`layer_densities` turns a global density into a density per layer;
2. :func:`layer_counts` turns those into exact integer counts whose sum is exactly
   ``round(density * total weights)``;
3. :func:`random_mask` draws a mask with exactly ``count`` active positions from an
   explicit CPU generator, so every process and every device draws the same mask
   from the same seed (the reference code's unseeded Bernoulli masks diverge across
   DDP ranks and only hit the density on average).
"""

import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DISTRIBUTIONS",
    "exact_count",
    "layer_counts",
    "layer_densities",
    "random_mask",
]

DISTRIBUTIONS = ("uniform", "er", "erk")

ShapeLike = Union[Sequence[int], torch.Size, torch.Tensor]


def check_density(density, name: str = "density") -> float:
    """``density`` as a float in (0, 1], or a TypeError / ValueError naming ``name``.

    bool is refused although it is an int: ``density=True`` is a bug, not "1.0".
    """
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {type(density).__name__} {density!r}")
    value = float(density)
    if not 0.0 < value <= 1.0:  # also false for NaN
        raise ValueError(f"{name} must be in (0, 1] (the fraction of weights kept), got {density!r}")
    return value


def check_choice(name: str, value, valid) -> None:
    """A ValueError naming ``name`` and listing ``valid`` unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def check_distribution(distribution) -> str:
    """``distribution`` if it is one of :data:`DISTRIBUTIONS`, else a ValueError listing them."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {', '.join(repr(d) for d in DISTRIBUTIONS)}, got {distribution!r}"
        )
    return distribution


def exact_count(density: float, numel: int) -> int:
    """The number of active weights of one layer of ``numel`` weights at ``density``.

    ``round(density * numel)`` with Python's rounding (halves to even), the rule
    :func:`layer_counts` applies to the global total. Can be 0 for a tiny density.
    """
    return min(int(numel), max(0, round(density * numel)))


def _as_shape(layer, index: int) -> Tuple[int, ...]:
    shape = layer.shape if isinstance(layer, torch.Tensor) else layer
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(
            f"layers[{index}] must be a weight shape (a sequence of ints) or a tensor, got {layer!r}"
        ) from None
    if any(s < 0 for s in shape):
        raise ValueError(f"layers[{index}] has a negative size: {shape}")
    return shape


def _raw_weight(shape: Tuple[int, ...], distribution: str, index: int) -> float:
    """The unnormalised density of a layer: the factor the global scale multiplies."""
    if distribution == "uniform":
        return 1.0
    if len(shape) < 2:
        raise ValueError(
            f"distribution {distribution!r} needs weights of 2 or more dimensions "
            f"((out, in) or (out, in/groups, kh, kw)); layers[{index}] has shape {shape}"
        )
    if distribution == "er":
        # Channels only for conv weights, as in RigL (Evci et al., 2020): ER is the
        # sparse-graph density of the (c_out x c_in) connectivity; ERK adds the kernel.
        n_out, n_in = shape[0], shape[1]
        return (n_in + n_out) / (n_in * n_out)
    return sum(shape) / math.prod(shape)


def layer_densities(layers: Sequence[ShapeLike], density: float, distribution: str = "uniform") -> List[float]:
    """The target density of each layer for a global ``density``.

    ``layers`` are weight shapes (or tensors, whose shape is used): ``(out, in)`` for a
    linear layer, ``(out, in/groups, kh, kw)`` for a conv layer.

    - ``uniform``: every layer gets ``density``;
    - ``er`` (Erdős–Rényi): density proportional to ``(n_in + n_out) / (n_in * n_out)``
      with ``n_out, n_in = shape[0], shape[1]`` (for conv weights the channels, kernel
      dims ignored, as RigL defines ER);
    - ``erk`` (ER-Kernel): proportional to ``sum(shape) / prod(shape)``, i.e.
      ``(c_in + c_out + kh + kw) / (c_in * c_out * kh * kw)`` for conv; equal to ``er``
      for linear layers.

    For er/erk a layer whose density would exceed 1 is made dense and the scale is
    solved again for the remaining layers, until none exceeds 1; so
    ``sum(d_l * numel_l) == density * sum(numel_l)`` (up to float rounding) whatever
    the shapes. Layers with no weights (a zero-sized dim) get ``density`` and do not
    take part in the solve.

    Raises ValueError for a density outside (0, 1] (TypeError for a non-number) and
    for an unknown distribution.
    """
    density = check_density(density)
    distribution = check_distribution(distribution)
    shapes = [_as_shape(layer, i) for i, layer in enumerate(layers)]
    numels = [math.prod(s) for s in shapes]
    result = [density] * len(shapes)
    if distribution == "uniform" or density == 1.0:
        return result
    raw = {i: _raw_weight(s, distribution, i) for i, s in enumerate(shapes) if numels[i] > 0}
    dense = set()
    while True:
        free = [i for i in raw if i not in dense]
        if not free:
            break
        budget = density * sum(numels[i] for i in raw) - sum(numels[i] for i in dense)
        scale = budget / sum(raw[i] * numels[i] for i in free)
        # The scale only grows as layers are capped (capping frees budget), so every
        # layer over 1 now stays over 1: all can be capped at once.
        over = [i for i in free if scale * raw[i] > 1.0]
        if not over:
            for i in free:
                result[i] = scale * raw[i]
            break
        dense.update(over)
    for i in dense:
        result[i] = 1.0
    return result


def layer_counts(layers: Sequence[ShapeLike], density: float, distribution: str = "uniform") -> List[int]:
    """Exact active-weight counts per layer, summing to ``round(density * total)``.

    Starts from ``layer_densities(layers, density, distribution)[l] * numel_l``, floors
    each, and hands the remaining units one by one to the layers with the largest
    fractional parts (largest-remainder rounding; ties go to the earlier layer), never
    above a layer's size. The global count uses Python's ``round`` (halves to even),
    the same rule as :func:`exact_count`; layers made dense by er/erk capping stay
    fully dense. A count may be 0 when a layer's share is below half a weight.
    """
    densities = layer_densities(layers, density, distribution)
    numels = [math.prod(_as_shape(layer, i)) for i, layer in enumerate(layers)]
    total = sum(numels)
    target = exact_count(density, total)
    ideal = [min(float(n), d * n) for d, n in zip(densities, numels)]
    counts = [min(n, math.floor(x)) for x, n in zip(ideal, numels)]
    remainder = [x - c for x, c in zip(ideal, counts)]
    missing = target - sum(counts)
    # The arithmetic bounds missing to [0, number of fractional layers]; the loops
    # below also absorb float noise beyond that, so the sum is exact in every case.
    order = sorted(range(len(counts)), key=lambda i: (-remainder[i], i))
    while missing > 0:
        progressed = False
        for i in order:
            if missing == 0:
                break
            if counts[i] < numels[i]:
                counts[i] += 1
                missing -= 1
                progressed = True
        if not progressed:  # pragma: no cover - target <= total makes this unreachable
            raise AssertionError("layer_counts: more weights requested than exist")
    for i in reversed(order):
        if missing == 0:
            break
        if counts[i] > 0:
            counts[i] -= 1
            missing += 1
    return counts


def check_generator(generator) -> None:
    """Accept None or a CPU ``torch.Generator``; raise TypeError / ValueError naming ``generator``."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (masks are drawn on the CPU so that every "
            f"device draws the same mask from the same seed), got one on {generator.device}"
        )


def random_mask(
    shape: Union[int, Sequence[int], torch.Size],
    count: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``count`` True positions, uniformly drawn.

    The positions are the first ``count`` entries of ``torch.randperm(numel)`` drawn on
    the CPU from ``generator`` (a CPU ``torch.Generator``; None uses torch's default CPU
    generator, i.e. ``torch.manual_seed``), so the same seed gives the same mask on
    every device and in every process. The mask is then moved to ``device``.
    ``count == 0`` and ``count == numel`` need no randomness and draw nothing from the
    generator (so a dense layer leaves the random stream as it was).
    """
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    shape = torch.Size(_as_shape(shape, 0))
    numel = shape.numel()
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an int, got {type(count).__name__} {count!r}")
    count = int(count)
    if not 0 <= count <= numel:
        raise ValueError(f"count must be in [0, {numel}] for shape {tuple(shape)}, got {count}")
    check_generator(generator)
    if count == numel:
        mask = torch.ones(shape, dtype=torch.bool)
    else:
        mask = torch.zeros(numel, dtype=torch.bool)
        if count > 0:
            mask[torch.randperm(numel, generator=generator)[:count]] = True
        mask = mask.view(shape)
    return mask if device is None else mask.to(device)
