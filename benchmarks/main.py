"""The main job: a benchmark sweep, a parity report and a table of speedup ratios.

    python benchmarks/main.py                       # quick default sweep on the best device here
    python benchmarks/main.py --device cpu --model-variants tiny base --batch 8 --rounds 10
    python benchmarks/main.py --op-shapes base-w16-256 --dtypes bfloat16 --providers eager sdpa compile triton

1. Sweep (progress bar): op level (the window-attention step: eager chain, SDPA, torch.compile of the
   reference, the fused Triton op on a GPU; forward and forward+backward) and model level (images/s of
   swinv2_fast, transformers and timm on identical weights, each eager and under torch.compile; inference
   and a training step). Providers that cannot run on the device are left out, never emulated.
2. Parity: max |difference| of each implementation's logits against the eager reference path and
   against transformers, on the benchmark's weights and input.
3. Ratios: every provider against the baseline of its group (op: the eager chain; model: transformers
   eager), all measured in this run on this device.

Rows are appended to benchmarks/results/results.csv and the chart of this device is redrawn
(benchmarks/plot.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cases, harness  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--op-shapes", nargs="*", default=None,
                        help=f"op shapes from {sorted(cases.OP_SHAPES)} (default: tiny-w8-256 on CPU; "
                             "tiny-w8-256, base-w16-256, large-w24-384 on a GPU); none to skip")
    parser.add_argument("--op-batch", type=int, default=None, help="op-level batch (default 2 on CPU, 64 on GPU)")
    parser.add_argument("--model-variants", nargs="*", default=None, choices=sorted(cases.MODEL_SPECS),
                        help="model-level variants (default: tiny on CPU; tiny and base on a GPU); none to skip")
    parser.add_argument("--batch", type=int, default=8, help="model-level inference batch")
    parser.add_argument("--train-batch", type=int, default=None, help="training-step batch (default 2 on CPU, 32 on GPU)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="default float32 on CPU; float32 and bfloat16 on a GPU")
    parser.add_argument("--providers", nargs="+", default=None,
                        help=f"subset of {cases.OP_PROVIDERS + cases.MODEL_PROVIDERS} (default: all that run here)")
    parser.add_argument("--modes", nargs="+", default=None,
                        choices=list(cases.OP_MODES) + list(cases.MODEL_MODES), help="default: all")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--compile-train", action="store_true",
                        help="also time compiled models' training steps on CPU (on by default on a GPU; a few "
                             "minutes of compilation per model on a 2-core CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per case (CPU; the GPU uses do_bench)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--csv", default=harness.RESULTS_CSV)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    gpu = args.device.type == "cuda"
    if args.op_shapes is None:
        args.op_shapes = ["tiny-w8-256", "base-w16-256", "large-w24-384"] if gpu else ["tiny-w8-256"]
    unknown = [s for s in args.op_shapes if s not in cases.OP_SHAPES]
    if unknown:
        parser.error(f"--op-shapes: unknown {unknown}; choose from {sorted(cases.OP_SHAPES)}")
    if args.model_variants is None:
        args.model_variants = ["tiny", "base"] if gpu else ["tiny"]
    args.op_batch = args.op_batch or (64 if gpu else 2)
    args.train_batch = args.train_batch or (32 if gpu else 2)
    args.dtypes = [DTYPES[d] for d in (args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"]))]
    for name in ("op_batch", "batch", "train_batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    every = set(cases.OP_PROVIDERS + cases.MODEL_PROVIDERS)
    if args.providers is not None and not set(args.providers) <= every:
        parser.error(f"--providers: unknown {sorted(set(args.providers) - every)}; choose from {sorted(every)}")
    return args


def plan(args) -> List[dict]:
    """Every case of the sweep, in the order it runs."""
    items = []
    compile_options = [False] if args.no_compile else [False, True]
    for dtype in args.dtypes:
        for shape in args.op_shapes:
            for mode in cases.OP_MODES:
                if args.modes and mode not in args.modes:
                    continue
                for provider in cases.providers_for(args.device, "op"):
                    if (args.providers and provider not in args.providers) or (provider == "compile" and args.no_compile):
                        continue
                    items.append(dict(level="op", shape=shape, mode=mode, provider=provider, dtype=dtype))
        for variant in args.model_variants:
            for mode in cases.MODEL_MODES:
                if args.modes and mode not in args.modes:
                    continue
                for compiled in compile_options:
                    if compiled and mode == "train step" and args.device.type == "cpu" and not args.compile_train:
                        continue
                    for provider in cases.providers_for(args.device, "model", mode):
                        if args.providers and provider not in args.providers:
                            continue
                        if compiled and provider == "swinv2_fast-F.linear":
                            continue  # under torch.compile the linears are inductor's either way
                        items.append(dict(level="model", variant=variant, mode=mode, provider=provider,
                                          dtype=dtype, compiled=compiled))
    return items


def run_sweep(args, items, models_by_variant) -> List[harness.Row]:
    from tqdm import tqdm

    rows = []
    for item in tqdm(items, desc="benchmark", unit="case", file=sys.stdout):
        if item["level"] == "op":
            shape = cases.OP_SHAPES[item["shape"]]
            fn = cases.op_case(item["provider"], shape, args.op_batch, item["dtype"], item["mode"], args.device)
            timing = harness.time_call(fn, args.device, args.rounds, args.warmup)
            gbps = cases.op_bytes(shape, args.op_batch, item["dtype"], item["mode"]) / (timing.median_ms * 1e-3) / 1e9
            rows.append(harness.make_row(args.device, "op", f"{shape.name} {shape.grid[0]}x{shape.grid[1]} "
                                         f"C{shape.channels} h{shape.heads}", item["provider"], item["mode"],
                                         item["dtype"], args.op_batch, timing, gbps, "GB/s"))
        else:
            spec = cases.MODEL_SPECS[item["variant"]]
            batch = args.batch if item["mode"] == "inference" else args.train_batch
            provider = item["provider"] + ("+compile" if item["compiled"] else "")
            fn = cases.model_case(item["provider"], models_by_variant[item["variant"]], batch, spec.image_size,
                                  item["dtype"], item["mode"], args.device, item["compiled"])
            # a compiled provider compiles in its first (warm-up) call: never timed
            timing = harness.time_call(fn, args.device, args.rounds, max(args.warmup, 2 if item["compiled"] else 1))
            rows.append(harness.make_row(args.device, "model", spec.name, provider, item["mode"], item["dtype"],
                                         batch, timing, batch / (timing.median_ms * 1e-3), "img/s"))
    return rows


def parity_report(args, models_by_variant) -> List[str]:
    """Max |logits difference| of each implementation against the eager reference path and transformers."""
    lines = ["parity (max |logits difference|, fp32, eval):"]
    for variant, models in models_by_variant.items():
        spec = cases.MODEL_SPECS[variant]
        x = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(3))
        x = x.to(args.device)
        outputs = {}
        with torch.inference_mode():
            for provider in cases.providers_for(args.device, "model") + ["swinv2_fast-eager"]:
                source = "swinv2_fast" if provider.startswith("swinv2_fast") else provider
                model = models[source].to(args.device, torch.float32).eval()
                if source == "swinv2_fast":
                    model.set_attn_implementation("eager" if provider == "swinv2_fast-eager" else "auto")
                outputs[provider] = cases.logits(source, cases.linear_route(provider, model), x).float()
        reference = outputs["swinv2_fast-eager"]
        for provider in sorted(outputs):
            if provider == "swinv2_fast-eager":
                continue
            lines.append(f"  {spec.name:<18} {provider:<14} vs eager reference {(outputs[provider] - reference).abs().max().item():.2e}"
                         f"   vs transformers {(outputs[provider] - outputs['transformers']).abs().max().item():.2e}")
    return lines


def ratio_table(rows: List[harness.Row]) -> List[str]:
    """Speedup of every row over the baseline of its group, measured in this run."""
    lines = []
    groups: Dict[tuple, List[harness.Row]] = {}
    for row in rows:
        groups.setdefault((row.level, row.case, row.mode, row.dtype, row.batch), []).append(row)
    for (level, case, mode, dtype, batch), members in groups.items():
        base_name = "eager" if level == "op" else "transformers"
        base = next((r for r in members if r.provider == base_name), None)
        lines.append(f"{level} | {case} | {mode} | {dtype} | batch {batch}")
        for r in members:
            ratio = f"x{base.median_ms / r.median_ms:5.2f} vs {base_name}" if base else ""
            memory = "" if r.peak_mem_mib != r.peak_mem_mib else f"{r.peak_mem_mib:9.1f} MiB"  # NaN: unmeasured
            lines.append(f"  {r.provider:<24} {r.median_ms:10.2f} ms [{r.p20_ms:.2f}-{r.p80_ms:.2f}] "
                         f"{r.throughput:10.2f} {r.throughput_unit:<5} {memory}  {ratio}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    harness.refuse_interpreter()
    items = plan(args)
    print(f"device: {harness.device_name(args.device)}; torch {torch.__version__}, triton {harness.triton_version()}, "
          f"git {harness.git_sha()}; {len(items)} cases")
    models_by_variant = {v: cases.build_models(cases.MODEL_SPECS[v]) for v in args.model_variants}
    rows = run_sweep(args, items, models_by_variant)
    harness.append_rows(rows, args.csv)
    print()
    if models_by_variant:
        print("\n".join(parity_report(args, models_by_variant)))
        print()
    print("\n".join(ratio_table(rows)))
    print(f"\n{len(rows)} rows appended to {args.csv}")
    if not args.no_plot:
        from benchmarks import plot

        for path in plot.plot(args.csv, device=harness.device_name(args.device)):
            print(f"chart: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
