"""Fused Swin V2 window attention in Triton: the forward pass of `window_attention_reference` in one kernel.

Memory traffic. The eager chain reads and writes the whole activation at every step (pad, roll, partition,
normalise, scores, bias, mask, softmax, product, reverse, roll back, crop). This kernel reads each q/k/v
element of the projection once per query block that needs it, reads the (heads, N, N) bias table, and
writes the output; nothing of size N x N reaches memory. The backward recomputes the softmax from q/k/v.

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

import functools
import os
import threading
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import LOGIT_SCALE_MAX, PAD_THEN_ROLL, ROLL_THEN_PAD, _pair, window_attention_reference

__all__ = ["fused_backward_supported", "window_attention_triton_forward", "window_attention_triton_backward",
           "window_attention_fused", "window_attention_fused_backward", "fused_window_attention",
           "block_config", "KERNEL_HEAD_DIMS", "INTERPRETED"]

KERNEL_HEAD_DIMS = (16, 32, 64, 128)
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _window_rows(o_pos, i_wy, i_wx, H, W, HP, WP, WH, WW, SH, SW, ROLL_THEN_PAD: tl.constexpr):
    """Token index, padding flag, shift region and padding index of window positions `o_pos` of window
    (i_wy, i_wx). The padding index numbers the Hp*Wp - H*W padded positions of an image 0, 1, ..."""
    # position in the shifted, padded grid
    o_py = i_wy * WH + o_pos // WW
    o_px = i_wx * WW + o_pos % WW
    if ROLL_THEN_PAD:
        # the grid was rolled first: padding sits at the bottom/right of the shifted grid
        o_y = (o_py + SH) % H
        o_x = (o_px + SW) % W
        o_ay, o_ax = o_py, o_px
    else:
        # the padded grid was rolled: undo the roll on the padded grid, then see if it is padding
        o_y = (o_py + SH) % HP
        o_x = (o_px + SW) % WP
        o_ay, o_ax = o_y, o_x
    m_pad = (o_ay >= H) | (o_ax >= W)
    o_pad = tl.where(o_ay < H, o_ay * (WP - W) + (o_ax - W), H * (WP - W) + (o_ay - H) * WP + o_ax)
    # shift-mask regions on the padded grid: [0, P - window), [P - window, P - shift), [P - shift, P)
    o_ry = tl.where(SH > 0, (o_py >= HP - WH).to(tl.int32) + (o_py >= HP - SH).to(tl.int32), 0)
    o_rx = tl.where(SW > 0, (o_px >= WP - WW).to(tl.int32) + (o_px >= WP - SW).to(tl.int32), 0)
    return o_y * W + o_x, m_pad, o_ry * 3 + o_rx, o_pad


@triton.jit
def _load_rows(P_QKV, P_BIAS, o_tok, m_rows, m_pad, o_d, stride_t, HAS_BIAS: tl.constexpr):
    """(rows, HEAD_DIM) slice of the projection at tokens `o_tok`, in its own dtype. Padded rows read the bias
    (the projection of a zero token, in the projection's dtype as in the reference), or zero without one;
    rows beyond the window (m_rows false) read zero. One load: padded rows point into the bias."""
    p_rows = P_QKV + o_tok[:, None] * stride_t + o_d[None, :]
    if HAS_BIAS:
        p_rows = tl.where(m_pad[:, None], P_BIAS + o_d[None, :], p_rows)
        return tl.load(p_rows, mask=m_rows[:, None], other=0.0)
    # [ROWS, HEAD_DIM]
    return tl.load(p_rows, mask=(m_rows & ~m_pad)[:, None], other=0.0)


@triton.jit
def _l2_normalize(b_x, CDT: tl.constexpr):
    """x / max(||x||, 1e-12) per row in the compute dtype, and the clamped norm max(||x||, 1e-12)."""
    b_x = b_x.to(CDT)
    b_r = tl.maximum(tl.sqrt(tl.sum(b_x * b_x, axis=1)), 1e-12)
    return b_x / b_r[:, None], b_r


@triton.jit
def _l2_normalize_backward(b_xn, b_r, b_dxn):
    """Gradient through x / max(||x||, eps): (dy - y (y . dy)) / ||x|| where the norm exceeds eps, dy / eps
    where the clamp is active (there the norm's own gradient is zero)."""
    b_proj = tl.where(b_r > 1e-12, tl.sum(b_xn * b_dxn, axis=1), 0.0)
    return (b_dxn - b_xn * b_proj[:, None]) / b_r[:, None]


@triton.jit
def _dot(a, b, FULL_DOT: tl.constexpr):
    # fp32/fp64 inputs: IEEE dots (never TF32); fp16/bf16: tensor cores with fp32 accumulation
    if FULL_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(b_qs, b_kn, P_BIAS_H, o_m, o_n, m_m, m_n, o_reg_m, o_reg_n, N, mask_value, FULL_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits: scaled cosine + position bias + shift mask; -inf beyond the window."""
    b_s = _dot(b_qs, tl.trans(b_kn), FULL_DOT)
    b_s += tl.load(P_BIAS_H + o_m[:, None] * N + o_n[None, :], mask=m_m[:, None] & m_n[None, :],
                   other=0.0).to(b_s.dtype)
    b_s += tl.where(o_reg_m[:, None] != o_reg_n[None, :], mask_value, 0.0)
    return tl.where(m_n[None, :], b_s, float("-inf"))


@triton.jit
def _key_block(p_qkv, QKV_BIAS, o_n, m_n, i_wy, i_wx, i_h, o_d, stride_t, H, W, HP, WP, WH, WW, SH, SW, C,
               HEAD_DIM: tl.constexpr, ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, CDT: tl.constexpr):
    """Key rows o_n of a window, for a loop over key blocks: normalised k (compute dtype), v (projection
    dtype), [BLOCK_N, HEAD_DIM] each, and their shift-mask regions."""
    o_tok_n, m_pad_n, o_reg_n, o_padi_n = _window_rows(o_n, i_wy, i_wx, H, W, HP, WP, WH, WW, SH, SW, ROLL_THEN_PAD)
    b_k = _load_rows(p_qkv + C + i_h * HEAD_DIM, QKV_BIAS + C + i_h * HEAD_DIM, o_tok_n, m_n, m_pad_n, o_d,
                     stride_t, HAS_BIAS)
    b_v = _load_rows(p_qkv + 2 * C + i_h * HEAD_DIM, QKV_BIAS + 2 * C + i_h * HEAD_DIM, o_tok_n, m_n, m_pad_n,
                     o_d, stride_t, HAS_BIAS)
    b_kn, b_rk = _l2_normalize(b_k, CDT)
    return b_kn, b_v, o_reg_n


@triton.jit
def _window_of(i_bw, NUM_WINDOWS, NUM_WX):
    # the image index in int64: i_b * stride_b overflows int32 for large images times large batches
    i_b, i_w = (i_bw // NUM_WINDOWS).to(tl.int64), i_bw % NUM_WINDOWS
    return i_b, i_w, i_w // NUM_WX, i_w % NUM_WX


@triton.jit
def _query_rows(p_qkv, QKV_BIAS, b_scale, o_m, m_m, i_wy, i_wx, i_h, o_d, stride_t, H, W, HP, WP, WH, WW, SH, SW,
                HEAD_DIM: tl.constexpr, ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, CDT: tl.constexpr,
                DDT: tl.constexpr):
    """Query rows o_m of a window: each row's token, padding flag and shift region, and q normalised (compute
    dtype), its clamped norm and q times the clamped logit scale b_scale (dot dtype), [BLOCK_M, HEAD_DIM]."""
    o_tok_m, m_pad_m, o_reg_m, o_padi_m = _window_rows(o_m, i_wy, i_wx, H, W, HP, WP, WH, WW, SH, SW,
                                                         ROLL_THEN_PAD)
    b_q = _load_rows(p_qkv + i_h * HEAD_DIM, QKV_BIAS + i_h * HEAD_DIM, o_tok_m, m_m, m_pad_m, o_d, stride_t,
                     HAS_BIAS)
    b_qn, b_rq = _l2_normalize(b_q, CDT)
    return o_tok_m, m_pad_m, o_reg_m, b_qn, b_rq, (b_qn * b_scale).to(DDT)


@triton.jit
def _query_block(i_bwm, i_h, QKV, QKV_BIAS, SCALE, stride_qkv_b, stride_qkv_t, H, W, HP, WP, NUM_WX, NUM_WINDOWS,
                 WH, WW, SH, SW, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ROLL_THEN_PAD: tl.constexpr,
                 HAS_BIAS: tl.constexpr, CDT: tl.constexpr, DDT: tl.constexpr):
    """The query side of a program over BLOCK_M rows (block i_bwm of the (image, window) pairs' row blocks)
    for head i_h: image and window indices, channel and row offsets, row mask, each row's token, padding flag
    and shift region, the image's projection pointer, and q normalised (compute dtype), its clamped norm and
    q times the clamped logit scale (dot dtype), [BLOCK_M, HEAD_DIM]."""
    num_m = tl.cdiv(N, BLOCK_M)
    i_b, i_w, i_wy, i_wx = _window_of(i_bwm // num_m, NUM_WINDOWS, NUM_WX)
    o_d = tl.arange(0, HEAD_DIM)
    o_m = (i_bwm % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    p_qkv = QKV + i_b * stride_qkv_b
    o_tok_m, m_pad_m, o_reg_m, b_qn, b_rq, b_qs = _query_rows(
        p_qkv, QKV_BIAS, tl.load(SCALE + i_h), o_m, m_m, i_wy, i_wx, i_h, o_d, stride_qkv_t, H, W, HP, WP, WH, WW, SH,
        SW, HEAD_DIM, ROLL_THEN_PAD, HAS_BIAS, CDT, DDT)
    return i_b, i_w, i_wy, i_wx, o_d, o_m, m_m, o_tok_m, m_pad_m, o_reg_m, p_qkv, b_qn, b_rq, b_qs


@triton.jit
def _online_softmax_step(b_s, b_m):
    """One key block of an online softmax over rows of scores b_s: the new row max, the factor rescaling
    what was summed under the old max, and exp(S - new max)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    return b_m_new, tl.exp(b_m - b_m_new), tl.exp(b_s - b_m_new[:, None])


@triton.jit
def _window_attention_fwd_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, OUT,
    stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH, SW, N, C, NUM_HEADS,
    mask_value,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    CDT: tl.constexpr = SCALE.dtype.element_ty  # compute dtype: fp32 (fp64 for fp64 inputs)
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty  # dot operand dtype
    i_bwm, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_w, i_wy, i_wx, o_d, o_m, m_m, o_tok_m, m_pad_m, o_reg_m, p_qkv, b_qn, b_rq, b_qs = _query_block(
        i_bwm, i_h, QKV, QKV_BIAS, SCALE, stride_qkv_b, stride_qkv_t, H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH,
        SW, N, HEAD_DIM, BLOCK_M, ROLL_THEN_PAD, HAS_BIAS, CDT, DDT)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=CDT)
    b_l = tl.zeros([BLOCK_M], dtype=CDT)
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_kn, b_v, o_reg_n = _key_block(p_qkv, QKV_BIAS, o_n, m_n, i_wy, i_wx, i_h, o_d, stride_qkv_t, H, W, HP, WP,
                                        WH, WW, SH, SW, C, HEAD_DIM, ROLL_THEN_PAD, HAS_BIAS, CDT)
        # [BLOCK_M, BLOCK_N]
        b_s = _scores(b_qs, b_kn.to(DDT), p_bias_h, o_m, o_n, m_m, m_n, o_reg_m, o_reg_n, N, mask_value, FULL_DOT)
        b_m, b_alpha, b_p = _online_softmax_step(b_s, b_m)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(DDT), b_v.to(DDT), FULL_DOT)

    b_out = b_acc / b_l[:, None]
    p_out = OUT + i_b * stride_out_b + o_tok_m[:, None] * stride_out_t + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=(m_m & ~m_pad_m)[:, None])


@triton.jit
def _window_attention_bwd_stats_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH, SW, N, C, NUM_HEADS, L,
    mask_value,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    """The first backward kernel, for the query rows of one window block: the softmax statistics (row max,
    log row sum) into STATS, and delta[b, t, h] = sum_j P_ij dP_ij in token layout, the softmax backward's
    correction term, both in one online pass over the key blocks.

    The statistics are recomputed here rather than saved by the forward: the backward kernels share one tile
    shape, so the scores they recompute are bitwise those these statistics come from, while the forward's
    tiles differ, and a score in another tile shape can differ in its last bit. At |S| up to 116 that bit moves
    a saturated row's P off 1 by ~1e-5, and dS = P (dP - delta), exactly zero there in the reference (and in
    the exact gradient), would not cancel. delta is summed over the row of P * dP rather than taken as
    rowsum(dO * O): O was rounded to the projection's dtype when stored, so an fp16 O would put its rounding
    into every gradient."""
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    i_bwm, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_w, i_wy, i_wx, o_d, o_m, m_m, o_tok_m, m_pad_m, o_reg_m, p_qkv, b_qn, b_rq, b_qs = _query_block(
        i_bwm, i_h, QKV, QKV_BIAS, SCALE, stride_qkv_b, stride_qkv_t, H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH,
        SW, N, HEAD_DIM, BLOCK_M, ROLL_THEN_PAD, HAS_BIAS, CDT, DDT)
    m_real_m = m_m & ~m_pad_m
    b_do = tl.load(DOUT + i_b * stride_do_b + o_tok_m[:, None] * stride_do_t + i_h * HEAD_DIM + o_d[None, :],
                   mask=m_real_m[:, None], other=0.0).to(DDT)
    # online softmax as in the forward, with sum_j exp(S_ij - m_i) dP_ij carried beside the row sum
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=CDT)
    b_l = tl.zeros([BLOCK_M], dtype=CDT)
    b_pdp = tl.zeros([BLOCK_M], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_kn, b_v, o_reg_n = _key_block(p_qkv, QKV_BIAS, o_n, m_n, i_wy, i_wx, i_h, o_d, stride_qkv_t, H, W, HP, WP,
                                        WH, WW, SH, SW, C, HEAD_DIM, ROLL_THEN_PAD, HAS_BIAS, CDT)
        b_s = _scores(b_qs, b_kn.to(DDT), p_bias_h, o_m, o_n, m_m, m_n, o_reg_m, o_reg_n, N, mask_value, FULL_DOT)
        b_m, b_alpha, b_e = _online_softmax_step(b_s, b_m)
        b_dp = _dot(b_do, tl.trans(b_v.to(DDT)), FULL_DOT)
        b_l = b_l * b_alpha + tl.sum(b_e, axis=1)
        b_pdp = b_pdp * b_alpha + tl.sum(b_e * b_dp, axis=1)
    # (row max, log row sum): P = exp((S - m) - log l) keeps the dominant entries exact, where
    # exp(S - logsumexp) would lose |S| * eps of them
    p_stats = STATS + (((i_b * NUM_HEADS + i_h) * NUM_WINDOWS + i_w) * N + o_m) * 2
    tl.store(p_stats, b_m, mask=m_m)
    tl.store(p_stats + 1, tl.log(b_l), mask=m_m)
    tl.store(DELTA + i_b * L * NUM_HEADS + o_tok_m * NUM_HEADS + i_h, b_pdp / b_l, mask=m_real_m)


@triton.jit
def _load_stats(STATS, i_b, i_w, i_h, o_m, m_m, N, NUM_WINDOWS, NUM_HEADS):
    """Row max and log row sum of the forward's softmax for window rows o_m."""
    p_stats = STATS + (((i_b * NUM_HEADS + i_h) * NUM_WINDOWS + i_w) * N + o_m) * 2
    return tl.load(p_stats, mask=m_m, other=0.0), tl.load(p_stats + 1, mask=m_m, other=0.0)


@triton.jit
def _probs(b_s, b_rmax, b_logl, m_m):
    """P recomputed from the saved statistics; zero for rows beyond the window."""
    return tl.where(m_m[:, None], tl.exp((b_s - b_rmax[:, None]) - b_logl[:, None]), 0.0)


@triton.jit
def _load_query_grads(DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real, o_tok, o_d, stride_do_b, stride_do_t,
                      L, N, NUM_WINDOWS, NUM_HEADS, HEAD_DIM: tl.constexpr):
    """dO rows (zero for padded and out-of-window rows, which have no output), softmax statistics, delta."""
    b_do = tl.load(DOUT + i_b * stride_do_b + o_tok[:, None] * stride_do_t + i_h * HEAD_DIM + o_d[None, :],
                   mask=m_real[:, None], other=0.0)
    b_rmax, b_logl = _load_stats(STATS, i_b, i_w, i_h, o_m, m_m, N, NUM_WINDOWS, NUM_HEADS)
    b_delta = tl.load(DELTA + i_b * L * NUM_HEADS + o_tok * NUM_HEADS + i_h, mask=m_real, other=0.0)
    return b_do, b_rmax, b_logl, b_delta


@triton.jit
def _window_attention_bwd_dq_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA, DQKV,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t, stride_dqkv_b, stride_dqkv_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH, SW, N, C, NUM_HEADS, L,
    mask_value,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    """dq for BLOCK_M query rows of one window and head; padded query rows have no output, hence no dq."""
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    i_bwm, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_w, i_wy, i_wx, o_d, o_m, m_m, o_tok_m, m_pad_m, o_reg_m, p_qkv, b_qn, b_rq, b_qs = _query_block(
        i_bwm, i_h, QKV, QKV_BIAS, SCALE, stride_qkv_b, stride_qkv_t, H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH,
        SW, N, HEAD_DIM, BLOCK_M, ROLL_THEN_PAD, HAS_BIAS, CDT, DDT)
    m_real_m = m_m & ~m_pad_m
    b_scale = tl.load(SCALE + i_h)
    b_do, b_rmax, b_logl, b_delta = _load_query_grads(
        DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real_m, o_tok_m, o_d, stride_do_b, stride_do_t, L, N,
        NUM_WINDOWS, NUM_HEADS, HEAD_DIM)
    b_do = b_do.to(DDT)
    b_dqs = tl.zeros([BLOCK_M, HEAD_DIM], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_kn, b_v, o_reg_n = _key_block(p_qkv, QKV_BIAS, o_n, m_n, i_wy, i_wx, i_h, o_d, stride_qkv_t, H, W, HP, WP,
                                        WH, WW, SH, SW, C, HEAD_DIM, ROLL_THEN_PAD, HAS_BIAS, CDT)
        b_kn = b_kn.to(DDT)
        b_s = _scores(b_qs, b_kn, p_bias_h, o_m, o_n, m_m, m_n, o_reg_m, o_reg_n, N, mask_value, FULL_DOT)
        b_p = _probs(b_s, b_rmax, b_logl, m_m)
        b_dp = _dot(b_do, tl.trans(b_v.to(DDT)), FULL_DOT)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dqs += _dot(b_ds.to(DDT), b_kn, FULL_DOT)
    b_dq = _l2_normalize_backward(b_qn, b_rq, b_dqs * b_scale)
    p_dq = DQKV + i_b * stride_dqkv_b + o_tok_m[:, None] * stride_dqkv_t + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_dq, b_dq.to(DQKV.dtype.element_ty), mask=m_real_m[:, None])


@triton.jit
def _window_attention_bwd_dkdv_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA, DQKV, DPAD,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t, stride_dqkv_b, stride_dqkv_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH, SW, N, C, NUM_HEADS, L, NUM_PAD,
    mask_value,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    """dk and dv for BLOCK_N key rows of one window and head. Every token is a key of exactly one window,
    so rows are stored, not accumulated; with a bias, padded key rows go to their own slot of DPAD
    (B, NUM_PAD, 2C: dk then dv), which the host sums into the k/v bias gradients."""
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    i_bwn, i_h = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    i_b, i_w, i_wy, i_wx = _window_of(i_bwn // num_n, NUM_WINDOWS, NUM_WX)
    o_d = tl.arange(0, HEAD_DIM)
    o_n = (i_bwn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_tok_n, m_pad_n, o_reg_n, o_pad_n = _window_rows(o_n, i_wy, i_wx, H, W, HP, WP, WH, WW, SH, SW, ROLL_THEN_PAD)

    p_qkv = QKV + i_b * stride_qkv_b
    b_scale = tl.load(SCALE + i_h)
    b_k = _load_rows(p_qkv + C + i_h * HEAD_DIM, QKV_BIAS + C + i_h * HEAD_DIM, o_tok_n, m_n, m_pad_n,
                     o_d, stride_qkv_t, HAS_BIAS)
    b_v = _load_rows(p_qkv + 2 * C + i_h * HEAD_DIM, QKV_BIAS + 2 * C + i_h * HEAD_DIM, o_tok_n, m_n,
                     m_pad_n, o_d, stride_qkv_t, HAS_BIAS).to(DDT)
    b_kn, b_rk = _l2_normalize(b_k, CDT)
    b_kn_d = b_kn.to(DDT)
    b_dkn = tl.zeros([BLOCK_N, HEAD_DIM], dtype=CDT)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_m in range(0, N, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < N
        o_tok_m, m_pad_m, o_reg_m, b_qn, b_rq, b_qs = _query_rows(
            p_qkv, QKV_BIAS, b_scale, o_m, m_m, i_wy, i_wx, i_h, o_d, stride_qkv_t, H, W, HP, WP, WH, WW, SH, SW,
            HEAD_DIM, ROLL_THEN_PAD, HAS_BIAS, CDT, DDT)
        m_real_m = m_m & ~m_pad_m
        b_do, b_rmax, b_logl, b_delta = _load_query_grads(
            DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real_m, o_tok_m, o_d, stride_do_b, stride_do_t, L, N,
            NUM_WINDOWS, NUM_HEADS, HEAD_DIM)
        b_do = b_do.to(DDT)
        b_s = _scores(b_qs, b_kn_d, p_bias_h, o_m, o_n, m_m, m_n, o_reg_m, o_reg_n, N, mask_value, FULL_DOT)
        # padded rows have dO = 0 and delta = 0, hence dS = 0; rows beyond the window have no softmax
        b_p = _probs(b_s, b_rmax, b_logl, m_m)
        b_dv += _dot(tl.trans(b_p.to(DDT)), b_do, FULL_DOT)
        b_dp = _dot(b_do, tl.trans(b_v), FULL_DOT)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dkn += _dot(tl.trans(b_ds.to(DDT)), b_qs, FULL_DOT)
    b_dk = _l2_normalize_backward(b_kn, b_rk, b_dkn)

    m_real_n = m_n & ~m_pad_n
    p_dk = DQKV + i_b * stride_dqkv_b + o_tok_n[:, None] * stride_dqkv_t + C + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_dk, b_dk.to(DQKV.dtype.element_ty), mask=m_real_n[:, None])
    tl.store(p_dk + C, b_dv.to(DQKV.dtype.element_ty), mask=m_real_n[:, None])
    if HAS_BIAS:  # without a bias padded keys are constant zeros: nothing to learn there
        m_padded_n = m_n & m_pad_n
        p_dpad = DPAD + i_b * NUM_PAD * (2 * C) + o_pad_n[:, None] * (2 * C) + i_h * HEAD_DIM + o_d[None, :]
        tl.store(p_dpad, b_dk.to(DPAD.dtype.element_ty), mask=m_padded_n[:, None])
        tl.store(p_dpad + C, b_dv.to(DPAD.dtype.element_ty), mask=m_padded_n[:, None])


@triton.jit
def _window_attention_bwd_dbias_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA, DBIAS, DSCALE,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, WH, WW, SH, SW, N, C, NUM_HEADS, L, NUM_BW, WINDOWS_PER_GROUP,
    mask_value,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    """Partial gradients of the (heads, N, N) bias table and of the scale, summed over one group of
    WINDOWS_PER_GROUP consecutive (image, window) pairs in a fixed order: DBIAS (groups, heads, N, N) and
    DSCALE (groups, heads, tiles). The host sums the groups, so the reduction is deterministic."""
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    i_tile, i_h, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_tn = tl.cdiv(N, BLOCK_N)
    i_tm, i_tn = i_tile // num_tn, i_tile % num_tn
    o_d = tl.arange(0, HEAD_DIM)
    o_m = i_tm * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_tn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < N
    m_n = o_n < N
    b_scale = tl.load(SCALE + i_h)
    p_bias_h = POSITION_BIAS + i_h * N * N
    b_dbias = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)
    b_dscale = tl.zeros([BLOCK_M], dtype=CDT)
    for i_bw in range(i_g * WINDOWS_PER_GROUP, tl.minimum((i_g + 1) * WINDOWS_PER_GROUP, NUM_BW)):
        i_b, i_w, i_wy, i_wx = _window_of(i_bw, NUM_WINDOWS, NUM_WX)
        p_qkv = QKV + i_b * stride_qkv_b
        o_tok_m, m_pad_m, o_reg_m, b_qn, b_rq, b_qs = _query_rows(
            p_qkv, QKV_BIAS, b_scale, o_m, m_m, i_wy, i_wx, i_h, o_d, stride_qkv_t, H, W, HP, WP, WH, WW, SH, SW,
            HEAD_DIM, ROLL_THEN_PAD, HAS_BIAS, CDT, DDT)
        b_kn, b_v, o_reg_n = _key_block(p_qkv, QKV_BIAS, o_n, m_n, i_wy, i_wx, i_h, o_d, stride_qkv_t, H, W, HP, WP,
                                        WH, WW, SH, SW, C, HEAD_DIM, ROLL_THEN_PAD, HAS_BIAS, CDT)
        m_real_m = m_m & ~m_pad_m
        b_do, b_rmax, b_logl, b_delta = _load_query_grads(
            DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real_m, o_tok_m, o_d, stride_do_b, stride_do_t, L, N,
            NUM_WINDOWS, NUM_HEADS, HEAD_DIM)
        b_s = _scores(b_qs, b_kn.to(DDT), p_bias_h, o_m, o_n, m_m, m_n, o_reg_m, o_reg_n, N, mask_value,
                      FULL_DOT)
        b_p = _probs(b_s, b_rmax, b_logl, m_m)
        b_dp = _dot(b_do.to(DDT), tl.trans(b_v.to(DDT)), FULL_DOT)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dbias += b_ds
        # d scale = sum dS * cos(q, k); qs . kn = scale * cos
        b_dscale += tl.sum(b_ds * _dot(b_qs, tl.trans(b_kn.to(DDT)), FULL_DOT), axis=1)
    p_dbias = DBIAS + (i_g * NUM_HEADS + i_h) * N * N + o_m[:, None] * N + o_n[None, :]
    tl.store(p_dbias, b_dbias, mask=m_m[:, None] & m_n[None, :])
    num_tiles = tl.cdiv(N, BLOCK_M) * num_tn
    tl.store(DSCALE + (i_g * NUM_HEADS + i_h) * num_tiles + i_tile, tl.sum(b_dscale, axis=0) / b_scale)


# (BLOCK_M, BLOCK_N, num_warps) per head dimension, chosen with `compile_check --sweep` as the largest
# tiles that compile without register spills for sm_80 and sm_90 (registers in the compile-check table).
# The same tiles serve every window size: a window of N tokens takes ceil(N / BLOCK_M) query blocks and
# streams ceil(N / BLOCK_N) key blocks; non-power-of-two N (49, 144, 576) is masked.
_TILES_16BIT = {16: (64, 32, 4), 32: (64, 32, 4), 64: (32, 32, 8), 128: (16, 32, 8)}
_TILES_FP32 = {16: (32, 32, 8), 32: (32, 32, 8), 64: (16, 16, 8), 128: (16, 16, 8)}
_TILES_FP64 = {16: (16, 16, 4), 32: (16, 16, 4), 64: (16, 16, 4), 128: (16, 16, 4)}
# The backward kernels (dq, dk/dv, bias table and scale) hold more live tiles: their own table, from the
# same compile check. fp32 backward with head_dim 64 or 128 has no spill-free tile (IEEE fp32 dots keep
# their operands in registers), and fp64 is a gradcheck dtype: on a GPU those go to the eager path by design
# (`fused_backward_supported`); under the interpreter every dtype and head dim runs.
_BWD_TILES_16BIT = {16: (64, 32, 4), 32: (64, 32, 8), 64: (32, 16, 8), 128: (16, 32, 8)}
_BWD_TILES_FP32 = {16: (32, 16, 8), 32: (16, 32, 8)}
# Register budget per thread handed to ptxas (.maxnreg). Without it ptxas may cap 8-warp kernels at 128
# registers and spill; 255 x 256 threads still fits one SM's 64K registers.
MAXNREG = 255


def block_config(n: int, head_dim: int, dtype: torch.dtype, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for windows of n tokens, head_dim and the projection dtype, of the
    forward kernel or of the backward kernels."""
    del n  # one configuration per head dimension covers every window size
    if dtype == torch.float64:
        return _TILES_FP64[head_dim]
    if backward and dtype == torch.float32:
        return _BWD_TILES_FP32.get(head_dim, _TILES_FP32[head_dim])  # beyond the table: interpreter only
    if backward:
        return _BWD_TILES_16BIT[head_dim]
    return (_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)[head_dim]


def fused_backward_supported(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the compiled backward kernels serve this head dim and dtype on a GPU (see the tile tables)."""
    if dtype == torch.float32:
        return head_dim in _BWD_TILES_FP32
    return dtype in (torch.float16, torch.bfloat16) and head_dim in _BWD_TILES_16BIT


class _Geometry(NamedTuple):
    """Runtime integers every kernel takes, derived once per call."""

    H: int
    W: int
    HP: int
    WP: int
    NUM_WX: int
    NUM_WINDOWS: int
    WH: int
    WW: int
    SH: int
    SW: int
    N: int
    C: int
    NUM_HEADS: int


def _geometry(qkv, grid_size, num_heads, window_size, shift_size) -> _Geometry:
    H, W = _pair(grid_size, "grid_size")
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(shift_size, "shift_size")
    hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
    C = qkv.shape[-1] // 3
    return _Geometry(H, W, hp, wp, wp // ww, (hp // wh) * (wp // ww), wh, ww, sh, sw, wh * ww, C, num_heads)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads):
    """The scale exp(min(logit_scale, log 100)), the table and the bias in the compute dtype, contiguous: under
    autocast they arrive fp32 beside an fp16/bf16 projection; one kernel specialization per projection dtype."""
    cdt = _compute_dtype(qkv.dtype)
    scale = torch.clamp(logit_scale.detach().reshape(num_heads).to(cdt), max=LOGIT_SCALE_MAX).exp().contiguous()
    table = position_bias.detach().to(cdt).contiguous()
    # the bias in the projection's dtype, as the reference's padding token; qkv itself is the (never read)
    # pointer when there is none
    bias = qkv_bias.detach().to(qkv.dtype).contiguous() if qkv_bias is not None else qkv
    return scale, table, bias


def _flags(qkv, qkv_bias, pad_order, head_dim, n, backward=False):
    block_m, block_n, num_warps = block_config(n, head_dim, qkv.dtype, backward)
    return dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, ROLL_THEN_PAD=pad_order == ROLL_THEN_PAD,
                HAS_BIAS=qkv_bias is not None, FULL_DOT=qkv.dtype in (torch.float32, torch.float64),
                num_warps=num_warps, maxnreg=MAXNREG)


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
) -> torch.Tensor:
    """Launch the fused forward. Returns the output (B, H*W, C); the backward recomputes what it needs.

    Inputs as in `window_attention_reference` (validated by the caller). qkv's channel dimension must be
    contiguous; batch and token strides are free.
    """
    B, L, C3 = qkv.shape
    head_dim = C3 // 3 // num_heads
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the Triton kernel supports head_dim in {KERNEL_HEAD_DIMS}, got {head_dim}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv's last dimension must be contiguous (stride 1), got strides {qkv.stride()}")
    g = _geometry(qkv, grid_size, num_heads, window_size, shift_size)
    scale, table, bias = _small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads)
    out = torch.empty((B, L, g.C), device=qkv.device, dtype=qkv.dtype)
    if B == 0:
        return out
    flags = _flags(qkv, qkv_bias, pad_order, head_dim, g.N)
    grid = (B * g.NUM_WINDOWS * triton.cdiv(g.N, flags["BLOCK_M"]), num_heads)
    _window_attention_fwd_kernel[grid](
        QKV=qkv, QKV_BIAS=bias, SCALE=scale, POSITION_BIAS=table, OUT=out,
        stride_qkv_b=qkv.stride(0), stride_qkv_t=qkv.stride(1), stride_out_b=out.stride(0),
        stride_out_t=out.stride(1), mask_value=float(mask_value), **g._asdict(), **flags,
    )
    return out


def _backward_statistics(grad_out, qkv, qkv_bias, logit_scale, position_bias, grid_size, num_heads, window_size,
                         shift_size, pad_order, mask_value):
    """Run the first backward kernel. Returns the geometry, the backward's tile flags, the clamped scale and
    the launch arguments every backward kernel shares, whose STATS (B, heads, nW * N * 2: (row max, log row
    sum) pairs) and DELTA (B, H*W, heads) it has filled."""
    B, L, C3 = qkv.shape
    g = _geometry(qkv, grid_size, num_heads, window_size, shift_size)
    scale, table, bias = _small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    flags = _flags(qkv, qkv_bias, pad_order, C3 // 3 // num_heads, g.N, backward=True)
    stats = torch.empty((B, num_heads, g.NUM_WINDOWS * g.N * 2), device=qkv.device, dtype=scale.dtype)
    delta = torch.empty((B, L, num_heads), device=qkv.device, dtype=scale.dtype)
    common = dict(QKV=qkv, QKV_BIAS=bias, SCALE=scale, POSITION_BIAS=table, DOUT=grad_out, STATS=stats,
                  DELTA=delta, stride_qkv_b=qkv.stride(0), stride_qkv_t=qkv.stride(1),
                  stride_do_b=grad_out.stride(0), stride_do_t=grad_out.stride(1), L=L,
                  mask_value=float(mask_value), **g._asdict(), **flags)
    if B > 0:
        # every token is the query of exactly one window row: each delta is written once
        _window_attention_bwd_stats_kernel[(B * g.NUM_WINDOWS * triton.cdiv(g.N, flags["BLOCK_M"]), num_heads)](
            **common)
    return g, flags, scale, common


def window_attention_triton_backward(
    grad_out: torch.Tensor,
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
    need_qkv: bool = True,
    need_bias: bool = True,
    need_table_grads: bool = True,
):
    """Gradients of the fused op: (d qkv, d qkv_bias, d logit_scale, d position_bias), each None when not
    asked for (`need_qkv`, `need_bias`, `need_table_grads` for the scale and the table together) or, for the
    bias, when there is none. A gradient not asked for is neither computed nor allocated: without
    `need_table_grads` the table/scale kernel does not run, without `need_qkv` the dq kernel does not.

    P is recomputed (nothing N x N was stored). Kernels: the softmax statistics of every window row and
    delta = rowsum(P * dP) per query row, in token layout; dq per query block; dk/dv per key block (padded
    keys to a per-position buffer, summed into the bias gradient); the table and scale gradients per bias
    tile over groups of windows, summed on the host in a fixed order. Every reduction is deterministic: no
    atomics.
    """
    B, L, C3 = qkv.shape
    g, flags, scale, common = _backward_statistics(grad_out, qkv, qkv_bias, logit_scale, position_bias, grid_size,
                                                   num_heads, window_size, shift_size, pad_order, mask_value)
    cdt = scale.dtype
    num_pad = g.HP * g.WP - g.H * g.W
    need_bias = need_bias and qkv_bias is not None
    # dk/dv also carry the k/v bias gradient (padded keys); dqkv is then scratch if the activation's is not asked
    run_dkdv = need_qkv or (need_bias and num_pad > 0)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format) if run_dkdv else None
    # every padded position is a key of exactly one window: each slot is written once per head, none is left
    pad_grads = qkv_bias is not None and num_pad > 0
    dpad = torch.empty((B, num_pad, 2 * (C3 // 3)) if pad_grads else (1,), device=qkv.device, dtype=cdt)
    d_table = d_logit_scale = None
    if B > 0:
        num_bw = B * g.NUM_WINDOWS
        if run_dkdv:
            strides = dict(stride_dqkv_b=dqkv.stride(0), stride_dqkv_t=dqkv.stride(1))
            if need_qkv:
                _window_attention_bwd_dq_kernel[(num_bw * triton.cdiv(g.N, flags["BLOCK_M"]), num_heads)](
                    DQKV=dqkv, **strides, **common)
            _window_attention_bwd_dkdv_kernel[(num_bw * triton.cdiv(g.N, flags["BLOCK_N"]), num_heads)](
                DQKV=dqkv, DPAD=dpad, NUM_PAD=num_pad, **strides, **common)
        if need_table_grads:
            num_tiles = triton.cdiv(g.N, flags["BLOCK_M"]) * triton.cdiv(g.N, flags["BLOCK_N"])
            # Enough groups of windows to fill a GPU (about 1024 programs), each group a fixed range.
            groups = max(1, min(num_bw, 1024 // max(1, num_tiles * num_heads)))
            per_group = triton.cdiv(num_bw, groups)
            groups = triton.cdiv(num_bw, per_group)
            d_table_parts = torch.empty((groups, num_heads, g.N, g.N), device=qkv.device, dtype=cdt)
            d_scale_parts = torch.empty((groups, num_heads, num_tiles), device=qkv.device, dtype=cdt)
            _window_attention_bwd_dbias_kernel[(num_tiles, num_heads, groups)](
                DBIAS=d_table_parts, DSCALE=d_scale_parts, NUM_BW=num_bw, WINDOWS_PER_GROUP=per_group, **common)
            d_table = d_table_parts.sum(0)
            d_scale = d_scale_parts.sum((0, 2))
    elif dqkv is not None:
        dqkv.zero_()
    if need_table_grads:
        if d_table is None:  # empty batch
            d_table = torch.zeros_like(position_bias, dtype=cdt)
            d_scale = torch.zeros_like(scale)
        # d exp(min(x, log 100)) / dx = exp(x) below the bound and 0 above it; at exactly the bound, what the
        # installed torch.clamp passes (the reference's rule), compared in the logit scale's own dtype as the
        # reference's clamp does
        x = logit_scale.detach().reshape(num_heads)
        bound = torch.tensor(LOGIT_SCALE_MAX, dtype=x.dtype, device=x.device)
        inside = ((x <= bound) if clamp_passes_gradient_at_bound() else (x < bound)).to(cdt)
        d_logit_scale = (d_scale * scale * inside).reshape(logit_scale.shape).to(logit_scale.dtype)
        d_table = d_table.to(position_bias.dtype)
    d_bias = None
    if need_bias:
        d_bias = torch.zeros(C3, device=qkv.device, dtype=cdt)  # the q part: padded queries have no output
        if pad_grads:
            d_bias[C3 // 3:] = dpad.sum((0, 1))
        d_bias = d_bias.to(qkv_bias.dtype)
    return (dqkv if need_qkv else None), d_bias, d_logit_scale, d_table


@functools.lru_cache(maxsize=None)
def clamp_passes_gradient_at_bound() -> bool:
    """Whether torch.clamp(x, max=b) passes the gradient at x == b. Both rules exist in released torch
    (2.11 and 2.13 pass it, 2.14 does not); the fused backward follows the installed one, as the reference
    (which differentiates torch.clamp) does."""
    # asked in a thread of its own: grad mode, inference mode and the dispatch state that excludes autograd
    # inside a custom op's implementation are thread-local, and this is called from there
    found = []

    def ask():
        x = torch.tensor(1.0, requires_grad=True)
        (grad,) = torch.autograd.grad(torch.clamp(x, max=1.0), x)
        found.append(bool(grad != 0))

    thread = threading.Thread(target=ask, name="swinv2_fast-clamp-rule")
    thread.start()
    thread.join()
    return found[0]


# ----------------------------------------------------------------------------------------- the custom op
# `torch.ops.swinv2_fast.window_attention_fused` (the forward's output) and
# `torch.ops.swinv2_fast.window_attention_fused_backward`, registered with torch.library so that
# torch.compile traces models through them without a graph break (fake implementations give the shapes)
# and autograd runs the fused backward. Where they run:
#   CUDA tensors: the Triton kernels above.
#   CPU tensors:  the same kernels under Triton's interpreter when TRITON_INTERPRET=1 was set at import;
#                 otherwise the eager reference (the backward differentiates the reference). The model and
#                 functional dispatch never send CPU tensors here without the interpreter ("triton" raises
#                 there, "auto" picks eager); direct callers of the op get the reference's numbers.

def _options(grid_size, num_heads, window_size, shift_size, pad_order, mask_value):
    return dict(grid_size=tuple(grid_size), num_heads=num_heads, window_size=tuple(window_size),
                shift_size=tuple(shift_size), pad_order=pad_order, mask_value=mask_value)


def _runs_kernels(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return True
    if t.device.type == "cpu":
        return INTERPRETED
    raise RuntimeError(f"swinv2_fast::window_attention_fused runs on CUDA or CPU tensors, got {t.device}")


@torch.library.custom_op("swinv2_fast::window_attention_fused", mutates_args=(), device_types=("cuda", "cpu"))
def window_attention_fused(
    qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], logit_scale: torch.Tensor, position_bias: torch.Tensor,
    grid_size: List[int], num_heads: int, window_size: List[int], shift_size: List[int], pad_order: str,
    mask_value: float,
) -> torch.Tensor:
    """The output (B, H*W, C); see the comment above."""
    options = _options(grid_size, num_heads, window_size, shift_size, pad_order, mask_value)
    if _runs_kernels(qkv):
        return window_attention_triton_forward(qkv, qkv_bias, logit_scale, position_bias, **options)
    return window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, **options)


@window_attention_fused.register_fake
def _(qkv, qkv_bias, logit_scale, position_bias, grid_size, num_heads, window_size, shift_size, pad_order,
      mask_value):
    B, L, C3 = qkv.shape
    return qkv.new_empty((B, L, C3 // 3))


@torch.library.custom_op("swinv2_fast::window_attention_fused_backward", mutates_args=(),
                         device_types=("cuda", "cpu"))
def window_attention_fused_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], logit_scale: torch.Tensor,
    position_bias: torch.Tensor, grid_size: List[int], num_heads: int,
    window_size: List[int], shift_size: List[int], pad_order: str, mask_value: float, need_qkv: bool,
    need_bias: bool, need_table_grads: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d qkv, d qkv_bias, d logit_scale, d position_bias). A gradient not asked for (or the bias's, without a
    bias) is a fresh empty tensor of its own: custom ops return tensors, never None, and no two outputs may
    share storage (frozen parameters in fine-tuning ask for some gradients only)."""
    options = _options(grid_size, num_heads, window_size, shift_size, pad_order, mask_value)
    if not _runs_kernels(qkv):
        raise RuntimeError("swinv2_fast::window_attention_fused_backward runs the Triton kernels (CUDA, or CPU "
                           "under TRITON_INTERPRET=1); the op's eager CPU path is differentiated by autograd")
    grads = window_attention_triton_backward(
        grad_out, qkv, qkv_bias, logit_scale, position_bias, need_qkv=need_qkv, need_bias=need_bias,
        need_table_grads=need_table_grads, **options)
    return tuple(qkv.new_empty((0,)) if g is None else g for g in grads)


@window_attention_fused_backward.register_fake
def _(grad_out, qkv, qkv_bias, logit_scale, position_bias, grid_size, num_heads, window_size,
      shift_size, pad_order, mask_value, need_qkv, need_bias, need_table_grads):
    def grad_like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else qkv.new_empty((0,))

    return (grad_like(qkv, need_qkv), grad_like(qkv_bias, need_bias and qkv_bias is not None),
            grad_like(logit_scale, need_table_grads), grad_like(position_bias, need_table_grads))


def _setup_context(ctx, inputs, output):
    # the backward needs the inputs only: it recomputes P and its statistics, and delta comes from P * dP
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _reference_backward(grad_out, inputs, needs, options, create_graph=False):
    """The gradients by differentiating the reference at the saved inputs: for the op's eager CPU path, and,
    by design, for a backward that records a graph (`create_graph=True`: gradient penalties, double
    backward), since the fused backward is not differentiable itself; then the gradients are functions of
    the inputs themselves, not of detached copies."""
    with torch.enable_grad():
        leaves = inputs if create_graph else [
            t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
        out = window_attention_reference(*leaves, **_options(*options))
        wanted = [t for t, need in zip(leaves, needs) if t is not None and need]
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph, allow_unused=True)
                     if wanted else ())
        grads = [next(found) if t is not None and need else None for t, need in zip(leaves, needs)]
    # the reference reads qkv_bias only where there is padding: elsewhere its gradient is zero
    if needs[1] and grads[1] is None:
        grads[1] = torch.zeros_like(inputs[1])
    return (*grads, None, None, None, None, None, None)


def _backward(ctx, grad_out):
    qkv, qkv_bias, logit_scale, position_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    recording = torch.is_grad_enabled()  # autograd records this backward (create_graph=True)
    if recording or not _runs_kernels(qkv):  # or the op's eager CPU path
        return _reference_backward(grad_out, (qkv, qkv_bias, logit_scale, position_bias), needs, ctx.options,
                                   create_graph=recording)
    if not any(needs[:4]):
        return (None,) * 10
    dqkv, d_bias, d_scale, d_table = torch.ops.swinv2_fast.window_attention_fused_backward(
        grad_out, qkv, qkv_bias, logit_scale, position_bias, *ctx.options, bool(needs[0]),
        bool(needs[1] and qkv_bias is not None), bool(needs[2] or needs[3]))
    return (dqkv if needs[0] else None, d_bias if needs[1] else None, d_scale if needs[2] else None,
            d_table if needs[3] else None, None, None, None, None, None, None)


window_attention_fused.register_autograd(_backward, setup_context=_setup_context)


def fused_window_attention(qkv, qkv_bias, logit_scale, position_bias, *, grid_size, num_heads, window_size,
                           shift_size=0, pad_order=PAD_THEN_ROLL, mask_value=-100.0) -> torch.Tensor:
    """The fused op on validated inputs (see `swinv2_fast.window_attention`), differentiable: the output only."""
    return torch.ops.swinv2_fast.window_attention_fused(
        qkv, qkv_bias, logit_scale, position_bias, list(_pair(grid_size, "grid_size")), num_heads,
        list(_pair(window_size, "window_size")), list(_pair(shift_size, "shift_size")), pad_order,
        float(mask_value))
