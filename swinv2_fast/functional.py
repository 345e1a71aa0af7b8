"""The public window-attention op and its dispatch between implementations.

The dispatch rules are stated once, in `window_attention`'s docstring.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import tiles
from .kernels.geometry import WindowGeometry, takes_geometry
from .kernels.reference import autograd_records, window_attention_reference

__all__ = ["IMPLEMENTATIONS", "resolve_implementation", "triton_available", "window_attention"]

IMPLEMENTATIONS = ("auto", "triton", "eager")


_TRITON_IMPORTS: Optional[bool] = None


def triton_available() -> bool:
    """True when Triton imports (the Triton files themselves are imported only when first launched; the
    questions about what they serve are answered by kernels/tiles.py, which needs no Triton)."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORTS = True
        except Exception:  # ImportError, or a broken install raising anything at import
            _TRITON_IMPORTS = False
    return _TRITON_IMPORTS


def _unserved_reason(qkv: torch.Tensor, num_heads: int) -> str:
    head_dim = qkv.shape[-1] // 3 // num_heads
    if qkv.dtype == torch.float64:
        return "float64 runs on the eager path (the kernels' fp64 build is for gradcheck under the interpreter)"
    return (
        f"the fused backward has no spill-free build for {qkv.dtype} with head_dim {head_dim} (fp32 "
        "gradients are fused for head_dim up to 32, fp16/bf16 for every head_dim)"
    )


def _fused_serves(qkv: torch.Tensor, num_heads: int, grad_inputs) -> bool:
    """On a GPU: fp64 never; fp32 with gradients only where the compiled backward has a tile (see
    kernels/tiles.py); everything else yes."""
    if qkv.dtype == torch.float64:
        return False
    if not autograd_records(*grad_inputs):
        return True
    return tiles.fused_backward_supported(qkv.shape[-1] // 3 // num_heads, qkv.dtype)


def resolve_implementation(
    implementation: str,
    qkv: torch.Tensor,
    num_heads: int,
    return_attention_probs: bool = False,
    dropout_p: float = 0.0,
    grad_inputs=(),
) -> str:
    """ "triton" or "eager" for this call, following the rules in `window_attention`'s docstring; raises where
    "triton" was asked for and cannot run."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "eager" or return_attention_probs or dropout_p > 0.0:
        return "eager"
    head_dim = qkv.shape[-1] // 3 // num_heads
    if implementation == "auto":
        usable = qkv.is_cuda and triton_available() and tiles.head_dim_supported(head_dim)
        return "triton" if usable and _fused_serves(qkv, num_heads, grad_inputs) else "eager"
    if not triton_available():
        raise RuntimeError(
            "implementation='triton' needs Triton, which does not import here; install triton or use "
            "implementation='eager' (or 'auto', which picks eager where Triton cannot run)"
        )
    if not tiles.head_dim_supported(head_dim):
        raise ValueError(f"implementation='triton' supports head_dim 1 to {tiles.MAX_HEAD_DIM}, got {head_dim}")
    if qkv.device.type == "cuda" and not _fused_serves(qkv, num_heads, grad_inputs):
        raise ValueError(
            f"implementation='triton' on a GPU: {_unserved_reason(qkv, num_heads)}; use implementation='auto' "
            "(which sends these calls to the eager path) or 'eager'"
        )
    if qkv.device.type == "cpu":
        if not tiles.INTERPRETED:
            raise RuntimeError(
                "implementation='triton' got CPU tensors: the kernel runs on CUDA, or on CPU under Triton's "
                "interpreter, which needs TRITON_INTERPRET=1 in the environment before swinv2_fast is "
                "imported; use implementation='eager' or 'auto' on CPU"
            )
        if qkv.dtype == torch.bfloat16:
            raise ValueError(
                "implementation='triton' got bfloat16 CPU tensors: Triton's interpreter computes bf16 dot "
                "products wrongly, so the kernels cannot be checked in bf16 on CPU; use float16 or float32 "
                "there, implementation='eager', or a GPU"
            )
    elif qkv.device.type != "cuda":
        raise RuntimeError(f"implementation='triton' runs on CUDA (or CPU under the interpreter), got {qkv.device}")
    return "triton"


def _check_inputs(qkv, qkv_bias, logit_scale, position_bias, geometry: WindowGeometry, dropout_p):
    """The tensors against the (already validated) geometry; raises naming the argument, what was expected
    and what was received."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a 3-D tensor (batch, H*W, 3*C), got {shape}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got dtype {qkv.dtype}")
    if logit_scale is None or position_bias is None:
        raise TypeError("logit_scale and position_bias are required tensors, got None")
    _check_dtypes_and_devices(qkv, qkv_bias=qkv_bias, logit_scale=logit_scale, position_bias=position_bias)
    _, tokens, channels3 = qkv.shape
    if tokens != geometry.num_tokens:
        raise ValueError(
            f"qkv must have H*W = {geometry.num_tokens} tokens for grid_size {geometry.grid}, got {tokens}"
        )
    geometry.head_dim(channels3)  # raises unless 3 * num_heads divides the channels
    heads, n = geometry.num_heads, geometry.N
    if qkv_bias is not None and tuple(qkv_bias.shape) != (channels3,):
        raise ValueError(f"qkv_bias must have shape ({channels3},), got {tuple(qkv_bias.shape)}")
    if logit_scale.numel() != heads:
        raise ValueError(f"logit_scale must have num_heads = {heads} elements, got shape {tuple(logit_scale.shape)}")
    if tuple(position_bias.shape) != (heads, n, n):
        raise ValueError(
            f"position_bias must have shape (num_heads, N, N) = {(heads, n, n)}, got {tuple(position_bias.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")


def _check_dtypes_and_devices(qkv, **others):
    """Every other tensor: floating, on qkv's device, and in qkv's dtype or in float32 beside a lower-precision
    qkv (what torch.autocast produces: fp16/bf16 activations, fp32 parameters). Anything else is rejected
    rather than silently promoted or rounded."""
    allowed = {qkv.dtype, torch.float32} if qkv.dtype in (torch.float16, torch.bfloat16) else {qkv.dtype}
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != qkv.device:
            raise ValueError(f"{name} must be on qkv's device {qkv.device}, got {t.device}")
        if t.dtype not in allowed:
            raise TypeError(
                f"{name} must have qkv's dtype {qkv.dtype}"
                + (" or float32 (as under torch.autocast)" if len(allowed) > 1 else "")
                + f", got {t.dtype}"
            )


@takes_geometry
def window_attention(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    geometry: WindowGeometry,
    dropout_p: float = 0.0,
    return_attention_probs: bool = False,
    implementation: str = "auto",
):
    """Swin V2 window attention, token layout in and out: the dispatch rules.

    This op has the signature of `swinv2_fast.kernels.window_attention_reference` (see there for the
    shapes and the math) plus `implementation`. The geometry is a `WindowGeometry` (`geometry=`), or its
    keyword block `grid_size, num_heads, window_size, shift_size=0, pad_order="pad_then_roll",
    mask_value=-100.0` (`kernels/geometry.py`: `takes_geometry`, the one place the block is converted).

    - "eager": the reference, plain PyTorch, any device.
    - "triton": the fused kernels (`kernels/op.py` and the Triton files it names). On CUDA tensors it compiles; on CPU
      tensors it runs under Triton's interpreter when TRITON_INTERPRET=1 was set before swinv2_fast was
      imported, and raises otherwise. Calls the kernel does not serve by design go to the eager path:
      `return_attention_probs=True` (the kernel never forms the N x N probabilities) and `dropout_p > 0`.
    - "auto": "triton" for CUDA tensors when Triton imports and the kernels serve the head dimension (1 to 128:
      `head_dim_supported` in kernels/tiles.py states the rule; a head dim that is not a power of two of at
      least 16 runs masked in the next one), "eager" otherwise.

    On a GPU two cases go to the eager path by design ("auto") or raise ("triton"): float64 inputs, and fp32
    calls that need gradients with head_dim 64 or 128 (the fused backward has no spill-free fp32 build there;
    every published model has head_dim 32; the fp32 rule goes by the padded channel tile, so head dims up
    to 32 are fused). Under the interpreter on CPU every case runs the kernels but
    bfloat16, which Triton's interpreter computes wrongly (its bf16 `tl.dot`): "triton" raises there.

    The "triton" path is the custom op `torch.ops.swinv2_fast.window_attention_fused` (torch.library, with a
    fake implementation, so torch.compile traces through it); its backward is the fused Triton backward.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check_inputs(qkv, qkv_bias, logit_scale, position_bias, geometry, dropout_p)
    grad_inputs = (qkv, qkv_bias, logit_scale, position_bias)
    if (
        resolve_implementation(implementation, qkv, geometry.num_heads, return_attention_probs, dropout_p, grad_inputs)
        == "triton"
    ):
        if qkv.stride(-1) != 1:  # the kernel reads channel rows; any batch and token strides are read as they are
            qkv = qkv.contiguous()
        from .kernels import op

        return op.window_attention_fused(qkv, qkv_bias, logit_scale, position_bias, geometry)
    return window_attention_reference(
        qkv,
        qkv_bias,
        logit_scale,
        position_bias,
        geometry=geometry,
        dropout_p=dropout_p,
        return_attention_probs=return_attention_probs,
    )
