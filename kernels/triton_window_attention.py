"""Fused Swin V2 window attention in Triton: the forward pass of `window_attention_reference` in one kernel.

Memory traffic. The eager chain reads and writes the whole activation at every step (pad, roll, partition,
normalise, scores, bias, mask, softmax, product, reverse, roll back, crop). This kernel reads each q/k/v
element of the projection once per query block that needs it, reads the (heads, N, N) bias table, and
writes the output and one fp32 log-sum-exp per query row; nothing of size N x N reaches memory.

One program handles BLOCK_M query rows of one window of one image, for one head:
  1. Each row's source token comes from index arithmetic on the load: window -> shifted padded grid ->
     reverse shift -> un-padded token, in either padding order (transformers pads then rolls; timm rolls
     then pads). Rows that land on padding read the projection of a zero token: the q/k/v bias.
  2. q and k rows are L2-normalised in fp32 (x / max(||x||, 1e-12)); q is multiplied by the clamped
     logit scale (computed on the host: exp(min(logit_scale, log 100))).
  3. Key blocks of the same window stream through an online softmax: scores + bias tile + shift mask (the
     reference's finite value, from each token's shift region, computed here; no mask tensor is read).
  4. Output rows are stored at the token they came from (window reverse, reverse shift and crop are the
     store's addressing); padded rows are not stored.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import LOGIT_SCALE_MAX, PAD_THEN_ROLL, ROLL_THEN_PAD, _pair, window_attention_reference

__all__ = ["window_attention_triton_forward", "WindowAttentionFunction", "block_config", "KERNEL_HEAD_DIMS",
           "INTERPRETED"]

KERNEL_HEAD_DIMS = (16, 32, 64, 128)
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _window_rows(o_pos, i_wy, i_wx, H, W, HP, WP, WH, WW, SH, SW, ROLL_THEN_PAD: tl.constexpr):
    """Token index, padding flag and shift region of window positions `o_pos` of window (i_wy, i_wx)."""
    # position in the shifted, padded grid
    o_py = i_wy * WH + o_pos // WW
    o_px = i_wx * WW + o_pos % WW
    if ROLL_THEN_PAD:
        # the grid was rolled first: padding sits at the bottom/right of the shifted grid
        m_pad = (o_py >= H) | (o_px >= W)
        o_y = (o_py + SH) % H
        o_x = (o_px + SW) % W
    else:
        # the padded grid was rolled: undo the roll on the padded grid, then see if it is padding
        o_y = (o_py + SH) % HP
        o_x = (o_px + SW) % WP
        m_pad = (o_y >= H) | (o_x >= W)
    # shift-mask regions on the padded grid: [0, P - window), [P - window, P - shift), [P - shift, P)
    o_ry = tl.where(SH > 0, (o_py >= HP - WH).to(tl.int32) + (o_py >= HP - SH).to(tl.int32), 0)
    o_rx = tl.where(SW > 0, (o_px >= WP - WW).to(tl.int32) + (o_px >= WP - SW).to(tl.int32), 0)
    return o_y * W + o_x, m_pad, o_ry * 3 + o_rx


@triton.jit
def _load_rows(P_QKV, P_BIAS, o_tok, m_rows, m_pad, o_d, stride_t, HAS_BIAS: tl.constexpr):
    """(rows, HEAD_DIM) slice of the projection at tokens `o_tok`, in its own dtype; padded rows read the bias."""
    # [ROWS, HEAD_DIM]
    b_x = tl.load(P_QKV + o_tok[:, None] * stride_t + o_d[None, :], mask=(m_rows & ~m_pad)[:, None], other=0.0)
    if HAS_BIAS:
        b_bias = tl.load(P_BIAS + o_d).to(b_x.dtype)
        b_x = tl.where(m_pad[:, None], b_bias[None, :], b_x)
    return b_x


@triton.jit
def _l2_normalize(b_x):
    """x / max(||x||, 1e-12) per row, in fp32."""
    b_x = b_x.to(tl.float32)
    b_norm = tl.sqrt(tl.sum(b_x * b_x, axis=1))
    return b_x / tl.maximum(b_norm, 1e-12)[:, None]


@triton.jit
def _window_attention_fwd_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, OUT, LSE,
    stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH, SW, N, C, NUM_HEADS,
    mask_value,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
):
    i_bwm = tl.program_id(0)
    i_h = tl.program_id(1)
    num_m = tl.cdiv(N, BLOCK_M)
    i_bw, i_m = i_bwm // num_m, i_bwm % num_m
    i_b, i_w = i_bw // NUM_WINDOWS, i_bw % NUM_WINDOWS
    i_wy, i_wx = i_w // NUM_WX, i_w % NUM_WX

    o_d = tl.arange(0, HEAD_DIM)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_tok_m, m_pad_m, o_reg_m = _window_rows(o_m, i_wy, i_wx, H, W, HP, WP, WH, WW, SH, SW, ROLL_THEN_PAD)

    p_qkv = QKV + i_b * stride_qkv_b
    # q: normalised and scaled in fp32. [BLOCK_M, HEAD_DIM]
    b_q = _load_rows(p_qkv + i_h * HEAD_DIM, QKV_BIAS + i_h * HEAD_DIM, o_tok_m, m_m, m_pad_m, o_d,
                     stride_qkv_t, HAS_BIAS)
    b_q = _l2_normalize(b_q) * tl.load(SCALE + i_h)
    if not FP32_DOT:
        b_q = b_q.to(QKV.dtype.element_ty)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        o_tok_n, m_pad_n, o_reg_n = _window_rows(o_n, i_wy, i_wx, H, W, HP, WP, WH, WW, SH, SW, ROLL_THEN_PAD)
        # [BLOCK_N, HEAD_DIM]
        b_k = _load_rows(p_qkv + C + i_h * HEAD_DIM, QKV_BIAS + C + i_h * HEAD_DIM, o_tok_n, m_n, m_pad_n,
                         o_d, stride_qkv_t, HAS_BIAS)
        b_v = _load_rows(p_qkv + 2 * C + i_h * HEAD_DIM, QKV_BIAS + 2 * C + i_h * HEAD_DIM, o_tok_n, m_n,
                         m_pad_n, o_d, stride_qkv_t, HAS_BIAS)
        b_k = _l2_normalize(b_k)
        # [BLOCK_M, BLOCK_N]
        if FP32_DOT:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k.to(QKV.dtype.element_ty)))
        b_s += tl.load(p_bias_h + o_m[:, None] * N + o_n[None, :], mask=m_m[:, None] & m_n[None, :],
                       other=0.0).to(tl.float32)
        b_s += tl.where(o_reg_m[:, None] != o_reg_n[None, :], mask_value, 0.0)
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        # online softmax
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp(b_m - b_m_new)
        b_p = tl.exp(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        if FP32_DOT:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v, input_precision="ieee")
        else:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_m_new

    b_out = b_acc / b_l[:, None]
    p_out = OUT + i_b * stride_out_b + o_tok_m[:, None] * stride_out_t + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=(m_m & ~m_pad_m)[:, None])
    p_lse = LSE + ((i_b * NUM_HEADS + i_h) * NUM_WINDOWS + i_w) * N + o_m
    tl.store(p_lse, b_m + tl.log(b_l), mask=m_m)


# (BLOCK_M, BLOCK_N, num_warps) per head dimension, chosen with `compile_check --sweep` as the largest
# tiles that compile without register spills for sm_80 and sm_90 (registers in the compile-check table).
# The same tiles serve every window size: a window of N tokens takes ceil(N / BLOCK_M) query blocks and
# streams ceil(N / BLOCK_N) key blocks; non-power-of-two N (49, 144, 576) is masked.
_TILES_16BIT = {16: (64, 32, 4), 32: (64, 32, 4), 64: (32, 32, 8), 128: (16, 32, 8)}
_TILES_FP32 = {16: (32, 32, 8), 32: (32, 32, 8), 64: (16, 16, 8), 128: (16, 16, 8)}


def block_config(n: int, head_dim: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for windows of n tokens, head_dim and the projection dtype."""
    del n  # one configuration per head dimension covers every window size
    return (_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)[head_dim]


def window_attention_triton_forward(
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward. Returns the output (B, H*W, C) and the log-sum-exp (B, heads, nW * N), fp32.

    Inputs as in `window_attention_reference` (validated by the caller). qkv's channel dimension must be
    contiguous; batch and token strides are free.
    """
    B, L, C3 = qkv.shape
    H, W = _pair(grid_size, "grid_size")
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(shift_size, "shift_size")
    C = C3 // 3
    head_dim = C // num_heads
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the Triton kernel supports head_dim in {KERNEL_HEAD_DIMS}, got {head_dim}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv's last dimension must be contiguous (stride 1), got strides {qkv.stride()}")
    n = wh * ww
    hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
    num_windows = (hp // wh) * (wp // ww)

    # The small operands go to the kernel in fp32 whatever their dtype (under autocast they are fp32 while
    # the projection is fp16/bf16): one kernel specialization per projection dtype.
    scale = torch.clamp(logit_scale.detach().reshape(num_heads).float(), max=LOGIT_SCALE_MAX).exp().contiguous()
    table = position_bias.detach().float().contiguous()
    bias = qkv_bias.detach().float().contiguous() if qkv_bias is not None else scale  # dummy pointer when absent
    out = torch.empty((B, L, C), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, num_heads, num_windows * n), device=qkv.device, dtype=torch.float32)
    if B == 0:
        return out, lse
    block_m, block_n, num_warps = block_config(n, head_dim, qkv.dtype)
    grid = (B * num_windows * triton.cdiv(n, block_m), num_heads)
    _window_attention_fwd_kernel[grid](
        qkv, bias, scale, table, out, lse,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        H, W, hp, wp, wp // ww, num_windows, wh, ww, sh, sw, n, C, num_heads,
        float(mask_value),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        ROLL_THEN_PAD=pad_order == ROLL_THEN_PAD, HAS_BIAS=qkv_bias is not None,
        FP32_DOT=qkv.dtype == torch.float32,
        num_warps=num_warps,
    )
    return out, lse


class WindowAttentionFunction(torch.autograd.Function):
    """Fused forward; the backward differentiates the eager reference at the saved inputs (recomputation,
    exact to the reference's own gradients) until the fused backward kernels land."""

    @staticmethod
    def forward(ctx, qkv, qkv_bias, logit_scale, position_bias, grid_size, num_heads, window_size, shift_size,
                pad_order, mask_value):
        out, _lse = window_attention_triton_forward(
            qkv, qkv_bias, logit_scale, position_bias, grid_size=grid_size, num_heads=num_heads,
            window_size=window_size, shift_size=shift_size, pad_order=pad_order, mask_value=mask_value,
        )
        ctx.save_for_backward(qkv, qkv_bias, logit_scale, position_bias)
        ctx.options = dict(grid_size=grid_size, num_heads=num_heads, window_size=window_size,
                           shift_size=shift_size, pad_order=pad_order, mask_value=mask_value)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(saved, ctx.needs_input_grad)]
        with torch.enable_grad():
            out = window_attention_reference(*inputs, **ctx.options)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None, None, None, None, None, None)
