"""SparseMultiheadAttention: nn.MultiheadAttention whose input projection is sparse (mask layout).

``nn.MultiheadAttention`` holds its input projection as bare Parameters
(``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when
the key and value widths differ) and reads them, and ``out_proj.weight``, directly in
``F.multi_head_attention_forward`` and in torch's fused fast paths. Those weights can
only be sparse in the mask layout: a dense tensor with exact zeros that every torch code
path reads as it is. This class adds a persistent bool buffer ``<name>_mask`` per
projection weight and attaches it (:func:`sparsemom_ext.attach_mask`), so the engine and
the fused optimizers treat it like a SparseLinear's weight; its forward is torch's own.
``out_proj`` is a separate layer (a :class:`~sparsemom_ext.nn.SparseLinear` after
:func:`sparsemom_ext.sparsify`).
"""

import copy
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..sparsity.init import random_mask
from ..sparsity.masks import attach_mask, non_bool_masks
from .mask_layout import _zero_inactive

__all__ = ["SparseMultiheadAttention", "projection_weight_names"]


def projection_weight_names(module: nn.MultiheadAttention) -> Tuple[str, ...]:
    """The names of the input projection weights ``module`` holds (not None)."""
    names = ("in_proj_weight",) if module._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight",
                                                                     "v_proj_weight")
    return tuple(n for n in names if getattr(module, n) is not None)


class SparseMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input projection weights have fixed sets of active entries.

    Built by :func:`sparsemom_ext.sparsify` (or :meth:`from_dense`) from an
    ``nn.MultiheadAttention``: the same parameters, each projection weight zero off its
    mask ``<name>_mask`` (a persistent buffer, so the state_dict is torch's plus the
    masks). Forward, fast paths and ``out_proj`` are torch's.
    :func:`sparsemom_ext.densify` turns it back into an ``nn.MultiheadAttention``.
    """

    layout = "mask"

    @classmethod
    def from_dense(cls, module: nn.MultiheadAttention, counts: Dict[str, int],
                   generator: Optional[torch.Generator] = None) -> "SparseMultiheadAttention":
        """A copy of ``module`` (parameters, submodules, mode; ``module`` is not modified)
        whose projection weight ``name`` keeps ``counts[name]`` active entries, drawn from
        ``generator`` in :func:`projection_weight_names` order."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        names = projection_weight_names(module)
        if set(counts) != set(names):
            raise ValueError(f"counts must give one count for each projection weight {list(names)}, got "
                             f"{sorted(counts)}")
        # Built on the meta device: nothing allocated or drawn for an initialisation that
        # the copies below overwrite.
        new = cls(module.embed_dim, module.num_heads, module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn,
                  kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first, device="meta",
                  dtype=getattr(module, names[0]).dtype)
        for pname, p in module._parameters.items():
            if p is not None:
                setattr(new, pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        new.out_proj = copy.deepcopy(module.out_proj)
        new.train(module.training)
        for pname in names:
            weight = getattr(new, pname)
            new.register_buffer(pname + "_mask", random_mask(weight.shape, counts[pname], generator,
                                                             device=weight.device), persistent=True)
        new._reattach_masks()
        for pname in names:
            _zero_inactive(getattr(new, pname), getattr(new, pname + "_mask"))
        return new

    def masked_weights(self) -> Tuple[Tuple[str, nn.Parameter, torch.Tensor], ...]:
        """``(name, weight, mask)`` of each sparse projection weight."""
        return tuple((n, getattr(self, n), getattr(self, n + "_mask")) for n in projection_weight_names(self))

    def _reattach_masks(self) -> None:
        for pname in projection_weight_names(self):
            mask_name = pname + "_mask"
            # Module.type() casts buffers too; the masks must stay bool for the kernels.
            if getattr(self, mask_name).dtype != torch.bool:
                setattr(self, mask_name, getattr(self, mask_name).bool())
            attach_mask(getattr(self, pname), getattr(self, mask_name))

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() replace the mask buffers (and maybe the Parameters): re-attach.
        result = super()._apply(fn, recurse)
        self._reattach_masks()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        bad = non_bool_masks(state_dict, [prefix + n + "_mask" for n in projection_weight_names(self)])
        if bad:
            error_msgs.extend(bad)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # assign=True replaces the tensors, and a checkpoint may be nonzero off its masks.
        self._reattach_masks()
        for _, weight, mask in self.masked_weights():
            _zero_inactive(weight, mask)

    def __setstate__(self, state):
        # Parameter.__deepcopy__ and pickling drop the attribute the masks hang on.
        super().__setstate__(state)
        self._reattach_masks()

    def extra_repr(self) -> str:
        parts = [f"{n}_density={int(m.count_nonzero()) / m.numel():.4g}" for n, _, m in self.masked_weights()
                 if not m.is_meta and m.numel()]
        return ", ".join(parts)
