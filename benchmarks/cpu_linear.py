"""F.linear against oneDNN's linear (swinv2_fast.linear) on this CPU, for SwinV2-T's GEMMs at 256x256, batch 8.

    python -m benchmarks.cpu_linear [--batch 8] [--rounds 10] [--autocast]

Prints, per GEMM shape (tokens x in -> out), the median ms of F.linear, of the oneDNN call, and their ratio,
measured in one run; the MLP's first GEMM is timed with exact GELU (F.gelu after F.linear against GELU
applied by oneDNN). Inference only: the shapes and route the models' eval path uses, in fp32, or with
--autocast under CPU autocast to bf16 (fp32 weights, cast per call as autocast casts them; needs a CPU for
which oneDNN reports bf16 support).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from swinv2_fast import linear as L

# SwinV2-T 256 window 8: (tokens per image, channels) of the four stages
STAGES = ((64 * 64, 96), (32 * 32, 192), (16 * 16, 384), (8 * 8, 768))


def shapes(batch):
    """(name, tokens, in, out, gelu) for each stage's q/k/v, attention output, MLP up and MLP down GEMM."""
    for i, (tokens, c) in enumerate(STAGES):
        m = batch * tokens
        yield f"stage {i + 1} qkv", m, c, 3 * c, False
        yield f"stage {i + 1} proj", m, c, c, False
        yield f"stage {i + 1} mlp up + gelu", m, c, 4 * c, True
        yield f"stage {i + 1} mlp down", m, 4 * c, c, False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--autocast", action="store_true", help="under CPU autocast to bf16")
    args = parser.parse_args(argv)
    if not L.onednn_linear_available():
        print("this PyTorch has no oneDNN linear op: nothing to compare", file=sys.stderr)
        return 1
    if args.autocast and not L.onednn_bf16_supported():
        print("oneDNN reports no bf16 support on this CPU: the route serves fp32 only here", file=sys.stderr)
        return 1
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    precision = "bf16 autocast" if args.autocast else "fp32"
    print(f"{harness.device_name(device)}; torch {torch.__version__}; batch {args.batch}, {precision}, no autograd")
    print(f"{'GEMM':<22} {'tokens x in -> out':>22} {'F.linear':>10} {'oneDNN':>10}  ratio")
    total_plain = total_fast = 0.0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
        for name, m, k, n, gelu in shapes(args.batch):
            x = torch.randn(m, k, generator=gen)
            w, b = torch.randn(n, k, generator=gen) / k**0.5, torch.randn(n, generator=gen)
            plain = harness.time_call(
                lambda x=x, w=w, b=b, gelu=gelu: F.gelu(F.linear(x, w, b)) if gelu else F.linear(x, w, b),
                device,
                args.rounds,
                2,
            ).median_ms
            fast = harness.time_call(
                lambda x=x, w=w, b=b, gelu=gelu: L.linear(x, w, b, gelu=gelu), device, args.rounds, 2
            ).median_ms
            total_plain, total_fast = total_plain + plain, total_fast + fast
            print(f"{name:<22} {f'{m} x {k} -> {n}':>22} {plain:8.2f}ms {fast:8.2f}ms  x{plain / fast:.2f}")
    print(f"{'one of each':<22} {'':>22} {total_plain:8.2f}ms {total_fast:8.2f}ms  x{total_plain / total_fast:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
