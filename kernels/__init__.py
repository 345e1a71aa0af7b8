"""Window-attention implementations of swinv2_fast: the eager reference (always available)."""
from .reference import (
    PAD_ORDERS,
    PAD_THEN_ROLL,
    ROLL_THEN_PAD,
    WindowLayout,
    shift_mask,
    window_attention_reference,
    window_layout,
    window_log_sum_exp,
)

__all__ = [
    "PAD_ORDERS",
    "PAD_THEN_ROLL",
    "ROLL_THEN_PAD",
    "WindowLayout",
    "shift_mask",
    "window_attention_reference",
    "window_layout",
    "window_log_sum_exp",
]
