"""Swin Transformer V2 models with the module tree, config, forward arguments and outputs of transformers' Swinv2.

The module and parameter names mirror transformers 5.x exactly, so `load_state_dict(hf_model.state_dict())`
works in both directions. What differs is inside the attention: the window-attention step runs on the
q/k/v projection in token layout through `swinv2_fast.functional.window_attention` (one GEMM for q/k/v,
one gather in, one gather out, PyTorch's fused attention); CPU inference in fp32 runs the linear layers
through oneDNN (`swinv2_fast.linear`) and each block in cache-sized pieces.

State: the models keep nothing derived from their parameters between calls. The continuous position bias
(an MLP over at most (2 * 24 - 1)**2 coordinates per block) and the concatenated q/k/v weight are computed in
every forward, so no optimizer (fused or not), `.data` write, `load_state_dict` or `.to()` can leave a stale
value behind; importing the package registers nothing with torch.

CPU switches (config fields, read where they act; defaults in `Swinv2Config`):

- `config.cpu_onednn_linear` (default True): fp32 CPU inference runs the linear layers through oneDNN's
  matmul (see `swinv2_fast.linear`); False keeps `F.linear`. Same math either way (fp32 rounding).
- `config.cpu_inference_chunk_bytes` (default `DEFAULT_CPU_INFERENCE_CHUNK_BYTES`): CPU inference without
  autograd runs each block on pieces of about this many bytes (`Swinv2Layer.forward`); 0 runs whole blocks.
  In pieces, the modules inside a block are called once per piece, so hooks registered on them fire once
  per piece on pieces of the batch (the MLP on 2-D token rows): set 0 on a model whose hooks must see whole
  blocks, as transformers shows them. The switch alone decides; hooks are never looked at for it.
"""

from __future__ import annotations

import collections.abc
import math
from typing import Any, ClassVar, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import continuous_position_bias, project_qkv_modules, qkv_weight_and_bias
from .configuration import ATTN_IMPLEMENTATIONS, DEFAULT_CPU_INFERENCE_CHUNK_BYTES, Swinv2Config
from .functional import window_attention
from .kernels.geometry import WindowGeometry, known_zero
from .linear import apply_linear, is_plain_linear, linear
from .modeling_utils import (
    PreTrainedMixin,
    Swinv2FastConfig,
    _checkpointing_layer_base,
    _ModelBase,
    _TransformersPreTrainedModel,
    register_auto_classes,
)
from .outputs import (
    BackboneOutput,
    Swinv2EncoderOutput,
    Swinv2ImageClassifierOutput,
    Swinv2MaskedImageModelingOutput,
    Swinv2ModelOutput,
)
from .windows import SEMANTICS, window_and_shift

__all__ = [
    "DEFAULT_CPU_INFERENCE_CHUNK_BYTES",
    "Swinv2Backbone",
    "Swinv2FastConfig",
    "Swinv2ForImageClassification",
    "Swinv2ForMaskedImageModeling",
    "Swinv2Model",
    "Swinv2PreTrainedModel",
    "register_auto_classes",
]


def _gelu(x):
    return F.gelu(x)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# module-level functions, not lambdas: models pickle (torch.save(model), multiprocessing)
_ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _activation(name: str):
    """The activation called `name`: the common ones directly, any other name of transformers' ACT2FN
    through transformers when it is installed."""
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    act2fn: Mapping[str, Any]  # transformers' ACT2FN (a dict that instantiates its classes), or none
    try:
        from transformers.activations import ACT2FN
    except ImportError:
        act2fn = {}
    else:
        act2fn = ACT2FN
    if name in act2fn:
        return act2fn[name]
    raise ValueError(
        f"hidden_act must be one of {sorted(set(_ACTIVATIONS) | set(act2fn))}, got {name!r}"
        + ("" if act2fn else " (install transformers for its other activation names)")
    )


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, collections.abc.Iterable):
        a, b = value
        return int(a), int(b)
    return int(value), int(value)


class Swinv2PatchEmbeddings(nn.Module):
    """(B, C_in, H, W) -> (B, H/p * W/p, embed_dim); inputs not divisible by the patch are padded right/bottom."""

    def __init__(self, config: Swinv2Config):
        super().__init__()
        image_size, patch_size = _pair(config.image_size), _pair(config.patch_size)
        self.patch_size = patch_size
        self.grid_size = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor):
        _, _, height, width = pixel_values.shape
        pad_w = (self.patch_size[1] - width % self.patch_size[1]) % self.patch_size[1]
        pad_h = (self.patch_size[0] - height % self.patch_size[0]) % self.patch_size[0]
        if not known_zero(pad_w, pad_h):  # symbolic sizes: pad unless provably 0, no branch on a traced size
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))  # (maybe by 0)
        embeddings = self.projection(pixel_values)
        output_dimensions = (embeddings.shape[-2], embeddings.shape[-1])  # not tuple(): torch.fx traces this
        return embeddings.flatten(2).transpose(1, 2), output_dimensions


class Swinv2Embeddings(nn.Module):
    """Patch embedding, LayerNorm, optional mask token (SimMIM) and absolute position embedding."""

    def __init__(self, config: Swinv2Config, use_mask_token: bool = False):
        super().__init__()
        self.patch_embeddings = Swinv2PatchEmbeddings(config)
        self.patch_grid = self.patch_embeddings.grid_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim)) if use_mask_token else None
        num_patches = self.patch_embeddings.num_patches
        self.position_embeddings: Optional[nn.Parameter]
        if config.use_absolute_embeddings:
            self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, config.embed_dim))
        else:
            self.position_embeddings = None
        self.norm = nn.LayerNorm(config.embed_dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = config.patch_size

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        position_embeddings = self.position_embeddings
        assert position_embeddings is not None  # called only with absolute embeddings (see forward)
        num_patches = embeddings.shape[1] - 1
        num_positions = position_embeddings.shape[1] - 1
        if num_patches == num_positions and height == width:
            return position_embeddings
        class_pos_embed = position_embeddings[:, :1]
        patch_pos_embed = position_embeddings[:, 1:]
        dim = embeddings.shape[-1]
        ph, pw = _pair(self.patch_size)
        side = int(num_positions**0.5)
        patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos_embed = F.interpolate(
            patch_pos_embed, size=(height // ph, width // pw), mode="bicubic", align_corners=False
        )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
        _, _, height, width = pixel_values.shape
        embeddings, output_dimensions = self.patch_embeddings(pixel_values)
        embeddings = self.norm(embeddings)
        batch_size, seq_len, _ = embeddings.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos was given but this model has no mask token (use_mask_token=False)")
            mask = bool_masked_pos.unsqueeze(-1).type_as(embeddings)
            embeddings = embeddings * (1.0 - mask) + self.mask_token.expand(batch_size, seq_len, -1) * mask
        if self.position_embeddings is not None:
            if interpolate_pos_encoding:
                embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
            else:
                embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings), output_dimensions


class Swinv2SelfAttention(nn.Module):
    """Cosine window attention with the continuous position bias; parameters named as in transformers.

    `forward` takes the block input in token layout (B, H*W, C) with its grid size and returns the
    attention output in token layout, before the output projection.
    """

    # buffers (register_buffer in __init__)
    relative_coords_table: torch.Tensor
    relative_position_index: torch.Tensor

    def __init__(
        self,
        config,
        dim,
        num_heads,
        window_size,
        shift_size=(0, 0),
        pretrained_window_size=(0, 0),
        window_semantics="transformers",
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must divide by num_heads ({num_heads})")
        self.num_attention_heads = num_heads
        self.attention_head_size = dim // num_heads
        self.all_head_size = dim
        self.window_size = _pair(window_size)
        self.shift_size = _pair(shift_size)
        self.pretrained_window_size = _pair(pretrained_window_size)
        rules = SEMANTICS[window_semantics]  # the library's pad order and shift-mask value
        self.pad_order = rules.pad_order
        self.mask_value = rules.mask_value
        self.attn_implementation = config.attn_implementation

        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.continuous_position_bias_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        coords_table, position_index = self.create_coords_table_and_index()
        self.register_buffer("relative_coords_table", coords_table, persistent=False)
        self.register_buffer("relative_position_index", position_index, persistent=False)
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.config = config

    def create_coords_table_and_index(self):
        """Log-spaced relative coordinates (1, 2wh-1, 2ww-1, 2) and the (N, N) relative position index."""
        wh, ww = self.window_size
        table = torch.stack(
            torch.meshgrid(
                torch.arange(-(wh - 1), wh, dtype=torch.float32),
                torch.arange(-(ww - 1), ww, dtype=torch.float32),
                indexing="ij",
            ),
            dim=-1,
        ).unsqueeze(0)
        if self.pretrained_window_size[0] > 0:
            table[..., 0] /= self.pretrained_window_size[0] - 1
            table[..., 1] /= self.pretrained_window_size[1] - 1
        elif wh > 1:
            table[..., 0] /= wh - 1
            table[..., 1] /= ww - 1
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)

        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        index = (relative[..., 0] + wh - 1) * (2 * ww - 1) + (relative[..., 1] + ww - 1)
        return table, index

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) = 16 * sigmoid(cpb_mlp(coords))[index], N = wh * ww, computed on every call
        (`swinv2_fast.attention.continuous_position_bias`, which states the order of its operations)."""
        mlp = self.continuous_position_bias_mlp
        # the MLP's floating dtype; fp32 when it has no floating parameters (dynamically quantized layers)
        dtype = next((p.dtype for p in mlp.parameters() if p.is_floating_point()), torch.float32)
        return continuous_position_bias(
            mlp,
            self.relative_coords_table.to(dtype),
            self.num_attention_heads,
            self.window_size[0] * self.window_size[1],
            index=self.relative_position_index,
        )

    def qkv_parameters(self):
        """The (3C, C) weight and (3C,) bias (None without qkv_bias; k has no bias) of one q/k/v projection,
        concatenated on every call from the three layers' parameters."""
        return qkv_weight_and_bias((self.query, self.key, self.value), bias_when_absent=False)

    def derived_parameters(self):
        """((q/k/v weight, bias) or None, position bias): what one forward computes from the parameters;
        None in place of the weights where the projections are not plain (they are then called as modules).
        `Swinv2Layer._forward_in_pieces` computes this once per block call and passes it to every piece."""
        plain = all(is_plain_linear(m) for m in (self.query, self.key, self.value))
        return (self.qkv_parameters() if plain else None), self.position_bias()

    def window_geometry(self, input_dimensions) -> WindowGeometry:
        """This block's `WindowGeometry` on an (H, W) grid: its window, shift, padding order, mask value and
        heads (fixed at construction) with the grid of this call. Built per call: validating a small frozen
        dataclass costs little next to a block call, and nothing is kept (no state to invalidate, nothing for
        torch.compile to guard on)."""
        return WindowGeometry(
            grid=input_dimensions,
            window=self.window_size,
            shift=self.shift_size,
            pad_order=self.pad_order,
            mask_value=self.mask_value,
            num_heads=self.num_attention_heads,
        )

    def forward(self, hidden_states, input_dimensions, output_attentions=False, derived_parameters=None):
        """(B, H*W, C) tokens of an (H, W) grid -> ((B, H*W, C) attention output before the output
        projection, attention probabilities or None). `derived_parameters`: this call's
        `derived_parameters()`, when the caller has computed them already (pieces of one block call)."""
        qkv_parameters, position_bias = derived_parameters or self.derived_parameters()
        if qkv_parameters is not None:
            weight, bias = qkv_parameters
            qkv = linear(hidden_states, weight, bias, onednn=self.config.cpu_onednn_linear)
        else:  # swapped (LoRA, quantized, parametrized) or hooked projections: called as modules
            qkv, bias = project_qkv_modules(
                hidden_states, (self.query, self.key, self.value), input_dimensions, self.window_size
            )
        result = window_attention(
            qkv,
            bias,
            self.logit_scale,
            position_bias,
            geometry=self.window_geometry(input_dimensions),
            dropout_p=self.dropout.p if self.training else 0.0,
            return_attention_probs=output_attentions,
            implementation=self.attn_implementation,
        )
        return result if output_attentions else (result, None)


class Swinv2SelfOutput(nn.Module):
    def __init__(self, config, dim):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.config = config

    def forward(self, hidden_states):
        return self.dropout(apply_linear(self.dense, hidden_states, onednn=self.config.cpu_onednn_linear))


class Swinv2Attention(nn.Module):
    def __init__(self, config, dim, num_heads, window_size, shift_size, pretrained_window_size, window_semantics):
        super().__init__()
        self.self = Swinv2SelfAttention(
            config, dim, num_heads, window_size, shift_size, pretrained_window_size, window_semantics
        )
        self.output = Swinv2SelfOutput(config, dim)

    def forward(self, hidden_states, input_dimensions, output_attentions=False, derived_parameters=None):
        context, probs = self.self(hidden_states, input_dimensions, output_attentions, derived_parameters)
        return self.output(context), probs


class Swinv2Intermediate(nn.Module):
    def __init__(self, config, dim):
        super().__init__()
        self.dense = nn.Linear(dim, int(config.mlp_ratio * dim))
        if isinstance(config.hidden_act, str):
            self.intermediate_act_fn = _activation(config.hidden_act)
        else:
            self.intermediate_act_fn = config.hidden_act
        # exact GELU can be applied by the GEMM itself (swinv2_fast.linear)
        self._exact_gelu = config.hidden_act == "gelu"
        self.config = config

    def forward(self, hidden_states):
        onednn = self.config.cpu_onednn_linear
        if self._exact_gelu:
            return apply_linear(self.dense, hidden_states, gelu=True, onednn=onednn)
        return self.intermediate_act_fn(apply_linear(self.dense, hidden_states, onednn=onednn))


class Swinv2Output(nn.Module):
    def __init__(self, config, dim):
        super().__init__()
        self.dense = nn.Linear(int(config.mlp_ratio * dim), dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, hidden_states):
        return self.dropout(apply_linear(self.dense, hidden_states, onednn=self.config.cpu_onednn_linear))


class Swinv2DropPath(nn.Module):
    """Stochastic depth per sample (identity when the rate is 0 or outside training)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states):
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        random_tensor = torch.floor(
            torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device) + keep_prob
        )
        return hidden_states.div(keep_prob) * random_tensor

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class Swinv2Layer(nn.Module):
    """One res-post-norm block: x + drop_path(norm1(attn(x))), then x + drop_path(norm2(mlp(x)))."""

    def __init__(
        self, config, dim, input_resolution, num_heads, drop_path_rate=0.0, shift_size=0, pretrained_window_size=0
    ):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        window, shift = window_and_shift(self.input_resolution, config.window_size, shift_size, config.window_semantics)
        self.window_size = window
        self.shift_size = shift
        self.attention = Swinv2Attention(
            config, dim, num_heads, window, shift, _pair(pretrained_window_size), config.window_semantics
        )
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.drop_path = Swinv2DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.intermediate = Swinv2Intermediate(config, dim)
        self.output = Swinv2Output(config, dim)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.config = config

    def forward(self, hidden_states, input_dimensions, output_attentions=False):
        """(B, H*W, C) tokens of an (H, W) grid -> (output,) or (output, attention probabilities).

        CPU inference without autograd (eval mode, `torch.no_grad()` or `torch.inference_mode()`, no
        attention probabilities asked for) runs in pieces when `config.cpu_inference_chunk_bytes` > 0 (see
        `_forward_in_pieces`); everything else runs the block whole. Same math either way.
        """
        chunk_bytes = self.config.cpu_inference_chunk_bytes
        if (
            chunk_bytes > 0
            and not self.training
            and not output_attentions
            and not torch.is_grad_enabled()
            and isinstance(hidden_states, torch.Tensor)
            and hidden_states.device.type == "cpu"
        ):  # not fx
            return (self._forward_in_pieces(hidden_states, input_dimensions, chunk_bytes),)
        attention_output, probs = self.attention(hidden_states, input_dimensions, output_attentions)
        hidden_states = hidden_states + self.drop_path(self.layernorm_before(attention_output))
        layer_output = self.output(self.intermediate(hidden_states))
        layer_output = hidden_states + self.drop_path(self.layernorm_after(layer_output))
        return (layer_output, probs) if output_attentions else (layer_output,)

    def _forward_in_pieces(self, hidden_states, input_dimensions, chunk_bytes: int):
        """`forward` in eval mode without autograd, computed in cache-sized pieces.

        Attention runs on groups of whole images, the MLP on groups of token rows, each sized so that its
        largest intermediate (q/k/v, the MLP's hidden layer) stays near `chunk_bytes`: on CPU this keeps
        intermediates in cache and reuses freed allocations instead of faulting in fresh pages for every
        large tensor. The math per token is the same as `forward`'s (drop path is the identity in eval).
        The submodules are called once per piece, which their hooks see.
        """
        batch, tokens, channels = hidden_states.shape
        elem = hidden_states.element_size()
        images = max(1, chunk_bytes // (tokens * 3 * channels * elem))
        rows = max(64, chunk_bytes // (self.intermediate.dense.out_features * elem))
        out = torch.empty_like(hidden_states)
        # the position bias and the q/k/v weight once per block call, not once per piece
        derived = self.attention.self.derived_parameters()
        for start in range(0, batch, images):
            x = hidden_states[start : start + images]
            attention_output, _ = self.attention(x, input_dimensions, derived_parameters=derived)
            h = (x + self.layernorm_before(attention_output)).view(-1, channels)
            o = out[start : start + images].view(-1, channels)
            for r in range(0, h.shape[0], rows):
                h_rows = h[r : r + rows]
                # y + h == h + y exactly; copy_ rather than add(out=...), which torch.func.vmap refuses
                o[r : r + rows].copy_(self.layernorm_after(self.output(self.intermediate(h_rows))).add_(h_rows))
        return out


class Swinv2PatchMerging(nn.Module):
    """2x2 neighbours concatenated as (0,0), (1,0), (0,1), (1,1) -> Linear(4C, 2C) -> LayerNorm(2C)."""

    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm, config: Optional[Swinv2Config] = None):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim)
        # read for config.cpu_onednn_linear; without a config (transformers' constructor arguments) the default
        self.config = config

    def forward(self, input_feature, input_dimensions):
        height, width = input_dimensions
        batch_size, _, channels = input_feature.shape
        x = input_feature.view(batch_size, height, width, channels)
        if not known_zero(height % 2, width % 2):
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))  # traced sizes: unless provably 0 (maybe by 0)
        hp, wp = x.shape[1], x.shape[2]
        # (B, H/2, 2(row), W/2, 2(col), C) -> (B, H/2, W/2, col, row, C): the concatenation order above.
        x = x.view(batch_size, hp // 2, 2, wp // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(batch_size, (hp // 2) * (wp // 2), 4 * channels)
        onednn = self.config.cpu_onednn_linear if self.config is not None else True
        return self.norm(apply_linear(self.reduction, x, onednn=onednn))


# (a base chosen at import time, transformers' GradientCheckpointingLayer or our own: mypy cannot see it)
class Swinv2Stage(_checkpointing_layer_base()):  # type: ignore[misc]
    def __init__(
        self, config, dim, input_resolution, depth, num_heads, drop_path, downsample, pretrained_window_size=0
    ):
        super().__init__()
        self.config = config
        self.dim = dim
        self.blocks = nn.ModuleList(
            Swinv2Layer(
                config=config,
                dim=dim,
                input_resolution=input_resolution,
                num_heads=num_heads,
                drop_path_rate=drop_path[i],
                shift_size=0 if i % 2 == 0 else config.window_size // 2,
                pretrained_window_size=pretrained_window_size,
            )
            for i in range(depth)
        )
        self.downsample = (
            downsample(input_resolution, dim=dim, norm_layer=nn.LayerNorm, config=config) if downsample else None
        )

    def forward(self, hidden_states, input_dimensions, output_attentions=False):
        height, width = input_dimensions
        layer_outputs = None
        for block in self.blocks:
            layer_outputs = block(hidden_states, input_dimensions, output_attentions)
            hidden_states = layer_outputs[0]
        before_downsampling = hidden_states
        if self.downsample is not None:
            output_dimensions = (height, width, (height + 1) // 2, (width + 1) // 2)
            hidden_states = self.downsample(before_downsampling, input_dimensions)
        else:
            output_dimensions = (height, width, height, width)
        stage_outputs = (hidden_states, before_downsampling, output_dimensions)
        if output_attentions:
            stage_outputs += layer_outputs[1:]
        return stage_outputs


class Swinv2Encoder(nn.Module):
    def __init__(self, config, grid_size):
        super().__init__()
        self.num_layers = len(config.depths)
        self.config = config
        dpr = [x.item() for x in torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu")]
        self.layers = nn.ModuleList(
            Swinv2Stage(
                config=config,
                dim=int(config.embed_dim * 2**i),
                input_resolution=(grid_size[0] // 2**i, grid_size[1] // 2**i),
                depth=config.depths[i],
                num_heads=config.num_heads[i],
                drop_path=dpr[sum(config.depths[:i]) : sum(config.depths[: i + 1])],
                downsample=Swinv2PatchMerging if i < self.num_layers - 1 else None,
                pretrained_window_size=config.pretrained_window_sizes[i],
            )
            for i in range(self.num_layers)
        )
        # set with the stages' by gradient_checkpointing_enable/disable; the stages do the checkpointing
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        input_dimensions,
        output_attentions=False,
        output_hidden_states=False,
        output_hidden_states_before_downsampling=False,
        return_dict=True,
    ):
        all_hidden_states = () if output_hidden_states else None
        all_reshaped = () if output_hidden_states else None
        all_attentions = () if output_attentions else None

        def record(states, dims):
            nonlocal all_hidden_states, all_reshaped
            batch_size, _, hidden_size = states.shape
            all_hidden_states += (states,)
            all_reshaped += (states.view(batch_size, dims[0], dims[1], hidden_size).permute(0, 3, 1, 2),)

        if output_hidden_states:
            record(hidden_states, input_dimensions)
        for stage in self.layers:
            # positional: a checkpointing stage (gradient checkpointing) takes its inputs as *args
            stage_outputs = stage(hidden_states, input_dimensions, output_attentions)
            hidden_states, before_downsampling, output_dimensions = stage_outputs[:3]
            input_dimensions = (output_dimensions[-2], output_dimensions[-1])
            if output_hidden_states and output_hidden_states_before_downsampling:
                record(before_downsampling, output_dimensions[:2])
            elif output_hidden_states:
                record(hidden_states, input_dimensions)
            if output_attentions:
                all_attentions += stage_outputs[3:]

        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden_states, all_attentions, all_reshaped) if v is not None)
        return Swinv2EncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            reshaped_hidden_states=all_reshaped,
        )


def _autocast_casts(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device and casts x (it leaves float64 alone)."""
    device = x.device.type
    return x.dtype != torch.float64 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _check_pixel_values(pixel_values, num_channels: int, weight_dtype: torch.dtype) -> None:
    """pixel_values as the patch embedding takes them: a 4-D (batch, channels, height, width) floating tensor
    in the dtype of the model's weights (`weight_dtype`), or under autocast in any floating dtype it casts
    (all but float64). Each refusal names the fix."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must be 4-D (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[1] != num_channels:
        hint = ""
        if pixel_values.shape[3] == num_channels:  # (batch, height, width, channels), as images are often stored
            hint = "; it looks channels-last (batch, height, width, channels): pass pixel_values.permute(0, 3, 1, 2)"
        raise ValueError(
            f"pixel_values must have {num_channels} channels (config.num_channels), got shape "
            f"{tuple(pixel_values.shape)}{hint}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}: convert the images "
            "first, e.g. pixel_values.float() / 255 then the model's normalisation (an image processor does this)"
        )
    if pixel_values.dtype != weight_dtype and not _autocast_casts(pixel_values):
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype} but the model's weights are {weight_dtype}: pass "
            f"pixel_values.to({weight_dtype}) or convert the model (model.to({pixel_values.dtype}))"
        )


# torch.fx.symbolic_trace records these calls instead of running them on its proxies: the graph checks its
# input as the model does and builds each block's geometry from the sizes of the call when it runs.
torch.fx.wrap("_check_pixel_values")
torch.fx.wrap("WindowGeometry")
torch.fx.wrap("window_attention")


# (a base chosen at import time, transformers' PreTrainedModel or nn.Module: mypy cannot see it)
class Swinv2PreTrainedModel(PreTrainedMixin, _ModelBase):  # type: ignore[misc, valid-type]
    """Base of the Swin V2 models: what they declare to transformers, and their weight initialisation.

    Loading, saving, gradient checkpointing and the accessors are `swinv2_fast.modeling_utils.PreTrainedMixin`;
    the base is transformers' `PreTrainedModel` when transformers imports (so that the Trainer saves
    config.json with `save_model`, and PEFT and accelerate treat the models as transformers models), an
    `nn.Module` otherwise.
    """

    config_class = Swinv2Config
    base_model_prefix = "swinv2"
    main_input_name = "pixel_values"
    input_modalities = "image"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[List[str]] = ["Swinv2Stage"]

    @torch.no_grad()
    def _init_weights(self, module):
        """transformers' Swinv2 initialisation: normal(0, initializer_range) for linear and conv weights, zero
        biases, LayerNorm (1, 0), zero mask token and absolute position embedding, logit scale log(10)."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.zero_()
            module.weight.fill_(1.0)
        elif isinstance(module, Swinv2Embeddings):
            if module.mask_token is not None:
                module.mask_token.zero_()
            if module.position_embeddings is not None:
                module.position_embeddings.zero_()
        elif isinstance(module, Swinv2SelfAttention):
            module.logit_scale.fill_(math.log(10))
            # the non-persistent buffers too: a model built on the meta device, moved with to_empty() and
            # initialised with init_weights() must equal one built on a real device
            table, index = module.create_coords_table_and_index()
            module.relative_coords_table.copy_(table)
            module.relative_position_index.copy_(index)

    @property
    def dummy_inputs(self):
        """A batch of 2 random images at config.image_size, as `forward(**model.dummy_inputs)` takes it."""
        height, width = _pair(self.config.image_size)
        return {
            "pixel_values": torch.randn(
                2, self.config.num_channels, height, width, dtype=self.dtype, device=self.device
            )
        }

    # -------------------------------------------------------------------------------- accessors
    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (a convolution), the model's first layer."""
        return next(m for m in self.modules() if isinstance(m, Swinv2PatchEmbeddings))

    def set_attn_implementation(self, attn_implementation: str):
        """Switch every block's window attention to "auto", "triton" or "eager" (see swinv2_fast.functional)."""
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
        self.config.attn_implementation = attn_implementation
        for module in self.modules():
            if isinstance(module, Swinv2SelfAttention):
                module.attn_implementation = attn_implementation
        return self


class Swinv2Model(Swinv2PreTrainedModel):
    """The Swin V2 encoder: patch embedding, stages of window-attention blocks with patch merging between
    them, final LayerNorm and (optional) mean pooling; transformers' `Swinv2Model` with the same modules,
    parameter names and outputs.

    Args:
        config: a swinv2_fast or transformers Swinv2Config.
        add_pooling_layer: compute `pooler_output` (mean over tokens).
        use_mask_token: add the learned mask token `bool_masked_pos` substitutes (SimMIM).

    Example:
        >>> model = Swinv2Model(Swinv2Config(image_size=256, window_size=8)).eval()
        >>> model(torch.randn(1, 3, 256, 256)).last_hidden_state.shape
        torch.Size([1, 64, 768])
    """

    def __init__(self, config: Swinv2Config, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config)
        config = self.config  # ours, also when a transformers Swinv2Config was passed
        self.num_layers = len(config.depths)
        self.num_features = int(config.embed_dim * 2 ** (self.num_layers - 1))
        self.embeddings = Swinv2Embeddings(config, use_mask_token=use_mask_token)
        self.encoder = Swinv2Encoder(config, self.embeddings.patch_grid)
        self.layernorm = nn.LayerNorm(self.num_features, eps=config.layer_norm_eps)
        self.pooler = nn.AdaptiveAvgPool1d(1) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values=None,
        bool_masked_pos=None,
        output_attentions=None,
        output_hidden_states=None,
        interpolate_pos_encoding=False,
        return_dict=None,
        **kwargs,
    ):
        """Encode a batch of images.

        Args:
            pixel_values: (batch, num_channels, height, width) floating tensor; any height and width (padded
                to the patch and window sizes as transformers pads).
            bool_masked_pos: (batch, num_patches) bool, patches replaced by the mask token (needs
                use_mask_token=True).
            output_attentions: also return each stage's attention probabilities (the last block's,
                (batch * windows, heads, N, N), N = window area); default config.output_attentions. Served by
                the eager path (the fused kernel never forms them).
            output_hidden_states: also return the token states after the embedding and after every stage
                (`hidden_states`, (batch, tokens, channels)) and the same as NCHW maps
                (`reshaped_hidden_states`); default config.output_hidden_states.
            interpolate_pos_encoding: interpolate the absolute position embedding (use_absolute_embeddings
                models) to the input size.
            return_dict: return the output dataclass (default config.return_dict) or transformers' tuple
                (its fields that are not None, in order).

        Returns:
            `Swinv2ModelOutput`: last_hidden_state (batch, tokens, hidden_size) after the final LayerNorm,
            pooler_output (batch, hidden_size) or None, hidden_states, attentions, reshaped_hidden_states
            (None unless requested).
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        _check_pixel_values(
            pixel_values, self.config.num_channels, self.embeddings.patch_embeddings.projection.weight.dtype
        )
        if bool_masked_pos is not None:
            ph, pw = _pair(self.config.patch_size)
            grid = (-(-pixel_values.shape[2] // ph), -(-pixel_values.shape[3] // pw))
            expected = (pixel_values.shape[0], grid[0] * grid[1])
            try:
                broadcast = torch.broadcast_shapes(tuple(bool_masked_pos.shape), expected)
            except RuntimeError:
                broadcast = None
            if broadcast != expected:
                raise ValueError(
                    f"bool_masked_pos must have a shape broadcastable to (batch_size, num_patches) = {expected}, "
                    f"got {tuple(bool_masked_pos.shape)}"
                )

        embedding_output, input_dimensions = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
        )
        encoder_outputs = self.encoder(
            embedding_output,
            input_dimensions,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        sequence_output = self.layernorm(encoder_outputs[0])
        pooled_output = None
        if self.pooler is not None:
            pooled_output = torch.flatten(self.pooler(sequence_output.transpose(1, 2)), 1)
        if not return_dict:
            return (sequence_output, pooled_output) + tuple(encoder_outputs[1:])
        return Swinv2ModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            reshaped_hidden_states=encoder_outputs.reshaped_hidden_states,
        )


def _classification_loss(config: Swinv2Config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' choice: regression for one label, cross-entropy for integer labels, else BCE."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=-100)
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(
        "config.problem_type must be 'regression', 'single_label_classification' or "
        f"'multi_label_classification', got {config.problem_type!r}"
    )


class Swinv2ForImageClassification(Swinv2PreTrainedModel):
    """Swin V2 with a linear classifier on the pooled output (transformers' `Swinv2ForImageClassification`).

    config.num_labels sets the classifier's outputs (0: no classifier, the pooled features are returned as
    logits); config.problem_type chooses the loss as transformers does.

    Example:
        >>> model = Swinv2ForImageClassification(Swinv2Config(image_size=256, window_size=8, num_labels=10))
        >>> model(torch.randn(2, 3, 256, 256), labels=torch.tensor([1, 7])).loss
    """

    def __init__(self, config: Swinv2Config):
        super().__init__(config)
        config = self.config  # ours, also when a transformers Swinv2Config was passed
        self.num_labels = config.num_labels
        self.swinv2 = Swinv2Model(config)
        self.classifier = (
            nn.Linear(self.swinv2.num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        interpolate_pos_encoding=False,
        return_dict=None,
        **kwargs,
    ):
        """Classify a batch of images.

        Args:
            pixel_values: (batch, num_channels, height, width) floating tensor.
            labels: (batch,) class indices (cross-entropy), (batch, num_labels) floats for regression or
                multi-label (BCE) problems, as config.problem_type or transformers' rule chooses.
            output_attentions, output_hidden_states, interpolate_pos_encoding, return_dict: as in
                `Swinv2Model.forward`.

        Returns:
            `Swinv2ImageClassifierOutput`: loss (with labels), logits (batch, num_labels), hidden_states,
            attentions, reshaped_hidden_states (None unless requested).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.swinv2(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=return_dict,
        )
        logits = self.classifier(outputs[1])
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        if not return_dict:
            output = (logits,) + tuple(outputs[2:])
            return ((loss,) + output) if loss is not None else output
        return Swinv2ImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reshaped_hidden_states=outputs.reshaped_hidden_states,
        )


class Swinv2ForMaskedImageModeling(Swinv2PreTrainedModel):
    """SimMIM (transformers' `Swinv2ForMaskedImageModeling`): a mask token in the embeddings, a 1x1 conv +
    pixel shuffle decoder back to pixels (stride config.encoder_stride), L1 loss over the masked pixels.

    Example:
        >>> model = Swinv2ForMaskedImageModeling(Swinv2Config(image_size=192, window_size=6))
        >>> mask = torch.rand(2, 48 * 48) < 0.6
        >>> model(torch.randn(2, 3, 192, 192), bool_masked_pos=mask).loss
    """

    def __init__(self, config: Swinv2Config):
        super().__init__(config)
        config = self.config  # ours, also when a transformers Swinv2Config was passed
        self.swinv2 = Swinv2Model(config, add_pooling_layer=False, use_mask_token=True)
        num_features = int(config.embed_dim * 2 ** (config.num_layers - 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(num_features, config.encoder_stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(config.encoder_stride),
        )
        self.post_init()

    def forward(
        self,
        pixel_values=None,
        bool_masked_pos=None,
        output_attentions=None,
        output_hidden_states=None,
        interpolate_pos_encoding=False,
        return_dict=None,
        **kwargs,
    ):
        """Reconstruct a batch of images from partly masked patches.

        Args:
            pixel_values: (batch, num_channels, height, width) floating tensor at config.image_size.
            bool_masked_pos: (batch, num_patches) bool, True for masked patches; gives the loss.
            output_attentions, output_hidden_states, interpolate_pos_encoding, return_dict: as in
                `Swinv2Model.forward`.

        Returns:
            `Swinv2MaskedImageModelingOutput`: loss (with bool_masked_pos), reconstruction (batch,
            num_channels, height, width), hidden_states, attentions, reshaped_hidden_states.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.swinv2(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=return_dict,
        )
        sequence_output = outputs[0].transpose(1, 2)
        batch_size, num_channels, sequence_length = sequence_output.shape
        side = math.floor(sequence_length**0.5)
        reconstruction = self.decoder(sequence_output.reshape(batch_size, num_channels, side, side))

        masked_im_loss = None
        if bool_masked_pos is not None:
            size = _pair(self.config.image_size)[0] // _pair(self.config.patch_size)[0]
            patch = _pair(self.config.patch_size)[0]
            mask = (
                bool_masked_pos.reshape(-1, size, size)
                .repeat_interleave(patch, 1)
                .repeat_interleave(patch, 2)
                .unsqueeze(1)
                .contiguous()
            )
            reconstruction_loss = F.l1_loss(pixel_values, reconstruction, reduction="none")
            masked_im_loss = (reconstruction_loss * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels

        if not return_dict:
            output = (reconstruction,) + tuple(outputs[2:])
            return ((masked_im_loss,) + output) if masked_im_loss is not None else output
        return Swinv2MaskedImageModelingOutput(
            loss=masked_im_loss,
            reconstruction=reconstruction,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reshaped_hidden_states=outputs.reshaped_hidden_states,
        )


class Swinv2Backbone(Swinv2PreTrainedModel):
    """Feature maps (NCHW) of the stages named by config.out_features / out_indices ("stem", "stage1", ...),
    taken before patch merging (transformers' `Swinv2Backbone`); `channels` gives their channel counts.

    Example:
        >>> model = Swinv2Backbone(Swinv2Config(out_features=["stage2", "stage4"])).eval()
        >>> [f.shape for f in model(torch.randn(1, 3, 224, 224)).feature_maps]
        [torch.Size([1, 192, 28, 28]), torch.Size([1, 768, 7, 7])]
    """

    def __init__(self, config: Swinv2Config):
        super().__init__(config)
        config = self.config  # ours, also when a transformers Swinv2Config was passed
        self.num_features = [config.embed_dim] + [int(config.embed_dim * 2**i) for i in range(len(config.depths))]
        self.embeddings = Swinv2Embeddings(config)
        self.encoder = Swinv2Encoder(config, self.embeddings.patch_grid)
        self.post_init()

    # transformers' BackboneMixin interface (attributes and properties, without its constructor, which
    # expects transformers' own backbone config): what transformers' code reads on a backbone
    has_attentions = True

    @property
    def backbone_type(self):
        """transformers' `BackboneType.TRANSFORMERS` (the string "transformers" without transformers)."""
        if _TransformersPreTrainedModel is None:
            return "transformers"
        from transformers.backbone_utils import BackboneType

        return BackboneType.TRANSFORMERS

    @property
    def stage_names(self):
        return self.config.stage_names

    @property
    def out_features(self):
        return self.config.out_features

    @out_features.setter
    def out_features(self, value):
        """Select stages by name (updates the config's out_indices too)."""
        self.config.out_features = value

    @property
    def out_indices(self):
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, value):
        """Select stages by index (updates the config's out_features too)."""
        self.config.out_indices = value

    @property
    def out_feature_channels(self):
        """{stage name: channels} for every stage, selected or not."""
        return {stage: self.num_features[i] for i, stage in enumerate(self.stage_names)}

    @property
    def channels(self):
        return [self.num_features[i] for i in self.out_indices]

    def forward_with_filtered_kwargs(self, *args, **kwargs):
        """`self(*args, **kwargs)` (transformers' BackboneMixin method; every forward argument applies here)."""
        return self(*args, **kwargs)

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def forward(self, pixel_values, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        """Feature maps of a batch of images.

        Args:
            pixel_values: (batch, num_channels, height, width) floating tensor.
            output_attentions: also return each stage's attention probabilities (as in `Swinv2Model.forward`);
                default config.output_attentions.
            output_hidden_states: also return the token states of every stage, taken before patch merging;
                default config.output_hidden_states.
            return_dict: return `BackboneOutput` (default config.return_dict) or a tuple.

        Returns:
            `BackboneOutput`: feature_maps, one (batch, channels, height, width) map per out_features
            entry, hidden_states and attentions (None unless requested).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        _check_pixel_values(
            pixel_values, self.config.num_channels, self.embeddings.patch_embeddings.projection.weight.dtype
        )

        embedding_output, input_dimensions = self.embeddings(pixel_values)
        outputs = self.encoder(
            embedding_output,
            input_dimensions,
            output_attentions=output_attentions,
            output_hidden_states=True,
            output_hidden_states_before_downsampling=True,
            return_dict=True,
        )
        feature_maps = tuple(
            state
            for stage, state in zip(self.stage_names, outputs.reshaped_hidden_states)
            if stage in self.out_features
        )
        hidden_states = outputs.hidden_states if output_hidden_states else None
        if not return_dict:
            output = (feature_maps,)
            if output_hidden_states:
                output += (hidden_states,)
            if output_attentions:
                output += (outputs.attentions,)
            return output
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=outputs.attentions)
