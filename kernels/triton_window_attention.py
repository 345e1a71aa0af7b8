"""Fused Swin V2 window attention in Triton: the forward of `window_attention_reference` (one kernel; a shifted grid
runs it as two launches, the windows off the shifted border and the border windows), the index, normalisation and
softmax helpers the backward kernels (triton_window_attention_backward.py) share, the tiles and the geometry.
The custom ops over both are in op.py.

Memory traffic. The eager chain reads and writes the whole activation at every step (pad, roll, partition,
normalise, scores, bias, mask, softmax, product, reverse, roll back, crop). This kernel reads each q/k/v
element of the projection once per query block that needs it, reads the (heads, N, N) bias table in the
dtype it arrives in (a 16-bit model's table as it is; autocast's fp32 table as it is), each program its rows
of it once for several windows (WINDOWS_PER_PROGRAM; see the kernel for how, and what is an estimate), and
writes the output; nothing of size N x N reaches memory. The backward recomputes the softmax from q/k/v.

One program handles BLOCK_M query rows of WINDOWS_PER_PROGRAM consecutive windows (of one image or the next),
for one head; for each window:
  1. Each row's source token comes from index arithmetic on the load: window -> shifted padded grid ->
     reverse shift -> un-padded token, in either padding order (transformers pads then rolls; timm rolls
     then pads). Rows that land on padding read the projection of a zero token: the q/k/v bias.
  2. q and k rows are L2-normalised in fp32 (x / max(||x||, 1e-12)); q is multiplied by the clamped
     logit scale (computed on the host: exp(min(logit_scale, log 100))).
  3. Key blocks of the same window stream through an online softmax: scores + bias tile + shift mask (the
     reference's finite value, from each token's shift region, computed here; no mask tensor is read).
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
The cost of each kernel, counted from its SASS, is `compile_check --cost` (kernels/cost.py).

How the helpers take the geometry: as tuples the kernels build once, unpacked where they are used.
`grid` = (H, W, HP, WP, SH, SW, RSH, RSW) runtime ints; `layout` = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD),
built as `layout: tl.constexpr` and taken as a `tl.constexpr` argument (a plain tuple of constexprs reaches a
helper as runtime values: the window shape's `//` and `%` become divisions and the flags branches);
`proj` = (the image's projection and the bias at the head's q channels, the token stride, C); `rows` = a block's
(token, padding flag, shift region) from `_window_rows`. tests/test_kernel_source.py holds the helpers to at
most 10 arguments and 3 returned values.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .geometry import LOGIT_SCALE_MAX, PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry

__all__ = ["fused_backward_supported", "window_attention_triton_forward", "block_config", "register_cap",
           "head_dim_supported", "channel_block", "MAX_HEAD_DIM", "INTERPRETED"]

# The head dims the kernels serve: every one from 1 to MAX_HEAD_DIM. The kernels' channel tiles are BLOCK_D =
# channel_block(head_dim) wide, a power of two of at least 16 (tl.arange and tl.dot need one); a head dim
# below it (10, 24, 30, 48, 96, ...) runs masked in that tile. This is the rule the dispatch asks
# (swinv2_fast.functional): stated here only.
MAX_HEAD_DIM = 128


def head_dim_supported(head_dim: int) -> bool:
    """Whether the fused kernels run heads of `head_dim` channels (1 to MAX_HEAD_DIM)."""
    return 1 <= head_dim <= MAX_HEAD_DIM


def channel_block(head_dim: int) -> int:
    """BLOCK_D, the kernels' channel tile for `head_dim`: the next power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Compiled kernels take exp in fp32 as a multiply and the hardware's ex2 with subnormal results flushed to
# zero (inline PTX, which the interpreter cannot run): tl.exp's ex2 keeps subnormals at three more
# instructions per element. exp(x) below 2^-126 is zero for a softmax either way (its terms are summed with 1).
_FAST_EXP = tl.constexpr(not INTERPRETED)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _unroll(o_p, RS, E, SHIFTED: tl.constexpr):
    """(o_p + RS) mod E for 0 <= o_p < E and 0 <= RS < E (the host reduces the shift): one conditional
    subtraction instead of an integer division by a runtime extent."""
    if SHIFTED:
        o = o_p + RS
        return tl.where(o >= E, o - E, o)
    return o_p


@triton.jit
def _window_rows(o_pos, i_w2, grid, layout: tl.constexpr, MASKED: tl.constexpr = True):
    """[ROWS] token index, padding flag and shift region of window positions `o_pos` of window i_w2 = (row,
    column); the regions are all 0 without a shift, or with MASKED false (windows off the shifted border).
    `grid` = (H, W, HP, WP, SH, SW, RSH, RSW): the image, the padded grid, the shift and the shift reduced
    modulo the extent it rolls (H, W for roll-then-pad; HP, WP for pad-then-roll). `layout` = (WH, WW,
    SHIFTED, PADDED, ROLL_THEN_PAD), compile-time constants: the window's shape, so `//` and `%` by WW are
    shifts or multiplications."""
    H, W, HP, WP, SH, SW, RSH, RSW = grid
    WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD = layout
    i_wy, i_wx = i_w2
    # position in the shifted, padded grid
    o_py = i_wy * WH + o_pos // WW
    o_px = i_wx * WW + o_pos % WW
    if ROLL_THEN_PAD:
        # the grid was rolled first: padding sits at the bottom/right of the shifted grid
        o_y = _unroll(o_py, RSH, H, SHIFTED)
        o_x = _unroll(o_px, RSW, W, SHIFTED)
        m_pad = (o_py >= H) | (o_px >= W)
    else:
        # the padded grid was rolled: undo the roll on the padded grid, then see if it is padding
        o_y = _unroll(o_py, RSH, HP, SHIFTED)
        o_x = _unroll(o_px, RSW, WP, SHIFTED)
        m_pad = (o_y >= H) | (o_x >= W)
    if not PADDED:
        m_pad = tl.zeros(o_pos.shape, dtype=tl.int1)
    if SHIFTED and MASKED:
        # shift-mask regions on the padded grid: [0, P - window), [P - window, P - shift), [P - shift, P)
        o_ry = (o_py >= HP - WH).to(tl.int32) + (o_py >= HP - SH).to(tl.int32)
        o_rx = (o_px >= WP - WW).to(tl.int32) + (o_px >= WP - SW).to(tl.int32)
        o_reg = o_ry * 3 + o_rx
    else:
        o_reg = tl.zeros(o_pos.shape, dtype=tl.int32)
    return o_y * W + o_x, m_pad, o_reg


@triton.jit
def _padding_index(o_pos, i_w2, grid, layout: tl.constexpr):
    """[ROWS] index of padded window positions among an image's Hp*Wp - H*W padded positions 0, 1, ...
    (arguments as _window_rows')."""
    H, W, HP, WP, SH, SW, RSH, RSW = grid
    WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD = layout
    i_wy, i_wx = i_w2
    o_ay = i_wy * WH + o_pos // WW
    o_ax = i_wx * WW + o_pos % WW
    if not ROLL_THEN_PAD:
        o_ay = _unroll(o_ay, RSH, HP, SHIFTED)
        o_ax = _unroll(o_ax, RSW, WP, SHIFTED)
    return tl.where(o_ay < H, o_ay * (WP - W) + (o_ax - W), H * (WP - W) + (o_ay - H) * WP + o_ax)


@triton.jit
def _in_window(o, N: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK] o < N, a constant when N is a multiple of the block (then nothing is masked)."""
    if N % BLOCK == 0:
        return tl.full([BLOCK], 1, dtype=tl.int1)
    return o < N


@triton.jit
def _channels(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The channel axis of a head's tiles: [BLOCK_D] offsets and the mask of the HEAD_DIM real channels.
    BLOCK_D is HEAD_DIM rounded up to a power of two of at least 16 (what tl.arange and tl.dot take); the
    channels beyond HEAD_DIM load as zeros and are never stored, so every norm and every dot over the
    channel axis is that of the real channels. Without padding the mask is a constant (nothing is masked)."""
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0)
    tl.static_assert(HEAD_DIM <= BLOCK_D)
    # [BLOCK_D]
    o_d = tl.arange(0, BLOCK_D)
    if HEAD_DIM == BLOCK_D:
        return o_d, tl.full([BLOCK_D], 1, dtype=tl.int1)
    return o_d, o_d < HEAD_DIM


@triton.jit
def _tile_mask(m_rows, m_d):
    """[ROWS, BLOCK_D] mask of a row tile: rows m_rows, the head's real channels m_d."""
    return m_rows[:, None] & m_d[None, :]


@triton.jit
def _load_rows(P_QKV, P_BIAS, o_tok, m_rows, m_pad, cols, stride_t, HAS_BIAS: tl.constexpr):
    """[ROWS, BLOCK_D] slice of the projection at tokens `o_tok`, in its own dtype. Padded rows read the bias
    (the projection of a zero token, in the projection's dtype as in the reference), or zero without one;
    rows beyond the window (m_rows false) and channels beyond the head (see _channels) read zero. One load:
    padded rows point into the bias."""
    o_d, m_d = cols
    p_rows = P_QKV + o_tok[:, None] * stride_t + o_d[None, :]
    if HAS_BIAS:
        p_rows = tl.where(m_pad[:, None], P_BIAS + o_d[None, :], p_rows)
        return tl.load(p_rows, mask=_tile_mask(m_rows, m_d), other=0.0)
    # [ROWS, BLOCK_D]
    return tl.load(p_rows, mask=_tile_mask(m_rows & ~m_pad, m_d), other=0.0)


@triton.jit
def _row_norm(b_x):
    """[ROWS] max(||x||, 1e-12) of each row of b_x (compute dtype)."""
    return tl.maximum(tl.sqrt(tl.sum(b_x * b_x, axis=1)), 1e-12)


@triton.jit
def _l2_normalize(b_x, CDT: tl.constexpr):
    """x / max(||x||, 1e-12) per row in the compute dtype, and the clamped norm max(||x||, 1e-12)."""
    b_x = b_x.to(CDT)
    b_r = _row_norm(b_x)
    # one division per row, a multiply per element (within an ulp of dividing each element)
    return b_x * (1.0 / b_r)[:, None], b_r


@triton.jit
def _l2_normalize_backward(b_xn, b_r, b_dxn):
    """Gradient through x / max(||x||, eps): (dy - y (y . dy)) / ||x|| where the norm exceeds eps, dy / eps
    where the clamp is active (there the norm's own gradient is zero)."""
    b_proj = tl.where(b_r > 1e-12, tl.sum(b_xn * b_dxn, axis=1), 0.0)
    return (b_dxn - b_xn * b_proj[:, None]) * (1.0 / b_r)[:, None]


@triton.jit
def _dot(a, b, FULL_DOT: tl.constexpr):
    # fp32/fp64 inputs: IEEE dots (never TF32); fp16/bf16: tensor cores with fp32 accumulation
    if FULL_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _bias_tile(P_BIAS_H, o_m, o_n, m_m, m_n, N: tl.constexpr, EVEN: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile of one head's (N, N) position-bias table; unmasked when the tiles divide N."""
    p_bias = P_BIAS_H + o_m[:, None] * N + o_n[None, :]
    if EVEN:
        return tl.load(p_bias)
    return tl.load(p_bias, mask=m_m[:, None] & m_n[None, :], other=0.0)


@triton.jit
def _logits(b_qk, b_bias, o_reg_m, o_reg_n, m_n, mask_value, MASKED: tl.constexpr, MASK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] logits from the scaled cosines b_qk: + position bias + shift mask (MASKED: shifted
    windows on the border); -inf for keys beyond the window (only when the key tile does not divide N)."""
    b_s = b_qk + b_bias.to(b_qk.dtype)
    if MASKED:
        b_s += tl.where(o_reg_m[:, None] != o_reg_n[None, :], mask_value, 0.0)
    if MASK_N:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    return b_s


@triton.jit
def _key_rows(proj, rows, m_n, cols, HAS_BIAS: tl.constexpr, CDT: tl.constexpr):
    """Key rows of a window: `proj` = (the image's projection and the bias, both at this head's q channels;
    the token stride; C), `rows` = the rows' (token, padding flag, shift region) from _window_rows,
    [BLOCK_N] each. Returns k normalised (compute dtype) [BLOCK_N, BLOCK_D], its clamped norm [BLOCK_N], and v
    (projection dtype) [BLOCK_N, BLOCK_D]."""
    p_qkv, p_bias, stride_t, C = proj
    o_tok, m_pad, o_reg = rows
    # [BLOCK_N, BLOCK_D]
    b_k = _load_rows(p_qkv + C, p_bias + C, o_tok, m_n, m_pad, cols, stride_t, HAS_BIAS)
    b_v = _load_rows(p_qkv + 2 * C, p_bias + 2 * C, o_tok, m_n, m_pad, cols, stride_t, HAS_BIAS)
    b_kn, b_rk = _l2_normalize(b_k, CDT)
    return b_kn, b_rk, b_v


@triton.jit
def _window_of(i_bw, NUM_WINDOWS, NUM_WX):
    # the image index in int64: i_b * stride_b overflows int32 for large images times large batches
    i_b, i_w = (i_bw // NUM_WINDOWS).to(tl.int64), i_bw % NUM_WINDOWS
    return i_b, i_w, (i_w // NUM_WX, i_w % NUM_WX)


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
def _query_rows(proj, rows, m_m, cols, b_scale, HAS_BIAS: tl.constexpr, CDT: tl.constexpr,
                DDT: tl.constexpr):
    """Query rows of a window (`proj`, `rows` as in _key_rows): q normalised (compute dtype) [BLOCK_M,
    BLOCK_D], its clamped norm [BLOCK_M], and q times the clamped logit scale b_scale (dot dtype)."""
    p_qkv, p_bias, stride_t, C = proj
    o_tok, m_pad, o_reg = rows
    # [BLOCK_M, BLOCK_D]
    b_q = _load_rows(p_qkv, p_bias, o_tok, m_m, m_pad, cols, stride_t, HAS_BIAS)
    b_qn, b_rq = _l2_normalize(b_q, CDT)
    return b_qn, b_rq, (b_qn * b_scale).to(DDT)


@triton.jit
def _exp2(x):
    """2^x, elementwise; see _FAST_EXP."""
    if _FAST_EXP:
        if x.dtype == tl.float32:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
    return tl.exp2(x)


@triton.jit
def _exp(x):
    """exp(x), elementwise; see _FAST_EXP."""
    return _exp2(x * LOG2E)


@triton.jit
def _online_softmax_step_scaled(b_s, b_m):
    """The forward's online softmax step on natural logits b_s, with the exponentials taken in base 2 as one
    multiply-add per score, 2^(S log2 e - m log2 e): the new row max, the rescaling factor, 2^(...)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_m_scaled = b_m_new * LOG2E
    return b_m_new, _exp2(b_m * LOG2E - b_m_scaled), _exp2(b_s * LOG2E - b_m_scaled[:, None])


@triton.jit
def _online_softmax_step(b_s, b_m):
    """One key block of an online softmax over rows of natural logits b_s: the new row max, the factor
    rescaling what was summed under the old max, and exp(S - new max)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    return b_m_new, _exp(b_m - b_m_new), _exp(b_s - b_m_new[:, None])


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
    reads the same tile."""
    if EVEN:
        return tl.load(p_bias_m + o_n[None, :], eviction_policy="evict_last")
    return tl.load(p_bias_m + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0.0,
                   eviction_policy="evict_last")


@triton.jit
def _window_attention_fwd_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, OUT,
    stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, SH, SW, RSH, RSW, C, NUM_HEADS, NUM_BW,
    mask_value,
    WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr, WINDOW_SET: tl.constexpr = 0,
    WINDOWS_PER_PROGRAM: tl.constexpr = 1,
):
    """The output rows of BLOCK_M query rows of one head in WINDOWS_PER_PROGRAM consecutive (image, window)
    pairs of WINDOW_SET (NUM_BW pairs in the launch; the last program may get fewer): program (row block of a
    group of pairs, head). The window (WH x WW = N tokens) and whether it is shifted or padded are
    compile-time constants: a model has a handful of windows, hence a handful of specialisations. A shifted
    grid takes two launches: the windows off the shifted border, which have no shift mask (INTERIOR_WINDOWS),
    and the border (BORDER_WINDOWS).

    Reuse across the program's windows. The rows of the position-bias table a program reads are the same in
    each of its windows (one head, one row block). With one key block (N <= BLOCK_N) the tile is loaded
    once, before the windows, and stays in registers. With several key blocks the loop re-reads each tile per
    window, marked evict_last, while the k/v rows stream through marked evict_first: the re-reads are meant
    to hit L1 instead of L2. That L1 reuse (and so the traffic model's bias term divided by
    WINDOWS_PER_PROGRAM) is an estimate until a GPU measures it: a (BLOCK_M, N) slice of the table must
    stay resident beside the other programs on the SM (128 x 256 x 2 B = 64 KB for a 16-bit table).
    k is normalised once per window and row block: once per window where one row block covers it
    (N <= BLOCK_M, the windows of 7 and 8)."""
    tl.static_assert(N == WH * WW)
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    tl.static_assert(WINDOWS_PER_PROGRAM >= 1)
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    CDT: tl.constexpr = SCALE.dtype.element_ty  # compute dtype: fp32 (fp64 for fp64 inputs)
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty  # dot operand dtype
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    ONE_KEY_BLOCK: tl.constexpr = N <= BLOCK_N
    i_pid, i_h = tl.program_id(0), tl.program_id(1)
    i_first = (i_pid // NUM_M) * WINDOWS_PER_PROGRAM  # the program's first (image, window) pair
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    layout: tl.constexpr = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    # [BLOCK_M]
    o_m = (i_pid % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = _in_window(o_m, N, BLOCK_M)
    b_scale = tl.load(SCALE + i_h)
    p_qkv_h = QKV + i_h * HEAD_DIM
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    # [BLOCK_M, 1] the rows of this head's (N, N) table
    p_bias_m = POSITION_BIAS + i_h * N * N + o_m[:, None] * N
    if ONE_KEY_BLOCK:
        # [BLOCK_M, BLOCK_N] the whole (row block, window) tile: loaded once for every window of the program
        o_n0 = tl.arange(0, BLOCK_N)
        b_bias_once = _fwd_bias_tile(p_bias_m, o_n0, m_m, _in_window(o_n0, N, BLOCK_N), EVEN)
    for i_bw in range(i_first, tl.minimum(i_first + WINDOWS_PER_PROGRAM, NUM_BW)):
        i_b, i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)
        p_qkv = p_qkv_h + i_b * stride_qkv_b
        # [BLOCK_M] token, padding flag, shift region of the query rows
        o_tok_m, m_pad_m, o_reg_m = _window_rows(o_m, i_w2, grid, layout, MASKED)
        # [BLOCK_M, BLOCK_D]: q times scale / max(||q||, 1e-12), one factor per row (the backward keeps the
        # normalised q apart); natural logits; the softmax takes 2^x with log2(e) folded into the
        # subtraction of the row max (one multiply-add per score)
        b_q = _load_rows(p_qkv, p_bias, o_tok_m, m_m, m_pad_m, cols, stride_qkv_t, HAS_BIAS).to(CDT)
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
            o_tok_n, m_pad_n, o_reg_n = _window_rows(o_n, i_w2, grid, layout, MASKED)
            # [BLOCK_N, BLOCK_D]: normalised k (compute dtype), v (projection dtype)
            b_k = _stream_rows(p_qkv + C, p_bias + C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS)
            b_v = _stream_rows(p_qkv + 2 * C, p_bias + 2 * C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS)
            b_kn, b_rk = _l2_normalize(b_k, CDT)
            # [BLOCK_M, BLOCK_N]
            if ONE_KEY_BLOCK:
                b_bias = b_bias_once
            else:
                b_bias = _fwd_bias_tile(p_bias_m, o_n, m_m, m_n, EVEN)
            b_s = _logits(_dot(b_qs, tl.trans(b_kn.to(DDT)), FULL_DOT), b_bias, o_reg_m, o_reg_n, m_n,
                          mask_value, MASKED, MASK_N)
            b_m, b_alpha, b_p = _online_softmax_step_scaled(b_s, b_m)
            b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
            # [BLOCK_M, BLOCK_D]
            b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(DDT), b_v.to(DDT), FULL_DOT)

        # [BLOCK_M, BLOCK_D]
        b_out = b_acc * (1.0 / b_l)[:, None]
        p_out = OUT + i_b * stride_out_b + o_tok_m[:, None] * stride_out_t + i_h * HEAD_DIM + o_d[None, :]
        tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=_tile_mask(m_m & ~m_pad_m, m_d))



# (BLOCK_M, BLOCK_N, num_warps) per channel tile BLOCK_D = channel_block(head_dim), chosen with the compile
# check as the largest tiles that compile without register spills for sm_80 and sm_90 (registers in the
# compile-check table). A window of N tokens takes ceil(N / BLOCK_M) query blocks and streams ceil(N / BLOCK_N)
# key blocks; a tile that does not divide N is masked. The 16-bit forward at head_dim <= 32 picks its tiles by
# N (_forward_tiles_16bit).
_TILES_16BIT = {16: (64, 32, 4), 32: (64, 32, 4), 64: (32, 32, 8), 128: (16, 32, 8)}
_TILES_FP32 = {16: (32, 32, 8), 32: (32, 32, 8), 64: (16, 16, 8), 128: (16, 16, 8)}
_TILES_FP64 = {16: (16, 16, 4), 32: (16, 16, 4), 64: (16, 16, 4), 128: (16, 16, 4)}
# The backward kernels (dq, dk/dv, bias table and scale) hold more live tiles: their own table, from the
# same compile check. fp32 backward with head_dim 64 or 128 has no spill-free tile (IEEE fp32 dots keep
# their operands in registers), and fp64 is a gradcheck dtype: on a GPU those go to the eager path by design
# (`fused_backward_supported`); under the interpreter every dtype and head dim runs. The four backward
# kernels share one tile shape: the probabilities they recompute are then bitwise the same.
_BWD_TILES_16BIT = {16: (64, 32, 4), 32: (64, 32, 8), 64: (32, 16, 8), 128: (16, 32, 8)}
_BWD_TILES_FP32 = {16: (32, 16, 8), 32: (16, 32, 8)}
# Register budget per thread handed to ptxas (.maxnreg). Without it ptxas may cap 8-warp kernels at 128
# registers and spill; 255 x 256 threads still fits one SM's 64K registers. Kernels that fit in 128
# without spilling are capped there (twice the resident warps of 255): `register_cap`.
MAXNREG = 255
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


def _forward_tiles_16bit(n: int) -> Tuple[int, int, int]:
    """Static cost report (compile_check --cost, sm_90, bf16, head_dim 32): 64-wide key tiles everywhere (one
    key block at N <= 64); 128 query rows where they divide N (N = 256: 21 instructions per score against 23
    with 64 rows), 64 elsewhere (less padding waste at N = 49, 144, 576)."""
    return (128, 64, 8) if n % 128 == 0 else (64, 64, 4)


# Tiles set by the GPU tile sweep while it times a candidate (kernels/sweep.py), then those it recorded
# (kernels/tuned_tiles.json, read on a CUDA machine with compiled kernels only, of the architecture and Triton
# version the sweep ran on: the current device's): "<dtype>/hd<head_dim>/N<n>/
# <fwd|bwd>" -> (BLOCK_M, BLOCK_N, num_warps, maxnreg, num_stages). Without a record or override the launch
# gets the tables' tiles, `register_cap`'s budget and no num_stages (Triton's default, 3 on CUDA).
TUNED_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "maxnreg", "num_stages")
TILE_OVERRIDES: Dict[str, Tuple[int, int, int, int, int]] = {}
TUNED_TILES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_tiles.json")


def tuned_entry(value, where: str) -> Tuple[int, int, int, int, int]:
    """One tuned configuration, checked: five positive integers in the order of TUNED_FIELDS."""
    if (not isinstance(value, (list, tuple)) or len(value) != len(TUNED_FIELDS)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{where}: expected {len(TUNED_FIELDS)} positive integers [{', '.join(TUNED_FIELDS)}], "
                         f"got {value!r}")
    return tuple(value)


def load_tuned_tiles(path: str, arch: Optional[int] = None) -> Dict[str, Tuple[int, int, int, int, int]]:
    """The entries of a tile sweep's record ({"arch": "sm_90", "triton": "3.6.0", "entries": {key: [BLOCK_M,
    BLOCK_N, num_warps, maxnreg, num_stages]}, ...}); a malformed file or entry raises, naming the file and the
    key. With `arch`, a record swept on another architecture or with another Triton gives no entries: its
    picks (register caps above all) are only known to fit where they were timed and compiled."""
    with open(path) as fh:
        data = json.load(fh)
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a JSON object with an \"entries\" object, got {str(data)[:200]}")
    checked = {key: tuned_entry(value, f"{path}: entry {key!r}") for key, value in entries.items()}
    if arch is not None and (data.get("arch") != f"sm_{arch}" or data.get("triton") != triton.__version__):
        return {}
    return checked


@functools.lru_cache(maxsize=None)
def _recorded_tiles(arch: int) -> Dict[str, Tuple[int, int, int, int, int]]:
    if INTERPRETED or not os.path.exists(TUNED_TILES_PATH):
        return {}
    return load_tuned_tiles(TUNED_TILES_PATH, arch)


def _tuned(n: int, head_dim: int, dtype: torch.dtype, backward: bool,
           arch: Optional[int] = None) -> Optional[Tuple[int, int, int, int, int]]:
    """An override, else the record of sm_<arch> (the current CUDA device's when None), if either has the key."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype)
    if name is None:
        return None
    key = f"{name}/hd{head_dim}/N{n}/{'bwd' if backward else 'fwd'}"
    if key in TILE_OVERRIDES:
        return tuned_entry(TILE_OVERRIDES[key], f"TILE_OVERRIDES[{key!r}]")
    if INTERPRETED or not torch.cuda.is_available():
        return None
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    return _recorded_tiles(arch).get(key)


def block_config(n: int, head_dim: int, dtype: torch.dtype, backward: bool = False,
                 arch: Optional[int] = None) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for windows of n tokens, head_dim and the projection dtype, of the
    forward kernel or of the backward kernels: a tile sweep's record for sm_<arch> (default: the current CUDA
    device's) where there is one, else the tables."""
    tuned = _tuned(n, head_dim, dtype, backward, arch)
    if tuned is not None:
        return tuned[:3]
    block_d = channel_block(head_dim)
    if dtype == torch.float64:
        return _TILES_FP64[block_d]
    if backward and dtype == torch.float32:
        return _BWD_TILES_FP32.get(block_d, _TILES_FP32[block_d])  # beyond the table: interpreter only
    if backward:
        return _BWD_TILES_16BIT[block_d]
    if dtype != torch.float32 and block_d <= 32:
        return _forward_tiles_16bit(n)
    return (_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)[block_d]


def launch_stages(n: int, head_dim: int, dtype: torch.dtype, backward: bool = False,
                  arch: Optional[int] = None) -> Optional[int]:
    """num_stages for the launch: a tile sweep's record (as block_config's) or override where there is one,
    else None (the launch passes none: Triton's default, 3 on CUDA)."""
    tuned = _tuned(n, head_dim, dtype, backward, arch)
    return None if tuned is None else tuned[4]


def register_cap(n: int, head_dim: int, dtype: torch.dtype, backward: bool = False, arch: int = 90,
                 padded: bool = False) -> int:
    """ptxas's register budget per thread for the kernels of this configuration on sm_<arch>: 128 for the
    16-bit forward at head_dim 16 or 32 (channel tiles without a mask) on sm_90 without padding, with triton
    3.8 or later, where its tiles divide the window (n % 128 == 0, or n == 64: one key block, the bias tile
    held in registers across the program's windows): 128 registers, no spills. sm_80, masked channel tiles
    (head_dim 10, 24, 30: 24 to 48 B of spills at 128), n = 49 (72 B with its masked tile), a padded grid and
    triton 3.6's build (88 B at n % 128 == 0) go uncapped: MAXNREG. A tile sweep's record for sm_<arch> or an
    override sets its own."""
    tuned = _tuned(n, head_dim, dtype, backward, arch)
    if tuned is not None:
        return tuned[3]
    if not backward and dtype in (torch.float16, torch.bfloat16) and head_dim in (16, 32) \
            and (n % 128 == 0 or n == 64) and arch >= 90 and not padded and _TRITON_VERSION >= (3, 8):
        return 128
    return MAXNREG


def fused_backward_supported(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the compiled backward kernels serve this head dim and dtype on a GPU (see the tile tables)."""
    if not head_dim_supported(head_dim):
        return False
    if dtype == torch.float32:
        return channel_block(head_dim) in _BWD_TILES_FP32
    return dtype in (torch.float16, torch.bfloat16) and channel_block(head_dim) in _BWD_TILES_16BIT


class _Geometry(NamedTuple):
    """The integers every kernel takes, derived once per call: the window's shape (WH, WW, N) is a
    compile-time constant of the kernels, the rest are runtime arguments."""

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
    RSH: int  # the shift modulo the extent it rolls: the kernels undo the roll with one subtraction
    RSW: int
    N: int
    C: int
    NUM_HEADS: int


def _geometry(qkv, geometry: WindowGeometry) -> _Geometry:
    (H, W), (wh, ww), (sh, sw) = geometry.grid, geometry.window, geometry.shift
    hp, wp = geometry.padded_size
    rsh, rsw = geometry.roll_shift  # timm rolls the un-padded grid (H, W), transformers the padded one (HP, WP)
    return _Geometry(H, W, hp, wp, geometry.windows_per_axis[1], geometry.num_windows, wh, ww, sh, sw, rsh, rsw,
                     geometry.N, qkv.shape[-1] // 3, geometry.num_heads)


ALL_WINDOWS, INTERIOR_WINDOWS, BORDER_WINDOWS = 0, 1, 2  # the forward kernel's WINDOW_SET


def window_sets(g: _Geometry) -> List[Tuple[int, int]]:
    """The forward's launches as (WINDOW_SET, windows per image): on a shifted grid with windows off its
    border, those (no shift mask: most windows) and the border (the last window row and column) apart;
    otherwise every window at once."""
    num_wy = g.NUM_WINDOWS // g.NUM_WX
    if (g.SH > 0 or g.SW > 0) and num_wy > 1 and g.NUM_WX > 1:
        return [(INTERIOR_WINDOWS, (num_wy - 1) * (g.NUM_WX - 1)), (BORDER_WINDOWS, num_wy + g.NUM_WX - 1)]
    return [(ALL_WINDOWS, g.NUM_WINDOWS)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads):
    """The scale exp(min(logit_scale, log 100)), the table and the bias in the compute dtype, contiguous: under
    autocast they arrive fp32 beside an fp16/bf16 projection; one kernel specialization per projection dtype."""
    cdt = _compute_dtype(qkv.dtype)
    table = position_bias.detach().to(cdt).contiguous()
    return _clamped_scale(logit_scale, num_heads, cdt), table, _padding_token(qkv, qkv_bias)


def _clamped_scale(logit_scale, num_heads, cdt):
    """(heads,) exp(min(logit_scale, log 100)) in the compute dtype."""
    return torch.clamp(logit_scale.detach().reshape(num_heads).to(cdt), max=LOGIT_SCALE_MAX).exp().contiguous()


def _padding_token(qkv, qkv_bias):
    """The q/k/v bias in the projection's dtype, as the reference's padding token; qkv itself is the (never
    read) pointer when there is none."""
    return qkv_bias.detach().to(qkv.dtype).contiguous() if qkv_bias is not None else qkv


def _flags(qkv, qkv_bias, pad_order, head_dim, g: _Geometry, backward=False):
    """The kernels' compile-time flags and launch options. Without padding the padding order and the bias
    change nothing the kernels compute (no row reads the bias), so they are not told apart: fewer
    specialisations."""
    arch = _arch(qkv)  # the launch's device: a tile sweep's record applies on its architecture only
    block_m, block_n, num_warps = block_config(g.N, head_dim, qkv.dtype, backward, arch)
    padded = g.HP * g.WP != g.H * g.W
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=channel_block(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                 SHIFTED=g.SH > 0 or g.SW > 0, PADDED=padded,
                 ROLL_THEN_PAD=padded and pad_order == ROLL_THEN_PAD, HAS_BIAS=padded and qkv_bias is not None,
                 FULL_DOT=qkv.dtype in (torch.float32, torch.float64), num_warps=num_warps,
                 maxnreg=register_cap(g.N, head_dim, qkv.dtype, backward, arch, padded))
    stages = launch_stages(g.N, head_dim, qkv.dtype, backward, arch)
    if stages is not None:  # only a sweep's record or override: otherwise today's launch, Triton's default
        flags["num_stages"] = stages
    return flags


def _arch(t: torch.Tensor) -> int:
    """The compute capability the launch compiles for (90 off CUDA: the interpreter ignores the register
    cap, and the cost report re-caps its recorded launches per target)."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


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


def _forward_table(qkv: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
    """The position-bias table as the forward reads it: as it arrives when that is the projection's dtype or
    the compute dtype (a bf16/fp16 model passes a bf16/fp16 table: no per-call fp32 copy, half the bytes;
    under autocast it arrives fp32 beside a bf16/fp16 projection and is read as it is, fp32: the logits keep
    the table's precision and nothing is copied), else converted to the compute dtype. The kernel adds it in
    the compute dtype either way. (The backward takes `_small_operands`'s compute-dtype table.)"""
    table = position_bias.detach()
    if table.dtype not in (qkv.dtype, _compute_dtype(qkv.dtype)):
        table = table.to(_compute_dtype(qkv.dtype))
    return table.contiguous()


def window_attention_triton_forward(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    geometry: WindowGeometry,
) -> torch.Tensor:
    """Launch the fused forward. Returns the output (B, H*W, C); the backward recomputes what it needs.

    Inputs as in `window_attention_reference` (validated by the caller). qkv's channel dimension must be
    contiguous; batch and token strides are free.
    """
    B, L, C3 = qkv.shape
    num_heads = geometry.num_heads
    head_dim = C3 // 3 // num_heads
    if not head_dim_supported(head_dim):
        raise ValueError(f"the Triton kernels support head_dim 1 to {MAX_HEAD_DIM}, got {head_dim}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv's last dimension must be contiguous (stride 1), got strides {qkv.stride()}")
    g = _geometry(qkv, geometry)
    scale = _clamped_scale(logit_scale, num_heads, _compute_dtype(qkv.dtype))
    table = _forward_table(qkv, position_bias)
    bias = _padding_token(qkv, qkv_bias)
    out = torch.empty((B, L, g.C), device=qkv.device, dtype=qkv.dtype)
    if B == 0:
        return out
    flags = _flags(qkv, qkv_bias, geometry.pad_order, head_dim, g)
    row_blocks = triton.cdiv(g.N, flags["BLOCK_M"])
    for window_set, windows in window_sets(g):
        pairs = B * windows  # (image, window) pairs of this launch
        wpp = windows_per_program(pairs, row_blocks, num_heads, _multiprocessors(qkv))
        _window_attention_fwd_kernel[(triton.cdiv(pairs, wpp) * row_blocks, num_heads)](
            QKV=qkv, QKV_BIAS=bias, SCALE=scale, POSITION_BIAS=table, OUT=out,
            stride_qkv_b=qkv.stride(0), stride_qkv_t=qkv.stride(1), stride_out_b=out.stride(0),
            stride_out_t=out.stride(1), NUM_BW=pairs, mask_value=geometry.mask_value, WINDOW_SET=window_set,
            WINDOWS_PER_PROGRAM=wpp, **g._asdict(), **flags)
    return out
