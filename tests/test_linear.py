"""swinv2_fast.linear: oneDNN for fp32 CPU inference, F.linear elsewhere, the same numbers either way; the
route is chosen by an argument (the models pass config.cpu_onednn_linear), never by process-wide state."""

import pytest
import torch
import torch.nn.functional as F

import swinv2_fast
from swinv2_fast import linear as L

from _utils import FP32_ATOL, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, assert_close, perturb_

needs_onednn = pytest.mark.skipif(not L.onednn_linear_available(), reason="this PyTorch has no oneDNN linear op")
needs_onednn_bf16 = pytest.mark.skipif(
    not L.onednn_bf16_supported(), reason="this PyTorch has no oneDNN linear op or this CPU no native bf16"
)


def _operands(seed=0, m=37, k=24, n=40):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5, torch.randn(n, generator=gen)


@needs_onednn
def test_which_calls_go_to_onednn():
    x, w, b = _operands()
    with torch.no_grad():
        assert L._onednn_dtype(x, w, b, True) == L._onednn_dtype(x, w, None, True) == torch.float32
        assert L._onednn_dtype(x.double(), w.double(), b.double(), True) is None  # fp32 or bf16 only
        assert L._onednn_dtype(x, w.t().contiguous().t(), b, True) is None  # the op needs a contiguous weight
        assert L._onednn_dtype(x, w, b.half(), True) is None
        assert L._onednn_dtype(x, w, b, False) is None  # the caller's switch
    w_leaf = w.clone().requires_grad_()
    assert L._onednn_dtype(x, w_leaf, b, True) is None  # autograd records the call: F.linear
    assert L._onednn_dtype(x, w, b, True) == torch.float32  # grad on, nothing requires grad: nothing to record
    with torch.inference_mode():
        assert L._onednn_dtype(x, w, b, True) == torch.float32


@needs_onednn_bf16
def test_which_bf16_calls_go_to_onednn():
    """bf16 where oneDNN computes it: bf16 input, weight and bias, or any fp32/bf16 operands under CPU autocast
    to bf16 (cast as autocast casts them, so an fp32 input under autocast no longer takes the fp32 route);
    never under autocast to fp16, nor for mixed dtypes outside autocast (which F.linear refuses)."""
    x, w, b = _operands()
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    with torch.no_grad():
        assert L._onednn_dtype(xb, wb, bb, True) == torch.bfloat16
        # outside autocast mixed dtypes go to F.linear, which raises on them
        assert L._onednn_dtype(xb, wb, b, True) is None and L._onednn_dtype(xb, w, b, True) is None
        assert L._onednn_dtype(xb, wb, bb.half(), True) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert L._onednn_dtype(x, w, b, True) == torch.bfloat16
            assert L._onednn_dtype(xb, w, b, True) == torch.bfloat16
            assert L._onednn_dtype(x.double(), w.double(), None, True) is None
        with torch.autocast("cpu", dtype=torch.float16):
            assert L._onednn_dtype(x, w, b, True) is None


@needs_onednn_bf16
@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_bf16_under_autocast_is_as_accurate_as_autocasts_linear(gelu):
    """Under CPU autocast to bf16, against fp64: the oneDNN call's error (relative to the largest element)
    within LOW_PRECISION_FACTOR times that of F.linear under autocast (PyTorch's own bf16 error) plus the
    floor; bf16 out, as autocast gives."""
    x, w, b = _operands(seed=6, m=64, k=96, n=80)
    exact = F.linear(x.double(), w.double(), b.double())
    exact = F.gelu(exact) if gelu else exact
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = L.linear(x, w, b, gelu=gelu, onednn=True)
        plain = L.linear(x, w, b, gelu=gelu, onednn=False)
    assert fast.dtype == plain.dtype == torch.bfloat16
    scale = exact.abs().max().item()
    fast_error = (fast.double() - exact).abs().max().item() / scale
    plain_error = (plain.double() - exact).abs().max().item() / scale
    assert fast_error <= LOW_PRECISION_FACTOR * plain_error + LOW_PRECISION_FLOOR, (fast_error, plain_error)


@needs_onednn
def test_the_switch_reaches_the_op(monkeypatch):
    """onednn=True calls oneDNN's op, onednn=False never does (counted at the one place the op is called)."""
    from swinv2_fast import _torch_private

    calls = []
    real = _torch_private.onednn_linear
    monkeypatch.setattr(_torch_private, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    x, w, b = _operands(seed=5)
    with torch.no_grad():
        L.linear(x, w, b, onednn=False)
        assert calls == []
        L.linear(x, w, b, onednn=True)
        assert calls == [1]


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_equals_f_linear(gelu, bias):
    """Against fp64: both routes within fp32 rounding of a K=24 dot (the same bound for both)."""
    x, w, b = _operands(seed=1)
    b = b if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    exact = F.gelu(exact) if gelu else exact
    with torch.no_grad():
        fast = L.linear(x, w, b, gelu=gelu, onednn=True)
        plain = L.linear(x, w, b, gelu=gelu, onednn=False)
    assert fast.shape == plain.shape == (3, 37, 40) and fast.dtype == torch.float32
    assert_close(fast, exact, atol=1e-5, name="oneDNN")
    assert_close(plain, exact, atol=1e-5, name="F.linear")


def test_gradients_flow_through_the_f_linear_route():
    x, w, b = _operands(seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    L.linear(*leaves, gelu=True).square().sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    F.gelu(F.linear(*ref)).square().sum().backward()
    for a, r in zip(leaves, ref):
        assert torch.equal(a.grad, r.grad)


def test_the_config_switch_checks_its_value():
    with pytest.raises(TypeError, match="cpu_onednn_linear must be a bool, got 1"):
        swinv2_fast.Swinv2Config(cpu_onednn_linear=1)


def _tiny_model(**overrides):
    config = swinv2_fast.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, **overrides
    )
    return perturb_(swinv2_fast.Swinv2Model(config)).eval()


@needs_onednn
def test_model_outputs_are_the_same_with_and_without_onednn(monkeypatch):
    """config.cpu_onednn_linear is read per call: switched off on the same model, no oneDNN call is made,
    and the outputs agree within fp32 rounding."""
    from swinv2_fast import _torch_private

    calls = []
    real = _torch_private.onednn_linear
    monkeypatch.setattr(_torch_private, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    model = _tiny_model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = model(x).last_hidden_state
        assert calls, "the default (cpu_onednn_linear=True) made no oneDNN call"
        calls.clear()
        model.config.cpu_onednn_linear = False
        plain = model(x).last_hidden_state
        assert calls == []
    assert_close(fast, plain, atol=FP32_ATOL, name="last_hidden_state")


def test_a_hook_on_the_mlp_sees_the_layer_it_hooked():
    """The MLP's first GEMM and its GELU are one oneDNN call only while nobody hooks that layer; with a hook
    the layer runs as a module, and the hook sees its output before the activation."""
    model = _tiny_model(cpu_inference_chunk_bytes=0)  # whole blocks: the hook sees one call
    dense = model.encoder.layers[0].blocks[0].intermediate.dense
    seen = []
    handle = dense.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    handle.remove()
    ((inp, out),) = seen
    assert_close(out, F.linear(inp, dense.weight, dense.bias), atol=1e-5, name="hooked output")
    assert (out < 0).any()  # pre-GELU values


@needs_onednn
def test_the_onednn_route_compiles_without_graph_break():
    """Under torch.compile the oneDNN call is the opaque custom op swinv2_fast::onednn_linear (inductor
    would reject oneDNN's own op on parameters that are not frozen); fake shapes checked by opcheck."""
    x, w, b = _operands(seed=4)
    torch.library.opcheck(torch.ops.swinv2_fast.onednn_linear.default, (x, w, b, True))
    compiled = torch.compile(lambda *t: L.linear(*t, gelu=True), fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x, w, b), F.gelu(F.linear(x, w, b)), atol=1e-5, name="compiled")


def test_a_global_hook_also_keeps_the_mlp_layer_a_module():
    model = _tiny_model(cpu_inference_chunk_bytes=0)
    dense = model.encoder.layers[0].blocks[0].intermediate.dense
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(module) if module is dense else None
    )
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert seen == [dense]
