"""What the benchmarks run: op-level window-attention shapes and model-level SwinV2 variants, and the
providers that run them. Each `*_case` function returns a zero-argument callable to time."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

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
    return OpShape(f"{variant}-w{window}-{resolution}", (side, side), spec["embed_dim"], spec["num_heads"][0],
                   window)


OP_SHAPES: Dict[str, OpShape] = {s.name: s for s in [
    _stage1("tiny", 8, 256), _stage1("tiny", 16, 256), _stage1("small", 16, 256), _stage1("base", 12, 192),
    _stage1("base", 16, 256), _stage1("base", 24, 384), _stage1("large", 12, 192), _stage1("large", 24, 384),
]}

OP_PROVIDERS = ("eager", "sdpa", "compile", "triton")
OP_MODES = ("forward", "forward+backward")


def op_inputs(shape: OpShape, batch: int, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    C, N, L = shape.channels, shape.window ** 2, shape.grid[0] * shape.grid[1]
    qkv = torch.randn(batch, L, 3 * C, generator=gen)
    qkv_bias = 0.1 * torch.randn(3 * C, generator=gen)
    qkv_bias[C:2 * C] = 0
    logit_scale = torch.full((shape.heads, 1, 1), math.log(10.0))
    table = 16 * torch.sigmoid(torch.randn(shape.heads, N, N, generator=gen))
    tensors = [qkv.to(device, dtype), qkv_bias.to(device, dtype), logit_scale.to(device), table.to(device)]
    return [t.requires_grad_(requires_grad and i != 1) for i, t in enumerate(tensors)]


def op_bytes(shape: OpShape, batch: int, dtype: torch.dtype, mode: str) -> int:
    """Bytes the fused op must move: the forward reads q/k/v and the table and writes the output; the
    backward reads q/k/v, the output's gradient and the table and writes the q/k/v gradient and the table
    gradient (its softmax statistics and delta are its own intermediates, a few bytes per window row)."""
    e = torch.finfo(dtype).bits // 8
    L, C, N = shape.grid[0] * shape.grid[1], shape.channels, shape.window ** 2
    table = shape.heads * N * N * 4
    forward = batch * L * 4 * C * e + table
    if mode == "forward":
        return forward
    return forward + batch * L * (3 * C + C + 3 * C) * e + 2 * table


def op_case(provider: str, shape: OpShape, batch: int, dtype: torch.dtype, mode: str,
            device: torch.device) -> Callable[[], object]:
    if provider not in OP_PROVIDERS:
        raise ValueError(f"op provider must be one of {OP_PROVIDERS}, got {provider!r}")
    if mode not in OP_MODES:
        raise ValueError(f"op mode must be one of {OP_MODES}, got {mode!r}")
    backward = mode == "forward+backward"
    inputs = op_inputs(shape, batch, dtype, device, backward)
    kwargs = dict(grid_size=shape.grid, num_heads=shape.heads, window_size=shape.window, shift_size=shape.shift,
                  pad_order=PAD_THEN_ROLL, mask_value=-100.0)
    if provider == "eager":
        fn = lambda *xs: window_attention_reference(*xs, fused_softmax=False, **kwargs)  # noqa: E731
    elif provider == "sdpa":
        fn = lambda *xs: window_attention_reference(*xs, **kwargs)  # noqa: E731
    elif provider == "compile":
        fn = torch.compile(lambda *xs: window_attention_reference(*xs, fused_softmax=False, **kwargs))
    else:
        if device.type != "cuda":
            raise RuntimeError("the triton provider times the compiled kernel and needs a CUDA device")
        fn = lambda *xs: swinv2_fast.window_attention(*xs, implementation="triton", **kwargs)  # noqa: E731
    grad = torch.randn(batch, shape.grid[0] * shape.grid[1], shape.channels, device=device, dtype=dtype)

    def run():
        if backward:
            out = fn(*inputs)
            torch.autograd.backward(out, grad)
            for t in inputs:
                t.grad = None
            return out
        with torch.no_grad():
            return fn(*inputs)

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
    timm_model = timm_swin.SwinTransformerV2(img_size=spec.image_size, window_size=spec.window, num_classes=1000,
                                             drop_path_rate=0.0, **layout)
    with torch.no_grad():
        for p in timm_model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # off the initialisation: non-zero biases, unequal scales
    hf_config = transformers.Swinv2Config(image_size=spec.image_size, window_size=spec.window, drop_path_rate=0.0,
                                          num_labels=1000, **layout)
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
        previous = swinv2_fast.linear.set_onednn_linear(False)
        try:
            return model(*args, **kwargs)
        finally:
            swinv2_fast.linear.set_onednn_linear(previous)

    return call


def logits(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) if name.startswith("timm") else model(x).logits


def model_case(provider: str, models: Dict[str, torch.nn.Module], batch: int, image_size: int, dtype: torch.dtype,
               mode: str, device: torch.device, compiled: bool) -> Callable[[], object]:
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"model provider must be one of {MODEL_PROVIDERS}, got {provider!r}")
    if mode not in MODEL_MODES:
        raise ValueError(f"model mode must be one of {MODEL_MODES}, got {mode!r}")
    source = "swinv2_fast" if provider.startswith("swinv2_fast") else provider
    model = models[source].to(device=device, dtype=dtype)
    if source == "swinv2_fast":
        model.set_attn_implementation("eager" if provider == "swinv2_fast-eager" else "auto")
    model.train(mode == "train step")
    forward = linear_route(provider, torch.compile(model) if compiled else model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device, dtype)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    if mode == "inference":
        def run():
            with torch.inference_mode():
                return logits(source, forward, x)
        return run
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(logits(source, forward, x).float(), labels)
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
    return [p for p in MODEL_PROVIDERS if p != "swinv2_fast-eager"
            and (p != "swinv2_fast-F.linear" or mode in (None, "inference"))]
