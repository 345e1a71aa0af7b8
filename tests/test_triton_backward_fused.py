"""The fused backward of small windows (triton_backward._window_attention_bwd_fused_kernel:
fp16/bf16, N = 64 or N <= 32, head dims up to 32, and N = 49 at head dim 32 with Triton 3.8 or later) against
the reference's autograd, with the launch proven: windows 2 to 8, shifted, padded in both orders, per-axis
windows, odd head dims, no q/k/v bias, frozen inputs, groups of windows that do not divide the batch's windows.
On a GPU fp32 runs it at N = 64 and 49 only, head_dim 32 and 16 (over 16 warps; at N = 49 with the table padded
to the block, the kernel's PAD_TABLE), and fp64 never; the tests that check its arithmetic at fp32's tolerances
(and gradcheck in fp64) route those dtypes to it at every N (`FUSED_DTYPES`), which is where it would run them:
fp32 with the table padded wherever the window leaves its block partly empty, fp64 without."""

import math

import pytest
import torch

from swinv2_fast import window_attention
from swinv2_fast.kernels import PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry, tiles
from swinv2_fast.kernels.triton_backward import padded_table

from _utils import KERNEL_DEVICE as DEVICE
from _utils import (
    LOW_PRECISION_FLOOR,
    OP_GRAD_FP32_ATOL,
    assert_close,
    assert_errors_within_pytorch,
    count_launches,
    make_inputs,
    outputs_and_grads,
    pair,
    rounding_sensitivity,
    split_launches,
    sum_floors,
    tkb,
)

pytestmark = pytest.mark.kernels(backward=True)

FUSED = "_window_attention_bwd_fused_kernel"
FOUR = (
    "_window_attention_bwd_stats_kernel",
    "_window_attention_bwd_dq_kernel",
    "_window_attention_bwd_dkdv_kernel",
    "_window_attention_bwd_dbias_kernel",
)


@pytest.fixture(autouse=True)
def window7_fused_on_every_triton(request, monkeypatch):
    """Window 7 (N = 49) at head_dim 32 takes the fused backward here whatever Triton is installed: with 3.6 its
    build spills (slower, not wrong; tiles._fused_masked_window), so the kernel is checked on both package stacks
    (and compiled on a GPU with 3.6). The rule itself is tested as it stands."""
    if "which_windows" not in request.node.name:
        monkeypatch.setattr(tiles, "_FUSED_MASKED_TRITON", (0, 0))


# (B, grid, heads, head_dim, window, shift): windows of 2 to 5, 7 and 8 tokens a side (N = 4 to 25 in masked tiles
# of 16 and 32, N = 49 in 64, N = 64), shifted and not, padded, per-axis windows, odd head dims (masked channel tiles)
FUSED_SHAPES = [
    pytest.param(2, (4, 6), 2, 16, 2, 1, id="B2-4x6-h2d16-w2s1"),
    pytest.param(1, (7, 8), 1, 32, 3, 1, id="B1-7x8-h1d32-w3s1-padded"),
    pytest.param(2, (8, 8), 2, 16, 4, 2, id="B2-8x8-h2d16-w4s2"),
    pytest.param(1, (9, 11), 2, 32, 5, 2, id="B1-9x11-h2d32-w5s2-padded"),
    pytest.param(1, (16, 11), 1, 32, 8, 4, id="B1-16x11-h1d32-w8s4-padded"),
    pytest.param(1, (8, 8), 2, 32, 8, 0, id="B1-8x8-h2d32-w8s0"),
    pytest.param(1, (7, 12), 2, 16, (3, 5), (1, 2), id="B1-7x12-h2d16-w3x5s1x2-padded"),
    pytest.param(2, (10, 6), 1, 32, (6, 4), (3, 2), id="B2-10x6-h1d32-w6x4s3x2-padded"),
    pytest.param(1, (6, 7), 2, 10, 4, 2, id="B1-6x7-h2d10-w4s2-padded"),
    pytest.param(1, (5, 6), 2, 24, (3, 4), (1, 2), id="B1-5x6-h2d24-w3x4s1x2-padded"),
    pytest.param(2, (8, 8), 2, 30, 4, 0, id="B2-8x8-h2d30-w4s0"),
    # window 7 (N = 49 in a 64-token block, its last 15 rows and columns masked; on every
    # Triton: window7_fused_on_every_triton)
    pytest.param(1, (14, 14), 2, 32, 7, 3, id="B1-14x14-h2d32-w7s3"),
    pytest.param(1, (10, 13), 1, 32, 7, 3, id="B1-10x13-h1d32-w7s3-padded"),
]


@pytest.fixture
def fused_in(monkeypatch):
    """Route the given dtypes to the fused kernel at every window it serves in fp16/bf16 (on a GPU fp32 takes it
    at N = 64 only, fp64 never)."""

    def route(*dtypes):
        monkeypatch.setattr(tiles, "FUSED_DTYPES", tiles.FUSED_DTYPES + tuple(dtypes))

    return route


def _relative_error(a, exact):
    return (a.double() - exact).abs().max().item() / max(exact.abs().max().item(), 1e-30)


def _gradients(B, grid, heads, head_dim, inputs, kwargs, dtype, seed=2, sensitivity=False):
    """(fused, eager in dtype, exact in fp64[, sensitivity]) gradients; the fused ones with the launch proof."""
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, generator=torch.Generator().manual_seed(seed))
    _, exact = outputs_and_grads(
        "eager", [None if t is None else t.double() for t in inputs], grad_out.double().to(DEVICE), **kwargs
    )
    _, eager = outputs_and_grads("eager", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    with count_launches() as launches:
        _, fused = outputs_and_grads("triton", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    # the border apart, but on a padded grid (one launch: see _fused_backward)
    window = pair(kwargs["window_size"])
    padded = any(g % w for g, w in zip(grid, window))
    expected = 1 if padded else split_launches(grid, window, kwargs["shift_size"])
    assert launches[FUSED] == expected and not any(launches[name] for name in FOUR), dict(launches)
    if not sensitivity:
        return fused, eager, exact
    g = grad_out.to(DEVICE, dtype).double()
    sens = rounding_sensitivity(
        lambda ts: list(outputs_and_grads("eager", ts, g, **kwargs)[1]),
        [t for t in inputs if t is not None],
        dtype,
        _relative_error,
    )
    return fused, eager, exact, sens


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", FUSED_SHAPES)
def test_fused_backward_fp16_error_is_that_of_pytorch(B, grid, heads, head_dim, window, shift, pad_order):
    """fp16 projection with autocast's fp32 table and a non-zero k bias: every gradient within PyTorch's own
    fp16 error (tests/_utils.py), the fused kernel alone launched for the backward."""
    inputs = make_inputs(
        B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=torch.float32, seed=4, zero_k_bias=False
    )
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    fused, eager, exact = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float16, seed=5)
    assert_errors_within_pytorch(fused, eager, exact, LOW_PRECISION_FLOOR)


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", FUSED_SHAPES)
def test_fused_backward_arithmetic_at_fp32_tolerance(B, grid, heads, head_dim, window, shift, pad_order, fused_in):
    """The fused kernel's arithmetic in fp32 (routed to it), held to the fp32 budgets of the four kernels'
    tests: q/k/v elementwise, the sums over windows (bias, scale, table) by their sum-aware floors."""
    fused_in(torch.float32)
    inputs = make_inputs(B, grid, heads, head_dim, window, seed=1)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    fused, eager, exact, sens = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float32, sensitivity=True)
    assert_errors_within_pytorch(fused, eager, exact, sum_floors(B, grid, window), sens)


def _partly_empty(param) -> bool:
    """Whether the shape's window leaves the fused kernel's block partly empty (N below its block)."""
    wh, ww = pair(param.values[4])
    return tiles.fused_block(wh * ww) != wh * ww


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", [p for p in FUSED_SHAPES if _partly_empty(p)])
def test_fused_backward_table_as_it_arrives_at_fp32_tolerance(
    B, grid, heads, head_dim, window, shift, pad_order, fused_in, monkeypatch
):
    """Windows smaller than their block as fp16/bf16 run them, the table unpadded (the keys beyond the window
    set to -inf per score, the kernel's MASK_N), held to the fp32 budgets of the test above: fp32 routed to the
    fused kernel with its table padding turned off (routed fp32 pads it: tiles.fused_pads_table)."""
    fused_in(torch.float32)
    monkeypatch.setattr(tkb, "fused_pads_table", lambda n, dtype: False)
    inputs = make_inputs(B, grid, heads, head_dim, window, seed=1)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    fused, eager, exact, sens = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float32, sensitivity=True)
    assert_errors_within_pytorch(fused, eager, exact, sum_floors(B, grid, window), sens)


# on a padded grid fp32 window 7 keeps the four kernels (test_which_windows_take_the_fused_backward)
WINDOW7 = [p for p in FUSED_SHAPES if "-w7s" in p.id and not p.id.endswith("-padded")]


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", WINDOW7)
def test_fp32_window7_reads_the_table_padded(B, grid, heads, head_dim, window, shift, pad_order, monkeypatch):
    """fp32 window 7 as a GPU runs it (no routing): the fused kernel, the table padded to the 64-token block
    (built once per call), every gradient at the fp32 budgets of the test above."""
    built = []

    def recording(table, block):
        padded = padded_table(table, block)
        built.append(tuple(padded.shape))
        return padded

    monkeypatch.setattr(tkb, "padded_table", recording)
    inputs = make_inputs(B, grid, heads, head_dim, window, seed=1)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    fused, eager, exact, sens = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float32, sensitivity=True)
    assert built == [(heads, 64, 64)]
    assert_errors_within_pytorch(fused, eager, exact, sum_floors(B, grid, window), sens)


@pytest.mark.kernels(forward=False, backward=False)  # nothing runs: a host function
def test_padded_table_leaves_keys_outside_the_window_no_weight():
    """(heads, N, N) -> (heads, block, block): the table in its corner, -inf in the window's rows at the columns
    beyond N (keys outside the window: P = 0), 0 in the rows beyond it (finite rows: a -inf row would make its
    softmax NaN)."""
    table = torch.randn(3, 49, 49)
    padded = padded_table(table, 64)
    assert padded.shape == (3, 64, 64) and padded.dtype == table.dtype and padded.is_contiguous()
    assert torch.equal(padded[:, :49, :49], table)
    assert torch.equal(padded[:, :49, 49:], torch.full((3, 49, 15), float("-inf")))
    assert torch.equal(padded[:, 49:], torch.zeros(3, 15, 64))


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
def test_fused_backward_without_qkv_bias(pad_order, fused_in):
    fused_in(torch.float32)
    B, grid, heads, head_dim, window, shift = 1, (9, 11), 2, 16, 5, 2
    inputs = list(make_inputs(B, grid, heads, head_dim, window, seed=3))
    inputs[1] = None
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    fused, eager, exact = _gradients(B, grid, heads, head_dim, inputs, kwargs, torch.float32)
    floors = sum_floors(B, grid, window)
    assert_errors_within_pytorch(fused, eager, exact, [floors[0], floors[2], floors[3]])


@pytest.mark.interpreter  # fp64 runs the kernels only under the interpreter
@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
def test_fused_gradcheck_fp64(pad_order, fused_in):
    """torch.autograd.gradcheck through the fused kernel in fp64 (routed to it), every differentiable input,
    a padded shifted grid; the k bias non-zero (see test_triton_backward.test_gradcheck_fp64)."""
    fused_in(torch.float64)
    inputs = [t.double() for t in make_inputs(1, (6, 7), 1, 16, 4, seed=3)]
    inputs[1][16:32] = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in inputs]
    kwargs = dict(
        grid_size=(6, 7), num_heads=1, window_size=4, shift_size=2, pad_order=pad_order, implementation="triton"
    )
    with count_launches() as launches:
        assert torch.autograd.gradcheck(
            lambda *xs: window_attention(*xs, **kwargs), inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True
        )
    assert launches[FUSED] > 0 and not any(launches[name] for name in FOUR), dict(launches)


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
def test_fused_backward_computes_what_is_asked(needs, fused_in):
    """Frozen inputs: the launcher's need_* flags. A gradient not asked for is None; those asked for are
    those of the full backward (the same window arithmetic, specialised without the rest)."""
    fused_in(torch.float32)
    B, grid, heads, head_dim, window, shift = 2, (6, 5), 2, 16, 4, 2  # padding: the k/v bias is read
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
    assert launches[FUSED] == 1 and sum(launches.values()) == 1, dict(launches)  # padded: one launch
    asked = (needs[0], needs[1], needs[2], needs[2])
    for name, want, p, f in zip(("qkv", "qkv_bias", "logit_scale", "position_bias"), asked, part, full):
        if not want:
            assert p is None, name
        else:
            assert p is not None and p.abs().sum() > 0, name
            assert_close(p, f, atol=OP_GRAD_FP32_ATOL * max(1.0, f.abs().max().item()), name=name)


@pytest.mark.kernels(forward=False, backward=True)  # the backward launcher alone
def test_fused_backward_groups_windows_deterministically(monkeypatch):
    """Groups of windows that do not divide the batch's windows (the last group shorter): the table and scale
    gradients are the same as with one window per group, and two runs agree bitwise (no atomics)."""
    # 5 x 6 (image, window) pairs: 5 x 2 off the shifted border, 5 x 4 on it (two launches)
    B, grid, heads, head_dim, window, shift = 5, (8, 12), 2, 16, 4, 2
    inputs = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=torch.float32, seed=9)
    geometry = WindowGeometry.from_args(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, device=DEVICE).half()
    results = {}
    # one group size for both launches (from the 30 pairs): 10 + 20 groups of 1; groups of 8, 2 off the border
    # and of 8, 8, 4 on it (twice)
    for programs in (2 * 30, 2 * 4, 2 * 4):
        monkeypatch.setattr(tkb, "FUSED_PROGRAMS", programs)
        with count_launches() as launches:
            got = tkb.window_attention_triton_backward(grad_out, *inputs, *geometry.as_op_args())
        assert launches[FUSED] == 2, dict(launches)
        results.setdefault(programs, []).append(got)
    first, second = results[8]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    one = results[60][0]
    # q/k/v: per window, whatever the grouping (the same arithmetic; compiled, another specialisation may
    # contract differently)
    assert_close(first[0], one[0], atol=1e-3 * one[0].abs().max().item(), name="qkv")
    for a, b, name in zip(first[2:], one[2:], ("logit_scale", "position_bias")):
        assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5, name=name)


def test_fused_backward_one_hot_rows_cancel_exactly(fused_in):
    """Rows whose softmax is one-hot in fp32 (scores 100 apart: the clamped logit scale on orthonormal keys):
    the reference's P is exactly 1 and 0 there and dS = P (dP - delta) cancels, so the exact q gradient is
    ~1e-40. The fused kernel computes P and its row statistics from the same scores in one program, so
    delta = rowsum(P * dP) is exactly dP at the 1 and the q gradient of those rows is as small (a P off 1
    by 1e-5, as scores recomputed in another tile shape gave, would leave ~1e-3)."""
    fused_in(torch.float32)
    grid, window, head_dim = (4, 4), 4, 16
    n = window * window
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(n, head_dim)
    perm = torch.randperm(n, generator=gen)
    q = eye[perm] * (0.5 + torch.rand(n, 1, generator=gen))
    k = eye * (0.5 + torch.rand(n, 1, generator=gen))
    v = torch.randn(n, head_dim, generator=gen)
    qkv = torch.cat([q, k, v], dim=1)[None].to(DEVICE)  # one window of 16 tokens, one head
    logit_scale = torch.full((1, 1, 1), math.log(100) + 1.0, device=DEVICE)  # clamped at 100
    table = torch.zeros(1, n, n, device=DEVICE)
    kwargs = dict(grid_size=grid, num_heads=1, window_size=window, shift_size=0)
    grad_out = torch.randn(1, n, head_dim, generator=gen).to(DEVICE)
    with count_launches() as launches:
        _, fused = outputs_and_grads("triton", [qkv, None, logit_scale, table], grad_out, **kwargs)
    assert launches[FUSED] == 1, dict(launches)
    dq = fused[0][..., :head_dim]
    assert dq.abs().max().item() < 1e-30, dq.abs().max().item()


@pytest.mark.kernels(forward=False, backward=False)  # nothing runs: the launcher's rule
@pytest.mark.parametrize("release", [(3, 6), (3, 8), (3, 9)])
def test_which_windows_take_the_fused_backward(release, monkeypatch):
    """N = 64 and N <= 32 in fp16/bf16 with head dims up to 32; window 7 (N = 49, a masked 64-token block) at head
    dim 32 with Triton 3.8 or later (with 3.6 it spills, as at masked channel tiles); other windows of 33 to 63
    tokens, larger windows and head dims, fp64: the four kernels. fp32: N = 64 and 49 at head_dim 32 and 16 (over
    16 warps; N = 49 on unpadded grids), the four kernels elsewhere."""
    monkeypatch.setattr(tiles, "_triton_release", lambda: release)
    for n, head_dim, dtype, fused in (
        (64, 32, torch.bfloat16, True),
        (16, 10, torch.float16, True),
        (25, 30, torch.float16, True),
        (4, 16, torch.bfloat16, True),
        (49, 32, torch.bfloat16, release >= (3, 8)),
        (49, 32, torch.float16, release >= (3, 8)),
        (49, 30, torch.bfloat16, False),
        (49, 24, torch.float16, False),
        (49, 32, torch.float32, True),
        (49, 16, torch.float32, True),
        (36, 32, torch.float16, False),
        (144, 32, torch.bfloat16, False),
        (64, 64, torch.float16, False),
        (64, 32, torch.float32, True),
        (64, 16, torch.float32, True),
        (64, 10, torch.float32, False),
        (64, 30, torch.float32, False),
        (64, 24, torch.float32, False),
        (16, 16, torch.float32, False),
        (144, 32, torch.float32, False),
        (16, 16, torch.float64, False),
    ):
        assert tiles.fused_backward_applies(n, head_dim, dtype) == fused, (n, head_dim, dtype)
        assert (tiles.backward_kernels(n, head_dim, dtype) == ("bwd_fused",)) == fused
    # fp32 window 7 on a padded grid: the four kernels (its build spills there); window 8 and 16-bit as unpadded
    assert not tiles.fused_backward_applies(49, 32, torch.float32, padded=True)
    assert not tiles.fused_backward_applies(49, 16, torch.float32, padded=True)
    assert tiles.fused_backward_applies(64, 32, torch.float32, padded=True)
    assert tiles.fused_backward_applies(49, 32, torch.bfloat16, padded=True) == (release >= (3, 8))
    # fp32 reads the table padded to the block where the window leaves it partly empty; fp16/bf16 never
    assert [tiles.fused_pads_table(n, torch.float32) for n in (49, 64, 25, 16)] == [True, False, True, False]
    assert not tiles.fused_pads_table(49, torch.bfloat16) and not tiles.fused_pads_table(49, torch.float16)
    # the 64-token block over 8 warps, 16 in fp32 (over 8 its IEEE dots' operands spill); smaller blocks over 4
    assert [
        tiles.fused_num_warps(n, d) for n, d in ((64, torch.bfloat16), (64, torch.float32), (32, torch.float32))
    ] == [
        8,
        16,
        4,
    ]
