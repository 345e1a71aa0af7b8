"""`swinv2_fast.patch` for timm's `SwinTransformerV2Cr` (`swinv2_cr_*`): the block's `_shifted_window_attn`
as one `window_attention` call.

timm's step, per block (timm.models.swin_transformer_v2_cr): roll the (B, H, W, C) map by the block's shift,
pad it with zeros at the bottom and right to window multiples, partition, then `WindowMultiHeadAttention`:
q/k/v from `qkv` (a Linear with a bias on q, k and v, so a padded position holds `qkv.bias`), cosine
scores times the clamped `logit_scale`, plus the position bias `meta_mlp(relative_coordinates_log)` (a
log-spaced coordinate table through a ReLU MLP whose hidden layer has dropout 0.125 in training; no sigmoid,
no factor 16), plus the shift mask (-100 between regions of the padded grid, added once), softmax, attention
dropout, `proj` and `proj_drop` on each window, then reverse, crop and roll back. These are timm's window
rules (`swinv2_fast.windows.SEMANTICS["timm"]`: ROLL_THEN_PAD, mask -100), so the patched step is:

    qkv = qkv(tokens)                              one GEMM while `qkv` is a plain nn.Linear
    position_bias = meta_mlp(coords)               a module call: its dropout runs exactly as in timm
    geometry = WindowGeometry(grid, window, shift, timm's pad order and mask value, num_heads=heads)
    context = window_attention(qkv, qkv.bias, logit_scale, position_bias, geometry=geometry)
    out = proj_drop(proj(context))

The window and shift are the block's own (`block.window_size`, `block.shift_size`: timm chooses them from the
block's feature size, `window_size` or `window_ratio` and `always_partition`), read at every call, so
`set_input_size` needs nothing special.

By design, two cases run timm's own `_shifted_window_attn` (the original chain, timm's exact numbers):
- training with attention or projection dropout (`drop_attn` / `proj_drop_rate` > 0): timm draws those
  masks on its window layout (padded positions included), which a token-layout op cannot reproduce draw
  for draw; the op would send dropout to its eager path anyway.
- a shifted block with a precomputed (static) mask for another grid than the input's (a model built with
  `strict_img_size=True` called on a block directly with another size, or a mask that is missing): timm
  adds whatever mask it holds; the op derives the mask from the grid.
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.fx
import torch.nn.functional as F

from ..attention import continuous_position_bias, project_qkv_modules, qkv_weight_and_bias
from ..kernels.geometry import is_symbolic
from ..linear import is_plain_linear
from ..windows import SEMANTICS
from .step import MARK, patched_window_step

torch.fx.wrap("patched_window_step")  # a leaf of fx traces here too (torch.fx.wrap acts per calling module)

__all__ = ["CR_ATTN_ATTRS", "CR_BLOCK_ATTRS", "cr_geometry_problems", "timm_cr_shifted_window_attn"]

_RULES = SEMANTICS["timm"]

# What the patched step reads; a block without them is a structure the patch does not know.
CR_BLOCK_ATTRS = ("_shifted_window_attn", "attn", "window_size", "shift_size", "feat_size", "attn_mask")
CR_ATTN_ATTRS = (
    "qkv",
    "proj",
    "proj_drop",
    "attn_drop",
    "logit_scale",
    "meta_mlp",
    "relative_coordinates_log",
    "num_heads",
)


def _is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)


# block: Any, a timm SwinTransformerV2CrBlock read by attribute (nn.Module.__getattr__ is typed Tensor | Module)
def cr_geometry_problems(block: Any) -> List[str]:
    """What is not as the patch expects in a SwinTransformerV2CrBlock's geometry (empty when all is)."""
    problems = [
        f"{name} (a pair of ints)"
        for name in ("window_size", "shift_size", "feat_size")
        if not _is_pair(getattr(block, name))
    ]
    if not problems and tuple(block.attn.relative_coordinates_log.shape) != (
        (block.window_size[0] * block.window_size[1]) ** 2,
        2,
    ):
        problems.append("attn.relative_coordinates_log of shape (N * N, 2) for the block's window")
    return problems


# block: Any, as in cr_geometry_problems (timm's block, read by attribute)
def _static_mask_fits(block: Any, height: int, width: int) -> bool:
    """Whether a shifted block's precomputed mask is the mask of this grid: it covers the block's feature size
    padded to window multiples (timm 1.0.31; timm 1.0.29 builds it only where the feature size divides), so
    it is this grid's mask exactly when the padded sizes agree."""
    mask = block.attn_mask
    if mask is None:
        return False
    (wh, ww), (fh, fw) = block.window_size, block.feat_size
    padded = (-(-height // wh) * wh, -(-width // ww) * ww)
    windows = (padded[0] // wh) * (padded[1] // ww)
    return padded == (-(-fh // wh) * wh, -(-fw // ww) * ww) and tuple(mask.shape) == (windows, wh * ww, wh * ww)


def _concrete(*sizes) -> bool:
    """Sizes that are Python ints: not symbolic (torch.export, dynamic shapes) and not fx proxies."""
    return all(isinstance(s, int) and not is_symbolic(s) for s in sizes)


def timm_cr_shifted_window_attn(self, x: torch.Tensor) -> torch.Tensor:
    """timm's SwinTransformerV2CrBlock._shifted_window_attn fused: (B, H, W, C) in and out.

    The static-mask check (module docstring) needs the call's sizes: while torch.fx traces (sizes are
    proxies) or torch.export traces a static-mask block with symbolic sizes, it is not made and the fused
    step is recorded; that step derives the mask from the grid of each call, which is timm's static mask at
    the size the block was built for (timm's own traced graph keeps the static mask of that size)."""
    _, implementation = getattr(self, MARK)
    attn = self.attn
    batch, height, width, channels = x.shape
    (wh, ww), (sh, sw) = self.window_size, self.shift_size
    shifted = sh > 0 or sw > 0
    dropout_active = self.training and (attn.attn_drop.p > 0.0 or attn.proj_drop.p > 0.0)
    static_mismatch = (
        shifted
        and not getattr(self, "dynamic_mask", False)
        and _concrete(height, width)
        and not _static_mask_fits(self, height, width)
    )
    if dropout_active or static_mismatch:  # timm's own chain, by design (module docstring)
        return type(self)._shifted_window_attn(self, x)

    tokens = x.reshape(batch, height * width, channels)
    if is_plain_linear(attn.qkv):
        weight, pad = qkv_weight_and_bias((attn.qkv,), bias_when_absent=False)
        qkv = F.linear(tokens, weight, pad)
    else:  # swapped (LoRA, quantized, parametrized) or hooked: called as a module, on a zero token for padding
        qkv, pad = project_qkv_modules(tokens, (attn.qkv,), (height, width), (wh, ww))
    # timm's _relative_positional_encodings: the MLP called as a module (its dropout, its hooks) on one
    # coordinate row per query/key pair, no sigmoid
    position_bias = continuous_position_bias(
        attn.meta_mlp, attn.relative_coordinates_log, attn.num_heads, wh * ww, sigmoid=False
    )
    context = patched_window_step(
        qkv,
        pad,
        attn.logit_scale,
        position_bias,
        height,
        width,
        attn.num_heads,
        [wh, ww],
        [sh, sw],
        _RULES.pad_order,
        _RULES.mask_value,
        0.0,
        implementation,
    )
    return attn.proj_drop(attn.proj(context)).reshape(x.shape)
