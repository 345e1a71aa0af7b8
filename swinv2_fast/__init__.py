"""swinv2_fast: Swin Transformer V2 with a fused window-attention step.

Drop-in counterparts of transformers' Swinv2 classes (same config, module names, state-dict keys,
forward arguments and outputs), converters from timm and the official checkpoints, and the
window-attention op with its eager reference.

When transformers imports, the model classes are `transformers.PreTrainedModel` subclasses (the Trainer,
PEFT and accelerate recognise them; see `swinv2_fast.modeling`) and `Swinv2Config` is a
`transformers.PreTrainedConfig` subclass; the package imports and runs without transformers (or with
SWINV2_FAST_NO_TRANSFORMERS=1), with `nn.Module` and a plain class as their bases. Importing registers
nothing with transformers: `register_auto_classes()` does, on request.
"""

from .configuration import Swinv2Config
from .convert import from_official, from_timm, official_config_to_swinv2_config
from .functional import window_attention
from .kernels import window_attention_reference
from .modeling import (
    Swinv2Backbone,
    Swinv2FastConfig,
    Swinv2ForImageClassification,
    Swinv2ForMaskedImageModeling,
    Swinv2Model,
    Swinv2PreTrainedModel,
    register_auto_classes,
)
from .patch import is_patched, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "Swinv2Backbone",
    "Swinv2Config",
    "Swinv2FastConfig",
    "Swinv2ForImageClassification",
    "Swinv2ForMaskedImageModeling",
    "Swinv2Model",
    "Swinv2PreTrainedModel",
    "from_official",
    "from_timm",
    "is_patched",
    "official_config_to_swinv2_config",
    "patch",
    "register_auto_classes",
    "unpatch",
    "window_attention",
    "window_attention_reference",
]
