"""What the benchmarks run: op-level window-attention shapes and model-level SwinV2 variants, and the
providers that run them. Each `*_case` function returns a zero-argument callable to time."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

import swinv2_fast
from swinv2_fast.kernels import PAD_THEN_ROLL, window_attention_reference

VARIANTS = {
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    "large": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48]),
}


# ------------------------------------------------------------------------------------------------ op level
@dataclass(frozen=True)
class OpShape:
    """The first stage of a published model (the largest token count): grid, channels, heads, window."""

    name: str
    grid: Tuple[int, int]
    channels: int
    heads: int
    window: int

    @property
    def shift(self) -> int:
        return self.window // 2


def _stage1(variant: str, window: int, resolution: int) -> OpShape:
    spec = VARIANTS[variant]
    side = resolution // 4
    return OpShape(f"{variant}-w{window}-{resolution}", (side, side), spec["embed_dim"], spec["num_heads"][0], window)


OP_SHAPES: Dict[str, OpShape] = {
    s.name: s
    for s in [
        _stage1("tiny", 8, 256),
        _stage1("tiny", 16, 256),
        _stage1("small", 16, 256),
        _stage1("base", 12, 192),
        _stage1("base", 16, 256),
        _stage1("base", 24, 384),
        _stage1("large", 12, 192),
        _stage1("large", 24, 384),
    ]
}

# The op-level providers. transformers-chain: the literal chain transformers' Swinv2Layer runs around its
# attention (pad, roll, window_partition, Swinv2SelfAttention with the CPB bias and the mask added twice,
# window_reverse, roll back, crop), from transformers' own modules; the baseline of every op ratio.
# sdpa: the package's gather-based reference through scaled_dot_product_attention. compile: torch.compile of
# the transformers chain. triton: the fused op (CUDA only; the interpreter is never timed).
OP_PROVIDERS = ("transformers-chain", "sdpa", "compile", "triton")
OP_BASELINE = "transformers-chain"
MODEL_BASELINE = "transformers"  # eager: the model rows' ratios are to it
OP_MODES = ("forward", "forward+backward")
# transformers adds the shift mask twice (-100 each): every provider uses the same finite value
OP_MASK_VALUE = -200.0


class _Columns(torch.nn.Module):
    """Stands in for transformers' query/key/value Linear: the op starts from the projection, so each is a
    view of its third of the qkv channels (no copy, no work)."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x):
        return x[..., self.start : self.stop]


class _Table(torch.nn.Module):
    """Stands in for transformers' continuous_position_bias_mlp: returns the MLP's output table
    ((2wh-1)*(2ww-1), heads), a parameter shared with the other providers; transformers' own code then
    gathers it, applies 16 * sigmoid and adds it."""

    def __init__(self, table: torch.nn.Parameter):
        super().__init__()
        self.table = table

    def forward(self, coords):
        return self.table


class TransformersChain(torch.nn.Module):
    """transformers' window attention step from the q/k/v projection (B, H*W, 3C) to the attention output
    before the output projection (B, H*W, C): Swinv2Layer's maybe_pad, torch.roll, window_partition,
    get_attn_mask, Swinv2SelfAttention.forward, window_reverse, roll back and crop, each from transformers.
    Padded positions hold the projection of a zero token (qkv_bias), as when transformers pads the input of
    its projections."""

    def __init__(
        self,
        shape: OpShape,
        logit_scale: torch.nn.Parameter,
        cpb_table: torch.nn.Parameter,
        qkv_bias: Optional[torch.Tensor],
    ):
        super().__init__()
        import transformers

        config = transformers.Swinv2Config(
            window_size=shape.window, embed_dim=shape.channels, depths=[1], num_heads=[shape.heads]
        )
        self.layer = transformers.models.swinv2.modeling_swinv2.Swinv2Layer(
            config, dim=shape.channels, input_resolution=shape.grid, num_heads=shape.heads, shift_size=shape.shift
        )
        if (self.layer.window_size, self.layer.shift_size) != (shape.window, shape.shift):
            raise ValueError(f"op shape {shape.name}: transformers changes its window/shift for grid {shape.grid}")
        attn = self.layer.attention.self
        C = shape.channels
        attn.query, attn.key, attn.value = _Columns(0, C), _Columns(C, 2 * C), _Columns(2 * C, 3 * C)
        attn.continuous_position_bias_mlp = _Table(cpb_table)
        attn.logit_scale = logit_scale
        self.grid = shape.grid
        self.register_buffer("qkv_bias", qkv_bias, persistent=False)
        # transformers 5.18 builds the shift mask on the device; 5.17 builds it on the CPU and copies it over
        # in every forward: each version's chain as its Swinv2Layer.forward runs it
        import inspect

        self.mask_on_device = "device" in inspect.signature(self.layer.get_attn_mask).parameters

    def forward(self, qkv):
        from transformers.models.swinv2.modeling_swinv2 import window_partition, window_reverse

        layer, (height, width) = self.layer, self.grid
        batch, _, channels3 = qkv.shape
        ws, shift = layer.window_size, layer.shift_size
        x = qkv.view(batch, height, width, channels3)
        x, pad_values = layer.maybe_pad(x, height, width)
        was_padded = pad_values[3] > 0 or pad_values[5] > 0
        if was_padded and self.qkv_bias is not None:
            x[:, height:] = self.qkv_bias
            x[:, :, width:] = self.qkv_bias
        _, height_pad, width_pad, _ = x.shape
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, channels3)
        if self.mask_on_device:
            mask = layer.get_attn_mask(height_pad, width_pad, dtype=x.dtype, device=windows.device)
        else:
            mask = layer.get_attn_mask(height_pad, width_pad, dtype=x.dtype)
            mask = mask.to(windows.device) if mask is not None else None
        out = layer.attention.self(windows, mask)[0]
        channels = out.shape[-1]
        out = window_reverse(out.view(-1, ws, ws, channels), ws, height_pad, width_pad)
        if shift > 0:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        if was_padded:
            out = out[:, :height, :width, :].contiguous()
        return out.view(batch, height * width, channels)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the ((2w-1)^2, heads) CPB table, the one transformers and timm gather with."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def position_bias(cpb_table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(heads, N, N) = 16 * sigmoid of the CPB table gathered: what every model computes per forward."""
    n = index.shape[0]
    return 16 * torch.sigmoid(cpb_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1))


def op_inputs(shape: OpShape, batch: int, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    """qkv (B, H*W, 3C), qkv_bias (3C,) with a zero key third, logit_scale (heads, 1, 1) and the CPB table
    ((2w-1)^2, heads), all in `dtype` (as in a model cast to it); gradients for all but qkv_bias."""
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they live: batch 64 is large
    C, L = shape.channels, shape.grid[0] * shape.grid[1]
    qkv = torch.randn(batch, L, 3 * C, generator=gen, device=device)
    qkv_bias = 0.1 * torch.randn(3 * C, generator=gen, device=device)
    qkv_bias[C : 2 * C] = 0
    logit_scale = torch.log(10.0 + 2 * torch.rand(shape.heads, 1, 1, generator=gen, device=device))
    table = torch.randn((2 * shape.window - 1) ** 2, shape.heads, generator=gen, device=device)
    qkv = qkv.to(dtype).requires_grad_(requires_grad)
    return (
        qkv,
        qkv_bias.to(device, dtype),
        torch.nn.Parameter(logit_scale.to(device, dtype), requires_grad),
        torch.nn.Parameter(table.to(device, dtype), requires_grad),
    )


def op_bytes(shape: OpShape, batch: int, dtype: torch.dtype, mode: str) -> int:
    """Bytes the fused op must move: the forward reads q/k/v and the (heads, N, N) bias and writes the output;
    the backward reads q/k/v, the output's gradient and the bias and writes the q/k/v gradient and the bias
    gradient (its softmax statistics and delta are its own intermediates, a few bytes per window row)."""
    e = torch.finfo(dtype).bits // 8
    L, C, N = shape.grid[0] * shape.grid[1], shape.channels, shape.window**2
    table = shape.heads * N * N * e
    forward = batch * L * 4 * C * e + table
    if mode == "forward":
        return forward
    return forward + batch * L * (3 * C + C + 3 * C) * e + 2 * table


def op_function(provider: str, shape: OpShape, inputs, compile_options: Optional[dict] = None):
    """A callable qkv -> attention output (B, H*W, C) for `provider`, bound to the logit scale, CPB table and
    q/k/v bias of `inputs` (op_inputs)."""
    if provider not in OP_PROVIDERS:
        raise ValueError(f"op provider must be one of {OP_PROVIDERS}, got {provider!r}")
    qkv, qkv_bias, logit_scale, table = inputs
    if provider in ("transformers-chain", "compile"):
        chain = TransformersChain(shape, logit_scale, table, qkv_bias).to(qkv.device)
        return torch.compile(chain, **(compile_options or {})) if provider == "compile" else chain
    index = relative_position_index(shape.window).to(qkv.device)
    kwargs = dict(
        grid_size=shape.grid,
        num_heads=shape.heads,
        window_size=shape.window,
        shift_size=shape.shift,
        pad_order=PAD_THEN_ROLL,
        mask_value=OP_MASK_VALUE,
    )
    if provider == "sdpa":
        return lambda x: window_attention_reference(x, qkv_bias, logit_scale, position_bias(table, index), **kwargs)
    if qkv.device.type != "cuda":
        raise RuntimeError("the triton provider times the compiled kernel and needs a CUDA device")
    return lambda x: swinv2_fast.window_attention(
        x, qkv_bias, logit_scale, position_bias(table, index), implementation="triton", **kwargs
    )


def op_case(
    provider: str,
    shape: OpShape,
    batch: int,
    dtype: torch.dtype,
    mode: str,
    device: torch.device,
    compile_options: Optional[dict] = None,
) -> Callable[[], object]:
    if provider not in OP_PROVIDERS:
        raise ValueError(f"op provider must be one of {OP_PROVIDERS}, got {provider!r}")
    if mode not in OP_MODES:
        raise ValueError(f"op mode must be one of {OP_MODES}, got {mode!r}")
    backward = mode == "forward+backward"
    inputs = op_inputs(shape, batch, dtype, device, backward)
    fn = op_function(provider, shape, inputs, compile_options)
    grad = torch.randn(
        batch,
        shape.grid[0] * shape.grid[1],
        shape.channels,
        generator=torch.Generator(device=device).manual_seed(1),
        device=device,
    ).to(dtype)
    leaves = [t for t in inputs if t.requires_grad]

    def run():
        if backward:
            out = fn(inputs[0])
            torch.autograd.backward(out, grad)
            for t in leaves:
                t.grad = None
            return out
        with torch.no_grad():
            return fn(inputs[0])

    return run


# --------------------------------------------------------------------------------------------- model level
# swinv2_fast-F.linear: swinv2_fast with its CPU inference linears on F.linear instead of oneDNN
# (swinv2_fast.linear), to show what that routing buys; a CPU inference row only (elsewhere it is the same path)
MODEL_PROVIDERS = ("swinv2_fast", "swinv2_fast-eager", "swinv2_fast-F.linear", "transformers", "timm")
MODEL_MODES = ("inference", "train step")


@dataclass(frozen=True)
class ModelSpec:
    variant: str
    image_size: int
    window: int

    @property
    def name(self) -> str:
        return f"SwinV2-{self.variant[0].upper()} {self.image_size} w{self.window}"


MODEL_SPECS = {"tiny": ModelSpec("tiny", 256, 8), "base": ModelSpec("base", 256, 16)}


def build_models(spec: ModelSpec, seed: int = 0, layout: Optional[dict] = None) -> Dict[str, torch.nn.Module]:
    """Identical perturbed random weights in timm, swinv2_fast and transformers (no hub downloads);
    `layout` (embed_dim, depths, num_heads) overrides the variant's, for tests."""
    import timm.models.swin_transformer_v2 as timm_swin
    import transformers

    torch.manual_seed(seed)
    layout = layout or VARIANTS[spec.variant]
    timm_model = timm_swin.SwinTransformerV2(
        img_size=spec.image_size, window_size=spec.window, num_classes=1000, drop_path_rate=0.0, **layout
    )
    with torch.no_grad():
        for p in timm_model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # off the initialisation: non-zero biases, unequal scales
    hf_config = transformers.Swinv2Config(
        image_size=spec.image_size, window_size=spec.window, drop_path_rate=0.0, num_labels=1000, **layout
    )
    hf = transformers.Swinv2ForImageClassification(hf_config)
    ours = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config.from_transformers(hf_config))
    ours.load_state_dict(swinv2_fast.from_timm(timm_model).state_dict(), strict=False)
    ours.classifier.load_state_dict({"weight": timm_model.head.fc.weight, "bias": timm_model.head.fc.bias})
    hf.load_state_dict(ours.state_dict())
    return {"swinv2_fast": ours, "transformers": hf, "timm": timm_model}


def linear_route(provider: str, model: Callable) -> Callable:
    """`model` itself, or for swinv2_fast-F.linear a callable running it with the oneDNN route turned off."""
    if provider != "swinv2_fast-F.linear":
        return model

    def call(*args, **kwargs):
        previous, model.config.cpu_onednn_linear = model.config.cpu_onednn_linear, False
        try:
            return model(*args, **kwargs)
        finally:
            model.config.cpu_onednn_linear = previous

    return call


def logits(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) if name.startswith("timm") else model(x).logits


class Autocast(NamedTuple):
    """A model-level precision: the model in float32, each call under torch.autocast to `dtype` (what a user
    of bf16 on a CPU, or of mixed precision on a GPU, runs). Rows name it "bfloat16-autocast"."""

    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}-autocast"


BF16_AUTOCAST = Autocast(torch.bfloat16)


def model_case(
    provider: str,
    models: Dict[str, torch.nn.Module],
    batch: int,
    image_size: int,
    dtype: torch.dtype,
    mode: str,
    device: torch.device,
    compiled: bool,
    compile_options: Optional[dict] = None,
) -> Callable[[], object]:
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"model provider must be one of {MODEL_PROVIDERS}, got {provider!r}")
    if mode not in MODEL_MODES:
        raise ValueError(f"model mode must be one of {MODEL_MODES}, got {mode!r}")
    source = "swinv2_fast" if provider.startswith("swinv2_fast") else provider
    autocast = isinstance(dtype, Autocast)
    model = models[source].to(device=device, dtype=torch.float32 if autocast else dtype)
    if source == "swinv2_fast":
        model.set_attn_implementation("eager" if provider == "swinv2_fast-eager" else "auto")
    model.train(mode == "train step")
    forward = linear_route(provider, torch.compile(model, **(compile_options or {})) if compiled else model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device, torch.float32 if autocast else dtype)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def precision():
        if autocast:
            return torch.autocast(device.type, dtype=dtype.dtype)
        return contextlib.nullcontext()

    if mode == "inference":

        def run():
            with torch.inference_mode(), precision():
                return logits(source, forward, x)

        return run
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision():
            out = logits(source, forward, x)
        loss = torch.nn.functional.cross_entropy(out.float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def providers_for(device: torch.device, level: str, mode: Optional[str] = None) -> List[str]:
    """The providers that run on `device` (and model `mode`, if given): all on CUDA but swinv2_fast-F.linear;
    on CPU those with a real CPU path (never the interpreter): the Triton provider and swinv2_fast's separate
    eager row (on CPU "auto" is eager) drop out, and swinv2_fast-F.linear runs in inference only (training
    uses F.linear anyway)."""
    if level == "op":
        return list(OP_PROVIDERS) if device.type == "cuda" else [p for p in OP_PROVIDERS if p != "triton"]
    if device.type == "cuda":
        return [p for p in MODEL_PROVIDERS if p != "swinv2_fast-F.linear"]
    return [
        p
        for p in MODEL_PROVIDERS
        if p != "swinv2_fast-eager" and (p != "swinv2_fast-F.linear" or mode in (None, "inference"))
    ]
