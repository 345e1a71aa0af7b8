"""The fused Triton forward against the reference: compiled on CUDA tensors where a GPU runs the kernels,
under Triton's interpreter on CPU tensors elsewhere (tests/conftest.py: KERNEL_DEVICE)."""

import math

import pytest
import torch

import swinv2_fast
from swinv2_fast import window_attention
from swinv2_fast.kernels import PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry, tiles, window_attention_reference
from swinv2_fast.kernels.launch import device_arch
from swinv2_fast.kernels.naive import window_attention_naive  # the oracle

from _utils import (
    FP32_ATOL,
    KERNEL_DEVICE,
    LOW_PRECISION_FACTOR,
    LOW_PRECISION_FLOOR,
    ODD_HEAD_DIMS,
    OP_FP32_ATOL,
    OP_FP32_ATOL_AT_CLAMP,
    OP_GRAD_FP32_ATOL,
    OP_GRAD_FP32_RTOL,
    SHAPES,
    TINY,
    assert_close,
    make_inputs,
    perturb_,
    slow_where,
    tk,
)

# Every test here runs the forward kernel unless marked otherwise (conftest: launch proof, honest skips).
pytestmark = pytest.mark.kernels
DEVICE = KERNEL_DEVICE


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", slow_where(SHAPES, "-w24"))
def test_forward_matches_reference_fp32(B, grid, heads, head_dim, window, shift, pad_order):
    inputs = make_inputs(B, grid, heads, head_dim, window)
    kwargs = dict(
        grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order, mask_value=-100.0
    )
    out = tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args())
    expected = window_attention_naive(*inputs, **kwargs)
    assert_close(out, expected, atol=OP_FP32_ATOL, name="output")


@pytest.mark.parametrize("table_dtype", [torch.float16, torch.float32], ids=["table-fp16", "table-fp32-autocast"])
@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", [SHAPES[1], SHAPES[4], SHAPES[7]])
def test_forward_fp16_error_is_that_of_pytorch(B, grid, heads, head_dim, window, shift, pad_order, table_dtype):
    """fp16 projection (fp32 table and logit scale as under torch.autocast, or all fp16): the kernel's error
    against an fp64 reference is at most twice the eager reference's own fp16 error."""
    inputs = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=table_dtype)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    _assert_fp16_error_is_that_of_pytorch(inputs, kwargs)


def _assert_fp16_error_is_that_of_pytorch(inputs, kwargs):
    """The kernel's fp16 output against an fp64 reference: at most LOW_PRECISION_FACTOR times the eager
    reference's own fp16 error (plus a tenth of the floor)."""
    exact = window_attention_naive(*[t.double() if t is not None else None for t in inputs], **kwargs)
    eager = window_attention_naive(*inputs, **kwargs)
    out = tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args())
    assert out.dtype == torch.float16
    eager_error = (eager.double() - exact).abs().max().item()
    kernel_error = (out.double() - exact).abs().max().item()
    assert kernel_error <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR * 0.1, (
        f"kernel fp16 error {kernel_error:.3e} vs eager fp16 error {eager_error:.3e}"
    )


# Several windows per program (WINDOWS_PER_PROGRAM): pair counts the group size does not divide, both window
# sets of a shifted grid (interior and border launches), padding, per-axis windows, an odd head dim, one key
# block (the bias tile held across the windows) and several (re-read per window).
SEVERAL_WINDOWS = [
    pytest.param(3, (8, 8), 2, 16, 4, 2, id="B3-8x8-h2d16-w4s2"),
    pytest.param(3, (12, 12), 1, 32, 4, 0, id="B3-12x12-h1d32-w4s0"),
    pytest.param(3, (10, 13), 1, 32, 7, 3, id="B3-10x13-h1d32-w7s3-padded"),
    pytest.param(3, (7, 12), 2, 16, (3, 5), (1, 2), id="B3-7x12-h2d16-w3x5s1x2-padded"),
    pytest.param(3, (6, 7), 2, 10, 4, 2, id="B3-6x7-h2d10-w4s2-padded"),
]


class _LaunchRecorder:
    """Wraps the forward kernel: records each launch's grid and keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](**kwargs)

        return launch


@pytest.mark.parametrize("per_program", [2, 4])
@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", SEVERAL_WINDOWS)
def test_several_windows_per_program(B, grid, heads, head_dim, window, shift, pad_order, per_program, monkeypatch):
    """Programs that run `per_program` windows each (the last fewer) match the oracle in fp32: every window
    computed once, with its own q/k/v and the program's rows of the table."""
    monkeypatch.setattr(tk, "FORWARD_WINDOWS_PER_PROGRAM", per_program)
    monkeypatch.setattr(tk, "_multiprocessors", lambda t: 1)  # no launch is too small to group
    recorder = _LaunchRecorder(tk._window_attention_fwd_kernel)
    monkeypatch.setattr(tk, "_window_attention_fwd_kernel", recorder)
    inputs = make_inputs(B, grid, heads, head_dim, window)
    kwargs = dict(
        grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order, mask_value=-100.0
    )
    out = tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args())
    assert_close(out, window_attention_naive(*inputs, **kwargs), atol=OP_FP32_ATOL, name="output")
    sets = {launch["WINDOW_SET"] for _, launch in recorder.launches}
    assert sets == ({tk.INTERIOR_WINDOWS, tk.BORDER_WINDOWS} if shift else {tk.ALL_WINDOWS})
    for grid_, launch in recorder.launches:
        assert launch["WINDOWS_PER_PROGRAM"] == per_program
        row_blocks = math.ceil(launch["N"] / launch["BLOCK_M"])
        assert grid_[0] == math.ceil(launch["NUM_BW"] / per_program) * row_blocks
    assert any(launch["NUM_BW"] % per_program for _, launch in recorder.launches), "no program got fewer windows"


# Whole-window programs (window 12 at head_dim 32: a 128-key tile and a 16-key tail, query blocks of 64 and a
# 16-row tail; window 16: two 128-key tiles, the second joined by an online step; the border windows' shift mask
# read from `shift_masked_tables`): unshifted, shifted (both launches), shifted on a grid one window high (one
# launch, every window with the mask), padded in either order, several windows per program and one, a last
# program with fewer, a q/k/v bias or none (B3: none).
WHOLE_WINDOW_SHAPES = [
    pytest.param(2, (24, 24), 1, 32, 12, 6, 2, id="B2-24x24-h1d32-w12s6-wpp2"),
    pytest.param(3, (24, 24), 1, 32, 12, 0, 4, id="B3-24x24-h1d32-w12s0-wpp4"),
    pytest.param(1, (30, 26), 2, 32, 12, 6, 1, id="B1-30x26-h2d32-w12s6-wpp1-padded"),
    pytest.param(3, (30, 26), 1, 32, 12, 6, 2, id="B3-30x26-h1d32-w12s6-wpp2-padded"),  # a program of 1 window
    pytest.param(2, (12, 36), 1, 32, 12, (0, 6), 2, id="B2-12x36-h1d32-w12s0x6-wpp2"),
    pytest.param(2, (32, 32), 1, 32, 16, 8, 2, id="B2-32x32-h1d32-w16s8-wpp2"),
    pytest.param(3, (32, 16), 1, 32, 16, 0, 4, id="B3-32x16-h1d32-w16s0-wpp4"),
    pytest.param(1, (40, 36), 2, 32, 16, 8, 2, id="B1-40x36-h2d32-w16s8-wpp2-padded"),  # 4 windows off the border
    pytest.param(2, (48, 16), 1, 32, 16, 8, 2, id="B2-48x16-h1d32-w16s8-wpp2"),  # one window wide
]


def _forced_window_tiles(n, head_dim, dtype, arch):
    """`tiles.forward_window_tiles` at any dtype and architecture."""
    return (*tiles._FWD_WINDOW[n], tiles._FWD_WINDOW_WARPS)


def _whole_window_launches(monkeypatch, per_program, force=False):
    """Record the forward's launches, `per_program` windows a program; with `force` the whole-window programs
    whatever the dtype (fp32 runs them under the interpreter: the exact arithmetic at fp32's tolerance)."""
    monkeypatch.setattr(tk, "FORWARD_WINDOWS_PER_PROGRAM", per_program)
    monkeypatch.setattr(tk, "_multiprocessors", lambda t: 1)
    if force:
        from swinv2_fast.kernels import launch

        monkeypatch.setattr(launch, "forward_window_tiles", _forced_window_tiles)
    recorder = _LaunchRecorder(tk._window_attention_fwd_kernel)
    monkeypatch.setattr(tk, "_window_attention_fwd_kernel", recorder)
    return recorder


@pytest.mark.parametrize("window_rows", [3, 1], ids=["3x3-windows", "1x3-windows"])
@pytest.mark.parametrize(
    "dtype,head_dim,window,in_table",
    [(torch.float32, 32, 7, True), (torch.float16, 16, 12, True), (torch.float16, 32, 8, False)],
    ids=["fp32-d32-w7-two-key-blocks", "fp16-d16-w12-five-key-blocks", "fp16-d32-w8-one-key-block"],
)
def test_row_block_border_reads_the_mask_in_the_table_over_several_key_blocks(
    dtype, head_dim, window, in_table, window_rows, monkeypatch
):
    """The row-block forward's launches over windows with the shift mask on a shifted grid: where several key blocks
    cover the window they read the tables with the mask added (one per kind of border window) instead of computing
    it; with one key block, whose bias tile serves windows of every kind, they compute it. On a 3 x 3 window grid
    that is the border launch (all three kinds: last row, last column, corner), the windows off the border reading
    the table; on a grid one window high, the one launch of every window (kinds: last row, corner). The output is
    the oracle's (fp32 at its tolerance, fp16 within PyTorch's own fp16 error)."""
    recorder = _LaunchRecorder(tk._window_attention_fwd_kernel)
    monkeypatch.setattr(tk, "_window_attention_fwd_kernel", recorder)
    grid = (window_rows * window, 3 * window)
    inputs = make_inputs(2, grid, 2, head_dim, window, dtype=dtype)
    kwargs = dict(grid_size=grid, num_heads=2, window_size=window, shift_size=window // 2, mask_value=-100.0)
    out = tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args())
    launched = {launch["WINDOW_SET"]: launch for _, launch in recorder.launches}
    if window_rows == 1:
        assert sorted(launched) == [tk.ALL_WINDOWS]
        masked = launched[tk.ALL_WINDOWS]
    else:
        assert sorted(launched) == [tk.INTERIOR_WINDOWS, tk.BORDER_WINDOWS]
        interior, masked = launched[tk.INTERIOR_WINDOWS], launched[tk.BORDER_WINDOWS]
        assert not interior["MASK_IN_TABLE"] and interior["POSITION_BIAS"].dim() == 3
    assert not masked.get("WHOLE_WINDOW") and (masked["N"] > masked["BLOCK_N"]) == in_table
    assert masked["MASK_IN_TABLE"] == in_table and masked["POSITION_BIAS"].dim() == (4 if in_table else 3)
    if dtype == torch.float32:
        assert_close(out, window_attention_naive(*inputs, **kwargs), atol=OP_FP32_ATOL, name="output")
    else:
        _assert_fp16_error_is_that_of_pytorch(inputs, kwargs)


def test_whole_window_mask_beyond_the_table_dtype(monkeypatch):
    """A mask value beyond fp16's range with an fp16 table (window 16, shifted: rows whose first 128 keys are all
    masked): the border tables are built in fp32, so no row's first tile is -inf (which made NaN), and the output
    is the oracle's within PyTorch's fp16 error."""
    recorder = _whole_window_launches(monkeypatch, 2, force=True)
    grid, window, shift, mask_value = (32, 32), 16, 8, -1e5
    inputs = make_inputs(2, grid, 1, 32, window, dtype=torch.float16)
    geometry = dict(grid_size=grid, num_heads=1, window_size=window, shift_size=shift)
    out = tk.window_attention_triton_forward(
        *inputs, *WindowGeometry.from_args(**geometry, mask_value=mask_value).as_op_args()
    )
    assert torch.isfinite(out).all()
    tables = [launch["POSITION_BIAS"] for _, launch in recorder.launches]
    assert [(t.dim(), t.dtype) for t in tables] == [(3, torch.float16), (4, torch.float32)]
    _assert_fp16_error_is_that_of_pytorch(inputs, dict(geometry, mask_value=mask_value))


def _assert_whole_window(recorder, shift):
    """Every launch ran whole-window programs, one per group of windows, window 12's last 16 rows a block of their
    own; the launches over windows with the shift mask read the table with it added (one per kind of border
    window), the others the table."""
    tails, tables = {}, {}
    for grid_, launch in recorder.launches:
        n = launch["N"]
        assert launch["WHOLE_WINDOW"] and launch["BLOCK_N"] + launch["BLOCK_T"] == n and n in (144, 256)
        assert grid_[0] == math.ceil(launch["NUM_BW"] / launch["WINDOWS_PER_PROGRAM"])
        tails[launch["WINDOW_SET"]] = launch["M_TAIL"]
        tables[launch["WINDOW_SET"]] = launch["POSITION_BIAS"].shape[:-3]
    tail = 16 if n == 144 else 0
    if not shift:
        assert tails == {tk.ALL_WINDOWS: tail} and tables == {tk.ALL_WINDOWS: ()}
    elif tk.ALL_WINDOWS in tails:  # one window row or column: every window has the mask
        assert tails == {tk.ALL_WINDOWS: tail} and tables == {tk.ALL_WINDOWS: (3,)}
    else:
        assert tails == {tk.INTERIOR_WINDOWS: tail, tk.BORDER_WINDOWS: tail}
        assert tables == {tk.INTERIOR_WINDOWS: (), tk.BORDER_WINDOWS: (3,)}


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift,per_program", WHOLE_WINDOW_SHAPES)
def test_whole_window_programs_match_the_oracle_fp32(
    B, grid, heads, head_dim, window, shift, per_program, pad_order, monkeypatch
):
    recorder = _whole_window_launches(monkeypatch, per_program, force=True)
    inputs = make_inputs(B, grid, heads, head_dim, window, bias=B != 3)
    kwargs = dict(
        grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order, mask_value=-100.0
    )
    out = tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args())
    assert_close(out, window_attention_naive(*inputs, **kwargs), atol=OP_FP32_ATOL, name="output")
    _assert_whole_window(recorder, shift)


@pytest.mark.parametrize("table_dtype", [torch.float16, torch.float32], ids=["table-fp16", "table-fp32-autocast"])
@pytest.mark.parametrize(
    "B,grid,heads,head_dim,window,shift,per_program", [WHOLE_WINDOW_SHAPES[i] for i in (0, 2, 4, 5, 8)]
)
def test_whole_window_programs_fp16_error_is_that_of_pytorch(
    B, grid, heads, head_dim, window, shift, per_program, table_dtype, monkeypatch
):
    """fp16 at windows 12 and 16, head_dim 32: the whole-window programs the host picks
    (tiles.forward_window_tiles), the table with the shift mask added in fp16 included (its sum rounds only where
    the mask applies: the scores there vanish in the softmax), within PyTorch's own fp16 error."""
    recorder = _whole_window_launches(monkeypatch, per_program)
    inputs = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=table_dtype)
    _assert_fp16_error_is_that_of_pytorch(
        inputs, dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    )
    if tiles.forward_window_tiles(window * window, 32, torch.float16, device_arch(inputs[0])) is not None:  # sm_90
        _assert_whole_window(recorder, shift)


@pytest.mark.parametrize("table_dtype", [torch.float16, torch.float32], ids=["table-fp16", "table-fp32-autocast"])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", [SEVERAL_WINDOWS[0], SEVERAL_WINDOWS[2]])
def test_several_windows_per_program_fp16(B, grid, heads, head_dim, window, shift, table_dtype, monkeypatch):
    """fp16 programs of 4 windows (the 16-bit tiles: one key block, the bias tile held across the windows),
    with the table as a 16-bit model passes it and as autocast does (fp32): within PyTorch's own fp16 error."""
    monkeypatch.setattr(tk, "FORWARD_WINDOWS_PER_PROGRAM", 4)
    monkeypatch.setattr(tk, "_multiprocessors", lambda t: 1)
    inputs = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=table_dtype)
    _assert_fp16_error_is_that_of_pytorch(
        inputs, dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    )


@pytest.mark.kernels(forward=False)  # host-side: the launch's group size
def test_windows_per_program_keeps_every_multiprocessor_busy():
    """The group size: the largest power of two up to FORWARD_WINDOWS_PER_PROGRAM that leaves at least one
    program per SM."""
    top = tk.FORWARD_WINDOWS_PER_PROGRAM
    assert tk.windows_per_program(64 * 49, 1, 3, 132) == top  # a large batch: the largest group
    assert tk.windows_per_program(72, 2, 4, 132) == 4  # 18 groups x 2 row blocks x 4 heads = 144 programs
    assert tk.windows_per_program(3, 1, 1, 132) == 1  # fewer programs than SMs at any group size


@pytest.mark.kernels(forward=False)  # host-side: what the kernel is handed
def test_table_is_read_in_the_dtype_it_arrives_in():
    """The forward reads a 16-bit model's table as it is (no per-call fp32 copy), and autocast's fp32 table
    as it is (fp32: the logits keep its precision); another dtype is converted to the compute dtype."""
    qkv16 = torch.zeros(1, 4, 6, dtype=torch.float16, device=DEVICE)
    for table in (
        torch.rand(1, 4, 4, dtype=torch.float16, device=DEVICE),
        torch.rand(1, 4, 4, dtype=torch.float32, device=DEVICE),
    ):
        read = tk._forward_table(qkv16, table)
        assert read.dtype == table.dtype and read.data_ptr() == table.data_ptr()
    read = tk._forward_table(qkv16, torch.rand(1, 4, 4, dtype=torch.bfloat16, device=DEVICE))
    assert read.dtype == torch.float32
    read = tk._forward_table(qkv16.double(), torch.rand(1, 4, 4, dtype=torch.float32, device=DEVICE))
    assert read.dtype == torch.float64


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", ODD_HEAD_DIMS)
def test_forward_any_head_dim(B, grid, heads, head_dim, window, shift, pad_order):
    """Head dims 10, 24 and 30 (masked channel tiles): fp32 within the op's tolerance, fp16 (autocast's fp32
    table) within PyTorch's own fp16 error."""
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    inputs = make_inputs(B, grid, heads, head_dim, window)
    assert tiles.channel_block(head_dim) > head_dim  # the masked path
    out = tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args())
    assert_close(out, window_attention_naive(*inputs, **kwargs), atol=OP_FP32_ATOL, name="output")

    inputs = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=torch.float32)
    exact = window_attention_naive(*[t.double() if t is not None else None for t in inputs], **kwargs)
    eager_error = (window_attention_naive(*inputs, **kwargs).double() - exact).abs().max().item()
    kernel_error = (
        (tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args()).double() - exact)
        .abs()
        .max()
        .item()
    )
    assert kernel_error <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR * 0.1, (
        f"kernel fp16 error {kernel_error:.3e} vs eager fp16 error {eager_error:.3e}"
    )


@pytest.mark.gpu  # the interpreter computes bf16 wrongly; bf16 runs on a GPU
def test_forward_bf16_error_is_that_of_pytorch():  # pragma: no cover - GPU only
    inputs = make_inputs(2, (16, 16), 2, 32, 8, dtype=torch.bfloat16, table_dtype=torch.float32)
    kwargs = dict(grid_size=(16, 16), num_heads=2, window_size=8, shift_size=4)
    exact = window_attention_naive(*[t.double() if t is not None else None for t in inputs], **kwargs)
    eager_error = (window_attention_naive(*inputs, **kwargs).double() - exact).abs().max().item()
    out = tk.window_attention_triton_forward(*inputs, *WindowGeometry.from_args(**kwargs).as_op_args())
    assert (out.double() - exact).abs().max().item() <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR


@pytest.mark.interpreter
@pytest.mark.kernels(forward=False)  # a refusal, and "auto" on CPU is eager
def test_bf16_is_refused_under_the_interpreter():
    """The interpreter's bf16 dot is wrong (outputs near 1e8 where the reference's are O(1)): forcing the
    kernels there raises instead of returning those numbers; "auto" takes the eager path."""
    inputs = make_inputs(1, (8, 8), 2, 16, 4, dtype=torch.bfloat16, table_dtype=torch.float32)
    kwargs = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)
    with pytest.raises(ValueError, match="bfloat16 CPU tensors"):
        swinv2_fast.window_attention(*inputs, implementation="triton", **kwargs)
    assert torch.equal(
        swinv2_fast.window_attention(*inputs, implementation="auto", **kwargs),
        window_attention_reference(*inputs, **kwargs),
    )


def test_strided_qkv_and_no_bias():
    qkv, _, logit_scale, position_bias = make_inputs(2, (8, 8), 2, 16, 4, bias=False)
    wide = torch.randn(2, 64, qkv.shape[-1] + 5, device=DEVICE)
    wide[..., : qkv.shape[-1]] = qkv
    strided = wide[..., : qkv.shape[-1]]
    assert not strided.is_contiguous()
    kwargs = dict(grid_size=(7 + 1, 8), num_heads=2, window_size=4, shift_size=2)
    out = tk.window_attention_triton_forward(
        strided, None, logit_scale, position_bias, *WindowGeometry.from_args(**kwargs).as_op_args()
    )
    assert_close(out, window_attention_naive(qkv, None, logit_scale, position_bias, **kwargs), atol=OP_FP32_ATOL)


def test_logit_scale_above_the_clamp():
    qkv, qkv_bias, logit_scale, position_bias = make_inputs(1, (8, 8), 2, 16, 4)
    logit_scale = torch.full_like(logit_scale, 7.0)  # exp(7) > 100: clamped
    kwargs = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)
    out = tk.window_attention_triton_forward(
        qkv, qkv_bias, logit_scale, position_bias, *WindowGeometry.from_args(**kwargs).as_op_args()
    )
    assert_close(
        out, window_attention_naive(qkv, qkv_bias, logit_scale, position_bias, **kwargs), atol=OP_FP32_ATOL_AT_CLAMP
    )


@pytest.mark.kernels(forward=False)  # nothing to launch for an empty batch
def test_empty_batch():
    qkv, qkv_bias, logit_scale, position_bias = make_inputs(1, (8, 8), 2, 16, 4)
    out = tk.window_attention_triton_forward(
        qkv[:0], qkv_bias, logit_scale, position_bias, *WindowGeometry.from_args((8, 8), 2, 4).as_op_args()
    )
    assert out.shape == (0, 64, 32)


@pytest.mark.kernels(backward=True)
def test_gradients_through_the_fused_op_match_the_reference():
    inputs = [t.clone().requires_grad_() for t in make_inputs(2, (6, 7), 2, 16, 4)]
    kwargs = dict(grid_size=(6, 7), num_heads=2, window_size=4, shift_size=2, pad_order=ROLL_THEN_PAD)
    grad_out = torch.randn(2, 42, 32, device=DEVICE)
    fused = window_attention(*inputs, implementation="triton", **kwargs)
    fused_grads = torch.autograd.grad(fused, inputs, grad_out)
    eager = window_attention(*inputs, implementation="eager", **kwargs)
    eager_grads = torch.autograd.grad(eager, inputs, grad_out)
    assert_close(fused, eager, atol=OP_FP32_ATOL, name="output")
    for name, a, b in zip(["qkv", "qkv_bias", "logit_scale", "position_bias"], fused_grads, eager_grads):
        assert_close(a, b, atol=OP_GRAD_FP32_ATOL, rtol=OP_GRAD_FP32_RTOL, name=f"grad {name}")


def _shift_regions(size, window, shift):
    """Shift-mask region (0, 1, 2) of each row of an unpadded, rolled axis: [0, P - window),
    [P - window, P - shift), [P - shift, P) of the shifted grid, mapped back to the token's row."""
    shifted = (torch.arange(size) - shift) % size  # where each token sits in the rolled grid
    return (shifted >= size - window).long() + (shifted >= size - shift).long()


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize(
    "side,window,head_dim", [(8, 4, 16), (16, 8, 32)], ids=["w4-mask-computed", "w8-fp32-mask-in-table"]
)
def test_mask_value_minus_100_and_minus_200_are_told_apart(pad_order, side, window, head_dim):
    """transformers adds its -100 shift mask twice (-200), timm once (-100). At ordinary logit scales the two
    give the same softmax to fp32 precision; here they do not: every q is one unit vector e, keys of region
    (1, 1) are -e and all others +e, at the clamped scale 100. A query of region (1, 1) then sees its own
    region at logit -100 + bias and the masked regions at bias + 0 (mask -100) or bias - 100 (mask -200):
    the masked keys dominate with -100 and not with -200. The kernel must add the value it is given, once:
    computed per score (window 4, one key block) or read from the tables with it added (fp32 window 8: two
    32-key blocks, `mask_in_table`)."""
    grid, shift, heads = (side, side), window // 2, 1
    C, N, L = heads * head_dim, window * window, side * side
    region = _shift_regions(side, window, shift)[:, None] * 3 + _shift_regions(side, window, shift)[None, :]
    e = torch.zeros(head_dim)
    e[0] = 1.0
    sign = torch.where(region.flatten() == 4, -1.0, 1.0)  # (L,)
    gen = torch.Generator().manual_seed(11)
    qkv = torch.cat([e.expand(L, C), sign[:, None] * e, torch.randn(L, C, generator=gen)], dim=1)[None]
    qkv = qkv.to(DEVICE)
    scale = torch.full((heads, 1, 1), math.log(100) + 1.0, device=DEVICE)
    table = (16 * torch.sigmoid(torch.randn(heads, N, N, generator=gen))).to(DEVICE)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    ref = {m: window_attention_naive(qkv, None, scale, table, mask_value=m, **kwargs) for m in (-100.0, -200.0)}
    assert (ref[-100.0] - ref[-200.0]).abs().max() > 0.1, "the construction no longer separates the two values"
    for mask_value, expected in ref.items():
        fused = window_attention(qkv, None, scale, table, mask_value=mask_value, implementation="triton", **kwargs)
        assert_close(fused, expected, atol=OP_FP32_ATOL_AT_CLAMP, name=f"output, mask {mask_value}")


@pytest.mark.kernels(forward=False)  # the probabilities exist only on the eager path, by design
def test_attention_probabilities_come_from_the_eager_path():
    inputs = make_inputs(1, (8, 8), 2, 16, 4)
    kwargs = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)
    out, probs = window_attention(*inputs, return_attention_probs=True, implementation="triton", **kwargs)
    expected_out, expected_probs = window_attention_reference(*inputs, return_attention_probs=True, **kwargs)
    assert probs.shape == (4, 2, 16, 16)
    assert torch.equal(probs, expected_probs) and torch.equal(out, expected_out)
    assert_close(probs.sum(-1), torch.ones(4, 2, 16, device=DEVICE), atol=1e-6, name="rows of P sum to 1")


# ------------------------------------------------------------------------------------------ whole models
# Windows of the published models, so that a window takes several query and key blocks of the kernels
# (N = 49, 64, 144 against blocks of 16 to 64): the online softmax's rescaling across key blocks and the
# masked tail of a block run at model level. Stage 2 is at the window (shift 0), stage 1 shifted.
MODEL_WINDOWS = {  # (window 12: one stage, decided at 96x96, run on a smaller padded input)
    7: dict(image_size=56, window_size=7, embed_dim=16, depths=[2, 2], num_heads=[1, 1], drop_path_rate=0.0),
    8: dict(image_size=64, window_size=8, embed_dim=32, depths=[2, 2], num_heads=[1, 2], drop_path_rate=0.0),
    12: dict(
        image_size=96,
        window_size=12,
        embed_dim=16,
        depths=[2],
        num_heads=[1],
        drop_path_rate=0.0,
        pretrained_window_sizes=[8],
    ),
}


def _transformers_pair(config):
    import transformers

    hf_config = transformers.Swinv2Config(**config, num_labels=3)
    hf = perturb_(transformers.Swinv2ForImageClassification(hf_config)).eval().to(DEVICE)
    ours = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config.from_transformers(hf_config)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours.to(DEVICE)


@pytest.mark.parametrize("size", [(32, 32), (36, 28)], ids=["32x32", "36x28-padded"])
def test_model_with_triton_matches_transformers(size):
    hf, ours = _transformers_pair(TINY)
    ours.set_attn_implementation("triton")
    x = torch.randn(2, 3, *size, device=DEVICE)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        actual = ours(x, output_hidden_states=True)
        eager = ours.set_attn_implementation("eager")(x).logits
    assert_close(actual.logits, expected.logits, atol=FP32_ATOL, name="logits vs transformers")
    for i, (a, b) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert_close(a, b, atol=FP32_ATOL, name=f"hidden_states[{i}]")
    assert_close(actual.logits, eager, atol=FP32_ATOL, name="triton vs eager")


@pytest.mark.parametrize(
    "window,size",
    [
        pytest.param(7, (56, 56), id="w7-56x56"),
        pytest.param(7, (60, 45), id="w7-60x45-padded"),
        pytest.param(8, (64, 64), id="w8-64x64"),
        pytest.param(12, (60, 52), id="w12-60x52-padded", marks=pytest.mark.slow),
    ],
)
def test_model_with_published_windows_matches_transformers(window, size):
    """Fused model, windows 7, 8 and 12 (several key blocks per window), against transformers' eager model."""
    hf, ours = _transformers_pair(MODEL_WINDOWS[window])
    ours.set_attn_implementation("triton")
    x = torch.randn(1, 3, *size, device=DEVICE)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        actual = ours(x, output_hidden_states=True)
    assert_close(actual.logits, expected.logits, atol=FP32_ATOL, name="logits vs transformers")
    for i, (a, b) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert_close(a, b, atol=FP32_ATOL, name=f"hidden_states[{i}]")


def test_timm_model_with_triton_matches_timm():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    timm_model = (
        perturb_(
            SwinTransformerV2(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 1), num_classes=3)
        )
        .eval()
        .to(DEVICE)
    )
    ours = swinv2_fast.from_timm(timm_model, attn_implementation="triton")
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        assert_close(ours(x).logits, timm_model(x), atol=FP32_ATOL, name="logits vs timm")


def test_model_under_autocast_fp16():
    """Under torch.autocast the projection is fp16 while the logit scale and the bias table stay fp32: the
    fused path takes the mixed dtypes, and its error against fp32 is that of the eager path's (x2)."""
    _, model = _transformers_pair(TINY)
    x = torch.randn(2, 3, 36, 28, device=DEVICE)
    with torch.no_grad():
        reference = model.set_attn_implementation("eager")(x).logits.double()
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            eager = model(x).logits.double()
            fused = model.set_attn_implementation("triton")(x).logits.double()
    eager_error = (eager - reference).abs().max().item()
    fused_error = (fused - reference).abs().max().item()
    assert eager_error > 0, "autocast did not lower the precision: the test would compare nothing"
    assert fused_error <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR, (fused_error, eager_error)
