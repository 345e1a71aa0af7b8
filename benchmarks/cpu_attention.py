"""SDPA against the explicit softmax chain in the eager window attention on this CPU, per dtype, for SwinV2-T's
four stages at 256x256 (window 8, shifted), batch 8.

    python -m benchmarks.cpu_attention [--batch 8] [--rounds 10] [--dtypes float32 bfloat16 float16]

Prints, per stage, dtype and mode (inference: no autograd; training: forward and backward with every input
needing gradients), the median ms of `window_attention_reference` with `fused_softmax=True` (softmax(S) @ v
through `scaled_dot_product_attention`) and with `fused_softmax=False` (S and P formed explicitly), their
ratio, and which one `sdpa_serves` picks for the call (the rule `fused_softmax=None` follows). Measured in one
run; the whole step is timed, gather and scatter included, so the ratio is the one a model sees.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import harness
from swinv2_fast.kernels.reference import sdpa_serves, window_attention_reference

# SwinV2-T 256, window 8: (grid side, heads) of the four stages, 32 channels a head
STAGES = ((64, 3), (32, 6), (16, 12), (8, 24))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def step(batch: int, side: int, heads: int, dtype: torch.dtype, training: bool, gen: torch.Generator):
    """(call, uses SDPA by the rule): `call(fused_softmax)` runs one step of the stage."""
    channels = 32 * heads
    qkv = torch.randn(batch, side * side, 3 * channels, generator=gen).to(dtype)
    qkv_bias = 0.1 * torch.randn(3 * channels, generator=gen).to(dtype)
    logit_scale = torch.full((heads,), 2.3)
    position_bias = 16 * torch.sigmoid(torch.randn(heads, 64, 64, generator=gen)).to(dtype)
    inputs = [qkv, qkv_bias, logit_scale, position_bias]
    if training:
        inputs = [t.requires_grad_() for t in inputs]
    grad_out = torch.randn(batch, side * side, channels, generator=gen).to(dtype)
    geometry = dict(grid_size=(side, side), num_heads=heads, window_size=8, shift_size=4 if side > 8 else 0)

    def call(fused_softmax: bool):
        if not training:
            with torch.inference_mode():
                return window_attention_reference(*inputs, fused_softmax=fused_softmax, **geometry)
        out = window_attention_reference(*inputs, fused_softmax=fused_softmax, **geometry)
        out.backward(grad_out)
        return out

    return call, sdpa_serves(qkv.device, dtype, training)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    print(f"{harness.device_name(device)}; torch {torch.__version__}; batch {args.batch}")
    print(f"{'stage':<8} {'dtype':<9} {'mode':<10} {'SDPA':>10} {'explicit':>10}  SDPA/explicit  rule picks")
    for name in args.dtypes:
        for training in (False, True):
            for i, (side, heads) in enumerate(STAGES):
                call, rule = step(args.batch, side, heads, DTYPES[name], training, gen)
                sdpa, explicit = (
                    harness.time_call(lambda f=f, call=call: call(f), device, args.rounds, 2).median_ms
                    for f in (True, False)
                )
                mode = "training" if training else "inference"
                picks = "SDPA" if rule else "explicit"
                ratio = f"x{sdpa / explicit:.2f}"
                print(f"{i + 1:<8} {name:<9} {mode:<10} {sdpa:8.2f}ms {explicit:8.2f}ms  {ratio:<14} {picks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
