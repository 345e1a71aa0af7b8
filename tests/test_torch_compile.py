"""torch.compile through the fused op (a torch.library custom op with a fake implementation): compiled
kernels on CUDA tensors where a GPU runs them, the interpreter on CPU tensors elsewhere."""

import pytest
import torch

import swinv2_fast
from swinv2_fast import window_attention
from swinv2_fast.kernels import ROLL_THEN_PAD, window_attention_naive

from _utils import (
    FP32_ATOL,
    KERNEL_DEVICE,
    MODEL_GRAD_FP32_ATOL,
    MODEL_GRAD_FP32_RTOL,
    OP_FP32_ATOL,
    TINY,
    assert_close,
    assert_errors_within_pytorch,
    make_inputs,
    op,
    perturb_,
    sum_floors,
)

# Every test here runs the forward and backward kernels (conftest: launch proof, honest skips).
pytestmark = pytest.mark.kernels(backward=True)

# Non-zero k bias throughout: the op's gradients are compared elementwise, and with a zero k bias the k part
# of the bias gradient sits on the 1e12 slope of x / max(||x||, 1e-12) (see test_triton_backward).
OP_KWARGS = dict(grid_size=(6, 7), num_heads=2, window_size=4, shift_size=2, pad_order=ROLL_THEN_PAD)


@pytest.mark.kernels  # opcheck runs the op's forward (its backward only through autograd's checks)
def test_fake_implementation_gives_the_real_shapes():
    inputs = make_inputs(2, (6, 7), 2, 16, 4, zero_k_bias=False)
    real_out = torch.ops.swinv2_fast.window_attention_fused(*inputs, [6, 7], 2, [4, 4], [2, 2], ROLL_THEN_PAD, -100.0)
    torch.library.opcheck(
        torch.ops.swinv2_fast.window_attention_fused.default,
        (*inputs, [6, 7], 2, [4, 4], [2, 2], ROLL_THEN_PAD, -100.0),
    )
    assert real_out.shape == (2, 42, 32)


def test_op_compiles_without_graph_break_forward_and_backward():
    inputs = make_inputs(2, (6, 7), 2, 16, 4, seed=1, zero_k_bias=False)
    grad_out = torch.randn(2, 42, 32, device=KERNEL_DEVICE)

    def f(*xs):
        return window_attention(*xs, implementation="triton", **OP_KWARGS)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert_close(out, window_attention_naive(*inputs, **OP_KWARGS), atol=OP_FP32_ATOL, name="output")
    _check_gradients(grads, inputs, grad_out)


def _check_gradients(grads, inputs, grad_out):
    """Against fp64, within the reference's own fp32 error (test_triton_backward.assert_errors_within_pytorch)."""
    found = {}
    for name, tensors, g in (("exact", [t.double() for t in inputs], grad_out.double()), ("eager", inputs, grad_out)):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        found[name] = torch.autograd.grad(window_attention_naive(*leaves, **OP_KWARGS), leaves, g)
    assert_errors_within_pytorch(grads, found["eager"], found["exact"], sum_floors(inputs[0].shape[0], (6, 7), 4))


@pytest.mark.interpreter  # CPU tensors with the interpreter switched off and on
def test_op_on_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    """Direct callers of the op with CPU tensors and no interpreter get the eager reference (and its
    output); its backward differentiates the reference."""
    inputs = make_inputs(1, (6, 7), 2, 16, 4, seed=2, zero_k_bias=False)
    monkeypatch.setattr(op, "INTERPRETED", False)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = torch.ops.swinv2_fast.window_attention_fused(*leaves, [6, 7], 2, [4, 4], [2, 2], ROLL_THEN_PAD, -100.0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    monkeypatch.setattr(op, "INTERPRETED", True)
    kernel_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    kernel_out = torch.ops.swinv2_fast.window_attention_fused(
        *kernel_leaves, [6, 7], 2, [4, 4], [2, 2], ROLL_THEN_PAD, -100.0
    )
    kernel_grads = torch.autograd.grad(kernel_out, kernel_leaves, grad_out)
    assert_close(out, kernel_out, atol=OP_FP32_ATOL, name="output")
    _check_gradients(kernel_grads, inputs, grad_out)
    _check_gradients(grads, inputs, grad_out)


@pytest.mark.slow  # inductor compiles a whole model's forward and backward: about a minute on 2 cores
def test_compiled_model_training_step_matches_eager():
    """A tiny model with the fused op under torch.compile (inductor around the opaque op): same loss and
    parameter gradients as the uncompiled eager model; the op is traced without a graph break."""
    config = swinv2_fast.Swinv2Config(**TINY, num_labels=3)
    model = perturb_(swinv2_fast.Swinv2ForImageClassification(config)).train().to(KERNEL_DEVICE)
    x, labels = torch.randn(2, 3, 32, 32, device=KERNEL_DEVICE), torch.tensor([0, 2], device=KERNEL_DEVICE)

    def step(forward):
        model.zero_grad(set_to_none=True)
        loss = forward(x, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step(model.set_attn_implementation("eager"))
    torch._dynamo.reset()
    # compile from scratch: a graph cached on disk by an earlier version of the op would carry its old shapes
    # (torch's own config.patch: monkeypatch's undo of these config attributes broke later compiles)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        explained = torch._dynamo.explain(model.set_attn_implementation("triton"))(x, labels=labels)
        assert not any("window_attention" in str(reason) for reason in explained.break_reasons), explained.break_reasons
        compiled = torch.compile(model)
        compiled_loss, compiled_grads = step(compiled)
    assert_close(compiled_loss, loss, atol=FP32_ATOL, name="loss")
    for key in grads:
        assert_close(compiled_grads[key], grads[key], atol=MODEL_GRAD_FP32_ATOL, rtol=MODEL_GRAD_FP32_RTOL, name=key)
