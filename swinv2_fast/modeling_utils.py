"""What the Swin V2 models share as pretrained models, transformers' `modeling_utils` for them: the choice of
base class, loading (`from_pretrained`, with its hub options, dtype and device_map), saving
(`save_pretrained`), gradient checkpointing, the accessors transformers' tools read, and the registration
with transformers' Auto classes.

`PreTrainedMixin` holds the methods; `swinv2_fast.modeling.Swinv2PreTrainedModel` inherits it before
`_ModelBase` (transformers' `PreTrainedModel` when transformers imports, else `nn.Module`), so these
methods are the ones that run on either base. The checkpoint files themselves (formats, key renames,
the state-dict check) are `swinv2_fast.weights`.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .configuration import _COMMON_SETTINGS, MODEL_TYPES, Swinv2Config, transformers_class

__all__ = ["PreTrainedMixin", "Swinv2FastConfig", "register_auto_classes"]


def _transformers_base():
    """transformers' PreTrainedModel when transformers imports and SWINV2_FAST_NO_TRANSFORMERS is unset, else None
    (see `_ModelBase` below)."""
    return transformers_class("PreTrainedModel")


class _GradientCheckpointingLayer(nn.Module):
    """A layer whose calls are recomputed in the backward while `gradient_checkpointing` is set and the layer
    is training: the call goes through `_gradient_checkpointing_func` (a `torch.utils.checkpoint.checkpoint`
    partial, set by `Swinv2PreTrainedModel.gradient_checkpointing_enable`) with the positional arguments as
    the checkpoint's inputs. The stand-in for transformers' `GradientCheckpointingLayer` (same contract)
    when transformers is not the base."""

    gradient_checkpointing = False

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
        return super().__call__(*args, **kwargs)


def _checkpointing_layer_base():
    """transformers' GradientCheckpointingLayer when the models are transformers models (its Swinv2Stage is
    one, and transformers' tools find checkpointed layers by that class), `_GradientCheckpointingLayer`
    otherwise."""
    if _transformers_base() is None:
        return _GradientCheckpointingLayer
    from transformers.modeling_layers import GradientCheckpointingLayer

    return GradientCheckpointingLayer


# When transformers imports, the models are real `transformers.PreTrainedModel` subclasses, because
# the Trainer (`Trainer.save_model` / checkpoints write config.json only for `isinstance(model,
# PreTrainedModel)`), PEFT and accelerate recognise a transformers model by its class, not by its methods.
# Everything that touches loading, saving, configs and checkpointing is swinv2_fast's own (`PreTrainedMixin`,
# first in the models' bases, overrides the base's), so both bases behave the same; without transformers (or
# with SWINV2_FAST_NO_TRANSFORMERS=1 in the environment) the base is `nn.Module` and the package runs
# unchanged, minus push_to_hub.
_TransformersPreTrainedModel = _transformers_base()
_ModelBase = nn.Module if _TransformersPreTrainedModel is None else _TransformersPreTrainedModel

# from_pretrained keywords that only steer transformers' downloads: a local directory (or a snapshot in the
# local hub cache) makes them meaningless, so they are accepted and dropped (never written into config.json)
_HUB_OPTIONS = frozenset(
    {
        "revision",
        "cache_dir",
        "local_files_only",
        "trust_remote_code",
        "force_download",
        "proxies",
        "token",
        "use_auth_token",
        "resume_download",
        "low_cpu_mem_usage",
        "code_revision",
        "_commit_hash",
        "_from_auto",
        "_from_pipeline",
        "user_agent",
        "weights_only",
        "mirror",
        "offload_state_dict",
    }
)
# transformers options that swinv2_fast does not implement: refused by name rather than ignored
_UNSUPPORTED_OPTIONS = {
    "quantization_config": "quantized loading",
    "max_memory": "device maps over several devices",
    "offload_folder": "offloading weights to disk",
    "offload_buffers": "offloading buffers",
    "tp_plan": "tensor parallelism",
    "tp_size": "tensor parallelism",
    "device_mesh": "tensor parallelism",
    "gguf_file": "GGUF checkpoints",
    "from_tf": "TensorFlow checkpoints",
    "from_flax": "Flax checkpoints",
    "use_kernels": "hub kernels",
    "key_mapping": "key_mapping (q_proj/k_proj/v_proj/o_proj keys are mapped already)",
    "generation_config": "generation",
}


def _as_swinv2_config(config) -> Swinv2Config:
    """Our config from ours or from a transformers Swinv2Config (model_type "swinv2" or "swinv2_fast")."""
    if isinstance(config, Swinv2Config):
        return config
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_TYPES and callable(getattr(config, "to_dict", None)):
        return Swinv2Config.from_transformers(config)
    raise TypeError(
        "config must be a swinv2_fast.Swinv2Config or a transformers Swinv2Config (converted with "
        f"swinv2_fast.Swinv2Config.from_transformers), got {type(config).__name__}"
        + (f" with model_type {model_type!r}" if model_type is not None else "")
    )


def _resolve_dtype(dtype, config: Swinv2Config) -> Optional[torch.dtype]:
    """from_pretrained's dtype: None or "auto" -> the dtype config.json records (transformers 5's default,
    fp32 if none is recorded); a torch.dtype or its name ("bfloat16", "torch.float16") -> that dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return _config_dtype(config)
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(candidate, torch.dtype):
            dtype = candidate
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, its name (e.g. 'bfloat16') or 'auto', got {dtype!r}")
    return dtype


def _resolve_device_map(device_map) -> Optional[torch.device]:
    """from_pretrained's device_map as the one device the whole model goes to (None: stay on the CPU).

    Accepted: a device (torch.device, "cuda", "cuda:1", "cpu", "mps", an int CUDA index), "auto" (the first
    accelerator if there is one, else the CPU), or a dict mapping every module to one device ({"": "cuda:0"}).
    A map over several devices raises: the model is small enough for one device."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(torch.device(f"cuda:{d}" if isinstance(d, int) else d)) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map over several devices ({sorted(devices)}) is not supported by swinv2_fast: pass one "
                "device (e.g. device_map='cuda:0' or {'': 'cuda:0'}) or 'auto'"
            )
        device_map = devices.pop()
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device_map must be a device, 'auto' or {{'': device}}, got {device_map!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} asks for a CUDA device, but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _config_dtype(config) -> Optional[torch.dtype]:
    """The floating dtype config.json records ("dtype", or "torch_dtype" before transformers 5), if any."""
    name = getattr(config, "dtype", None)
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, str):
        candidate = getattr(torch, name.replace("torch.", ""), None)
        if isinstance(candidate, torch.dtype) and candidate.is_floating_point:
            return candidate
    return None


def _offloaded_checkpoint(checkpoint, function, *args, **kwargs):
    """`checkpoint(function, *args)` keeping the tensors saved for the recompute in host memory (pinned with
    CUDA): gradient_checkpointing_enable(offload=True)."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, **kwargs)


_CheckpointingLayer = _checkpointing_layer_base()

if TYPE_CHECKING:
    # the mixin only ever runs as part of a model, whose base (`_ModelBase`) is an nn.Module: its methods
    # call nn.Module's (modules, parameters, to, eval)
    _MixinBase = nn.Module
else:
    _MixinBase = object


class PreTrainedMixin(_MixinBase):
    """Loading, saving, gradient checkpointing and the accessors of a Swin V2 model (see the module docstring).

    The model class lists it before its base: `class Swinv2PreTrainedModel(PreTrainedMixin, _ModelBase)`.
    The constructor takes a `swinv2_fast.Swinv2Config` or a transformers `Swinv2Config` and checks that the
    structure can be built (`Swinv2Config.validate`); the class supplies `_init_weights`.
    """

    if TYPE_CHECKING:  # declared for the type checker only: transformers' get_type_hints reads annotations
        base_model_prefix: str  # the model class's
        hf_device_map: Dict[str, str]  # set by from_pretrained(device_map=...), as transformers does
        push_to_hub: Callable[..., Any]  # transformers' PreTrainedModel's, when it is the base

    def __init__(self, config: Swinv2Config):
        # nn.Module's constructor, not transformers': that one requires its own config class and checks
        # transformers' attention implementations; the attributes its methods read are set here.
        nn.Module.__init__(self)
        config = _as_swinv2_config(config)
        config.validate()
        self.config = config
        self.name_or_path = ""

    def post_init(self):
        """Initialise the weights (`_init_weights` on every module), as transformers' post_init does, and
        honour `config.gradient_checkpointing = True` set before construction (transformers' older switch):
        checkpointing is enabled and the attribute removed from the config, so that it is not saved."""
        self.apply(self._init_weights)
        if getattr(self.config, "gradient_checkpointing", False):
            self.gradient_checkpointing_enable()
            self.config.__dict__.pop("gradient_checkpointing", None)
            self.config.__dict__.get("_extra", {}).pop("gradient_checkpointing", None)
        # what transformers' methods (PEFT, accelerate, the Trainer) read on a PreTrainedModel
        self.all_tied_weights_keys = {}
        self._keep_in_fp32_modules = set()
        self._keep_in_fp32_modules_strict = set()

    def init_weights(self):
        """Re-initialise every weight (transformers' name for post_init's initialisation)."""
        self.apply(self._init_weights)

    # ------------------------------------------------------------------------- gradient checkpointing
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """Recompute stages in the backward instead of keeping their activations (training only).

        Args:
            gradient_checkpointing_kwargs: arguments of `torch.utils.checkpoint.checkpoint` (default
                `{"use_reentrant": False}`, as in transformers).
            every_n_layers: checkpoint stages 0, n, 2n, ... only (transformers 5's argument; 1: all stages).
            offload: keep the activations saved for the recompute in (pinned, with CUDA) host memory.

        Accepts what transformers' Trainer passes (`TrainingArguments(gradient_checkpointing=True,
        gradient_checkpointing_kwargs=...)`, which may carry every_n_layers and offload).
        """
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        if not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError(
                "gradient_checkpointing_kwargs must be a dict of torch.utils.checkpoint.checkpoint "
                f"arguments, got {type(gradient_checkpointing_kwargs).__name__}"
            )
        gradient_checkpointing_kwargs = dict(gradient_checkpointing_kwargs)
        # the Trainer of some versions leaves these two in the dict
        every_n_layers = gradient_checkpointing_kwargs.pop("every_n_layers", every_n_layers)
        offload = gradient_checkpointing_kwargs.pop("offload", offload)
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be an int >= 1, got {every_n_layers!r}")
        if not isinstance(offload, bool):
            raise TypeError(f"offload must be a bool, got {type(offload).__name__}")
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, **gradient_checkpointing_kwargs)
        function = functools.partial(_offloaded_checkpoint, checkpoint) if offload else checkpoint
        self._set_checkpointing(True, function, every_n_layers)
        if getattr(self, "_hf_peft_config_loaded", False):
            self.enable_input_require_grads()

    def _set_checkpointing(self, enable: bool, function=None, every_n_layers: int = 1) -> None:
        """Set `gradient_checkpointing` on every module that has the flag, as transformers does: the
        checkpointing layers (the stages) 0, n, 2n, ... when enabling, every other flag to `enable`."""
        stage_index = 0
        # Any: the flags are set by attribute on whichever layer classes have them (ours, transformers')
        module: Any
        for module in self.modules():
            if not hasattr(module, "gradient_checkpointing"):
                continue
            if function is not None:
                module._gradient_checkpointing_func = function
            if enable and isinstance(module, _CheckpointingLayer):
                module.gradient_checkpointing = stage_index % every_n_layers == 0
                stage_index += 1
            else:
                module.gradient_checkpointing = enable

    def gradient_checkpointing_disable(self):
        """Keep all activations again (the default)."""
        self._set_checkpointing(False)
        if getattr(self, "_hf_peft_config_loaded", False):
            self.disable_input_require_grads()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    # -------------------------------------------------------------------------------- accessors
    def get_output_embeddings(self):
        """None: a vision model has no output embedding (what transformers' Swinv2 returns)."""
        return None

    def enable_input_require_grads(self):
        """Make the patch embedding's output require gradients, as transformers' method of this name does:
        with a frozen embedding, reentrant checkpointing and adapters (PEFT) still get gradients."""

        def require_grads(module, args, output):
            (output[0] if isinstance(output, tuple) else output).requires_grad_(True)

        self.disable_input_require_grads()
        self._input_require_grads_hook = self.get_input_embeddings().register_forward_hook(require_grads)

    def disable_input_require_grads(self):
        """Remove the hook `enable_input_require_grads` added."""
        handle = self.__dict__.pop("_input_require_grads_hook", None)
        if handle is not None:
            handle.remove()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (only those requiring gradients with `only_trainable`); as in transformers,
        `exclude_embeddings` leaves out nn.Embedding weights, of which a Swin V2 model has none."""
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for p in self.parameters()
            if (p.requires_grad or not only_trainable) and not (exclude_embeddings and id(p) in embedding_weights)
        )

    def clear_caches(self):
        """Does nothing: the models keep no caches (the position bias and the q/k/v weight are computed in
        every forward). It exists so that code which calls it runs unchanged."""

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters."""
        return next(self.parameters()).dtype

    # -------------------------------------------------------------------------------- save / load
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        config=None,
        strict: bool = False,
        state_dict=None,
        dtype=None,
        torch_dtype=None,
        device_map=None,
        ignore_mismatched_sizes: bool = False,
        output_loading_info: bool = False,
        subfolder: str = "",
        use_safetensors=None,
        variant: Optional[str] = None,
        attn_implementation: Optional[str] = None,
        adapter_kwargs=None,
        **kwargs,
    ):
        """Load a directory written by transformers' (or our) `save_pretrained`, in eval mode.

        Reads config.json and model.safetensors / pytorch_model.bin (also sharded), in the released key
        layout (query/key/value) or the renamed one (q_proj/k_proj/v_proj/o_proj). As in transformers, missing
        and unexpected keys are reported as warnings (weights missing from the checkpoint keep their
        initialisation) and listed in the loading info; a weight whose shape differs from the checkpoint's
        raises RuntimeError unless ignore_mismatched_sizes=True. The report goes to transformers'
        `transformers.modeling_utils` logger when the models are transformers models (so that
        `transformers.logging`'s verbosity governs it as it governs transformers' own report), to the
        `swinv2_fast` logger otherwise. Called inside `with torch.device("meta")` it raises RuntimeError, as
        transformers does: the weights would be placeholders.

        Args:
            pretrained_model_name_or_path: the directory, or a hub id whose snapshot is in huggingface_hub's
                local cache (nothing is downloaded; anything else raises FileNotFoundError); None with
                `config` and `state_dict`.
            config: a swinv2_fast or transformers Swinv2Config to use instead of config.json.
            state_dict: the weights to load instead of the directory's files (transformers' argument).
            dtype / torch_dtype: a floating torch.dtype, its name, or "auto" (default, as in transformers 5:
                the dtype config.json records, else float32). Every parameter and buffer is cast to it.
            device_map: one device for the whole model ("cuda", "cuda:1", torch.device, int), "auto" (the
                first accelerator, else the CPU) or {"": device}; maps over several devices raise.
            ignore_mismatched_sizes: leave weights whose shape differs from the checkpoint's (e.g. a new
                classifier for another num_labels) at their initialisation, with a warning.
            strict: True raises ValueError on any missing, unexpected or mis-shaped key (except task heads of
                another class of the family, which warn), listing them.
            output_loading_info: also return transformers' loading info: {"missing_keys": set,
                "unexpected_keys": set, "mismatched_keys": set of (key, checkpoint shape, model shape),
                "error_msgs": list}.
            subfolder, use_safetensors, variant: where the files are, as in transformers.
            attn_implementation: swinv2_fast's window attention ("auto", "triton", "eager").
            revision, cache_dir, local_files_only, trust_remote_code, low_cpu_mem_usage, force_download,
                proxies, token: accepted for transformers compatibility (revision and cache_dir select a
                cached hub snapshot); never written into the config.
            **kwargs: config fields to override (e.g. num_labels=10, out_features=["stage2"]). Other
                keywords raise TypeError; transformers options swinv2_fast lacks (quantization_config,
                tp_plan, ...) raise NotImplementedError.

        Returns:
            The model (and the loading info with output_loading_info=True).

        Example:
            >>> model = Swinv2ForImageClassification.from_pretrained("out/", dtype=torch.bfloat16, num_labels=10,
            ...                                                      ignore_mismatched_sizes=True)
        """
        from .weights import load_model_weights, load_state_dict_checked, resolve_pretrained_directory

        if torch.empty(0).device.type == "meta":
            raise RuntimeError(
                f"{cls.__name__}.from_pretrained: You are using `from_pretrained` with a meta device context manager "
                "or `torch.set_default_device('meta')`, under which the loaded weights would be placeholders. Build "
                "the model on the meta device with the class itself (e.g. for its structure), or call "
                "from_pretrained outside the context and pass device_map for the device."
            )
        if model_args:
            raise TypeError(
                f"{cls.__name__}.from_pretrained takes no positional model arguments, got {len(model_args)}"
            )
        for option, what in _UNSUPPORTED_OPTIONS.items():
            if kwargs.get(option) is not None:
                raise NotImplementedError(f"from_pretrained({option}=...): {what} is not supported by swinv2_fast")
            kwargs.pop(option, None)
        if adapter_kwargs and adapter_kwargs.get("_adapter_model_path"):
            raise NotImplementedError(
                "from_pretrained on a PEFT adapter directory: load the base model with "
                "swinv2_fast, then peft.PeftModel.from_pretrained(model, adapter_directory)"
            )
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(
                    f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass dtype only "
                    "(torch_dtype is its older name)"
                )
            dtype = torch_dtype
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_OPTIONS}
        if pretrained_model_name_or_path is None:
            if config is None or state_dict is None:
                raise ValueError(
                    f"{cls.__name__}.from_pretrained(None, ...) needs both config= and state_dict= (got "
                    f"config={'given' if config is not None else None}, "
                    f"state_dict={'given' if state_dict is not None else None}); otherwise pass a directory"
                )
            directory = None
        else:
            directory = resolve_pretrained_directory(
                pretrained_model_name_or_path,
                subfolder=subfolder,
                revision=hub.get("revision"),
                cache_dir=hub.get("cache_dir"),
            )
        overrides = dict(kwargs)
        if attn_implementation is not None:
            overrides["attn_implementation"] = attn_implementation
        # as in transformers, keywords of the class's constructor (Swinv2Model's add_pooling_layer,
        # use_mask_token) go to the constructor, the others to the config
        init_parameters = set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
        model_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in init_parameters}
        known = _config_fields()
        if config is None:
            config = Swinv2Config.from_pretrained(directory)
        else:
            config = _as_swinv2_config(config)
        stray = sorted(k for k in overrides if k not in known and k not in config._extra)
        if stray:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got unexpected keyword arguments {stray}: neither "
                "Swinv2Config fields nor loading options"
            )
        if overrides:
            config = Swinv2Config.from_dict(config.to_dict(), **overrides)
        else:
            config = config.copy()
        dtype = _resolve_dtype(dtype, config)
        device = _resolve_device_map(device_map)

        model = cls(config, **model_kwargs)
        report = _loading_report_logger()
        if state_dict is not None:
            info = load_state_dict_checked(
                model, state_dict, strict=strict, ignore_mismatched_sizes=ignore_mismatched_sizes, report_logger=report
            )
        else:
            assert directory is not None  # without a name or path, state_dict= is required (checked above)
            info = load_model_weights(
                model,
                directory,
                strict=strict,
                ignore_mismatched_sizes=ignore_mismatched_sizes,
                use_safetensors=use_safetensors,
                variant=variant,
                report_logger=report,
            )
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        if device_map is not None:
            model.hf_device_map = {"": str(model.device)}
        model.name_or_path = "" if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
        model.eval()
        return (model, info) if output_loading_info else model

    @classmethod
    def _from_config(cls, config, dtype=None, torch_dtype=None, attn_implementation=None, **kwargs):
        """A randomly initialised model from a config (what transformers' `AutoModel*.from_config` calls)."""
        if attn_implementation is not None:
            config = Swinv2Config.from_dict(
                _as_swinv2_config(config).to_dict(), attn_implementation=attn_implementation
            )
        model = cls(config, **kwargs)
        dtype = dtype if dtype is not None else torch_dtype
        return model if dtype is None else model.to(_resolve_dtype(dtype, model.config))

    @classmethod
    def from_config(cls, config, **kwargs):
        """A randomly initialised model from a swinv2_fast or transformers Swinv2Config."""
        return cls._from_config(config, **kwargs)

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict=None,
        save_function=torch.save,
        push_to_hub: bool = False,
        max_shard_size="50GB",
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        as_swinv2_fast: bool = False,
        **kwargs,
    ):
        """Write config.json and model.safetensors (or pytorch_model.bin) that transformers' `from_pretrained`
        reads, with transformers' arguments (the Trainer's `save_model` calls this).

        Args:
            save_directory: the directory (created if needed).
            is_main_process: False writes nothing (distributed training: one writer).
            state_dict: the tensors to write instead of `self.state_dict()` (what the Trainer passes).
            safe_serialization: safetensors (default) or torch's pickle format through `save_function`.
            max_shard_size: split the weights into shards of at most this size ("5GB", bytes) with an index.
            variant: write model.<variant>.safetensors.
            as_swinv2_fast: write model_type "swinv2_fast", which transformers' Auto classes map to
                swinv2_fast's classes after `swinv2_fast.register_auto_classes()`. The default,
                model_type "swinv2", is read by transformers' Swinv2 classes.
            push_to_hub: upload the directory afterwards (needs transformers and the network; remaining
                keyword arguments such as repo_id, token, private go to `push_to_hub`).
        """
        from .weights import save_model_weights

        kwargs.pop("save_peft_format", None)
        kwargs.pop("save_original_format", None)
        save_model_weights(
            self,
            os.fspath(save_directory),
            safe_serialization=safe_serialization,
            state_dict=state_dict,
            as_swinv2_fast=as_swinv2_fast,
            max_shard_size=max_shard_size,
            variant=variant,
            is_main_process=is_main_process,
            save_function=save_function,
        )
        if push_to_hub:
            if _TransformersPreTrainedModel is None:
                raise NotImplementedError("save_pretrained(push_to_hub=True) needs transformers (its hub upload)")
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            self.push_to_hub(repo_id, **kwargs)
        elif kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(kwargs)}")


def _config_fields():
    """Names a from_pretrained keyword may override: Swinv2Config's arguments, its aliases and the common
    settings of transformers' PreTrainedConfig it keeps."""
    names = set(inspect.signature(Swinv2Config.__init__).parameters) - {"self", "kwargs"}
    return names | set(Swinv2Config.attribute_map) | set(_COMMON_SETTINGS)


def _loading_report_logger():
    """Where from_pretrained's loading report goes: transformers' own report logger when the models are
    transformers models, the package's logger otherwise (see `Swinv2PreTrainedModel.from_pretrained`)."""
    import logging

    from .weights import logger

    if _TransformersPreTrainedModel is None:
        return logger
    return logging.getLogger("transformers.modeling_utils")


# ------------------------------------------------------------------------------------------ Auto classes
if _TransformersPreTrainedModel is not None:
    from transformers import Swinv2Config as _TransformersSwinv2Config

    class Swinv2FastConfig(_TransformersSwinv2Config):
        """transformers' Swinv2Config under model_type "swinv2_fast": what transformers' AutoConfig returns for
        a directory saved with `save_pretrained(..., as_swinv2_fast=True)` once
        `swinv2_fast.register_auto_classes()` has run; swinv2_fast's classes accept it as their config."""

        model_type = "swinv2_fast"
else:
    # the class exists only when transformers imports; None otherwise (mypy sees only the class)
    Swinv2FastConfig = None  # type: ignore[misc, assignment]


def register_auto_classes() -> None:
    """Register swinv2_fast's classes with transformers' Auto classes, under model_type "swinv2_fast".

    After this call, `AutoConfig` / `AutoModel` / `AutoModelForImageClassification` /
    `AutoModelForMaskedImageModeling` / `AutoBackbone` `.from_pretrained(d)` return swinv2_fast's classes
    for a directory saved with `save_pretrained(d, as_swinv2_fast=True)`, and `AutoModel*.from_config` for a
    `Swinv2FastConfig`. Directories with model_type "swinv2" (the default save, and every transformers
    checkpoint) still load as transformers' own classes. Importing swinv2_fast registers nothing; calling
    this again is harmless.
    """
    if _TransformersPreTrainedModel is None:
        raise ImportError(
            "swinv2_fast.register_auto_classes() needs transformers, which is not importable "
            "(or SWINV2_FAST_NO_TRANSFORMERS is set)"
        )
    from transformers import (
        AutoBackbone,
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForMaskedImageModeling,
    )

    from .modeling import Swinv2Backbone, Swinv2ForImageClassification, Swinv2ForMaskedImageModeling, Swinv2Model

    AutoConfig.register("swinv2_fast", Swinv2FastConfig, exist_ok=True)
    pairs = (
        (AutoModel, Swinv2Model),
        (AutoModelForImageClassification, Swinv2ForImageClassification),
        (AutoModelForMaskedImageModeling, Swinv2ForMaskedImageModeling),
        (AutoBackbone, Swinv2Backbone),
    )
    for auto_class, model_class in pairs:
        # the mapping's own register: the Auto class's one insists that model_class.config_class is the
        # registered config class, while ours take swinv2_fast.Swinv2Config and convert transformers' configs
        # (transformers annotates the value as the tokenizer mappings' (slow, fast) pair; a model mapping's is
        # the class, what AutoModel.register itself passes)
        auto_class._model_mapping.register(Swinv2FastConfig, model_class, exist_ok=True)  # type: ignore[arg-type]
