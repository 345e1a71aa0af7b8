"""The fused backward against the reference's autograd: compiled on CUDA tensors where a GPU runs the kernels,
under Triton's interpreter on CPU tensors elsewhere (tests/conftest.py: KERNEL_DEVICE)."""

import copy
import math

import pytest
import torch

import swinv2_fast
from swinv2_fast import window_attention
from swinv2_fast.kernels import PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry, tiles, window_attention_naive
from swinv2_fast.kernels.launch import launch_dims
from swinv2_fast.kernels.naive import window_log_sum_exp

from _utils import (
    FP32_ATOL,
    LOW_PRECISION_FLOOR,
    MODEL_GRAD_FP32_ATOL,
    MODEL_GRAD_FP32_RTOL,
    NON_SQUARE,
    ODD_HEAD_DIMS,
    OP_FP32_ATOL,
    OP_GRAD_FP32_ATOL,
    OP_GRAD_FP32_RTOL,
    SHAPES,
    TINY,
    assert_close,
    assert_errors_within_pytorch,
    make_inputs,
    op,
    outputs_and_grads,
    perturb_,
    rounding_sensitivity,
    slow_where,
    sum_floors,
    tkb,
)
from _utils import GRAD_NAMES as NAMES
from _utils import KERNEL_DEVICE as DEVICE
from _utils import pair as _pair

# Every test here runs the forward and backward kernels unless marked otherwise (conftest: launch proof).
pytestmark = pytest.mark.kernels(backward=True)


@pytest.mark.interpreter  # fp64 runs the kernels only under the interpreter; on a GPU "triton" refuses it
@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize(
    "grid,window,shift",
    [((6, 7), 4, 2), ((8, 8), 4, 0), ((5, 3), 4, 0)],
    ids=["6x7-w4s2-padded", "8x8-w4s0", "5x3-w4-below-window"],
)
def test_gradcheck_fp64(grid, window, shift, pad_order):
    """torch.autograd.gradcheck of the fused op in fp64, every differentiable input. The k bias is made
    non-zero: with k = 0 on padded rows, x / max(||x||, eps) has slope 1 / eps there, and finite differences
    of step 1e-6 cannot follow it (the published models' k bias is a constant zero, not a parameter)."""
    inputs = [t.double() for t in make_inputs(1, grid, 1, 16, window, seed=3)]
    inputs[1][16:32] = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in inputs]
    kwargs = dict(
        grid_size=grid, num_heads=1, window_size=window, shift_size=shift, pad_order=pad_order, implementation="triton"
    )
    assert torch.autograd.gradcheck(
        lambda *xs: window_attention(*xs, **kwargs), inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True
    )


def needs_padding(grid, window):
    wh, ww = _pair(window)
    return grid[0] % wh != 0 or grid[1] % ww != 0


def _relative_error(a, exact):
    return (a.double() - exact).abs().max().item() / max(exact.abs().max().item(), 1e-30)


def gradient_sensitivity(inputs, grad_out, kwargs, dtype):
    """Each gradient's sensitivity to rounding the inputs in `dtype` (conftest.rounding_sensitivity)."""
    g = grad_out.double()
    return rounding_sensitivity(
        lambda ts: list(outputs_and_grads("eager", ts, g, **kwargs)[1]), list(inputs), dtype, _relative_error
    )


def _three_ways(B, grid, heads, head_dim, inputs, kwargs, seed, dtype, with_sensitivity=False):
    """Gradients (fused, eager in the same dtype, exact in fp64) for one grad_out; with_sensitivity: and each
    gradient's sensitivity to rounding the inputs in that dtype."""
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, generator=torch.Generator().manual_seed(seed))
    _, exact = outputs_and_grads("eager", [t.double() for t in inputs], grad_out.double().to(DEVICE), **kwargs)
    _, eager = outputs_and_grads("eager", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    _, fused = outputs_and_grads("triton", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    if with_sensitivity:
        return fused, eager, exact, gradient_sensitivity(inputs, grad_out.to(DEVICE, dtype), kwargs, dtype)
    return fused, eager, exact


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize(
    "B,grid,heads,head_dim,window,shift", slow_where(SHAPES[:8] + NON_SQUARE, "-w12", "-w16", "-w24", "-h1d64-")
)
def test_fp32_gradients_match_reference(B, grid, heads, head_dim, window, shift, pad_order):
    inputs = make_inputs(B, grid, heads, head_dim, window, seed=1)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    fused, eager, exact, sensitivity = _three_ways(
        B, grid, heads, head_dim, inputs, kwargs, 2, torch.float32, with_sensitivity=True
    )
    assert_errors_within_pytorch(fused, eager, exact, sum_floors(B, grid, window), sensitivity)
    # the bias gradient: only padded positions read the bias, so it is exactly zero without padding and
    # non-zero in its v part with it (the comparison above is then not one of zeros)
    C = heads * head_dim
    if needs_padding(grid, window):
        assert exact[1][2 * C :].abs().max() > 0 and fused[1][2 * C :].abs().max() > 0
    else:
        assert torch.count_nonzero(fused[1]) == 0


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", ODD_HEAD_DIMS)
def test_gradients_any_head_dim(B, grid, heads, head_dim, window, shift, pad_order):
    """Head dims 10, 24 and 30 (masked channel tiles), every gradient: fp32 as in the test above, fp16 (with
    autocast's fp32 table and a non-zero k bias, as below) within PyTorch's own fp16 error."""
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    inputs = make_inputs(B, grid, heads, head_dim, window, seed=1)
    fused, eager, exact, sensitivity = _three_ways(
        B, grid, heads, head_dim, inputs, kwargs, 2, torch.float32, with_sensitivity=True
    )
    assert_errors_within_pytorch(fused, eager, exact, sum_floors(B, grid, window), sensitivity)
    inputs = make_inputs(
        B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=torch.float32, seed=4, zero_k_bias=False
    )
    fused, eager, exact = _three_ways(B, grid, heads, head_dim, inputs, kwargs, 5, torch.float16)
    assert_errors_within_pytorch(fused, eager, exact, LOW_PRECISION_FLOOR)


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", [SHAPES[1], SHAPES[4]])
def test_fp16_gradient_error_is_that_of_pytorch(B, grid, heads, head_dim, window, shift, pad_order):
    """fp16 projection with the fp32 table and scale of autocast. The k bias is non-zero: with a zero one the
    k part of the bias gradient has size 1e12 (see above), beyond fp16, and is inf in both implementations."""
    inputs = make_inputs(
        B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=torch.float32, seed=4, zero_k_bias=False
    )
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    fused, eager, exact = _three_ways(B, grid, heads, head_dim, inputs, kwargs, 5, torch.float16)
    assert_errors_within_pytorch(fused, eager, exact, LOW_PRECISION_FLOOR)


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize(
    "B,grid,heads,head_dim,window,shift", slow_where([SHAPES[0], SHAPES[2], SHAPES[9], NON_SQUARE[0]], "-w24")
)
@pytest.mark.kernels(forward=False, backward=True)  # the first backward kernel alone
def test_backward_statistics_and_delta(B, grid, heads, head_dim, window, shift, pad_order):
    """The first backward kernel's softmax statistics give the reference's log-sum-exp of every window row,
    and its delta = sum_j P_ij dP_ij equals rowsum(dO * O), the same quantity, computed in fp64."""
    inputs = make_inputs(B, grid, heads, head_dim, window, zero_k_bias=False)
    kwargs = dict(
        grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order, mask_value=-100.0
    )
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, device=DEVICE)
    geometry = WindowGeometry.from_args(**kwargs)
    dims = launch_dims(inputs[0], *geometry.as_op_args()[:5])
    common = tkb._backward_statistics(grad_out, *inputs, dims, geometry.pad_order, geometry.mask_value)[-1]
    lse = common["STATS"].unflatten(-1, (-1, 2)).sum(-1)  # (row max, log row sum) pairs
    assert_close(lse, window_log_sum_exp(*inputs, **kwargs), atol=OP_FP32_ATOL, rtol=1e-6, name="log-sum-exp")
    out = window_attention_naive(*[t.double() for t in inputs], **kwargs)
    delta = (grad_out.double() * out).unflatten(-1, (heads, head_dim)).sum(-1)
    assert_close(common["DELTA"], delta, atol=OP_FP32_ATOL, name="delta")


@pytest.mark.kernels  # the second backward differentiates the reference, by design
def test_double_backward_differentiates_the_reference():
    """A backward that records a graph (a gradient penalty) goes through the reference by design; the
    second-order gradients are the eager path's."""
    inputs = make_inputs(1, (6, 7), 2, 16, 4, seed=9)
    inputs[1][16 * 2 : 16 * 4] = 0.1  # a non-zero k bias: padded keys then depend on it
    kwargs = dict(grid_size=(6, 7), num_heads=2, window_size=4, shift_size=2)
    found = {}
    for implementation in ("triton", "eager"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = window_attention(*leaves, implementation=implementation, **kwargs)
        (first,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
        first.square().sum().backward()
        found[implementation] = [t.grad for t in leaves]
    for name, fused, eager in zip(NAMES, found["triton"], found["eager"]):
        assert fused is not None and fused.abs().sum() > 0, name
        # the same reference graph on both sides, fed the fused and the eager forward's outputs, which differ
        # in fp32 rounding: agreement to OP_GRAD_FP32_RTOL of the gradient's largest element
        scale = eager.abs().max().item()
        assert_close(fused, eager, atol=OP_GRAD_FP32_RTOL * scale, rtol=OP_GRAD_FP32_RTOL, name=f"second-order {name}")


@pytest.mark.parametrize(
    "checkpointing",
    [
        pytest.param(None, id="plain"),
        pytest.param(True, id="reentrant", marks=pytest.mark.slow),
        pytest.param(False, id="non-reentrant", marks=pytest.mark.slow),
    ],
)
def test_ordinary_backward_runs_the_fused_kernels(monkeypatch, checkpointing):
    """Only a backward that records a graph goes to the reference: a training step, checkpointed or not,
    runs the fused backward kernels."""
    used = []
    monkeypatch.setattr(op, "_reference_backward", lambda *args, **kwargs: used.append("reference"))
    fused = op.window_attention_triton_backward
    monkeypatch.setattr(
        op, "window_attention_triton_backward", lambda *args, **kwargs: used.append("fused") or fused(*args, **kwargs)
    )
    config = swinv2_fast.Swinv2Config(**TINY, attn_implementation="triton")
    model = swinv2_fast.Swinv2Model(config).train().to(DEVICE)
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing})
    x = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], device=DEVICE)
    model(x).last_hidden_state.sum().backward()
    assert used and set(used) == {"fused"}


@pytest.mark.slow
def test_gradients_are_deterministic():
    inputs = make_inputs(2, (10, 13), 2, 16, 4, seed=6)
    kwargs = dict(grid_size=(10, 13), num_heads=2, window_size=4, shift_size=2)
    grad_out = torch.randn(2, 130, 32, device=DEVICE)
    first = outputs_and_grads("triton", inputs, grad_out, **kwargs)
    second = outputs_and_grads("triton", inputs, grad_out, **kwargs)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_padded_keys_reach_the_biases():
    """Only padded positions read qkv_bias: its k and v parts get exactly the reference's gradient; its q part
    none (padded queries have no output)."""
    inputs = make_inputs(1, (6, 6), 1, 16, 4, seed=7)
    kwargs = dict(grid_size=(6, 6), num_heads=1, window_size=4, shift_size=0)
    grad_out = torch.randn(1, 36, 16, device=DEVICE)
    _, fused = outputs_and_grads("triton", inputs, grad_out, **kwargs)
    _, eager = outputs_and_grads("eager", inputs, grad_out, **kwargs)
    d_bias = fused[1]
    assert torch.count_nonzero(d_bias[:16]) == 0 and d_bias[32:].abs().sum() > 0
    assert_close(d_bias, eager[1], atol=OP_GRAD_FP32_ATOL, rtol=OP_GRAD_FP32_RTOL, name="qkv_bias grad")


def test_logit_scale_gradient_is_zero_where_clamped():
    """Above the clamp the scale's gradient is zero, below it is not, as in the reference; exactly at the
    bound it follows the installed torch's clamp (zero in torch 2.14, passed through in 2.11 and 2.13)."""
    qkv, qkv_bias, _, table = make_inputs(1, (8, 8), 3, 16, 4, seed=8)
    logit_scale = torch.tensor([7.0, math.log(100), 1.0], device=DEVICE).view(3, 1, 1)
    kwargs = dict(grid_size=(8, 8), num_heads=3, window_size=4, shift_size=2)
    grad_out = torch.randn(1, 64, 48, device=DEVICE)
    _, fused = outputs_and_grads("triton", (qkv, qkv_bias, logit_scale, table), grad_out, **kwargs)
    _, eager = outputs_and_grads("eager", (qkv, qkv_bias, logit_scale, table), grad_out, **kwargs)
    above, at, below = fused[2].flatten().tolist()
    assert above == 0.0 and below != 0.0
    assert (at == 0.0) == (eager[2].flatten()[1].item() == 0.0), (at, eager[2].flatten().tolist())
    assert_close(fused[2], eager[2], atol=OP_GRAD_FP32_ATOL, rtol=OP_GRAD_FP32_RTOL, name="logit_scale grad")


# ------------------------------------------------------------------------------------------ whole models
def _train_step(model, x, labels):
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("size", [(32, 32), (36, 28)], ids=["32x32", "36x28-padded"])
def test_training_step_triton_matches_eager_and_transformers(size):
    import transformers

    hf_config = transformers.Swinv2Config(**TINY, num_labels=3)
    hf = perturb_(transformers.Swinv2ForImageClassification(hf_config)).train().to(DEVICE)
    ours = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config.from_transformers(hf_config)).train()
    ours.load_state_dict(hf.state_dict())
    ours.to(DEVICE)
    x, labels = torch.randn(2, 3, *size, device=DEVICE), torch.tensor([0, 2], device=DEVICE)
    hf_loss, hf_grads = _train_step(hf, x, labels)
    eager_loss, eager_grads = _train_step(ours.set_attn_implementation("eager"), x, labels)
    loss, fused_grads = _train_step(ours.set_attn_implementation("triton"), x, labels)
    assert_close(loss, eager_loss, atol=FP32_ATOL, name="loss vs eager")
    assert_close(loss, hf_loss, atol=FP32_ATOL, name="loss vs transformers")
    assert fused_grads.keys() == eager_grads.keys() == hf_grads.keys()
    for key in fused_grads:
        assert_close(
            fused_grads[key],
            eager_grads[key],
            atol=MODEL_GRAD_FP32_ATOL,
            rtol=MODEL_GRAD_FP32_RTOL,
            name=f"{key} vs eager",
        )
        assert_close(
            fused_grads[key],
            hf_grads[key],
            atol=MODEL_GRAD_FP32_ATOL,
            rtol=MODEL_GRAD_FP32_RTOL,
            name=f"{key} vs transformers",
        )


@pytest.mark.slow
def test_gradient_checkpointing_with_the_fused_path():
    config = swinv2_fast.Swinv2Config(**TINY, num_labels=3)
    model = perturb_(swinv2_fast.Swinv2ForImageClassification(config)).train().set_attn_implementation("triton")
    model.to(DEVICE)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    x, labels = torch.randn(2, 3, 32, 32, device=DEVICE), torch.tensor([1, 2], device=DEVICE)
    loss, g = _train_step(model, x, labels)
    loss_ckpt, g_ckpt = _train_step(checkpointed, x, labels)
    assert torch.equal(loss, loss_ckpt)
    for key in g:
        assert torch.equal(g[key], g_ckpt[key]), key


def test_sm80_table_tiles_give_the_same_gradients(monkeypatch):
    """Window 7 on sm_80: the table kernel runs half-width key tiles (tiles.table_kernel_tiles) beside the other
    three kernels' (64, 64). Its grid, tile offsets and per-tile scale sums then follow its own tiles: the table and
    scale gradients are those of the shared tiles up to the order of their fp32 sums, the other kernels' bitwise.
    With Triton 3.6: from 3.8 on, window 7 at head_dim 32 runs the fused backward (tiles._fused_masked_window)."""
    monkeypatch.setattr(tiles, "_triton_release", lambda: (3, 6))
    inputs = make_inputs(1, (14, 14), 2, 32, 7, dtype=torch.float16, table_dtype=torch.float16, seed=11)
    kwargs = dict(grid_size=(14, 14), num_heads=2, window_size=7, shift_size=3)
    grad_out = torch.randn(1, 196, 64, generator=torch.Generator().manual_seed(12)).to(DEVICE, torch.float16)
    monkeypatch.setattr(tkb, "device_arch", lambda t: 90)  # the shared tiles, whatever runs the test
    shared = outputs_and_grads("triton", inputs, grad_out, **kwargs)[1]
    launched = []
    table_kernel = tkb._window_attention_bwd_dbias_kernel

    class _Recorded:  # the table kernel's launches as made: grid, tiles, warps
        def __getitem__(self, grid):
            def launch(**kw):
                launched.append((tuple(grid), kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"]))
                # the grid's tiles are the launched tiles' (checked before the kernel would write past its buffers)
                assert grid[0] == -(-49 // kw["BLOCK_M"]) * -(-49 // kw["BLOCK_N"]), launched
                return table_kernel[grid](**kw)

            return launch

    monkeypatch.setattr(tkb, "device_arch", lambda t: 80)
    monkeypatch.setattr(tkb, "_window_attention_bwd_dbias_kernel", _Recorded())
    own = outputs_and_grads("triton", inputs, grad_out, **kwargs)[1]
    # 2 x 2 windows, shifted: the one off the border, then three on it; 49 tokens in (64, 32) tiles: 2 tiles
    assert [(grid[:2], tile) for grid, *tile in launched] == [((2, 2), [64, 32, 8])] * 2, launched
    for name, a, b in zip(NAMES, own, shared):
        if name in ("logit_scale", "position_bias"):
            assert_close(a, b, atol=1e-5 * b.abs().max().item(), name=name)
            assert b.abs().max() > 0, name
        else:
            assert torch.equal(a, b), name
