"""The rows backward (triton_backward._window_attention_bwd_rows_kernel, then the dk/dv kernel: fp16/bf16 windows
of 129 to 256 tokens, head dims up to 32) against the reference's autograd, with the launch proven: windows 12
(N = 144) and 16 (N = 256), per-axis windows, shifted and not, padded in both orders, masked channel tiles,
frozen inputs, groups of windows that do not divide the batch's windows, and rows whose softmax is one-hot. fp32
runs the four kernels on a GPU; the tests that check the rows kernel's arithmetic at fp32's tolerances route fp32
to it (`FUSED_DTYPES`, which `rows_backward_applies` reads)."""

import math

import pytest
import torch

from swinv2_fast.kernels import PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry, tiles

from _utils import KERNEL_DEVICE as DEVICE
from _utils import (
    LOW_PRECISION_FLOOR,
    OP_GRAD_FP32_ATOL,
    assert_close,
    assert_errors_within_pytorch,
    count_launches,
    make_inputs,
    outputs_and_grads,
    rounding_sensitivity,
    split_launches,
    sum_floors,
    tkb,
)

pytestmark = pytest.mark.kernels(backward=True)

ROWS = "_window_attention_bwd_rows_kernel"
DKDV = "_window_attention_bwd_dkdv_kernel"
OTHERS = (
    "_window_attention_bwd_fused_kernel",
    "_window_attention_bwd_stats_kernel",
    "_window_attention_bwd_dq_kernel",
    "_window_attention_bwd_dbias_kernel",
)

# (B, grid, heads, head_dim, window, shift): windows of 129 to 256 tokens (a 256-key tile, masked below 256; at
# head_dim 32 window 12 in a 128-key tile and a tail of 16: several windows to a group, shifted, padded)
ROWS_SHAPES = [
    pytest.param(1, (12, 12), 1, 32, 12, 6, id="B1-12x12-h1d32-w12s6"),
    pytest.param(2, (24, 24), 2, 32, 12, 6, id="B2-24x24-h2d32-w12s6"),
    pytest.param(1, (13, 14), 1, 32, 12, 6, id="B1-13x14-h1d32-w12s6-padded"),
    pytest.param(1, (13, 14), 2, 24, 12, 6, id="B1-13x14-h2d24-w12s6-padded"),
    pytest.param(1, (13, 12), 1, 16, (12, 11), (6, 5), id="B1-13x12-h1d16-w12x11s6x5-padded"),
    pytest.param(1, (12, 12), 2, 32, 12, 0, id="B1-12x12-h2d32-w12s0"),
    pytest.param(1, (16, 16), 1, 16, 16, 8, id="B1-16x16-h1d16-w16s8"),
    pytest.param(2, (16, 20), 1, 32, 16, 8, id="B2-16x20-h1d32-w16s8-padded", marks=pytest.mark.slow),
]


@pytest.fixture
def rows_in(monkeypatch):
    """Route the given dtypes to the rows kernel too (fp32/fp64 go to the four kernels on a GPU)."""

    def route(*dtypes):
        monkeypatch.setattr(tiles, "FUSED_DTYPES", tiles.FUSED_DTYPES + tuple(dtypes))

    return route


def _relative_error(a, exact):
    return (a.double() - exact).abs().max().item() / max(exact.abs().max().item(), 1e-30)


def _assert_rows_launched(launches, grid, window, shift):
    expected = split_launches(grid, window, shift)  # the dk/dv kernel's windows are split as the rows kernel's
    assert launches[ROWS] == expected and launches[DKDV] == expected, dict(launches)
    assert not any(launches[name] for name in OTHERS), dict(launches)


def _gradients(B, grid, heads, head_dim, inputs, kwargs, dtype, seed=2, sensitivity=False):
    """(rows, eager in dtype, exact in fp64[, sensitivity]) gradients; the rows backward's with the launch proof."""
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, generator=torch.Generator().manual_seed(seed))
    _, exact = outputs_and_grads(
        "eager", [None if t is None else t.double() for t in inputs], grad_out.double().to(DEVICE), **kwargs
    )
    _, eager = outputs_and_grads("eager", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    with count_launches() as launches:
        _, rows = outputs_and_grads("triton", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    _assert_rows_launched(launches, grid, kwargs["window_size"], kwargs["shift_size"])
    if not sensitivity:
        return rows, eager, exact
    g = grad_out.to(DEVICE, dtype).double()
    sens = rounding_sensitivity(
        lambda ts: list(outputs_and_grads("eager", ts, g, **kwargs)[1]),
        [t for t in inputs if t is not None],
        dtype,
        _relative_error,
    )
    return rows, eager, exact, sens


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", ROWS_SHAPES)
def test_rows_backward_fp16_error_is_that_of_pytorch(B, grid, heads, head_dim, window, shift, pad_order):
    """fp16 projection with autocast's fp32 table and a non-zero k bias: every gradient within PyTorch's own
    fp16 error (tests/_utils.py), the rows kernel and the dk/dv kernel alone launched for the backward."""
    inputs = make_inputs(
        B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=torch.float32, seed=4, zero_k_bias=False
    )
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    rows, eager, exact = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float16, seed=5)
    assert_errors_within_pytorch(rows, eager, exact, LOW_PRECISION_FLOOR)


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", ROWS_SHAPES[:5])
def test_rows_backward_arithmetic_at_fp32_tolerance(B, grid, heads, head_dim, window, shift, pad_order, rows_in):
    """The rows kernel's arithmetic in fp32 (routed to it), held to the fp32 budgets of the four kernels' tests:
    q/k/v elementwise, the sums over windows (bias, scale, table) by their sum-aware floors."""
    rows_in(torch.float32)
    inputs = make_inputs(B, grid, heads, head_dim, window, seed=1)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    rows, eager, exact, sens = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float32, sensitivity=True)
    assert_errors_within_pytorch(rows, eager, exact, sum_floors(B, grid, window), sens)


def test_rows_dkdv_query_tail_at_fp32_tolerance(monkeypatch, rows_in):
    """The dk/dv kernel's last 16 query rows of window 12 as a block of their own (tiles.dkdv_query_tail), in fp32:
    routed to the rows kernel, with the 64-row query blocks of the 16-bit build (an override; fp32's own are 16
    rows, no tail), on a padded shifted grid, held to the fp32 budgets."""
    rows_in(torch.float32)
    monkeypatch.setitem(tiles.TILE_OVERRIDES, "fp32/hd32/N144/bwd", (64, 64, 4, 255, 1))
    B, grid, heads, head_dim, window, shift = 1, (13, 14), 1, 32, 12, 6
    assert tiles.dkdv_query_tail(window**2, head_dim, torch.float32, 64) == 16
    inputs = make_inputs(B, grid, heads, head_dim, window, seed=1)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=PAD_THEN_ROLL)
    rows, eager, exact, sens = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float32, sensitivity=True)
    assert_errors_within_pytorch(rows, eager, exact, sum_floors(B, grid, window), sens)


NEEDS = [
    (True, False, False),
    (False, True, False),
    (False, False, True),
    (True, True, False),
    (False, True, True),
    (True, False, True),
]


@pytest.mark.kernels(forward=False, backward=True)  # the backward launcher alone
@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "+".join(x for x, f in zip(("qkv", "bias", "table"), n) if f))
def test_rows_backward_computes_what_is_asked(needs, rows_in):
    """Frozen inputs: the launcher's need_* flags. A gradient not asked for is None; those asked for are those
    of the full backward. The dk/dv kernel runs only for the q/k/v gradient or the padded keys' bias gradient."""
    rows_in(torch.float32)
    # padding (the k/v bias is read) and 2 x 2 windows: the interior and border launches
    B, grid, heads, head_dim, window, shift = 2, (24, 23), 2, 16, 12, 6
    qkv, bias, logit_scale, table = make_inputs(B, grid, heads, head_dim, window, seed=7, zero_k_bias=False)
    geometry = WindowGeometry.from_args(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, device=DEVICE)
    full = tkb.window_attention_triton_backward(grad_out, qkv, bias, logit_scale, table, *geometry.as_op_args())
    with count_launches() as launches:
        part = tkb.window_attention_triton_backward(
            grad_out,
            qkv,
            bias,
            logit_scale,
            table,
            *geometry.as_op_args(),
            need_qkv=needs[0],
            need_bias=needs[1],
            need_table_grads=needs[2],
        )
    expected = split_launches(grid, window, shift)
    assert launches[ROWS] == expected and launches[DKDV] == expected * int(needs[0] or needs[1]), dict(launches)
    assert not any(launches[name] for name in OTHERS), dict(launches)
    asked = (needs[0], needs[1], needs[2], needs[2])
    for name, want, p, f in zip(("qkv", "qkv_bias", "logit_scale", "position_bias"), asked, part, full):
        if not want:
            assert p is None, name
        else:
            assert p is not None and p.abs().sum() > 0, name
            assert_close(p, f, atol=OP_GRAD_FP32_ATOL * max(1.0, f.abs().max().item()), name=name)


@pytest.mark.kernels(forward=False, backward=True)  # the backward launcher alone
@pytest.mark.parametrize("head_dim", [16, 32])  # one 256-key tile; at 32, a 128-key tile and a tail of 16
def test_rows_backward_groups_windows_deterministically(monkeypatch, head_dim):
    """Groups of windows that do not divide the batch's windows (the last group shorter): the table and scale
    gradients are those of one window per group, and two runs agree bitwise (no atomics)."""
    B, grid, heads, window, shift = 5, (24, 36), 1, 12, 6  # 5 x 6 = 30 (image, window) pairs
    inputs = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=torch.float32, seed=9)
    geometry = WindowGeometry.from_args(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, device=DEVICE).half()
    results = {}
    # 9 row blocks of 16 rows; the interior launch has 10 pairs, the border 20, one group size for both (from the
    # 30): groups of 1 each; groups of 8, 2 and of 8, 8, 4 (twice)
    for programs in (9 * 30, 9 * 4, 9 * 4):
        monkeypatch.setattr(tkb, "FUSED_PROGRAMS", programs)
        with count_launches() as launches:
            got = tkb.window_attention_triton_backward(grad_out, *inputs, *geometry.as_op_args())
        _assert_rows_launched(launches, grid, window, shift)
        results.setdefault(programs, []).append(got)
    first, second = results[36]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    one = results[9 * 30][0]
    assert torch.equal(first[0], one[0])  # q/k/v: per window, whatever the grouping
    for a, b, name in zip(first[2:], one[2:], ("logit_scale", "position_bias")):
        assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5, name=name)


@pytest.mark.parametrize("ones_at", [0, 112])
def test_rows_backward_one_hot_rows_cancel_exactly(rows_in, ones_at):
    """Rows whose softmax is one-hot in fp32 (each query along one key's direction and against another's, the
    other keys zero: scores +100, -100 and 0 with the clamped logit scale): the reference's P is 1 and at most
    4e-44 and dS = P (dP - delta) cancels, so the exact q gradient is ~1e-40. The rows kernel computes P, its row
    statistics and dq from the same scores in one program, so delta is exactly dP at the 1 and the q gradient of
    those rows is as small. (dk and dv come from the dk/dv kernel, on other tiles: see triton_backward's
    docstring.) The +1 keys at positions 0 to 31, or 112 to 143: half of them in window 12's 16-key tail tile,
    whose scores must enter the row maximum (exp(100) overflows fp32)."""
    rows_in(torch.float32)
    grid, window, head_dim = (12, 12), 12, 32
    n = window * window
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(head_dim)
    k = torch.zeros(n, head_dim)
    minus_at = 32 if ones_at == 0 else 48
    k[ones_at : ones_at + head_dim], k[minus_at : minus_at + head_dim] = eye, -eye
    k = k * (0.5 + torch.rand(n, 1, generator=gen))
    q = eye[torch.randint(0, head_dim, (n,), generator=gen)] * (0.5 + torch.rand(n, 1, generator=gen))
    v = torch.randn(n, head_dim, generator=gen)
    qkv = torch.cat([q, k, v], dim=1)[None].to(DEVICE)  # one window of 144 tokens, one head
    logit_scale = torch.full((1, 1, 1), math.log(100) + 1.0, device=DEVICE)  # clamped at 100
    table = torch.zeros(1, n, n, device=DEVICE)
    kwargs = dict(grid_size=grid, num_heads=1, window_size=window, shift_size=0)
    grad_out = torch.randn(1, n, head_dim, generator=gen).to(DEVICE)
    with count_launches() as launches:
        _, rows = outputs_and_grads("triton", [qkv, None, logit_scale, table], grad_out, **kwargs)
    _assert_rows_launched(launches, grid, window, 0)
    dq = rows[0][..., :head_dim]
    assert dq.abs().max().item() < 1e-30, dq.abs().max().item()


@pytest.mark.kernels(forward=False, backward=True)  # the rows kernel alone (the dk/dv kernel skipped)
def test_rows_kernel_stores_only_the_real_channels(monkeypatch):
    """Heads of 16 channels run in 32-channel tiles (tiles.rows_channel_block): the 16 beyond each head are masked
    on every store. The q/k/v gradient starts as NaN and the dk/dv kernel is skipped: the rows kernel must write
    every dq channel and nothing of k and v (the last head's masked channels would land on k's first ones)."""
    B, grid, heads, head_dim, window, shift = 1, (12, 12), 2, 16, 12, 6
    assert tiles.rows_channel_block(head_dim) == 2 * head_dim
    qkv, bias, logit_scale, table = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, seed=6)
    geometry = WindowGeometry.from_args(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, device=DEVICE).half()

    class Torch:  # torch, as the launcher sees it, with a NaN-filled empty_like
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty_like(t, **kwargs):
            return torch.full_like(t, float("nan"), **kwargs)

    monkeypatch.setattr(tkb, "torch", Torch())
    monkeypatch.setattr(tkb, "_dkdv", lambda *args: None)
    d_qkv = tkb.window_attention_triton_backward(grad_out, qkv, bias, logit_scale, table, *geometry.as_op_args())[0]
    c = heads * head_dim
    assert d_qkv[..., :c].isfinite().all(), "dq has channels the rows kernel did not write"
    assert d_qkv[..., c:].isnan().all(), "the rows kernel wrote into k or v"


@pytest.mark.kernels(forward=False, backward=False)  # the backward launcher alone, which launches nothing here
def test_rows_backward_of_an_empty_batch():
    """B = 0: nothing is launched; the q/k/v gradient is empty, the bias, table and scale gradients zero."""
    grid, heads, head_dim, window, shift = (24, 23), 1, 16, 12, 6
    qkv, bias, logit_scale, table = make_inputs(1, grid, heads, head_dim, window, dtype=torch.float16, seed=3)
    qkv = qkv[:0]
    geometry = WindowGeometry.from_args(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    grad_out = torch.zeros(0, grid[0] * grid[1], heads * head_dim, device=DEVICE, dtype=torch.float16)
    with count_launches() as launches:
        d_qkv, d_bias, d_scale, d_table = tkb.window_attention_triton_backward(
            grad_out, qkv, bias, logit_scale, table, *geometry.as_op_args()
        )
    assert not any(launches.values()), dict(launches)
    assert d_qkv.shape == qkv.shape and d_bias.abs().sum() == 0
    assert d_scale.shape == logit_scale.shape and d_scale.abs().sum() == 0
    assert d_table.shape == table.shape and d_table.abs().sum() == 0


@pytest.mark.kernels(forward=False, backward=False)  # nothing runs: the launcher's rule
def test_which_windows_take_the_rows_backward():
    """fp16/bf16, head dims up to 32, windows of 129 to 256 tokens: the rows kernel (the window's keys in one tile,
    or two: tiles.rows_tiles) and the dk/dv kernel; smaller windows (the fused kernel, or the four kernels: window
    7's 64-key tile spilled), N = 576, larger head dims and fp32: the four kernels or the fused one."""
    for n, head_dim, dtype, rows in (
        (144, 32, torch.bfloat16, True),
        (256, 32, torch.float16, True),
        (129, 16, torch.float16, True),
        (132, 30, torch.bfloat16, True),
        (128, 32, torch.bfloat16, False),
        (100, 32, torch.float16, False),
        (49, 32, torch.bfloat16, False),
        (64, 32, torch.bfloat16, False),  # the fused kernel
        (576, 32, torch.bfloat16, False),
        (144, 64, torch.float16, False),
        (144, 32, torch.float32, False),
    ):
        assert tiles.rows_backward_applies(n, head_dim, dtype) == rows, (n, head_dim, dtype)
        assert (tiles.backward_kernels(n, head_dim, dtype) == ("bwd_rows", "bwd_dkdv")) == rows
        assert not rows or tiles.ROWS_TILES[1] >= n > tiles.ROWS_TILES[1] // 2


@pytest.mark.kernels(forward=False, backward=False)  # nothing runs: the launcher's rule
def test_rows_kernel_tiles():
    """(BLOCK_M, BLOCK_N, num_warps, BLOCK_T) by window, head dim and padding: at head_dim 32 window 12's keys in a
    128-key tile and a tail of 16 over 4 warps on every grid, window 16's in one 256-key tile over 4 warps (8 on a
    padded grid: over 4 they spill there with Triton 3.6); the other windows and head dims one 256-key tile over 8
    warps (over 4, or with the tail, masked channel tiles spill; the other windows are not in the
    spill gate over 4)."""
    for n, head_dim, padded, expected in (
        (144, 32, False, (16, 128, 4, 16)),
        (144, 32, True, (16, 128, 4, 16)),
        (256, 32, False, (16, 256, 4, 0)),
        (256, 32, True, (16, 256, 8, 0)),
        (196, 32, False, (16, 256, 8, 0)),
        (144, 24, False, (16, 256, 8, 0)),
        (144, 16, False, (16, 256, 8, 0)),
        (256, 30, False, (16, 256, 8, 0)),
    ):
        _block_m, block_n, _warps, block_t = got = tiles.rows_tiles(n, head_dim, padded)
        assert got == expected, (n, head_dim, padded, got)
        # the tiles hold the window's keys; a tail tile exactly (no masked key in either)
        assert block_n + block_t >= n and (block_t == 0 or block_n + block_t == n)
    # the dk/dv kernel beside it: window 12's 144 query rows as 64 + 64 + 16 at head_dim 32 (M_TAIL), in fp16/bf16
    for n, head_dim, dtype, block_m, tail in (
        (144, 32, torch.bfloat16, 64, 16),
        (144, 32, torch.float16, 32, 16),
        (144, 32, torch.bfloat16, 128, 16),
        (144, 32, torch.bfloat16, 16, 0),
        (144, 30, torch.bfloat16, 64, 0),
        (144, 32, torch.float32, 64, 0),
        (256, 32, torch.bfloat16, 64, 0),
        (196, 32, torch.bfloat16, 64, 0),
        (49, 32, torch.bfloat16, 64, 0),
    ):
        assert tiles.dkdv_query_tail(n, head_dim, dtype, block_m) == tail, (n, head_dim, dtype, block_m)
    # heads of up to 16 channels in masked 32-channel tiles (in 16-channel ones the kernel spills); wider as every
    # kernel's
    for head_dim, block_d in ((10, 32), (16, 32), (24, 32), (32, 32)):
        assert tiles.rows_channel_block(head_dim) == block_d, head_dim
