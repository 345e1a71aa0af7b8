"""Conversion from timm's `SwinTransformerV2` and from the official microsoft/Swin-Transformer checkpoints.

Both codebases store q/k/v as one `qkv` weight with separate `q_bias`/`v_bias`, use the shift mask value
-100 once, and (timm) roll before padding; converted models carry `window_semantics="timm"` so that they
reproduce their source's numbers. timm places patch merging at the start of stage i+1
(`layers.{i+1}.downsample`), the official code at the end of stage i, like transformers.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .configuration import Swinv2Config
from .modeling import (
    Swinv2ForImageClassification,
    Swinv2ForMaskedImageModeling,
    Swinv2Model,
    _pair,
)
from .weights import load_state_dict_checked
from .windows import window_and_shift

__all__ = ["convert_qkv_state_dict", "from_official", "from_timm", "official_config_to_swinv2_config"]

_BLOCK_RENAMES = [
    ("attn.logit_scale", "attention.self.logit_scale"),
    ("attn.cpb_mlp.", "attention.self.continuous_position_bias_mlp."),
    ("attn.rpe_mlp.", "attention.self.continuous_position_bias_mlp."),  # early official name
    ("attn.q_bias", "attention.self.query.bias"),
    ("attn.v_bias", "attention.self.value.bias"),
    ("attn.proj.", "attention.output.dense."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]
# Derived buffers the official checkpoints save; swinv2_fast rebuilds them.
_DERIVED_BUFFERS = re.compile(r"(relative_coords_table|relative_position_index|attn_mask|k_bias)$")


def convert_qkv_state_dict(
    state_dict: Mapping[str, torch.Tensor], downsample_offset: int, head_prefix: str = "head."
) -> Dict[str, torch.Tensor]:
    """timm/official keys -> transformers keys (without the `swinv2.` prefix).

    downsample_offset: 1 for timm (`layers.{i}.downsample` belongs after stage i-1), 0 for the official code.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _DERIVED_BUFFERS.search(key):
            continue
        if key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + key[len("patch_embed.proj.") :]] = value
            continue
        if key.startswith("patch_embed.norm."):
            out["embeddings.norm." + key[len("patch_embed.norm.") :]] = value
            continue
        if key.startswith("norm."):
            out["layernorm." + key[len("norm.") :]] = value
            continue
        if key.startswith(head_prefix):
            out["classifier." + key[len(head_prefix) :]] = value
            continue
        if key == "mask_token":
            out["embeddings.mask_token"] = value
            continue
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)$", key)
        if match:
            stage = int(match.group(1)) - downsample_offset
            out[f"encoder.layers.{stage}.downsample.{match.group(2)}"] = value
            continue
        match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        if match:
            prefix = f"encoder.layers.{match.group(1)}.blocks.{match.group(2)}."
            rest = match.group(3)
            if rest == "attn.qkv.weight":
                q, k, v = value.chunk(3, dim=0)
                out[prefix + "attention.self.query.weight"] = q.clone()
                out[prefix + "attention.self.key.weight"] = k.clone()
                out[prefix + "attention.self.value.weight"] = v.clone()
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    out[prefix + new + rest[len(old) :]] = value
                    break
            else:
                raise ValueError(f"state dict key {key!r} has no swinv2_fast counterpart")
            continue
        raise ValueError(f"state dict key {key!r} has no swinv2_fast counterpart")
    return out


def _with_prefix(state_dict, model):
    if any(k.startswith("swinv2.") for k in model.state_dict()):
        return {(k if k.startswith(("classifier.", "decoder.")) else "swinv2." + k): v for k, v in state_dict.items()}
    return state_dict


def _stage_resolutions(config: Swinv2Config):
    """Each stage's resolution as swinv2_fast (and transformers, and timm <= 1.0.29) derive it at construction:
    the patch grid floor-divided by 2**i."""
    (ih, iw), (ph, pw) = _pair(config.image_size), _pair(config.patch_size)
    grid = (ih // ph, iw // pw)
    return [(grid[0] // 2**i, grid[1] // 2**i) for i in range(len(config.depths))]


def _check_windows(config: Swinv2Config, blocks_per_stage, source: str, resolutions=None) -> list:
    """Raise unless every block's (window, shift) is the one its stage's resolution gives at construction.

    `resolutions`: the source's own stage resolutions where it records them (timm blocks'
    `input_resolution`); default swinv2_fast's (`_stage_resolutions`). timm 1.0.31 rounds the resolution of
    a stage after an odd one up ((g + 2**i - 1) // 2**i, the size patch merging's padding actually produces)
    where timm 1.0.29 and transformers floor it, so a small stage may get a larger window there.
    Returns [(stage, block, window, shift)] for the blocks whose window or shift differs from what
    swinv2_fast derives from `config` (from_timm rebuilds their attention with the source's choice)."""
    ours_res = _stage_resolutions(config)
    resolutions = resolutions or ours_res
    differing = []
    for i, blocks in enumerate(blocks_per_stage):
        for j, (window, shift) in enumerate(blocks):
            target_shift = 0 if j % 2 == 0 else config.window_size // 2
            source_choice = window_and_shift(resolutions[i], config.window_size, target_shift, config.window_semantics)
            if source_choice != (tuple(window), tuple(shift)):
                raise ValueError(
                    f"{source} stage {i} block {j} uses window {tuple(window)} and shift {tuple(shift)}; "
                    f"swinv2_fast derives {source_choice[0]} and {source_choice[1]} from "
                    f"window_size={config.window_size} at resolution {tuple(resolutions[i])} (models built with "
                    "always_partition, per-stage window sizes or set_input_size after construction are not "
                    "supported)"
                )
            if (
                window_and_shift(ours_res[i], config.window_size, target_shift, config.window_semantics)
                != source_choice
            ):
                differing.append((i, j, tuple(window), tuple(shift)))
    return differing


def _use_source_windows(model: nn.Module, config: Swinv2Config, differing) -> None:
    """Rebuild the window attention of the blocks listed by _check_windows with the source's window and shift
    (same parameters, so the state dict loads as usual; only the derived coordinate tables differ)."""
    from .modeling import Swinv2SelfAttention

    # Any: the model's layer tree, read by attribute (nn.Module.__getattr__ is typed Tensor | Module)
    tree: Any = model
    encoder = tree.swinv2.encoder if hasattr(tree, "swinv2") else tree.encoder
    for i, j, window, shift in differing:
        layer = encoder.layers[i].blocks[j]
        old = layer.attention.self
        layer.attention.self = Swinv2SelfAttention(
            config,
            int(config.embed_dim * 2**i),
            config.num_heads[i],
            window,
            shift,
            old.pretrained_window_size,
            config.window_semantics,
        )
        layer.window_size, layer.shift_size = window, shift


def from_timm(timm_model: nn.Module, *, attn_implementation: str = "auto") -> nn.Module:
    """The swinv2_fast model equivalent to a timm `SwinTransformerV2`, with the same weights.

    Returns `Swinv2ForImageClassification` when the timm model has a classifier (num_classes > 0), else
    `Swinv2Model` (whose `pooler_output` is timm's pooled features). The result keeps timm's semantics
    (roll then pad, shift mask -100, per-axis windows) and is in the timm model's mode, device and dtype.
    """
    if type(timm_model).__name__ == "SwinTransformerV2Cr":
        raise TypeError(
            "from_timm cannot represent timm's SwinTransformerV2Cr (swinv2_cr_*) exactly (another position-bias "
            "function, a learnable k bias, another stage layout and extra norms); use swinv2_fast.patch(model), "
            "which keeps timm's model and runs its window attention on swinv2_fast's op"
        )
    if type(timm_model).__name__ != "SwinTransformerV2" or not hasattr(timm_model, "layers"):
        raise TypeError(
            "from_timm expects a timm SwinTransformerV2 (timm.create_model('swinv2_...')), got "
            f"{type(timm_model).__name__}; features_only wrappers are not supported, convert the plain model"
        )
    # Any: timm's module tree, read by attribute (nn.Module.__getattr__ is typed Tensor | Module)
    source: Any = timm_model
    patch_embed = source.patch_embed
    if not isinstance(patch_embed.norm, nn.LayerNorm):
        raise ValueError("timm model without patch_norm cannot be expressed: transformers' layout always has it")
    if getattr(timm_model, "global_pool", "avg") != "avg":
        raise ValueError(f"timm model must pool with global_pool='avg', got {timm_model.global_pool!r}")
    patch_size = tuple(patch_embed.patch_size)
    if patch_size[0] != patch_size[1]:
        raise ValueError(f"only square patches are supported, got patch_size={patch_size}")
    stages = list(source.layers)
    blocks0 = stages[0].blocks[0]
    embed_dim = patch_embed.proj.out_channels
    config = Swinv2Config(
        image_size=list(patch_embed.img_size),
        patch_size=patch_size[0],
        num_channels=patch_embed.proj.in_channels,
        embed_dim=embed_dim,
        depths=[len(s.blocks) for s in stages],
        num_heads=[s.blocks[0].attn.num_heads for s in stages],
        window_size=max(max(b.window_size) for s in stages for b in s.blocks),
        pretrained_window_sizes=[s.blocks[0].attn.pretrained_window_size[0] for s in stages],
        mlp_ratio=blocks0.mlp.fc1.out_features / embed_dim,
        qkv_bias=blocks0.attn.q_bias is not None,
        hidden_dropout_prob=blocks0.attn.proj_drop.p,
        attention_probs_dropout_prob=blocks0.attn.attn_drop.p,
        drop_path_rate=getattr(stages[-1].blocks[-1].drop_path1, "drop_prob", 0.0),
        layer_norm_eps=blocks0.norm1.eps,
        num_labels=max(source.num_classes, 1),
        window_semantics="timm",
        attn_implementation=attn_implementation,
    )
    differing = _check_windows(
        config,
        [[(b.window_size, b.shift_size) for b in s.blocks] for s in stages],
        "timm model",
        [tuple(s.blocks[0].input_resolution) for s in stages],
    )
    model_cls = Swinv2ForImageClassification if source.num_classes > 0 else Swinv2Model
    model = model_cls(config)
    _use_source_windows(model, config, differing)
    state_dict = convert_qkv_state_dict(timm_model.state_dict(), downsample_offset=1, head_prefix="head.fc.")
    load_state_dict_checked(model, _with_prefix(state_dict, model), strict=True)
    reference = next(timm_model.parameters())
    return model.to(device=reference.device, dtype=reference.dtype).train(timm_model.training)


def _get(node: Any, path: str, default=None):
    for part in path.split("."):
        if node is None:
            return default
        node = node.get(part) if isinstance(node, Mapping) else getattr(node, part, None)
    return default if node is None else node


def official_config_to_swinv2_config(official_config: Mapping, **overrides) -> Swinv2Config:
    """A Swinv2Config from the official yacs config (a CfgNode or the same nested dict).

    Reads DATA.IMG_SIZE, MODEL.NUM_CLASSES, MODEL.DROP_RATE, MODEL.DROP_PATH_RATE and MODEL.SWINV2.*
    (PATCH_SIZE, IN_CHANS, EMBED_DIM, DEPTHS, NUM_HEADS, WINDOW_SIZE, MLP_RATIO, QKV_BIAS, APE,
    PATCH_NORM, PRETRAINED_WINDOW_SIZES) with the official defaults.
    """
    if not isinstance(official_config, Mapping) and not hasattr(official_config, "MODEL"):
        raise TypeError(
            f"official_config must be a yacs CfgNode or a nested dict, got {type(official_config).__name__}"
        )
    swin = lambda name, default: _get(official_config, f"MODEL.SWINV2.{name}", default)  # noqa: E731
    if swin("APE", False):
        raise ValueError("official models with APE=True (absolute position embedding) are not supported")
    if not swin("PATCH_NORM", True):
        raise ValueError("official models with PATCH_NORM=False are not supported")
    img_size = _get(official_config, "DATA.IMG_SIZE", 224)
    values = dict(
        image_size=img_size,
        patch_size=swin("PATCH_SIZE", 4),
        num_channels=swin("IN_CHANS", 3),
        embed_dim=swin("EMBED_DIM", 96),
        depths=list(swin("DEPTHS", [2, 2, 6, 2])),
        num_heads=list(swin("NUM_HEADS", [3, 6, 12, 24])),
        window_size=swin("WINDOW_SIZE", 7),
        pretrained_window_sizes=list(swin("PRETRAINED_WINDOW_SIZES", [0, 0, 0, 0])),
        mlp_ratio=float(swin("MLP_RATIO", 4.0)),
        qkv_bias=bool(swin("QKV_BIAS", True)),
        hidden_dropout_prob=float(_get(official_config, "MODEL.DROP_RATE", 0.0)),
        drop_path_rate=float(_get(official_config, "MODEL.DROP_PATH_RATE", 0.1)),
        num_labels=max(int(_get(official_config, "MODEL.NUM_CLASSES", 1000)), 1),
        window_semantics="timm",
    )
    values.update(overrides)
    return Swinv2Config(**values)


def from_official(
    checkpoint: Mapping[str, Any],
    official_config: Optional[Mapping] = None,
    *,
    config: Optional[Swinv2Config] = None,
    attn_implementation: str = "auto",
) -> nn.Module:
    """A swinv2_fast model from an official microsoft/Swin-Transformer Swin V2 checkpoint.

    checkpoint: what `torch.load` returns for the official .pth (the weights under "model") or the state
        dict itself. A SimMIM checkpoint (keys under `encoder.` plus `decoder.0.*`) gives
        `Swinv2ForMaskedImageModeling`; a classifier gives `Swinv2ForImageClassification`; a checkpoint
        without a head gives `Swinv2Model`.
    official_config: the official yacs config (or nested dict); or pass `config` directly.
    The official code never pads (it asserts the input size), so timm's semantics reproduce it; the saved
    derived buffers (coordinate table, position index, shift mask) are rebuilt, not loaded.
    """
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"checkpoint must be a state dict or a dict with a 'model' state dict, got {type(checkpoint).__name__}"
        )
    if config is None:
        if official_config is None:
            raise ValueError("from_official needs the checkpoint's config: pass official_config or config")
        config = official_config_to_swinv2_config(official_config, attn_implementation=attn_implementation)
    ih, iw = _pair(config.image_size)
    if ih != iw:
        raise ValueError(f"official models are square; got image_size={config.image_size}")

    simmim = any(k.startswith("encoder.") for k in state_dict)
    if simmim:
        decoder = {k: v for k, v in state_dict.items() if k.startswith("decoder.")}
        encoder = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
        converted = convert_qkv_state_dict(encoder, downsample_offset=0)
        model = Swinv2ForMaskedImageModeling(config)
        converted = {"swinv2." + k: v for k, v in converted.items()}
        converted.update(decoder)
    else:
        converted = convert_qkv_state_dict(state_dict, downsample_offset=0)
        has_head = any(k.startswith("classifier.") for k in converted)
        model = Swinv2ForImageClassification(config) if has_head else Swinv2Model(config)
        converted = _with_prefix(converted, model)
    load_state_dict_checked(model, converted, strict=True)
    return model.eval()
