"""What the launchers (triton_forward.py, triton_backward.py) hand every kernel, computed on the host without
Triton: the launch integers (`LaunchDims`), the compile-time flags and launch options (`launch_flags`), and
the small operands in the compute dtype (`small_operands`).

The custom op passes the geometry as its schema's plain values (grid_size, num_heads, window_size,
shift_size, pad_order, mask_value), which `swinv2_fast.window_attention` validated once (`WindowGeometry`,
kernels/geometry.py); `launch_dims` turns them into the kernels' integers with the same derived sizes as
`WindowGeometry` (padded grid, windows per axis, roll shift) and refuses, with a cheap guard, what that
validation rules out (a direct call of the op with such values would otherwise read out of bounds).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .geometry import LOGIT_SCALE_MAX, PAD_ORDERS, ROLL_THEN_PAD
from .tiles import block_config, channel_block, forward_window_tiles, launch_stages, register_cap

__all__ = [
    "LaunchDims",
    "clamped_scale",
    "compute_dtype",
    "device_arch",
    "launch_dims",
    "launch_flags",
    "padding_token",
    "small_operands",
]


class LaunchDims(NamedTuple):
    """The integers every kernel takes, derived once per launcher call: the window's shape (WH, WW, N) is a
    compile-time constant of the kernels, the rest are runtime arguments (keyword arguments of the kernels,
    by these names)."""

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

    @property
    def num_pad(self) -> int:
        """Padded positions per image: Hp * Wp - H * W."""
        return self.HP * self.WP - self.H * self.W


def launch_dims(
    qkv: torch.Tensor,
    grid_size: Sequence[int],
    num_heads: int,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    pad_order: str,
) -> LaunchDims:
    """The kernels' integers from the op's plain geometry (the derived sizes as `WindowGeometry` states them:
    the padded grid rounds the grid up to window multiples; the shift is reduced modulo the extent it rolls,
    the un-padded grid for ROLL_THEN_PAD, the padded one for PAD_THEN_ROLL). RuntimeError on values
    `WindowGeometry` rejects, or on a qkv whose tokens and channels do not fit them: they cannot reach here
    through `swinv2_fast.window_attention`."""
    (H, W), (wh, ww), (sh, sw) = grid_size, window_size, shift_size
    tokens, channels3 = qkv.shape[1], qkv.shape[-1]
    if not (
        H >= 1
        and W >= 1
        and 0 <= sh < wh
        and 0 <= sw < ww
        and num_heads >= 1
        and pad_order in PAD_ORDERS
        and tokens == H * W
        and channels3 % (3 * num_heads) == 0
    ):
        raise RuntimeError(
            f"swinv2_fast::window_attention_fused got a geometry its validation rules out (grid {grid_size}, "
            f"heads {num_heads}, window {window_size}, shift {shift_size}, {pad_order!r}) for qkv of shape "
            f"{tuple(qkv.shape)}; call it through swinv2_fast.window_attention, which validates the geometry"
        )
    hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
    extent = (H, W) if pad_order == ROLL_THEN_PAD else (hp, wp)
    return LaunchDims(
        H,
        W,
        hp,
        wp,
        wp // ww,
        (hp // wh) * (wp // ww),
        wh,
        ww,
        sh,
        sw,
        sh % extent[0],
        sw % extent[1],
        wh * ww,
        channels3 // 3,
        num_heads,
    )


def device_arch(t: torch.Tensor) -> int:
    """The compute capability the launch compiles for (90 off CUDA: the interpreter ignores the register
    cap, and the cost report and the spill gate redo what depends on the target for each, `tools.launches.for_arch`)."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


def launch_flags(qkv, qkv_bias, pad_order: str, head_dim: int, dims: LaunchDims, backward: bool = False) -> dict:
    """The kernels' compile-time flags and launch options. Without padding the padding order and the bias
    change nothing the kernels compute (no row reads the bias), so they are not told apart: fewer
    specialisations."""
    arch = device_arch(qkv)  # the launch's device: a tile sweep's record applies on its architecture only
    window = None if backward else forward_window_tiles(dims.N, head_dim, qkv.dtype, arch)
    whole: dict = {}
    if window is not None:  # whole-window programs (the forward's WHOLE_WINDOW, BLOCK_T)
        block_m, block_n, block_t, num_warps = window
        whole = dict(WHOLE_WINDOW=True, BLOCK_T=block_t)
    else:
        block_m, block_n, num_warps = block_config(dims.N, head_dim, qkv.dtype, backward, arch)
    padded = dims.HP * dims.WP != dims.H * dims.W
    flags = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=channel_block(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SHIFTED=dims.SH > 0 or dims.SW > 0,
        PADDED=padded,
        ROLL_THEN_PAD=padded and pad_order == ROLL_THEN_PAD,
        HAS_BIAS=padded and qkv_bias is not None,
        FULL_DOT=qkv.dtype in (torch.float32, torch.float64),
        num_warps=num_warps,
        maxnreg=register_cap(dims.N, head_dim, qkv.dtype, backward, arch, padded, bool(whole)),
        **whole,
    )
    stages = launch_stages(dims.N, head_dim, qkv.dtype, backward, arch)
    if stages is not None:  # a sweep's record or override, or the 16-bit tables' (tiles.launch_stages)
        flags["num_stages"] = stages
    return flags


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def small_operands(qkv, qkv_bias, logit_scale, position_bias, num_heads):
    """The scale exp(min(logit_scale, log 100)), the table and the bias in the compute dtype, contiguous: under
    autocast they arrive fp32 beside an fp16/bf16 projection; one kernel specialization per projection dtype."""
    cdt = compute_dtype(qkv.dtype)
    table = position_bias.detach().to(cdt).contiguous()
    return clamped_scale(logit_scale, num_heads, cdt), table, padding_token(qkv, qkv_bias)


def clamped_scale(logit_scale, num_heads, cdt):
    """(heads,) exp(min(logit_scale, log 100)) in the compute dtype."""
    return torch.clamp(logit_scale.detach().reshape(num_heads).to(cdt), max=LOGIT_SCALE_MAX).exp().contiguous()


def padding_token(qkv, qkv_bias):
    """The q/k/v bias in the projection's dtype, as the reference's padding token; qkv itself is the (never
    read) pointer when there is none."""
    return qkv_bias.detach().to(qkv.dtype).contiguous() if qkv_bias is not None else qkv
