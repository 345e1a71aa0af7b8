"""The `@triton.jit` helpers the forward (triton_forward.py) and the backward kernels (triton_backward.py) share:
the index arithmetic from window positions to tokens, the loads of projection rows, the normalisation and its
gradient, the dots, the logits and the softmax's exponentials.

How the helpers take the geometry: as tuples the kernels build once, unpacked where they are used.
`grid` = (H, W, HP, WP, SH, SW, RSH, RSW) runtime ints; `layout` = (WH, WW, SHIFTED, PADDED, ROLL_THEN_PAD),
built as `layout: tl.constexpr` and taken as a `tl.constexpr` argument (a plain tuple of constexprs reaches a
helper as runtime values: the window shape's `//` and `%` become divisions and the flags branches);
`proj` = (the image's projection and the bias at the head's q channels, the token stride, C); `rows` = a block's
(token, padding flag, shift region) from `_window_rows`. tests/test_kernel_source.py holds the helpers to at
most 10 arguments and 3 returned values.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .tiles import INTERPRETED

# Triton decides at decoration (the import of the Triton files) whether a kernel runs under its interpreter;
# the dispatch decided it from the same variable when swinv2_fast was imported (tiles.INTERPRETED). A value
# changed in between would send CPU tensors to compiled kernels, or GPU tensors to the interpreter.
if (os.environ.get("TRITON_INTERPRET", "0") == "1") != INTERPRETED:
    raise RuntimeError(
        "TRITON_INTERPRET changed after swinv2_fast was imported (kernels/tiles.py read it then; Triton reads it "
        "now, as it decorates the kernels): set it before importing swinv2_fast"
    )

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
    H, W, HP, WP, _SH, _SW, RSH, RSW = grid
    WH, WW, SHIFTED, _PADDED, ROLL_THEN_PAD = layout
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
    BLOCK_D is HEAD_DIM rounded up to a power of two of at least 16 (what tl.arange and tl.dot take; the rows
    kernel's at least 32: `tiles.rows_channel_block`); the
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
def _widen(x, dtype: tl.constexpr):
    """x in `dtype`, the compute dtype. Compiled, bf16 to fp32 takes one bit operation per element (of a packed pair:
    the low one shifted up, the high one masked), where Triton's conversion takes a permute and a shift for
    the high one; exact either way (a bf16 is the top half of its fp32)."""
    if _FAST_EXP:
        if x.dtype == tl.bfloat16 and dtype == tl.float32:
            return tl.inline_asm_elementwise(
                "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }",
                "=r,=r,r",
                [x],
                dtype=tl.float32,
                is_pure=True,
                pack=2,
            )
    return x.to(dtype)


@triton.jit
def _row_norm(b_x):
    """[ROWS] max(||x||, 1e-12) of each row of b_x (compute dtype)."""
    return tl.maximum(tl.sqrt(tl.sum(b_x * b_x, axis=1)), 1e-12)


@triton.jit
def _l2_normalize(b_x, CDT: tl.constexpr):
    """x / max(||x||, 1e-12) per row in the compute dtype, and the clamped norm max(||x||, 1e-12)."""
    b_x = _widen(b_x, CDT)
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
    b_s = b_qk + _widen(b_bias, b_qk.dtype)
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
    o_tok, m_pad, _o_reg = rows
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
def _query_rows(proj, rows, m_m, cols, b_scale, HAS_BIAS: tl.constexpr, CDT: tl.constexpr, DDT: tl.constexpr):
    """Query rows of a window (`proj`, `rows` as in _key_rows): q normalised (compute dtype) [BLOCK_M,
    BLOCK_D], its clamped norm [BLOCK_M], and q times the clamped logit scale b_scale (dot dtype)."""
    p_qkv, p_bias, stride_t, _C = proj
    o_tok, m_pad, _o_reg = rows
    # [BLOCK_M, BLOCK_D]
    b_q = _load_rows(p_qkv, p_bias, o_tok, m_m, m_pad, cols, stride_t, HAS_BIAS)
    b_qn, b_rq = _l2_normalize(b_q, CDT)
    return b_qn, b_rq, (b_qn * b_scale).to(DDT)


@triton.jit
def _exp2(x):
    """2^x, elementwise; see _FAST_EXP."""
    if _FAST_EXP:
        if x.dtype == tl.float32:
            return tl.inline_asm_elementwise(
                "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
            )
    return tl.exp2(x)


@triton.jit
def _exp(x):
    """exp(x), elementwise; see _FAST_EXP."""
    return _exp2(x * LOG2E)


@triton.jit
def _online_softmax_step(b_s, b_m):
    """One key block of an online softmax over rows of natural logits b_s: the new row max, the factor
    rescaling what was summed under the old max, and exp(S - new max)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    return b_m_new, _exp(b_m - b_m_new), _exp(b_s - b_m_new[:, None])
