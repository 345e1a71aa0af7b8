"""The private PyTorch APIs swinv2_fast's model code uses, each behind one function, because no public API
does the same. Checked on torch 2.11.0 (the GPU machine's stack) and 2.14.1 (this repository's pinned stack):
the op schema and the attribute names below are the same in both.

Nothing here runs at import: every function looks its API up when called, so a PyTorch without it (a build
without oneDNN, a future release) imports the package and answers "not available" instead of failing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["module_has_hooks", "onednn_bf16_supported", "onednn_linear", "onednn_linear_available"]


def onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (the x86-64 and aarch64 wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16_supported() -> bool:
    """Whether oneDNN reports bf16 support on this CPU (natively with AVX-512 BF16 or AMX, by conversion on
    plain AVX-512: oneDNN's own answer). Private: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and probe())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
    """`F.linear(x, weight, bias)` (then exact GELU when `gelu`) through oneDNN's matmul.

    Private: `torch.ops.mkldnn._linear_pointwise(X, W, B?, attr, scalars, algorithm?)`, the op torch.compile's
    CPU backend emits for linears with frozen weights. Public PyTorch reaches oneDNN's matmul only through
    `torch.compile` with freezing; `F.linear` on CPU calls the BLAS the wheel was built with (MKL), and no
    public op applies GELU to a GEMM's output in place.
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


# nn.Module's per-instance hook dicts and the process-wide ones (torch.nn.modules.module._global_<name>).
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def module_has_hooks(module: nn.Module) -> bool:
    """Whether a forward or backward hook (or pre-hook) would fire if `module` were called: one registered on
    the module itself, or one registered for every module (`torch.nn.modules.module.register_module_*_hook`).

    Private: the per-instance dicts `nn.Module._forward_hooks`, `_forward_pre_hooks`, `_backward_hooks`,
    `_backward_pre_hooks` and the module-level `torch.nn.modules.module._global_forward_hooks` (and the three
    others of those names). nn.Module has no public way to ask which hooks are registered.
    """
    from torch.nn.modules import module as module_globals

    return any(getattr(module, name, None) or getattr(module_globals, "_global" + name, None) for name in _HOOK_DICTS)
