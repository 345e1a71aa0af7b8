"""`swinv2_fast.patch` for transformers' `Swinv2Layer` and `Swin2SRLayer` (Swin2SR's layers are transformers'
Swin V2 layers): the layer's `forward` with the attention step as one `window_attention` call.

transformers' window rules are `swinv2_fast.windows.SEMANTICS["transformers"]`. Its `query`, `key` and
`value` are read as one GEMM while they are plain `nn.Linear` layers without hooks; swapped or hooked ones
are called as modules (`swinv2_fast.attention`).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from ..attention import continuous_position_bias, project_qkv_modules, qkv_weight_and_bias
from ..linear import is_plain_linear
from ..windows import SEMANTICS
from .step import MARK, pair_list, patched_window_step

torch.fx.wrap("patched_window_step")  # a leaf of fx traces here too (torch.fx.wrap acts per calling module)

__all__ = ["LAYER_ATTRS", "SELF_ATTRS", "transformers_layer_forward"]

# What the patched forward reads; a layer without them is a structure the patch does not know.
LAYER_ATTRS = (
    "attention",
    "layernorm_before",
    "layernorm_after",
    "drop_path",
    "intermediate",
    "output",
    "window_size",
    "shift_size",
)
SELF_ATTRS = (
    "query",
    "key",
    "value",
    "logit_scale",
    "continuous_position_bias_mlp",
    "relative_coords_table",
    "relative_position_index",
    "num_attention_heads",
    "dropout",
)

_RULES = SEMANTICS["transformers"]


def transformers_layer_forward(self, hidden_states, input_dimensions, output_attentions=False):
    """transformers' Swinv2Layer.forward (and Swin2SRLayer.forward, the same layer) with the attention step
    fused: pad, roll, partition, attention, reverse, roll back and crop are one `window_attention` call."""
    _, implementation = getattr(self, MARK)
    if output_attentions:  # the probabilities exist only in the original chain
        return type(self).forward(self, hidden_states, input_dimensions, output_attentions)
    attn = self.attention.self
    height, width = input_dimensions
    batch, _, channels = hidden_states.shape
    window, shift = pair_list(self.window_size), pair_list(self.shift_size)
    projections = (attn.query, attn.key, attn.value)
    if all(is_plain_linear(m) for m in projections):
        weight, bias = qkv_weight_and_bias(projections, bias_when_absent=True)
        qkv = F.linear(hidden_states, weight, bias)
    else:  # swapped (LoRA, quantized, parametrized) or hooked projections: called as modules
        qkv, bias = project_qkv_modules(hidden_states, projections, (height, width), window)
    # the MLP on the coordinate table as the buffer holds it, as transformers calls it (no cast)
    position_bias = continuous_position_bias(
        attn.continuous_position_bias_mlp,
        attn.relative_coords_table,
        attn.num_attention_heads,
        attn.relative_position_index.shape[0],
        index=attn.relative_position_index,
    )
    context = patched_window_step(
        qkv,
        bias,
        attn.logit_scale,
        position_bias,
        height,
        width,
        attn.num_attention_heads,
        window,
        shift,
        _RULES.pad_order,
        _RULES.mask_value,
        attn.dropout.p if self.training else 0.0,
        implementation,
    )
    attention_output = self.attention.output(context, hidden_states).view(batch, height * width, channels)
    hidden_states = hidden_states + self.drop_path(self.layernorm_before(attention_output))
    layer_output = self.output(self.intermediate(hidden_states))
    layer_output = hidden_states + self.drop_path(self.layernorm_after(layer_output))
    return (layer_output,)
