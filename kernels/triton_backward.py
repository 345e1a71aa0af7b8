"""The backward kernels of the fused Swin V2 window attention and their launcher (triton_forward.py holds the
forward, triton_common.py the helpers both share, tiles.py the tiles and the rule choosing between the one
fused kernel, the rows kernel with the dk/dv kernel, and the four below, launch.py the launch integers and
flags).

P is recomputed (the forward stores nothing N x N): the statistics kernel writes each window row's softmax
statistics and delta = rowsum(P * dP) per query row; dq runs per query block, dk/dv per key block (padded keys
to a per-position buffer, summed into the bias gradient), the table and logit-scale gradients per bias tile over
fixed groups of windows, summed on the host in a fixed order. No atomics: every reduction is deterministic.
The four kernels share one tile shape, so the probabilities they recompute are bitwise the same (on sm_80 the
table kernel may run more warps or narrower key tiles, the same dot instruction: `tiles.table_kernel_tiles`).

delta is rowsum(P * dP), computed in one online pass, not rowsum(dO * O): a 16-bit output's rounding would
enter every gradient through dS = P (dP - delta). The statistics are the backward's own, not the forward's:
the forward's tiles differ, and a last-bit difference in a large score leaves a row whose softmax is one-hot
with a small non-zero gradient, where shared tiles cancel it to the reference's exact zero. The dq and dk/dv
kernels store at the un-shifted tokens; the table kernel computes q.k once per tile for both dS and the
logit-scale gradient and loads its bias tile once for all the windows it sums over.

The one fused kernel (where `tiles.fused_backward_applies`: a window that fits one block without spills)
takes a group of windows of one head and, per window, recomputes the scores and the softmax in one block (P
and its row statistics from the same scores), then dP, dv, dq, dk and the normalisation backward; the table
gradient is summed in registers over the group and the logit-scale gradient comes from the dq rows (the sum
of qn . dqs), each group's partial sums reduced on the host in a fixed order.

The rows kernel (where `tiles.rows_backward_applies`: windows of 129 to 256 tokens) holds whole rows of scores,
a row block against every key of the window, and does in one pass what the statistics, dq and table kernels do
in three: the softmax of whole rows (statistics stored for the dk/dv kernel), dq, and the table and scale
gradients summed over a group of windows; the dk/dv kernel then runs from its statistics. dk and dv are sums
over every query of the window, which spans the row blocks' programs: one kernel cannot serve them without
partial sums per row block in memory, or float atomics. Here the two kernels' tiles differ (16 query rows
against the whole window's keys, 256 or 128 + 16; the dk/dv kernel's 64 x 64, at N = 144 with a 16-row query
block last), so the one-hot argument above holds for dq (computed in the rows kernel from the same
scores as its statistics) but not bitwise for dk/dv: where a score's last bit differs between the tile shapes
(a different dot instruction: sm_90 may run 16-row tiles on mma, 64-row ones on wgmma), a saturated row's P in
the dk/dv kernel is off 1 by up to ~1e-5 and its dS by an ulp of dP, not exactly 0. That is far inside the
16-bit gradient's rounding; whether the bits differ at all is for a GPU to show.

On a shifted grid with windows off its border (`window_sets`) every backward kernel launches twice, as the
forward: those windows (no shift mask to build or add: most windows) and the border windows (`WINDOW_SET`); the
fused kernel on a padded grid once. The mask adds 0 off the border, so the scores are bitwise those a masked
launch computes. The two launches of a kernel that sums the table gradient over groups of windows share one
group size (`tiles.window_groups`).
"""

from __future__ import annotations

import functools
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .geometry import LOGIT_SCALE_MAX
from .launch import LaunchDims, device_arch, launch_dims, launch_flags, small_operands
from .tiles import (
    FUSED_PROGRAMS,
    MAXNREG,
    TABLE_PROGRAMS,
    dkdv_query_tail,
    fused_backward_applies,
    fused_block,
    fused_num_warps,
    fused_pads_table,
    program_register_budget,
    rows_backward_applies,
    rows_channel_block,
    rows_tiles,
    table_kernel_tiles,
    window_groups,
)
from .triton_common import (
    _bias_tile,
    _channels,
    _dot,
    _exp,
    _in_window,
    _key_rows,
    _l2_normalize,
    _l2_normalize_backward,
    _load_rows,
    _logits,
    _online_softmax_step,
    _padding_index,
    _query_rows,
    _tile_mask,
    _window_rows,
)
from .triton_forward import ALL_WINDOWS, _window_in_set, window_sets

__all__ = ["clamp_passes_gradient_at_bound", "window_attention_triton_backward"]


@triton.jit
def _bwd_prologue(WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr):
    """What every backward kernel opens with: the check that its compile-time window WH x WW holds N tokens,
    and the program's index on axis 0 (its block, tile or group of windows, by kernel) and its head (every
    backward launch puts the heads on axis 1). The window comes as constexpr arguments: unpacked from the
    `layout` tuple, its entries would not be compile-time values to tl.static_assert. (The channel axis,
    `_channels`, stays where each kernel computed it: computed before the rows' `tl.arange`, it reorders the
    generated code.)"""
    tl.static_assert(N == WH * WW)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _block_of(
    i_pid,
    NUM_BLOCKS: tl.constexpr,
    BLOCK: tl.constexpr,
    N: tl.constexpr,
    NUM_WINDOWS,
    NUM_WX,
    WINDOW_SET: tl.constexpr = 0,
):
    """Program i_pid of a launch over every block of BLOCK rows (NUM_BLOCKS per window) of every (image,
    window) pair of WINDOW_SET (every window, or those off the shifted border, or the border: the forward's
    `_window_in_set`): the pair (image (int64), window, (window row, column)), the block's window positions
    [BLOCK] and their in-window mask [BLOCK]."""
    i_b, i_w, i_w2 = _window_in_set(i_pid // NUM_BLOCKS, NUM_WINDOWS, NUM_WX, WINDOW_SET)
    o = (i_pid % NUM_BLOCKS) * BLOCK + tl.arange(0, BLOCK)
    return (i_b, i_w, i_w2), o, _in_window(o, N, BLOCK)


@triton.jit
def _load_do(DOUT, stride_b, stride_t, i_b, i_h, o_tok, m_real, cols, HEAD_DIM: tl.constexpr):
    """[ROWS, BLOCK_D] dO at tokens o_tok of image i_b, head i_h; zero for rows without an output (m_real
    false: padded, beyond the window) and beyond the head's channels."""
    o_d, m_d = cols
    return tl.load(
        DOUT + i_b * stride_b + o_tok[:, None] * stride_t + i_h * HEAD_DIM + o_d[None, :],
        mask=_tile_mask(m_real, m_d),
        other=0.0,
    )


@triton.jit
def _stats_offsets(ids, o_m, N: tl.constexpr, NUM_WINDOWS, NUM_HEADS):
    """[BLOCK_M] offsets into STATS (B, heads, windows, N, 2) of window rows o_m; ids = (image, window, head)."""
    i_b, i_w, i_h = ids
    return (((i_b * NUM_HEADS + i_h) * NUM_WINDOWS + i_w) * N + o_m) * 2


@triton.jit
def _load_query_grads(grads, ids, o_m, m_m, o_tok, m_real, cols, N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """What the first kernel computed for window rows o_m (tokens o_tok; ids = (image, window, head)), from
    `grads` = (DOUT, its image and token strides, STATS, DELTA, L, NUM_WINDOWS, NUM_HEADS): dO [BLOCK_M, BLOCK_D]
    (zero for padded and out-of-window rows, which have no output, and beyond the head's channels), the softmax
    statistics (row max, log row sum) and delta, [BLOCK_M] each."""
    DOUT, stride_do_b, stride_do_t, STATS, DELTA, L, NUM_WINDOWS, NUM_HEADS = grads
    i_b, _i_w, i_h = ids
    b_do = _load_do(DOUT, stride_do_b, stride_do_t, i_b, i_h, o_tok, m_real, cols, HEAD_DIM)
    p_stats = STATS + _stats_offsets(ids, o_m, N, NUM_WINDOWS, NUM_HEADS)
    b_stats = (tl.load(p_stats, mask=m_m, other=0.0), tl.load(p_stats + 1, mask=m_m, other=0.0))
    b_delta = tl.load(DELTA + i_b * L * NUM_HEADS + o_tok * NUM_HEADS + i_h, mask=m_real, other=0.0)
    return b_do, b_stats, b_delta


@triton.jit
def _window_attention_bwd_stats_kernel(
    QKV,
    QKV_BIAS,
    SCALE,
    POSITION_BIAS,
    DOUT,
    STATS,
    DELTA,
    stride_qkv_b,
    stride_qkv_t,
    stride_do_b,
    stride_do_t,
    H,
    W,
    HP,
    WP,
    NUM_WX,
    NUM_WINDOWS,
    SH,
    SW,
    RSH,
    RSW,
    C,
    NUM_HEADS,
    L,
    mask_value,
    WH: tl.constexpr,
    WW: tl.constexpr,
    N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHIFTED: tl.constexpr,
    PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FULL_DOT: tl.constexpr,
    WINDOW_SET: tl.constexpr = 0,
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
    into every gradient.

    The (image, window) pairs are those of WINDOW_SET, as in the forward and in every backward kernel: on a
    shifted grid the windows off its border run without the shift mask, which adds 0 there."""
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    i_pid, i_h = _bwd_prologue(WH, WW, N)  # the program's index on axis 0, its head
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    # [BLOCK_M] query rows
    pair, o_m, m_m = _block_of(i_pid, NUM_M, BLOCK_M, N, NUM_WINDOWS, NUM_WX, WINDOW_SET)
    i_b, i_w, i_w2 = pair
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, QKV_BIAS + i_h * HEAD_DIM, stride_qkv_t, C)
    rows_m = _window_rows(o_m, i_w2, grid, layout, MASKED)
    o_tok_m, m_pad_m, o_reg_m = rows_m
    _b_qn, _b_rq, b_qs = _query_rows(proj, rows_m, m_m, cols, tl.load(SCALE + i_h), HAS_BIAS, CDT, DDT)
    m_real_m = m_m & ~m_pad_m
    # [BLOCK_M, BLOCK_D]
    b_do = _load_do(DOUT, stride_do_b, stride_do_t, i_b, i_h, o_tok_m, m_real_m, cols, HEAD_DIM).to(DDT)
    # online softmax as in the forward, with sum_j exp(S_ij - m_i) dP_ij carried beside the row sum; [BLOCK_M]
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=CDT)
    b_l = tl.zeros([BLOCK_M], dtype=CDT)
    b_pdp = tl.zeros([BLOCK_M], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = _in_window(o_n, N, BLOCK_N)
        rows_n = _window_rows(o_n, i_w2, grid, layout, MASKED)
        b_kn, _b_rk, b_v = _key_rows(proj, rows_n, m_n, cols, HAS_BIAS, CDT)  # [BLOCK_N, BLOCK_D]
        # [BLOCK_M, BLOCK_N]
        b_bias = _bias_tile(p_bias_h, o_m, o_n, m_m, m_n, N, EVEN)
        b_s = _logits(
            _dot(b_qs, tl.trans(b_kn.to(DDT)), FULL_DOT), b_bias, o_reg_m, rows_n[2], m_n, mask_value, MASKED, MASK_N
        )
        b_m, b_alpha, b_e = _online_softmax_step(b_s, b_m)
        b_dp = _dot(b_do, tl.trans(b_v.to(DDT)), FULL_DOT)
        b_l = b_l * b_alpha + tl.sum(b_e, axis=1)
        b_pdp = b_pdp * b_alpha + tl.sum(b_e * b_dp, axis=1)
    # (row max, log row sum): P = exp((S - m) - log l) keeps the dominant entries exact, where
    # exp(S - logsumexp) would lose |S| * eps of them
    p_stats = STATS + _stats_offsets((i_b, i_w, i_h), o_m, N, NUM_WINDOWS, NUM_HEADS)
    tl.store(p_stats, b_m, mask=m_m)
    tl.store(p_stats + 1, tl.log(b_l), mask=m_m)
    tl.store(DELTA + i_b * L * NUM_HEADS + o_tok_m * NUM_HEADS + i_h, b_pdp / b_l, mask=m_real_m)


@triton.jit
def _probs(b_s, b_rmax, b_logl, m_m, MASK_M: tl.constexpr):
    """[BLOCK_M, BLOCK_N] P recomputed from the saved statistics; zero for rows beyond the window."""
    b_p = _exp((b_s - b_rmax[:, None]) - b_logl[:, None])
    if MASK_M:
        b_p = tl.where(m_m[:, None], b_p, 0.0)
    return b_p


@triton.jit
def _window_attention_bwd_dq_kernel(
    QKV,
    QKV_BIAS,
    SCALE,
    POSITION_BIAS,
    DOUT,
    STATS,
    DELTA,
    DQKV,
    stride_qkv_b,
    stride_qkv_t,
    stride_do_b,
    stride_do_t,
    stride_dqkv_b,
    stride_dqkv_t,
    H,
    W,
    HP,
    WP,
    NUM_WX,
    NUM_WINDOWS,
    SH,
    SW,
    RSH,
    RSW,
    C,
    NUM_HEADS,
    L,
    mask_value,
    WH: tl.constexpr,
    WW: tl.constexpr,
    N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHIFTED: tl.constexpr,
    PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FULL_DOT: tl.constexpr,
    WINDOW_SET: tl.constexpr = 0,
):
    """dq for BLOCK_M query rows of one window and head; padded query rows have no output, hence no dq. The
    (image, window) pairs are those of WINDOW_SET, as in the statistics kernel."""
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    i_pid, i_h = _bwd_prologue(WH, WW, N)  # the program's index on axis 0, its head
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    MASK_M: tl.constexpr = N % BLOCK_M != 0
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    # [BLOCK_M] query rows
    pair, o_m, m_m = _block_of(i_pid, NUM_M, BLOCK_M, N, NUM_WINDOWS, NUM_WX, WINDOW_SET)
    i_b, i_w, i_w2 = pair
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, QKV_BIAS + i_h * HEAD_DIM, stride_qkv_t, C)
    grads = (DOUT, stride_do_b, stride_do_t, STATS, DELTA, L, NUM_WINDOWS, NUM_HEADS)
    b_scale = tl.load(SCALE + i_h)
    rows_m = _window_rows(o_m, i_w2, grid, layout, MASKED)
    o_tok_m, m_pad_m, o_reg_m = rows_m
    b_qn, b_rq, b_qs = _query_rows(proj, rows_m, m_m, cols, b_scale, HAS_BIAS, CDT, DDT)
    m_real_m = m_m & ~m_pad_m
    b_do, stats_m, b_delta = _load_query_grads(grads, (i_b, i_w, i_h), o_m, m_m, o_tok_m, m_real_m, cols, N, HEAD_DIM)
    b_rmax, b_logl = stats_m
    b_do = b_do.to(DDT)
    # [BLOCK_M, BLOCK_D]
    b_dqs = tl.zeros([BLOCK_M, BLOCK_D], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = _in_window(o_n, N, BLOCK_N)
        rows_n = _window_rows(o_n, i_w2, grid, layout, MASKED)
        b_kn, _b_rk, b_v = _key_rows(proj, rows_n, m_n, cols, HAS_BIAS, CDT)  # [BLOCK_N, BLOCK_D]
        b_kn = b_kn.to(DDT)
        # [BLOCK_M, BLOCK_N]
        b_bias = _bias_tile(p_bias_h, o_m, o_n, m_m, m_n, N, EVEN)
        b_s = _logits(_dot(b_qs, tl.trans(b_kn), FULL_DOT), b_bias, o_reg_m, rows_n[2], m_n, mask_value, MASKED, MASK_N)
        b_p = _probs(b_s, b_rmax, b_logl, m_m, MASK_M)
        b_dp = _dot(b_do, tl.trans(b_v.to(DDT)), FULL_DOT)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dqs += _dot(b_ds.to(DDT), b_kn, FULL_DOT)
    b_dq = _l2_normalize_backward(b_qn, b_rq, b_dqs * b_scale)
    p_dq = DQKV + i_b * stride_dqkv_b + o_tok_m[:, None] * stride_dqkv_t + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_dq, b_dq.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_m, m_d))


@triton.jit
def _dkdv_query_block(
    start_m,
    N_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    step,
    layout: tl.constexpr,
    flags: tl.constexpr,
    CDT: tl.constexpr,
    DDT: tl.constexpr,
):
    """The dk/dv kernel's step over window rows start_m to start_m + BLOCK_M (rows from N_ROWS on masked out):
    ([BLOCK_N, BLOCK_D] P^T dO, [BLOCK_N, BLOCK_D] dS^T (q * scale)) for the program's keys, CDT the compute
    dtype, DDT the dots'. `step` = (keys: k normalised and v in the dot dtype, their window positions, in-window
    mask and shift regions; (image, window, head); the window's (row, column); the grid; the projection; the
    query-side gradients; the channels; the clamped scale; the head's bias table; the mask value); `flags` = the
    kernel's compile-time (N, HEAD_DIM, HAS_BIAS, MASKED, MASK_N, EVEN, FULL_DOT) (a constexpr tuple holds no
    dtype)."""
    keys, ids, i_w2, grid, proj, grads, cols, b_scale, p_bias_h, mask_value = step
    N, HEAD_DIM, HAS_BIAS, MASKED, MASK_N, EVEN, FULL_DOT = flags
    b_kn_d, b_v, o_n, m_n, o_reg_n = keys
    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = _in_window(o_m, N_ROWS, BLOCK_M)
    rows_m = _window_rows(o_m, i_w2, grid, layout, MASKED)
    o_tok_m, m_pad_m, o_reg_m = rows_m
    _b_qn, _b_rq, b_qs = _query_rows(proj, rows_m, m_m, cols, b_scale, HAS_BIAS, CDT, DDT)
    m_real_m = m_m & ~m_pad_m
    b_do, stats_m, b_delta = _load_query_grads(grads, ids, o_m, m_m, o_tok_m, m_real_m, cols, N, HEAD_DIM)
    b_rmax, b_logl = stats_m
    b_do = b_do.to(DDT)
    # [BLOCK_M, BLOCK_N]
    b_bias = _bias_tile(p_bias_h, o_m, o_n, m_m, m_n, N, EVEN)
    b_s = _logits(_dot(b_qs, tl.trans(b_kn_d), FULL_DOT), b_bias, o_reg_m, o_reg_n, m_n, mask_value, MASKED, MASK_N)
    # padded rows have dO = 0 and delta = 0, hence dS = 0; rows beyond the window have no softmax
    b_p = _probs(b_s, b_rmax, b_logl, m_m, N_ROWS % BLOCK_M != 0)
    b_dv = _dot(tl.trans(b_p.to(DDT)), b_do, FULL_DOT)
    b_dp = _dot(b_do, tl.trans(b_v), FULL_DOT)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dv, _dot(tl.trans(b_ds.to(DDT)), b_qs, FULL_DOT)


@triton.jit
def _window_attention_bwd_dkdv_kernel(
    QKV,
    QKV_BIAS,
    SCALE,
    POSITION_BIAS,
    DOUT,
    STATS,
    DELTA,
    DQKV,
    DPAD,
    stride_qkv_b,
    stride_qkv_t,
    stride_do_b,
    stride_do_t,
    stride_dqkv_b,
    stride_dqkv_t,
    H,
    W,
    HP,
    WP,
    NUM_WX,
    NUM_WINDOWS,
    SH,
    SW,
    RSH,
    RSW,
    C,
    NUM_HEADS,
    L,
    NUM_PAD,
    mask_value,
    WH: tl.constexpr,
    WW: tl.constexpr,
    N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHIFTED: tl.constexpr,
    PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FULL_DOT: tl.constexpr,
    WINDOW_SET: tl.constexpr = 0,
    M_TAIL: tl.constexpr = 0,
):
    """dk and dv for BLOCK_N key rows of one window and head, over the window's query rows in blocks of BLOCK_M
    (with M_TAIL > 0, a power of two, the last M_TAIL rows as a block of their own: `tiles.dkdv_query_tail`; no
    row masked). Every token is a key of exactly one window,
    so rows are stored, not accumulated; with a bias, padded key rows go to their own slot of DPAD
    (B, NUM_PAD, 2C: dk then dv), which the host sums into the k/v bias gradients. The (image, window) pairs are
    those of WINDOW_SET, as in the forward: on a shifted grid the windows off its border run without the shift
    mask, which adds 0 there (the scores are bitwise those of the kernels that add it)."""
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    i_pid, i_h = _bwd_prologue(WH, WW, N)  # the program's index on axis 0, its head
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    N_MAIN: tl.constexpr = N - M_TAIL  # the rows of the BLOCK_M blocks
    tl.static_assert((M_TAIL == 0) or (N_MAIN % BLOCK_M == 0 and M_TAIL < BLOCK_M))
    EVEN: tl.constexpr = (N_MAIN % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    # [BLOCK_N] key rows
    pair, o_n, m_n = _block_of(i_pid, NUM_N, BLOCK_N, N, NUM_WINDOWS, NUM_WX, WINDOW_SET)
    i_b, i_w, i_w2 = pair
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, QKV_BIAS + i_h * HEAD_DIM, stride_qkv_t, C)
    grads = (DOUT, stride_do_b, stride_do_t, STATS, DELTA, L, NUM_WINDOWS, NUM_HEADS)
    rows_n = _window_rows(o_n, i_w2, grid, layout, MASKED)
    o_tok_n, m_pad_n, o_reg_n = rows_n
    b_scale = tl.load(SCALE + i_h)
    # [BLOCK_N, BLOCK_D]
    b_kn, b_rk, b_v = _key_rows(proj, rows_n, m_n, cols, HAS_BIAS, CDT)
    b_v = b_v.to(DDT)
    b_kn_d = b_kn.to(DDT)
    b_dkn = tl.zeros([BLOCK_N, BLOCK_D], dtype=CDT)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    keys = (b_kn_d, b_v, o_n, m_n, o_reg_n)
    step = (keys, (i_b, i_w, i_h), i_w2, grid, proj, grads, cols, b_scale, p_bias_h, mask_value)
    flags: tl.constexpr = (N, HEAD_DIM, HAS_BIAS, MASKED, MASK_N, EVEN, FULL_DOT)
    for start_m in range(0, N_MAIN, BLOCK_M):
        b_dv_m, b_dkn_m = _dkdv_query_block(start_m, N_MAIN, BLOCK_M, step, layout, flags, CDT, DDT)
        b_dv += b_dv_m
        b_dkn += b_dkn_m
    if M_TAIL > 0:
        b_dv_t, b_dkn_t = _dkdv_query_block(N_MAIN, N, M_TAIL, step, layout, flags, CDT, DDT)
        b_dv += b_dv_t
        b_dkn += b_dkn_t
    b_dk = _l2_normalize_backward(b_kn, b_rk, b_dkn)

    m_real_n = m_n & ~m_pad_n
    p_dk = DQKV + i_b * stride_dqkv_b + o_tok_n[:, None] * stride_dqkv_t + C + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_dk, b_dk.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_n, m_d))
    tl.store(p_dk + C, b_dv.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_n, m_d))
    if HAS_BIAS:  # without a bias padded keys are constant zeros: nothing to learn there
        if PADDED:
            o_pad_n = _padding_index(o_n, i_w2, grid, layout)
            m_padded_n = m_n & m_pad_n
            p_dpad = DPAD + i_b * NUM_PAD * (2 * C) + o_pad_n[:, None] * (2 * C) + i_h * HEAD_DIM + o_d[None, :]
            tl.store(p_dpad, b_dk.to(DPAD.dtype.element_ty), mask=_tile_mask(m_padded_n, m_d))
            tl.store(p_dpad + C, b_dv.to(DPAD.dtype.element_ty), mask=_tile_mask(m_padded_n, m_d))


@triton.jit
def _window_attention_bwd_dbias_kernel(
    QKV,
    QKV_BIAS,
    SCALE,
    POSITION_BIAS,
    DOUT,
    STATS,
    DELTA,
    DBIAS,
    DSCALE,
    stride_qkv_b,
    stride_qkv_t,
    stride_do_b,
    stride_do_t,
    H,
    W,
    HP,
    WP,
    NUM_WX,
    NUM_WINDOWS,
    SH,
    SW,
    RSH,
    RSW,
    C,
    NUM_HEADS,
    L,
    NUM_BW,
    WINDOWS_PER_GROUP,
    mask_value,
    WH: tl.constexpr,
    WW: tl.constexpr,
    N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHIFTED: tl.constexpr,
    PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FULL_DOT: tl.constexpr,
    WINDOW_SET: tl.constexpr = 0,
):
    """Partial gradients of the (heads, N, N) bias table and of the scale, summed over one group of
    WINDOWS_PER_GROUP consecutive (image, window) pairs of WINDOW_SET (as in the statistics kernel) in a fixed
    order: DBIAS (groups, heads, N, N) and DSCALE (groups, heads, tiles). The host sums the groups, then the
    launches, so the reduction is deterministic."""
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    i_tile, i_h = _bwd_prologue(WH, WW, N)  # the program's index on axis 0, its head
    i_g = tl.program_id(2)
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_TN: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    NUM_TILES: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M * NUM_TN
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    MASK_M: tl.constexpr = N % BLOCK_M != 0
    grads = (DOUT, stride_do_b, stride_do_t, STATS, DELTA, L, NUM_WINDOWS, NUM_HEADS)
    # [BLOCK_M], [BLOCK_N]
    o_m = (i_tile // NUM_TN) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = (i_tile % NUM_TN) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = _in_window(o_m, N, BLOCK_M)
    m_n = _in_window(o_n, N, BLOCK_N)
    b_scale = tl.load(SCALE + i_h)
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    # [BLOCK_M, BLOCK_N]: the bias tile is the same for every window
    b_bias = _bias_tile(POSITION_BIAS + i_h * N * N, o_m, o_n, m_m, m_n, N, EVEN)
    b_dbias = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)
    b_dscale = tl.zeros([BLOCK_M], dtype=CDT)
    for i_bw in range(i_g * WINDOWS_PER_GROUP, tl.minimum((i_g + 1) * WINDOWS_PER_GROUP, NUM_BW)):
        i_b, i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)
        proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, p_bias, stride_qkv_t, C)
        rows_m = _window_rows(o_m, i_w2, grid, layout, MASKED)
        o_tok_m, m_pad_m, o_reg_m = rows_m
        _b_qn, _b_rq, b_qs = _query_rows(proj, rows_m, m_m, cols, b_scale, HAS_BIAS, CDT, DDT)
        rows_n = _window_rows(o_n, i_w2, grid, layout, MASKED)
        b_kn, _b_rk, b_v = _key_rows(proj, rows_n, m_n, cols, HAS_BIAS, CDT)  # [BLOCK_N, BLOCK_D]
        m_real_m = m_m & ~m_pad_m
        b_do, stats_m, b_delta = _load_query_grads(
            grads, (i_b, i_w, i_h), o_m, m_m, o_tok_m, m_real_m, cols, N, HEAD_DIM
        )
        b_rmax, b_logl = stats_m
        b_kn = b_kn.to(DDT)
        # [BLOCK_M, BLOCK_N]
        b_qk = _dot(b_qs, tl.trans(b_kn), FULL_DOT)  # the q.k the other backward kernels compute, bitwise
        b_s = _logits(b_qk, b_bias, o_reg_m, rows_n[2], m_n, mask_value, MASKED, MASK_N)
        b_p = _probs(b_s, b_rmax, b_logl, m_m, MASK_M)
        b_dp = _dot(b_do.to(DDT), tl.trans(b_v.to(DDT)), FULL_DOT)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dbias += b_ds
        # d scale = sum dS * cos(q, k); qs . kn = scale * cos
        b_dscale += tl.sum(b_ds * b_qk, axis=1)
    p_dbias = DBIAS + (i_g * NUM_HEADS + i_h) * N * N + o_m[:, None] * N + o_n[None, :]
    if EVEN:
        tl.store(p_dbias, b_dbias)
    else:
        tl.store(p_dbias, b_dbias, mask=m_m[:, None] & m_n[None, :])
    tl.store(DSCALE + (i_g * NUM_HEADS + i_h) * NUM_TILES + i_tile, tl.sum(b_dscale, axis=0) / b_scale)


@triton.jit
def _softmax_rows(b_s):
    """[BLOCK, BLOCK] P = exp(S - row max) / row sum of one whole window's logits b_s, in one program: P and
    the statistics come from the same scores, so a row whose softmax is one-hot in fp32 gets P exactly 1 and
    0 and delta = rowsum(P * dP) exactly that row's dP at the 1 (dS exactly 0 there, as in the reference)."""
    b_m = tl.max(b_s, axis=1)
    b_e = _exp(b_s - b_m[:, None])
    return b_e * (1.0 / tl.sum(b_e, axis=1))[:, None]


@triton.jit
def _window_attention_bwd_fused_kernel(
    QKV,
    QKV_BIAS,
    SCALE,
    POSITION_BIAS,
    DOUT,
    DQKV,
    DPAD,
    DBIAS,
    DSCALE,
    stride_qkv_b,
    stride_qkv_t,
    stride_do_b,
    stride_do_t,
    stride_dqkv_b,
    stride_dqkv_t,
    H,
    W,
    HP,
    WP,
    NUM_WX,
    NUM_WINDOWS,
    SH,
    SW,
    RSH,
    RSW,
    C,
    NUM_HEADS,
    NUM_PAD,
    NUM_BW,
    WINDOWS_PER_GROUP,
    mask_value,
    WH: tl.constexpr,
    WW: tl.constexpr,
    N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHIFTED: tl.constexpr,
    PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FULL_DOT: tl.constexpr,
    NEED_DQ: tl.constexpr,
    NEED_DKV: tl.constexpr,
    NEED_PAD: tl.constexpr,
    NEED_TABLE: tl.constexpr,
    WINDOW_SET: tl.constexpr = 0,
    PAD_TABLE: tl.constexpr = False,
):
    """The whole backward of small windows (N <= BLOCK = BLOCK_M = BLOCK_N: one block holds a window): program
    (group of WINDOWS_PER_GROUP consecutive (image, window) pairs, head) runs its windows in a fixed order.
    Per window: S = qs kn^T + bias (+ shift mask), P with its row statistics computed here (no statistics
    pass), dP = dO v^T, delta = rowsum(P * dP), dS = P (dP - delta), then dv = P^T dO, dqs = dS kn,
    dkn = dS^T qs (five matmuls) and the normalisation backward.
    NEED_DQ: store dq. NEED_DKV: dk and dv. NEED_PAD: the padded keys' dk and dv rows to DPAD (B, NUM_PAD, 2C),
    which the host sums into the k/v bias gradient. NEED_TABLE: the table gradient (dS summed over the group's
    windows in registers, stored once per group to DBIAS (groups, heads, N, N)) and the clamped scale's,
    sum_i qn_i . dqs_i (= sum_ij dS_ij cos_ij, from the dq rows: no extra q.k product), to DSCALE
    (groups, heads). The host sums the groups in a fixed order: no atomics, deterministic.
    The bias tile is the same for every window of the program; it is loaded per window, expected to hit
    L1/L2 after the first (an estimate until a GPU measures it). The (image, window) pairs are those of
    WINDOW_SET, as in the other backward kernels (the host splits unpadded grids only: `_fused_backward`).
    PAD_TABLE (a window that leaves its block partly empty, `tiles.fused_pads_table`): the table arrives padded to
    the block, (heads, BLOCK, BLOCK), its columns beyond the window -inf and its rows beyond it 0
    (`padded_table`), and DBIAS is (groups, heads, BLOCK, BLOCK): every tile row starts 16-byte aligned, the bias
    tile loads and the table gradient stores unmasked, and the keys beyond the window get P = 0 from the table
    instead of a select per score."""
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    i_g, i_h = _bwd_prologue(WH, WW, N)  # the program's index on axis 0, its head
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    tl.static_assert(BLOCK_M == BLOCK_N)  # one block holds the window, as queries and as keys
    BLOCK: tl.constexpr = BLOCK_M
    tl.static_assert(N <= BLOCK)
    tl.static_assert(BLOCK >= 16)
    tl.static_assert((BLOCK & (BLOCK - 1)) == 0)
    CDT: tl.constexpr = SCALE.dtype.element_ty  # compute dtype: fp32 (fp64 for fp64 inputs)
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty  # dot operand dtype
    TABLE_N: tl.constexpr = BLOCK if PAD_TABLE else N  # the table's rows and columns as it arrives
    EVEN: tl.constexpr = (N == BLOCK) or PAD_TABLE  # the bias tile and table gradient unmasked
    MASK_N: tl.constexpr = (N != BLOCK) and not PAD_TABLE  # keys beyond the window set to -inf here
    DQS: tl.constexpr = NEED_DQ or NEED_TABLE  # dqs = dS kn: dq, and the scale's gradient
    o_d, m_d = cols
    # [BLOCK]: the window's positions, as query rows and as key columns
    o_n = tl.arange(0, BLOCK)
    m_n = _in_window(o_n, N, BLOCK)
    b_scale = tl.load(SCALE + i_h)
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    b_dbias = tl.zeros([BLOCK, BLOCK], dtype=CDT)
    # [BLOCK]: per-row partial sums of the scale's gradient
    b_dscale = tl.zeros([BLOCK], dtype=CDT)
    for i_bw in range(i_g * WINDOWS_PER_GROUP, tl.minimum((i_g + 1) * WINDOWS_PER_GROUP, NUM_BW)):
        i_b, _i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)
        proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, p_bias, stride_qkv_t, C)
        rows = _window_rows(o_n, i_w2, grid, layout, MASKED)  # the window's positions, as query rows and keys
        o_tok, m_pad, o_reg = rows  # [BLOCK] token, padding flag, shift region
        # [BLOCK, BLOCK_D] normalised q (compute dtype); [BLOCK] norms; q * scale (DDT)
        b_qn, b_rq, b_qs = _query_rows(proj, rows, m_n, cols, b_scale, HAS_BIAS, CDT, DDT)
        m_real = m_n & ~m_pad  # rows with an output (and a gradient)
        # [BLOCK, BLOCK_D]
        b_kn, b_rk, b_v = _key_rows(proj, rows, m_n, cols, HAS_BIAS, CDT)
        b_v = b_v.to(DDT)
        b_kn_d = b_kn.to(DDT)
        b_do = _load_do(DOUT, stride_do_b, stride_do_t, i_b, i_h, o_tok, m_real, cols, HEAD_DIM).to(DDT)
        # [BLOCK, BLOCK]; rows beyond the window (N < BLOCK) have dO = 0, hence dS = 0 and no dv share
        b_bias = _bias_tile(POSITION_BIAS + i_h * TABLE_N * TABLE_N, o_n, o_n, m_n, m_n, TABLE_N, EVEN)
        b_s = _logits(_dot(b_qs, tl.trans(b_kn_d), FULL_DOT), b_bias, o_reg, o_reg, m_n, mask_value, MASKED, MASK_N)
        b_p = _softmax_rows(b_s)
        o_dst = i_b * stride_dqkv_b + o_tok[:, None] * stride_dqkv_t + i_h * HEAD_DIM + o_d[None, :]
        PAD_GRADS: tl.constexpr = NEED_PAD and HAS_BIAS and PADDED  # the padded keys' rows, for the k/v bias
        if PAD_GRADS:
            o_pad = _padding_index(o_n, i_w2, grid, layout)
            p_dpad = DPAD + i_b * NUM_PAD * (2 * C) + o_pad[:, None] * (2 * C) + i_h * HEAD_DIM + o_d[None, :]
        if NEED_DKV:
            # [BLOCK, BLOCK_D], stored at once (fewer live registers)
            b_dv = _dot(tl.trans(b_p.to(DDT)), b_do, FULL_DOT)
            tl.store(DQKV + o_dst + 2 * C, b_dv.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real, m_d))
            if PAD_GRADS:
                tl.store(p_dpad + C, b_dv.to(DPAD.dtype.element_ty), mask=_tile_mask(m_n & m_pad, m_d))
        b_dp = _dot(b_do, tl.trans(b_v), FULL_DOT)
        b_ds = b_p * (b_dp - tl.sum(b_p * b_dp, axis=1)[:, None])
        b_ds_d = b_ds.to(DDT)
        if DQS:
            # [BLOCK, BLOCK_D]: the gradient of q * scale
            b_dqs = _dot(b_ds_d, b_kn_d, FULL_DOT)
            if NEED_TABLE:
                b_dbias = b_dbias + b_ds  # [BLOCK, BLOCK]
                # d scale = sum_ij dS_ij cos_ij = sum_i qn_i . dqs_i
                b_dscale += tl.sum(b_qn * b_dqs, axis=1)
            if NEED_DQ:
                b_dq = _l2_normalize_backward(b_qn, b_rq, b_scale * b_dqs)
                tl.store(DQKV + o_dst, b_dq.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real, m_d))
        if NEED_DKV:
            # [BLOCK, BLOCK_D]
            b_dk = _l2_normalize_backward(b_kn, b_rk, _dot(tl.trans(b_ds_d), b_qs, FULL_DOT))
            tl.store(DQKV + o_dst + C, b_dk.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real, m_d))
            if PAD_GRADS:  # without a bias padded keys are constant zeros: nothing to learn there
                tl.store(p_dpad, b_dk.to(DPAD.dtype.element_ty), mask=_tile_mask(m_n & m_pad, m_d))
    if NEED_TABLE:
        p_dbias = DBIAS + (i_g * NUM_HEADS + i_h) * TABLE_N * TABLE_N + o_n[:, None] * TABLE_N + o_n[None, :]
        if EVEN:
            tl.store(p_dbias, b_dbias)
        else:
            tl.store(p_dbias, b_dbias, mask=m_n[:, None] & m_n[None, :])
        tl.store(DSCALE + i_g * NUM_HEADS + i_h, tl.sum(b_dscale, axis=0))


@triton.jit
def _window_attention_bwd_rows_kernel(
    QKV,
    QKV_BIAS,
    SCALE,
    POSITION_BIAS,
    DOUT,
    STATS,
    DELTA,
    DQKV,
    DBIAS,
    DSCALE,
    stride_qkv_b,
    stride_qkv_t,
    stride_do_b,
    stride_do_t,
    stride_dqkv_b,
    stride_dqkv_t,
    H,
    W,
    HP,
    WP,
    NUM_WX,
    NUM_WINDOWS,
    SH,
    SW,
    RSH,
    RSW,
    C,
    NUM_HEADS,
    L,
    NUM_BW,
    WINDOWS_PER_GROUP,
    mask_value,
    WH: tl.constexpr,
    WW: tl.constexpr,
    N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHIFTED: tl.constexpr,
    PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FULL_DOT: tl.constexpr,
    NEED_DQ: tl.constexpr,
    NEED_TABLE: tl.constexpr,
    WINDOW_SET: tl.constexpr = 0,
    BLOCK_T: tl.constexpr = 0,
):
    """The query side of the backward of windows whose whole key axis fits one tile (N <= BLOCK_N), or two
    (BLOCK_T > 0: keys BLOCK_N to N in a tail tile of BLOCK_T = N - BLOCK_N, N = 144 as 128 + 16): program
    (row block of BLOCK_M query rows, head, group of WINDOWS_PER_GROUP consecutive (image, window) pairs) holds
    its rows' scores against every key of the window, [BLOCK_M, BLOCK_N], and per window computes the softmax
    of whole rows (P and its statistics from the same scores, as the fused kernel: no statistics pass),
    dP = dO v^T, delta = rowsum(P * dP), dS = P (dP - delta) and from them, in one pass over the scores:
    - the softmax statistics (row max, log row sum) to STATS and delta to DELTA, for the dk/dv kernel;
    - dq (NEED_DQ), complete: its sum over keys is in the program;
    - (NEED_TABLE) the table gradient, dS summed over the group's windows in registers and stored once per
      group to DBIAS (groups, heads, N, N), and the clamped scale's, sum_ij dS_ij cos_ij, to DSCALE (groups,
      heads, row blocks); the host sums the groups in a fixed order: no atomics, deterministic.
    The bias tile is loaded once for the group (reloaded per window it cost 1-2% fewer instructions and assumed
    L1 hits). The (image, window) pairs are those of WINDOW_SET, as in the forward: a shifted grid takes two
    launches, the windows off the shifted border without the shift mask (INTERIOR_WINDOWS) and the border
    (BORDER_WINDOWS); the mask adds 0 off the border, so the scores are bitwise those of the kernels that add it.
    With a tail tile every step runs on both tiles: the row statistics and delta are sums (and a maximum) over
    the two, dq adds the tail's dS kn, the table gradient keeps a running sum per tile.
    dk and dv need every query of the window, hence the second kernel (`_window_attention_bwd_dkdv_kernel`, per
    key block, from these statistics): their sums over query rows span the programs of a window, and partial sums
    per row block would write them once per row block."""
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    i_blk, i_h = _bwd_prologue(WH, WW, N)  # the program's row block, its head
    i_g = tl.program_id(2)
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    TAIL: tl.constexpr = BLOCK_T > 0  # keys BLOCK_N to N in a second tile
    # one key tile holds the window, or the two hold it exactly (no masked key in either)
    tl.static_assert((N <= BLOCK_N) if not TAIL else (N == BLOCK_N + BLOCK_T))
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % (BLOCK_N + BLOCK_T)) == 0
    MASK_N: tl.constexpr = N != BLOCK_N + BLOCK_T
    tl.static_assert(EVEN or not TAIL)  # the tail's bias tile and table gradient are loaded and stored unmasked
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    # [BLOCK_M] query rows; [BLOCK_N] every key of the window, or with a tail tile the first BLOCK_N
    o_m = i_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = _in_window(o_m, N, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    KEYS: tl.constexpr = BLOCK_N if TAIL else N  # the window's keys in this tile
    m_n = _in_window(o_n, KEYS, BLOCK_N)
    b_scale = tl.load(SCALE + i_h)
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    # [BLOCK_M, BLOCK_N]: the bias tile, the same for every window: loaded once for the group
    b_bias = _bias_tile(POSITION_BIAS + i_h * N * N, o_m, o_n, m_m, m_n, N, EVEN)
    b_dbias = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)
    if TAIL:  # [BLOCK_T] the tail's keys, every one in the window; its bias tile and table-gradient sum
        o_t = BLOCK_N + tl.arange(0, BLOCK_T)
        m_t = _in_window(o_t, BLOCK_T, BLOCK_T)  # all true (a constant): N == BLOCK_N + BLOCK_T
        b_bias_t = _bias_tile(POSITION_BIAS + i_h * N * N, o_m, o_t, m_m, m_t, N, EVEN)
        b_dbias_t = tl.zeros([BLOCK_M, BLOCK_T], dtype=CDT)
    b_dscale = tl.zeros([BLOCK_M], dtype=CDT)
    for i_bw in range(i_g * WINDOWS_PER_GROUP, tl.minimum((i_g + 1) * WINDOWS_PER_GROUP, NUM_BW)):
        i_b, i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)
        proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, p_bias, stride_qkv_t, C)
        rows_m = _window_rows(o_m, i_w2, grid, layout, MASKED)
        o_tok_m, m_pad_m, o_reg_m = rows_m
        b_qn, b_rq, b_qs = _query_rows(proj, rows_m, m_m, cols, b_scale, HAS_BIAS, CDT, DDT)
        rows_n = _window_rows(o_n, i_w2, grid, layout, MASKED)
        # [BLOCK_N, BLOCK_D]: k normalised (dot dtype); v loaded where it is used (fewer live registers)
        o_tok_n, m_pad_n, o_reg_n = rows_n
        b_k = _load_rows(proj[0] + C, p_bias + C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS)
        b_kn, _b_rk = _l2_normalize(b_k, CDT)
        b_kn_d = b_kn.to(DDT)
        m_real_m = m_m & ~m_pad_m  # rows with an output (and a gradient)
        # [BLOCK_M, BLOCK_D]; zero for rows without an output: their dS is zero
        b_do = _load_do(DOUT, stride_do_b, stride_do_t, i_b, i_h, o_tok_m, m_real_m, cols, HEAD_DIM).to(DDT)
        b_qk = _dot(b_qs, tl.trans(b_kn_d), FULL_DOT)  # scale * cos
        b_s = _logits(b_qk, b_bias, o_reg_m, o_reg_n, m_n, mask_value, MASKED, MASK_N)
        b_rmax = tl.max(b_s, axis=1)
        if TAIL:  # the tail's keys: normalised k, scores; the row maximum over both tiles
            rows_t = _window_rows(o_t, i_w2, grid, layout, MASKED)
            o_tok_t, m_pad_t, o_reg_t = rows_t
            b_kt = _load_rows(proj[0] + C, p_bias + C, o_tok_t, m_t, m_pad_t, cols, stride_qkv_t, HAS_BIAS)
            b_kn_t, _b_rk_t = _l2_normalize(b_kt, CDT)
            b_kn_t_d = b_kn_t.to(DDT)
            b_qk_t = _dot(b_qs, tl.trans(b_kn_t_d), FULL_DOT)
            b_s_t = _logits(b_qk_t, b_bias_t, o_reg_m, o_reg_t, m_t, mask_value, MASKED, False)
            b_rmax = tl.maximum(b_rmax, tl.max(b_s_t, axis=1))
        b_e = _exp(b_s - b_rmax[:, None])
        b_l = tl.sum(b_e, axis=1)
        if TAIL:
            b_e_t = _exp(b_s_t - b_rmax[:, None])
            b_l += tl.sum(b_e_t, axis=1)
        # the statistics as the statistics kernel stores them: (row max, log row sum), delta per token (stored
        # as soon as known: fewer live registers)
        p_stats = STATS + _stats_offsets((i_b, i_w, i_h), o_m, N, NUM_WINDOWS, NUM_HEADS)
        tl.store(p_stats, b_rmax, mask=m_m)
        tl.store(p_stats + 1, tl.log(b_l), mask=m_m)
        b_p = b_e * (1.0 / b_l)[:, None]
        b_v = _load_rows(proj[0] + 2 * C, p_bias + 2 * C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS)
        b_dp = _dot(b_do, tl.trans(b_v.to(DDT)), FULL_DOT)
        b_delta = tl.sum(b_p * b_dp, axis=1)
        if TAIL:
            b_p_t = b_e_t * (1.0 / b_l)[:, None]
            b_vt = _load_rows(proj[0] + 2 * C, p_bias + 2 * C, o_tok_t, m_t, m_pad_t, cols, stride_qkv_t, HAS_BIAS)
            b_dp_t = _dot(b_do, tl.trans(b_vt.to(DDT)), FULL_DOT)
            b_delta += tl.sum(b_p_t * b_dp_t, axis=1)
        tl.store(DELTA + i_b * L * NUM_HEADS + o_tok_m * NUM_HEADS + i_h, b_delta, mask=m_real_m)
        b_ds = b_p * (b_dp - b_delta[:, None])
        if TAIL:
            b_ds_t = b_p_t * (b_dp_t - b_delta[:, None])
        if NEED_TABLE:
            b_dbias += b_ds
            # d scale = sum_ij dS_ij cos_ij, from dS and the scores in the compute dtype, as the table kernel (from
            # the dq rows, sum_i qn_i . dqs_i, dS enters rounded to the dot dtype, and the sum cancels:
            # sum_j dS_ij = 0; in fp16 that left up to 3x eager's error)
            b_dscale += tl.sum(b_ds * b_qk, axis=1)
            if TAIL:
                b_dbias_t += b_ds_t
                b_dscale += tl.sum(b_ds_t * b_qk_t, axis=1)
        if NEED_DQ:
            # [BLOCK_M, BLOCK_D]: the gradient of q * scale
            b_dqs = _dot(b_ds.to(DDT), b_kn_d, FULL_DOT)
            if TAIL:
                b_dqs += _dot(b_ds_t.to(DDT), b_kn_t_d, FULL_DOT)
            b_dq = _l2_normalize_backward(b_qn, b_rq, b_scale * b_dqs)
            p_dq = DQKV + i_b * stride_dqkv_b + o_tok_m[:, None] * stride_dqkv_t + i_h * HEAD_DIM + o_d[None, :]
            tl.store(p_dq, b_dq.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_m, m_d))
    if NEED_TABLE:
        p_dbias = DBIAS + (i_g * NUM_HEADS + i_h) * N * N + o_m[:, None] * N + o_n[None, :]
        if EVEN:
            tl.store(p_dbias, b_dbias)
        else:
            tl.store(p_dbias, b_dbias, mask=m_m[:, None] & m_n[None, :])
        if TAIL:
            # every tail key is in the window, and every row (EVEN: asserted above)
            tl.store(DBIAS + (i_g * NUM_HEADS + i_h) * N * N + o_m[:, None] * N + o_t[None, :], b_dbias_t)
        # qk = scale * cos
        tl.store(DSCALE + (i_g * NUM_HEADS + i_h) * NUM_M + i_blk, tl.sum(b_dscale, axis=0) / b_scale)


def _plus(total: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    """A launch's sum added to those of the launches before it (None before the first), in launch order."""
    return part if total is None else total + part


def _dkdv(dqkv, dpad, num_pad, strides, common, dims: LaunchDims, batch: int, m_tail: int = 0):
    """Launch the dk/dv kernel, one program per (key block of a window, head): on a shifted grid the windows off
    its border (no shift mask) and the border apart, as the forward; the last m_tail query rows as a block of
    their own (the rows path only: `tiles.dkdv_query_tail`)."""
    blocks = triton.cdiv(dims.N, common["BLOCK_N"])
    for window_set, windows in window_sets(dims):
        _window_attention_bwd_dkdv_kernel[(batch * windows * blocks, dims.NUM_HEADS)](
            DQKV=dqkv, DPAD=dpad, NUM_PAD=num_pad, WINDOW_SET=window_set, M_TAIL=m_tail, **strides, **common
        )


def _backward_common(
    grad_out, qkv, qkv_bias, logit_scale, position_bias, dims: LaunchDims, pad_order: str, mask_value: float
):
    """The backward's tile flags, the clamped scale and the launch arguments every unfused backward kernel
    shares, with STATS (B, heads, nW * N * 2: (row max, log row sum) pairs) and DELTA (B, H*W, heads)
    allocated for the first kernel to fill."""
    B, L, C3 = qkv.shape
    num_heads = dims.NUM_HEADS
    scale, table, bias = small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    flags = launch_flags(qkv, qkv_bias, pad_order, C3 // 3 // num_heads, dims, backward=True)
    stats = torch.empty((B, num_heads, dims.NUM_WINDOWS * dims.N * 2), device=qkv.device, dtype=scale.dtype)
    delta = torch.empty((B, L, num_heads), device=qkv.device, dtype=scale.dtype)
    common = dict(
        QKV=qkv,
        QKV_BIAS=bias,
        SCALE=scale,
        POSITION_BIAS=table,
        DOUT=grad_out,
        STATS=stats,
        DELTA=delta,
        stride_qkv_b=qkv.stride(0),
        stride_qkv_t=qkv.stride(1),
        stride_do_b=grad_out.stride(0),
        stride_do_t=grad_out.stride(1),
        L=L,
        mask_value=mask_value,
        **dims._asdict(),
        **flags,
    )
    return flags, scale, common


def _backward_statistics(
    grad_out, qkv, qkv_bias, logit_scale, position_bias, dims: LaunchDims, pad_order: str, mask_value: float
):
    """Run the first of the four backward kernels. Returns `_backward_common`'s flags, scale and arguments,
    STATS and DELTA filled."""
    flags, scale, common = _backward_common(
        grad_out, qkv, qkv_bias, logit_scale, position_bias, dims, pad_order, mask_value
    )
    if qkv.shape[0] > 0:
        # every token is the query of exactly one window row: each delta is written once; on a shifted grid the
        # windows off its border (no shift mask) and the border apart, as the forward
        blocks = triton.cdiv(dims.N, flags["BLOCK_M"])
        for window_set, windows in window_sets(dims):
            grid = (qkv.shape[0] * windows * blocks, dims.NUM_HEADS)
            _window_attention_bwd_stats_kernel[grid](WINDOW_SET=window_set, **common)
    return flags, scale, common


def padded_table(table: torch.Tensor, block: int) -> torch.Tensor:
    """A (heads, N, N) table as the fused kernel reads it with PAD_TABLE: (heads, block, block), the window's rows
    -inf beyond column N (a key outside the window gets P = 0) and the rows beyond N 0 (a query row outside the
    window keeps a finite softmax; its dO is 0, hence its dS)."""
    n = table.shape[-1]
    return F.pad(F.pad(table, (0, block - n), value=float("-inf")), (0, 0, 0, block - n))


def _fused_backward(
    grad_out,
    qkv,
    qkv_bias,
    logit_scale,
    position_bias,
    dims: LaunchDims,
    pad_order: str,
    mask_value: float,
    need_qkv,
    need_bias,
    need_table_grads,
):
    """Launch the fused kernel. Returns (dqkv or None, dpad, d_table or None, d_scale or None) in the compute
    dtype (dqkv in the projection's)."""
    B, _L, C3 = qkv.shape
    num_heads = dims.NUM_HEADS
    head_dim = C3 // 3 // num_heads
    scale, table, bias = small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads)
    cdt = scale.dtype
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    flags = launch_flags(qkv, qkv_bias, pad_order, head_dim, dims, backward=True)
    # one block per window; num_stages 1: no software pipelining of the window loop (prefetching the next
    # window's rows costs registers: spills on sm_80)
    block = fused_block(dims.N)
    num_warps = fused_num_warps(dims.N, qkv.dtype)
    flags.update(
        BLOCK_M=block,
        BLOCK_N=block,
        num_warps=num_warps,
        num_stages=1,
        maxnreg=program_register_budget(num_warps, flags["maxnreg"]),
    )
    num_pad = dims.num_pad
    pad_grads = need_bias and qkv_bias is not None and num_pad > 0
    need_dkv = need_qkv or pad_grads
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format) if need_dkv else None
    dpad = torch.empty((B, num_pad, 2 * (C3 // 3)) if pad_grads else (1,), device=qkv.device, dtype=cdt)
    if B == 0:
        if dqkv is not None:
            dqkv.zero_()
        d_table = torch.zeros_like(position_bias, dtype=cdt) if need_table_grads else None
        return dqkv, dpad, d_table, (torch.zeros_like(scale) if need_table_grads else None)
    out = dqkv if dqkv is not None else qkv  # never written without NEED_DQ / NEED_DKV
    pad_table = fused_pads_table(dims.N, qkv.dtype)
    side = block if pad_table else dims.N  # the table's (and its partial sums') rows and columns
    if pad_table:
        table = padded_table(table, block)
    d_table = d_scale = None
    # a shifted grid: the windows off its border (no shift mask) and the border apart, as the forward; a padded
    # one in one launch (its launch off the border spills 48 B on sm_80 with Triton 3.6; the border's does not)
    sets = [(ALL_WINDOWS, dims.NUM_WINDOWS)] if flags["PADDED"] else window_sets(dims)
    for window_set, windows in sets:
        pairs = B * windows
        per_group, groups = window_groups(B * dims.NUM_WINDOWS, pairs, num_heads, FUSED_PROGRAMS)
        d_table_parts = torch.empty(
            (groups, num_heads, side, side) if need_table_grads else (1,), device=qkv.device, dtype=cdt
        )
        d_scale_parts = torch.empty((groups, num_heads) if need_table_grads else (1,), device=qkv.device, dtype=cdt)
        _window_attention_bwd_fused_kernel[(groups, num_heads)](
            QKV=qkv,
            QKV_BIAS=bias,
            SCALE=scale,
            POSITION_BIAS=table,
            DOUT=grad_out,
            DQKV=out,
            DPAD=dpad,
            DBIAS=d_table_parts,
            DSCALE=d_scale_parts,
            stride_qkv_b=qkv.stride(0),
            stride_qkv_t=qkv.stride(1),
            stride_do_b=grad_out.stride(0),
            stride_do_t=grad_out.stride(1),
            stride_dqkv_b=out.stride(0),
            stride_dqkv_t=out.stride(1),
            NUM_PAD=num_pad,
            NUM_BW=pairs,
            WINDOWS_PER_GROUP=per_group,
            mask_value=mask_value,
            NEED_DQ=need_qkv,
            NEED_DKV=need_dkv,
            NEED_PAD=pad_grads,
            NEED_TABLE=need_table_grads,
            WINDOW_SET=window_set,
            PAD_TABLE=pad_table,
            **dims._asdict(),
            **flags,
        )
        if need_table_grads:
            # the groups, then the launches, summed in a fixed order (no atomics): deterministic
            d_table = _plus(d_table, d_table_parts[:, :, : dims.N, : dims.N].sum(0))
            d_scale = _plus(d_scale, d_scale_parts.sum(0))
    return dqkv, dpad, d_table, d_scale


def window_attention_triton_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    grid_size: Sequence[int],
    num_heads: int,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    pad_order: str,
    mask_value: float,
    *,
    need_qkv: bool = True,
    need_bias: bool = True,
    need_table_grads: bool = True,
):
    """Gradients of the fused op: (d qkv, d qkv_bias, d logit_scale, d position_bias), each None when not
    asked for (`need_qkv`, `need_bias`, `need_table_grads` for the scale and the table together) or, for the
    bias, when there is none. A gradient not asked for is neither computed nor allocated. The geometry is the
    custom op's plain values, as `window_attention_triton_forward` takes them.

    P is recomputed (nothing N x N was stored). fp16/bf16 windows of 64 tokens or at most 32 (heads of at most
    FUSED_MAX_BLOCK_D channels), of 49 at head_dim 32 with Triton 3.8 or later, and fp32 windows of 64 tokens, or
    of 49 on a grid the windows divide (its table padded to the block: `padded_table`), at head_dim 32 and 16
    (tiles.fused_backward_applies):
    one kernel per (group of windows, head) computes everything of a window in one block
    (`_window_attention_bwd_fused_kernel`). fp16/bf16 windows of 129 to 256 tokens (tiles.rows_backward_applies):
    the rows kernel (statistics, dq, the table and scale gradients) then the dk/dv kernel. Otherwise: the softmax
    statistics of every window row and delta = rowsum(P * dP) per query row, in token layout; dq per query
    block (without `need_qkv` not run); dk/dv per key block (padded keys to a per-position buffer, summed into
    the bias gradient); the table and scale gradients per bias tile over groups of windows (without
    `need_table_grads` not run). Partial sums over groups of windows are summed on the host in a fixed order:
    no atomics, every reduction deterministic.
    """
    B, _L, C3 = qkv.shape
    dims = launch_dims(qkv, grid_size, num_heads, window_size, shift_size, pad_order)
    need_bias = need_bias and qkv_bias is not None
    head_dim = C3 // 3 // num_heads
    if fused_backward_applies(dims.N, head_dim, qkv.dtype, dims.num_pad > 0):
        run = _fused_backward
    elif rows_backward_applies(dims.N, head_dim, qkv.dtype):
        run = _rows_backward
    else:
        run = _unfused_backward
    dqkv, dpad, d_table, d_scale = run(
        grad_out,
        qkv,
        qkv_bias,
        logit_scale,
        position_bias,
        dims,
        pad_order,
        mask_value,
        need_qkv,
        need_bias,
        need_table_grads,
    )
    cdt = dpad.dtype
    num_pad = dims.num_pad
    d_logit_scale = None
    if need_table_grads:
        # d exp(min(x, log 100)) / dx = exp(x) below the bound and 0 above it; at exactly the bound, what the
        # installed torch.clamp passes (the reference's rule), compared in the logit scale's own dtype as the
        # reference's clamp does
        x = logit_scale.detach().reshape(num_heads)
        scale = torch.clamp(x.to(cdt), max=LOGIT_SCALE_MAX).exp()
        bound = torch.tensor(LOGIT_SCALE_MAX, dtype=x.dtype, device=x.device)
        inside = ((x <= bound) if clamp_passes_gradient_at_bound() else (x < bound)).to(cdt)
        d_logit_scale = (d_scale * scale * inside).reshape(logit_scale.shape).to(logit_scale.dtype)
        d_table = d_table.to(position_bias.dtype)
    d_bias = None
    if need_bias and qkv_bias is not None:  # need_bias implies a bias (set above); the test narrows its type
        d_bias = torch.zeros(C3, device=qkv.device, dtype=cdt)  # the q part: padded queries have no output
        if num_pad > 0 and B > 0:
            d_bias[C3 // 3 :] = dpad.sum((0, 1))
        d_bias = d_bias.to(qkv_bias.dtype)
    return (dqkv if need_qkv else None), d_bias, d_logit_scale, (d_table if need_table_grads else None)


def _unfused_backward(
    grad_out,
    qkv,
    qkv_bias,
    logit_scale,
    position_bias,
    dims: LaunchDims,
    pad_order: str,
    mask_value: float,
    need_qkv,
    need_bias,
    need_table_grads,
):
    """The four kernels (windows beyond the fused and the rows kernels'). Returns (dqkv or None, dpad, d_table or None,
    d_scale or None) as `_fused_backward`."""
    B, _L, C3 = qkv.shape
    num_heads = dims.NUM_HEADS
    flags, scale, common = _backward_statistics(
        grad_out, qkv, qkv_bias, logit_scale, position_bias, dims, pad_order, mask_value
    )
    cdt = scale.dtype
    num_pad = dims.num_pad
    # dk/dv also carry the k/v bias gradient (padded keys); dqkv is then scratch if the activation's is not asked
    run_dkdv = need_qkv or (need_bias and num_pad > 0)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format) if run_dkdv else None
    # every padded position is a key of exactly one window: each slot is written once per head, none is left
    pad_grads = qkv_bias is not None and num_pad > 0
    dpad = torch.empty((B, num_pad, 2 * (C3 // 3)) if pad_grads else (1,), device=qkv.device, dtype=cdt)
    d_table = d_scale = None
    if B > 0:
        if dqkv is not None:  # run_dkdv: dqkv is allocated exactly then
            strides = dict(stride_dqkv_b=dqkv.stride(0), stride_dqkv_t=dqkv.stride(1))
            if need_qkv:
                blocks = triton.cdiv(dims.N, flags["BLOCK_M"])
                for window_set, windows in window_sets(dims):
                    _window_attention_bwd_dq_kernel[(B * windows * blocks, num_heads)](
                        DQKV=dqkv, WINDOW_SET=window_set, **strides, **common
                    )
            _dkdv(dqkv, dpad, num_pad, strides, common, dims, B)
        if need_table_grads:
            block_m, block_n, table_warps = table_kernel_tiles(
                dims.N, flags["BLOCK_M"], flags["BLOCK_N"], common["num_warps"], device_arch(qkv)
            )
            num_tiles = triton.cdiv(dims.N, block_m) * triton.cdiv(dims.N, block_n)
            table_launch = {**common, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": table_warps}
            for window_set, windows in window_sets(dims):  # as the statistics kernel
                pairs = B * windows
                # enough groups of windows to fill a GPU, each group a fixed range
                per_group, groups = window_groups(B * dims.NUM_WINDOWS, pairs, num_tiles * num_heads, TABLE_PROGRAMS)
                d_table_parts = torch.empty((groups, num_heads, dims.N, dims.N), device=qkv.device, dtype=cdt)
                d_scale_parts = torch.empty((groups, num_heads, num_tiles), device=qkv.device, dtype=cdt)
                _window_attention_bwd_dbias_kernel[(num_tiles, num_heads, groups)](
                    DBIAS=d_table_parts,
                    DSCALE=d_scale_parts,
                    NUM_BW=pairs,
                    WINDOWS_PER_GROUP=per_group,
                    WINDOW_SET=window_set,
                    **table_launch,
                )
                # the groups, then the launches, summed in a fixed order (no atomics): deterministic
                d_table = _plus(d_table, d_table_parts.sum(0))
                d_scale = _plus(d_scale, d_scale_parts.sum((0, 2)))
    elif dqkv is not None:
        dqkv.zero_()
    if need_table_grads and d_table is None:  # empty batch
        d_table = torch.zeros_like(position_bias, dtype=cdt)
        d_scale = torch.zeros_like(scale)
    return dqkv, dpad, d_table, d_scale


def _rows_backward(
    grad_out,
    qkv,
    qkv_bias,
    logit_scale,
    position_bias,
    dims: LaunchDims,
    pad_order: str,
    mask_value: float,
    need_qkv,
    need_bias,
    need_table_grads,
):
    """The rows kernel then the dk/dv kernel (`tiles.rows_backward_applies`). Returns (dqkv or None, dpad,
    d_table or None, d_scale or None) as `_fused_backward`."""
    B, _L, C3 = qkv.shape
    num_heads = dims.NUM_HEADS
    flags, scale, common = _backward_common(
        grad_out, qkv, qkv_bias, logit_scale, position_bias, dims, pad_order, mask_value
    )
    cdt = scale.dtype
    num_pad = dims.num_pad
    run_dkdv = need_qkv or (need_bias and num_pad > 0)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format) if run_dkdv else None
    pad_grads = qkv_bias is not None and num_pad > 0
    dpad = torch.empty((B, num_pad, 2 * (C3 // 3)) if pad_grads else (1,), device=qkv.device, dtype=cdt)
    if B == 0:
        if dqkv is not None:
            dqkv.zero_()
        if not need_table_grads:
            return dqkv, dpad, None, None
        return dqkv, dpad, torch.zeros_like(position_bias, dtype=cdt), torch.zeros_like(scale)
    block_m, block_n, num_warps, block_t = rows_tiles(dims.N, C3 // 3 // num_heads, flags["PADDED"])
    num_m = triton.cdiv(dims.N, block_m)
    out = dqkv if dqkv is not None else qkv  # never written without NEED_DQ
    strides = dict(stride_dqkv_b=out.stride(0), stride_dqkv_t=out.stride(1))
    # one stage: the window loop is not software-pipelined (prefetching the next window's rows costs registers)
    # its own register budget too: not the dk/dv tiles' cap or a tuned record's
    rows_launch = {
        **common,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_T": block_t,
        "BLOCK_D": rows_channel_block(C3 // 3 // num_heads),
        "num_warps": num_warps,
        "num_stages": 1,
        "maxnreg": MAXNREG,
    }
    d_table = d_scale = None
    # a shifted grid: the windows off its border (no shift mask) and the border apart, as the forward
    for window_set, windows in window_sets(dims):
        pairs = B * windows
        # groups of windows per (row block, head): about FUSED_PROGRAMS programs, each group a fixed range
        per_group, groups = window_groups(B * dims.NUM_WINDOWS, pairs, num_m * num_heads, FUSED_PROGRAMS)
        shape = (groups, num_heads, dims.N, dims.N) if need_table_grads else (1,)
        d_table_parts = torch.empty(shape, device=qkv.device, dtype=cdt)
        d_scale_parts = torch.empty(
            (groups, num_heads, num_m) if need_table_grads else (1,), device=qkv.device, dtype=cdt
        )
        _window_attention_bwd_rows_kernel[(num_m, num_heads, groups)](
            DQKV=out,
            DBIAS=d_table_parts,
            DSCALE=d_scale_parts,
            NUM_BW=pairs,
            WINDOWS_PER_GROUP=per_group,
            NEED_DQ=need_qkv,
            NEED_TABLE=need_table_grads,
            WINDOW_SET=window_set,
            **strides,
            **rows_launch,
        )
        if need_table_grads:
            # the groups, then the launches, summed in a fixed order (no atomics): deterministic
            d_table = _plus(d_table, d_table_parts.sum(0))
            d_scale = _plus(d_scale, d_scale_parts.sum((0, 2)))
    if dqkv is not None:
        # its last query rows as a block of their own where they are one (tiles.dkdv_query_tail); the four
        # kernels share one tile shape instead
        tail = dkdv_query_tail(dims.N, common["HEAD_DIM"], qkv.dtype, common["BLOCK_M"])
        _dkdv(dqkv, dpad, num_pad, strides, common, dims, B, tail)
    return dqkv, dpad, d_table, d_scale


@functools.cache
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
