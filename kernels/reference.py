"""The window-attention step of a Swin V2 block, in plain PyTorch: the contract every kernel implements.

One call takes the q/k/v projection of a feature map in token layout and returns the attention output
in token layout. Everything between (padding to a window multiple, cyclic shift, window partition,
cosine attention with the clamped learnable logit scale, the continuous-position-bias add, the
shifted-window mask, softmax, attention dropout, the product with v, window reverse, reverse shift
and crop) happens inside, in this order:

    tokens (B, H*W, 3C)                                          un-padded, un-shifted
      -> pad to (Hp, Wp) = window multiples, cyclic shift by (-sh, -sw)   in `pad_order`
      -> windows (B * nW, heads, N, head_dim) for q, k, v                 N = wh * ww
      -> S = normalize(q) @ normalize(k)^T * exp(min(logit_scale, log 100))
             + position_bias[h] + shift_mask[w]
      -> P = dropout(softmax(S));  O = P @ v
      -> back to the token each row came from                       (B, H*W, C)

Padding, shift and partition only move tokens, so the whole data movement is one gather index computed
from the grid and the window (`window_layout`) and applied to the data once on the way in and once,
inverted, on the way out. The fused kernel does the same arithmetic on its loads and stores.

Padded positions hold the projection of a zero token: q = q_bias, k = k_bias (zero in every published
model), v = v_bias. They are never masked (transformers and timm do not mask them either), so they
take part in the softmax of real tokens in windows that overhang the grid.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = [
    "PAD_THEN_ROLL",
    "ROLL_THEN_PAD",
    "PAD_ORDERS",
    "WindowLayout",
    "window_layout",
    "shift_mask",
    "window_attention_reference",
    "window_log_sum_exp",
]

PAD_THEN_ROLL = "pad_then_roll"  # transformers: pad the grid, then roll the padded grid
ROLL_THEN_PAD = "roll_then_pad"  # timm: roll the un-padded grid, then pad at the bottom/right
PAD_ORDERS = (PAD_THEN_ROLL, ROLL_THEN_PAD)

# exp(logit_scale) is clamped at 1 / 0.01 = 100, as in the paper and all three public codebases.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)

IntPair = Union[int, Sequence[int]]


def is_int(value) -> bool:
    """An integer: Python's or numpy's (any numbers.Integral) but not a bool, or a 0-d integer tensor (what
    sizes are while torch.jit.trace records; the trace then holds this call's value)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if is_int(value):
        return int(value), int(value)
    if isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


class WindowLayout(NamedTuple):
    """Where every window row comes from, for one grid, window, shift and padding order.

    gather_index:  (nW * N,) int64. Row r of the window layout (window r // N, position r % N) reads token
                   gather_index[r] of the un-padded grid; the value H * W stands for a padded position.
    scatter_index: (H * W,) int64. Token t of the un-padded grid is row scatter_index[t] of the window layout.
    region:        (nW, N) int64 shift-mask region of every window row, or None when there is no shift.
    """

    key: tuple  # (height, width, wh, ww, sh, sw, pad_order)
    padded_size: Tuple[int, int]
    num_windows: int
    needs_padding: bool
    gather_index: torch.Tensor
    scatter_index: torch.Tensor
    region: Optional[torch.Tensor]


def _partition(grid: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(Hp, Wp) -> (nW, wh * ww), windows in row-major order, tokens row-major inside a window."""
    hp, wp = grid.shape
    return grid.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


def _axis_region(size: int, window: int, shift: int) -> torch.Tensor:
    """Region of each padded position along one axis: [0, size - window), [size - window, size - shift),
    [size - shift, size). With no shift along the axis every position is in one region."""
    pos = torch.arange(size, device="cpu")
    if shift == 0:
        return torch.zeros(size, dtype=torch.long, device="cpu")
    return (pos >= size - window).long() + (pos >= size - shift).long()


def tensor_modes_active() -> bool:
    """Whether a tensor mode is active: a FakeTensorMode (torch.export, shape propagation) or any other
    dispatch mode, or a torch-function mode other than a default device (`torch.set_default_device`,
    `with torch.device(...)`, which the package's cached tensors do not depend on: they name their
    device). Tensors made under one are not ordinary tensors, so the package's caches neither keep nor
    serve anything then."""
    if is_in_torch_dispatch_mode():
        return True
    return torch._C._is_torch_function_mode_enabled() and any(
        not isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack())


def caching_allowed() -> bool:
    """Whether a value derived from tensors may be kept for later calls: not while torch.compile or
    torch.jit.trace records a graph (the graph must compute it) and not under a tensor mode (its tensors
    must not outlive it)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or tensor_modes_active())


def _build_window_layout(height, width, wh, ww, sh, sw, pad_order) -> WindowLayout:
    hp = -(-height // wh) * wh
    wp = -(-width // ww) * ww
    pad_id = height * width
    cpu = torch.device("cpu")  # named: a default device (torch.set_default_device) must not move the layout
    tokens = torch.arange(height * width, device=cpu).view(height, width)
    grid = torch.full((hp, wp), pad_id, dtype=torch.long, device=cpu)
    if pad_order == PAD_THEN_ROLL:
        grid[:height, :width] = tokens
        grid = torch.roll(grid, shifts=(-sh, -sw), dims=(0, 1))
    else:
        grid[:height, :width] = torch.roll(tokens, shifts=(-sh, -sw), dims=(0, 1))
    windows = _partition(grid, wh, ww)
    gather_index = windows.reshape(-1)
    position = torch.empty(pad_id + 1, dtype=torch.long, device=cpu)
    position[gather_index] = torch.arange(gather_index.numel(), device=cpu)
    scatter_index = position[:pad_id].clone()
    region = None
    if sh > 0 or sw > 0:
        region_grid = _axis_region(hp, wh, sh)[:, None] * 3 + _axis_region(wp, ww, sw)[None, :]
        region = _partition(region_grid, wh, ww)
    return WindowLayout(
        key=(height, width, wh, ww, sh, sw, pad_order),
        padded_size=(hp, wp),
        num_windows=windows.shape[0],
        needs_padding=(hp, wp) != (height, width),
        gather_index=gather_index,
        scatter_index=scatter_index,
        region=region,
    )


_window_layout_cpu = functools.lru_cache(maxsize=512)(_build_window_layout)


def check_geometry(grid_size: IntPair, window_size: IntPair, shift_size: IntPair, pad_order: str):
    """Validate and normalise ((H, W), (wh, ww), (sh, sw)); raises naming the argument."""
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
    return (height, width), (wh, ww), (sh, sw)


_device_layouts: dict = {}


@contextlib.contextmanager
def _not_traced():
    """Suspends torch.jit.trace's recording (if any) for the block."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _layout_on(layout: WindowLayout, device) -> WindowLayout:
    return layout._replace(gather_index=layout.gather_index.to(device),
                           scatter_index=layout.scatter_index.to(device),
                           region=None if layout.region is None else layout.region.to(device))


def window_layout(
    grid_size: IntPair,
    window_size: IntPair,
    shift_size: IntPair = 0,
    pad_order: str = PAD_THEN_ROLL,
    device: Union[str, torch.device, None] = None,
) -> WindowLayout:
    """The gather/scatter indices and mask regions of one (grid, window, shift, padding order), cached."""
    (height, width), (wh, ww), (sh, sw) = check_geometry(grid_size, window_size, shift_size, pad_order)
    if not torch.compiler.is_dynamo_compiling() and tensor_modes_active():
        # under a mode (fake or meta tensors, a device context) the layout is built in that mode, for this
        # call only: kept in the caches below it would serve every later call of the process
        layout = _build_window_layout(height, width, wh, ww, sh, sw, pad_order)
        return layout if device is None else _layout_on(layout, device)
    # Cached for the life of the process: built as normal tensors even when the first call comes under
    # inference_mode, so that a later training call can save them for backward; and never recorded by
    # torch.jit.trace, which sees the layout as constants whether this call built it or found it.
    with torch.inference_mode(False), _not_traced():
        layout = _window_layout_cpu(height, width, wh, ww, sh, sw, pad_order)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cpu":
            return layout
        key = (height, width, wh, ww, sh, sw, pad_order, device)
        cached = _device_layouts.get(key)
        if cached is None:
            cached = _device_layouts[key] = _layout_on(layout, device)
        return cached


def shift_mask(layout: WindowLayout, mask_value: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(nW, N, N): 0 where query and key share a shift region, `mask_value` elsewhere; None without shift."""
    if layout.region is None:
        return None
    different = layout.region[:, :, None] != layout.region[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=different.device)
    return torch.where(different, torch.full((), mask_value, dtype=dtype, device=different.device), zero)


def _combined_bias(position_bias, layout, mask_value):
    """(heads, nW, N, N) position bias plus shift mask, or (heads, 1, N, N) without a shift."""
    mask = shift_mask(layout, mask_value, position_bias.dtype)
    bias = position_bias.unsqueeze(1)
    return bias if mask is None else bias + mask.unsqueeze(0)


_SDPA_BIAS_MEMO_SIZE = 4


def _sdpa_bias(position_bias, layout, mask_value, dtype):
    """Position bias plus shift mask as the (1, heads * nW, N, N) mask of the fused attention.

    For a table that autograd does not track, the result is kept on the table tensor itself, keyed by its
    version counter (an in-place change invalidates it), the layout, the mask value and the dtype: in eval
    mode the models pass the same cached table every call, and building this would otherwise cost a copy
    of heads * nW * N * N values per call.
    """
    heads, n, _ = position_bias.shape

    def build():
        bias = _combined_bias(position_bias, layout, mask_value).to(dtype)
        return bias.expand(heads, layout.num_windows, n, n).reshape(1, heads * layout.num_windows, n, n)

    if not caching_allowed() or position_bias.requires_grad or torch.is_inference(position_bias):
        return build()
    key = (layout.key, float(mask_value), dtype)
    memo = position_bias.__dict__.setdefault("_swinv2_fast_sdpa_bias", {})
    entry = memo.pop(key, None)
    if entry is None or entry[0] != position_bias._version:
        entry = (position_bias._version, build())
    memo[key] = entry  # most recently used last
    while len(memo) > _SDPA_BIAS_MEMO_SIZE:  # a model uses one or two layouts per table; bound the rest
        memo.pop(next(iter(memo)))
    return entry[1]


def window_attention_reference(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    grid_size: IntPair,
    num_heads: int,
    window_size: IntPair,
    shift_size: IntPair = 0,
    pad_order: str = PAD_THEN_ROLL,
    mask_value: float = -100.0,
    dropout_p: float = 0.0,
    return_attention_probs: bool = False,
    fused_softmax: bool = True,
):
    """Swin V2 window attention from the q/k/v projection to the attention output, both in token layout.

    Args:
        qkv: (B, H*W, 3*C) projection of the un-padded, un-shifted feature map, channels ordered
            [q | k | v], each C = num_heads * head_dim with heads outermost.
        qkv_bias: (3*C,) the projection of a zero token, i.e. the concatenated biases [q_bias | k_bias | v_bias],
            used for padded positions; None means zero (no bias).
        logit_scale: (num_heads,) or (num_heads, 1, 1) learnable log-scale; exp(min(., log 100)) multiplies
            the cosine similarities.
        position_bias: (num_heads, N, N) continuous position bias already passed through 16 * sigmoid,
            N = wh * ww.
        grid_size: (H, W) of the token grid.
        num_heads: number of heads; C must divide by it.
        window_size: wh or (wh, ww).
        shift_size: cyclic shift (sh, sw), each in [0, window); 0 for regular windows.
        pad_order: PAD_THEN_ROLL (transformers) or ROLL_THEN_PAD (timm).
        mask_value: the value added to the scores of query/key pairs from different shift regions
            (-100 in timm and the official code; transformers adds -100 twice, i.e. -200).
        dropout_p: attention dropout on P; pass 0.0 outside training.
        return_attention_probs: also return P as (B * nW, num_heads, N, N).
        fused_softmax: softmax(S) @ v through `scaled_dot_product_attention` (the default); False forms S and
            P explicitly, the chain transformers and timm run (always so when P is returned). Same math.

    Returns:
        (B, H*W, C) attention output (before the output projection), and P if asked for.
    """
    B, L, C3 = qkv.shape
    height, width = _pair(grid_size, "grid_size")
    wh, ww = _pair(window_size, "window_size")
    C = C3 // 3
    head_dim = C // num_heads
    N = wh * ww
    layout = window_layout((height, width), (wh, ww), shift_size, pad_order, qkv.device)

    # Tokens -> windows: one gather. Index H*W is the padding token, the projection of a zero input.
    if layout.needs_padding:
        if qkv_bias is None:
            pad_token = qkv.new_zeros(B, 1, C3)
        else:
            pad_token = qkv_bias.to(qkv.dtype).view(1, 1, C3).expand(B, 1, C3)
        qkv = torch.cat([qkv, pad_token], dim=1)
    nW = layout.num_windows
    # One gather straight into head-major windows (3, B, heads, nW*N, head_dim), so that every later
    # reshape is a view.
    per_head = qkv.view(B, qkv.shape[1], 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    windows = per_head.index_select(3, layout.gather_index).view(3, B, num_heads, nW, N, head_dim)
    q, k, v = windows.unbind(0)  # each (B, heads, nW, N, head_dim)

    # Cosine attention with the clamped learnable scale, then position bias and shift mask.
    scale = torch.clamp(logit_scale.reshape(num_heads, 1, 1, 1), max=LOGIT_SCALE_MAX).exp()
    # Normalised in fp32 at least (fp64 stays fp64): in fp16 the epsilon 1e-12 underflows to 0 and a zero
    # row (k of a padded token without k bias) would give 0/0.
    norm_dtype = torch.promote_types(q.dtype, torch.float32)
    q = F.normalize(q.to(norm_dtype), dim=-1).to(q.dtype)
    k = F.normalize(k.to(norm_dtype), dim=-1).to(k.dtype)
    if return_attention_probs or not fused_softmax:
        bias = _combined_bias(position_bias, layout, mask_value)  # (heads, nW or 1, N, N)
        scores = (q @ k.transpose(-2, -1)) * scale + bias  # (B, heads, nW, N, N)
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        out = probs.to(v.dtype) @ v  # (B, heads, nW, N, head_dim)
    else:
        # The same softmax(S) @ v through PyTorch's fused attention, heads and windows as one batch axis.
        shape = (B, num_heads * nW, N, head_dim)
        out = F.scaled_dot_product_attention(
            (q * scale.to(q.dtype)).view(shape), k.view(shape), v.view(shape),
            attn_mask=_sdpa_bias(position_bias, layout, mask_value, q.dtype), dropout_p=dropout_p, scale=1.0,
        )

    # Windows -> tokens: rows of padded positions are dropped, every real token is picked once.
    out = out.reshape(B, num_heads, nW * N, head_dim).permute(0, 2, 1, 3)  # (B, nW*N, heads, head_dim)
    out = out.index_select(1, layout.scatter_index).view(B, L, C)
    if return_attention_probs:
        return out, probs.transpose(1, 2).reshape(B * nW, num_heads, N, N)
    return out


def window_log_sum_exp(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    grid_size: IntPair,
    num_heads: int,
    window_size: IntPair,
    shift_size: IntPair = 0,
    pad_order: str = PAD_THEN_ROLL,
    mask_value: float = -100.0,
) -> torch.Tensor:
    """log-sum-exp of every window row's scores, (B, num_heads, nW * N), rows in window order, in fp32 (fp64
    for fp64 inputs): what the fused forward saves for its backward. Literal: forms all N x N scores."""
    B, _, C3 = qkv.shape
    cdt = torch.promote_types(qkv.dtype, torch.float32)
    layout = window_layout(grid_size, window_size, shift_size, pad_order, qkv.device)
    n = layout.gather_index.numel() // layout.num_windows
    pad = qkv.new_zeros(C3, dtype=cdt) if qkv_bias is None else qkv_bias.to(cdt)
    tokens = torch.cat([qkv.to(cdt), pad.expand(B, 1, C3)], 1)[:, layout.gather_index]
    windows = tokens.view(B, layout.num_windows, n, 3, num_heads, C3 // 3 // num_heads)
    q = F.normalize(windows[:, :, :, 0], dim=-1).permute(0, 3, 1, 2, 4)  # (B, heads, nW, N, d)
    k = F.normalize(windows[:, :, :, 1], dim=-1).permute(0, 3, 1, 2, 4)
    scale = torch.clamp(logit_scale.to(cdt).reshape(num_heads, 1, 1, 1), max=LOGIT_SCALE_MAX).exp()
    scores = (q @ k.transpose(-1, -2)) * scale + position_bias.to(cdt)[:, None]
    mask = shift_mask(layout, mask_value, cdt)
    if mask is not None:
        scores = scores + mask
    return scores.logsumexp(-1).reshape(B, num_heads, -1)
