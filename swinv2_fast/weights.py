"""Reading and writing checkpoint directories in transformers' format (config.json + weights).

Messages go to the `swinv2_fast` logger (records named after the package). When the application has not
configured logging (no handler on the root logger), they are printed to stderr prefixed with
"swinv2_fast WARNING:" (never as a bare line, as Python's last-resort handler would), through
`tqdm.write` while a tqdm progress bar is active, so that the bar is redrawn below the message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

if TYPE_CHECKING:
    from .modeling_utils import PreTrainedMixin

__all__ = [
    "load_model_weights",
    "load_state_dict_checked",
    "logger",
    "read_checkpoint",
    "rename_legacy_keys",
    "resolve_pretrained_directory",
    "save_model_weights",
]


class _UnconfiguredLoggingHandler(logging.Handler):
    """Reports the package's warnings when logging is not configured: "swinv2_fast WARNING: message" on
    stderr. Once the root logger has a handler, records propagate to it and this handler stays silent."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))

    def emit(self, record):
        if logging.getLogger().handlers:
            return
        try:
            message = self.format(record)
            tqdm_module = sys.modules.get("tqdm")
            bars = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
            if bars:  # an active progress bar: print above it and redraw it
                tqdm_module.tqdm.write(message, file=sys.stderr)
            else:
                sys.stderr.write(message + "\n")
        except Exception:
            self.handleError(record)


logger = logging.getLogger("swinv2_fast")
if not any(isinstance(h, _UnconfiguredLoggingHandler) for h in logger.handlers):
    logger.addHandler(_UnconfiguredLoggingHandler())

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

_DIRECTORY_FORM = (
    "a directory written by save_pretrained: config.json beside model.safetensors or "
    "pytorch_model.bin (or their sharded .index.json form)"
)


_LOCAL_MODEL_HINT = (
    "To make a local model without the hub: build one from a config, "
    "swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(...)), save it with "
    "model.save_pretrained(directory), then load it with from_pretrained(directory); or convert a timm model "
    "with swinv2_fast.from_timm(timm.create_model(...)) (see docs/models.md, 'Making a local model')."
)


def resolve_pretrained_directory(
    name_or_path, *, subfolder: str = "", revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> str:
    """The local directory `from_pretrained` reads for `name_or_path`.

    A directory is used as it is. A hub id ("org/name") is looked up in huggingface_hub's local cache
    (`cache_dir`, else the default cache), at `revision`, without any download: swinv2_fast never goes to
    the network. Anything else raises FileNotFoundError naming the directory form expected.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"pretrained_model_name_or_path must be a path (str or os.PathLike), got {type(name_or_path).__name__}"
        )
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        directory = name
    else:
        if os.path.isfile(name):
            raise FileNotFoundError(f"{name!r} is a file; from_pretrained expects {_DIRECTORY_FORM}")
        directory, why = _cached_snapshot(name, revision=revision, cache_dir=cache_dir)
        if directory is None:
            raise FileNotFoundError(
                f"{name!r} is not a directory. swinv2_fast loads local directories only ({_DIRECTORY_FORM}) "
                f"and never downloads; a hub id is read only from huggingface_hub's local cache: {why}. "
                "Download it first (huggingface_hub.snapshot_download(repo_id) or transformers' "
                "from_pretrained), or pass the directory. "
                f"{_LOCAL_MODEL_HINT}"
            )
    if subfolder:
        directory = os.path.join(directory, subfolder)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"subfolder {subfolder!r} does not exist in {name!r}")
    return directory


def _cached_snapshot(repo_id: str, revision: Optional[str], cache_dir: Optional[str]):
    """(huggingface_hub's cached snapshot folder of `repo_id`, None) or (None, why there is none)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        validate_repo_id(repo_id)
    except Exception:  # huggingface_hub's HFValidationError
        return None, f"{repo_id!r} is not a hub id either"
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True), None
    except Exception:  # LocalEntryNotFoundError and relatives: not cached (nothing is downloaded here)
        return None, (
            f"it holds no snapshot of {repo_id!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" (cache: {cache_dir or 'the default'})"
        )


def rename_legacy_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map q_proj/k_proj/v_proj/o_proj keys to transformers 5.x's released query/key/value/output.dense."""
    out = {}
    for key, value in state_dict.items():
        new_key = "." + key
        for pattern, replacement in _RENAMES:
            new_key = pattern.sub(replacement, new_key)
        out[new_key[1:]] = value
    return out


def read_checkpoint(
    directory: str, use_safetensors: Optional[bool] = None, variant: Optional[str] = None
) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors or torch .bin, single file or sharded.

    `use_safetensors=True` reads only safetensors files, False only .bin files, None (default) prefers
    safetensors; `variant` reads model.<variant>.safetensors and the like, as transformers does."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")

    def load_file(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)

    kinds = {None: ("safetensors", "bin"), True: ("safetensors",), False: ("bin",)}[use_safetensors]
    singles = [n for n in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME) if n.rsplit(".", 1)[1] in kinds]
    indexes = [n for n in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME) if n.split(".")[1] in kinds]
    for single in singles:
        path = os.path.join(directory, _variant_name(single, variant))
        if os.path.isfile(path):
            return load_file(path)
    for index_name in indexes:
        path = os.path.join(directory, _variant_name(index_name, variant))
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_file(os.path.join(directory, shard)))
            return state_dict
    expected = [_variant_name(n, variant) for n in singles + indexes]
    raise FileNotFoundError(
        f"no weights in {directory!r}: expected one of {', '.join(expected)}"
        + ("" if use_safetensors is None else f" (use_safetensors={use_safetensors})")
    )


def _adapt_prefix(state_dict, model_keys, prefix):
    model_prefixed = any(k.startswith(prefix) for k in model_keys)
    ckpt_prefixed = any(k.startswith(prefix) for k in state_dict)
    if ckpt_prefixed and not model_prefixed:
        return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    if model_prefixed and not ckpt_prefixed:
        return {prefix + k: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_checked(
    model: PreTrainedMixin,
    state_dict: Dict[str, torch.Tensor],
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
    report_logger: Optional[logging.Logger] = None,
) -> Dict[str, object]:
    """Load transformers-layout weights into `model`; returns transformers' loading info: {"missing_keys": set,
    "unexpected_keys": set, "mismatched_keys": set of (key, checkpoint shape, model shape), "error_msgs": list}.

    Rules (transformers' own where it has one):
    - a weight whose shape differs from the checkpoint's raises RuntimeError naming it, unless
      `ignore_mismatched_sizes=True` (transformers' option), which leaves it at its initialisation with a
      warning ("Reinit due to size mismatch", transformers' words);
    - `strict=True` raises ValueError listing every missing, unexpected and mis-shaped key (what the
      converters from timm and the official checkpoints use: a converted checkpoint must fit exactly), except
      task heads another class of the family lacks or adds (`classifier`, `decoder`, mask token), which
      warn;
    - `strict=False` (from_pretrained's default, as in transformers) warns about missing and unexpected keys
      and loads what fits.
    Warnings go to `report_logger` (default: the package's logger).
    """
    report = report_logger if report_logger is not None else logger
    state_dict = rename_legacy_keys(state_dict)
    expected = model.state_dict()
    state_dict = _adapt_prefix(state_dict, expected.keys(), model.base_model_prefix + ".")

    all_missing = sorted(k for k in expected if k not in state_dict)
    all_unexpected = sorted(k for k in state_dict if k not in expected)
    missing_heads = [k for k in all_missing if _MISSING_OK.match(k)]
    unexpected_heads = [k for k in all_unexpected if _UNEXPECTED_OK.match(k)]
    missing = [k for k in all_missing if k not in missing_heads]
    unexpected = [k for k in all_unexpected if k not in unexpected_heads]
    mismatched_keys = sorted(
        k for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched_keys
    ]
    name = type(model).__name__
    problems: List[str] = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if mismatched and not ignore_mismatched_sizes:
        problems.append(f"shape mismatches: {mismatched}")
    if problems and strict:
        hint = []
        if mismatched and not ignore_mismatched_sizes:
            hint.append(
                "ignore_mismatched_sizes=True leaves the mis-shaped weights at their initialisation "
                "(e.g. a new classifier for another num_labels)"
            )
        hint.append("strict=False loads what fits and warns about missing and unexpected keys")
        raise ValueError(f"state dict does not fit {name}; " + "; ".join(problems) + ". " + "; ".join(hint))
    if mismatched and not ignore_mismatched_sizes:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {name}: shape mismatches: {mismatched}. Pass "
            "ignore_mismatched_sizes=True to leave these weights at their initialisation (e.g. a new "
            "classifier for another num_labels)"
        )
    for problem in problems:
        report.warning("%s: %s (left at initialisation / not used)", name, problem)
    if mismatched and ignore_mismatched_sizes:
        report.warning(
            "%s: Reinit due to size mismatch (ignore_mismatched_sizes=True), left at initialisation: %s",
            name,
            mismatched,
        )
    if missing_heads:
        report.warning("%s: not in the checkpoint, left at initialisation: %s", name, missing_heads)
    if unexpected_heads:
        report.warning("%s: checkpoint weights of another head, not used: %s", name, unexpected_heads)

    usable = {k: v for k, v in state_dict.items() if k in expected and k not in set(mismatched_keys)}
    model.load_state_dict(usable, strict=False)
    return {
        "missing_keys": set(all_missing),
        "unexpected_keys": set(all_unexpected),
        "mismatched_keys": {(k, tuple(state_dict[k].shape), tuple(expected[k].shape)) for k in mismatched_keys},
        "error_msgs": [],
    }


def load_model_weights(
    model: PreTrainedMixin,
    directory: str,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
    use_safetensors: Optional[bool] = None,
    variant: Optional[str] = None,
    report_logger: Optional[logging.Logger] = None,
):
    state_dict = read_checkpoint(directory, use_safetensors=use_safetensors, variant=variant)
    return load_state_dict_checked(
        model, state_dict, strict=strict, ignore_mismatched_sizes=ignore_mismatched_sizes, report_logger=report_logger
    )


def _parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "10KiB" (transformers' max_shard_size)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size).upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max_shard_size must be an int (bytes) or a string such as '5GB', got {size!r}")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit or "_"))


def _variant_name(name: str, variant: Optional[str]) -> str:
    """transformers' naming of a variant: model.safetensors -> model.<variant>.safetensors,
    model.safetensors.index.json -> model.safetensors.index.<variant>.json."""
    if not variant:
        return name
    path, ext = name.rsplit(".", 1)
    return f"{path}.{variant}.{ext}"


def save_model_weights(
    model: PreTrainedMixin,
    directory: str,
    safe_serialization: bool = True,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
    as_swinv2_fast: bool = False,
    max_shard_size="50GB",
    variant: Optional[str] = None,
    is_main_process: bool = True,
    save_function=torch.save,
) -> None:
    """Write config.json and the weights (model.safetensors, or pytorch_model.bin without safe_serialization;
    sharded with an index beyond `max_shard_size`), as transformers' save_pretrained writes them."""
    if os.path.isfile(directory):
        raise ValueError(f"save_pretrained needs a directory, got the file {directory!r}")
    os.makedirs(directory, exist_ok=True)
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = model.dtype
    if config.window_semantics != "transformers" and not as_swinv2_fast and is_main_process:
        logger.warning(
            "saving a model with window_semantics=%r: swinv2_fast reloads it with the same numbers, but "
            "transformers will run it with its own padding order and shift mask",
            config.window_semantics,
        )
    if not is_main_process:
        return
    config.save_pretrained(directory, as_swinv2_fast=as_swinv2_fast)
    if state_dict is None:
        state_dict = model.state_dict()
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    limit = _parse_size(max_shard_size)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weights_name = _variant_name(SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME, variant)
    index_name = _variant_name(SAFE_WEIGHTS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME, variant)
    # weights of an earlier save in another layout (the other format, sharded or not) would be read before
    # or beside the new ones: remove those of this variant
    names = [
        _variant_name(n, variant)
        for n in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
    ]
    shard_patterns = [re.escape(n.rsplit(".", 1)[0]) + r"-\d{5}-of-\d{5}\." + n.rsplit(".", 1)[1] for n in names[:2]]
    for stale in os.listdir(directory):
        if stale in names or any(re.fullmatch(p, stale) for p in shard_patterns):
            os.remove(os.path.join(directory, stale))

    def write(tensors, filename):
        path = os.path.join(directory, filename)
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(tensors, path, metadata={"format": "pt"})
        else:
            save_function(tensors, path)

    if len(shards) == 1:
        write(shards[0], weights_name)
        return
    stem, ext = weights_name.rsplit(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        write(shard, filename)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    with open(os.path.join(directory, index_name), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
