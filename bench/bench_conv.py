"""One sparse conv layer, forward and forward+backward, vs dense ``nn.Conv2d`` (CPU fp32).

``y = conv2d(x, W, stride, padding)`` with ``x`` ``(n, c, h, w)``, ``W`` ``(out, c, kh, kw)`` at
a given density, no bias, dilation 1, groups 1. "fwd" is one training forward (autograd on,
graph recorded); "fwd+bwd" is that forward plus ``y.backward(grad)`` with a fixed random
``grad``, computing the gradient of the input and of the weight (its active values for the
sparse rows); gradients are set to None before every call, as ``optimizer.zero_grad()`` does.
Rows:

- ``dense``: ``F.conv2d`` (torch's oneDNN) with the dense masked weight: the baseline; its
  weight gradient is the whole dense one.
- ``im2col_csr``: the best composition of PyTorch ops we found: ``F.unfold`` of the batch
  into one ``(c*kh*kw, n*oh*ow)`` column matrix, ``torch.sparse.mm`` of the CSR weight
  ``(out, c*kh*kw)`` with it (one call for the whole batch, not n per-sample calls that would
  each pay torch's per-call cost; the alternative is not timed here); input gradient: the CSR
  transpose (structure built once outside the timed region, values gathered through a
  permutation every step) times the gradient's columns, then ``F.fold``; weight gradient at
  the active positions only, by whichever of two ways is faster for that layer and density,
  chosen by timing both once before the timed repeats (``weight_grad_method`` in the
  records): ``sampled_addmm`` (``torch.sparse.sampled_addmm``: one dot product of length
  n*oh*ow per active weight, an SDDMM) or ``dense_gather`` (the dense ``grad @ cols.T`` GEMM,
  then the active entries gathered: all the dense FLOPs, but at GEMM speed, so it can win at
  the higher densities). A gather-based SDDMM in pure torch (``(grad[rows] * cols[cols]).sum``)
  materialises nnz x n*oh*ow products (about 1 GB for 3x3 256->256 16x16 at batch 32 and
  density 0.05) and is not a contender.
- ``csr`` (ours): ``sparsemom_ext.nn.CsrConv2d`` (its op ``sparsemom_ext.ops.csr_conv2d``),
  with the input and the output gradient already in the op's batch-innermost layout
  (memory ``(c, h, w, n)``), as they are between stacked csr convs; the copies are not timed.
- ``csr_from_nchw`` (ours): the same layer fed a contiguous NCHW input and a contiguous NCHW
  output gradient, as when the layer is dropped among dense layers: the op's copies into its
  layout are timed (the output stays batch-innermost: the next elementwise op reads any
  strides).
- ``sparseprop``: ``sparseprop.modules.SparseConv2d`` if ``import sparseprop`` works (it is
  not installed by the project; the JSON says "not importable" otherwise).

Rows that cannot run (``CsrConv2d`` or ``torch.ops.sparsemom.csr_conv2d_weight_grad`` not
there yet, sparseprop not importable) are recorded with ``status: "unavailable"`` and the
reason, never timed.

Checks. Every run starts with the check pass (``--check`` runs only it): each row, on a few
small layers (3x3 with padding, stride 2, 1x1 stride 2, 5x5 without padding, a non-square
input) at every density asked, against float64 ``F.conv2d`` on the masked weight: output,
input gradient and the weight gradient at the active positions, to 1e-4 of the largest
reference entry (both weight-gradient ways of ``im2col_csr`` are checked). A row that fails
any check is not timed anywhere. At every benchmarked layer each row's output and gradients
are also compared with the dense row's (float32, 5e-4 of the largest entry) before timing.

Timing: all rows of one (layer, density) interleaved in one process, warm-up first, medians
of ``--repeats``; speed-up = dense median / row median. Useful GFLOP/s count 2*nnz*n*oh*ow
per pass (1 pass fwd, 3 fwd+bwd: forward, input gradient, weight gradient); ``dense_gflops``
is dense's rate on its own FLOPs (2*out*c*kh*kw*n*oh*ow per pass). Writes JSON
(``bench/results/bench_conv.json``), a speed-up vs density plot per layer (``.png`` beside
it, matplotlib) and prints a markdown table for docs/benchmarks.md. Never asserts a speed.

Layers (``--shapes``: group names or specs ``NxCxOxHxW-kK-sS-pP``, e.g. ``32x256x256x16x16-k3-s1-p1``):
``issue`` (3x3 256->256 16x16 batch 32; 3x3 128->128 32x32 batch 128; 3x3 512->512 4x4 batch
128; LeNet-5-Caffe's conv2, 20->50 5x5 on 12x12, batch 100), ``vgg16`` and ``wrn-16-8`` (the
distinct conv layers of ``sparsemom_ext/train/models.py``'s models on 32x32 inputs at batch
128, read by running the model), ``all`` (the default: all of them, duplicates once).

``--training``: whole training steps of VGG-16 and WRN-16-8 (CIFAR shapes, batch 128):
dense (``torch.optim.SGD``) against ``sparsify(model, density=0.05, layout="csr")`` with
``sm.optim.SGD`` and a ``SparseMomentum`` engine (momentum growth) updating every
``--period`` steps (default 390: once per CIFAR-10 epoch at batch 128). One step is
zero_grad, forward, cross-entropy, backward, ``optimizer.step()``, ``engine.step()``; the
sparse rows run whole update periods, so the mean step includes the update at its real
frequency (as ``bench_training.py`` does); the first timed period follows the first update.
Beside each speed-up, the ratio of useful forward FLOPs (2 x active weights x output
positions, summed over the weight layers): momentum redistribution moves weights into the
early, high-resolution layers, where each costs more, so that ratio falls with each update.
Memory: parameters, gradients, optimizer state and buffers
(``bench_training.training_memory``), and the step's peak estimated as that plus the
activations autograd saves for backward (distinct storages that are not parameters,
buffers or optimizer state: a step's high-water mark is about there, at the start of the
backward; the CPU has no allocator statistics in torch; on CUDA ``max_memory_allocated``
too). ``--layout mask`` runs the mask layout (SparseConv2d) instead of csr. A default run
is long on a 2-core CPU (a sparse row runs whole 390-step periods): ``--period`` and
``--repeats`` shorten it, at the cost of updating more often than the reference.
Inputs are random CIFAR-shaped batches unless ``--cifar-root`` is given. Writes
``bench/results/training_conv.json``.

    python bench/bench_conv.py                               # all layers, 2 threads
    python bench/bench_conv.py --check                       # the correctness pass only
    python bench/bench_conv.py --quick --shapes issue --densities 0.05
    python bench/bench_conv.py --training --models vgg16 --period 50 --repeats 1
"""

import argparse
import functools
import itertools
import importlib.metadata
import math
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsemom_ext as sm

from common import environment, summarize, time_interleaved, write_json

DENSITIES = [0.2, 0.1, 0.05, 0.01]
OPS = ["fwd", "fwd+bwd"]
PASSES = {"fwd": 1, "fwd+bwd": 3}
CHECK_TOLERANCE = 1e-4      # vs float64, relative to the largest reference entry
AGREE_TOLERANCE = 5e-4      # vs the dense float32 row at the benchmarked layer
ROWS = ["dense", "im2col_csr", "csr", "csr_from_nchw", "sparseprop"]
SPEC = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+)x(\d+)-k(\d+)-s(\d+)-p(\d+)$")


# --------------------------------------------------------------------------- layers
class Conv:
    """One conv layer's geometry: batch, channels, input size, square kernel/stride/padding."""

    def __init__(self, batch, cin, cout, h, w, k, s, p, label=None):
        self.batch, self.cin, self.cout, self.h, self.w, self.k, self.s, self.p = batch, cin, cout, h, w, k, s, p
        self.label = label or self.spec

    @property
    def spec(self):
        return f"{self.batch}x{self.cin}x{self.cout}x{self.h}x{self.w}-k{self.k}-s{self.s}-p{self.p}"

    @property
    def out_hw(self):
        return tuple((size + 2 * self.p - self.k) // self.s + 1 for size in (self.h, self.w))

    @property
    def columns(self):  # in_channels * kh * kw: the CSR matrix's width
        return self.cin * self.k * self.k

    def fields(self):
        oh, ow = self.out_hw
        return dict(shape=self.spec, label=self.label, batch=self.batch, in_channels=self.cin,
                    out_channels=self.cout, kernel=self.k, stride=self.s, padding=self.p,
                    height=self.h, width=self.w, out_height=oh, out_width=ow)


def parse_spec(text, label=None):
    match = SPEC.match(text)
    if match is None:
        raise ValueError(f"layer {text!r}: expected a group ({', '.join(GROUPS)}) or NxCxOxHxW-kK-sS-pP")
    return Conv(*map(int, match.groups()), label=label)


ISSUE = [("32x256x256x16x16-k3-s1-p1", "3x3 256->256 16x16, batch 32"),
         ("128x128x128x32x32-k3-s1-p1", "3x3 128->128 32x32, batch 128"),
         ("128x512x512x4x4-k3-s1-p1", "3x3 512->512 4x4, batch 128"),
         ("100x20x50x12x12-k5-s1-p0", "LeNet-5 conv2 20->50 5x5 12x12, batch 100")]


def model_convs(name, batch=128):
    """The distinct conv layers of a training-command model on 32x32x3 inputs at ``batch``."""
    from sparsemom_ext.train.models import build_model

    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10).eval()
    seen = {}

    def hook(module, args, _):
        x = args[0]
        key = (module.in_channels, module.out_channels, x.shape[2], x.shape[3], module.kernel_size[0],
               module.stride[0], module.padding[0])
        if module.kernel_size[0] != module.kernel_size[1] or module.stride[0] != module.stride[1] \
                or module.padding[0] != module.padding[1] or module.groups != 1 or module.dilation != (1, 1):
            raise ValueError(f"{name}: conv {module} is not a square dense conv")
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    return [Conv(batch, cin, cout, h, w, k, s, p,
                 label=f"{name} {k}x{k}{' s' + str(s) if s > 1 else ''} {cin}->{cout} {h}x{w}"
                       f"{f' (x{count})' if count > 1 else ''}, batch {batch}")
            for (cin, cout, h, w, k, s, p), count in seen.items()]


GROUPS = {"issue": lambda: [parse_spec(s, label) for s, label in ISSUE],
          "vgg16": lambda: model_convs("vgg16"),
          "wrn-16-8": lambda: model_convs("wrn-16-8")}
GROUPS["all"] = lambda: GROUPS["issue"]() + GROUPS["vgg16"]() + GROUPS["wrn-16-8"]()


def resolve_layers(names):
    layers, seen = [], {}
    for name in names:
        for conv in (GROUPS[name]() if name in GROUPS else [parse_spec(name)]):
            if conv.spec in seen:  # the same layer in two groups: timed once, under both names
                if conv.label not in seen[conv.spec].label:
                    seen[conv.spec].label += f"; {conv.label}"
                continue
            seen[conv.spec] = conv
            layers.append(conv)
    return layers


# Small layers for the check pass: padding, stride, 1x1, no padding, non-square input.
CHECK_LAYERS = ["3x5x7x9x9-k3-s1-p1", "2x6x5x10x10-k3-s2-p1", "3x8x6x7x7-k1-s2-p0",
                "2x4x6x12x12-k5-s1-p0", "3x5x4x6x11-k3-s1-p1"]


# --------------------------------------------------------------------------- the problem
def make_problem(conv, density, seed=0):
    """Mask with exactly round(density * numel) positions, masked weight, input, output grad."""
    g = torch.Generator().manual_seed(seed)
    shape = (conv.cout, conv.cin, conv.k, conv.k)
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=g)[: max(1, round(density * numel))]] = True
    mask = mask.view(shape)
    # Values bounded away from 0: "nonzero" and "in the mask" are the same set (sparseprop
    # reads its structure from the nonzeros of the dense weight).
    magnitude = torch.rand(shape, generator=g) + 0.5
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    weight = torch.where(mask, magnitude * sign / math.sqrt(density * conv.columns), 0.0)
    x = torch.randn(conv.batch, conv.cin, conv.h, conv.w, generator=g)
    grad = torch.randn(conv.batch, conv.cout, *conv.out_hw, generator=g)
    return mask, weight, x, grad


def batch_innermost(t):
    """``t`` (n, c, h, w) with memory (c, h, w, n): the csr conv op's layout."""
    return t.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


class Impl:
    """A layer under test: ``forward(x)``, its trainable leaves, the weight gradient as the
    active values in row-major (CSR) order, and the (mask, weight) it computes with (a row
    that draws its own structure says so: it is checked against its own weight)."""

    def __init__(self, forward, params, weight_grad, mask, weight, layout=None, info=None):
        self.forward, self.params, self.weight_grad = forward, params, weight_grad
        self.mask, self.weight = mask, weight
        self.layout = layout or (lambda t: t)  # the layout the row's input and grad come in
        self.info = info or {}


def dense_impl(conv, mask, weight):
    w = weight.clone().requires_grad_()
    return Impl(lambda x: F.conv2d(x, w, stride=conv.s, padding=conv.p), [w], lambda: w.grad[mask], mask, weight)


class _Structure:
    """The CSR structure of an (out, c*kh*kw) mask and of its transpose, int32 (torch's CPU
    CSR kernels are faster on int32 indices than on int64)."""

    def __init__(self, mask2d):
        w = mask2d.float().to_sparse_csr()
        crow, col = w.crow_indices(), w.col_indices()
        rows = torch.repeat_interleave(torch.arange(mask2d.shape[0]), crow.diff())
        # t_perm[j]: the CSR position of entry j of W.T (stable sort keeps rows increasing).
        self.perm = torch.sort(col, stable=True).indices
        t_crow = torch.cat([crow.new_zeros(1), torch.bincount(col, minlength=mask2d.shape[1]).cumsum(0)])
        self.crow, self.col, self.t_crow, self.t_col = (t.int() for t in (crow, col, t_crow, rows[self.perm]))
        self.flat = (rows * mask2d.shape[1] + col)  # positions in the dense (out, K) matrix
        self.shape = tuple(mask2d.shape)


def _weight_grad(method, st, values, g2d, cols2d):
    """The weight gradient at the active positions, ``(nnz,)``, from the output gradient's
    columns ``g2d`` (out, n*L) and the input's columns ``cols2d`` (K, n*L)."""
    if method == "sampled_addmm":
        pattern = torch.sparse_csr_tensor(st.crow, st.col, values.detach(), st.shape, check_invariants=False)
        # mat2 = cols2d.T is a view: the kernel reads mat2's transpose, cols2d itself, contiguously.
        return torch.sparse.sampled_addmm(pattern, g2d, cols2d.T, beta=0.0).values()
    return (g2d @ cols2d.T).view(-1)[st.flat]  # "dense_gather": the dense GEMM, then the active entries


class _Im2colCsrConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, st, conv, method):
        n, _, h, w = x.shape
        oh, ow = conv.out_hw
        cols = F.unfold(x, conv.k, padding=conv.p, stride=conv.s)           # (n, K, L)
        cols2d = cols.transpose(0, 1).reshape(conv.columns, n * oh * ow)     # (K, n*L), one copy
        weight = torch.sparse_csr_tensor(st.crow, st.col, values, st.shape, check_invariants=False)
        y = torch.sparse.mm(weight, cols2d)                                  # (out, n*L)
        ctx.save_for_backward(values, cols2d)
        ctx.st, ctx.conv, ctx.method, ctx.input_hw = st, conv, method, (h, w)
        return y.view(conv.cout, n, oh, ow).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        values, cols2d = ctx.saved_tensors
        st, conv = ctx.st, ctx.conv
        n = grad.shape[0]
        g2d = grad.transpose(0, 1).reshape(conv.cout, -1)                   # (out, n*L)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            w_t = torch.sparse_csr_tensor(st.t_crow, st.t_col, values[st.perm], st.shape[::-1],
                                          check_invariants=False)
            grad_cols = torch.sparse.mm(w_t, g2d)                            # (K, n*L)
            grad_x = F.fold(grad_cols.view(conv.columns, n, -1).transpose(0, 1), ctx.input_hw, conv.k,
                            padding=conv.p, stride=conv.s)
        if ctx.needs_input_grad[1]:
            grad_values = _weight_grad(ctx.method, st, values, g2d, cols2d)
        return grad_x, grad_values, None, None, None


def choose_weight_grad_method(conv, st, values, x, grad):
    """The faster of the two weight-gradient ways for this layer: the best of 2 calls each."""
    cols2d = F.unfold(x, conv.k, padding=conv.p, stride=conv.s).transpose(0, 1).reshape(conv.columns, -1)
    g2d = grad.transpose(0, 1).reshape(conv.cout, -1)
    best = {}
    for method in ("sampled_addmm", "dense_gather"):
        _weight_grad(method, st, values, g2d, cols2d)
        samples = []
        for _ in range(2):
            start = time.perf_counter()
            _weight_grad(method, st, values, g2d, cols2d)
            samples.append((time.perf_counter() - start) * 1e3)
        best[method] = min(samples)
    return min(best, key=best.get), best


def im2col_csr_impl(conv, mask, weight, x=None, grad=None, method=None):
    mask2d = mask.reshape(conv.cout, -1)
    st = _Structure(mask2d)
    values = weight.reshape(conv.cout, -1)[mask2d].clone().requires_grad_()
    info = {}
    if method is None:
        method, ms = choose_weight_grad_method(conv, st, values.detach(), x, grad)
        info = {"weight_grad_method": method, "weight_grad_calibration_ms": ms}
    else:
        info = {"weight_grad_method": method}
    return Impl(lambda t: _Im2colCsrConv.apply(t, values, st, conv, method), [values], lambda: values.grad,
                mask, weight, info=info)


def csr_unavailable_reason():
    missing = []
    if not hasattr(sm.nn, "CsrConv2d"):
        missing.append("sparsemom_ext.nn.CsrConv2d does not exist")
    try:
        has_op = hasattr(torch.ops.sparsemom, "csr_conv2d_weight_grad")
    except Exception:
        has_op = False
    if not has_op:
        missing.append("torch.ops.sparsemom.csr_conv2d_weight_grad is not registered (extension not rebuilt?)")
    return "; ".join(missing) or None


def csr_impl(conv, mask, weight, nchw_input=False):
    """Our CsrConv2d holding the problem's weights when it can take them (``from_mask_layer``
    of a SparseConv2d, as CsrLinear does), else at its own random structure of the same nnz
    (then checked against its own dense weight)."""
    cls = sm.nn.CsrConv2d
    layer = None
    info = {}
    if hasattr(cls, "from_mask_layer"):
        try:
            src = sm.nn.SparseConv2d(conv.cin, conv.cout, conv.k, stride=conv.s, padding=conv.p, bias=False,
                                     density=float(mask.float().mean()))
            with torch.no_grad():
                src.mask.copy_(mask)
                src.weight.copy_(weight)
            layer = cls.from_mask_layer(src)
            info["structure"] = "the problem's"
        except Exception as exc:  # its API differs from CsrLinear's: fall back to its own structure
            info["from_mask_layer_error"] = f"{type(exc).__name__}: {exc}"[:200]
            layer = None
    if layer is None:
        torch.manual_seed(0)
        layer = cls(conv.cin, conv.cout, conv.k, stride=conv.s, padding=conv.p, bias=False,
                    density=float(mask.float().mean()))
        info["structure"] = "its own (same nnz)"
    # Between stacked csr convs activations stay batch innermost; fed from dense layers
    # (nchw_input), the layer makes its output contiguous, its default.
    layer.output_layout = "contiguous" if nchw_input else "batch_innermost"
    if int(layer.nnz) != int(mask.sum()):
        raise RuntimeError(f"CsrConv2d has {layer.nnz} active weights, the problem {int(mask.sum())}")
    own_mask = layer.mask.reshape(mask.shape).bool()
    own_weight = layer.dense_weight().detach().reshape(weight.shape).float()
    nnz = int(layer.nnz)

    def weight_grad():
        g = layer.values.grad
        return None if g is None else g[:nnz]

    return Impl(layer, [layer.values], weight_grad, own_mask, own_weight,
                layout=(lambda t: t.contiguous()) if nchw_input else batch_innermost, info=info)


def sparseprop_version():
    try:
        import sparseprop.modules  # noqa: F401
    except Exception as exc:  # ImportError, or a backend that does not load
        return None, f"not importable ({type(exc).__name__}: {exc})"
    return importlib.metadata.version("sparseprop"), None


def sparseprop_impl(conv, mask, weight):
    from sparseprop.modules import SparseConv2d

    layer = SparseConv2d(weight.clone(), padding=conv.p, stride=conv.s)
    if layer.W_val.numel() != int(mask.sum()):
        raise RuntimeError(f"sparseprop found {layer.W_val.numel()} nonzeros, mask has {int(mask.sum())}")
    return Impl(layer, [layer.W_val], lambda: layer.W_val.grad, mask, weight)


def row_factories(unavailable):
    """{row: make(conv, mask, weight, x, grad)} of the rows that can run; ``unavailable`` gets
    {row: reason} for the others."""
    rows = {"dense": lambda c, m, w, x, g: dense_impl(c, m, w),
            "im2col_csr": lambda c, m, w, x, g: im2col_csr_impl(c, m, w, x, g)}
    reason = csr_unavailable_reason()
    if reason is None:
        rows["csr"] = lambda c, m, w, x, g: csr_impl(c, m, w)
        rows["csr_from_nchw"] = lambda c, m, w, x, g: csr_impl(c, m, w, nchw_input=True)
    else:
        unavailable["csr"] = unavailable["csr_from_nchw"] = reason
    version, reason = sparseprop_version()
    if version is None:
        unavailable["sparseprop"] = reason
    else:
        rows["sparseprop"] = lambda c, m, w, x, g: sparseprop_impl(c, m, w)
    return rows


# --------------------------------------------------------------------------- checking
def run_once(impl, x, grad):
    """Forward and backward once; (y, grad of x, weight gradient at the active positions)."""
    x = impl.layout(x.detach()).requires_grad_()
    grad = impl.layout(grad)
    for p in impl.params:
        p.grad = None
    y = impl.forward(x)
    y.backward(grad)
    wg = impl.weight_grad()
    return y.detach(), x.grad, None if wg is None else wg.detach()


def reference(conv, mask, weight, x, grad):
    """float64 F.conv2d on the masked weight: output, input grad, weight grad at the mask."""
    w64, x64 = weight.double().requires_grad_(), x.double().requires_grad_()
    y64 = F.conv2d(x64, w64, stride=conv.s, padding=conv.p)
    y64.backward(grad.double())
    return y64.detach(), x64.grad, w64.grad[mask]


def compare(got, expected, tol):
    """None if the three results match ``expected`` to ``tol`` of the largest entry, else why."""
    for what, actual, ref in zip(["output", "grad input", "grad weight"], got, expected):
        if actual is None:
            return f"{what} is None"
        if tuple(actual.shape) != tuple(ref.shape):
            return f"{what} has shape {tuple(actual.shape)}, expected {tuple(ref.shape)}"
        try:
            torch.testing.assert_close(actual.double(), ref.double(), rtol=tol,
                                       atol=tol * max(ref.abs().max().item(), 1.0))
        except AssertionError as exc:
            detail = "; ".join(line for line in str(exc).splitlines()[1:4] if line)
            return f"{what} does not match: {detail}"
    return None


def error_text(exc):
    return f"{type(exc).__name__}: {str(exc).split('. ')[0][:200]}"


def check_pass(factories, densities):
    """Each row on the small check layers at each density vs float64; {row: first failure}."""
    failures, checked = {}, 0
    variants = dict(factories)
    if "im2col_csr" in variants:  # both weight-gradient ways, whichever a layer will pick
        del variants["im2col_csr"]
        for method in ("sampled_addmm", "dense_gather"):
            variants[f"im2col_csr[{method}]"] = (
                lambda c, m, w, x, g, method=method: im2col_csr_impl(c, m, w, method=method))
    for spec in CHECK_LAYERS:
        conv = parse_spec(spec)
        for density in densities:
            mask, weight, x, grad = make_problem(conv, density, seed=1)
            for name, make in variants.items():
                row = name.split("[")[0]
                if row in failures:
                    continue
                try:
                    impl = make(conv, mask, weight, x, grad)
                    expected = reference(conv, impl.mask, impl.weight, x, grad)
                    error = compare(run_once(impl, x, grad), expected, CHECK_TOLERANCE)
                except Exception as exc:  # a missing or broken kernel: report it, keep going
                    error = error_text(exc)
                checked += 1
                if error is not None:
                    failures[row] = f"{name} at {spec} density {density}: {error}"
                    print(f"# CHECK FAILED {failures[row]}", flush=True)
    ok = [r for r in factories if r not in failures]
    print(f"# check pass: {checked} checks on {len(CHECK_LAYERS)} layers x {len(densities)} densities; "
          f"passed: {', '.join(ok) or 'none'}", flush=True)
    return failures


# --------------------------------------------------------------------------- timing
def timed_fns(impl, x, grad):
    x = impl.layout(x.detach()).requires_grad_()
    grad = impl.layout(grad)
    leaves = [x, *impl.params]

    def fwd():
        impl.forward(x)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        impl.forward(x).backward(grad)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def bench_one(conv, density, factories, unavailable, repeats, warmup):
    mask, weight, x, grad = make_problem(conv, density)
    nnz = int(mask.sum())
    oh, ow = conv.out_hw
    fields = dict(**conv.fields(), density=density, nnz=nnz, device="cpu", dtype="float32")
    useful = 2 * nnz * conv.batch * oh * ow
    dense_flops = 2 * conv.cout * conv.columns * conv.batch * oh * ow

    def not_timed(name, status, error):
        return [{**fields, "op": op, "impl": name, "status": status, "error": error, "median_ms": None,
                 "min_ms": None, "max_ms": None, "speedup_vs_dense": None, "gflops": None} for op in OPS]

    impls, fns, records = {}, {}, []
    for name in ROWS:
        if name in unavailable:
            records += not_timed(name, "unavailable", unavailable[name])
            continue
        try:
            impl = factories[name](conv, mask, weight, x, grad)
            if name == "dense":
                expected = run_once(impl, x, grad)
            elif impl.mask is mask:
                error = compare(run_once(impl, x, grad), expected, AGREE_TOLERANCE)
            else:  # its own structure: the float64 reference on its weight
                error = compare(run_once(impl, x, grad), reference(conv, impl.mask, impl.weight, x, grad),
                                CHECK_TOLERANCE)
        except Exception as exc:
            if name == "dense":
                raise
            error = error_text(exc)
        if name != "dense" and error is not None:
            print(f"# ERROR {conv.spec} density {density} {name}: {error}", flush=True)
            records += not_timed(name, "error", error)
            continue
        impls[name], fns[name] = impl, timed_fns(impl, x, grad)
    del expected

    timed = []
    for op in OPS:
        times = time_interleaved({name: f[op] for name, f in fns.items()}, "cpu", repeats, warmup)
        dense_gflops = PASSES[op] * dense_flops / statistics.median(times["dense"]) / 1e6
        for r in summarize(times, baseline="dense", op=op, **fields):
            r["status"] = "ok"
            r["speedup_vs_dense"] = r.pop("speedup_vs_baseline")
            r["gflops"] = PASSES[op] * useful / r["median_ms"] / 1e6
            r["dense_gflops"] = dense_gflops
            r.update(impls[r["impl"]].info)
            timed.append(r)
        print(f"# {conv.spec} density {density} {op}: "
              + ", ".join(f"{r['impl']} {r['median_ms']:.2f} ms {r['speedup_vs_dense']:.2f}x"
                          for r in timed[-len(fns):]), flush=True)
    return timed + records


# --------------------------------------------------------------------------- output
def markdown_table(records):
    """One line per (layer, density): dense ms, then each row's speed-up fwd / fwd+bwd."""
    ok = {(r["shape"], r["density"], r["op"], r["impl"]): r for r in records if r["status"] == "ok"}
    rows = [r for r in ROWS if r != "dense" and any(k[3] == r for k in ok)]
    lines = ["| layer | density | dense fwd / fwd+bwd | " + " | ".join(rows) + " |",
             "|---|---|---|" + "---|" * len(rows)]
    last = None
    for shape, label, density in dict.fromkeys((r["shape"], r["label"], r["density"]) for r in records):
        dense = [ok.get((shape, density, op, "dense")) for op in OPS]
        if None in dense:
            continue
        cells = [label if label != last else "", f"{density:g}",
                 f"{dense[0]['median_ms']:.2f} / {dense[1]['median_ms']:.2f} ms"]
        last = label
        for row in rows:
            got = [ok.get((shape, density, op, row)) for op in OPS]
            if None in got:
                cells.append("-")
                continue
            cell = f"{got[0]['speedup_vs_dense']:.2f}x / {got[1]['speedup_vs_dense']:.2f}x"
            if row.startswith("csr"):
                cell = f"**{cell}** ({got[1]['median_ms']:.2f} ms, {got[1]['gflops']:.1f} GFLOP/s)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    except ImportError:
        print("# matplotlib is not installed: no plot (`pip install matplotlib` to get one)")
        return
    ok = [r for r in records if r["status"] == "ok" and r["impl"] != "dense"]
    shapes = list(dict.fromkeys((r["shape"], r["label"]) for r in ok))
    if not shapes:
        return
    impls = [name for name in ROWS if any(r["impl"] == name for r in ok)]
    colors = {name: f"C{i}" for i, name in enumerate(impls)}
    ncols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax, (shape, label) in zip(axes.flat, shapes):
        for name in impls:
            for op, style in (("fwd+bwd", "-"), ("fwd", "--")):
                pts = sorted((r["density"], r["speedup_vs_dense"]) for r in ok
                             if r["shape"] == shape and r["impl"] == name and r["op"] == op)
                if pts:
                    ax.plot([d for d, _ in pts], [s for _, s in pts], style, marker="o", markersize=3,
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
        ax.set_xlabel("sparsity %", fontsize=8)
        ax.set_ylabel("speed-up vs dense", fontsize=8)
        ax.set_title(label.split(";")[0], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle("sparse conv layer vs dense nn.Conv2d, CPU fp32 (solid: fwd+bwd, dashed: fwd)")
    fig.tight_layout(rect=(0, 0.06 if nrows > 1 else 0.12, 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"# wrote {path}")


# --------------------------------------------------------------------------- training steps
def saved_bytes_hooks(model, optimizer):
    """A context recording the distinct storages autograd saves for backward, other than the
    model's parameters, buffers and optimizer state (counted in the training memory already):
    the activations, {data_ptr: bytes}."""
    seen = {}
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    known = {t.untyped_storage().data_ptr() for t in tensors}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in known:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def training_mode(args, env):
    from bench_training import timed_steps, training_memory

    from sparsemom_ext.train.models import build_model
    from sparsemom_ext.train.speedup import weight_density, weight_layers

    torch.set_flush_denormal(True)  # as bench_training and the training command do
    env["flush_denormal"] = True
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.cifar_root:
        images, labels = sm.data.load_cifar10(args.cifar_root, "train")
        x = torch.from_numpy(images[: args.batch * args.batches]).float().div_(255.0)
        x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
        y = torch.from_numpy(labels[: args.batch * args.batches]).long()
        env["data"] = f"CIFAR-10 train from {args.cifar_root}, first {len(x)} images"
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch * args.batches, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (len(x),), generator=g)
        env["data"] = "random CIFAR-shaped batches (normal inputs, uniform labels)"
    data = [(x[i:i + args.batch].to(device), y[i:i + args.batch].to(device)) for i in range(0, len(x), args.batch)]
    reason = csr_unavailable_reason() if args.layout == "csr" else None

    def weight_shape(layer):  # the dense shape, for the csr layers too
        return layer.weight_shape if hasattr(layer, "nnz") else layer.weight.shape

    class Run:
        def __init__(self, name, model_name, growth, activations="contiguous"):
            torch.manual_seed(0)
            self.name, self.cursor, self.activations = name, 0, activations
            self.model = build_model(model_name, (3, 32, 32), 10).to(device)
            sgd = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
            if growth is None:
                self.optimizer, self.engine = torch.optim.SGD(self.model.parameters(), **sgd), None
            else:
                sm.sparsify(self.model, density=args.density, layout=args.layout,
                            generator=torch.Generator().manual_seed(0))
                if activations == "batch_innermost":
                    sm.nn.keep_batch_innermost(self.model)
                self.optimizer = sm.optim.SGD(self.model.parameters(), **sgd)
                self.engine = sm.SparseMomentum(self.model, self.optimizer, update_every=args.period,
                                                total_steps=1 << 40, growth=growth)
            self.layers = {}
            for m in self.model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)) or type(m).__name__.startswith(("Csr", "Sparse")):
                    self.layers[type(m).__name__] = self.layers.get(type(m).__name__, 0) + 1
            # Output positions (batch x height x width) per weight layer, read by the first forward;
            # each hook then removes itself, so the timed steps carry none.
            self.positions, hooks = {}, {}

            def record_positions(m, inputs, out, layer_name):
                self.positions[layer_name] = out.numel() // weight_shape(m)[0]
                hooks.pop(layer_name).remove()

            for layer_name, m in weight_layers(self.model):
                hooks[layer_name] = m.register_forward_hook(functools.partial(record_positions, layer_name=layer_name))

        def forward_gflop(self):
            """Useful forward GFLOP of a step at the current densities (2 x active weights x output
            positions per layer): redistribution moves weights between layers whose weights cost
            different numbers of FLOPs, so it changes with each topology update."""
            total = 0
            for layer_name, m in weight_layers(self.model):
                total += 2 * math.prod(weight_shape(m)) * weight_density(m) * self.positions[layer_name]
            return total / 1e9

        def step(self):
            xb, yb = data[self.cursor % len(data)]
            self.cursor += 1
            self.optimizer.zero_grad()
            F.cross_entropy(self.model(xb), yb).backward()
            self.optimizer.step()
            if self.engine is not None:
                self.engine.step()

    runs, records = {}, []
    for model_name in args.models.split(","):
        runs[f"dense/{model_name}"] = Run(f"dense/{model_name}", model_name, None)
        layouts = args.activations.split(",") if args.layout == "csr" else ["contiguous"]
        for growth, activations in itertools.product(args.growth.split(","), layouts):
            # "csr": batch-innermost activations (the training command's); "csr-contiguous": without.
            kind = args.layout if args.layout == "mask" or activations == "batch_innermost" else f"csr-{activations}"
            name = f"{kind}/{growth}/{model_name}"
            if reason is not None:
                records.append({"impl": name, "model": model_name, "status": "unavailable", "error": reason})
                print(f"# {name}: unavailable: {reason}")
                continue
            runs[name] = Run(name, model_name, growth, activations)
            if args.layout == "csr" and "Conv2d" in runs[name].layers:
                print(f"# WARNING {name}: sparsify left {runs[name].layers['Conv2d']} dense Conv2d layers",
                      flush=True)
    for run in runs.values():  # warm-up; also creates the optimizer state measured below
        timed_steps(run, args.warmup_steps, sync)
    memory = {name: training_memory(run.model, run.optimizer) for name, run in runs.items()}
    peak = {}
    for name, run in runs.items():  # one step with the saved tensors counted
        hooks, seen = saved_bytes_hooks(run.model, run.optimizer)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with hooks:
            run.step()
        peak[name] = {"saved_for_backward_bytes": sum(seen.values())}
        if device == "cuda":
            peak[name]["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()

    step_times = {name: [] for name in runs}
    amortised = {name: [] for name in runs}
    update_steps = {name: [] for name in runs}
    gflop = {name: [] for name in runs}  # per repeat, at its start
    for repeat in range(args.repeats):
        for name, run in runs.items():
            if run.engine is None:
                gflop[name].append(run.forward_gflop())
                times = timed_steps(run, args.dense_steps, sync)
            else:  # a whole period, from just after an update to the next one, inclusive
                while run.engine.steps % args.period:
                    run.step()
                updates = run.engine.updates
                gflop[name].append(run.forward_gflop())
                times = timed_steps(run, args.period, sync)
                assert run.engine.updates == updates + 1, "a period must contain exactly one update"
                update_steps[name].append(times[-1])
            step_times[name] += times
            amortised[name].append(sum(times) / len(times))
            print(f"# repeat {repeat + 1}/{args.repeats} {name}: median step {statistics.median(times):.1f} ms, "
                  f"mean {amortised[name][-1]:.1f} ms, forward {gflop[name][-1]:.2f} GFLOP", flush=True)

    for name, run in runs.items():
        model_name = name.rsplit("/", 1)[1]
        dense = f"dense/{model_name}"
        per_step = statistics.median(amortised[name])
        records.append({
            "impl": name, "model": model_name, "status": "ok", "layers": run.layers, "activations": run.activations,
            "density": 1.0 if run.engine is None else args.density, "batch": args.batch,
            "period": args.period, "device": device,
            "median_step_ms": statistics.median(step_times[name]), "amortised_ms": per_step,
            "amortised_per_repeat_ms": amortised[name], "update_step_ms": update_steps[name],
            "speedup_vs_dense": statistics.median(amortised[dense]) / per_step,
            "forward_gflop_per_repeat": gflop[name],
            "flop_ratio_vs_dense": gflop[dense][0] / statistics.median(gflop[name]),
            "memory_bytes": memory[name], "memory_vs_dense": memory[name] / memory[dense],
            **peak[name], "peak_estimate_bytes": memory[name] + peak[name]["saved_for_backward_bytes"],
        })
    ok = [r for r in records if r["status"] == "ok"]
    for r in ok:
        r["peak_vs_dense"] = r["peak_estimate_bytes"] / next(
            d["peak_estimate_bytes"] for d in ok if d["impl"] == f"dense/{r['model']}")
    print("| model | median step | mean step (incl. updates) | update step | speed-up vs dense "
          "| dense / sparse FLOPs | training memory | vs dense | step peak (est.) | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ok:
        update = f"{statistics.median(r['update_step_ms']):.0f} ms" if r["update_step_ms"] else ""
        print(f"| {r['impl']} | {r['median_step_ms']:.1f} ms | {r['amortised_ms']:.1f} ms | {update} "
              f"| {r['speedup_vs_dense']:.2f}x | {r['flop_ratio_vs_dense']:.2f}x "
              f"| {r['memory_bytes'] / 2**20:.1f} MiB | {r['memory_vs_dense']:.3f} "
              f"| {r['peak_estimate_bytes'] / 2**20:.0f} MiB | {r['peak_vs_dense']:.3f} |")
    for r in records:
        if r["status"] != "ok":
            print(f"# not timed: {r['impl']}: {r['error']}")
    write_json(args.json or "bench/results/training_conv.json", env, records)


# --------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["all"],
                        help=f"groups ({', '.join(GROUPS)}) or layers NxCxOxHxW-kK-sS-pP")
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples per row (training: rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed samples first")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up: a smoke run")
    parser.add_argument("--check", action="store_true", help="run the check pass only")
    parser.add_argument("--json", default=None, help="default bench/results/bench_conv.json "
                                                     "(--training: bench/results/training_conv.json)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="sm.keep_freed_cpu_memory() first (the whole process: dense and sparse alike; "
                             "what the training command does)")
    parser.add_argument("--plot", default=None, help="PNG path; '' for none (default: the --json with .png)")
    training = parser.add_argument_group("--training: whole training steps of CNNs")
    training.add_argument("--training", action="store_true")
    training.add_argument("--models", default="vgg16,wrn-16-8")
    training.add_argument("--density", type=float, default=0.05)
    training.add_argument("--growth", default="momentum")
    training.add_argument("--layout", default="csr", choices=["csr", "mask"],
                          help="the sparse models' layout (mask: SparseConv2d, dense kernels on masked weights)")
    training.add_argument("--activations", default="batch_innermost",
                          help="csr: comma-separated activation layouts, each a run: batch_innermost "
                               "(sm.nn.keep_batch_innermost, what the training command does), contiguous")
    training.add_argument("--batch", type=int, default=128)
    training.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    training.add_argument("--period", type=int, default=390, help="steps between topology updates")
    training.add_argument("--dense-steps", type=int, default=5, help="dense steps per round")
    training.add_argument("--warmup-steps", type=int, default=2)
    training.add_argument("--cifar-root", default=None, help="CIFAR-10 folder (default: random batches)")
    training.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    bad = sorted(set(args.activations.split(",")) - {"batch_innermost", "contiguous"})
    if bad:
        parser.error(f"--activations: expected batch_innermost and/or contiguous, got {', '.join(bad)}")
    if args.quick:
        args.repeats, args.warmup = 3, 1
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    env = environment(args.threads)
    env["keep_freed_cpu_memory"] = sm.keep_freed_cpu_memory() if args.keep_freed_memory else False
    if args.training:
        training_mode(args, env)
        return
    if args.json is None:
        args.json = "bench/results/bench_conv.json"
    if args.plot is None:
        args.plot = str(Path(args.json).with_suffix(".png"))
    layers = resolve_layers(args.shapes)

    unavailable = {}
    factories = row_factories(unavailable)
    env["sparseprop"] = sparseprop_version()[0] or unavailable.get("sparseprop")
    env["csr"] = "available" if "csr" in factories else f"unavailable: {unavailable['csr']}"
    for key in ("sparseprop", "csr"):
        print(f"# {key}: {env[key]}")
    failures = check_pass(factories, args.densities)
    env["check_layers"], env["check_failures"] = CHECK_LAYERS, failures
    if args.check:
        raise SystemExit(1 if failures else 0)
    if "dense" in failures:
        raise SystemExit("the dense baseline failed its check: nothing timed")
    for row, why in failures.items():
        factories.pop(row)
        unavailable[row] = f"failed the check pass: {why}"

    records = []
    for conv in layers:
        for density in args.densities:
            records += bench_one(conv, density, factories, unavailable, args.repeats, args.warmup)
    print(markdown_table(records))
    for row, why in unavailable.items():
        print(f"# not timed: {row}: {why}")
    for r in records:
        if r["status"] == "error" and r["op"] == OPS[0]:
            print(f"# not timed: {r['impl']} at {r['shape']} density {r['density']}: {r['error']}")
    write_json(args.json, env, records)
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
