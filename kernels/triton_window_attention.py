"""Fused Swin V2 window attention in Triton: the forward of `window_attention_reference` (one kernel; a shifted grid
runs it as two launches, the windows off the shifted border and the border windows) and its four backward kernels.

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

What is compile-time. The window's height, width and N, whether it is shifted and whether the grid is
padded (then the padding order and whether there is a q/k/v bias) are constexprs: a model has a handful of
windows, hence a handful of specialisations, and the per-score work has no `//` or `%` on runtime values
(the roll is undone with one conditional subtraction), no shift mask in unshifted blocks, no key masking
when the key tile divides N, no padding checks without padding. On a shifted grid the forward runs the
windows off the shifted border (most of them) as a launch of its own without the shift mask, and the border
windows apart. The forward takes exp(S - m) as 2^(S log2 e - m log2 e), one multiply-add per score, and
compiled kernels take 2^x as the hardware's ex2.
The cost of each kernel, counted from its SASS, is `compile_check --cost` (kernels/cost.py).
"""
from __future__ import annotations

import functools
import json
import os
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import LOGIT_SCALE_MAX, PAD_THEN_ROLL, ROLL_THEN_PAD, _pair, window_attention_reference

__all__ = ["fused_backward_supported", "window_attention_triton_forward", "window_attention_triton_backward",
           "window_attention_fused", "window_attention_fused_backward", "fused_window_attention",
           "block_config", "register_cap", "head_dim_supported", "channel_block", "MAX_HEAD_DIM", "INTERPRETED"]

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
def _window_rows(o_pos, i_wy, i_wx, grid, WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr,
                 PADDED: tl.constexpr, ROLL_THEN_PAD: tl.constexpr, MASKED: tl.constexpr = True):
    """[ROWS] token index, padding flag and shift region of window positions `o_pos` of window (i_wy, i_wx);
    the regions are all 0 without a shift, or with MASKED false (windows off the shifted border).
    `grid` = (H, W, HP, WP, SH, SW, RSH, RSW): the image, the padded grid, the shift and the shift reduced
    modulo the extent it rolls (H, W for roll-then-pad; HP, WP for pad-then-roll). The window's shape is a
    compile-time constant, so `//` and `%` by WW are shifts or multiplications."""
    H, W, HP, WP, SH, SW, RSH, RSW = grid
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
def _padding_index(o_pos, i_wy, i_wx, grid, WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr,
                   ROLL_THEN_PAD: tl.constexpr):
    """[ROWS] index of padded window positions among an image's Hp*Wp - H*W padded positions 0, 1, ..."""
    H, W, HP, WP, SH, SW, RSH, RSW = grid
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
def _key_block(p_qkv, p_bias, o_n, m_n, i_wy, i_wx, cols, stride_t, grid, C, WH: tl.constexpr, WW: tl.constexpr,
               SHIFTED: tl.constexpr, PADDED: tl.constexpr, ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
               CDT: tl.constexpr, MASKED: tl.constexpr = True):
    """Key rows o_n of a window (p_qkv, p_bias: the image's projection and the bias at this head's q
    channels): normalised k (compute dtype) and v (projection dtype), [BLOCK_N, BLOCK_D] each, and the
    rows' shift-mask regions [BLOCK_N]."""
    o_tok_n, m_pad_n, o_reg_n = _window_rows(o_n, i_wy, i_wx, grid, WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD, MASKED)
    # [BLOCK_N, BLOCK_D]
    b_k = _load_rows(p_qkv + C, p_bias + C, o_tok_n, m_n, m_pad_n, cols, stride_t, HAS_BIAS)
    b_v = _load_rows(p_qkv + 2 * C, p_bias + 2 * C, o_tok_n, m_n, m_pad_n, cols, stride_t, HAS_BIAS)
    b_kn, b_rk = _l2_normalize(b_k, CDT)
    return b_kn, b_v, o_reg_n


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
def _query_rows(p_qkv, p_bias, b_scale, o_m, m_m, i_w2, cols, stride_t, grid, WH: tl.constexpr, WW: tl.constexpr,
                SHIFTED: tl.constexpr, PADDED: tl.constexpr, ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                CDT: tl.constexpr, DDT: tl.constexpr):
    """Query rows o_m of window i_w2 = (row, column): the rows' (token, padding flag, shift region), and
    (q normalised (compute dtype), its clamped norm, q times the clamped logit scale b_scale (dot dtype))."""
    i_wy, i_wx = i_w2
    o_tok_m, m_pad_m, o_reg_m = _window_rows(o_m, i_wy, i_wx, grid, WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)
    # [BLOCK_M, BLOCK_D]
    b_q = _load_rows(p_qkv, p_bias, o_tok_m, m_m, m_pad_m, cols, stride_t, HAS_BIAS)
    b_qn, b_rq = _l2_normalize(b_q, CDT)
    return (o_tok_m, m_pad_m, o_reg_m), (b_qn, b_rq, (b_qn * b_scale).to(DDT))


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
def _window_attention_fwd_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, OUT,
    stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, SH, SW, RSH, RSW, C, NUM_HEADS,
    mask_value,
    WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr, WINDOW_SET: tl.constexpr = 0,
):
    """The output rows of BLOCK_M query rows of one window, one head: program (row block of an (image,
    window) pair of WINDOW_SET, head). The window (WH x WW = N tokens) and whether it is shifted or padded are
    compile-time constants: a model has a handful of windows, hence a handful of specialisations. A shifted
    grid takes two launches: the windows off the shifted border, which have no shift mask (INTERIOR_WINDOWS),
    and the border (BORDER_WINDOWS)."""
    tl.static_assert(N == WH * WW)
    tl.static_assert((WINDOW_SET == 0) | SHIFTED)
    MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1  # the shift mask: in shifted windows on the border
    CDT: tl.constexpr = SCALE.dtype.element_ty  # compute dtype: fp32 (fp64 for fp64 inputs)
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty  # dot operand dtype
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    i_bwm, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_w, i_w2 = _window_in_set(i_bwm // NUM_M, NUM_WINDOWS, NUM_WX, WINDOW_SET)
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    o_m = (i_bwm % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = _in_window(o_m, N, BLOCK_M)
    p_qkv = QKV + i_b * stride_qkv_b + i_h * HEAD_DIM
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    o_tok_m, m_pad_m, o_reg_m = _window_rows(o_m, i_w2[0], i_w2[1], grid, WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD,
                                             MASKED)
    # [BLOCK_M, BLOCK_D]: q times scale / max(||q||, 1e-12), one factor per row (the backward keeps the
    # normalised q apart); natural logits (the bias tile can start the dot's accumulator); the softmax takes
    # 2^x with log2(e) folded into the subtraction of the row max (one multiply-add per score)
    b_q = _load_rows(p_qkv, p_bias, o_tok_m, m_m, m_pad_m, cols, stride_qkv_t, HAS_BIAS).to(CDT)
    b_qs = (b_q * (tl.load(SCALE + i_h) / _row_norm(b_q))[:, None]).to(DDT)

    # [BLOCK_M]
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=CDT)
    b_l = tl.zeros([BLOCK_M], dtype=CDT)
    # [BLOCK_M, BLOCK_D]
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = _in_window(o_n, N, BLOCK_N)
        b_kn, b_v, o_reg_n = _key_block(p_qkv, p_bias, o_n, m_n, i_w2[0], i_w2[1], cols, stride_qkv_t, grid, C, WH,
                                        WW, SHIFTED, PADDED, ROLL_THEN_PAD, HAS_BIAS, CDT, MASKED)
        # [BLOCK_M, BLOCK_N]
        b_bias = _bias_tile(p_bias_h, o_m, o_n, m_m, m_n, N, EVEN)
        b_s = _logits(_dot(b_qs, tl.trans(b_kn.to(DDT)), FULL_DOT), b_bias, o_reg_m, o_reg_n, m_n,
                      mask_value, MASKED, MASK_N)
        b_m, b_alpha, b_p = _online_softmax_step_scaled(b_s, b_m)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(DDT), b_v.to(DDT), FULL_DOT)

    b_out = b_acc * (1.0 / b_l)[:, None]
    p_out = OUT + i_b * stride_out_b + o_tok_m[:, None] * stride_out_t + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=_tile_mask(m_m & ~m_pad_m, m_d))


@triton.jit
def _window_attention_bwd_stats_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, SH, SW, RSH, RSW, C, NUM_HEADS, L,
    mask_value,
    WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, PADDED: tl.constexpr,
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
    tl.static_assert(N == WH * WW)
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    i_bwm, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_w, i_w2 = _window_of(i_bwm // NUM_M, NUM_WINDOWS, NUM_WX)
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    o_m = (i_bwm % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = _in_window(o_m, N, BLOCK_M)
    p_qkv = QKV + i_b * stride_qkv_b + i_h * HEAD_DIM
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    rows_m, q_m = _query_rows(
        p_qkv, p_bias, tl.load(SCALE + i_h), o_m, m_m, i_w2, cols, stride_qkv_t, grid, WH, WW, SHIFTED, PADDED,
        ROLL_THEN_PAD, HAS_BIAS, CDT, DDT)
    o_tok_m, m_pad_m, o_reg_m = rows_m  # flat targets: triton 3.6 cannot bind nested ones
    b_qn, b_rq, b_qs = q_m
    m_real_m = m_m & ~m_pad_m
    # [BLOCK_M, BLOCK_D]
    b_do = tl.load(DOUT + i_b * stride_do_b + o_tok_m[:, None] * stride_do_t + i_h * HEAD_DIM + o_d[None, :],
                   mask=_tile_mask(m_real_m, m_d), other=0.0).to(DDT)
    # online softmax as in the forward, with sum_j exp(S_ij - m_i) dP_ij carried beside the row sum; [BLOCK_M]
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=CDT)
    b_l = tl.zeros([BLOCK_M], dtype=CDT)
    b_pdp = tl.zeros([BLOCK_M], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = _in_window(o_n, N, BLOCK_N)
        b_kn, b_v, o_reg_n = _key_block(p_qkv, p_bias, o_n, m_n, i_w2[0], i_w2[1], cols, stride_qkv_t, grid, C, WH,
                                        WW, SHIFTED, PADDED, ROLL_THEN_PAD, HAS_BIAS, CDT)
        # [BLOCK_M, BLOCK_N]
        b_bias = _bias_tile(p_bias_h, o_m, o_n, m_m, m_n, N, EVEN)
        b_s = _logits(_dot(b_qs, tl.trans(b_kn.to(DDT)), FULL_DOT), b_bias, o_reg_m, o_reg_n, m_n,
                      mask_value, SHIFTED, MASK_N)
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
def _load_stats(STATS, i_b, i_w, i_h, o_m, m_m, N: tl.constexpr, NUM_WINDOWS, NUM_HEADS):
    """Row max and log row sum of the forward's softmax for window rows o_m; [BLOCK_M] each."""
    p_stats = STATS + (((i_b * NUM_HEADS + i_h) * NUM_WINDOWS + i_w) * N + o_m) * 2
    return tl.load(p_stats, mask=m_m, other=0.0), tl.load(p_stats + 1, mask=m_m, other=0.0)


@triton.jit
def _probs(b_s, b_rmax, b_logl, m_m, MASK_M: tl.constexpr):
    """[BLOCK_M, BLOCK_N] P recomputed from the saved statistics; zero for rows beyond the window."""
    b_p = _exp((b_s - b_rmax[:, None]) - b_logl[:, None])
    if MASK_M:
        b_p = tl.where(m_m[:, None], b_p, 0.0)
    return b_p


@triton.jit
def _load_query_grads(DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real, o_tok, cols, stride_do_b, stride_do_t,
                      L, N: tl.constexpr, NUM_WINDOWS, NUM_HEADS, HEAD_DIM: tl.constexpr):
    """dO rows [BLOCK_M, BLOCK_D] (zero for padded and out-of-window rows, which have no output, and beyond the
    head's channels), and the softmax statistics and delta [BLOCK_M]."""
    o_d, m_d = cols
    b_do = tl.load(DOUT + i_b * stride_do_b + o_tok[:, None] * stride_do_t + i_h * HEAD_DIM + o_d[None, :],
                   mask=_tile_mask(m_real, m_d), other=0.0)
    b_rmax, b_logl = _load_stats(STATS, i_b, i_w, i_h, o_m, m_m, N, NUM_WINDOWS, NUM_HEADS)
    b_delta = tl.load(DELTA + i_b * L * NUM_HEADS + o_tok * NUM_HEADS + i_h, mask=m_real, other=0.0)
    return b_do, (b_rmax, b_logl), b_delta


@triton.jit
def _window_attention_bwd_dq_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA, DQKV,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t, stride_dqkv_b, stride_dqkv_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, SH, SW, RSH, RSW, C, NUM_HEADS, L,
    mask_value,
    WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    """dq for BLOCK_M query rows of one window and head; padded query rows have no output, hence no dq."""
    tl.static_assert(N == WH * WW)
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    MASK_M: tl.constexpr = N % BLOCK_M != 0
    i_bwm, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_w, i_w2 = _window_of(i_bwm // NUM_M, NUM_WINDOWS, NUM_WX)
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    o_m = (i_bwm % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = _in_window(o_m, N, BLOCK_M)
    p_qkv = QKV + i_b * stride_qkv_b + i_h * HEAD_DIM
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    b_scale = tl.load(SCALE + i_h)
    rows_m, q_m = _query_rows(
        p_qkv, p_bias, b_scale, o_m, m_m, i_w2, cols, stride_qkv_t, grid, WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD,
        HAS_BIAS, CDT, DDT)
    o_tok_m, m_pad_m, o_reg_m = rows_m  # flat targets: triton 3.6 cannot bind nested ones
    b_qn, b_rq, b_qs = q_m
    m_real_m = m_m & ~m_pad_m
    b_do, stats_m, b_delta = _load_query_grads(
        DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real_m, o_tok_m, cols, stride_do_b, stride_do_t, L, N,
        NUM_WINDOWS, NUM_HEADS, HEAD_DIM)
    b_rmax, b_logl = stats_m
    b_do = b_do.to(DDT)
    # [BLOCK_M, BLOCK_D]
    b_dqs = tl.zeros([BLOCK_M, BLOCK_D], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_n in range(0, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = _in_window(o_n, N, BLOCK_N)
        b_kn, b_v, o_reg_n = _key_block(p_qkv, p_bias, o_n, m_n, i_w2[0], i_w2[1], cols, stride_qkv_t, grid, C, WH,
                                        WW, SHIFTED, PADDED, ROLL_THEN_PAD, HAS_BIAS, CDT)
        b_kn = b_kn.to(DDT)
        # [BLOCK_M, BLOCK_N]
        b_bias = _bias_tile(p_bias_h, o_m, o_n, m_m, m_n, N, EVEN)
        b_s = _logits(_dot(b_qs, tl.trans(b_kn), FULL_DOT), b_bias, o_reg_m, o_reg_n, m_n,
                      mask_value, SHIFTED, MASK_N)
        b_p = _probs(b_s, b_rmax, b_logl, m_m, MASK_M)
        b_dp = _dot(b_do, tl.trans(b_v.to(DDT)), FULL_DOT)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dqs += _dot(b_ds.to(DDT), b_kn, FULL_DOT)
    b_dq = _l2_normalize_backward(b_qn, b_rq, b_dqs * b_scale)
    p_dq = DQKV + i_b * stride_dqkv_b + o_tok_m[:, None] * stride_dqkv_t + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_dq, b_dq.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_m, m_d))


@triton.jit
def _window_attention_bwd_dkdv_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA, DQKV, DPAD,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t, stride_dqkv_b, stride_dqkv_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, SH, SW, RSH, RSW, C, NUM_HEADS, L, NUM_PAD,
    mask_value,
    WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    """dk and dv for BLOCK_N key rows of one window and head. Every token is a key of exactly one window,
    so rows are stored, not accumulated; with a bias, padded key rows go to their own slot of DPAD
    (B, NUM_PAD, 2C: dk then dv), which the host sums into the k/v bias gradients."""
    tl.static_assert(N == WH * WW)
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    MASK_M: tl.constexpr = N % BLOCK_M != 0
    i_bwn, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_w, i_w2 = _window_of(i_bwn // NUM_N, NUM_WINDOWS, NUM_WX)
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
    o_n = (i_bwn % NUM_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = _in_window(o_n, N, BLOCK_N)
    o_tok_n, m_pad_n, o_reg_n = _window_rows(o_n, i_w2[0], i_w2[1], grid, WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD)

    p_qkv = QKV + i_b * stride_qkv_b + i_h * HEAD_DIM
    p_bias = QKV_BIAS + i_h * HEAD_DIM
    b_scale = tl.load(SCALE + i_h)
    # [BLOCK_N, BLOCK_D]
    b_k = _load_rows(p_qkv + C, p_bias + C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS)
    b_v = _load_rows(p_qkv + 2 * C, p_bias + 2 * C, o_tok_n, m_n, m_pad_n, cols, stride_qkv_t, HAS_BIAS).to(DDT)
    b_kn, b_rk = _l2_normalize(b_k, CDT)
    b_kn_d = b_kn.to(DDT)
    b_dkn = tl.zeros([BLOCK_N, BLOCK_D], dtype=CDT)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=CDT)
    p_bias_h = POSITION_BIAS + i_h * N * N
    for start_m in range(0, N, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = _in_window(o_m, N, BLOCK_M)
        rows_m, q_m = _query_rows(
            p_qkv, p_bias, b_scale, o_m, m_m, i_w2, cols, stride_qkv_t, grid, WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD,
            HAS_BIAS, CDT, DDT)
        o_tok_m, m_pad_m, o_reg_m = rows_m  # flat targets: triton 3.6 cannot bind nested ones
        b_qn, b_rq, b_qs = q_m
        m_real_m = m_m & ~m_pad_m
        b_do, stats_m, b_delta = _load_query_grads(
            DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real_m, o_tok_m, cols, stride_do_b, stride_do_t, L, N,
            NUM_WINDOWS, NUM_HEADS, HEAD_DIM)
        b_rmax, b_logl = stats_m
        b_do = b_do.to(DDT)
        # [BLOCK_M, BLOCK_N]
        b_bias = _bias_tile(p_bias_h, o_m, o_n, m_m, m_n, N, EVEN)
        b_s = _logits(_dot(b_qs, tl.trans(b_kn_d), FULL_DOT), b_bias, o_reg_m, o_reg_n, m_n,
                      mask_value, SHIFTED, MASK_N)
        # padded rows have dO = 0 and delta = 0, hence dS = 0; rows beyond the window have no softmax
        b_p = _probs(b_s, b_rmax, b_logl, m_m, MASK_M)
        b_dv += _dot(tl.trans(b_p.to(DDT)), b_do, FULL_DOT)
        b_dp = _dot(b_do, tl.trans(b_v), FULL_DOT)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dkn += _dot(tl.trans(b_ds.to(DDT)), b_qs, FULL_DOT)
    b_dk = _l2_normalize_backward(b_kn, b_rk, b_dkn)

    m_real_n = m_n & ~m_pad_n
    p_dk = DQKV + i_b * stride_dqkv_b + o_tok_n[:, None] * stride_dqkv_t + C + i_h * HEAD_DIM + o_d[None, :]
    tl.store(p_dk, b_dk.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_n, m_d))
    tl.store(p_dk + C, b_dv.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_n, m_d))
    if HAS_BIAS:  # without a bias padded keys are constant zeros: nothing to learn there
        if PADDED:
            o_pad_n = _padding_index(o_n, i_w2[0], i_w2[1], grid, WH, WW, SHIFTED, ROLL_THEN_PAD)
            m_padded_n = m_n & m_pad_n
            p_dpad = DPAD + i_b * NUM_PAD * (2 * C) + o_pad_n[:, None] * (2 * C) + i_h * HEAD_DIM + o_d[None, :]
            tl.store(p_dpad, b_dk.to(DPAD.dtype.element_ty), mask=_tile_mask(m_padded_n, m_d))
            tl.store(p_dpad + C, b_dv.to(DPAD.dtype.element_ty), mask=_tile_mask(m_padded_n, m_d))


@triton.jit
def _window_attention_bwd_dbias_kernel(
    QKV, QKV_BIAS, SCALE, POSITION_BIAS, DOUT, STATS, DELTA, DBIAS, DSCALE,
    stride_qkv_b, stride_qkv_t, stride_do_b, stride_do_t,
    H, W, HP, WP, NUM_WX, NUM_WINDOWS, SH, SW, RSH, RSW, C, NUM_HEADS, L, NUM_BW, WINDOWS_PER_GROUP,
    mask_value,
    WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, PADDED: tl.constexpr,
    ROLL_THEN_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_DOT: tl.constexpr,
):
    """Partial gradients of the (heads, N, N) bias table and of the scale, summed over one group of
    WINDOWS_PER_GROUP consecutive (image, window) pairs in a fixed order: DBIAS (groups, heads, N, N) and
    DSCALE (groups, heads, tiles). The host sums the groups, so the reduction is deterministic."""
    tl.static_assert(N == WH * WW)
    CDT: tl.constexpr = SCALE.dtype.element_ty
    DDT: tl.constexpr = CDT if FULL_DOT else QKV.dtype.element_ty
    NUM_TN: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    NUM_TILES: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M * NUM_TN
    EVEN: tl.constexpr = (N % BLOCK_M) + (N % BLOCK_N) == 0
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    MASK_M: tl.constexpr = N % BLOCK_M != 0
    i_tile, i_h, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    grid = (H, W, HP, WP, SH, SW, RSH, RSW)
    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask
    o_d, m_d = cols
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
        i_b, i_w, i_w2 = _window_of(i_bw, NUM_WINDOWS, NUM_WX)
        p_qkv = QKV + i_b * stride_qkv_b + i_h * HEAD_DIM
        rows_m, q_m = _query_rows(
            p_qkv, p_bias, b_scale, o_m, m_m, i_w2, cols, stride_qkv_t, grid, WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD,
            HAS_BIAS, CDT, DDT)
        o_tok_m, m_pad_m, o_reg_m = rows_m  # flat targets: triton 3.6 cannot bind nested ones
        b_qn, b_rq, b_qs = q_m
        b_kn, b_v, o_reg_n = _key_block(p_qkv, p_bias, o_n, m_n, i_w2[0], i_w2[1], cols, stride_qkv_t, grid, C, WH,
                                        WW, SHIFTED, PADDED, ROLL_THEN_PAD, HAS_BIAS, CDT)
        m_real_m = m_m & ~m_pad_m
        b_do, stats_m, b_delta = _load_query_grads(
            DOUT, STATS, DELTA, i_b, i_w, i_h, o_m, m_m, m_real_m, o_tok_m, cols, stride_do_b, stride_do_t, L, N,
            NUM_WINDOWS, NUM_HEADS, HEAD_DIM)
        b_rmax, b_logl = stats_m
        b_kn = b_kn.to(DDT)
        # [BLOCK_M, BLOCK_N]
        b_qk = _dot(b_qs, tl.trans(b_kn), FULL_DOT)  # the q.k the other backward kernels compute, bitwise
        b_s = _logits(b_qk, b_bias, o_reg_m, o_reg_n, m_n, mask_value, SHIFTED, MASK_N)
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
# (kernels/tuned_tiles.json, read on a CUDA machine with compiled kernels only): "<dtype>/hd<head_dim>/N<n>/
# <fwd|bwd>" -> (BLOCK_M, BLOCK_N, num_warps, maxnreg).
TILE_OVERRIDES: Dict[str, Tuple[int, int, int, int]] = {}


@functools.lru_cache(maxsize=None)
def _recorded_tiles() -> Dict[str, Tuple[int, int, int, int]]:
    if INTERPRETED or not torch.cuda.is_available():
        return {}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_tiles.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return {key: tuple(value) for key, value in json.load(fh)["entries"].items()}


def _tuned(n: int, head_dim: int, dtype: torch.dtype, backward: bool) -> Optional[Tuple[int, int, int, int]]:
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype)
    if name is None:
        return None
    key = f"{name}/hd{head_dim}/N{n}/{'bwd' if backward else 'fwd'}"
    return TILE_OVERRIDES.get(key) or _recorded_tiles().get(key)


def block_config(n: int, head_dim: int, dtype: torch.dtype, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for windows of n tokens, head_dim and the projection dtype, of the
    forward kernel or of the backward kernels: a tile sweep's record where there is one, else the tables."""
    tuned = _tuned(n, head_dim, dtype, backward)
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


def register_cap(n: int, head_dim: int, dtype: torch.dtype, backward: bool = False, arch: int = 90,
                 padded: bool = False) -> int:
    """ptxas's register budget per thread for the kernels of this configuration on sm_<arch>: 128 for the
    16-bit forward with 128-row tiles on sm_90 without padding, with triton 3.8 or later (128 registers, no
    spills; sm_80, fp16 on a padded grid, and triton 3.6's build, which spills 88 B there, go uncapped),
    MAXNREG elsewhere."""
    tuned = _tuned(n, head_dim, dtype, backward)
    if tuned is not None:
        return tuned[3]
    if not backward and dtype in (torch.float16, torch.bfloat16) and channel_block(head_dim) <= 32 and n % 128 == 0 \
            and arch >= 90 and not padded and _TRITON_VERSION >= (3, 8):
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


def _geometry(qkv, grid_size, num_heads, window_size, shift_size, pad_order) -> _Geometry:
    H, W = _pair(grid_size, "grid_size")
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(shift_size, "shift_size")
    hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
    # timm rolls the un-padded grid (H, W), transformers the padded one (HP, WP)
    rsh, rsw = (sh % H, sw % W) if pad_order == ROLL_THEN_PAD else (sh % hp, sw % wp)
    C = qkv.shape[-1] // 3
    return _Geometry(H, W, hp, wp, wp // ww, (hp // wh) * (wp // ww), wh, ww, sh, sw, rsh, rsw, wh * ww, C,
                     num_heads)


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
    scale = torch.clamp(logit_scale.detach().reshape(num_heads).to(cdt), max=LOGIT_SCALE_MAX).exp().contiguous()
    table = position_bias.detach().to(cdt).contiguous()
    # the bias in the projection's dtype, as the reference's padding token; qkv itself is the (never read)
    # pointer when there is none
    bias = qkv_bias.detach().to(qkv.dtype).contiguous() if qkv_bias is not None else qkv
    return scale, table, bias


def _flags(qkv, qkv_bias, pad_order, head_dim, g: _Geometry, backward=False):
    """The kernels' compile-time flags and launch options. Without padding the padding order and the bias
    change nothing the kernels compute (no row reads the bias), so they are not told apart: fewer
    specialisations."""
    block_m, block_n, num_warps = block_config(g.N, head_dim, qkv.dtype, backward)
    padded = g.HP * g.WP != g.H * g.W
    return dict(HEAD_DIM=head_dim, BLOCK_D=channel_block(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                SHIFTED=g.SH > 0 or g.SW > 0, PADDED=padded,
                ROLL_THEN_PAD=padded and pad_order == ROLL_THEN_PAD, HAS_BIAS=padded and qkv_bias is not None,
                FULL_DOT=qkv.dtype in (torch.float32, torch.float64), num_warps=num_warps,
                maxnreg=register_cap(g.N, head_dim, qkv.dtype, backward, _arch(qkv), padded))


def _arch(t: torch.Tensor) -> int:
    """The compute capability the launch compiles for (90 off CUDA: the interpreter ignores the register
    cap, and the cost report re-caps its recorded launches per target)."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


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
    if not head_dim_supported(head_dim):
        raise ValueError(f"the Triton kernels support head_dim 1 to {MAX_HEAD_DIM}, got {head_dim}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv's last dimension must be contiguous (stride 1), got strides {qkv.stride()}")
    g = _geometry(qkv, grid_size, num_heads, window_size, shift_size, pad_order)
    scale, table, bias = _small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads)
    out = torch.empty((B, L, g.C), device=qkv.device, dtype=qkv.dtype)
    if B == 0:
        return out
    flags = _flags(qkv, qkv_bias, pad_order, head_dim, g)
    for window_set, windows in window_sets(g):
        _window_attention_fwd_kernel[(B * windows * triton.cdiv(g.N, flags["BLOCK_M"]), num_heads)](
            QKV=qkv, QKV_BIAS=bias, SCALE=scale, POSITION_BIAS=table, OUT=out,
            stride_qkv_b=qkv.stride(0), stride_qkv_t=qkv.stride(1), stride_out_b=out.stride(0),
            stride_out_t=out.stride(1), mask_value=float(mask_value), WINDOW_SET=window_set, **g._asdict(),
            **flags)
    return out


def _backward_statistics(grad_out, qkv, qkv_bias, logit_scale, position_bias, grid_size, num_heads, window_size,
                         shift_size, pad_order, mask_value):
    """Run the first backward kernel. Returns the geometry, the backward's tile flags, the clamped scale and
    the launch arguments every backward kernel shares, whose STATS (B, heads, nW * N * 2: (row max, log row
    sum) pairs) and DELTA (B, H*W, heads) it has filled."""
    B, L, C3 = qkv.shape
    g = _geometry(qkv, grid_size, num_heads, window_size, shift_size, pad_order)
    scale, table, bias = _small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    flags = _flags(qkv, qkv_bias, pad_order, C3 // 3 // num_heads, g, backward=True)
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
