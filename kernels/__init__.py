"""Window-attention implementations of swinv2_fast, none of which needs Triton to import:

- `geometry`: `WindowGeometry`, the validated grid/window/shift/padding-order/mask/heads of a call, and the
  constants every layer shares;
- `naive`: the specification, the literal pad/roll/partition chain (`window_attention_naive`), which the
  tests hold every other implementation to;
- `reference`: the eager path the models run without the fused kernels (`window_attention_reference`:
  gather indices and PyTorch's scaled_dot_product_attention), with its bounded layout caches.

The fused path (`op`: the custom ops; `triton_window_attention` and `triton_window_attention_backward`: the Triton
kernels and their launchers) is imported only when first launched.
"""
from .geometry import LOGIT_SCALE_MAX, PAD_ORDERS, PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry
from .naive import window_attention_naive, window_log_sum_exp
from .reference import WindowLayout, shift_mask, window_attention_reference, window_layout

__all__ = [
    "LOGIT_SCALE_MAX",
    "PAD_ORDERS",
    "PAD_THEN_ROLL",
    "ROLL_THEN_PAD",
    "WindowGeometry",
    "WindowLayout",
    "shift_mask",
    "window_attention_naive",
    "window_attention_reference",
    "window_layout",
    "window_log_sum_exp",
]
