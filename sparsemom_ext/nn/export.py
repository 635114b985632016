"""The way out to plain torch: densify() for a dense copy, sparse_csr_weight() for torch's CSR tensors.

:func:`densify` gives back the model as the torch classes it was built from
(``nn.Linear``, ``nn.Conv2d``, ``nn.MultiheadAttention``, with the inactive weights as
exact zeros and no masks), whose state_dict loads with ``strict=True`` into the
original, never-sparsified architecture. :func:`sparse_csr_weight` gives a layer's
weight as a ``torch.sparse_csr_tensor`` for inference with torch's own sparse kernels.
"""

import copy
import inspect

import torch
from torch import nn

from ..csr_structure import csr_from_mask, csr_values_from_dense
from ..sparsity.masks import detach_mask, mask_of
from .attention import SparseMultiheadAttention
from .convert import DENSE_CLASS_ATTR, FAST_PATH_ATTR
from .csr_layout import CsrConv2d, CsrLayer, CsrLinear
from .mask_layout import SparseConv2d, SparseLinear

__all__ = ["densify", "sparse_csr_weight"]


def _dense_class(layer: nn.Module, base: type) -> type:
    """The torch class ``layer`` replaced (recorded by sparsify), if it is built like
    ``base`` (MultiheadAttention's NonDynamicallyQuantizableLinear is), else ``base``."""
    cls = layer.__dict__.get(DENSE_CLASS_ATTR, base)
    if cls is not base and not (issubclass(cls, base) and
                                list(inspect.signature(cls.__init__).parameters)
                                == list(inspect.signature(base.__init__).parameters)):
        return base
    return cls


def _parameter(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=requires_grad)


def _dense_linear(layer: nn.Module) -> nn.Linear:
    weight = layer.dense_weight()
    requires_grad = (layer.values if isinstance(layer, CsrLinear) else layer.weight).requires_grad
    cls = _dense_class(layer, nn.Linear)
    # On the meta device: no allocation or RNG draw for an initialisation overwritten below.
    new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta", dtype=weight.dtype)
    new.weight = _parameter(weight, requires_grad)
    if layer.bias is not None:
        new.bias = _parameter(layer.bias, layer.bias.requires_grad)
    return new.train(layer.training)


def _dense_conv(layer: nn.Module) -> nn.Conv2d:
    """An nn.Conv2d of a SparseConv2d or CsrConv2d (both have nn.Conv2d's attributes)."""
    weight = layer.dense_weight()
    requires_grad = (layer.values if isinstance(layer, CsrConv2d) else layer.weight).requires_grad
    cls = _dense_class(layer, nn.Conv2d)
    new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
              layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta",
              dtype=weight.dtype)
    new.weight = _parameter(weight, requires_grad)
    if layer.bias is not None:
        new.bias = _parameter(layer.bias, layer.bias.requires_grad)
    return new.train(layer.training)


def _dense_attention(layer: SparseMultiheadAttention, out_proj: nn.Module) -> nn.MultiheadAttention:
    masks = {name: mask for name, _, mask in layer.masked_weights()}
    some_weight = next(iter(layer.masked_weights()))[1]
    new = nn.MultiheadAttention(layer.embed_dim, layer.num_heads, layer.dropout,
                                bias=layer.in_proj_bias is not None, add_bias_kv=layer.bias_k is not None,
                                add_zero_attn=layer.add_zero_attn, kdim=layer.kdim, vdim=layer.vdim,
                                batch_first=layer.batch_first, device="meta", dtype=some_weight.dtype)
    for name, p in layer._parameters.items():
        if p is not None:
            value = p.detach().masked_fill(~masks[name], 0) if name in masks else p
            setattr(new, name, _parameter(value, p.requires_grad))
    new.out_proj = out_proj
    return new.train(layer.training)


def densify(model: nn.Module) -> nn.Module:
    """A new plain torch model computing what ``model`` computes; ``model`` is not modified.

    Each SparseLinear / CsrLinear becomes an ``nn.Linear`` (or the ``nn.Linear`` subclass
    that :func:`~sparsemom_ext.sparsify` replaced, such as MultiheadAttention's
    ``out_proj``), each SparseConv2d / CsrConv2d an ``nn.Conv2d``, each SparseMultiheadAttention an
    ``nn.MultiheadAttention``: dense weights with exact zeros at the inactive positions,
    same bias, device, dtype, ``requires_grad`` and train/eval mode. Masks (buffers and
    masks attached to any other parameter) are gone, and torch's transformer fast paths
    that sparsify() turned off are on again. Every other module is a deep copy, so the
    state_dict loads with ``strict=True`` into the architecture ``model`` was built from.
    Hooks and the engine's gradient taps on the sparse layers are not carried over,
    and gradients are not copied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # deepcopy's memo maps each sparse layer (and each masked parameter) to its dense
    # replacement, so the copy of everything around them is torch's own deepcopy.
    memo = {}
    modules = list(model.modules())
    for module in modules:
        if isinstance(module, (SparseLinear, CsrLinear)):
            memo[id(module)] = _dense_linear(module)
        elif isinstance(module, (SparseConv2d, CsrConv2d)):
            memo[id(module)] = _dense_conv(module)
    for module in modules:
        if isinstance(module, SparseMultiheadAttention):
            memo[id(module)] = _dense_attention(module, copy.deepcopy(module.out_proj, memo))
    replaced = {id(p) for m in modules if id(m) in memo for p in m.parameters(recurse=False)}
    for p in model.parameters():
        mask = mask_of(p)
        if mask is not None and id(p) not in replaced:
            memo[id(p)] = _parameter(p.detach().masked_fill(~mask, 0), p.requires_grad)
    dense = copy.deepcopy(model, memo)
    for module in dense.modules():
        for name, value in module.__dict__.pop(FAST_PATH_ATTR, {}).items():
            setattr(module, name, value)
        for p in module.parameters(recurse=False):
            detach_mask(p)  # Parameter.__deepcopy__ drops it today; a later torch may not
    return dense


def sparse_csr_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a sparse layer as a new ``torch.sparse_csr_tensor`` (int32 indices,
    detached), its nonzeros being the layer's active weights.

    ``layer``: a CsrLinear or SparseLinear (shape ``(out_features, in_features)``), or a
    SparseConv2d or CsrConv2d (its weight flattened to ``(out_channels, in_channels // groups
    * kh * kw)``, the matrix of an unfolded convolution). For inference with torch's sparse kernels:
    ``y = (sparse_csr_weight(layer) @ x.T).T + layer.bias`` is ``layer(x)`` for ``x`` of
    shape ``(batch, in_features)``.
    """
    if isinstance(layer, CsrLayer):
        row_ptr, col_idx = layer.structure()
        values, shape = layer.active_values(), (layer.n_rows, layer.n_cols)
    elif isinstance(layer, (SparseLinear, SparseConv2d)):
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        row_ptr, col_idx = csr_from_mask(layer.mask.reshape(weight.shape))
        values, shape = csr_values_from_dense(weight, row_ptr, col_idx), weight.shape
    else:
        raise TypeError(f"layer must be a CsrLinear, CsrConv2d, SparseLinear or SparseConv2d, got {type(layer).__name__}")
    # The layers keep their structure canonical, so torch's invariant check would only repeat ours.
    return torch.sparse_csr_tensor(row_ptr.clone(), col_idx.clone(), values.clone(), size=tuple(shape),
                                   check_invariants=False)
