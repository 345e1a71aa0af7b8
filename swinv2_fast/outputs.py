"""Output containers with the field names, order and tuple behaviour of transformers' Swinv2 outputs."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch
import torch.utils._pytree as pytree

__all__ = [
    "BackboneOutput",
    "ModelOutput",
    "Swinv2EncoderOutput",
    "Swinv2ImageClassifierOutput",
    "Swinv2MaskedImageModelingOutput",
    "Swinv2ModelOutput",
]


def _flatten(output):
    names = [f.name for f in fields(output)]
    return [getattr(output, name) for name in names], names


def _unflatten(cls, values, names):
    return cls(**dict(zip(names, values)))


@dataclass
class ModelOutput:
    """Attribute, key and index access; fields that are None are left out of keys and tuples.

    Every subclass is a pytree node (its fields, None included, in order), so that torch.export and
    torch.compile(fullgraph=True) can return it, as they can transformers' outputs."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            _flatten,
            functools.partial(_unflatten, cls),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class Swinv2EncoderOutput(ModelOutput):
    """The encoder's output: last_hidden_state (batch, tokens, channels) of the last stage; hidden_states and
    reshaped_hidden_states (token layout and NCHW) after the embedding and every stage; attentions, one per
    stage (the last block's probabilities, (batch * windows, heads, N, N)). Unrequested fields are None."""

    last_hidden_state: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    reshaped_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class Swinv2ModelOutput(ModelOutput):
    """`Swinv2Model`'s output: last_hidden_state (batch, tokens, hidden_size) after the final LayerNorm,
    pooler_output (batch, hidden_size), and the encoder's hidden_states / attentions /
    reshaped_hidden_states when requested (None otherwise)."""

    last_hidden_state: Optional[torch.Tensor] = None
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    reshaped_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class Swinv2ImageClassifierOutput(ModelOutput):
    """`Swinv2ForImageClassification`'s output: loss (when labels are given), logits (batch, num_labels),
    and hidden_states / attentions / reshaped_hidden_states when requested."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    reshaped_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class Swinv2MaskedImageModelingOutput(ModelOutput):
    """`Swinv2ForMaskedImageModeling`'s output: loss (L1 over masked pixels, when bool_masked_pos is given),
    reconstruction (batch, num_channels, height, width), and hidden_states / attentions /
    reshaped_hidden_states when requested."""

    loss: Optional[torch.Tensor] = None
    reconstruction: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    reshaped_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class BackboneOutput(ModelOutput):
    """`Swinv2Backbone`'s output: feature_maps, one NCHW map per out_features stage, and hidden_states /
    attentions when requested."""

    feature_maps: Optional[Tuple[torch.Tensor, ...]] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
