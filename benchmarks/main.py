"""The main job: a benchmark sweep, a parity report and a table of speedup ratios.

    python -m benchmarks.main                       # the default sweep on the best device here (a CPU: ~5 min)
    python -m benchmarks.main --quick               # about a minute: SwinV2-T inference, eager
    python -m benchmarks.main --full                # every provider and mode, compiled training too
    python -m benchmarks.main --device cpu --model-variants tiny base --batch 8 --rounds 10
    python -m benchmarks.main --op-shapes base-w16-256 --dtypes bfloat16 --providers transformers-chain triton
    python -m benchmarks.main --preset gpu --dry-run  # the GPU preset's plan and estimated time
    python -m benchmarks.main --preset gpu --out-dir OUT --budget 240   # what scripts/gpu.sh runs

The plan and its estimated time print first. On a CPU with native bf16 (AMX or AVX-512 BF16) the model rows
come in float32 and in bf16 autocast; the default compiles the float32 models only (--full: all of them).
The summary ends with one line per model: swinv2_fast's best row against transformers', timm's and the best
of both, compiled or not.

1. Sweep (progress bar naming the running case): op level (the window-attention step: the chain transformers
   runs, the package's SDPA reference, torch.compile of the transformers chain, the fused Triton op on a GPU;
   forward and forward+backward) and model level (images/s of swinv2_fast, transformers and timm on identical
   weights, each eager and under torch.compile; inference and a training step). Providers that cannot run on
   the device are left out, never emulated.
2. Parity: max |difference| of each implementation's logits against the eager reference path and
   against transformers, on the benchmark's weights and input (not in the presets: the tests check parity).
3. Ratios: every provider against the baseline of its group (op: transformers-chain; model: transformers
   eager), all measured in this run on this device; a group whose spread (p80/p20) is large is flagged noisy.

Every compiled case starts from `torch._dynamo.reset()`; one that graph-breaks, hits the recompile limit or
compiles nothing is reported failed, never timed. Every row carries this invocation's run id.

Where rows go: by default to the untracked folder benchmarks/local-results/ (CSV and chart); the committed
benchmarks/results/results.csv and its charts change only with --commit-results; --out-dir DIR puts the CSV,
the chart and a one-screen summary in DIR (what scripts/gpu.sh does).

Presets: `gpu` is the plan for a short GPU loan (batch 64, about 4 minutes on an H200; cases ordered by
importance so that --budget drops the least important; 5 torch.compile builds, at most 7). `smoke` is the same
plan at tiny shapes on the CPU providers, one round, one compile build (the first): CI runs it (scripts/gpu.sh
--smoke) so that the GPU plan's plumbing cannot rot between loans.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
from typing import Dict, List

import torch

from benchmarks import cases, harness

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bfloat16-autocast": cases.BF16_AUTOCAST,  # model level: float32 weights, calls under torch.autocast
}
LOCAL_RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "local-results")

# The GPU preset's shapes: SwinV2-T stage 1 (window 8), SwinV2-B stage 1 (window 16), one window-24 shape,
# in bf16 and fp32; and SwinV2-B 192 stage 1 (window 12, the ImageNet-22k pre-training), in bf16 only (the
# shapes and dtype of the cost model's per-model summary, benchmarks/results/cost_models.txt).
GPU_OP_SHAPES = ["tiny-w8-256", "base-w16-256", "large-w24-384"]
GPU_BF16_OP_SHAPES = GPU_OP_SHAPES[:2] + ["base-w12-192"] + GPU_OP_SHAPES[2:]
# The smoke preset's stand-ins for them: same windows where a CPU can afford it, tiny grids and channels
# (grids larger than the window, some padded, so transformers keeps the window and the shift).
SMOKE_OP_SHAPES = {
    "tiny-w8-256": cases.OpShape("smoke-w8", (12, 12), 32, 1, 8),
    "base-w16-256": cases.OpShape("smoke-w4", (6, 7), 32, 2, 4),
    "large-w24-384": cases.OpShape("smoke-w12", (13, 13), 32, 1, 12),
    "base-w12-192": cases.OpShape("smoke-w6", (9, 8), 32, 2, 6),
}
SMOKE_MODEL_SPECS = {"tiny": cases.ModelSpec("tiny", 32, 4), "base": cases.ModelSpec("base", 32, 4)}
SMOKE_LAYOUTS = {
    "tiny": dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2]),
    "base": dict(embed_dim=32, depths=[1, 1], num_heads=[1, 2]),
}
MAX_COMPILE = {"gpu": 7, "smoke": 1}  # limits; the gpu plan has 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        choices=["gpu", "smoke"],
        default=None,
        help="a fixed plan (see above); other sweep options are then ignored",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: SwinV2-T inference, eager, no compile, no op rows",
    )
    length.add_argument(
        "--full",
        action="store_true",
        help="every op mode and provider, compiled training steps too (a CPU: about 15 minutes)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time, run nothing")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the sweep: a case that would end past it is cut (listed, not run)",
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument(
        "--op-shapes",
        nargs="*",
        default=None,
        help=f"op shapes from {sorted(cases.OP_SHAPES)} (default: tiny-w8-256 on CPU; "
        "tiny-w8-256, base-w16-256, large-w24-384 on a GPU); none to skip",
    )
    parser.add_argument("--op-batch", type=int, default=None, help="op-level batch (default 2 on CPU, 64 on GPU)")
    parser.add_argument(
        "--model-variants",
        nargs="*",
        default=None,
        choices=sorted(cases.MODEL_SPECS),
        help="model-level variants (default: tiny on CPU; tiny and base on a GPU); none to skip",
    )
    parser.add_argument("--batch", type=int, default=8, help="model-level inference batch")
    parser.add_argument(
        "--train-batch", type=int, default=None, help="training-step batch (default 2 on CPU, 32 on GPU)"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=sorted(DTYPES),
        help="default: float32 and bfloat16 on a GPU; on a CPU float32, and bfloat16-autocast where the CPU has "
        "native bf16 (AMX or AVX-512 BF16)",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help=f"subset of {cases.OP_PROVIDERS + cases.MODEL_PROVIDERS} (default: all that run here)",
    )
    parser.add_argument(
        "--modes", nargs="+", default=None, choices=list(cases.OP_MODES) + list(cases.MODEL_MODES), help="default: all"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument(
        "--compile-train",
        action="store_true",
        help="also time compiled models' training steps on CPU (on by default on a GPU; a few "
        "minutes of compilation per model on a 2-core CPU)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per case (CPU; the GPU uses do_bench)")
    parser.add_argument("--warmup", type=int, default=1)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--commit-results",
        action="store_true",
        help=f"append to the committed {os.path.relpath(harness.RESULTS_CSV)} and redraw its chart",
    )
    where.add_argument("--out-dir", default=None, help="write results.csv, the chart and summary.txt here")
    where.add_argument("--csv", default=None, help="append to this CSV (its chart goes beside it)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity report")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error("--device cuda: no CUDA device is available here")
    if args.preset == "gpu" and args.device.type != "cuda" and not args.dry_run:
        parser.error("--preset gpu needs a CUDA device (use --preset smoke on CPU, or --dry-run to see the plan)")
    if args.preset == "smoke":
        args.device = torch.device("cpu")
    if args.preset == "gpu":
        args.device = torch.device("cuda")  # planned for a GPU even where --dry-run prints it on a CPU
    gpu = args.device.type == "cuda"
    # the length: a CPU's default is the plan that answers "how much faster?" in about 5 minutes
    args.length = "quick" if args.quick else "full" if args.full or gpu else "default"
    if args.op_shapes is None:
        defaults = ["tiny-w8-256", "base-w16-256", "large-w24-384"] if gpu else ["tiny-w8-256"]
        args.op_shapes = [] if args.length == "quick" else defaults
    unknown = [s for s in args.op_shapes if s not in cases.OP_SHAPES]
    if unknown:
        parser.error(f"--op-shapes: unknown {unknown}; choose from {sorted(cases.OP_SHAPES)}")
    if args.model_variants is None:
        args.model_variants = ["tiny", "base"] if gpu else ["tiny"]
    args.op_batch = args.op_batch or (64 if gpu else 2)
    args.train_batch = args.train_batch or (32 if gpu else 2)
    if args.dtypes is None:
        cpu_bf16 = not gpu and harness.cpu_bf16_support()
        args.dtypes = ["float32", "bfloat16"] if gpu else ["float32"] + (["bfloat16-autocast"] if cpu_bf16 else [])
    args.dtypes = [DTYPES[d] for d in args.dtypes]
    if args.length == "quick":
        args.no_compile = True
    if args.length == "full" and not gpu:
        args.compile_train = True
    for name in ("op_batch", "batch", "train_batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    every = set(cases.OP_PROVIDERS + cases.MODEL_PROVIDERS)
    if args.providers is not None and not set(args.providers) <= every:
        parser.error(f"--providers: unknown {sorted(set(args.providers) - every)}; choose from {sorted(every)}")
    if args.preset:
        args.rounds = 1 if args.preset == "smoke" else args.rounds
        args.warmup = 1
        args.no_parity = True
    if args.out_dir:
        args.csv = os.path.join(args.out_dir, "results.csv")
    elif args.commit_results:
        args.csv = harness.RESULTS_CSV
    elif args.csv is None:
        args.csv = os.path.join(LOCAL_RESULTS_DIR, "results.csv")
    return args


# ----------------------------------------------------------------------------------------------- the plans
def _op(shape: str, dtype, mode: str, provider: str) -> dict:
    return dict(level="op", shape=shape, mode=mode, provider=provider, dtype=dtype, compiled=provider == "compile")


def _model(variant: str, dtype, mode: str, provider: str, compiled: bool = False) -> dict:
    return dict(level="model", variant=variant, mode=mode, provider=provider, dtype=dtype, compiled=compiled)


def preset_plan() -> List[dict]:
    """The GPU preset, most important first: the fused op against the transformers chain (bf16 first), then
    the models eager, then the SDPA reference, then the compiled cases: 5 builds (the limit is 7), the op
    chain's (SwinV2-T forward and forward+backward, SwinV2-B forward+backward) and SwinV2-T bf16 inference of
    swinv2_fast and transformers; timm+compile and the chain's compiled SwinV2-B forward are left out so that
    the plan's estimate fits the 4-minute slot."""
    bf16, fp32 = torch.bfloat16, torch.float32
    shapes = {bf16: GPU_BF16_OP_SHAPES, fp32: GPU_OP_SHAPES}
    items = []
    for dtype in (bf16, fp32):
        for shape in shapes[dtype]:
            for mode in cases.OP_MODES:
                items += [_op(shape, dtype, mode, "transformers-chain"), _op(shape, dtype, mode, "triton")]
    models = ("swinv2_fast", "transformers", "timm")
    for dtype in (bf16, fp32):
        for variant in ("tiny", "base"):
            items += [_model(variant, dtype, "inference", p) for p in models]
        if dtype is bf16:
            items += [_model("tiny", bf16, "train step", p) for p in models]
    for dtype in (bf16, fp32):
        for shape in shapes[dtype]:
            items += [_op(shape, dtype, mode, "sdpa") for mode in cases.OP_MODES]
    items += [
        _op("tiny-w8-256", bf16, "forward", "compile"),
        _model("tiny", bf16, "inference", "swinv2_fast", compiled=True),
        _model("tiny", bf16, "inference", "transformers", compiled=True),
        _op("tiny-w8-256", bf16, "forward+backward", "compile"),
        _op("base-w16-256", bf16, "forward+backward", "compile"),
    ]
    return items


def sweep_plan(args) -> List[dict]:
    """Every case of the sweep, in the order it runs."""
    if args.preset:
        items = preset_plan()
        if args.device.type != "cuda":
            items = [i for i in items if i["provider"] != "triton"]
        compiled = [i for i in items if i["compiled"]][MAX_COMPILE[args.preset] :]
        return [i for i in items if not any(i is c for c in compiled)]
    items = []
    compile_options = [False] if args.no_compile else [False, True]
    length = getattr(args, "length", "full")
    # quick: inference only; default (a CPU): the op's forward without its compiled chain, models compiled for
    # inference; full: everything
    op_modes = cases.OP_MODES if length == "full" else ("forward",)
    model_modes = ("inference",) if length == "quick" else cases.MODEL_MODES
    for dtype in args.dtypes:
        for shape in [] if isinstance(dtype, cases.Autocast) else args.op_shapes:
            for mode in op_modes:
                if args.modes and mode not in args.modes:
                    continue
                for provider in cases.providers_for(args.device, "op"):
                    if (args.providers and provider not in args.providers) or (
                        provider == "compile" and (args.no_compile or length != "full")
                    ):
                        continue
                    items.append(_op(shape, dtype, mode, provider))
        for variant in args.model_variants:
            for mode in model_modes:
                if args.modes and mode not in args.modes:
                    continue
                for compiled in compile_options:
                    if compiled and mode == "train step" and args.device.type == "cpu" and not args.compile_train:
                        continue
                    # a CPU's default compiles float32 only: an autocast build takes minutes on 2 cores (--full)
                    if compiled and isinstance(dtype, cases.Autocast) and length == "default":
                        continue
                    for provider in cases.providers_for(args.device, "model", mode):
                        if args.providers and provider not in args.providers:
                            continue
                        if compiled and provider == "swinv2_fast-F.linear":
                            continue  # under torch.compile the linears are inductor's either way
                        items.append(_model(variant, dtype, mode, provider, compiled))
    return items


def op_shape(args, name: str) -> cases.OpShape:
    return SMOKE_OP_SHAPES[name] if args.preset == "smoke" else cases.OP_SHAPES[name]


def model_spec(args, variant: str) -> cases.ModelSpec:
    return SMOKE_MODEL_SPECS[variant] if args.preset == "smoke" else cases.MODEL_SPECS[variant]


def case_batch(args, item: dict) -> int:
    if args.preset == "smoke":
        return 2
    if args.preset == "gpu":
        return 64
    if item["level"] == "op":
        return args.op_batch
    return args.batch if item["mode"] == "inference" else args.train_batch


# Seconds one case takes on an H200 (do_bench's 25 ms warm-up and >= 100 ms of timing, the memory call,
# inputs drawn on the device), and the one-time costs it triggers: the first Triton launch of a (shape,
# dtype, mode) JIT-compiles its kernels (a model's first call: one build per stage shape, partly shared with
# the op rows); a torch.compile build (inductor with its parallel workers on 16 cores); building a variant's
# three models on the CPU. Estimates for planning, not measurements: the budget cuts what overruns.
GPU_SECONDS = dict(
    op=0.5,
    jit_forward=1.5,
    jit_backward=4.0,
    model_inference=1.0,
    model_train=2.0,
    model_jit_inference=3.0,
    model_jit_train=6.0,
    compile_op_forward=10.0,
    compile_op_backward=20.0,
    compile_model=35.0,
    build_tiny=4.0,
    build_base=10.0,
)
# On this repository's 2-core CPU machine (AMD EPYC Zen 5, 2 threads), the published shapes at the default rounds
# (5 timed calls, a warm-up and the memory call): SwinV2-T inference at batch 8 and a training step at batch
# 2; a torch.compile build of SwinV2-T (inductor, 2 workers) without inductor's on-disk cache; the op at batch 2.
CPU_SECONDS = dict(
    op=0.5,
    jit_forward=0.0,
    jit_backward=0.0,
    model_inference=6.0,
    model_train=4.5,
    model_jit_inference=0.0,
    model_jit_train=0.0,
    compile_op_forward=25.0,
    compile_op_backward=45.0,
    compile_model=45.0,
    build_tiny=4.0,
    build_base=12.0,
)
# On the same machine at the smoke preset's tiny shapes (no Triton rows on a CPU).
SMOKE_SECONDS = dict(
    op=0.3,
    jit_forward=0.0,
    jit_backward=0.0,
    model_inference=0.5,
    model_train=1.0,
    model_jit_inference=0.0,
    model_jit_train=0.0,
    compile_op_forward=25.0,
    compile_op_backward=45.0,
    compile_model=60.0,
    build_tiny=2.0,
    build_base=2.0,
)


def estimate_seconds(args, items: List[dict]) -> List[float]:
    """Estimated seconds of each case, including the one-time costs it triggers."""
    if args.preset == "smoke":
        table = SMOKE_SECONDS
    else:
        table = CPU_SECONDS if args.device.type == "cpu" else GPU_SECONDS
    seen_jit, built, out = set(), set(), []
    for item in items:
        seconds = 0.0
        backward = item["mode"] in ("forward+backward", "train step")
        if item["level"] == "op":
            seconds += table["op"]
            key = (item["shape"], item["dtype"], item["mode"])
            if item["provider"] == "triton" and key not in seen_jit:
                seen_jit.add(key)
                seconds += table["jit_backward" if backward else "jit_forward"]
            if item["compiled"]:
                seconds += table["compile_op_backward" if backward else "compile_op_forward"]
        else:
            if item["variant"] not in built:
                built.add(item["variant"])
                seconds += table.get(f"build_{item['variant']}", table["build_base"])
            seconds += table["model_train" if backward else "model_inference"]
            key = (item["variant"], item["dtype"], item["mode"])
            if item["provider"] == "swinv2_fast" and not item["compiled"] and key not in seen_jit:
                seen_jit.add(key)
                seconds += table["model_jit_train" if backward else "model_jit_inference"]
            if item["compiled"]:
                seconds += table["compile_model"]
        out.append(seconds)
    return out


def describe(args, item: dict) -> str:
    dtype = str(item["dtype"]).replace("torch.", "")
    if item["level"] == "op":
        return f"op    {op_shape(args, item['shape']).name:<16} {item['mode']:<17} {dtype:<17} {item['provider']}"
    spec = model_spec(args, item["variant"])
    provider = item["provider"] + ("+compile" if item["compiled"] else "")
    return f"model {spec.name:<16} {item['mode']:<17} {dtype:<17} {provider}"


def print_plan(args, items: List[dict]) -> None:
    estimates = estimate_seconds(args, items)
    builds = sum(1 for i in items if i["compiled"])
    print(
        f"plan: {len(items)} cases, {builds} torch.compile builds, estimated {sum(estimates):.0f} s"
        + (f" (budget {args.budget:.0f} s)" if args.budget else "")
    )
    total = 0.0
    for n, (item, seconds) in enumerate(zip(items, estimates), 1):
        total += seconds
        late = "  <- past the budget: would be cut" if args.budget and total > args.budget else ""
        print(f"{n:3d}. {describe(args, item):<72} ~{seconds:5.1f} s  (ends ~{total:5.0f} s){late}")


# ------------------------------------------------------------------------------------------------ the sweep
class CompileFellBack(RuntimeError):
    """A compiled case that did not run compiled: reported failed, never timed."""


def _compiled_counters_check() -> None:
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    if breaks:
        reason = next(iter(breaks))
        raise CompileFellBack(f"graph break ({len(breaks)} distinct): {str(reason).splitlines()[0][:160]}")
    if not counters["stats"]["unique_graphs"]:
        raise CompileFellBack("dynamo compiled no graph (the call ran eagerly)")


def _time_case(args, item, models_by_variant, run_id: str) -> harness.Row:
    batch = case_batch(args, item)
    if item["level"] == "op":
        shape = op_shape(args, item["shape"])
        fn = cases.op_case(item["provider"], shape, batch, item["dtype"], item["mode"], args.device)
        timing = harness.time_call(fn, args.device, args.rounds, args.warmup)
        if item["compiled"]:
            _compiled_counters_check()
        gbps = cases.op_bytes(shape, batch, item["dtype"], item["mode"]) / (timing.median_ms * 1e-3) / 1e9
        return harness.make_row(
            args.device,
            "op",
            op_case_name(shape),
            item["provider"],
            item["mode"],
            item["dtype"],
            batch,
            timing,
            gbps,
            "GB/s",
            run_id,
        )
    spec = model_spec(args, item["variant"])
    provider = item["provider"] + ("+compile" if item["compiled"] else "")
    fn = cases.model_case(
        item["provider"],
        models_by_variant[item["variant"]],
        batch,
        spec.image_size,
        item["dtype"],
        item["mode"],
        args.device,
        item["compiled"],
    )
    # a compiled provider compiles in its first (warm-up) call: never timed
    timing = harness.time_call(fn, args.device, args.rounds, max(args.warmup, 2 if item["compiled"] else 1))
    if item["compiled"]:
        _compiled_counters_check()
    return harness.make_row(
        args.device,
        "model",
        spec.name,
        provider,
        item["mode"],
        item["dtype"],
        batch,
        timing,
        batch / (timing.median_ms * 1e-3),
        "img/s",
        run_id,
    )


def op_case_name(shape: cases.OpShape) -> str:
    return f"{shape.name} {shape.grid[0]}x{shape.grid[1]} C{shape.channels} h{shape.heads}"


def failed_row(args, item, run_id: str, why: str) -> harness.Row:
    nan = float("nan")
    if item["level"] == "op":
        case = op_case_name(op_shape(args, item["shape"]))
        provider, unit = item["provider"], "GB/s"
    else:
        case = model_spec(args, item["variant"]).name
        provider, unit = item["provider"] + ("+compile" if item["compiled"] else ""), "img/s"
    return harness.make_row(
        args.device,
        item["level"],
        case,
        provider,
        item["mode"],
        item["dtype"],
        case_batch(args, item),
        harness.Timing(nan, nan, nan, nan),
        nan,
        unit,
        run_id,
        note=f"failed: {why}"[:240].replace("\n", " "),
    )


def run_case(args, item, models_by_variant, run_id: str) -> harness.Row:
    """One case: a row with its timing, or a failed row saying why (the sweep goes on)."""
    if not item["compiled"]:
        try:
            return _time_case(args, item, models_by_variant, run_id)
        except Exception as error:  # reported in the row and the summary, never hidden
            return failed_row(args, item, run_id, f"{type(error).__name__}: {error}")
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        # the recompile limit raises instead of silently running the frame eagerly
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return _time_case(args, item, models_by_variant, run_id)
    except Exception as error:
        return failed_row(args, item, run_id, f"{type(error).__name__}: {error}")
    finally:
        torch._dynamo.reset()


def build_models_for(args, variant: str) -> Dict[str, torch.nn.Module]:
    if args.preset == "smoke":
        return cases.build_models(SMOKE_MODEL_SPECS[variant], layout=SMOKE_LAYOUTS[variant])
    return cases.build_models(cases.MODEL_SPECS[variant])


class _AboveTheBar(io.TextIOBase):
    """A stand-in for sys.stderr while the bar is drawn: each complete line goes through tqdm.write, which
    prints it above the bar (on the bar's stream) instead of into its line."""

    def __init__(self, bar):
        self.bar, self.pending = bar, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.bar.write(line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.bar.write(self.pending)
            self.pending = ""


@contextlib.contextmanager
def warnings_above(bar):
    """Python warnings and log records (torch logs some, e.g. "No CUDA runtime is found" when inductor first
    compiles) print above the bar, not into its line: what goes to sys.stderr while it is drawn goes through
    tqdm.write. Output of native code to file descriptor 2 is not caught."""
    above = _AboveTheBar(bar)
    with contextlib.redirect_stderr(above):
        try:
            yield
        finally:
            above.flush()


def run_sweep(args, items, run_id: str, models_by_variant=None, progress=True):
    """Runs the cases in order, appending each row to the CSV as soon as it exists (a run killed from
    outside keeps what it measured). Returns (rows, cut): cut lists the cases the budget left out.

    The bar advances by each case's estimated seconds (not by one per case: a torch.compile build takes a
    hundred times an eager case), so its time remaining follows the plan; it names the running case."""
    from tqdm import tqdm

    models_by_variant = {} if models_by_variant is None else models_by_variant
    estimates = estimate_seconds(args, items)
    start = time.monotonic()
    rows, cut = [], []
    bar = tqdm(
        total=round(sum(estimates), 1),
        desc="benchmark",
        unit="est-s",
        file=sys.stdout,
        disable=not progress,
        bar_format="{desc} {percentage:3.0f}%|{bar:20}| {elapsed}<{remaining} {postfix}",
    )
    with bar, warnings_above(bar):
        for n, (item, seconds) in enumerate(zip(items, estimates), 1):
            elapsed = time.monotonic() - start
            if args.budget is not None and elapsed + seconds > args.budget:
                cut.append(item)
                bar.update(seconds)
                continue
            bar.set_postfix_str(f"{n}/{len(items)} {' '.join(describe(args, item).split())}", refresh=True)
            if item["level"] == "model" and item["variant"] not in models_by_variant:
                models_by_variant[item["variant"]] = build_models_for(args, item["variant"])
            row = run_case(args, item, models_by_variant, run_id)
            harness.append_rows([row], args.csv)
            rows.append(row)
            bar.update(seconds)
    return rows, cut


# --------------------------------------------------------------------------------------------- the reports
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
            error = (outputs[provider] - reference).abs().max().item()
            lines.append(
                f"  {spec.name:<18} {provider:<14} vs eager reference {error:.2e}"
                f"   vs transformers {(outputs[provider] - outputs['transformers']).abs().max().item():.2e}"
            )
    return lines


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def ratio_table(rows: List[harness.Row], peak_gbps: float = float("nan")) -> List[str]:
    """Speedup of every row over the baseline of its group, measured in this run; op rows also give the
    share of the device's memory bandwidth. A noisy row (p80/p20 > harness.NOISY_SPREAD) is flagged."""
    lines = []
    groups: Dict[tuple, List[harness.Row]] = {}
    for row in rows:
        groups.setdefault((row.level, row.case, row.mode, row.dtype, row.batch), []).append(row)
    for (level, case, mode, dtype, batch), members in groups.items():
        base_name = cases.OP_BASELINE if level == "op" else cases.MODEL_BASELINE
        base = next((r for r in members if r.provider == base_name and _finite(r.median_ms)), None)
        lines.append(f"{level} | {case} | {mode} | {dtype} | batch {batch}")
        for r in members:
            if r.note.startswith("failed"):
                lines.append(f"  {r.provider:<24} {r.note}")
                continue
            ratio = f"x{base.median_ms / r.median_ms:5.2f} vs {base_name}" if base else ""
            memory = "" if not _finite(r.peak_mem_mib) else f"{r.peak_mem_mib:9.1f} MiB"
            share = f" {100 * r.throughput / peak_gbps:5.1f}% of HBM" if level == "op" and _finite(peak_gbps) else ""
            flag = f"  NOISY (p80/p20 {r.p80_ms / r.p20_ms:.2f})" if r.note == "noisy" else ""
            lines.append(
                f"  {r.provider:<24} {r.median_ms:10.3f} ms [{r.p20_ms:.3f}-{r.p80_ms:.3f}] "
                f"{r.throughput:10.2f} {r.throughput_unit:<5}{share} {memory}  {ratio}{flag}"
            )
    if any(r.note == "noisy" for r in rows):
        lines.append(
            f"NOISY RUN: {sum(r.note == 'noisy' for r in rows)} case(s) with p80/p20 > "
            f"{harness.NOISY_SPREAD}: the machine was busy; compare ratios with care"
        )
    return lines


def key_ratios(rows: List[harness.Row]) -> List[str]:
    """One line per group: the fused op against the transformers chain and its compiled form; swinv2_fast
    against transformers and timm (eager and compiled)."""
    lines = []
    groups: Dict[tuple, Dict[str, harness.Row]] = {}
    for row in rows:
        if _finite(row.median_ms):
            groups.setdefault((row.level, row.case, row.mode, row.dtype), {})[row.provider] = row
    for (level, case, mode, dtype), members in groups.items():
        ours = [p for p in ("triton", "swinv2_fast", "swinv2_fast+compile") if p in members]
        others = [
            p
            for p in (
                "transformers-chain",
                "compile",
                "sdpa",
                "transformers",
                "timm",
                "transformers+compile",
                "timm+compile",
            )
            if p in members
        ]
        parts = [f"{a} x{members[b].median_ms / members[a].median_ms:.2f} vs {b}" for a in ours for b in others]
        if parts:
            lines.append(f"{level} {case} {mode} {dtype}: " + "; ".join(parts))
    return lines


OURS = ("swinv2_fast", "swinv2_fast+compile", "swinv2_fast-F.linear")
PEERS = {"transformers": ("transformers", "transformers+compile"), "timm": ("timm", "timm+compile")}


def verdict_lines(rows: List[harness.Row]) -> List[str]:
    """One line per model, mode and dtype: swinv2_fast's best row (eager or compiled) against transformers'
    best, timm's best and the best of both, each ratio of median times measured in this run."""
    lines = []
    groups: Dict[tuple, Dict[str, harness.Row]] = {}
    for row in rows:
        if row.level == "model" and _finite(row.median_ms):
            groups.setdefault((row.case, row.mode, row.dtype, row.batch), {})[row.provider] = row
    for (case, mode, dtype, batch), members in groups.items():
        ours = [members[p] for p in OURS if p in members]
        if not ours:
            continue
        best = min(ours, key=lambda r: r.median_ms)
        parts, peers = [], []
        for library, providers in PEERS.items():
            theirs = [members[p] for p in providers if p in members]
            if theirs:
                peer = min(theirs, key=lambda r: r.median_ms)
                peers.append(peer)
                parts.append(f"x{peer.median_ms / best.median_ms:.2f} vs {library} ({peer.provider})")
        if len(peers) > 1:
            peer = min(peers, key=lambda r: r.median_ms)
            parts.append(f"x{peer.median_ms / best.median_ms:.2f} vs the best of them ({peer.provider})")
        if parts:
            lines.append(f"{case}, {mode}, {dtype}, batch {batch}: swinv2_fast ({best.provider}) " + ", ".join(parts))
    return lines


def summary_lines(args, items, rows, cut, run_id: str, seconds: float) -> List[str]:
    failed = [r for r in rows if r.note.startswith("failed")]
    head = [
        f"benchmark run {run_id}: {harness.device_name(args.device)}; torch {torch.__version__}, "
        f"triton {harness.triton_version()}, git {harness.git_sha()}",
        f"{len(items)} cases planned, {len(rows) - len(failed)} timed, {len(failed)} failed, {len(cut)} cut "
        f"by the budget; {seconds:.0f} s",
    ]
    peak = harness.peak_bandwidth_gbps(args.device)
    if _finite(peak):
        head.append(f"HBM bandwidth of this device: {peak:.0f} GB/s (op GB/s count the bytes the fused op must move)")
    body = ratio_table(rows, peak)
    tail = ["", "ratios:"] + key_ratios(rows)
    if cut:
        tail += ["", "cut by the budget (not run):"] + [f"  {describe(args, i)}" for i in cut]
    verdicts = verdict_lines(rows)
    if verdicts:
        tail += ["", "how much faster (each model's best swinv2_fast row against each peer's best row):"] + [
            f"  {line}" for line in verdicts
        ]
    return head + [""] + body + tail


def main(argv=None) -> int:
    args = parse_args(argv)
    items = sweep_plan(args)
    if args.dry_run:
        print_plan(args, items)
        return 0
    harness.refuse_interpreter()
    run_id = harness.new_run_id()
    print(
        f"device: {harness.device_name(args.device)}; torch {torch.__version__}, triton {harness.triton_version()}, "
        f"git {harness.git_sha()}; run {run_id}"
    )
    print_plan(args, items)
    print()
    start = time.monotonic()
    models_by_variant: Dict[str, Dict[str, torch.nn.Module]] = {}
    if not args.preset:
        models_by_variant = {v: cases.build_models(cases.MODEL_SPECS[v]) for v in args.model_variants}
    rows, cut = run_sweep(args, items, run_id, models_by_variant)
    print(f"\n{len(rows)} rows appended to {args.csv}")
    if not args.no_plot and rows:
        from benchmarks import plot

        for path in plot.plot(args.csv, device=harness.device_name(args.device), run_id=run_id):
            print(f"chart: {path}")
    print()
    if models_by_variant and not args.no_parity:
        print("\n".join(parity_report(args, models_by_variant)))
        print()
    lines = summary_lines(args, items, rows, cut, run_id, time.monotonic() - start)
    print("\n".join(lines))  # ends with the "how much faster" lines
    if args.out_dir:
        with open(os.path.join(args.out_dir, "summary.txt"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
