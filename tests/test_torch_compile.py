"""torch.compile through the fused op (a torch.library custom op with a fake implementation), on CPU."""
import pytest
import torch

import swinv2_fast
from conftest import (FP32_ATOL, MODEL_GRAD_FP32_ATOL, MODEL_GRAD_FP32_RTOL, OP_FP32_ATOL, OP_GRAD_FP32_ATOL,
                      OP_GRAD_FP32_RTOL, assert_close, perturb_)
from swinv2_fast import window_attention
from swinv2_fast.kernels import ROLL_THEN_PAD, window_attention_reference

pytest.importorskip("triton")
from swinv2_fast.kernels import triton_window_attention as tk  # noqa: E402
from test_triton_forward import DEVICE, TINY, make_inputs  # noqa: E402

# Non-zero k bias throughout: the op's gradients are compared elementwise, and with a zero k bias the k part
# of the bias gradient sits on the 1e12 slope of x / max(||x||, 1e-12) (see test_triton_backward).
OP_KWARGS = dict(grid_size=(6, 7), num_heads=2, window_size=4, shift_size=2, pad_order=ROLL_THEN_PAD)


def test_fake_implementation_gives_the_real_shapes():
    inputs = make_inputs(2, (6, 7), 2, 16, 4, zero_k_bias=False)
    real_out, real_lse = tk.window_attention_fused(*inputs, [6, 7], 2, [4, 4], [2, 2], ROLL_THEN_PAD, -100.0)
    torch.library.opcheck(torch.ops.swinv2_fast.window_attention_fused.default,
                          (*inputs, [6, 7], 2, [4, 4], [2, 2], ROLL_THEN_PAD, -100.0))
    assert real_out.shape == (2, 42, 32) and real_lse.shape == (2, 2, 4 * 16, 2)


def test_op_compiles_without_graph_break_forward_and_backward():
    inputs = make_inputs(2, (6, 7), 2, 16, 4, seed=1, zero_k_bias=False)
    grad_out = torch.randn(2, 42, 32, device=DEVICE)

    def f(*xs):
        return window_attention(*xs, implementation="triton", **OP_KWARGS)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref = window_attention_reference(*ref_leaves, **OP_KWARGS)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    assert_close(out, ref, atol=OP_FP32_ATOL, name="output")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, atol=OP_GRAD_FP32_ATOL, rtol=OP_GRAD_FP32_RTOL, name="grad")


def test_op_on_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    """Direct callers of the op with CPU tensors and no interpreter get the eager reference (and its
    literal log-sum-exp); its backward differentiates the reference."""
    inputs = make_inputs(1, (6, 7), 2, 16, 4, seed=2, zero_k_bias=False)
    monkeypatch.setattr(tk, "INTERPRETED", False)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = torch.ops.swinv2_fast.window_attention_fused(*leaves, [6, 7], 2, [4, 4], [2, 2], ROLL_THEN_PAD,
                                                            -100.0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    monkeypatch.setattr(tk, "INTERPRETED", True)
    kernel_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    kernel_out, kernel_lse = torch.ops.swinv2_fast.window_attention_fused(*kernel_leaves, [6, 7], 2, [4, 4],
                                                                          [2, 2], ROLL_THEN_PAD, -100.0)
    kernel_grads = torch.autograd.grad(kernel_out, kernel_leaves, grad_out)
    assert_close(out, kernel_out, atol=OP_FP32_ATOL, name="output")
    assert_close(lse.sum(-1), kernel_lse.sum(-1), atol=OP_FP32_ATOL, name="log-sum-exp")
    for a, b in zip(grads, kernel_grads):
        assert_close(a, b, atol=OP_GRAD_FP32_ATOL, rtol=OP_GRAD_FP32_RTOL, name="grad")


def test_compiled_model_training_step_matches_eager():
    """A tiny model with the fused op under torch.compile (inductor around the opaque op): same loss and
    parameter gradients as the uncompiled eager model; the op is traced without a graph break."""
    config = swinv2_fast.Swinv2Config(**TINY, num_labels=3)
    model = perturb_(swinv2_fast.Swinv2ForImageClassification(config)).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])

    def step(forward):
        model.zero_grad(set_to_none=True)
        loss = forward(x, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step(model.set_attn_implementation("eager"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.set_attn_implementation("triton"))(x, labels=labels)
    assert not any("window_attention" in str(reason) for reason in explained.break_reasons), explained.break_reasons
    compiled = torch.compile(model)
    compiled_loss, compiled_grads = step(compiled)
    assert_close(compiled_loss, loss, atol=FP32_ATOL, name="loss")
    for key in grads:
        assert_close(compiled_grads[key], grads[key], atol=MODEL_GRAD_FP32_ATOL, rtol=MODEL_GRAD_FP32_RTOL, name=key)
