"""One-line swap: route the window-attention step of an existing transformers or timm Swin V2 model through
swinv2_fast's op, in place.

    model = swinv2_fast.patch(model)                 # "auto": fused on CUDA, eager elsewhere
    model = swinv2_fast.patch(model, "triton")       # or "eager"; the same rules as the models
    swinv2_fast.unpatch(model)                       # the original behaviour again

Supported: transformers' `Swinv2Model`, `Swinv2ForImageClassification`, `Swinv2ForMaskedImageModeling`,
`Swinv2Backbone`, `Swin2SRModel` and `Swin2SRForImageSuperResolution`; timm's `SwinTransformerV2` and
`SwinTransformerV2Cr` (`swinv2_*` and `swinv2_cr_*`; with a head, headless, `features_only`).

What changes is one method per block, set on the block instance (a transformers `Swinv2Layer`'s or
`Swin2SRLayer`'s `forward`, a timm `SwinTransformerV2Block`'s `_attn`, a timm `SwinTransformerV2CrBlock`'s
`_shifted_window_attn`); the class, the parameters, the buffers, the state-dict keys
and the hooks registered on the model's modules stay as they were, so checkpoints move freely between
patched and unpatched models. The patched step reads the block's own parameters every call (q/k/v
projection, logit scale, continuous-position-bias MLP, output projection), so training, `load_state_dict`
and `.to()` need nothing special. Because the step is one op, forward hooks on the modules inside it
(transformers' `attention.self`, timm's `attn`) do not fire while patched; hooks on the output projection,
the norms, the MLP and the blocks do. transformers' `query`, `key` and `value` are read as one GEMM while
they are plain `nn.Linear` layers without hooks; swapped ones (PEFT's LoRA, quantized or parametrized
layers) or hooked ones are called as modules, on the block's tokens (and, when the grid is padded, on one
zero token: the value padded positions hold). timm's `SwinTransformerV2` computes its q/k/v from
`qkv.weight` itself, as timm does; `SwinTransformerV2Cr`'s `qkv` layer is read like transformers' layers
(one GEMM while plain, a module call otherwise).

Each library keeps its own semantics: transformers pads then rolls and adds its shift mask twice (-200);
timm rolls then pads and adds -100. `output_attentions=True` (transformers) runs the original forward,
which forms the probabilities. Attention dropout in training goes to the eager path, as in the models.
`SwinTransformerV2Cr` (patch_timm_cr.py): the block's own window and shift (chosen by timm from its feature
size), its position-bias MLP called as a module (its dropout of 0.125 applies in training as in timm),
and, by design, timm's own `_shifted_window_attn` where the fused op cannot be exact (see there).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import IMPLEMENTATIONS, window_attention
from .linear import is_plain_linear, project_qkv
from .kernels.geometry import PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry
from .patch_timm_cr import MARK as _MARK  # on each patched block: (method name, implementation)
from .patch_timm_cr import CR_ATTN_ATTRS, CR_BLOCK_ATTRS, cr_geometry_problems, timm_cr_shifted_window_attn

__all__ = ["patch", "unpatch", "is_patched", "TESTED_VERSIONS"]

# The library versions whose module structure the patch was tested with (the package's pinned stack and the
# GPU machine's stack); other versions are patched when their modules carry the attributes the patch reads.
TESTED_VERSIONS = {"transformers": ("5.17.0", "5.18.0"), "timm": ("1.0.29", "1.0.31")}

# Attributes the patched step reads, per library: a block without them is a structure we do not know.
_HF_LAYER_ATTRS = ("attention", "layernorm_before", "layernorm_after", "drop_path", "intermediate", "output",
                   "window_size", "shift_size")
_HF_SELF_ATTRS = ("query", "key", "value", "logit_scale", "continuous_position_bias_mlp", "relative_coords_table",
                  "relative_position_index", "num_attention_heads", "dropout")
_TIMM_BLOCK_ATTRS = ("_attn", "attn", "window_size", "shift_size")
_TIMM_ATTN_ATTRS = ("qkv", "q_bias", "k_bias", "v_bias", "logit_scale", "cpb_mlp", "relative_coords_table",
                    "relative_position_index", "num_heads", "proj", "proj_drop", "attn_drop")


def _position_bias(mlp: nn.Module, coords_table: torch.Tensor, index: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads, N, N) = 16 * sigmoid(mlp(table))[index]: the continuous position bias both libraries compute."""
    n = index.shape[0]
    table = mlp(coords_table).view(-1, heads)
    return 16 * torch.sigmoid(table[index.reshape(-1)].view(n, n, heads).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------- transformers
def _hf_layer_forward(self, hidden_states, input_dimensions, output_attentions=False):
    """transformers' Swinv2Layer.forward (and Swin2SRLayer.forward, the same layer) with the attention step
    fused: pad, roll, partition, attention, reverse, roll back and crop are one `window_attention` call."""
    _, implementation = getattr(self, _MARK)
    if output_attentions:  # the probabilities exist only in the original chain
        return type(self).forward(self, hidden_states, input_dimensions, output_attentions)
    attn = self.attention.self
    height, width = input_dimensions
    batch, _, channels = hidden_states.shape
    projections = (attn.query, attn.key, attn.value)
    if all(is_plain_linear(m) for m in projections):
        weight = torch.cat([m.weight for m in projections])
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in projections])
        qkv = F.linear(hidden_states, weight, bias)
    else:  # swapped (LoRA, quantized, parametrized) or hooked projections: called as modules
        padded = height % self.window_size != 0 or width % self.window_size != 0  # an int (checked at patch)
        qkv, bias = project_qkv(hidden_states, *projections, padded=padded)
    position_bias = _position_bias(attn.continuous_position_bias_mlp, attn.relative_coords_table,
                                   attn.relative_position_index, attn.num_attention_heads)
    geometry = WindowGeometry(grid=(height, width), window=self.window_size, shift=self.shift_size,
                              pad_order=PAD_THEN_ROLL, mask_value=-200.0,  # transformers adds its -100 mask twice
                              num_heads=attn.num_attention_heads)
    context = window_attention(
        qkv, bias, attn.logit_scale, position_bias, geometry=geometry,
        dropout_p=attn.dropout.p if self.training else 0.0, implementation=implementation,
    )
    attention_output = self.attention.output(context, hidden_states).view(batch, height * width, channels)
    hidden_states = hidden_states + self.drop_path(self.layernorm_before(attention_output))
    layer_output = self.output(self.intermediate(hidden_states))
    layer_output = hidden_states + self.drop_path(self.layernorm_after(layer_output))
    return (layer_output,)


# ------------------------------------------------------------------------------------------------------ timm
def _timm_attn(self, x):
    """timm's SwinTransformerV2Block._attn fused: (B, H, W, C) in and out."""
    _, implementation = getattr(self, _MARK)
    attn = self.attn
    batch, height, width, channels = x.shape
    bias = None
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x.reshape(batch, height * width, channels), attn.qkv.weight, bias)
    position_bias = _position_bias(attn.cpb_mlp, attn.relative_coords_table, attn.relative_position_index,
                                   attn.num_heads)
    geometry = WindowGeometry(grid=(height, width), window=tuple(self.window_size), shift=tuple(self.shift_size),
                              pad_order=ROLL_THEN_PAD, mask_value=-100.0, num_heads=attn.num_heads)
    context = window_attention(
        qkv, bias, attn.logit_scale, position_bias, geometry=geometry,
        dropout_p=attn.attn_drop.p if self.training else 0.0, implementation=implementation,
    )
    return attn.proj_drop(attn.proj(context)).view(batch, height, width, channels)


# ------------------------------------------------------------------------------------------------- discovery
def _tested(library: str) -> str:
    """"timm 1.0.29 and 1.0.31": the versions named in errors."""
    return f"{library} {' and '.join(TESTED_VERSIONS[library])}"


_ACCEPTED = ("a transformers Swinv2 model (Swinv2Model, Swinv2ForImageClassification, Swinv2ForMaskedImageModeling, "
             "Swinv2Backbone), a transformers Swin2SR model (Swin2SRModel, Swin2SRForImageSuperResolution), or a "
             "timm SwinTransformerV2 or SwinTransformerV2Cr (also features_only)")


def _library_blocks(model: nn.Module):
    """("transformers" | "timm", [blocks]) for a supported model; raises TypeError otherwise."""
    from .modeling import Swinv2PreTrainedModel as OurModel

    if isinstance(model, OurModel):
        raise TypeError("patch() takes transformers or timm models; a swinv2_fast model chooses its path with "
                        "model.set_attn_implementation(name)")
    for models, layer in _transformers_families():
        if isinstance(model, models):
            return "transformers", [m for m in model.modules() if isinstance(m, layer)]
    try:
        from timm.models._features import FeatureDictNet
    except ImportError:
        FeatureDictNet = None
    for models, block in _timm_families():
        blocks = [m for m in model.modules() if isinstance(m, block)]
        if isinstance(model, models) or (FeatureDictNet is not None and isinstance(model, FeatureDictNet) and blocks):
            return "timm", blocks
    raise TypeError(f"patch() accepts {_ACCEPTED}; got {type(model).__module__}.{type(model).__qualname__}")


def _families(classes):
    """(model class, block class) of each family in `classes` ((module, model class name, block class name))
    that the installed library has."""
    import importlib

    families = []
    for module_name, model_name, block_name in classes:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        families.append((getattr(module, model_name), getattr(module, block_name)))
    return families


def _transformers_families():
    """(model base class, block class) of each transformers family this transformers has."""
    return _families((("transformers.models.swinv2.modeling_swinv2", "Swinv2PreTrainedModel", "Swinv2Layer"),
                      ("transformers.models.swin2sr.modeling_swin2sr", "Swin2SRPreTrainedModel", "Swin2SRLayer")))


def _timm_families():
    """(model class, block class) of each timm family this timm has."""
    return _families((("timm.models.swin_transformer_v2", "SwinTransformerV2", "SwinTransformerV2Block"),
                      ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2Cr", "SwinTransformerV2CrBlock")))


def _is_cr_block(block: nn.Module) -> bool:
    try:
        from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock
    except ImportError:  # no timm, or a timm without the Cr family
        return False
    return isinstance(block, SwinTransformerV2CrBlock)


def _binding(library: str, block: nn.Module):
    """(method name, patched function, what the function reads: (block attributes, attention module name,
    its attributes)) for one block."""
    if library == "transformers":
        return "forward", _hf_layer_forward, (_HF_LAYER_ATTRS, "attention.self", _HF_SELF_ATTRS)
    if _is_cr_block(block):
        return "_shifted_window_attn", timm_cr_shifted_window_attn, (CR_BLOCK_ATTRS, "attn", CR_ATTN_ATTRS)
    return "_attn", _timm_attn, (_TIMM_BLOCK_ATTRS, "attn", _TIMM_ATTN_ATTRS)


def _check_structure(library: str, blocks) -> None:
    import importlib

    version = importlib.import_module(library).__version__
    if not blocks:
        raise RuntimeError(f"found no Swin V2 blocks in this {library} {version} model; swinv2_fast.patch was "
                           f"tested with {_tested(library)}")
    for block in blocks:
        _, _, (block_attrs, inner_path, inner_attrs) = _binding(library, block)
        inner = block
        for part in inner_path.split("."):
            inner = getattr(inner, part, None)
        missing = [a for a in block_attrs if not hasattr(block, a)]
        missing += [f"{inner_path}.{a}" for a in inner_attrs if not hasattr(inner, a)]
        if not missing and library == "transformers" and not isinstance(block.window_size, int):
            missing.append("window_size (an int)")
        if not missing and _is_cr_block(block):
            missing += cr_geometry_problems(block)
        if missing:
            raise RuntimeError(
                f"{library} {version}: a {type(block).__name__} lacks (or has another form of) {missing}, which "
                "swinv2_fast.patch reads; "
                f"the patch knows the module structure of {_tested(library)}"
            )


def patch(model: nn.Module, attn_implementation: str = "auto") -> nn.Module:
    """Route every block's window-attention step of a transformers or timm Swin V2 model through
    swinv2_fast (see the module docstring); in place, returns the model. Patching again changes the
    implementation."""
    if attn_implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {IMPLEMENTATIONS}, got {attn_implementation!r}")
    library, blocks = _library_blocks(model)
    _check_structure(library, blocks)
    for block in blocks:
        name, function, _ = _binding(library, block)
        setattr(block, _MARK, (name, attn_implementation))
        setattr(block, name, types.MethodType(function, block))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: the blocks' own class methods run again. A model that was never patched is returned
    unchanged."""
    _, blocks = _library_blocks(model)
    for block in blocks:
        mark: Optional[tuple] = block.__dict__.pop(_MARK, None)
        if mark is not None:
            block.__dict__.pop(mark[0], None)
    return model


def is_patched(model: nn.Module) -> bool:
    _, blocks = _library_blocks(model)
    return any(_MARK in block.__dict__ for block in blocks)
