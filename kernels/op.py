"""The fused window attention as PyTorch ops: the one entry the dispatch calls (`window_attention_fused`) and
the two `torch.library` custom ops under it.

    swinv2_fast.window_attention            (functional.py: validation, once, and the dispatch rules)
      -> window_attention_fused             (this module: a WindowGeometry in, the custom op's plain values out)
        -> torch.ops.swinv2_fast.window_attention_fused[_backward]   (the custom ops below)
          -> window_attention_triton_forward / _backward   (the launchers: triton_forward.py, triton_backward.py;
                                                            the plain values -> launch.LaunchDims)
            -> the Triton kernels

"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .geometry import GEOMETRY_ARGS, OP_SCHEMA_GEOMETRY, WindowGeometry
from .reference import sdpa_serves, window_attention_reference
from .tiles import INTERPRETED
from .triton_backward import window_attention_triton_backward
from .triton_forward import window_attention_triton_forward

__all__ = ["fused_backward_op", "fused_forward_op", "window_attention_fused"]

# `torch.ops.swinv2_fast.window_attention_fused` (the forward's output, `fused_forward_op`) and
# `torch.ops.swinv2_fast.window_attention_fused_backward` (`fused_backward_op`), registered with torch.library so that
# torch.compile traces models through them without a graph break (fake implementations give the shapes)
# and autograd runs the fused backward. Where they run:
#   CUDA tensors: the Triton kernels.
#   CPU tensors:  the same kernels under Triton's interpreter when TRITON_INTERPRET=1 was set at import;
#                 otherwise the eager reference (the backward differentiates the reference). The model and
#                 functional dispatch never send CPU tensors here without the interpreter ("triton" raises
#                 there, "auto" picks eager); direct callers of the op get the reference's numbers.
#
# The schema takes the geometry as plain values (`OP_SCHEMA_GEOMETRY`: grid_size, num_heads, window_size,
# shift_size, pad_order, mask_value), which `WindowGeometry.as_op_args()` gives (validated by
# `swinv2_fast.window_attention`); the functions below take them as `*geometry_args` and hand them to the
# launchers as they are (whose `launch_dims` refuses, as a cheap guard, what that validation rules out). Only
# the eager paths below rebuild a WindowGeometry (`from_args` reads the values back), which the reference takes.
_TENSORS = "Tensor qkv, Tensor? qkv_bias, Tensor logit_scale, Tensor position_bias"
_N_INPUTS = 4 + len(GEOMETRY_ARGS)  # the forward op's arguments: four tensors and the geometry


def _runs_kernels(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return True
    if t.device.type == "cpu":
        return INTERPRETED
    raise RuntimeError(f"swinv2_fast::window_attention_fused runs on CUDA or CPU tensors, got {t.device}")


@torch.library.custom_op(
    "swinv2_fast::window_attention_fused",
    mutates_args=(),
    device_types=("cuda", "cpu"),
    schema=f"({_TENSORS}, {OP_SCHEMA_GEOMETRY}) -> Tensor",
)
def fused_forward_op(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *geometry_args,
) -> torch.Tensor:
    """The output (B, H*W, C); see the comment above."""
    if _runs_kernels(qkv):
        return window_attention_triton_forward(qkv, qkv_bias, logit_scale, position_bias, *geometry_args)
    return window_attention_reference(
        qkv, qkv_bias, logit_scale, position_bias, geometry=WindowGeometry.from_args(*geometry_args)
    )


@fused_forward_op.register_fake
def _(qkv, qkv_bias, logit_scale, position_bias, *geometry_args):
    B, L, C3 = qkv.shape
    return qkv.new_empty((B, L, C3 // 3))


@torch.library.custom_op(
    "swinv2_fast::window_attention_fused_backward",
    mutates_args=(),
    device_types=("cuda", "cpu"),
    schema=f"(Tensor grad_out, {_TENSORS}, {OP_SCHEMA_GEOMETRY}, bool need_qkv, bool need_bias, "
    "bool need_table_grads) -> (Tensor, Tensor, Tensor, Tensor)",
)
def fused_backward_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *geometry_args_and_needs,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d qkv, d qkv_bias, d logit_scale, d position_bias). A gradient not asked for (or the bias's, without a
    bias) is a fresh empty tensor of its own: custom ops return tensors, never None, and no two outputs may
    share storage (frozen parameters in fine-tuning ask for some gradients only). After the geometry come
    need_qkv, need_bias and need_table_grads."""
    *geometry_args, need_qkv, need_bias, need_table_grads = geometry_args_and_needs
    if not _runs_kernels(qkv):
        raise RuntimeError(
            "swinv2_fast::window_attention_fused_backward runs the Triton kernels (CUDA, or CPU "
            "under TRITON_INTERPRET=1); the op's eager CPU path is differentiated by autograd"
        )
    grads = window_attention_triton_backward(
        grad_out,
        qkv,
        qkv_bias,
        logit_scale,
        position_bias,
        *geometry_args,
        need_qkv=need_qkv,
        need_bias=need_bias,
        need_table_grads=need_table_grads,
    )
    d_qkv, d_bias, d_scale, d_table = (qkv.new_empty((0,)) if g is None else g for g in grads)
    return d_qkv, d_bias, d_scale, d_table


@fused_backward_op.register_fake
def _(grad_out, qkv, qkv_bias, logit_scale, position_bias, *geometry_args_and_needs):
    *_, need_qkv, need_bias, need_table_grads = geometry_args_and_needs

    def grad_like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else qkv.new_empty((0,))

    return (
        grad_like(qkv, need_qkv),
        grad_like(qkv_bias, need_bias and qkv_bias is not None),
        grad_like(logit_scale, need_table_grads),
        grad_like(position_bias, need_table_grads),
    )


def _setup_context(ctx, inputs, output):
    # the backward needs the inputs only: it recomputes P and its statistics, and delta comes from P * dP
    ctx.save_for_backward(*inputs[:4])
    ctx.geometry_args = inputs[4:]


def _reference_backward(grad_out, inputs, needs, geometry_args, create_graph=False):
    """The gradients by differentiating the reference at the saved inputs: for the op's eager CPU path, and,
    by design, for a backward that records a graph (`create_graph=True`: gradient penalties, double
    backward), since the fused backward is not differentiable itself; then the gradients are functions of
    the inputs themselves, not of detached copies."""
    with torch.enable_grad():
        leaves = (
            inputs
            if create_graph
            else [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
        )
        # the chain the op's eager forward ran (it runs without autograd recording): the gradients are of the
        # function whose output the forward returned
        fused_softmax = sdpa_serves(leaves[0].device, leaves[0].dtype, differentiated=False)
        out = window_attention_reference(
            *leaves, geometry=WindowGeometry.from_args(*geometry_args), fused_softmax=fused_softmax
        )
        wanted = [t for t, need in zip(leaves, needs) if t is not None and need]
        found = iter(
            torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph, allow_unused=True) if wanted else ()
        )
        grads = [next(found) if t is not None and need else None for t, need in zip(leaves, needs)]
    # the reference reads qkv_bias only where there is padding: elsewhere its gradient is zero
    if needs[1] and grads[1] is None:
        grads[1] = torch.zeros_like(inputs[1])
    return (*grads, *[None] * len(geometry_args))


def _backward(ctx, grad_out):
    qkv, qkv_bias, logit_scale, position_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    recording = torch.is_grad_enabled()  # autograd records this backward (create_graph=True)
    if recording or not _runs_kernels(qkv):  # or the op's eager CPU path
        return _reference_backward(
            grad_out, (qkv, qkv_bias, logit_scale, position_bias), needs, ctx.geometry_args, create_graph=recording
        )
    if not any(needs[:4]):
        return (None,) * _N_INPUTS
    dqkv, d_bias, d_scale, d_table = torch.ops.swinv2_fast.window_attention_fused_backward(
        grad_out,
        qkv,
        qkv_bias,
        logit_scale,
        position_bias,
        *ctx.geometry_args,
        bool(needs[0]),
        bool(needs[1] and qkv_bias is not None),
        bool(needs[2] or needs[3]),
    )
    return (
        dqkv if needs[0] else None,
        d_bias if needs[1] else None,
        d_scale if needs[2] else None,
        d_table if needs[3] else None,
        *[None] * len(GEOMETRY_ARGS),
    )


fused_forward_op.register_autograd(_backward, setup_context=_setup_context)


def window_attention_fused(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    geometry: WindowGeometry,
) -> torch.Tensor:
    """The fused op on validated inputs (see `swinv2_fast.window_attention`), differentiable: the output only."""
    return torch.ops.swinv2_fast.window_attention_fused(
        qkv, qkv_bias, logit_scale, position_bias, *geometry.as_op_args()
    )
