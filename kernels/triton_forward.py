"""Fused Swin V2 window attention in Triton: the forward of `window_attention_reference` (one kernel; a shifted grid
runs it as two launches, the windows off the shifted border and the border windows) and its launcher. The
helpers it shares with the backward kernels are in triton_common.py, its tiles in tiles.py, the launch
integers and flags in launch.py; the custom ops over forward and backward are in op.py.

Memory traffic. The eager chain reads and writes the whole activation at every step (pad, roll, partition,
normalise, scores, bias, mask, softmax, product, reverse, roll back, crop). This kernel reads each q/k/v
element of the projection once per query block that needs it, reads the (heads, N, N) bias table in the
dtype it arrives in (a 16-bit model's table as it is; autocast's fp32 table as it is), each program its rows
of it once for several windows (WINDOWS_PER_PROGRAM; see the kernel for how, and what is an estimate), and
writes the output; nothing of size N x N reaches memory. The backward recomputes the softmax from q/k/v.

One program handles BLOCK_M query rows of WINDOWS_PER_PROGRAM consecutive windows (of one image or the next),
for one head, or, in whole-window programs (WHOLE_WINDOW: windows 12 and 16 on sm_90, `tiles.forward_window_tiles`),
every query row of its windows, with the window's keys loaded and normalised once and each row's scores whole (no
online softmax); for each window:
  1. Each row's source token comes from index arithmetic on the load: window -> shifted padded grid ->
     reverse shift -> un-padded token, in either padding order (transformers pads then rolls; timm rolls
     then pads). Rows that land on padding read the projection of a zero token: the q/k/v bias.
  2. q and k rows are L2-normalised in fp32 (x / max(||x||, 1e-12)); q is multiplied by the clamped
     logit scale (computed on the host: exp(min(logit_scale, log 100))).
  3. Key blocks of the same window stream through an online softmax (whole-window programs: the window's keys
     are all loaded, so each row's scores are whole): scores + bias tile + shift mask (the reference's finite
     value, from each token's shift region, computed here where one key block holds the window; whole-window
     programs, and row-block programs over several key blocks, read it added to the table, one copy per kind of
     border window: `shift_masked_tables`, `mask_in_table`).
  4. Output rows are stored at the token they came from (window reverse, reverse shift and crop are the
     store's addressing); padded rows are not stored.

What is compile-time. The window's height, width and N, whether it is shifted and whether the grid is
padded (then the padding order and whether there is a q/k/v bias) are constexprs: a model has a handful of
windows, hence a handful of specialisations, and the per-score work has no `//` or `%` on runtime values
(the roll is undone with one conditional subtraction), no shift mask in unshifted blocks, no key masking
when the key tile divides N, no padding checks without padding. On a shifted grid the forward runs the
windows off the shifted border (most of them) as a launch of its own without the shift mask, and the border
windows apart. The forward takes exp(S - m) as 2^(S log2 e - m log2 e), one multiply-add per score, and
compiled kernels take 2^x as the hardware's ex2.
The cost of each kernel, counted from its SASS, is `python -m tools.compile_check --cost` (tools/cost.py;
the committed table: benchmarks/results/cost_report.txt).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .launch import LaunchDims, clamped_scale, compute_dtype, launch_dims, launch_flags, padding_token
from .tiles import MAX_HEAD_DIM, forward_query_tail, head_dim_supported
from .triton_common import (
    LOG2E,
    _channels,
    _dot,
    _exp2,
    _in_window,
    _l2_normalize,
    _load_rows,
    _logits,
    _row_norm,
    _tile_mask,
    _widen,
    _window_of,
    _window_rows,
)

__all__ = [
    "ALL_WINDOWS",
    "BORDER_WINDOWS",
    "FORWARD_WINDOWS_PER_PROGRAM",
    "INTERIOR_WINDOWS",
    "window_attention_triton_forward",
    "window_sets",
    "windows_per_program",
]


@triton.jit
def _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET: tl.constexpr):
    """(image, window, (window row, column)) of the i_bw-th (image, window) pair of a launch over WINDOW_SET:
    ALL_WINDOWS every window of the images; INTERIOR_WINDOWS those off the shifted border (not in the last row
    or column: no shift mask there); BORDER_WINDOWS the last row, then the last column."""
    if WINDOW_SET == 0:
        return _window_of(i_bw, NUM_WINDOWS, NUM_WX)
    NUM_WY = NUM_WINDOWS // NUM_WX
    if WINDOW_SET == 1:
        per_image = (NUM_WY - 1) * (NUM_WX - 1)
        i_b, i_k = (i_bw // per_image).to(tl.int64), i_bw % per_image
        i_wy, i_wx = i_k // (NUM_WX - 1), i_k % (NUM_WX - 1)
    else:
        per_image = NUM_WY + NUM_WX - 1
        i_b, i_k = (i_bw // per_image).to(tl.int64), i_bw % per_image
        in_last_row = (i_k < NUM_WX).to(tl.int32)
        i_wy = in_last_row * (NUM_WY - 1) + (1 - in_last_row) * (i_k - NUM_WX)
        i_wx = in_last_row * i_k + (1 - in_last_row) * (NUM_WX - 1)
    return i_b, i_wy * NUM_WX + i_wx, (i_wy, i_wx)


@triton.jit
def _online_softmax_step_scaled(b_s, b_m):
    """The forward's online softmax step on natural logits b_s, with the exponentials taken in base 2 as one
    multiply-add per score, 2^(S log2 e - m log2 e): the new row max, the rescaling factor, 2^(...)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_m_scaled = b_m_new * LOG2E
    return b_m_new, _exp2(b_m * LOG2E - b_m_scaled), _exp2(b_s * LOG2E - b_m_scaled[:, None])


@triton.jit
def _stream_rows(P_QKV, P_BIAS, o_tok, m_rows, m_pad, cols, stride_t, HAS_BIAS: tl.constexpr):
    """[ROWS, BLOCK_D] projection rows as `_load_rows` reads them, marked first to leave L1 (evict_first):
    the forward reads each k/v row once per window, and the bias tiles it re-reads should stay."""
    o_d, m_d = cols
    p_rows = P_QKV + o_tok[:, None] * stride_t + o_d[None, :]
    if HAS_BIAS:
        p_rows = tl.where(m_pad[:, None], P_BIAS + o_d[None, :], p_rows)
        return tl.load(p_rows, mask=_tile_mask(m_rows, m_d), other=0.0, eviction_policy="evict_first")
    # [ROWS, BLOCK_D]
    return tl.load(p_rows, mask=_tile_mask(m_rows & ~m_pad, m_d), other=0.0, eviction_policy="evict_first")


@triton.jit
def _fwd_bias_tile(p_bias_m, o_n, m_m, m_n, EVEN: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile of one head's position-bias table at key columns o_n, from the rows' pointers
    p_bias_m [BLOCK_M, 1], in the table's dtype, marked to stay in L1 (evict_last): the program's next window
    reads the same tile (with MASK_IN_TABLE, the same where it is of the same kind)."""
    if EVEN:
        return tl.load(p_bias_m + o_n[None, :], eviction_policy="evict_last")
    return tl.load(p_bias_m + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0.0, eviction_policy="evict_last")


@triton.jit
def _fwd_window_scores(rows, b_kn, o_n, m_n, MASK_N: tl.constexpr, EVEN, FULL_DOT: tl.constexpr):
    """[ROWS, BLOCK] natural logits of a whole-window program's query rows against the keys o_n (normalised k
    b_kn): the scaled dot plus the bias tile (a border window's shift mask included: the host added it to the
    table). `rows` = (q scaled, the table's row pointers, the row mask)."""
    b_qs, p_table_m, m_m = rows
    b_qk = _dot(b_qs, tl.trans(b_kn), FULL_DOT)
    b_s = b_qk + _widen(_fwd_bias_tile(p_table_m, o_n, m_m, m_n, EVEN), b_qk.dtype)
    if MASK_N:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    return b_s


@triton.jit
def _head_table(POSITION_BIAS, i_h, i_w2, NUM_WINDOWS, NUM_WX, NUM_HEADS, N: tl.constexpr, MASK_IN_TABLE: tl.constexpr):
    """The head's (N, N) table for the window at i_w2: with MASK_IN_TABLE, the host's table with the shift mask of
    the window's kind (`shift_masked_tables`: a window in the last row 0, the last column 1, the corner 2)."""
    if MASK_IN_TABLE:
        i_wy, i_wx = i_w2
        last_row, last_column = i_wy == NUM_WINDOWS // NUM_WX - 1, i_wx == NUM_WX - 1
        kind = last_row.to(tl.int32) + 2 * last_column.to(tl.int32) - 1
        return POSITION_BIAS + (kind * NUM_HEADS + i_h) * N * N
    return POSITION_BIAS + i_h * N * N


@triton.jit
def _fwd_window_keys(
    START: tl.constexpr,
    WIDTH: tl.constexpr,
    N: tl.constexpr,
    key_rows,
    cols,
    layout: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CDT: tl.constexpr,
    DDT: tl.constexpr,
):
    """(k normalised, v) [WIDTH, BLOCK_D] of keys START to START + WIDTH of a whole-window program's window (those
    from N on masked: zeros), in the dot dtype. `key_rows` = (the image's projection and the q/k/v bias at the
    head's q channels, C, the token stride, the window's (row, column), `grid`)."""
    p_qkv, p_bias, C, stride_t, i_w2, grid = key_rows
    o_n = START + tl.arange(0, WIDTH)
    if START + WIDTH <= N:
        m_n = _in_window(o_n, WIDTH, WIDTH)  # none masked: a constant
    else:
        m_n = _in_window(o_n, N, WIDTH)
    o_tok, m_pad, _o_reg = _window_rows(o_n, i_w2, grid, layout, False)
    b_k = _stream_rows(p_qkv + C, p_bias + C, o_tok, m_n, m_pad, cols, stride_t, HAS_BIAS)
    b_v = _stream_rows(p_qkv + 2 * C, p_bias + 2 * C, o_tok, m_n, m_pad, cols, stride_t, HAS_BIAS)
    return _l2_normalize(b_k, CDT)[0].to(DDT), b_v.to(DDT)


@triton.jit
def _fwd_window_rows(
    start_m,
    ROWS: tl.constexpr,
    N_ROWS: tl.constexpr,
    win,
    keys,
    cols,
    layout: tl.constexpr,
    flags: tl.constexpr,
    CDT: tl.constexpr,
    DDT: tl.constexpr,
):
    """The output of query rows start_m to start_m + ROWS of one window (rows from N_ROWS on masked out) in a
    whole-window program (the kernel's WHOLE_WINDOW): the window's keys are all in `keys`, so each row's scores are
    whole, one pass, no online rescaling (but one step where the tail joins the tile's, MERGE_TAIL). `win` = (the
    image's projection and the q/k/v bias at the head's q channels, the token stride, the window's (row, column),
    `grid`, the clamped logit scale, the head's table (the shift mask added for a border window), the image's
    output at the head, the output's token stride); `keys` = (k normalised, v, of the BLOCK_N-key tile; the same
    of the BLOCK_T-key tail, or the first two again without one), in the dot dtype; `flags` = the kernel's
    compile-time (N, BLOCK_N, BLOCK_T, HAS_BIAS, FULL_DOT) (a constexpr tuple holds no dtype; the tile widths are
    read from it as annotated constexprs, which tl.arange needs)."""
    p_qkv, p_bias, stride_t, i_w2, grid, b_scale, p_table, p_out, stride_out_t = win
    b_kn, b_v, b_kt, b_vt = keys
    N, _BLOCK_N, _BLOCK_T, HAS_BIAS, FULL_DOT = flags
    BLOCK_N: tl.constexpr = flags[1]
    BLOCK_T: tl.constexpr = flags[2]
    TAIL: tl.constexpr = BLOCK_T > 0  # keys BLOCK_N to N in a tile of their own: no key masked
    # a tail as wide as the tile (N = 256: 2 x 128 keys) joins by an online-softmax step after the tile's scores are
    # done with: whole rows of 256 fp32 scores and their exponentials do not fit beside the keys' registers
    MERGE_TAIL: tl.constexpr = BLOCK_T == BLOCK_N
    MASK_N: tl.constexpr = (N < BLOCK_N) and not TAIL
    EVEN_M: tl.constexpr = N_ROWS % ROWS == 0  # no row masked
    o_d, m_d = cols
    # [ROWS]
    o_m = start_m + tl.arange(0, ROWS)
    m_m = _in_window(o_m, N_ROWS, ROWS)
    o_tok_m, m_pad_m, _o_reg_m = _window_rows(o_m, i_w2, grid, layout, False)
    b_q = _widen(_load_rows(p_qkv, p_bias, o_tok_m, m_m, m_pad_m, cols, stride_t, HAS_BIAS), CDT)
    b_qs = (b_q * (b_scale / _row_norm(b_q))[:, None]).to(DDT)
    rows = (b_qs, p_table + o_m[:, None] * N, m_m)
    # [ROWS, BLOCK_N]
    o_n = tl.arange(0, BLOCK_N)
    b_s = _fwd_window_scores(rows, b_kn, o_n, _in_window(o_n, N, BLOCK_N), MASK_N, EVEN_M and not MASK_N, FULL_DOT)
    b_max = tl.max(b_s, axis=1)
    if TAIL:
        # [ROWS, BLOCK_T]
        o_t = BLOCK_N + tl.arange(0, BLOCK_T)
        m_t = _in_window(o_t, BLOCK_T, BLOCK_T)
    if TAIL and not MERGE_TAIL:
        b_st = _fwd_window_scores(rows, b_kt, o_t, m_t, False, EVEN_M, FULL_DOT)
        b_max = tl.maximum(b_max, tl.max(b_st, axis=1))
    b_mx = b_max * LOG2E
    b_p = _exp2(b_s * LOG2E - b_mx[:, None])
    b_l = tl.sum(b_p, axis=1)
    b_acc = _dot(b_p.to(DDT), b_v, FULL_DOT)
    if MERGE_TAIL:  # the tail's scores once the tile's are done with: one online-softmax step
        b_st = _fwd_window_scores(rows, b_kt, o_t, m_t, False, EVEN_M, FULL_DOT)
        b_max, b_alpha, b_pt = _online_softmax_step_scaled(b_st, b_max)
        b_l = b_l * b_alpha + tl.sum(b_pt, axis=1)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_pt.to(DDT), b_vt, FULL_DOT)
    elif TAIL:
        b_pt = _exp2(b_st * LOG2E - b_mx[:, None])
        b_l += tl.sum(b_pt, axis=1)
        b_acc += _dot(b_pt.to(DDT), b_vt, FULL_DOT)
    b_out = b_acc * (1.0 / b_l)[:, None]
    p_o = p_out + o_tok_m[:, None] * stride_out_t + o_d[None, :]
    tl.store(p_o, b_out.to(p_out.dtype.element_ty), mask=_tile_mask(m_m & ~m_pad_m, m_d))


@triton.jit
def _window_attention_fwd_kernel(
    QKV,
    QKV_BIAS,
    SCALE,
    POSITION_BIAS,
    OUT,
    stride_qkv_b,
    stride_qkv_t,
    stride_out_b,
    stride_out_t,
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
    NUM_BW,
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
    WINDOWS_PER_PROGRAM: tl.constexpr = 1,
    WHOLE_WINDOW: tl.constexpr = False,
    BLOCK_T: tl.constexpr = 0,
    M_TAIL: tl.constexpr = 0,
    MASK_IN_TABLE: tl.constexpr = False,
):
    """The output rows of BLOCK_M query rows of one head in WINDOWS_PER_PROGRAM consecutive (image, window)
    pairs of WINDOW_SET (NUM_BW pairs in the launch; the last program may get fewer): program (row block of a
    group of pairs, head). The window (WH x WW = N tokens) and whether it is shifted or padded are
    compile-time constants: a model has a handful of windows, hence a handful of specialisations. A shifted
    grid takes two launches: the windows off the shifted border, which have no shift mask (INTERIOR_WINDOWS),
    and the border (BORDER_WINDOWS).

    Reuse across the program's windows. The rows of the position-bias table a program reads are the same in
    each of its windows (one head, one row block; with MASK_IN_TABLE, in each of its windows of one kind: the
    border launch runs the last window row, then the last column, so a program's windows change kind at most
    twice). With one key block (N <= BLOCK_N) the tile is loaded once, before the windows, and stays in
    registers. With several key blocks the loop re-reads each tile per window, marked evict_last, while the k/v
    rows stream through marked evict_first: the re-reads are meant to hit L1 instead of L2. That L1 reuse (and so
    the traffic model's bias term divided by WINDOWS_PER_PROGRAM) is an estimate until a GPU measures it: a
    (BLOCK_M, N) slice of the table must stay resident beside the other programs on the SM (128 x 256 x 2 B = 64 KB
    for a 16-bit table).
    k is normalised once per window and row block: once per window where one row block covers it
    (N <= BLOCK_M, the windows of 7 and 8). With several key blocks the border windows read the shift mask added
    to the table (MASK_IN_TABLE; `mask_in_table`): one table per kind of border window, as the whole-window
    programs do; with one, it is computed, as the tile held across the windows serves windows of every kind.

    Whole-window programs (WHOLE_WINDOW; `tiles.forward_window_tiles`): program (group of windows, head). Per
    window, k and v are loaded and k normalised once, as a BLOCK_N-key tile and a BLOCK_T-key tail (BLOCK_N +
    BLOCK_T == N, none masked; BLOCK_T 0 where BLOCK_N holds the window), then the window's query rows run in
    blocks of BLOCK_M against all of them (`_fwd_window_rows`): whole rows of scores, one max, one sum, no
    rescaling; a tail as wide as the tile (window 16: 2 x 128 keys) joins the tile's by one online step. Windows
    with the shift mask read it from the host's `shift_masked_tables` (POSITION_BIAS is then (3, heads, N, N): a
    window in the last window row, the last column, the corner), so every whole-window program runs the same code
    (computed here, the mask's per-column regions spilled registers). With
    M_TAIL > 0 (a power of two: `tiles.forward_query_tail`) the last M_TAIL rows are a block of their own, run
    first; without, the last block masks its rows beyond the window. On sm_90 the dots read k and v from shared
    memory (wgmma), so the keys held across the blocks cost shared memory, not registers."""
    tl.static_assert(N == WH * WW)
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    tl.static_assert(WINDOWS_PER_PROGRAM >= 1)
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    # where it comes from: the host's tables with it added (`shift_masked_tables`), or computed here
    MASK_HERE: tl.constexpr = MASKED and not MASK_IN_TABLE
    CDT: tl.constexpr = SCALE.dtype.element_ty  # compute dtype: fp32 (fp64 for fp64 inputs)
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty  # dot operand dtype
    NUM_M: tl.constexpr = 1 if WHOLE_WINDOW else (N + BLOCK_M - 1) // BLOCK_M
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    ONE_KEY_BLOCK: tl.constexpr = N <= BLOCK_N
    i_pid, i_h = tl.program_id(0), tl.program_id(1)
    i_first = (i_pid // NUM_M) * WINDOWS_PER_PROGRAM  # the program's first (image, window) pair
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    b_scale = tl.load(SCALE + i_h)
    p_qkv_h = QKV + i_h * HEAD_DIM
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    if WHOLE_WINDOW:
        # the key tiles hold the window, none masked but beyond it in a lone tile; the row blocks end at the tail
        tl.static_assert((N <= BLOCK_N) if BLOCK_T == 0 else (N == BLOCK_N + BLOCK_T))
        tl.static_assert((M_TAIL == 0) or ((N - M_TAIL) % BLOCK_M == 0 and M_TAIL < BLOCK_M))
        tl.static_assert(MASK_IN_TABLE == MASKED)
        flags: tl.constexpr = (N, BLOCK_N, BLOCK_T, HAS_BIAS, FULL_DOT)
        for i_bw in range(i_first, tl.minimum(i_first + WINDOWS_PER_PROGRAM, NUM_BW)):
            i_b, _i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)
            p_qkv = p_qkv_h + i_b * stride_qkv_b
            key_rows = (p_qkv, p_bias, C, stride_qkv_t, i_w2, grid)
            b_kn, b_v = _fwd_window_keys(0, BLOCK_N, N, key_rows, cols, layout, HAS_BIAS, CDT, DDT)
            if BLOCK_T > 0:
                b_kt, b_vt = _fwd_window_keys(BLOCK_N, BLOCK_T, N, key_rows, cols, layout, HAS_BIAS, CDT, DDT)
                keys = (b_kn, b_v, b_kt, b_vt)
            else:
                keys = (b_kn, b_v, b_kn, b_v)
            p_table = _head_table(POSITION_BIAS, i_h, i_w2, NUM_WINDOWS, NUM_WX, NUM_HEADS, N, MASK_IN_TABLE)
            p_out = OUT + i_b * stride_out_b + i_h * HEAD_DIM
            win = (p_qkv, p_bias, stride_qkv_t, i_w2, grid, b_scale, p_table, p_out, stride_out_t)
            if M_TAIL > 0:  # first: after the loop its registers would add to those the loop's keys hold (spills)
                _fwd_window_rows(N - M_TAIL, M_TAIL, N, win, keys, cols, layout, flags, CDT, DDT)
            for start_m in range(0, N - M_TAIL, BLOCK_M):
                _fwd_window_rows(start_m, BLOCK_M, N - M_TAIL, win, keys, cols, layout, flags, CDT, DDT)
        return
    # [BLOCK_M]
    o_m = (i_pid % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = _in_window(o_m, N, BLOCK_M)
    # [BLOCK_M, 1] the rows of this head's (N, N) table (with MASK_IN_TABLE a border window's kind's: p_bias_w)
    p_bias_m = POSITION_BIAS + i_h * N * N + o_m[:, None] * N
    # the tables by kind: only over windows with the mask, and not where one tile serves windows of every kind (the
    # whole-window programs returned above, but a compiled kernel still builds this code)
    tl.static_assert(WHOLE_WINDOW or not MASK_IN_TABLE or (MASKED and not ONE_KEY_BLOCK))
    if ONE_KEY_BLOCK:
        # [BLOCK_M, BLOCK_N] the whole (row block, window) tile: loaded once for every window of the program
        o_n0 = tl.arange(0, BLOCK_N)
        b_bias_once = _fwd_bias_tile(p_bias_m, o_n0, m_m, _in_window(o_n0, N, BLOCK_N), EVEN)
    for i_bw in range(i_first, tl.minimum(i_first + WINDOWS_PER_PROGRAM, NUM_BW)):
        i_b, _i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)
        p_qkv = p_qkv_h + i_b * stride_qkv_b
        p_bias_w = p_bias_m
        if MASK_IN_TABLE:  # the table of the window's kind (MASKED: the assert above)
            p_bias_w = _head_table(POSITION_BIAS, i_h, i_w2, NUM_WINDOWS, NUM_WX, NUM_HEADS, N, True) + o_m[:, None] * N
        # [BLOCK_M] token, padding flag, shift region of the query rows
        o_tok_m, m_pad_m, o_reg_m = _window_rows(o_m, i_w2, grid, layout, MASK_HERE)
        # [BLOCK_M, BLOCK_D]: q times scale / max(||q||, 1e-12), one factor per row (the backward keeps the
        # normalised q apart); natural logits; the softmax takes 2^x with log2(e) folded into the
        # subtraction of the row max (one multiply-add per score)
        b_q = _widen(_load_rows(p_qkv, p_bias, o_tok_m, m_m, m_pad_m, cols, stride_qkv_t, HAS_BIAS), CDT)
        b_qs = (b_q * (b_scale / _row_norm(b_q))[:, None]).to(DDT)
        # [BLOCK_M]
        b_m = tl.full([BLOCK_M], float("-inf"), dtype=CDT)
        b_l = tl.zeros([BLOCK_M], dtype=CDT)
        # [BLOCK_M, BLOCK_D]
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=CDT)
        for start_n in range(0, N, BLOCK_N):
            # [BLOCK_N]
            o_n = start_n + tl.arange(0, BLOCK_N)
            m_n = _in_window(o_n, N, BLOCK_N)
            o_tok_n, m_pad_n, o_reg_n = _window_rows(o_n, i_w2, grid, layout, MASK_HERE)
            # [BLOCK_N, BLOCK_D]: normalised k (compute dtype), v (projection dtype)
            b_k = _stream_rows(p_qkv + C, p_bias + C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS)
            b_v = _stream_rows(p_qkv + 2 * C, p_bias + 2 * C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS)
            b_kn, _b_rk = _l2_normalize(b_k, CDT)
            # [BLOCK_M, BLOCK_N]
            if ONE_KEY_BLOCK:
                b_bias = b_bias_once
            else:
                b_bias = _fwd_bias_tile(p_bias_w, o_n, m_m, m_n, EVEN)
            b_s = _logits(
                _dot(b_qs, tl.trans(b_kn.to(DDT)), FULL_DOT),
                b_bias,
                o_reg_m,
                o_reg_n,
                m_n,
                mask_value,
                MASK_HERE,
                MASK_N,
            )
            b_m, b_alpha, b_p = _online_softmax_step_scaled(b_s, b_m)
            b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
            # [BLOCK_M, BLOCK_D]
            b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(DDT), b_v.to(DDT), FULL_DOT)

        # [BLOCK_M, BLOCK_D]
        b_out = b_acc * (1.0 / b_l)[:, None]
        p_out = OUT + i_b * stride_out_b + o_tok_m[:, None] * stride_out_t + i_h * HEAD_DIM + o_d[None, :]
        tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=_tile_mask(m_m & ~m_pad_m, m_d))


ALL_WINDOWS, INTERIOR_WINDOWS, BORDER_WINDOWS = 0, 1, 2  # the forward kernel's WINDOW_SET


def window_sets(dims: LaunchDims) -> List[Tuple[int, int]]:
    """The forward's launches as (WINDOW_SET, windows per image): on a shifted grid with windows off its
    border, those (no shift mask: most windows) and the border (the last window row and column) apart;
    otherwise every window at once."""
    num_wy = dims.NUM_WINDOWS // dims.NUM_WX
    if (dims.SH > 0 or dims.SW > 0) and num_wy > 1 and dims.NUM_WX > 1:
        return [(INTERIOR_WINDOWS, (num_wy - 1) * (dims.NUM_WX - 1)), (BORDER_WINDOWS, num_wy + dims.NUM_WX - 1)]
    return [(ALL_WINDOWS, dims.NUM_WINDOWS)]


# Windows per forward program (WINDOWS_PER_PROGRAM): the program reuses its rows of the position-bias table
# across them (see the kernel). At most FORWARD_WINDOWS_PER_PROGRAM, fewer while the launch would otherwise
# have fewer programs than the GPU has SMs (a small batch keeps every SM busy rather than reusing the table).
FORWARD_WINDOWS_PER_PROGRAM = 8
_SMS_OFF_CUDA = 132  # an H200's SMs: the launches the cost report records on meta tensors


def _multiprocessors(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _SMS_OFF_CUDA


def windows_per_program(pairs: int, row_blocks: int, num_heads: int, multiprocessors: int) -> int:
    """WINDOWS_PER_PROGRAM for a forward launch over `pairs` (image, window) pairs of `row_blocks` query blocks
    each: the largest power of two up to FORWARD_WINDOWS_PER_PROGRAM that leaves at least `multiprocessors`
    programs (1 when even one window per program leaves fewer)."""
    wpp = FORWARD_WINDOWS_PER_PROGRAM
    while wpp > 1 and triton.cdiv(pairs, wpp) * row_blocks * num_heads < multiprocessors:
        wpp //= 2
    return wpp


@functools.lru_cache(maxsize=32)
def _border_masks(wh: int, ww: int, sh: int, sw: int, mask_value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """(3, 1, N, N) shift masks of a window in the last window row, the last column and the corner (see
    `shift_masked_tables`); made once per window, shift, mask value, dtype and device."""
    pos = torch.arange(wh * ww, device=device)
    low = ((pos // ww) >= wh - sh, (pos % ww) >= ww - sw)  # the row's and the column's second shift region
    split_rows, split_columns = (r[:, None] != r[None, :] for r in low)
    different = torch.stack([split_rows, split_columns, split_rows | split_columns])
    return torch.where(different, torch.full((), mask_value, dtype=dtype, device=device), 0).unsqueeze(1)


def shift_masked_tables(table: torch.Tensor, dims: LaunchDims, mask_value: float) -> torch.Tensor:
    """(3, heads, N, N): the table plus the shift mask (`mask_value` between tokens of different shift regions, 0
    within one) of a window in the last window row, the last window column, and the corner. The forward reads
    these in its launches over windows with the mask where `mask_in_table` says, instead of computing the mask.
    In the table's dtype (the mask's 0 leaves the table's values as they are; where it applies the scores vanish
    in the softmax either way), or fp32 where the mask value is beyond half the table dtype's range (fp16 and
    -1e5: the sum is not to reach -inf, whose rows of the first key tile would make NaN). A window's regions: on
    the shifted, padded grid, rows from HP - WH and from HP - SH, columns likewise; in the last window row the
    rows split at WH - SH within the window, elsewhere they do not split (the kernels' `_window_rows`)."""
    dtype = table.dtype
    if abs(mask_value) > torch.finfo(dtype).max / 2:
        dtype = torch.float32
    masks = _border_masks(dims.WH, dims.WW, dims.SH, dims.SW, float(mask_value), dtype, table.device)
    return table.to(dtype).unsqueeze(0) + masks


def mask_in_table(n: int, flags: dict, window_set: int) -> bool:
    """MASK_IN_TABLE of a forward launch (windows of n tokens, the launch's flags): whether it reads
    `shift_masked_tables` instead of computing the shift mask. A launch over windows with the mask (the border, or
    every window of a shifted grid one window high or wide) does in whole-window programs and where several key
    blocks cover the window (row-block programs re-read the table per window; with one key block its tile is loaded
    once for windows of every kind). Computed per score, the mask took window 24's border launch (bf16, sm_90) to
    25.0 instructions per score of its own windows, against 14.0 off the border."""
    whole = flags.get("WHOLE_WINDOW", False)
    return flags["SHIFTED"] and window_set != INTERIOR_WINDOWS and (whole or n > flags["BLOCK_N"])


def _launch_table(table: torch.Tensor, in_table: bool, dims: LaunchDims, mask_value):
    """The table a forward launch reads: `shift_masked_tables` where the launch takes the mask from it
    (`mask_in_table`), the table elsewhere."""
    return shift_masked_tables(table, dims, mask_value) if in_table else table


def _forward_table(qkv: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
    """The position-bias table as the forward reads it: as it arrives when that is the projection's dtype or
    the compute dtype (a bf16/fp16 model passes a bf16/fp16 table: no per-call fp32 copy, half the bytes;
    under autocast it arrives fp32 beside a bf16/fp16 projection and is read as it is, fp32: the logits keep
    the table's precision and nothing is copied), else converted to the compute dtype. The kernel adds it in
    the compute dtype either way. (The backward takes `small_operands`'s compute-dtype table.)"""
    table = position_bias.detach()
    if table.dtype not in (qkv.dtype, compute_dtype(qkv.dtype)):
        table = table.to(compute_dtype(qkv.dtype))
    return table.contiguous()


def window_attention_triton_forward(
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
) -> torch.Tensor:
    """Launch the fused forward. Returns the output (B, H*W, C); the backward recomputes what it needs.

    Inputs as in `window_attention_reference`, the geometry as the custom op's plain values
    (`WindowGeometry.as_op_args()`), validated by the caller (`launch_dims` refuses what that rules out). qkv's
    channel dimension must be contiguous; batch and token strides are free.
    """
    B, L, C3 = qkv.shape
    dims = launch_dims(qkv, grid_size, num_heads, window_size, shift_size, pad_order)
    head_dim = C3 // 3 // num_heads
    if not head_dim_supported(head_dim):
        raise ValueError(f"the Triton kernels support head_dim 1 to {MAX_HEAD_DIM}, got {head_dim}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv's last dimension must be contiguous (stride 1), got strides {qkv.stride()}")
    scale = clamped_scale(logit_scale, num_heads, compute_dtype(qkv.dtype))
    table = _forward_table(qkv, position_bias)
    bias = padding_token(qkv, qkv_bias)
    out = torch.empty((B, L, dims.C), device=qkv.device, dtype=qkv.dtype)
    if B == 0:
        return out
    flags = launch_flags(qkv, qkv_bias, pad_order, head_dim, dims)
    whole = flags.get("WHOLE_WINDOW", False)  # one program per group of windows: see the kernel
    row_blocks = 1 if whole else triton.cdiv(dims.N, flags["BLOCK_M"])
    for window_set, windows in window_sets(dims):
        pairs = B * windows  # (image, window) pairs of this launch
        wpp = windows_per_program(pairs, row_blocks, num_heads, _multiprocessors(qkv))
        in_table = mask_in_table(dims.N, flags, window_set)
        _window_attention_fwd_kernel[(triton.cdiv(pairs, wpp) * row_blocks, num_heads)](
            QKV=qkv,
            QKV_BIAS=bias,
            SCALE=scale,
            POSITION_BIAS=_launch_table(table, in_table, dims, mask_value),
            OUT=out,
            stride_qkv_b=qkv.stride(0),
            stride_qkv_t=qkv.stride(1),
            stride_out_b=out.stride(0),
            stride_out_t=out.stride(1),
            NUM_BW=pairs,
            mask_value=mask_value,
            WINDOW_SET=window_set,
            WINDOWS_PER_PROGRAM=wpp,
            MASK_IN_TABLE=in_table,
            **dims._asdict(),
            **flags,
            **({"M_TAIL": forward_query_tail(dims.N, flags["BLOCK_M"])} if whole else {}),
        )
    return out
