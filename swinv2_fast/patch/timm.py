"""`swinv2_fast.patch` for timm's `SwinTransformerV2Block` (`swinv2_*`): the block's `_attn` as one
`window_attention` call.

timm's window rules are `swinv2_fast.windows.SEMANTICS["timm"]`. timm computes its q/k/v from `qkv.weight`
and the separate `q_bias`, `k_bias`, `v_bias` itself (never calling `qkv`), and so does the patched step.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from ..attention import continuous_position_bias
from ..windows import SEMANTICS
from .step import MARK, pair_list, patched_window_step

torch.fx.wrap("patched_window_step")  # a leaf of fx traces here too (torch.fx.wrap acts per calling module)

__all__ = ["ATTN_ATTRS", "BLOCK_ATTRS", "timm_attn"]

# What the patched step reads; a block without them is a structure the patch does not know.
BLOCK_ATTRS = ("_attn", "attn", "window_size", "shift_size")
ATTN_ATTRS = (
    "qkv",
    "q_bias",
    "k_bias",
    "v_bias",
    "logit_scale",
    "cpb_mlp",
    "relative_coords_table",
    "relative_position_index",
    "num_heads",
    "proj",
    "proj_drop",
    "attn_drop",
)

_RULES = SEMANTICS["timm"]


def timm_attn(self, x):
    """timm's SwinTransformerV2Block._attn fused: (B, H, W, C) in and out.

    While torch.jit.trace records (legacy ONNX export), "auto" and "eager" run timm's own step: the patched
    step's window layout enters a trace as constants (kernels/reference.py), so its trace would hold only at
    the traced size, where timm's step traces its sizes and its mask. "triton" keeps the fused step, at the
    traced size."""
    _, implementation = getattr(self, MARK)
    if torch.jit.is_tracing() and implementation != "triton":
        return type(self)._attn(self, x)
    attn = self.attn
    batch, height, width, channels = x.shape
    bias = None
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x.reshape(batch, height * width, channels), attn.qkv.weight, bias)
    position_bias = continuous_position_bias(
        attn.cpb_mlp,
        attn.relative_coords_table,
        attn.num_heads,
        attn.relative_position_index.shape[0],
        index=attn.relative_position_index,
    )
    context = patched_window_step(
        qkv,
        bias,
        attn.logit_scale,
        position_bias,
        height,
        width,
        attn.num_heads,
        pair_list(self.window_size),
        pair_list(self.shift_size),
        _RULES.pad_order,
        _RULES.mask_value,
        attn.attn_drop.p if self.training else 0.0,
        implementation,
    )
    return attn.proj_drop(attn.proj(context)).reshape(x.shape)
