"""Compile every kernel specialization swinv2_fast can launch ahead of time for sm_80 and sm_90; no GPU needed.

    python -m swinv2_fast.kernels.compile_check            # table of registers, spills, shared memory
    python -m swinv2_fast.kernels.compile_check --sweep    # developer aid: try tile configs per (dtype, head_dim)

A specialization is fixed by the kernel (forward; backward: softmax statistics and delta = rowsum(P * dP),
dq, dk/dv, bias table
and scale), the projection dtype (fp32, fp16, bf16, and fp64, which gradcheck uses), the head dimension, the
tile configuration `block_config` picks for it (the same for every published window size, N = 49 ... 576),
the padding order and whether the projection has a bias; everything else (batch, grid, window, shift,
mask value, logit scale) is a runtime argument. Each is compiled with `triton.compile` for a `GPUTarget`
down to the cubin the runtime would load (Triton's own ptxas invocation and options), whose registers and
spill stores/loads are read with the `cuobjdump -res-usage` that ships in the Triton wheel; shared memory
is Triton's figure. The exit status is non-zero on a compile failure or on any spill.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple, Tuple

ARCHS = (80, 90)

DTYPES = ("fp32", "fp16", "bf16")  # fp64 runs under the interpreter only (gradcheck)
KERNELS = ("fwd", "bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias")
WINDOW_SIZES = (7, 8, 12, 16, 24)  # N = 49, 64, 144, 256, 576
CONSTEXPRS = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "ROLL_THEN_PAD", "HAS_BIAS", "FULL_DOT", "BLOCK_T")
# pointers in the projection's dtype, and those in the compute dtype (fp32; fp64 for fp64 projections)
PROJECTION_POINTERS = ("QKV", "QKV_BIAS", "OUT", "DOUT", "DQKV")
COMPUTE_POINTERS = ("SCALE", "POSITION_BIAS", "STATS", "DELTA", "DPAD", "DBIAS", "DSCALE")
# 16-byte aligned pointers and strides / channels divisible by 16 at every launch the package makes
# (C = heads * head_dim with head_dim a multiple of 16): what the JIT specializes on at run time.
ALIGNED = ("stride_qkv_b", "stride_qkv_t", "stride_out_b", "stride_out_t", "stride_do_b", "stride_do_t",
           "stride_dqkv_b", "stride_dqkv_t", "C")


class Spec(NamedTuple):
    kernel: str
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    num_warps: int
    roll_then_pad: bool
    has_bias: bool


class Result(NamedTuple):
    spec: Spec
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    error: str


def _torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


def launchable_specs() -> List[Spec]:
    """Every (dtype, head_dim, tiles, flags) the host function can launch for the published window sizes."""
    from .triton_window_attention import KERNEL_HEAD_DIMS, block_config, fused_backward_supported

    specs = set()
    for kernel, dtype, head_dim, window, roll, bias in itertools.product(
        KERNELS, DTYPES, KERNEL_HEAD_DIMS, WINDOW_SIZES, (False, True), (False, True)
    ):
        backward = kernel != "fwd"
        if backward and not fused_backward_supported(head_dim, _torch_dtype(dtype)):
            continue  # the eager path serves it on a GPU, by design
        block_m, block_n, warps = block_config(window * window, head_dim, _torch_dtype(dtype), backward)
        specs.add(Spec(kernel, dtype, head_dim, block_m, block_n, warps, roll, bias))
    return sorted(specs)


def _kernel(name):
    from . import triton_window_attention as tk

    return getattr(tk, f"_window_attention_{name}_kernel")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: Spec, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    from .triton_window_attention import MAXNREG

    kernel = _kernel(spec.kernel)
    compute = "fp64" if spec.dtype == "fp64" else "fp32"
    values = dict(HEAD_DIM=spec.head_dim, BLOCK_M=spec.block_m, BLOCK_N=spec.block_n, BLOCK_T=spec.block_m,
                  ROLL_THEN_PAD=spec.roll_then_pad, HAS_BIAS=spec.has_bias,
                  FULL_DOT=spec.dtype in ("fp32", "fp64"))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in CONSTEXPRS:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name in PROJECTION_POINTERS or name in COMPUTE_POINTERS:
            signature[name] = f"*{spec.dtype if name in PROJECTION_POINTERS else compute}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "mask_value" else "i32"
            if name in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "maxnreg": MAXNREG},
        )
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as fh:
                fh.write(compiled.asm["cubin"])
            report = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True,
                                    check=True).stdout
        # e.g. "REG:128 STACK:8 SHARED:0 LOCAL:0 ... " plus spill counts "STORES ... LOADS" per function
        registers = int(re.search(r"REG:(\d+)", report).group(1))
        stack = int(re.search(r"STACK:(\d+)", report).group(1))
        local = int(re.search(r"LOCAL:(\d+)", report).group(1))
        spills = stack + local  # spilled registers live in the thread's stack frame (local memory)
        return Result(spec, arch, registers, spills, int(compiled.metadata.shared), "")
    except Exception as exc:  # reported in the table and in the exit status
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        where = f"{lines[0]} " if len(lines) > 1 else ""  # a CompilationError: location first, cause last
        return Result(spec, arch, -1, -1, -1, f"{type(exc).__name__}: {where}{lines[-1][:200]}")


def _compile_star(args):
    return compile_spec(*args)


def run(specs: List[Spec], jobs: int) -> List[Result]:
    return run_spawned(_compile_star, [(spec, arch) for spec in specs for arch in ARCHS], jobs)


def run_spawned(fn, work, jobs: int) -> list:
    """fn over work in fresh processes. Compiling never touches a GPU. Fresh (spawned) workers with the
    interpreter off import the kernels as compilable functions, whatever this process imported under
    TRITON_INTERPRET=1."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, work))
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def format_table(results: List[Result]) -> str:
    lines = [f"{'kernel':<14} {'dtype':<5} {'head_dim':>8} {'tiles (M,N,warps)':>18} {'pad order':<13} {'bias':<5} "
             f"{'arch':<6} {'regs':>5} {'spill B':>8} {'smem B':>7}"]
    for r in results:
        s = r.spec
        tiles = f"{s.block_m},{s.block_n},{s.num_warps}"
        order = "roll_then_pad" if s.roll_then_pad else "pad_then_roll"
        if r.error:
            lines.append(f"{s.kernel:<14} {s.dtype:<5} {s.head_dim:>8} {tiles:>18} {order:<13} {str(s.has_bias):<5} "
                         f"sm_{r.arch:<3} FAILED {r.error}")
        else:
            lines.append(f"{s.kernel:<14} {s.dtype:<5} {s.head_dim:>8} {tiles:>18} {order:<13} {str(s.has_bias):<5} sm_{r.arch:<3} "
                         f"{r.registers:>5} {r.spill_bytes:>8} {r.shared_bytes:>7}")
    return "\n".join(lines)


def sweep(jobs: int) -> None:
    """Try tile configs per (dtype, head_dim) and print which compile without spills on both archs."""
    from .triton_window_attention import KERNEL_HEAD_DIMS

    candidates = [(64, 64, 4), (64, 64, 8), (64, 32, 4), (32, 64, 4), (32, 32, 4), (32, 32, 8), (16, 32, 4),
                  (16, 32, 8), (32, 16, 4), (32, 16, 8), (16, 16, 4), (16, 16, 8)]
    dtypes = [d for d in DTYPES if d in os.environ.get("SWEEP_DTYPES", ",".join(DTYPES)).split(",")]
    kernels = [k for k in KERNELS if k in os.environ.get("SWEEP_KERNELS", ",".join(KERNELS)).split(",")]
    specs = [Spec(k, d, h, m, n, w, False, True) for k in kernels for d in dtypes
             for h in KERNEL_HEAD_DIMS for m, n, w in candidates]
    print(format_table(run(specs, jobs)))


def cost_report(jobs: int, only: str = "") -> int:
    from . import cost

    chosen = dict(kernels=cost.COST_KERNELS, dtypes=cost.COST_DTYPES, windows=cost.COST_WINDOWS, archs=(80, 90))
    for item in filter(None, only.split(",")):
        key, value = item.split("=")
        chosen[key + "s"] = tuple(int(v) if key in ("window", "arch") else v for v in value.split("+"))
    costs = cost.cost_table(jobs, **chosen)
    print(cost.format_cost(costs))
    print("\n".join(cost.backward_sum(costs)))
    failed = [c for c in costs if c.error]
    spilled = [c for c in costs if not c.error and c.spill_bytes > 0]
    print(f"\n{len(costs)} compilations: {len(failed)} failed, {len(spilled)} with spills")
    return 1 if failed or spilled else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sweep", action="store_true", help="try tile configs instead of checking the launchable ones")
    parser.add_argument("--cost", action="store_true",
                        help="the static cost report (instructions per score, traffic model; see kernels/cost.py)")
    parser.add_argument("--only", default="", help="with --cost: comma-separated filters kernel=,dtype=,window=,arch=")
    args = parser.parse_args(argv)
    if args.cost:
        return cost_report(args.jobs, args.only)
    if args.sweep:
        sweep(args.jobs)
        return 0
    specs = launchable_specs()
    results = run(specs, args.jobs)
    print(format_table(results))
    failed = [r for r in results if r.error]
    spilled = [r for r in results if not r.error and r.spill_bytes > 0]
    print(f"\n{len(results)} compilations ({len(specs)} specializations x {len(ARCHS)} archs): "
          f"{len(failed)} failed, {len(spilled)} with spills; max registers "
          f"{max((r.registers for r in results if not r.error), default=0)}, max shared memory "
          f"{max((r.shared_bytes for r in results if not r.error), default=0)} B")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
