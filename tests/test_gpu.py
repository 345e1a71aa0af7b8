"""The GPU selection (`scripts/gpu.sh`): the fused kernels compiled on CUDA tensors at the published models'
shapes, against the reference, transformers and timm.

On a CUDA machine every test here runs at the real shapes (window tokens N = 49, 64, 144, 256, 576; head_dim
32; batch 2), in fp32, fp16 and bf16. Under `scripts/gpu.sh --smoke` (SWINV2_FAST_SMOKE=1, no GPU) the same
tests run on CPU tensors under Triton's interpreter at tiny shapes, and the bf16 ones skip with the reason
(the interpreter computes bf16 dot products wrongly, so "triton" refuses bf16 there). Elsewhere (the main
suite on a CPU machine) the module skips: tests/test_triton_*.py cover the kernels under the interpreter.
Every test that asks for "triton" proves with count_launches() that the kernels ran.

Ordered by importance, because scripts/gpu.sh cuts the run at its budget: the op forward at the two
published windows, the models in bf16 against transformers, the backward, determinism, torch.compile,
patch(), partial fine-tuning, then the remaining forward shapes.
"""

import copy
import math
import os

import pytest
import torch

import swinv2_fast
from benchmarks import cases
from swinv2_fast.kernels import PAD_THEN_ROLL, ROLL_THEN_PAD, tiles, window_attention_naive

from _utils import (
    FP32_ATOL,
    INTERPRETER,
    KERNEL_DEVICE,
    LOW_PRECISION_FACTOR,
    LOW_PRECISION_FLOOR,
    MODEL_GRAD_FP32_ATOL,
    MODEL_GRAD_FP32_RTOL,
    OP_FP32_ATOL,
    OP_GRAD_FP32_RTOL,
    assert_close,
    backward_launches,
    count_launches,
    forward_launches,
    outputs_and_grads,
    sum_grad_fp32_rtol,
)

GPU = KERNEL_DEVICE.type == "cuda"
SMOKE = os.environ.get("SWINV2_FAST_SMOKE") == "1"
DEVICE = KERNEL_DEVICE

# the `gpu` marker (conftest skips it without CUDA) everywhere but in the smoke run, which is this module's
# CPU mode on purpose
pytestmark = [] if SMOKE and not GPU else [pytest.mark.gpu]
if not GPU and not (SMOKE and INTERPRETER):
    pytest.skip(
        "the GPU selection runs on a CUDA device, or on CPU under scripts/gpu.sh --smoke "
        "(SWINV2_FAST_SMOKE=1 with Triton's interpreter)",
        allow_module_level=True,
    )

BF16_ON_INTERPRETER = (
    "Triton's interpreter computes bf16 dot products wrongly ('triton' refuses bf16 on CPU): bf16 runs on a GPU"
)
HEAD_DIM = 32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_param(dtype):
    marks = [pytest.mark.skip(reason=BF16_ON_INTERPRETER)] if dtype == torch.bfloat16 and not GPU else []
    return pytest.param(dtype, marks=marks, id=str(dtype).replace("torch.", ""))


# (grid, window, shift). GPU: every window of the published models at stage-1-like grids, shifted and not,
# grids that need padding. Smoke: windows 4 and 7 at grids the interpreter runs in seconds.
if GPU:
    SHAPES = {
        "w8-16x16-s4": ((16, 16), 8, 4),
        "w16-32x32-s8": ((32, 32), 16, 8),
        "w7-14x14-s3": ((14, 14), 7, 3),
        "w7-10x13-s0-padded": ((10, 13), 7, 0),
        "w8-12x11-s4-padded": ((12, 11), 8, 4),
        "w12-24x24-s0": ((24, 24), 12, 0),
        "w12-15x26-s6-padded": ((15, 26), 12, 6),
        "w16-20x18-s0-padded": ((20, 18), 16, 0),
        "w24-48x48-s12": ((48, 48), 24, 12),
        "w24-30x27-s12-padded": ((30, 27), 24, 12),
    }
    BATCH, HEADS = 2, 2
else:
    SHAPES = {
        "w4-8x8-s2": ((8, 8), 4, 2),
        "w4-6x7-s0-padded": ((6, 7), 4, 0),
        "w7-7x7-s0": ((7, 7), 7, 0),
        "w7-9x10-s3-padded": ((9, 10), 7, 3),
    }
    BATCH, HEADS = 1, 2
FIRST = list(SHAPES)[:2]  # the published windows 8 and 16 (smoke: the first two)
REST = list(SHAPES)[2:]
PAD_ORDERS = [PAD_THEN_ROLL, ROLL_THEN_PAD]


def make_inputs(name, dtype, seed=0, batch=BATCH, zero_k_bias=True):
    """qkv (B, H*W, 3C) and the bias in `dtype`; logit scale and position bias in fp32 (as under autocast for
    fp16/bf16), on DEVICE. Logit scales near the published initialisation (log 10)."""
    grid, window, _ = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    C, N = HEADS * HEAD_DIM, window * window
    qkv = torch.randn(batch, grid[0] * grid[1], 3 * C, generator=gen)
    qkv_bias = torch.randn(3 * C, generator=gen)
    if zero_k_bias:
        qkv_bias[C : 2 * C] = 0
    logit_scale = math.log(10) + 0.3 * torch.randn(HEADS, 1, 1, generator=gen)
    position_bias = 16 * torch.sigmoid(torch.randn(HEADS, N, N, generator=gen))
    return [qkv.to(DEVICE, dtype), qkv_bias.to(DEVICE, dtype), logit_scale.to(DEVICE), position_bias.to(DEVICE)]


def op_kwargs(name, pad_order):
    grid, window, shift = SHAPES[name]
    return dict(
        grid_size=grid, num_heads=HEADS, window_size=window, shift_size=shift, pad_order=pad_order, mask_value=-100.0
    )


def fp64(tensors):
    return [None if t is None else t.double() for t in tensors]


def check_forward(name, pad_order, dtype):
    inputs = make_inputs(name, dtype)
    kwargs = op_kwargs(name, pad_order)
    with count_launches() as launches:
        out = swinv2_fast.window_attention(*inputs, implementation="triton", **kwargs)
    assert forward_launches(launches) >= 1, dict(launches)
    assert out.dtype == dtype and out.device.type == DEVICE.type
    if dtype == torch.float32:
        assert_close(out, window_attention_naive(*inputs, **kwargs), atol=OP_FP32_ATOL, name="output")
        return
    exact = window_attention_naive(*fp64(inputs), **kwargs)
    eager_error = (window_attention_naive(*inputs, **kwargs).double() - exact).abs().max().item()
    kernel_error = (out.double() - exact).abs().max().item()
    assert kernel_error <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR, (
        f"{dtype} kernel error {kernel_error:.3e} vs PyTorch's own {eager_error:.3e}"
    )


# -------------------------------------------------------------------------------- forward, published windows
@pytest.mark.parametrize("dtype", [dtype_param(d) for d in DTYPES])
@pytest.mark.parametrize("pad_order", PAD_ORDERS)
@pytest.mark.parametrize("name", FIRST)
def test_forward_published_windows(name, pad_order, dtype):
    check_forward(name, pad_order, dtype)


# --------------------------------------------------------------------- models against transformers, bf16
if GPU:
    MODELS = {"SwinV2-T": (cases.ModelSpec("tiny", 256, 8), None), "SwinV2-B": (cases.ModelSpec("base", 256, 16), None)}
else:
    MODELS = {"tiny-32-w4": (cases.ModelSpec("tiny", 32, 4), dict(embed_dim=32, depths=[2, 1], num_heads=[1, 2]))}


_BUILT = {}


def build(model_name):
    """Fresh copies (on DEVICE, eval) of the three models on identical weights; built once per variant (a
    SwinV2-B's three copies take seconds to initialise on the CPU)."""
    spec, layout = MODELS[model_name]
    if model_name not in _BUILT:
        _BUILT[model_name] = cases.build_models(spec, layout=layout)
    return spec, {k: copy.deepcopy(m).to(DEVICE).eval() for k, m in _BUILT[model_name].items()}


def logits(name, model, x):
    return cases.logits(name, model, x).double()


@pytest.mark.parametrize("dtype", [dtype_param(torch.bfloat16), dtype_param(torch.float32)])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_forward_against_transformers(model_name, dtype):
    """swinv2_fast's fused model in `dtype` against transformers eager in the same dtype on identical
    weights: in fp32 within FP32_ATOL; in bf16 its error against transformers in fp32 (on the same
    bf16-rounded weights) is at most LOW_PRECISION_FACTOR times transformers' own bf16 error."""
    spec, models = build(model_name)
    x = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(5))
    ours, hf = models["swinv2_fast"].set_attn_implementation("triton"), models["transformers"]
    with torch.inference_mode():
        if dtype == torch.float32:
            with count_launches() as launches:
                got = logits("swinv2_fast", ours, x.to(DEVICE))
            assert forward_launches(launches) >= 1
            assert_close(got, logits("transformers", hf, x.to(DEVICE)), atol=FP32_ATOL, name="logits")
            return
        ours.to(dtype), hf.to(dtype)
        with count_launches() as launches:
            got = logits("swinv2_fast", ours, x.to(DEVICE, dtype))
        assert forward_launches(launches) >= 1
        hf_low = logits("transformers", hf, x.to(DEVICE, dtype))
        exact = logits("transformers", hf.to(torch.float32), x.to(DEVICE, dtype).float())
    own_error = (hf_low - exact).abs().max().item()
    our_error = (got - exact).abs().max().item()
    assert our_error <= LOW_PRECISION_FACTOR * own_error + LOW_PRECISION_FLOOR, (
        f"swinv2_fast {dtype} logits error {our_error:.3e} vs transformers' own {own_error:.3e}"
    )


# ------------------------------------------------------------------------------------------------ backward
def grad_errors_ok(fused, eager, exact, floors):
    """Each gradient's error against fp64, relative to its largest element, at most LOW_PRECISION_FACTOR
    times PyTorch's own error in the same dtype plus the floor."""
    for label, f, e, x, floor in zip(("qkv", "qkv_bias", "logit_scale", "position_bias"), fused, eager, exact, floors):
        scale = max(x.abs().max().item(), 1e-30)
        eager_error = (e.double() - x).abs().max().item() / scale
        fused_error = (f.double() - x).abs().max().item() / scale
        assert fused_error <= LOW_PRECISION_FACTOR * eager_error + floor, (label, fused_error, eager_error)


def backward_floors(name, dtype):
    if dtype != torch.float32:
        return [LOW_PRECISION_FLOOR] * 4
    grid, window, _ = SHAPES[name]
    windows = -(-grid[0] // window) * -(-grid[1] // window)
    n = window * window
    return [
        OP_GRAD_FP32_RTOL,
        sum_grad_fp32_rtol(BATCH * windows * n),
        sum_grad_fp32_rtol(BATCH * windows * n * n),
        sum_grad_fp32_rtol(BATCH * windows),
    ]


def backward_gradients(name, pad_order, dtype):
    """(kernel launches, fused, eager in dtype, exact in fp64) gradients of every input at the shape `name`; a
    non-zero k bias."""
    inputs = make_inputs(name, dtype, seed=1, zero_k_bias=False)
    kwargs = op_kwargs(name, pad_order)
    grid = SHAPES[name][0]
    grad_out = torch.randn(BATCH, grid[0] * grid[1], HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2))
    _, exact = outputs_and_grads("eager", fp64(inputs), grad_out.double().to(DEVICE), **kwargs)
    _, eager = outputs_and_grads("eager", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    with count_launches() as launches:
        _, fused = outputs_and_grads("triton", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    return launches, fused, eager, exact


@pytest.mark.parametrize("dtype", [dtype_param(d) for d in DTYPES])
@pytest.mark.parametrize(
    "name,pad_order", [(FIRST[0], PAD_THEN_ROLL), (FIRST[1], ROLL_THEN_PAD), (REST[1], PAD_THEN_ROLL)]
)
def test_backward_against_reference(name, pad_order, dtype):
    """Gradients of every input at head_dim 32; a non-zero k bias (with the published zero one, padded k rows
    are zero vectors where x / max(||x||, 1e-12) has slope 1e12, beyond fp16 in both implementations)."""
    launches, fused, eager, exact = backward_gradients(name, pad_order, dtype)
    assert forward_launches(launches) >= 1 and backward_launches(launches) >= 1, dict(launches)
    grad_errors_ok(fused, eager, exact, backward_floors(name, dtype))


@pytest.mark.parametrize("dtype", [dtype_param(torch.float16), dtype_param(torch.bfloat16)])
def test_window7_fused_backward_whatever_the_triton(dtype, monkeypatch):
    """Window 7 (N = 49) in the one fused backward kernel, as Triton 3.8 and later launch it (with 3.6 its build
    spills registers, slower and still right; tiles._fused_masked_window): the kernel a newer stack runs, checked
    on this one. Its gradients within PyTorch's own error, as test_backward_against_reference's."""
    monkeypatch.setattr(tiles, "_FUSED_MASKED_TRITON", (0, 0))
    name = next(n for n in SHAPES if n.startswith("w7-"))
    launches, fused, eager, exact = backward_gradients(name, PAD_THEN_ROLL, dtype)
    assert launches["_window_attention_bwd_fused_kernel"] >= 1, dict(launches)
    grad_errors_ok(fused, eager, exact, backward_floors(name, dtype))


@pytest.mark.parametrize("dtype", [dtype_param(torch.float32), dtype_param(torch.bfloat16)])
def test_backward_is_deterministic(dtype):
    """Two backward runs on the same inputs give bitwise equal gradients (no atomics' ordering)."""
    name = FIRST[0]
    inputs = make_inputs(name, dtype, seed=3)
    kwargs = op_kwargs(name, PAD_THEN_ROLL)
    grid = SHAPES[name][0]
    grad_out = torch.randn(BATCH, grid[0] * grid[1], HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(4))
    with count_launches() as launches:
        first = outputs_and_grads("triton", inputs, grad_out.to(DEVICE, dtype), **kwargs)
        second = outputs_and_grads("triton", inputs, grad_out.to(DEVICE, dtype), **kwargs)
    assert backward_launches(launches) >= 2
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------- torch.compile
COMPILE_BACKEND = "inductor" if GPU else "aot_eager"  # inductor's CPU build of a model takes minutes on 2 cores


def test_op_compiles_without_graph_break():
    import torch._dynamo

    name = FIRST[0]
    inputs = make_inputs(name, torch.float32, seed=5)
    kwargs = op_kwargs(name, PAD_THEN_ROLL)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda *xs: swinv2_fast.window_attention(*xs, implementation="triton", **kwargs),
        fullgraph=True,
        backend=COMPILE_BACKEND,
    )  # fullgraph: a graph break raises
    leaves = [t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(inputs)]
    with count_launches() as launches:
        out = compiled(*leaves)
        out.float().square().sum().backward()
    assert forward_launches(launches) >= 1 and backward_launches(launches) >= 1, dict(launches)
    assert_close(out, window_attention_naive(*inputs, **kwargs), atol=OP_FP32_ATOL, name="compiled output")
    torch._dynamo.reset()


def test_model_compiles_without_graph_break():
    import torch._dynamo

    layout = (
        dict(embed_dim=64, depths=[2, 2], num_heads=[2, 4])
        if GPU
        else dict(embed_dim=32, depths=[2, 1], num_heads=[1, 2])
    )
    spec = cases.ModelSpec("tiny", 64 if GPU else 32, 8 if GPU else 4)
    models = cases.build_models(spec, layout=layout)
    ours = models["swinv2_fast"].to(DEVICE).eval().set_attn_implementation("triton")
    x = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend=COMPILE_BACKEND)
    with torch.no_grad(), count_launches() as launches:
        got = compiled(x).logits
    assert forward_launches(launches) >= 1
    with torch.no_grad():
        expected = models["transformers"].to(DEVICE).eval()(x).logits
    assert_close(got, expected, atol=FP32_ATOL, name="compiled logits")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- patch
@pytest.mark.parametrize("library", ["transformers", "timm"])
def test_patch_runs_the_kernels(library):
    """patch(model, "triton") on a transformers and a timm model: the same logits as the unpatched model
    (fp32) and, in a training step, the same parameter gradients; the fused kernels ran."""
    spec, layout = (
        (cases.ModelSpec("tiny", 64, 8), dict(embed_dim=64, depths=[2, 2], num_heads=[2, 4]))
        if GPU
        else (cases.ModelSpec("tiny", 32, 4), dict(embed_dim=32, depths=[2, 1], num_heads=[1, 2]))
    )
    model = cases.build_models(spec, layout=layout)[library].to(DEVICE)
    patched = swinv2_fast.patch(copy.deepcopy(model), "triton")
    x = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def step(m):
        m.zero_grad(set_to_none=True)
        out = cases.logits(library, m, x)
        out.float().square().mean().backward()
        return out.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}

    expected, expected_grads = step(model.train())
    with count_launches() as launches:
        got, grads = step(patched.train())
    assert forward_launches(launches) >= 1 and backward_launches(launches) >= 1, dict(launches)
    assert_close(got, expected, atol=FP32_ATOL, name="logits")
    assert set(grads) == set(expected_grads)
    for key in expected_grads:
        assert_close(grads[key], expected_grads[key], atol=MODEL_GRAD_FP32_ATOL, rtol=MODEL_GRAD_FP32_RTOL, name=key)


# ----------------------------------------------------------------------------------- partial fine-tuning
def test_partial_fine_tuning_frozen_logit_scale_and_position_bias_mlp():
    """Logit scales and the continuous-position-bias MLPs frozen (requires_grad False), the rest trained:
    the fused backward gives the trained parameters transformers' gradients and the frozen ones none."""
    spec, layout = (
        (cases.ModelSpec("tiny", 64, 8), dict(embed_dim=64, depths=[2, 2], num_heads=[2, 4]))
        if GPU
        else (cases.ModelSpec("tiny", 32, 4), dict(embed_dim=32, depths=[2, 1], num_heads=[1, 2]))
    )
    models = cases.build_models(spec, layout=layout)
    ours = models["swinv2_fast"].to(DEVICE).train().set_attn_implementation("triton")
    hf = models["transformers"].to(DEVICE).train()
    frozen = ("logit_scale", "continuous_position_bias_mlp")
    for model in (ours, hf):
        for key, p in model.named_parameters():
            p.requires_grad_(not any(f in key for f in frozen))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, spec.image_size, spec.image_size, generator=gen).to(DEVICE)
    labels = torch.randint(0, 1000, (2,), generator=gen).to(DEVICE)

    def step(model):
        loss = torch.nn.functional.cross_entropy(model(x).logits, labels)
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters()}

    with count_launches() as launches:
        loss, grads = step(ours)
    assert backward_launches(launches) >= 1, dict(launches)
    expected_loss, expected = step(hf)
    assert_close(loss, expected_loss, atol=FP32_ATOL, name="loss")
    n_frozen = 0
    for key, grad in expected.items():
        if any(f in key for f in frozen):
            n_frozen += 1
            assert grads[key] is None and grad is None, key
        else:
            assert_close(grads[key], grad, atol=MODEL_GRAD_FP32_ATOL, rtol=MODEL_GRAD_FP32_RTOL, name=key)
    assert n_frozen > 0


# ------------------------------------------------------------------------------ forward, remaining shapes
@pytest.mark.parametrize("dtype", [dtype_param(d) for d in DTYPES])
@pytest.mark.parametrize("pad_order", PAD_ORDERS)
@pytest.mark.parametrize("name", REST)
def test_forward_every_window(name, pad_order, dtype):
    check_forward(name, pad_order, dtype)
