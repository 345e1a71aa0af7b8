"""The public window-attention op and its dispatch between implementations.

`window_attention` has the signature of `swinv2_fast.kernels.window_attention_reference` (see there for the
shapes and the math) plus `implementation`. Only "eager" exists at this stage; it is the reference itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels.reference import PAD_ORDERS, PAD_THEN_ROLL, _pair, window_attention_reference

__all__ = ["window_attention", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("eager",)


def _check_inputs(qkv, qkv_bias, logit_scale, position_bias, grid_size, num_heads, window_size, shift_size,
                  pad_order, dropout_p):
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a 3-D tensor (batch, H*W, 3*C), got {shape}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got dtype {qkv.dtype}")
    height, width = _pair(grid_size, "grid_size")
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(shift_size, "shift_size")
    if height < 1 or width < 1:
        raise ValueError(f"grid_size must be positive, got {(height, width)}")
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size must be at least 1, got {(wh, ww)}")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size must lie in [0, window_size) = [0, {(wh, ww)}), got {(sh, sw)}")
    if pad_order not in PAD_ORDERS:
        raise ValueError(f"pad_order must be one of {PAD_ORDERS}, got {pad_order!r}")
    batch, tokens, channels3 = qkv.shape
    if tokens != height * width:
        raise ValueError(f"qkv must have H*W = {height * width} tokens for grid_size {(height, width)}, got {tokens}")
    if not isinstance(num_heads, int) or num_heads < 1 or channels3 % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv's last dimension must be 3 * num_heads * head_dim; got {channels3} with num_heads={num_heads!r}"
        )
    channels = channels3 // 3
    n = wh * ww
    if qkv_bias is not None and tuple(qkv_bias.shape) != (channels3,):
        raise ValueError(f"qkv_bias must have shape ({channels3},), got {tuple(qkv_bias.shape)}")
    if logit_scale.numel() != num_heads:
        raise ValueError(
            f"logit_scale must have num_heads = {num_heads} elements, got shape {tuple(logit_scale.shape)}"
        )
    if tuple(position_bias.shape) != (num_heads, n, n):
        raise ValueError(
            f"position_bias must have shape (num_heads, N, N) = {(num_heads, n, n)}, got {tuple(position_bias.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    del batch, channels


def window_attention(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    grid_size,
    num_heads: int,
    window_size,
    shift_size=0,
    pad_order: str = PAD_THEN_ROLL,
    mask_value: float = -100.0,
    dropout_p: float = 0.0,
    return_attention_probs: bool = False,
    implementation: str = "eager",
):
    """Swin V2 window attention, token layout in and out; see `window_attention_reference` for the contract."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check_inputs(qkv, qkv_bias, logit_scale, position_bias, grid_size, num_heads, window_size, shift_size,
                  pad_order, dropout_p)
    return window_attention_reference(
        qkv,
        qkv_bias,
        logit_scale,
        position_bias,
        grid_size=grid_size,
        num_heads=num_heads,
        window_size=window_size,
        shift_size=shift_size,
        pad_order=pad_order,
        mask_value=mask_value,
        dropout_p=dropout_p,
        return_attention_probs=return_attention_probs,
    )
