"""Reading and writing checkpoint directories in transformers' format (config.json + weights)."""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, List

import torch

logger = logging.getLogger("swinv2_fast")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# The unreleased transformers renames q/k/v/output projections; both layouts load.
_RENAMES = [
    (re.compile(r"\.attention\.self\.q_proj\."), ".attention.self.query."),
    (re.compile(r"\.attention\.self\.k_proj\."), ".attention.self.key."),
    (re.compile(r"\.attention\.self\.v_proj\."), ".attention.self.value."),
    (re.compile(r"\.attention\.(?:self\.|output\.)?o_proj\."), ".attention.output.dense."),
]

# Parameters that belong to one class of the family only: a checkpoint of another class may lack them
# (they keep their initialisation) or carry them (they are dropped), as transformers does, with a warning.
_MISSING_OK = re.compile(r"^(swinv2\.)?(classifier\.|decoder\.|embeddings\.mask_token$)")
# The final LayerNorm is not part of `Swinv2Backbone`: a classification checkpoint loads into it without it.
_UNEXPECTED_OK = re.compile(r"^(swinv2\.)?(classifier\.|decoder\.|embeddings\.mask_token$|layernorm\.)")


def rename_legacy_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map q_proj/k_proj/v_proj/o_proj keys to transformers 5.x's released query/key/value/output.dense."""
    out = {}
    for key, value in state_dict.items():
        new_key = "." + key
        for pattern, replacement in _RENAMES:
            new_key = pattern.sub(replacement, new_key)
        out[new_key[1:]] = value
    return out


def read_checkpoint(directory: str) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors or torch .bin, single file or sharded."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")

    def load_file(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)

    for single in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        path = os.path.join(directory, single)
        if os.path.isfile(path):
            return load_file(path)
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        path = os.path.join(directory, index_name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_file(os.path.join(directory, shard)))
            return state_dict
    raise FileNotFoundError(
        f"no weights in {directory!r}: expected one of {SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME}, "
        f"{SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_INDEX_NAME}"
    )


def _adapt_prefix(state_dict, model_keys, prefix):
    model_prefixed = any(k.startswith(prefix) for k in model_keys)
    ckpt_prefixed = any(k.startswith(prefix) for k in state_dict)
    if ckpt_prefixed and not model_prefixed:
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    if model_prefixed and not ckpt_prefixed:
        return {prefix + k: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_checked(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """Load transformers-layout weights into `model`, raising with the exact key lists on any mismatch."""
    state_dict = rename_legacy_keys(state_dict)
    expected = model.state_dict()
    state_dict = _adapt_prefix(state_dict, expected.keys(), model.base_model_prefix + ".")

    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    missing_heads = [k for k in missing if _MISSING_OK.match(k)]
    unexpected_heads = [k for k in unexpected if _UNEXPECTED_OK.match(k)]
    missing = [k for k in missing if k not in missing_heads]
    unexpected = [k for k in unexpected if k not in unexpected_heads]
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems: List[str] = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems and strict:
        raise ValueError(f"state dict does not fit {type(model).__name__}; " + "; ".join(problems))
    for problem in problems:
        logger.warning("%s: %s", type(model).__name__, problem)
    if missing_heads:
        logger.warning("%s: not in the checkpoint, left at initialisation: %s", type(model).__name__, missing_heads)
    if unexpected_heads:
        logger.warning("%s: checkpoint weights of another head, not used: %s", type(model).__name__, unexpected_heads)

    mismatched_keys = {m.split(":")[0] for m in mismatched}
    usable = {k: v for k, v in state_dict.items() if k in expected and k not in mismatched_keys}
    model.load_state_dict(usable, strict=False)
    return model


def load_model_weights(model: torch.nn.Module, directory: str, strict: bool = True):
    return load_state_dict_checked(model, read_checkpoint(directory), strict=strict)


def save_model_weights(model: torch.nn.Module, directory: str, safe_serialization: bool = True) -> None:
    os.makedirs(directory, exist_ok=True)
    config = model.config
    config._extra["architectures"] = [type(model).__name__]
    config._extra["dtype"] = str(model.dtype).replace("torch.", "")
    if config.window_semantics != "transformers":
        logger.warning(
            "saving a model with window_semantics=%r: swinv2_fast reloads it with the same numbers, but "
            "transformers will run it with its own padding order and shift mask",
            config.window_semantics,
        )
    config.save_pretrained(directory)
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state_dict, os.path.join(directory, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        torch.save(state_dict, os.path.join(directory, WEIGHTS_NAME))
