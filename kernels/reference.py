"""The eager window-attention path the models run without the fused kernels: gather indices and PyTorch's SDPA.

The specification is `naive.py` (the literal pad/roll/partition chain, which the tests hold this module
to); this module computes the same thing faster, in this order:

    tokens (B, H*W, 3C)                                          un-padded, un-shifted
      -> pad to (Hp, Wp) = window multiples, cyclic shift by (-sh, -sw)   in `pad_order`
      -> windows (B, heads, nW, N, head_dim) for q, k, v                  N = wh * ww
      -> S = normalize(q) @ normalize(k)^T * exp(min(logit_scale, log 100))
             + position_bias[h] + shift_mask[w]
      -> P = dropout(softmax(S));  O = P @ v                             through scaled_dot_product_attention
      -> back to the token each row came from                       (B, H*W, C)

Padding, shift and partition only move tokens, so the whole data movement is one gather index computed
from the geometry (`window_layout`) and applied to the data once on the way in and once, inverted, on the
way out. The fused kernel does the same arithmetic on its loads and stores.

Padded positions hold the projection of a zero token: q = q_bias, k = k_bias (zero in every published
model), v = v_bias. They are never masked (transformers and timm do not mask them either), so they
take part in the softmax of real tokens in windows that overhang the grid.

State: two small process-wide least-recently-used caches, both bounded and both cleared by
`clear_caches()`: the gather/scatter indices per (geometry, device) (`LAYOUT_CACHE_SIZE` entries), and, for
position-bias tables autograd does not track (the models' eval-mode tables), the SDPA mask expanded from
the table (`SDPA_MASK_CACHE_SIZE` entries, each dropped as soon as its table is freed). Under torch.compile
both are computed in the graph; while torch.jit.trace records, masks are not kept (layouts are, built outside
the trace); under a tensor mode neither cache is read or filled (`caching_allowed`, `tensor_modes_active`).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from typing import Callable, Hashable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .geometry import (
    LOGIT_SCALE_MAX,
    PAD_ORDERS,
    PAD_THEN_ROLL,
    ROLL_THEN_PAD,
    IntPair,
    WindowGeometry,
    grid_needs_padding,
    takes_geometry,
)

__all__ = [
    "LOGIT_SCALE_MAX",
    "PAD_ORDERS",
    "PAD_THEN_ROLL",
    "ROLL_THEN_PAD",
    "WindowGeometry",
    "WindowLayout",
    "autograd_records",
    "cached_tensors",
    "caching_allowed",
    "clear_caches",
    "layout_of",
    "sdpa_serves",
    "shift_mask",
    "window_attention_reference",
    "window_layout",
]

# ------------------------------------------------------------------------------------------ torch internals
# Private torch APIs, each behind one function, because no public API answers the question. Checked on
# torch 2.11.0 (the GPU machine's stack) and 2.14.1 (this repository's pinned stack). Imported here, once, not
# per call: the checks run on every attention call.
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def _in_dispatch_mode() -> bool:
    """A TorchDispatchMode is active (FakeTensorMode under torch.export, FlopCounterMode, ...).
    Private: torch.utils._python_dispatch.is_in_torch_dispatch_mode; no public query exists."""
    return is_in_torch_dispatch_mode()


def _non_device_function_mode_active() -> bool:
    """A TorchFunctionMode other than a default device (`torch.set_default_device`, `with torch.device(...)`,
    which the cached tensors do not depend on: they name their device) is active.
    Private: torch._C._is_torch_function_mode_enabled, torch.overrides._get_current_function_mode_stack and
    torch.utils._device.DeviceContext (the mode a default device installs); no public query exists."""
    if not torch._C._is_torch_function_mode_enabled():
        return False
    return any(not isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack())


@contextlib.contextmanager
def _jit_trace_suspended():
    """Suspends torch.jit.trace's recording (if any) for the block, so that a cached layout built during a
    trace is made of plain tensors, not of values recorded into that trace's graph.
    Private: torch._C._get_tracing_state / _set_tracing_state; torch.jit has no public way to pause a trace."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _version_of(t: torch.Tensor) -> int:
    """The tensor's in-place version counter (moves on every in-place change, shared with its views).
    Private attribute `Tensor._version`; no public equivalent."""
    return t._version


def tensor_modes_active() -> bool:
    """Whether a tensor mode is active: a dispatch mode (e.g. FakeTensorMode: torch.export, shape
    propagation) or a torch-function mode other than a default device. Tensors made under one are not
    ordinary tensors, so the caches neither keep nor serve anything then."""
    return _in_dispatch_mode() or _non_device_function_mode_active()


def caching_allowed() -> bool:
    """Whether a value derived from tensors may be kept for later calls: not while torch.compile or
    torch.jit.trace records a graph (the graph must compute it) and not under a tensor mode (its tensors
    must not outlive it)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or tensor_modes_active())


# ------------------------------------------------------------------------------------------ bounded caches
class _LRU:
    """A thread-safe least-recently-used map holding at most `maxsize` entries."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._entries: collections.OrderedDict[Hashable, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._dropped: list = []  # keys whose removal a weakref callback could not take the lock for

    def get_or_build(
        self, key: Hashable, build: Callable[[], object], valid: Optional[Callable[[object], bool]] = None
    ):
        with self._lock:
            self._purge()
            entry = self._entries.get(key)
            if entry is not None and (valid is None or valid(entry)):
                self._entries.move_to_end(key)
                return entry
        entry = build()  # outside the lock: building may run arbitrary torch code
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return entry

    def discard(self, key: Hashable) -> None:
        """Drop `key`; safe from a weakref callback (which may run inside this cache's own critical section,
        during a garbage collection there: then the key is dropped by the next access)."""
        if self._lock.acquire(blocking=False):
            try:
                self._entries.pop(key, None)
            finally:
                self._lock.release()
        else:
            self._dropped.append(key)

    def _purge(self):
        while self._dropped:
            self._entries.pop(self._dropped.pop(), None)

    def values(self):
        with self._lock:
            self._purge()
            return list(self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._dropped.clear()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)

    # functools.lru_cache's names, for code written against the former cache
    cache_clear = clear

    def cache_info(self):
        return collections.namedtuple("CacheInfo", "currsize maxsize")(len(self), self.maxsize)


# A model uses at most two layouts per stage and input size (shifted and not): 16 hold a four-stage model at
# two input sizes. A miss costs one rebuild of a few small index tensors (0.14 ms for a 16x16 grid, 0.3 ms
# for 128x128, on one core of the CPU machine), against ~20 us for a hit.
LAYOUT_CACHE_SIZE = 16
# One entry per (table, geometry, dtype): 32 hold every block of the largest published model (24 blocks).
SDPA_MASK_CACHE_SIZE = 32

_layouts = _LRU(LAYOUT_CACHE_SIZE)
_sdpa_masks = _LRU(SDPA_MASK_CACHE_SIZE)


def clear_caches() -> None:
    """Empty both process-wide caches (layouts and SDPA masks)."""
    _layouts.clear()
    _sdpa_masks.clear()


def cached_tensors() -> int:
    """How many tensors the caches hold now."""
    layouts = sum(2 + (layout.region is not None) for layout in _layouts.values())
    return layouts + len(_sdpa_masks.values())


# ------------------------------------------------------------------------------------------ window layout
class WindowLayout(NamedTuple):
    """Where every window row comes from, for one grid, window, shift and padding order.

    gather_index:  (nW * N,) int64. Row r of the window layout (window r // N, position r % N) reads token
                   gather_index[r] of the un-padded grid; the value H * W stands for a padded position.
    scatter_index: (H * W,) int64. Token t of the un-padded grid is row scatter_index[t] of the window layout.
    region:        (nW, N) int64 shift-mask region of every window row, or None when there is no shift.
    """

    key: tuple  # WindowGeometry.layout_key: (height, width, wh, ww, sh, sw, pad_order)
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


def _axis_region(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Region of each padded position along one axis: [0, size - window), [size - window, size - shift),
    [size - shift, size). With no shift along the axis every position is in one region."""
    if shift == 0:
        return torch.zeros(size, dtype=torch.long, device=device)
    pos = torch.arange(size, device=device)
    return (pos >= size - window).long() + (pos >= size - shift).long()


def _build_window_layout(key: tuple, device: torch.device) -> WindowLayout:
    """The layout of `key` = WindowGeometry.layout_key, built on `device`.

    Index arithmetic only (no slice of a padded buffer, no branch on the grid): the same code builds the
    layout of a symbolic grid under torch.export with dynamic shapes, where a slice or a comparison of the
    grid with its padded size would specialise the program to the example's size. Padded-grid position
    (r, c) after the shift reads, with the roll by (-sh, -sw):
      PAD_THEN_ROLL: position ((r + sh) % Hp, (c + sw) % Wp) of the padded grid, a token where that lies in
                     the grid, the pad token elsewhere;
      ROLL_THEN_PAD: the pad token where r >= H or c >= W, else token ((r + sh) % H, (c + sw) % W).
    """
    height, width, wh, ww, sh, sw, pad_order = key
    hp = -(-height // wh) * wh
    wp = -(-width // ww) * ww
    pad_id = height * width
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    if pad_order == PAD_THEN_ROLL:
        src_r, src_c = (rows + sh) % hp, (cols + sw) % wp
        real = (src_r < height)[:, None] & (src_c < width)[None, :]
    else:
        real = (rows < height)[:, None] & (cols < width)[None, :]
        src_r, src_c = (rows + sh) % height, (cols + sw) % width
    token = src_r[:, None] * width + src_c[None, :]
    grid = torch.where(real, token, torch.full_like(token, 0) + pad_id)
    windows = _partition(grid, wh, ww)
    gather_index = windows.reshape(-1)
    # the inverse of the gather on the real tokens: token t sits at row scatter_index[t]
    position = torch.zeros(pad_id + 1, dtype=torch.long, device=device)
    position = position.scatter(0, gather_index, torch.arange(gather_index.numel(), device=device))
    scatter_index = position[:pad_id]
    region = None
    if sh > 0 or sw > 0:
        region_grid = _axis_region(hp, wh, sh, device)[:, None] * 3 + _axis_region(wp, ww, sw, device)[None, :]
        region = _partition(region_grid, wh, ww)
    return WindowLayout(
        key=key,
        padded_size=(hp, wp),
        num_windows=windows.shape[0],
        needs_padding=grid_needs_padding((height, width), (hp, wp)),
        gather_index=gather_index,
        scatter_index=scatter_index,
        region=region,
    )


def _cached_layout(key: tuple, device: Union[str, torch.device, None]) -> WindowLayout:
    # named, never the default device: a default device (torch.set_default_device) must not move the layout
    device = torch.device("cpu") if device is None else torch.device(device)
    cpu = torch.device("cpu")

    def build():  # on the CPU (tiny integer tensors), then copied where they are used
        layout = _build_window_layout(key, cpu)
        if device == cpu:
            return layout
        return layout._replace(
            gather_index=layout.gather_index.to(device),
            scatter_index=layout.scatter_index.to(device),
            region=None if layout.region is None else layout.region.to(device),
        )

    if torch.compiler.is_dynamo_compiling():
        # torch.compile records the construction into its graph (dynamo cannot enter the cache's lock)
        return build()
    if tensor_modes_active():
        # under a mode (fake or meta tensors, a device context) the layout is built in that mode, for this
        # call only: kept in the cache it would serve every later call of the process
        return build()

    def build_plain():
        # Built as normal tensors even when the first call comes under inference_mode, so that a later
        # training call can save them for backward; and never recorded by torch.jit.trace, which sees the
        # layout as constants whether this call built it or found it.
        with torch.inference_mode(False), _jit_trace_suspended():
            return build()

    return _layouts.get_or_build((key, device), build_plain)


def layout_of(geometry: WindowGeometry, device: Union[str, torch.device, None] = None) -> WindowLayout:
    """The gather/scatter indices and mask regions of `geometry` on `device` (CPU by default), cached."""
    return _cached_layout(geometry.layout_key, device)


def window_layout(
    grid_size: IntPair,
    window_size: IntPair,
    shift_size: IntPair = 0,
    pad_order: str = PAD_THEN_ROLL,
    device: Union[str, torch.device, None] = None,
) -> WindowLayout:
    """`layout_of` for a grid, window, shift and padding order given as ints or pairs (validated by
    `WindowGeometry`; the layout does not depend on heads or mask value)."""
    geometry = WindowGeometry.from_args(
        grid_size=grid_size,
        num_heads=1,
        window_size=window_size,
        shift_size=shift_size,
        pad_order=pad_order,
        mask_value=0.0,
    )
    return layout_of(geometry, device)


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


class _MaskEntry(NamedTuple):
    table: weakref.ref
    version: int
    data_ptr: int
    mask: torch.Tensor


def _sdpa_mask(position_bias, layout, mask_value, dtype):
    """Position bias plus shift mask as the (1, heads * nW, N, N) mask of the fused attention.

    For a table autograd does not track, the result is kept in the bounded `_sdpa_masks` cache, keyed by the
    table's identity, the layout, the mask value and the dtype, and checked against the table's version
    counter and storage (an in-place change or a new storage rebuilds it); the entry goes when the table is
    freed. In eval mode the models pass the same cached table every call, and building this costs a copy of
    heads * nW * N * N values per call, a large share of a small call's time on a CPU.
    """
    heads, n, _ = position_bias.shape

    def build():
        bias = _combined_bias(position_bias, layout, mask_value).to(dtype)
        return bias.expand(heads, layout.num_windows, n, n).reshape(1, heads * layout.num_windows, n, n)

    if not caching_allowed() or position_bias.requires_grad or torch.is_inference(position_bias):
        return build()
    key = (id(position_bias), layout.key, float(mask_value), dtype, position_bias.device)
    version, data_ptr = _version_of(position_bias), position_bias.data_ptr()

    def valid(entry: _MaskEntry) -> bool:
        return entry.table() is position_bias and entry.version == version and entry.data_ptr == data_ptr

    def build_entry() -> _MaskEntry:
        with torch.inference_mode(False), torch.no_grad():
            mask = build()

        def forget(_: object, key: Hashable = key) -> None:  # the weakref's callback: the table is gone
            _sdpa_masks.discard(key)

        return _MaskEntry(weakref.ref(position_bias, forget), version, data_ptr, mask)

    return _sdpa_masks.get_or_build(key, build_entry, valid).mask


def _sdpa_mask_dtype(q: torch.Tensor, position_bias: torch.Tensor) -> torch.dtype:
    """The dtype of SDPA's mask: on a CPU the table's precision where it is higher than q's (autocast's fp32
    table beside bf16 q: bias and shift mask are not rounded to bf16; the CPU kernel takes an fp32 mask with
    16-bit q); elsewhere q's dtype, which the GPU kernels require."""
    if q.device.type == "cpu":
        return torch.promote_types(q.dtype, position_bias.dtype)
    return q.dtype


def autograd_records(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a call on these tensors (None allowed): grad mode on and one of them requires
    grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def sdpa_serves(device: torch.device, dtype: torch.dtype, differentiated: bool) -> bool:
    """Whether softmax(S) @ v goes through PyTorch's fused attention (SDPA) or is formed explicitly (S, then
    P, then P @ v: the chain transformers and timm run, with S and the softmax in fp32 at least; the same
    math), for a call autograd differentiates (`differentiated`) or not. Measured per stage, dtype and mode
    with `python -m benchmarks.cpu_attention` (docs/benchmarks.md has its figures; a shared CPU moves them
    by 10-30% between runs):

    - on a GPU, SDPA;
    - on a CPU in bfloat16 where autograd differentiates the call, explicit: SDPA's CPU backward took
      1.2-1.6x the explicit chain's time per stage of SwinV2-T with a position bias that needs gradients (its
      math fallback) and 2.1-2.4x with a frozen one;
    - everywhere else on a CPU, SDPA: in bf16 inference, with the table's fp32 mask (`_sdpa_mask_dtype`),
      it was the more accurate of the two against the peers' chain, at 0.8-1.4x the explicit chain's speed
      per stage; in fp32 it keeps the fp32 tests' yardsticks (0.8-1.2x in inference, 0.9-1.3x in
      training); in float16 x86 CPUs without AVX512-FP16 or AMX-FP16 have no fp16 GEMM and the explicit
      chain took 3-6x SDPA's time. Under torch.compile too (inductor fusing the explicit chain was slower in
      bf16 and fp32 inference).
    """
    return device.type != "cpu" or dtype != torch.bfloat16 or not differentiated


# ------------------------------------------------------------------------------------------ the attention
class _PermuteRows(torch.autograd.Function):
    """`x.index_select(dim, index)` for an `index` that is a permutation, `inverse` its inverse: the backward
    is the inverse gather, where autograd's backward of index_select scatters with index_add_ into zeros
    (on a CPU several times the time of a gather; a bf16 training step spent ~4% of its time there). Forward
    mode (jvp) gathers the tangent; torch.func.vmap batches it by its generated rule (per-sample gradients)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, dim: int, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return x.index_select(dim, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim, ctx.index, ctx.inverse = inputs[1], inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(ctx.dim, ctx.inverse), None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        return x_t.index_select(ctx.dim, ctx.index)


def _move_rows(x: torch.Tensor, dim: int, index: torch.Tensor, inverse: Optional[torch.Tensor]) -> torch.Tensor:
    """x.index_select(dim, index); through `_PermuteRows` where autograd records the call, `index` is a
    permutation (`inverse` given: a grid without padding) and nothing traces it (torch.compile, export and
    torch.jit.trace differentiate index_select themselves)."""
    if inverse is not None and autograd_records(x) and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return _PermuteRows.apply(x, dim, index, inverse)
    return x.index_select(dim, index)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) along the last axis, computed in fp32 at least (fp64 stays fp64) and rounded
    once to x's dtype: in fp16 the epsilon underflows to 0 and a zero row (k of a padded token without k bias)
    would give 0/0, and in bf16 normalising in bf16 doubled the rounding error of q and k (the gradients of
    the logit scale most), for a few ms of a CPU forward."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1).to(x.dtype)


@takes_geometry
def window_attention_reference(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    geometry: WindowGeometry,
    dropout_p: float = 0.0,
    return_attention_probs: bool = False,
    fused_softmax: Optional[bool] = None,
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
        geometry: the `WindowGeometry`: grid (H, W), window, shift, padding order (PAD_THEN_ROLL,
            transformers; ROLL_THEN_PAD, timm), mask value (-100 in timm and the official code; transformers
            adds -100 twice, i.e. -200) and heads (C must divide by them). Or, instead of it, its keyword
            block `grid_size, num_heads, window_size, shift_size, pad_order, mask_value` (`takes_geometry`).
        dropout_p: attention dropout on P; pass 0.0 outside training.
        return_attention_probs: also return P as (B * nW, num_heads, N, N): the tensor the output is computed
            from (a gradient reaches it; P after dropout, as transformers returns it).
        fused_softmax: True: softmax(S) @ v through `scaled_dot_product_attention`; False: S and P formed
            explicitly, the chain transformers and timm run (always so when P is returned); None (the
            default): as `sdpa_serves` decides for the device, dtype and autograd. Same math.

    Returns:
        (B, H*W, C) attention output (before the output projection), and P if asked for.
    """
    g = geometry
    B, L, C3 = qkv.shape
    num_heads, N = g.num_heads, g.N
    C = C3 // 3
    head_dim = C // num_heads
    layout = layout_of(g, qkv.device)

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
    # Without padding the gather is a permutation of the tokens and the scatter below its inverse.
    inverse = None if layout.needs_padding else layout.scatter_index
    windows = _move_rows(per_head, 3, layout.gather_index, inverse).view(3, B, num_heads, nW, N, head_dim)
    q, k, v = windows.unbind(0)  # each (B, heads, nW, N, head_dim)

    # Cosine attention with the clamped learnable scale, then position bias and shift mask.
    scale = torch.clamp(logit_scale.reshape(num_heads, 1, 1, 1), max=LOGIT_SCALE_MAX).exp()
    q, k = _unit_rows(q), _unit_rows(k)
    if fused_softmax is None:
        differentiated = autograd_records(qkv, qkv_bias, logit_scale, position_bias)
        fused_softmax = sdpa_serves(q.device, q.dtype, differentiated)
    if return_attention_probs or not fused_softmax:
        bias = _combined_bias(position_bias, layout, g.mask_value)  # (heads, nW or 1, N, N)
        if not return_attention_probs:  # S and the softmax in fp32 at least (a 16-bit model's scale is 16-bit);
            # returned probabilities keep the dtype transformers returns them in
            scale = scale.to(torch.promote_types(q.dtype, torch.float32))
        scores = (q @ k.transpose(-2, -1)) * scale + bias  # (B, heads, nW, N, N)
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        if return_attention_probs:
            # returned as (B * nW, heads, N, N), and the output is computed from a view of that very tensor:
            # a gradient reaches the returned probabilities (retain_grad on a model's `attentions`)
            returned_probs = probs.transpose(1, 2).reshape(B * nW, num_heads, N, N)
            probs = returned_probs.view(B, nW, num_heads, N, N).transpose(1, 2)
        out = probs.to(v.dtype) @ v  # (B, heads, nW, N, head_dim)
    else:
        # The same softmax(S) @ v through PyTorch's fused attention, heads and windows as one batch axis.
        shape = (B, num_heads * nW, N, head_dim)
        out = F.scaled_dot_product_attention(
            (q * scale.to(q.dtype)).view(shape),
            k.view(shape),
            v.view(shape),
            attn_mask=_sdpa_mask(position_bias, layout, g.mask_value, _sdpa_mask_dtype(q, position_bias)),
            dropout_p=dropout_p,
            scale=1.0,
        )

    # Windows -> tokens: rows of padded positions are dropped, every real token is picked once.
    out = out.reshape(B, num_heads, nW * N, head_dim).permute(0, 2, 1, 3)  # (B, nW*N, heads, head_dim)
    out = _move_rows(out, 1, layout.scatter_index, None if inverse is None else layout.gather_index).view(B, L, C)
    if return_attention_probs:
        return out, returned_probs
    return out
