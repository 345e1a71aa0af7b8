"""The window-attention step that every patched block calls (`patched_window_step`), and what the library
modules of `swinv2_fast.patch` share.

`torch.fx.wrap` acts per calling module: it makes the name a leaf of fx traces of the code in the module
that calls `torch.fx.wrap`, by swapping that module's global while tracing. So every module that calls
`patched_window_step` imports it under that name and calls `torch.fx.wrap("patched_window_step")` itself.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx

from ..functional import window_attention
from ..kernels.geometry import WindowGeometry

__all__ = ["MARK", "pair_list", "patched_window_step"]

MARK = "_swinv2_fast_patch"  # on each patched block: (method name, implementation)


def pair_list(value) -> list:
    """A block's window or shift (an int or a pair of ints) as [height, width]."""
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


@torch.jit.unused
def _eager_step(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    height: int,
    width: int,
    num_heads: int,
    window: List[int],
    shift: List[int],
    pad_order: str,
    mask_value: float,
    dropout_p: float,
    implementation: str,
) -> torch.Tensor:
    geometry = WindowGeometry(
        grid=(height, width),
        window=tuple(window),
        shift=tuple(shift),
        pad_order=pad_order,
        mask_value=mask_value,
        num_heads=num_heads,
    )
    return window_attention(
        qkv, qkv_bias, logit_scale, position_bias, geometry=geometry, dropout_p=dropout_p, implementation=implementation
    )


def patched_window_step(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    position_bias: torch.Tensor,
    height: int,
    width: int,
    num_heads: int,
    window: List[int],
    shift: List[int],
    pad_order: str,
    mask_value: float,
    dropout_p: float,
    implementation: str,
) -> torch.Tensor:
    """The window-attention step of every patched block: (B, H*W, 3C) q/k/v -> (B, H*W, C).

    One function taking tensors and plain values, so that the three ways of capturing a model see it whole:
    - torch.fx (`symbolic_trace`, timm's and torchvision's feature extractors, transformers' HFTracer)
      records it as one call (`torch.fx.wrap` in each calling module): the geometry is built when the graph
      runs, from the sizes of that call, never from the tracer's proxies.
    - TorchScript (scripting an fx graph of a patched model) compiles it to the custom op
      `torch.ops.swinv2_fast.window_attention_fused` (the Triton kernels on CUDA; on CPU, the op's eager
      path), since the dispatch in Python cannot be scripted; attention dropout and implementation="eager"
      cannot be served there and raise.
    - torch.export / torch.compile trace through it (the geometry takes symbolic sizes).
    """
    if torch.jit.is_scripting():
        if dropout_p > 0.0 or implementation == "eager":
            raise RuntimeError(
                "swinv2_fast: a scripted patched step runs the fused custom op only; attention dropout in "
                "training and implementation='eager' need Python (use the model unscripted, or unpatch it)"
            )
        return torch.ops.swinv2_fast.window_attention_fused(
            qkv, qkv_bias, logit_scale, position_bias, [height, width], num_heads, window, shift, pad_order, mask_value
        )
    return _eager_step(
        qkv,
        qkv_bias,
        logit_scale,
        position_bias,
        height,
        width,
        num_heads,
        window,
        shift,
        pad_order,
        mask_value,
        dropout_p,
        implementation,
    )


torch.fx.wrap("patched_window_step")  # a leaf of fx traces of this module too (module docstring)
