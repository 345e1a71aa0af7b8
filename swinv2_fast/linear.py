"""The models' linear layers: oneDNN's matmul for CPU inference in fp32 and bf16, `F.linear` everywhere else.

On CPU, `F.linear` calls the BLAS PyTorch was built with: MKL in the x86-64 wheels for fp32, oneDNN for bf16
(after copying the bias into the output). For the shapes of SwinV2-T, oneDNN's own linear, which ships in
the same wheel, is faster on the AMD EPYC CPUs this project is measured on (benchmarks/cpu_linear.py compares
the two per GEMM; the gain depends on the CPU): it adds the bias and can apply exact GELU to the GEMM's output
in place. So `linear` sends a call to oneDNN when all of these hold, and to `F.linear` otherwise (by design,
not as an error path):

- the caller asks for it (`onednn=True`; the models pass their `config.cpu_onednn_linear`, default True);
- oneDNN's op is in this PyTorch (`onednn_linear_available()`);
- the call computes in fp32 (input, weight and bias fp32, no CPU autocast), or in bf16 where oneDNN computes
  bf16 (`onednn_bf16_supported()`: oneDNN's own answer, natively with AVX-512 BF16 or AMX, by conversion
  on plain AVX-512): bf16 input, weight and bias, or the call under CPU autocast to bf16 with fp32 or bf16
  operands, input and weight then cast to bf16 as autocast would cast them (an fp32 bias is added in fp32,
  one rounding fewer than autocast's);
- all on the CPU, the weight contiguous;
- autograd is not recording the call: the op has no backward, so training keeps `F.linear`;
- `torch.jit.trace` is not recording (its tracer cannot record the op).

The switch is an argument, not a process-wide setting: this module keeps no state.

The models' layers are `nn.Linear` modules, as in transformers; `apply_linear` sends a plain one (no
subclass, wrapper or hook: `is_plain_linear`) through `linear` and calls any other as a module.

Either way the math is the same; only the GEMM's summation order differs (fp32 rounding, ~1e-6 relative; in
bf16, the output's rounding). Under torch.compile the oneDNN call goes through the opaque custom op
`swinv2_fast::onednn_linear` (registered in the package's own op namespace when this module is imported),
which inductor keeps as it is (it lowers oneDNN's op itself only for frozen, constant weights).
"""

from __future__ import annotations

from typing import Optional, Tuple, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from . import _torch_private

__all__ = [
    "apply_linear",
    "is_plain_linear",
    "linear",
    "onednn_bf16_supported",
    "onednn_linear_available",
    "project_qkv",
]


# Asked once, at import (queries, which change nothing): torch.compile cannot trace the questions themselves.
_AVAILABLE = _torch_private.onednn_linear_available()
_BF16 = _AVAILABLE and _torch_private.onednn_bf16_supported()


def onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (x86-64 and aarch64 wheels do)."""
    return _AVAILABLE


def onednn_bf16_supported() -> bool:
    """Whether the oneDNN route also serves bf16 calls here (the op exists and this CPU computes bf16)."""
    return _BF16


def _onednn_dtype(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], onednn: bool
) -> Optional[torch.dtype]:
    """The dtype the oneDNN call computes in (float32 or bfloat16), or None: `F.linear` (see the module
    docstring for the rules)."""
    if not onednn or not _AVAILABLE or torch.jit.is_tracing():  # the tracer cannot record the op's scalar list
        return None
    if isinstance(x, torch.fx.Proxy):  # torch.fx traces: device and autograd unknown, the graph takes F.linear
        return None
    if not (x.device.type == "cpu" and weight.device.type == "cpu" and weight.is_contiguous()):
        return None
    if bias is not None and bias.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return None
    operands = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or not _BF16:
            return None  # autocast to fp16: F.linear, which autocast casts
        return torch.bfloat16 if operands <= {torch.float32, torch.bfloat16} else None
    if operands == {torch.float32}:
        return torch.float32
    if _BF16 and operands == {torch.bfloat16}:  # outside autocast F.linear refuses mixed dtypes: so does this
        return torch.bfloat16
    return None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False, onednn: bool = True
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, followed by exact GELU when `gelu`; through oneDNN when `onednn` and the
    call qualifies (see the module docstring), through `F.linear` otherwise."""
    dtype = _onednn_dtype(x, weight, bias, onednn)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)  # no-ops but under autocast (what autocast would cast)
        if torch.compiler.is_compiling():
            return torch.ops.swinv2_fast.onednn_linear(x, weight, bias, gelu)
        return _torch_private.onednn_linear(x, weight, bias, gelu)
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


# An opaque custom op around oneDNN's, so that torch.compile keeps it in its graph as it is: inductor lowers
# mkldnn._linear_pointwise itself only for frozen (constant) weights and would fail on a model's parameters.
@torch.library.custom_op("swinv2_fast::onednn_linear", mutates_args=(), device_types="cpu")
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
    return _torch_private.onednn_linear(x, weight, bias, gelu)


@_onednn_linear.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def is_plain_linear(module: nn.Module) -> TypeGuard[nn.Linear]:
    """Whether `module` is exactly an `nn.Linear` that no hook observes.

    Only then may a caller use its weight and bias itself (one GEMM for q, k and v; GELU fused into the
    GEMM) instead of calling it. Anything else (a LoRA wrapper, a dynamically quantized or parametrized
    layer, a subclass, a layer with a hook of its own or under a hook registered for every module) is called
    as a module, so that what it computes and what its hooks see stay its own."""
    return type(module) is nn.Linear and not _torch_private.module_has_hooks(module)


def apply_linear(module: nn.Module, x: torch.Tensor, gelu: bool = False, onednn: bool = True) -> torch.Tensor:
    """`module(x)`, then exact GELU when `gelu`: through `linear` above (oneDNN where `onednn` and the call
    qualify, GELU in the GEMM) when the module is plain (`is_plain_linear`), as a module call otherwise."""
    if is_plain_linear(module):
        return linear(x, module.weight, module.bias, gelu=gelu, onednn=onednn)
    out = module(x)
    return F.gelu(out) if gelu else out


def project_qkv(x: torch.Tensor, *projections: nn.Module, padded: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q/k/v of tokens `x` (B, L, C) by calling the projection modules (query, key and value, or one fused
    qkv layer), for modules that are not plain (`is_plain_linear`): ((B, L, 3C), pad) where pad (3C,) is what
    a padded position holds, the projection of a zero token (the grid is padded with zeros before the
    projection), or None when `padded` is False (the window-attention op then never reads it)."""

    def project(tokens):
        if len(projections) == 1:
            return projections[0](tokens)
        return torch.cat([module(tokens) for module in projections], dim=-1)

    qkv = project(x)
    if not padded:
        return qkv, None
    return qkv, project(x.new_zeros((1, x.shape[-1]))).reshape(-1)
