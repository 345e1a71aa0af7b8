"""`Swinv2Config`: the fields, defaults and JSON form of transformers' `Swinv2Config`, without transformers.

A config.json written by transformers' `save_pretrained` loads here, and one written here loads in
transformers. Two fields are swinv2_fast's own and are written only when they differ from transformers'
behaviour:

- `window_semantics`: "transformers" or "timm", the library whose window rules (pad order, shift-mask
  value, window choice) the model follows; the rules are the table `swinv2_fast.windows.SEMANTICS`. Models
  converted from timm or the official checkpoints carry "timm" so that they keep their own numbers.
- `attn_implementation`: which window-attention implementation the model runs: "auto" (fused Triton kernel
  on CUDA, eager elsewhere), "triton" or "eager"; see `swinv2_fast.functional`. Saved under the key
  `swinv2_fast_attn_implementation` (transformers reads `attn_implementation` as its own setting).
- `cpu_onednn_linear` and `cpu_inference_chunk_bytes`: the two CPU-only optimisations of inference, each
  on by default (see `swinv2_fast.modeling`); same math either way. Written only when set off the default.

As in transformers, a config accepts any structure at construction; whether the structure can be built
(heads dividing channels, one entry per stage, window >= 1) is checked by `validate()`, which the models
call when they are constructed. config.json carries `model_type` "swinv2" (transformers' models read it),
or "swinv2_fast" when saved with `save_pretrained(..., as_swinv2_fast=True)`, which transformers' Auto
classes map to swinv2_fast's classes after `swinv2_fast.register_auto_classes()`.
"""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Union

from .windows import SEMANTICS

if TYPE_CHECKING:
    import torch

__all__ = ["ATTN_IMPLEMENTATIONS", "DEFAULT_CPU_INFERENCE_CHUNK_BYTES", "WINDOW_SEMANTICS", "Swinv2Config"]

# the names `window_semantics` accepts: the keys of the semantics table
WINDOW_SEMANTICS = tuple(SEMANTICS)
# model_type values a config.json may carry: transformers' own, and the one that transformers' Auto classes map
# to swinv2_fast's classes (swinv2_fast.register_auto_classes)
MODEL_TYPES = ("swinv2", "swinv2_fast")
ATTN_IMPLEMENTATIONS = ("auto", "triton", "eager")
# Size of the pieces CPU inference runs a block in (Swinv2Layer._forward_in_pieces) when
# config.cpu_inference_chunk_bytes is left at its default: a piece's largest intermediate stays in cache; more
# pieces mean more parallel regions, which cost more on oversubscribed cores (docs/benchmarks.md, "CPU switches",
# gives the measurements).
DEFAULT_CPU_INFERENCE_CHUNK_BYTES = 8 << 20

CONFIG_NAME = "config.json"


def _as_pair(value, name):
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _json_default(value):
    """JSON form of values config.json may be given: dtypes as transformers writes them ("bfloat16")."""
    try:
        import torch

        if isinstance(value, torch.dtype):
            return str(value).replace("torch.", "")
    except ImportError:
        pass
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON serializable")


def transformers_class(name: str):
    """transformers' class `name` (e.g. "PreTrainedConfig") when transformers imports and
    SWINV2_FAST_NO_TRANSFORMERS is unset, else None: the one rule for the config's base here and the models'
    base (`swinv2_fast.modeling`)."""
    if os.environ.get("SWINV2_FAST_NO_TRANSFORMERS", "") not in ("", "0"):
        return None
    try:
        import transformers
    except ImportError:
        return None
    return getattr(transformers, name, None)


_ConfigBase = transformers_class("PreTrainedConfig") or object

# PreTrainedConfig's common settings that Swin V2 does not read but keeps, as real attributes (class defaults
# below), so that a config.json round trip is lossless and transformers' code reads them where it expects.
_COMMON_SETTINGS = ("transformers_version", "architectures", "dtype", "chunk_size_feed_forward", "is_encoder_decoder")
# keys of to_dict() that are derived, or transformers' own internal state: never constructor arguments
_DERIVED_KEYS = (
    "num_layers",
    "hidden_size",
    "stage_names",
    "_out_features",
    "_out_indices",
    "_attn_implementation",
    "_attn_implementation_internal",
    "_experts_implementation_internal",
    "_commit_hash",
)


def _as_torch_dtype(value):
    """A dtype given by name ("float16", "torch.float16") as the torch.dtype, as transformers stores it."""
    if isinstance(value, str):
        try:
            import torch
        except ImportError:
            return value
        candidate = getattr(torch, value.replace("torch.", ""), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    return value


# (a base chosen at import time, transformers' PreTrainedConfig or object: mypy cannot see it)
class Swinv2Config(_ConfigBase):  # type: ignore[misc, valid-type]
    """Configuration of a Swin Transformer V2 (same fields and defaults as transformers' `Swinv2Config`).

    Args:
        image_size: input resolution the model is built for (window and shift of each stage are chosen
            from it at construction); other sizes are padded at run time.
        patch_size: patch embedding stride.
        num_channels: image channels.
        embed_dim: channels of the first stage; stage i has embed_dim * 2**i.
        depths: blocks per stage.
        num_heads: heads per stage; every stage's channels must divide by its heads.
        window_size: attention window (tokens per side).
        pretrained_window_sizes: per stage, the window the continuous position bias was trained with
            (0: the current window).
        mlp_ratio, qkv_bias, hidden_dropout_prob, attention_probs_dropout_prob, drop_path_rate, hidden_act,
        use_absolute_embeddings, initializer_range, layer_norm_eps, encoder_stride: as in transformers.
        out_features / out_indices: stages returned by `Swinv2Backbone` ("stem", "stage1", ...).
        window_semantics: "transformers" or "timm" (a key of `swinv2_fast.windows.SEMANTICS`), see the module
            docstring.
        attn_implementation: window-attention implementation, one of ATTN_IMPLEMENTATIONS.
        cpu_onednn_linear: fp32 CPU inference runs the linear layers through oneDNN's matmul
            (`swinv2_fast.linear`); False keeps `F.linear` (MKL). Default True.
        cpu_inference_chunk_bytes: CPU inference without autograd runs each block in pieces whose largest
            intermediate is about this many bytes; 0 runs whole blocks. Hooks on modules inside a block
            fire once per piece when > 0. Default DEFAULT_CPU_INFERENCE_CHUNK_BYTES (8 MiB).
        num_labels, id2label, label2id, problem_type: the classification head and its loss, as in transformers.
        output_hidden_states, output_attentions, return_dict: defaults of the forward arguments of those names.

    Raises:
        ValueError: a field of swinv2_fast's own (window_semantics, attn_implementation,
            cpu_inference_chunk_bytes) or out_features / out_indices out of range.
        TypeError: cpu_onednn_linear not a bool, cpu_inference_chunk_bytes not an int. The structure itself is
            checked by `validate()` at model construction.

    With transformers installed this is a `transformers.PreTrainedConfig` subclass (its iteration,
    `to_json_file`, `to_diff_dict`, `get_text_config`, `sub_configs`, ... apply; transformers' code that checks
    `isinstance(config, PreTrainedConfig)` accepts it); without it a plain class with the same fields, defaults,
    JSON form and methods defined here. The common settings of PreTrainedConfig that Swin V2 does not read
    (`architectures`, `dtype`, `chunk_size_feed_forward`, `is_encoder_decoder`, `transformers_version`) are
    kept as given; `dtype` given by name is stored as the torch.dtype and written by name.

    Example:
        >>> config = Swinv2Config(image_size=256, window_size=8, num_labels=10)
        >>> config.hidden_size, config.num_layers
        (768, 4)
    """

    model_type = "swinv2"
    attribute_map: ClassVar[Dict[str, str]] = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}
    # read by transformers' pipeline() (5.17) from model.config; a local directory has no hub commit
    _commit_hash = None
    # defaults of PreTrainedConfig's common settings (_COMMON_SETTINGS); the same values as its own
    if TYPE_CHECKING:  # their types, for the type checker only: on transformers' base an annotation is a field
        transformers_version: Optional[str]
        architectures: Optional[List[str]]
        dtype: Union[str, torch.dtype, None]
    transformers_version = None
    architectures = None
    dtype = None
    chunk_size_feed_forward = 0
    is_encoder_decoder = False
    has_no_defaults_at_init = False
    sub_configs: ClassVar[Dict[str, type]] = {}  # PreTrainedConfig's ClassVar: no nested configs

    def __init__(
        self,
        image_size=224,
        patch_size=4,
        num_channels=3,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        pretrained_window_sizes=(0, 0, 0, 0),
        mlp_ratio=4.0,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.1,
        hidden_act="gelu",
        use_absolute_embeddings=False,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        encoder_stride=32,
        out_features: Optional[List[str]] = None,
        out_indices: Optional[List[int]] = None,
        window_semantics: str = "transformers",
        attn_implementation: str = "auto",
        cpu_onednn_linear: bool = True,
        cpu_inference_chunk_bytes: int = DEFAULT_CPU_INFERENCE_CHUNK_BYTES,
        # Common fields of transformers' PreTrainedConfig that the models read.
        num_labels: Optional[int] = None,
        id2label: Optional[Dict[Any, str]] = None,
        label2id: Optional[Dict[str, int]] = None,
        problem_type: Optional[str] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        **kwargs,
    ):
        # transformers' internal state, read by PreTrainedConfig's properties (output_attentions,
        # _attn_implementation, name_or_path); set first because the setters below read it. transformers'
        # attention setting mirrors ours where the names agree ("eager").
        for internal in _DERIVED_KEYS:
            kwargs.pop(internal, None)
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        # config.json's key for our attention setting (see the module docstring); an explicit argument wins
        saved_implementation = kwargs.pop("swinv2_fast_attn_implementation", None)
        if saved_implementation is not None and attn_implementation == "auto":
            attn_implementation = saved_implementation
        self._attn_implementation_internal = "eager" if attn_implementation == "eager" else None
        self._experts_implementation_internal = None
        self._name_or_path = str(kwargs.pop("name_or_path", kwargs.pop("_name_or_path", "")))
        if "torch_dtype" in kwargs:  # transformers 4's name of dtype
            torch_dtype = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", torch_dtype)
        for name in _COMMON_SETTINGS:
            if name in kwargs:
                value = kwargs.pop(name)
                setattr(self, name, _as_torch_dtype(value) if name == "dtype" else value)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.window_size = window_size
        self.pretrained_window_sizes = list(pretrained_window_sizes)
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.hidden_act = hidden_act
        self.use_absolute_embeddings = use_absolute_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.encoder_stride = encoder_stride
        self.window_semantics = window_semantics
        self.attn_implementation = attn_implementation
        self.cpu_onednn_linear = cpu_onednn_linear
        self.cpu_inference_chunk_bytes = cpu_inference_chunk_bytes
        self.problem_type = problem_type
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.return_dict = return_dict

        if id2label is not None:
            self.id2label = {int(k): v for k, v in id2label.items()}
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        if num_labels is not None and num_labels != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        self.label2id = dict(label2id) if label2id is not None else {v: k for k, v in self.id2label.items()}

        # Keys written by transformers that the models do not read are kept so that a round trip is lossless.
        self._extra = dict(kwargs)

        self._validate_own_fields()
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        self._set_out_features_out_indices(out_features, out_indices)

    # ----------------------------------------------------------------------------------------- derived
    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int):
        if value != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def out_features(self) -> List[str]:
        return self._out_features

    @out_features.setter
    def out_features(self, value):
        self._set_out_features_out_indices(value, None)

    @property
    def out_indices(self) -> List[int]:
        return self._out_indices

    @out_indices.setter
    def out_indices(self, value):
        self._set_out_features_out_indices(None, None if value is None else list(value))

    def __getattr__(self, name):
        # attribute_map aliases and unknown transformers keys kept verbatim.
        if name in Swinv2Config.attribute_map:
            return getattr(self, Swinv2Config.attribute_map[name])
        extra = self.__dict__.get("_extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"'Swinv2Config' object has no attribute '{name}'")

    # ------------------------------------------------------------------------------------- validation
    def _validate_own_fields(self) -> None:
        if self.window_semantics not in WINDOW_SEMANTICS:
            raise ValueError(f"window_semantics must be one of {WINDOW_SEMANTICS}, got {self.window_semantics!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        if not isinstance(self.cpu_onednn_linear, bool):
            raise TypeError(f"cpu_onednn_linear must be a bool, got {self.cpu_onednn_linear!r}")
        chunk = self.cpu_inference_chunk_bytes
        if isinstance(chunk, bool) or not isinstance(chunk, int):
            raise TypeError(f"cpu_inference_chunk_bytes must be an int (bytes; 0 for whole blocks), got {chunk!r}")
        if chunk < 0:
            raise ValueError(f"cpu_inference_chunk_bytes must be >= 0 (0 for whole blocks), got {chunk}")

    def validate(self) -> None:
        """Raise ValueError naming the field for any setting a model cannot be built from (called by the
        models at construction; a config itself accepts what transformers' config accepts)."""
        if not self.depths:
            raise ValueError("depths must name at least one stage, got []")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(
                f"num_heads must have one entry per stage ({len(self.depths)} stages from depths={self.depths}), "
                f"got {self.num_heads}"
            )
        if len(self.pretrained_window_sizes) < len(self.depths):
            raise ValueError(
                f"pretrained_window_sizes must have an entry for each of the {len(self.depths)} stages, "
                f"got {self.pretrained_window_sizes}"
            )
        if not isinstance(self.window_size, int) or isinstance(self.window_size, bool) or self.window_size < 1:
            raise ValueError(f"window_size must be an int >= 1, got {self.window_size!r}")
        if any(int(p) < 0 for p in self.pretrained_window_sizes):
            raise ValueError(f"pretrained_window_sizes must be >= 0, got {self.pretrained_window_sizes}")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be >= 1 per stage, got {self.depths}")
        for i, heads in enumerate(self.num_heads):
            dim = int(self.embed_dim * 2**i)
            if heads < 1 or dim % heads != 0:
                raise ValueError(
                    f"embed_dim * 2**stage must divide by num_heads[stage]: stage {i} has {dim} channels "
                    f"(embed_dim={self.embed_dim}) and num_heads[{i}]={heads}"
                )
        ph, pw = _as_pair(self.patch_size, "patch_size")
        if ph < 1 or pw < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size!r}")
        ih, iw = _as_pair(self.image_size, "image_size")
        if ih < 1 or iw < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size!r}")
        self._validate_own_fields()

    def _set_out_features_out_indices(self, out_features, out_indices) -> None:
        names = self.stage_names
        if out_features is not None:
            if not isinstance(out_features, list) or any(f not in names for f in out_features):
                raise ValueError(f"out_features must be a list of stage names from {names}, got {out_features!r}")
            if out_features != [n for n in names if n in out_features]:
                raise ValueError(f"out_features must be in stage order {names} without duplicates, got {out_features}")
        if out_indices is not None:
            if not isinstance(out_indices, (list, tuple)):
                raise ValueError(f"out_indices must be a list of ints, got {out_indices!r}")
            if any(not -len(names) <= i < len(names) for i in out_indices):
                raise ValueError(f"out_indices must index stage_names {names}, got {list(out_indices)}")
            positive = [i % len(names) for i in out_indices]
            if positive != sorted(set(positive)):
                raise ValueError(f"out_indices must be increasing without duplicates, got {list(out_indices)}")
        if out_features is None and out_indices is None:
            out_features, out_indices = [names[-1]], [len(names) - 1]
        elif out_indices is None:
            out_indices = [names.index(f) for f in out_features]
        elif out_features is None:
            out_features = [names[i] for i in out_indices]
        elif out_features != [names[i] for i in out_indices]:
            raise ValueError(f"out_features {out_features} and out_indices {list(out_indices)} name different stages")
        self._out_features, self._out_indices = list(out_features), list(out_indices)

    # ------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        out = dict(self._extra)
        for key, value in self.__dict__.items():
            if key.startswith("_") or key == "stage_names":
                continue
            out[key] = copy.deepcopy(value)
        out["output_attentions"] = bool(self.output_attentions)
        if out.get("dtype") is not None and not isinstance(out["dtype"], str):
            out["dtype"] = str(out["dtype"]).replace("torch.", "")
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["out_features"] = list(self._out_features)
        out["out_indices"] = list(self._out_indices)
        out["model_type"] = self.model_type
        out["num_layers"] = self.num_layers
        out["hidden_size"] = self.hidden_size
        # swinv2_fast's own fields only where they change behaviour, so transformers sees its own config.
        if self.window_semantics == "transformers":
            out.pop("window_semantics")
        implementation = out.pop("attn_implementation")
        if implementation != "auto":
            out["swinv2_fast_attn_implementation"] = implementation
        if out["cpu_onednn_linear"] is True:
            out.pop("cpu_onednn_linear")
        if out["cpu_inference_chunk_bytes"] == DEFAULT_CPU_INFERENCE_CHUNK_BYTES:
            out.pop("cpu_inference_chunk_bytes")
        return out

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **overrides) -> Swinv2Config:
        data = dict(config_dict)
        # transformers saves both out_features and out_indices; an override of one of them re-derives the
        # other (as transformers' setters do) instead of clashing with the saved value
        for given, derived in (("out_features", "out_indices"), ("out_indices", "out_features")):
            if given in overrides and derived not in overrides:
                data.pop(derived, None)
        data.update(overrides)
        # the saved implementation (swinv2_fast_attn_implementation, read by the constructor) gives way to an
        # override
        if "attn_implementation" in overrides:
            data.pop("swinv2_fast_attn_implementation", None)
        return cls(**data)

    @classmethod
    def from_json_file(cls, json_file) -> Swinv2Config:
        """The config a JSON file written by `to_json_file` or `save_pretrained` describes."""
        with open(json_file, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def to_json_string(self, use_diff: bool = True, *, as_swinv2_fast: bool = False) -> str:
        """config.json's text. `use_diff` is accepted for transformers' signature: the JSON form is always
        the full one (to_dict), which both transformers and swinv2_fast read."""
        data = self.to_dict()
        if as_swinv2_fast:
            data["model_type"] = "swinv2_fast"
        return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"

    def save_pretrained(self, directory: str, as_swinv2_fast: bool = False, **kwargs) -> None:
        """Write config.json into `directory`: model_type "swinv2" (transformers' classes read it), or
        "swinv2_fast" with `as_swinv2_fast=True` (read by transformers' Auto classes after
        `swinv2_fast.register_auto_classes()`). Other keyword arguments of transformers' method
        (push_to_hub, token, ...) are refused: swinv2_fast writes local directories only."""
        if kwargs.pop("push_to_hub", False):
            raise NotImplementedError(
                "Swinv2Config.save_pretrained(push_to_hub=True): swinv2_fast writes local "
                "directories only; upload the directory with huggingface_hub"
            )
        if kwargs:
            raise TypeError(f"Swinv2Config.save_pretrained got unexpected keyword arguments {sorted(kwargs)}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string(as_swinv2_fast=as_swinv2_fast))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        revision: Optional[str] = None,
        cache_dir: Optional[str] = None,
        subfolder: str = "",
        **overrides,
    ) -> Swinv2Config:
        """Read config.json from a directory (or a config.json path, or a hub id found in huggingface_hub's
        local cache, see `swinv2_fast.weights.resolve_pretrained_directory`); keyword arguments override
        fields (e.g. num_labels=10)."""
        name = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(name):
            path = name
        else:
            from .weights import resolve_pretrained_directory

            directory = resolve_pretrained_directory(name, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
            path = os.path.join(directory, CONFIG_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), **overrides)

    @classmethod
    def from_transformers(cls, hf_config) -> Swinv2Config:
        """The same configuration from a transformers `Swinv2Config` object (model_type "swinv2" or
        "swinv2_fast"). The models accept such a config directly and call this."""
        to_dict = getattr(hf_config, "to_dict", None)
        if to_dict is None:
            raise TypeError(f"from_transformers expects a transformers Swinv2Config, got {type(hf_config).__name__}")
        return cls.from_dict(to_dict())

    def to_json_file(self, json_file_path, use_diff: bool = True) -> None:
        """Write `to_json_string()` to `json_file_path`."""
        with open(json_file_path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string(use_diff=use_diff))

    def copy(self) -> Swinv2Config:
        return Swinv2Config.from_dict(self.to_dict())

    def __eq__(self, other) -> bool:
        return isinstance(other, Swinv2Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Swinv2Config {self.to_json_string()}"
