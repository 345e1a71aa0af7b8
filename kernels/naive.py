"""Swin V2 window attention written out literally: the specification every other implementation is tested against.

This is the chain as the public codebases write it (transformers' `Swinv2Layer`, timm's
`SwinTransformerV2Block._attn` and `WindowAttention`), one step per line, plain PyTorch, no caches, no
gather indices, no fused attention and no execution modes. It is slow and it is meant to be read:

    qkv (B, H*W, 3C)  ->  grid (B, H, W, 3C)
      -> pad to window multiples (Hp, Wp) and roll by (-sh, -sw), in `pad_order`:
             PAD_THEN_ROLL (transformers): pad the grid, then roll the padded grid
             ROLL_THEN_PAD (timm):         roll the un-padded grid, then pad at the bottom/right
         padded positions hold the projection of a zero token: the bias [q_bias | k_bias | v_bias]
      -> partition into windows (B * nW, N, 3C), N = wh * ww, windows row-major, tokens row-major in a window
      -> q, k, v (B * nW, heads, N, head_dim)
      -> S = normalize(q) @ normalize(k)^T * exp(min(logit_scale, log 100))   (B * nW, heads, N, N)
             + position_bias[h]                                         16 * sigmoid(CPB table), (heads, N, N)
             + shift_mask[w]                  0 or mask_value between shift regions, (nW, N, N); shifted only
      -> P = dropout(softmax(S)),  O = P @ v                             (B * nW, heads, N, head_dim)
      -> reverse the partition (B, Hp, Wp, C), undo roll and padding in the opposite order, (B, H*W, C)

The mask value: timm and the official code add -100; transformers' `Swinv2SelfAttention` adds its -100
mask twice (two consecutive additions of `attention_mask`), so a transformers-semantics call passes -200.
Padded positions are never masked (neither codebase masks them), so they take part in the softmax of real
tokens in windows that overhang the grid.

Numerics: q and k are normalised in float32 at least (float64 stays float64) and cast back, since in
float16 F.normalize's epsilon 1e-12 underflows to 0 and the all-zero k of a padded token (no k bias) would
give 0/0; everything else runs in the inputs' dtype, as in transformers and timm.

The functions take the geometry as `geometry=WindowGeometry(...)`; the public ones also accept the keyword
block `grid_size, num_heads, window_size, shift_size, pad_order, mask_value` instead (`takes_geometry`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .geometry import LOGIT_SCALE_MAX, PAD_THEN_ROLL, WindowGeometry, takes_geometry

__all__ = [
    "shift_mask_naive",
    "shift_region_ids",
    "window_attention_naive",
    "window_log_sum_exp",
    "window_partition",
    "window_reverse",
]


def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B * nW, wh * ww, C): windows row-major over the grid, tokens row-major inside."""
    B, hp, wp, C = x.shape
    wh, ww = window
    x = x.view(B, hp // wh, wh, wp // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: Tuple[int, int], padded_size: Tuple[int, int]) -> torch.Tensor:
    """(B * nW, wh * ww, C) -> (B, Hp, Wp, C): the inverse of `window_partition`."""
    wh, ww = window
    hp, wp = padded_size
    C = windows.shape[-1]
    x = windows.view(-1, hp // wh, wp // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, C)


def shift_region_ids(geometry: WindowGeometry) -> torch.Tensor:
    """(Hp, Wp) int64 region of every position of the padded, rolled grid, exactly as transformers and timm
    build their `img_mask`: three slices per axis, [0, Hp - wh), [Hp - wh, Hp - sh), [Hp - sh, Hp), written
    with Python's negative indices as they write them. With sh = 0 the slice `-0:` is the whole axis, so
    the last assignment wins and the axis has one region, as it should."""
    (hp, wp), (wh, ww), (sh, sw) = geometry.padded_size, geometry.window, geometry.shift
    img = torch.zeros(hp, wp, dtype=torch.long)
    count = 0
    for rows in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for cols in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            img[rows, cols] = count
            count += 1
    return img


def shift_mask_naive(
    geometry: WindowGeometry, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None
) -> Optional[torch.Tensor]:
    """(nW, N, N): 0 where query and key lie in the same shift region, `geometry.mask_value` elsewhere; None
    without a shift (no mask at all, as in transformers and timm)."""
    if not geometry.shifted:
        return None
    regions = window_partition(shift_region_ids(geometry)[None, :, :, None], geometry.window)[..., 0]  # (nW, N)
    different = regions[:, None, :] != regions[:, :, None]
    return (different.to(dtype) * geometry.mask_value).to(device)


def _windows(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], g: WindowGeometry) -> torch.Tensor:
    """(B, H*W, 3C) tokens -> (B * nW, N, 3C) windows: pad and roll in `g.pad_order`, then partition."""
    B, _, C3 = qkv.shape
    H, W = g.grid
    hp, wp = g.padded_size
    sh, sw = g.shift
    x = qkv.view(B, H, W, C3)
    bias = qkv.new_zeros(C3) if qkv_bias is None else qkv_bias.to(qkv.dtype)

    def pad(t):  # (B, H, W, 3C) -> (B, Hp, Wp, 3C); the padding is the projection of a zero token: the bias
        out = bias.view(1, 1, 1, C3).expand(B, hp, wp, C3).clone()
        out[:, :H, :W] = t
        return out

    if g.pad_order == PAD_THEN_ROLL:
        x = torch.roll(pad(x), shifts=(-sh, -sw), dims=(1, 2))
    else:
        x = pad(torch.roll(x, shifts=(-sh, -sw), dims=(1, 2)))
    return window_partition(x, g.window)


def _scores(qkv, qkv_bias, logit_scale, position_bias, g: WindowGeometry):
    """S (B * nW, heads, N, N) and v (B * nW, heads, N, head_dim) of every window."""
    windows = _windows(qkv, qkv_bias, g)  # (B * nW, N, 3C)
    heads, head_dim = g.num_heads, g.head_dim(qkv.shape[-1])
    q, k, v = windows.view(-1, g.N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    norm_dtype = torch.promote_types(q.dtype, torch.float32)
    q = F.normalize(q.to(norm_dtype), dim=-1).to(q.dtype)
    k = F.normalize(k.to(norm_dtype), dim=-1).to(k.dtype)
    scale = torch.clamp(logit_scale.reshape(heads, 1, 1), max=LOGIT_SCALE_MAX).exp()
    scores = (q @ k.transpose(-2, -1)) * scale + position_bias  # (B * nW, heads, N, N)
    mask = shift_mask_naive(g, scores.dtype, scores.device)  # (nW, N, N) or None
    if mask is not None:
        B, nW = qkv.shape[0], g.num_windows
        scores = (scores.view(B, nW, heads, g.N, g.N) + mask[None, :, None]).view(B * nW, heads, g.N, g.N)
    return scores, v


@takes_geometry
def window_attention_naive(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    geometry: WindowGeometry,
    dropout_p: float = 0.0,
    return_attention_probs: bool = False,
):
    """Swin V2 window attention from the q/k/v projection to the attention output, both in token layout.

    Args (as `window_attention_reference`):
        qkv: (B, H*W, 3C) projection of the un-padded, un-shifted grid, channels [q | k | v], heads outermost
            inside each.
        qkv_bias: (3C,) [q_bias | k_bias | v_bias], the projection of a zero token (padded positions); None: 0.
        logit_scale: (heads,) or (heads, 1, 1).
        position_bias: (heads, N, N), after 16 * sigmoid.
        geometry: the `WindowGeometry` (or, instead, its keyword block: see `takes_geometry`).
        dropout_p: attention dropout on P.
        return_attention_probs: also return P, (B * nW, heads, N, N).

    Returns:
        (B, H*W, C), and P if asked for.
    """
    g = geometry
    B, L, C3 = qkv.shape
    C = C3 // 3
    H, W = g.grid
    sh, sw = g.shift
    scores, v = _scores(qkv, qkv_bias, logit_scale, position_bias, g)
    probs = scores.softmax(-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = probs.to(v.dtype) @ v  # (B * nW, heads, N, head_dim)
    out = window_reverse(out.transpose(1, 2).reshape(-1, g.N, C), g.window, g.padded_size)  # (B, Hp, Wp, C)
    if g.pad_order == PAD_THEN_ROLL:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))[:, :H, :W]
    else:
        out = torch.roll(out[:, :H, :W], shifts=(sh, sw), dims=(1, 2))
    out = out.reshape(B, L, C)
    return (out, probs) if return_attention_probs else out


@takes_geometry
def window_log_sum_exp(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    geometry: WindowGeometry,
) -> torch.Tensor:
    """log(sum_j exp(S_ij)) of every window row, (B, heads, nW * N), rows in window order (window-major, then
    the row inside the window), computed in float32 (float64 for float64 inputs) from all N x N scores.

    The softmax statistic a fused kernel computes on its way (the backward kernels recompute it from q and
    k); tests compare the kernels' statistics with it. Nothing stores it in the forward."""
    g = geometry
    cdt = torch.promote_types(qkv.dtype, torch.float32)
    scores, _ = _scores(
        qkv.to(cdt), None if qkv_bias is None else qkv_bias.to(cdt), logit_scale.to(cdt), position_bias.to(cdt), g
    )
    B = qkv.shape[0]
    lse = scores.logsumexp(-1)  # (B * nW, heads, N)
    return lse.view(B, g.num_windows, g.num_heads, g.N).permute(0, 2, 1, 3).reshape(B, g.num_heads, -1)
