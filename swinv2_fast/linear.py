"""The models' linear layers: oneDNN's matmul for CPU inference in fp32, `F.linear` everywhere else.

On CPU, `F.linear` calls the BLAS PyTorch was built with: MKL in the x86-64 wheels. On the CPU this
project is measured on (AMD EPYC, Zen 5, AVX-512) MKL's SGEMM runs 1.2x to 2.3x slower than the oneDNN
matmul that ships in the same wheel (`torch.ops.mkldnn._linear_pointwise`, the op torch.compile's CPU
backend emits for linears when it freezes weights), for the shapes of SwinV2-T (benchmarks/cpu_linear.py);
oneDNN can also apply exact GELU to the GEMM's output in place. So `linear` sends a call to oneDNN when
all of these hold, and to `F.linear` otherwise (by design, not as an error path):

- oneDNN is in this PyTorch (`torch.backends.mkldnn.is_available()` and the op is registered);
- input, weight and bias are fp32 CPU tensors and the weight is contiguous;
- autograd is not recording the call: the op has no backward, so training keeps `F.linear`;
- `set_onednn_linear(False)` has not turned it off (benchmarks use it to show what the routing buys);
- `torch.jit.trace` is not recording (its tracer cannot record the op).

The models' layers are `nn.Linear` modules, as in transformers; `apply_linear` sends a plain one (no
subclass, wrapper or hook: `is_plain_linear`) through `linear` and calls any other as a module.

Either way the math is the same; only the GEMM's summation order differs (fp32 rounding, ~1e-6 relative).
Under torch.compile the oneDNN call goes through the opaque custom op `swinv2_fast::onednn_linear`, which
inductor keeps as it is (it lowers oneDNN's op itself only for frozen, constant weights).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals  # holds the hooks registered for every module

__all__ = ["linear", "apply_linear", "onednn_linear_available", "set_onednn_linear", "has_hooks",
           "is_plain_linear", "project_qkv"]

_enabled = True


def onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (x86-64 and aarch64 wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_AVAILABLE = onednn_linear_available()


def set_onednn_linear(enabled: bool) -> bool:
    """Turn the oneDNN route for CPU inference on or off (on by default); returns the previous setting."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _enabled = _enabled, enabled
    return previous


def _routes_to_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if torch.jit.is_tracing():  # TorchScript's tracer cannot record the op's optional-scalar list argument
        return False
    if not (_enabled and _AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()):
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, followed by exact GELU when `gelu`; see the module docstring for where
    it runs."""
    if _routes_to_onednn(x, weight, bias):
        if torch.compiler.is_compiling():
            return torch.ops.swinv2_fast.onednn_linear(x, weight, bias, gelu)
        return _onednn_linear_call(x, weight, bias, gelu)
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def _onednn_linear_call(x, weight, bias, gelu):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                              "none" if gelu else "")


# An opaque custom op around oneDNN's, so that torch.compile keeps it in its graph as it is: inductor lowers
# mkldnn._linear_pointwise itself only for frozen (constant) weights and would fail on a model's parameters.
@torch.library.custom_op("swinv2_fast::onednn_linear", mutates_args=(), device_types="cpu")
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
    return _onednn_linear_call(x, weight, bias, gelu)


@_onednn_linear.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether a forward or backward hook (or pre-hook) is registered on `module` or for every module."""
    return any(getattr(module, name, None) or getattr(_module_globals, "_global" + name, None)
               for name in _HOOK_DICTS)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` is exactly an `nn.Linear` without hooks.

    Only then may a caller use its weight and bias itself (one GEMM for q, k and v; GELU fused into the
    GEMM) instead of calling it. Anything else (a LoRA wrapper, a dynamically quantized or parametrized
    layer, a subclass, a hooked layer) is called as a module, so that what it computes and what its hooks
    see stay its own."""
    return type(module) is nn.Linear and not has_hooks(module)


def apply_linear(module: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """`module(x)`, then exact GELU when `gelu`: through `linear` above (oneDNN where it routes there, GELU
    in the GEMM) when the module is plain (`is_plain_linear`), as a module call otherwise."""
    if is_plain_linear(module):
        return linear(x, module.weight, module.bias, gelu=gelu)
    out = module(x)
    return F.gelu(out) if gelu else out


def project_qkv(x: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module,
                padded: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q/k/v of tokens `x` (B, L, C) by calling the three projection modules, for modules that are not
    plain (`is_plain_linear`): ((B, L, 3C), pad) where pad (3C,) is what a padded position holds, the
    projection of a zero token (the grid is padded with zeros before the projection), or None when
    `padded` is False (the window-attention op then never reads it)."""
    qkv = torch.cat([query(x), key(x), value(x)], dim=-1)
    if not padded:
        return qkv, None
    zero = x.new_zeros((1, x.shape[-1]))
    return qkv, torch.cat([query(zero), key(zero), value(zero)], dim=-1).reshape(-1)
