"""The fused Triton forward against the reference, under Triton's interpreter on CPU (TRITON_INTERPRET=1)."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import swinv2_fast
from conftest import (FP32_ATOL, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, OP_FP32_ATOL, OP_FP32_ATOL_AT_CLAMP, OP_GRAD_FP32_ATOL,
                      OP_GRAD_FP32_RTOL, assert_close, perturb_)
from swinv2_fast import functional, window_attention
from swinv2_fast.kernels import PAD_THEN_ROLL, ROLL_THEN_PAD, window_attention_reference, window_layout

triton = pytest.importorskip("triton")
from swinv2_fast.kernels import triton_window_attention as tk  # noqa: E402

if not tk.INTERPRETED:  # pragma: no cover - only when the suite runs on a GPU without the interpreter
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() and not tk.INTERPRETED else "cpu"


def make_inputs(B, grid, heads, head_dim, window, dtype=torch.float32, table_dtype=None, bias=True, seed=0,
                zero_k_bias=True):
    gen = torch.Generator().manual_seed(seed)
    C, N = heads * head_dim, window * window
    qkv = torch.randn(B, grid[0] * grid[1], 3 * C, generator=gen)
    qkv_bias = torch.randn(3 * C, generator=gen) if bias else None
    if qkv_bias is not None and zero_k_bias:
        qkv_bias[C : 2 * C] = 0  # k has no bias in the published models
    logit_scale = math.log(10) + 0.5 * torch.randn(heads, 1, 1, generator=gen)
    position_bias = 16 * torch.sigmoid(torch.randn(heads, N, N, generator=gen))
    cast = lambda t, d: None if t is None else t.to(device=DEVICE, dtype=d)  # noqa: E731
    return (cast(qkv, dtype), cast(qkv_bias, dtype), logit_scale.to(DEVICE),
            cast(position_bias, table_dtype or dtype))


# (B, grid, heads, head_dim, window, shift): every window size of the published models (N = 49, 64, 144,
# 256, 576), head dims 16/32/64/128, shifted and not, grids that need padding and grids below the window.
SHAPES = [
    pytest.param(2, (8, 8), 2, 16, 4, 2, id="B2-8x8-h2d16-w4s2"),
    pytest.param(1, (14, 14), 2, 32, 7, 3, id="B1-14x14-h2d32-w7s3"),
    pytest.param(1, (10, 13), 1, 32, 7, 3, id="B1-10x13-h1d32-w7s3-padded"),
    pytest.param(2, (8, 8), 1, 32, 8, 0, id="B2-8x8-h1d32-w8s0"),
    pytest.param(1, (16, 11), 1, 64, 8, 4, id="B1-16x11-h1d64-w8s4-padded"),
    pytest.param(1, (12, 12), 1, 32, 12, 6, id="B1-12x12-h1d32-w12s6"),
    pytest.param(1, (9, 10), 1, 128, 12, 0, id="B1-9x10-h1d128-w12s0-below-window"),
    pytest.param(1, (16, 16), 1, 16, 16, 8, id="B1-16x16-h1d16-w16s8"),
    pytest.param(1, (24, 24), 1, 32, 24, 12, id="B1-24x24-h1d32-w24s12"),
    pytest.param(1, (5, 7), 2, 16, 24, 0, id="B1-5x7-h2d16-w24s0-tiny-grid"),
]


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", SHAPES)
def test_forward_matches_reference_fp32(B, grid, heads, head_dim, window, shift, pad_order):
    inputs = make_inputs(B, grid, heads, head_dim, window)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order,
                  mask_value=-100.0)
    out = tk.window_attention_triton_forward(*inputs, **kwargs)
    expected = window_attention_reference(*inputs, **kwargs)
    assert_close(out, expected, atol=OP_FP32_ATOL, name="output")


@pytest.mark.parametrize("table_dtype", [torch.float16, torch.float32], ids=["table-fp16", "table-fp32-autocast"])
@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", [SHAPES[1], SHAPES[4], SHAPES[7]])
def test_forward_fp16_error_is_that_of_pytorch(B, grid, heads, head_dim, window, shift, pad_order, table_dtype):
    """fp16 projection (fp32 table and logit scale as under torch.autocast, or all fp16): the kernel's error
    against an fp64 reference is at most twice the eager reference's own fp16 error."""
    inputs = make_inputs(B, grid, heads, head_dim, window, dtype=torch.float16, table_dtype=table_dtype)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    exact = window_attention_reference(*[t.double() if t is not None else None for t in inputs], **kwargs)
    eager = window_attention_reference(*inputs, **kwargs)
    out = tk.window_attention_triton_forward(*inputs, **kwargs)
    assert out.dtype == torch.float16
    eager_error = (eager.double() - exact).abs().max().item()
    kernel_error = (out.double() - exact).abs().max().item()
    assert kernel_error <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR * 0.1, (
        f"kernel fp16 error {kernel_error:.3e} vs eager fp16 error {eager_error:.3e}")


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter computes bf16 wrongly; bf16 runs on a GPU")
def test_forward_bf16_error_is_that_of_pytorch():  # pragma: no cover - GPU only
    inputs = make_inputs(2, (16, 16), 2, 32, 8, dtype=torch.bfloat16, table_dtype=torch.float32)
    kwargs = dict(grid_size=(16, 16), num_heads=2, window_size=8, shift_size=4)
    exact = window_attention_reference(*[t.double() if t is not None else None for t in inputs], **kwargs)
    eager_error = (window_attention_reference(*inputs, **kwargs).double() - exact).abs().max().item()
    out = tk.window_attention_triton_forward(*inputs, **kwargs)
    assert (out.double() - exact).abs().max().item() <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's refusal")
def test_bf16_is_refused_under_the_interpreter():
    """The interpreter's bf16 dot is wrong (outputs near 1e8 where the reference's are O(1)): forcing the
    kernels there raises instead of returning those numbers; "auto" takes the eager path."""
    inputs = make_inputs(1, (8, 8), 2, 16, 4, dtype=torch.bfloat16, table_dtype=torch.float32)
    kwargs = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)
    with pytest.raises(ValueError, match="bfloat16 CPU tensors"):
        swinv2_fast.window_attention(*inputs, implementation="triton", **kwargs)
    assert torch.equal(swinv2_fast.window_attention(*inputs, implementation="auto", **kwargs),
                       window_attention_reference(*inputs, **kwargs))


def test_strided_qkv_and_no_bias():
    qkv, _, logit_scale, position_bias = make_inputs(2, (8, 8), 2, 16, 4, bias=False)
    wide = torch.randn(2, 64, qkv.shape[-1] + 5, device=DEVICE)
    wide[..., : qkv.shape[-1]] = qkv
    strided = wide[..., : qkv.shape[-1]]
    assert not strided.is_contiguous()
    kwargs = dict(grid_size=(7 + 1, 8), num_heads=2, window_size=4, shift_size=2)
    out = tk.window_attention_triton_forward(strided, None, logit_scale, position_bias, **kwargs)
    assert_close(out, window_attention_reference(qkv, None, logit_scale, position_bias, **kwargs),
                 atol=OP_FP32_ATOL)


def test_logit_scale_above_the_clamp():
    qkv, qkv_bias, logit_scale, position_bias = make_inputs(1, (8, 8), 2, 16, 4)
    logit_scale = torch.full_like(logit_scale, 7.0)  # exp(7) > 100: clamped
    kwargs = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)
    out = tk.window_attention_triton_forward(qkv, qkv_bias, logit_scale, position_bias, **kwargs)
    assert_close(out, window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, **kwargs),
                 atol=OP_FP32_ATOL_AT_CLAMP)


def test_empty_batch():
    qkv, qkv_bias, logit_scale, position_bias = make_inputs(1, (8, 8), 2, 16, 4)
    out = tk.window_attention_triton_forward(qkv[:0], qkv_bias, logit_scale, position_bias,
                                             grid_size=(8, 8), num_heads=2, window_size=4)
    assert out.shape == (0, 64, 32)


def test_gradients_through_the_fused_op_match_the_reference():
    inputs = [t.clone().requires_grad_() for t in make_inputs(2, (6, 7), 2, 16, 4)]
    kwargs = dict(grid_size=(6, 7), num_heads=2, window_size=4, shift_size=2, pad_order=ROLL_THEN_PAD)
    grad_out = torch.randn(2, 42, 32)
    fused = window_attention(*inputs, implementation="triton", **kwargs)
    fused_grads = torch.autograd.grad(fused, inputs, grad_out)
    eager = window_attention(*inputs, implementation="eager", **kwargs)
    eager_grads = torch.autograd.grad(eager, inputs, grad_out)
    assert_close(fused, eager, atol=OP_FP32_ATOL, name="output")
    for name, a, b in zip(["qkv", "qkv_bias", "logit_scale", "position_bias"], fused_grads, eager_grads):
        assert_close(a, b, atol=OP_GRAD_FP32_ATOL, rtol=OP_GRAD_FP32_RTOL, name=f"grad {name}")


# ------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_rules(monkeypatch):
    qkv = torch.randn(1, 64, 96)
    assert functional.resolve_implementation("auto", qkv, 2) == "eager"  # CPU tensors: eager
    assert functional.resolve_implementation("eager", qkv, 2) == "eager"
    assert functional.resolve_implementation("triton", qkv, 2) == "triton"  # interpreter
    # by design: probabilities and dropout are the eager path's
    assert functional.resolve_implementation("triton", qkv, 2, return_attention_probs=True) == "eager"
    assert functional.resolve_implementation("triton", qkv, 2, dropout_p=0.1) == "eager"
    with pytest.raises(ValueError, match="head_dim in"):
        functional.resolve_implementation("triton", torch.randn(1, 64, 3 * 24), 1)
    monkeypatch.setattr(tk, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        functional.resolve_implementation("triton", qkv, 2)
    monkeypatch.setattr(functional, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        functional.resolve_implementation("triton", qkv, 2)
    assert functional.resolve_implementation("auto", qkv, 2) == "eager"


def test_attention_probabilities_come_from_the_eager_path():
    inputs = make_inputs(1, (8, 8), 2, 16, 4)
    out, probs = window_attention(*inputs, grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2,
                                  return_attention_probs=True, implementation="triton")
    assert probs.shape == (4, 2, 16, 16)


def test_package_imports_and_runs_eager_without_triton(tmp_path):
    """A machine without Triton: import works, eager and auto run, triton raises a clear error."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import sys\n"
        "import torch  # torch probes for triton itself; block it for what follows\n"
        "for name in [m for m in sys.modules if m == 'triton' or m.startswith('triton.')]:\n"
        "    del sys.modules[name]\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import swinv2_fast\n"
        "cfg = swinv2_fast.Swinv2Config(image_size=32, window_size=4, embed_dim=16, depths=[2], num_heads=[1])\n"
        "m = swinv2_fast.Swinv2Model(cfg).eval()\n"
        "print(tuple(m(torch.randn(1, 3, 32, 32)).last_hidden_state.shape))\n"
        "m.set_attn_implementation('triton')\n"
        "try:\n"
        "    m(torch.randn(1, 3, 32, 32))\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(1, 64, 16)" in result.stdout
    assert "raised: implementation='triton' needs Triton" in result.stdout


# ------------------------------------------------------------------------------------------ whole models
TINY = dict(image_size=32, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 1], drop_path_rate=0.0)


@pytest.mark.parametrize("size", [(32, 32), (36, 28)], ids=["32x32", "36x28-padded"])
def test_model_with_triton_matches_transformers(size):
    import transformers

    hf_config = transformers.Swinv2Config(**TINY, num_labels=3)
    hf = perturb_(transformers.Swinv2ForImageClassification(hf_config)).eval()
    ours = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config.from_transformers(hf_config)).eval()
    ours.load_state_dict(hf.state_dict())
    ours.set_attn_implementation("triton")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        actual = ours(x, output_hidden_states=True)
        eager = ours.set_attn_implementation("eager")(x).logits
    assert_close(actual.logits, expected.logits, atol=FP32_ATOL, name="logits vs transformers")
    for i, (a, b) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert_close(a, b, atol=FP32_ATOL, name=f"hidden_states[{i}]")
    assert_close(actual.logits, eager, atol=FP32_ATOL, name="triton vs eager")


def test_timm_model_with_triton_matches_timm():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    timm_model = perturb_(SwinTransformerV2(img_size=32, window_size=4, embed_dim=16, depths=(2, 2),
                                            num_heads=(1, 1), num_classes=3)).eval()
    ours = swinv2_fast.from_timm(timm_model, attn_implementation="triton")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x).logits, timm_model(x), atol=FP32_ATOL, name="logits vs timm")


def test_model_under_autocast_fp16():
    """Under torch.autocast the projection is fp16 while the logit scale and the bias table stay fp32: the
    fused path takes the mixed dtypes, and its error against fp32 is that of the eager path's (x2)."""
    import transformers

    hf_config = transformers.Swinv2Config(**TINY, num_labels=3)
    model = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config.from_transformers(hf_config))
    model = perturb_(model).eval()
    x = torch.randn(2, 3, 36, 28)
    with torch.no_grad():
        reference = model.set_attn_implementation("eager")(x).logits.double()
        with torch.autocast("cpu", dtype=torch.float16):
            eager = model(x).logits.double()
            fused = model.set_attn_implementation("triton")(x).logits.double()
    eager_error = (eager - reference).abs().max().item()
    fused_error = (fused - reference).abs().max().item()
    assert eager_error > 0, "autocast did not lower the precision: the test would compare nothing"
    assert fused_error <= LOW_PRECISION_FACTOR * eager_error + LOW_PRECISION_FLOOR, (fused_error, eager_error)
