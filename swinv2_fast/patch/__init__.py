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

Capturing a patched model: torch.compile, torch.export (dynamic batch and sizes too: the geometry takes
symbolic sizes) and torch.jit.trace trace through the patched step (except a timm SwinTransformerV2
block under "auto" or "eager", whose trace records timm's own step, which traces its sizes); torch.fx
records it as one call (`swinv2_fast.patch.step.patched_window_step`), and an fx graph of a patched model
scripts (the step compiles to the fused custom op). torch.jit.script of the patched model itself raises
`PatchedModelNotScriptable`: scripting compiles each block's class methods, so it would run the library's
attention without the patch; unpatch first to script the library's model.

Each library keeps its own window rules (pad order, shift-mask value): the table
`swinv2_fast.windows.SEMANTICS`. `output_attentions=True` (transformers) runs the original forward,
which forms the probabilities. Attention dropout in training goes to the eager path, as in the models.
`SwinTransformerV2Cr`: the block's own window and shift (chosen by timm from its feature size), its
position-bias MLP called as a module (its dropout of 0.125 applies in training as in timm), and, by
design, timm's own `_shifted_window_attn` where the fused op cannot be exact (see `timm_cr.py`).

One module per library holds its patched method: `transformers.py` (`Swinv2Layer`, `Swin2SRLayer`),
`timm.py` (`SwinTransformerV2Block`), `timm_cr.py` (`SwinTransformerV2CrBlock`); all of them call the step
of `step.py`, and compute the position bias and the q/k/v projection with `swinv2_fast.attention`. This
module finds the blocks and binds the methods.
"""

from __future__ import annotations

import types
from typing import Optional

import torch.nn as nn

from ..functional import IMPLEMENTATIONS
from .step import MARK as _MARK  # on each patched block: (method name, implementation)
from .timm import ATTN_ATTRS as _TIMM_ATTN_ATTRS
from .timm import BLOCK_ATTRS as _TIMM_BLOCK_ATTRS
from .timm import timm_attn
from .timm_cr import CR_ATTN_ATTRS, CR_BLOCK_ATTRS, cr_geometry_problems, timm_cr_shifted_window_attn
from .transformers import LAYER_ATTRS as _HF_LAYER_ATTRS
from .transformers import SELF_ATTRS as _HF_SELF_ATTRS
from .transformers import transformers_layer_forward

__all__ = ["TESTED_VERSIONS", "PatchedModelNotScriptable", "is_patched", "patch", "unpatch"]

# The library versions whose module structure the patch was tested with (the pinned stack, the GPU machine's
# stack, and the newest releases CI has run); other versions are patched when their modules carry the
# attributes the patch reads.
TESTED_VERSIONS = {"transformers": ("5.17.0", "5.18.0", "5.25.0"), "timm": ("1.0.29", "1.0.31")}


# ------------------------------------------------------------------------------------------------- discovery
def _tested(library: str) -> str:
    """ "timm 1.0.29 and 1.0.31": the versions named in errors."""
    return f"{library} {' and '.join(TESTED_VERSIONS[library])}"


_ACCEPTED = (
    "a transformers Swinv2 model (Swinv2Model, Swinv2ForImageClassification, Swinv2ForMaskedImageModeling, "
    "Swinv2Backbone), a transformers Swin2SR model (Swin2SRModel, Swin2SRForImageSuperResolution), or a "
    "timm SwinTransformerV2 or SwinTransformerV2Cr (also features_only, every feature_cls holding the blocks)"
)


def _library_blocks(model: nn.Module):
    """("transformers" | "timm", [blocks]) for a supported model; raises TypeError otherwise."""
    from ..modeling import Swinv2PreTrainedModel as OurModel

    if isinstance(model, OurModel):
        raise TypeError(
            "patch() takes transformers or timm models; a swinv2_fast model chooses its path with "
            "model.set_attn_implementation(name)"
        )
    for models, layer in _transformers_families():
        if isinstance(model, models):
            return "transformers", [m for m in model.modules() if isinstance(m, layer)]
    for models, block in _timm_families():
        blocks = [m for m in model.modules() if isinstance(m, block)]
        if isinstance(model, models) or (_is_timm_feature_wrapper(model) and blocks):
            return "timm", blocks
    raise TypeError(f"patch() accepts {_ACCEPTED}; got {type(model).__module__}.{type(model).__qualname__}")


def _is_timm_feature_wrapper(model: nn.Module) -> bool:
    """What timm's `create_model(..., features_only=True)` returns for every `feature_cls` (FeatureListNet,
    FeatureDictNet, FeatureHookNet, FeatureGetterNet; FeatureGraphNet and GraphExtractNet are fx graphs,
    which keep no blocks to patch: patch the model before tracing it). Recognised by timm's feature
    modules, so a wrapper class timm adds there is accepted too, when it holds Swin V2 blocks."""
    return type(model).__module__.startswith("timm.models._features")


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
    return _families(
        (
            ("transformers.models.swinv2.modeling_swinv2", "Swinv2PreTrainedModel", "Swinv2Layer"),
            ("transformers.models.swin2sr.modeling_swin2sr", "Swin2SRPreTrainedModel", "Swin2SRLayer"),
        )
    )


def _timm_families():
    """(model class, block class) of each timm family this timm has."""
    return _families(
        (
            ("timm.models.swin_transformer_v2", "SwinTransformerV2", "SwinTransformerV2Block"),
            ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2Cr", "SwinTransformerV2CrBlock"),
        )
    )


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
        return "forward", transformers_layer_forward, (_HF_LAYER_ATTRS, "attention.self", _HF_SELF_ATTRS)
    if _is_cr_block(block):
        return "_shifted_window_attn", timm_cr_shifted_window_attn, (CR_BLOCK_ATTRS, "attn", CR_ATTN_ATTRS)
    return "_attn", timm_attn, (_TIMM_BLOCK_ATTRS, "attn", _TIMM_ATTN_ATTRS)


def _check_structure(library: str, blocks) -> None:
    import importlib

    version = importlib.import_module(library).__version__
    if not blocks:
        raise RuntimeError(
            f"found no Swin V2 blocks in this {library} {version} model; swinv2_fast.patch was "
            f"tested with {_tested(library)}"
        )
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
        setattr(block, _PREPARE_SCRIPTABLE, types.MethodType(_refuse_scripting, block))
    return model


# torch.jit.script calls a module's `__prepare_scriptable__` (when it has one) on the model and on every
# submodule before compiling. Set on each patched block, it refuses: scripting compiles the classes' own
# methods, so the patch (an instance attribute) would be dropped without a word and the scripted model would
# run the library's attention chain.
_PREPARE_SCRIPTABLE = "__prepare_scriptable__"


class PatchedModelNotScriptable(RuntimeError):
    """torch.jit.script was called on a model patched by swinv2_fast.patch (see `_refuse_scripting`)."""


def _refuse_scripting(self):
    raise PatchedModelNotScriptable(
        f"torch.jit.script cannot compile swinv2_fast's patched window-attention step of this "
        f"{type(self).__name__}: scripting compiles the class's own methods and would silently drop the patch. "
        "Script the unpatched model (swinv2_fast.unpatch(model) first), or capture the patched model with "
        "torch.export, torch.compile, torch.jit.trace or torch.fx (an fx graph of a patched model can be "
        "scripted: its step compiles to the fused custom op)"
    )


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: the blocks' own class methods run again. A model that was never patched is returned
    unchanged."""
    _, blocks = _library_blocks(model)
    for block in blocks:
        mark: Optional[tuple] = block.__dict__.pop(_MARK, None)
        if mark is not None:
            block.__dict__.pop(mark[0], None)
            block.__dict__.pop(_PREPARE_SCRIPTABLE, None)
    return model


def is_patched(model: nn.Module) -> bool:
    _, blocks = _library_blocks(model)
    return any(_MARK in block.__dict__ for block in blocks)
