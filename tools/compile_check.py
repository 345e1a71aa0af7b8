"""Compile every kernel specialization swinv2_fast can launch ahead of time for sm_80 and sm_90; no GPU needed.

    python -m tools.compile_check               # the spill gate: registers, spills, shared memory
    python -m tools.compile_check --published   # the gate over the published models' head dims
    python -m tools.compile_check --head-dims 10,30  # the gate over chosen head dims
    python -m tools.compile_check --cost        # the static cost report (see tools/cost.py)
    python -m tools.compile_check --cost --only kernel=fwd,window=16 --histogram  # and where its issue slots go
    python -m tools.compile_check --candidates  # the GPU tile sweep's candidates (tools/sweep.py)

Run from the repository root (tools/ is not installed).

A specialization is fixed by the kernel (forward; backward: softmax statistics and delta = rowsum(P * dP),
dq, dk/dv, bias table and scale), the projection dtype (fp32, fp16, bf16; fp64, which gradcheck uses, runs
under the interpreter only), the head dimension, the window (its height, width and N are compile-time
constants of the kernels), whether the window is shifted, whether the grid is padded and then the padding
order and whether the projection has a bias, the tiles `block_config` picks, and what Triton's JIT
specialises on at run time (integers divisible by 16 or equal to 1, 16-byte aligned pointers). The gate
does not rebuild that by hand: it runs the host functions on meta tensors with the kernels replaced by
recorders (`launches.recording_launches`), for each window of the published models (7, 8, 12, 16, 24) and a
set of geometries covering the flag combinations (GEOMETRIES), and compiles each recorded launch exactly as
the JIT would (Triton's binder, `triton.compile` for a `GPUTarget`, down to the cubin the runtime would
load). Registers are read with the `cuobjdump -res-usage` that ships in the Triton wheel, spills from its
`-sass` (bytes of local-memory stores and loads, `launches.resource_usage`); shared memory is Triton's figure.
The exit status is non-zero on a compile failure or on any spill.

--candidates compiles every configuration of the tile sweep's table (sweep.CANDIDATES, num_stages included)
at the sweep's shapes (sweep.SHAPES: bf16, head_dim 32, their windows and heads on their shifted unpadded
grids, a bf16 table) with the candidate set as `TILE_OVERRIDES` and recorded by the same launch path: the
forward's two launches, and the backward's kernels where they are not the fused one (not at N = 64, nor at N = 49
with Triton 3.8 or later, where the fused backward kernel runs with its own tiles; the rows kernel keeps its own
too); a register-capped candidate only where the sweep tries it
(`sweep.candidate_applies`: where register_cap caps at that budget). One row per (direction, candidate,
shape, kernel, arch); the committed table is benchmarks/results/compile_check_candidates.txt. It compiles
every candidate at every shape for two archs, minutes on a few cores: a check to run before changing
sweep.CANDIDATES, too long for CI.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, NamedTuple

import torch

from swinv2_fast.kernels import tiles
from swinv2_fast.kernels.tiles import REGISTER_FILE, fused_backward_applies, fused_backward_supported

from . import cost, sweep
from .launches import (
    ARCHS,
    DTYPES,
    GATE_HEAD_DIMS,
    GEOMETRIES,
    KERNELS,
    PUBLISHED_GEOMETRIES,
    PUBLISHED_HEAD_DIM,
    SWIN2SR_GEOMETRIES,
    SWIN2SR_HEAD_DIMS,
    SWIN2SR_WINDOWS,
    WINDOW_SIZES,
    Spec,
    _grid,
    _torch_dtype,
    compile_launch,
    for_arch,
    launched,
    program_registers,
    reference_launches,
    resource_usage,
    run_spawned,
)


class Result(NamedTuple):
    spec: Spec
    arch: int
    tiles: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    error: str


def launchable_specs(head_dims=None, geometries=None, windows=None) -> List[Spec]:
    """The (kernel, dtype, head_dim, window, geometry) the gate compiles: the backward kernels where the fused
    backward serves the dtype and head dim on a GPU."""

    specs = []
    for dtype in DTYPES:
        for head_dim in head_dims or GATE_HEAD_DIMS:
            backward = fused_backward_supported(head_dim, _torch_dtype(dtype))
            for window in windows or WINDOW_SIZES:
                for geometry in geometries or GEOMETRIES:
                    specs += [
                        Spec(k, dtype, head_dim, window, geometry)
                        for k in KERNELS
                        if (backward or k == "fwd") and launched(k, window, head_dim, dtype, GEOMETRIES[geometry][0])
                    ]
    return specs


def published_specs(head_dims=None) -> List[Spec]:
    """The --published gate: Swin V2's head dim over every published window and geometry, and Swin2SR's head
    dims at its window and geometries (`head_dims` replaces both sets of head dims, over Swin V2's windows)."""
    if head_dims:
        return launchable_specs(head_dims, PUBLISHED_GEOMETRIES)
    return launchable_specs((PUBLISHED_HEAD_DIM,), PUBLISHED_GEOMETRIES) + launchable_specs(
        SWIN2SR_HEAD_DIMS, SWIN2SR_GEOMETRIES, SWIN2SR_WINDOWS
    )


def spec_launches(spec: Spec):
    """The recorded launches of the spec's kernel (see launches.reference_launches): one, or two on a shifted grid
    (windows off the shifted border, border windows), each its own specialisation."""

    padded, shifted, bias, order = GEOMETRIES[spec.geometry]
    grid = _grid(spec.window, padded)
    geometry = dict(
        grid_size=(grid, grid),
        window_size=(spec.window, spec.window),
        shift_size=(spec.window // 2 if shifted else 0,) * 2,
    )
    launches = reference_launches(
        spec.window, spec.dtype, spec.head_dim, geometry, bias=bias, pad_order=order, backward=spec.kernel != "fwd"
    )[spec.kernel]
    if spec.kernel == "fwd" and spec.dtype != "fp32":  # the forward reads the table as it arrives: the table of a
        # 16-bit model (above) and the fp32 table torch.autocast passes are two specialisations
        launches += reference_launches(
            spec.window,
            spec.dtype,
            spec.head_dim,
            geometry,
            bias=bias,
            pad_order=order,
            backward=False,
            table_dtype="fp32",
        )["fwd"]
    return launches


def check_register_file(registers: int, num_warps: int) -> None:
    """Raise where a program of num_warps warps at `registers` per thread needs more than an SM's register file
    (`launches.program_registers`): the driver would refuse the launch."""
    needed = program_registers(registers, num_warps)
    if needed > REGISTER_FILE:
        raise RuntimeError(
            f"{registers} registers x {num_warps} warps need {needed}, more than an SM's {REGISTER_FILE}: "
            "the launch would fail"
        )


def compile_spec(spec: Spec, arch: int) -> Result:

    tiles = ""
    try:
        # as sm_<arch> runs them: sm_80's table kernel may take other tiles and warps than recorded (`for_arch`)
        launches = [for_arch(launch, arch) for launch in spec_launches(spec)]
        a = launches[0].kwargs
        tiles = f"{a['BLOCK_M']},{a['BLOCK_N']},{a['num_warps']}"
        registers = spills = shared = 0
        for launch in launches:  # the largest figures of the spec's specialisations
            compiled, usage, sass = compile_launch(launch, arch)
            regs, spill = resource_usage(usage, sass)
            check_register_file(regs, launch.kwargs["num_warps"])
            registers, spills = max(registers, regs), max(spills, spill)
            shared = max(shared, int(compiled.metadata.shared))
        return Result(spec, arch, tiles, registers, spills, shared, "")
    except Exception as exc:  # reported in the table and in the exit status
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        where = f"{lines[0]} " if len(lines) > 1 else ""  # a CompilationError: location first, cause last
        return Result(spec, arch, tiles, -1, -1, -1, f"{type(exc).__name__}: {where}{lines[-1][:200]}")


def _compile_star(args):
    return compile_spec(*args)


def run(specs: List[Spec], jobs: int) -> List[Result]:
    return run_spawned(_compile_star, [(spec, arch) for spec in specs for arch in ARCHS], jobs)


def format_table(results: List[Result]) -> str:
    lines = [
        f"{'kernel':<10} {'dtype':<5} {'head_dim':>8} {'window':>6} {'geometry':<28} {'tiles (M,N,warps)':>17} "
        f"{'arch':<6} {'regs':>5} {'spill B':>8} {'smem B':>7}"
    ]
    for r in results:
        s = r.spec
        row = f"{s.kernel:<10} {s.dtype:<5} {s.head_dim:>8} {s.window:>6} {s.geometry:<28} {r.tiles:>17} sm_{r.arch:<3}"
        if r.error:
            lines.append(f"{row} FAILED {r.error}")
        else:
            lines.append(f"{row} {r.registers:>5} {r.spill_bytes:>8} {r.shared_bytes:>7}")
    return "\n".join(lines)


class CandidateResult(NamedTuple):
    direction: str
    config: tuple
    shape: str
    n: int
    kernel: str
    arch: int
    registers: int
    spill_bytes: int
    error: str


def candidate_work():
    """(direction, candidate, shape) the --candidates gate compiles: every candidate at every sweep shape, the
    backward's where the fused kernel does not run (a candidate sets the four kernels' tiles or the dk/dv
    kernel's)."""
    return [
        (direction, tuple(config), shape)
        for shape in sweep.SHAPES
        for direction, configs in sweep.CANDIDATES.items()
        for config in configs
        if direction == "fwd" or not fused_backward_applies(shape.window**2, shape.head_dim, torch.bfloat16)
    ]


def compile_candidate(direction: str, config: tuple, shape) -> List[CandidateResult]:
    """Compile a candidate's launches at a sweep shape for every arch (the candidate set as the override)."""

    n = shape.window**2
    key = sweep.entry_key("bf16", shape.head_dim, n, direction)
    geometry = dict(
        grid_size=(shape.grid, shape.grid),
        num_heads=shape.heads,
        window_size=(shape.window, shape.window),
        shift_size=(shape.window // 2,) * 2,
    )
    # where the sweep tries it (decided from register_cap before the candidate is set as the override)
    archs = [
        arch
        for arch in ARCHS
        if sweep.candidate_applies(config, n, shape.head_dim, _torch_dtype("bf16"), direction == "bwd", arch)
    ]
    if not archs:
        return []
    results = []
    tiles.TILE_OVERRIDES[key] = config
    try:
        try:
            found = reference_launches(
                shape.window, "bf16", shape.head_dim, geometry, bias=True, backward=direction == "bwd"
            )
        except Exception as exc:
            return [
                CandidateResult(
                    direction, config, shape.name, n, "-", 0, -1, -1, f"{type(exc).__name__}: {str(exc)[:200]}"
                )
            ]
        # the rows kernel keeps its own tiles (tiles.ROWS_TILES): a backward candidate sets the dk/dv kernel's
        launches = [
            launch
            for kernel, ls in found.items()
            for launch in ls
            if (kernel == "fwd") == (direction == "fwd") and kernel != "bwd_rows"
        ]
        for arch in archs:
            for launch in launches:
                a = launch.kwargs
                if (a["BLOCK_M"], a["BLOCK_N"], a["num_warps"], a.get("num_stages")) != (
                    config[0],
                    config[1],
                    config[2],  # recorded for sm_90 (`for_arch` gives sm_80's table kernel its own tiles)
                    config[4],
                ):
                    raise RuntimeError(f"{key}: the launch of {launch.kernel} did not take the candidate {config}")
                try:
                    _, usage, sass = compile_launch(launch, arch)
                    regs, spill = resource_usage(usage, sass)
                    check_register_file(regs, for_arch(launch, arch).kwargs["num_warps"])
                    results.append(
                        CandidateResult(direction, config, shape.name, n, launch.kernel, arch, regs, spill, "")
                    )
                except Exception as exc:
                    lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
                    results.append(
                        CandidateResult(
                            direction,
                            config,
                            shape.name,
                            n,
                            launch.kernel,
                            arch,
                            -1,
                            -1,
                            f"{type(exc).__name__}: {lines[-1][:200]}",
                        )
                    )
    finally:
        del tiles.TILE_OVERRIDES[key]
    return results


def _compile_candidate_star(args):
    return compile_candidate(*args)


def candidates_report(jobs: int) -> int:
    results = [r for rs in run_spawned(_compile_candidate_star, candidate_work(), jobs) for r in rs]
    print(
        f"{'dir':<4} {'candidate (M,N,warps,maxnreg,stages)':<38} {'shape':<14} {'N':>4} {'kernel':<10} "
        f"{'arch':<6} {'regs':>5} {'spill B':>8}"
    )
    for r in results:
        row = f"{r.direction:<4} {r.config!s:<38} {r.shape:<14} {r.n:>4} {r.kernel:<10} sm_{r.arch:<3}"
        print(f"{row} FAILED {r.error}" if r.error else f"{row} {r.registers:>5} {r.spill_bytes:>8}")
    failed = [r for r in results if r.error]
    spilled = [r for r in results if not r.error and r.spill_bytes > 0]
    print(f"\n{len(results)} compilations: {len(failed)} failed, {len(spilled)} with spills")
    print("(on sm_80 the table kernel compiles its own tiles and warps: tiles.table_kernel_tiles, launches.for_arch)")
    return 1 if failed or spilled else 0


def cost_report(jobs: int, only: str = "", histogram: bool = False) -> int:

    # keyword arguments of cost.cost_table, each a tuple of what one --only filter names
    chosen: Dict[str, Any] = dict(kernels=cost.COST_KERNELS, dtypes=cost.COST_DTYPES, windows=None, archs=(80, 90))
    for item in filter(None, only.split(",")):
        key, value = item.split("=")
        chosen[key + "s"] = tuple(int(v) if key in ("window", "arch", "head_dim") else v for v in value.split("+"))
    costs = cost.cost_table(jobs, **chosen)
    print(cost.format_cost(costs))
    print("\n".join(cost.backward_sum(costs)))
    if histogram:
        print("\n".join(c.opcode_line() for c in costs if not c.error))
    failed = [c for c in costs if c.error]
    spilled = [c for c in costs if not c.error and c.spill_bytes > 0]
    print(f"\n{len(costs)} compilations: {len(failed)} failed, {len(spilled)} with spills")
    return 1 if failed or spilled else 0


def calibration_report(path: str) -> int:
    """The cost model on Triton's fused-attention tutorial against its published H100 throughput (see
    cost.PUBLISHED_TUTORIAL); compiled in a fresh process without the interpreter."""

    (lines,) = run_spawned(cost.calibration_table, [path], 1)
    print("\n".join(lines))
    return 0


def models_report(jobs: int) -> int:
    """The window-attention op over whole models (cost.model_summary)."""

    print(
        f"# Window attention over whole models: python -m tools.compile_check --models "
        f"(batch {cost.SUMMARY_BATCH}, {cost.SUMMARY_DTYPE}, sm_{cost.SUMMARY_ARCH}, head_dim 32; H200 estimates)"
    )
    print(
        "# each stage shape's launches recorded from the host functions and compiled (not scaled from the "
        "reference launch); totals = per-block costs x blocks"
    )
    print("\n".join(cost.model_summary(jobs)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--published",
        action="store_true",
        help=f"the gate over the published models: Swin V2's head_dim {PUBLISHED_HEAD_DIM}, geometries "
        f"{', '.join(PUBLISHED_GEOMETRIES)}; Swin2SR's head dims {SWIN2SR_HEAD_DIMS} at window "
        f"{SWIN2SR_WINDOWS[0]}, geometries {', '.join(SWIN2SR_GEOMETRIES)}",
    )
    parser.add_argument(
        "--head-dims",
        default="",
        help=f"comma-separated head dims for the gate (default: {GATE_HEAD_DIMS}; with --published, "
        "replaces its head dims)",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="the static cost report (instructions per score, traffic model; see tools/cost.py)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="with --cost: comma-separated filters kernel=,dtype=,head_dim=,window=,arch= (values joined by +)",
    )
    parser.add_argument(
        "--histogram",
        action="store_true",
        help="with --cost: each kernel's SASS instructions per score by opcode (an `opcodes` line each)",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="the GPU tile sweep's candidates (tools/sweep.py CANDIDATES) at its shapes",
    )
    parser.add_argument(
        "--calibrate",
        metavar="TUTORIAL",
        default="",
        help="the cost model on Triton's fused-attention tutorial (the path of its "
        "python/tutorials/06-fused-attention.py) against published H100 throughput",
    )
    parser.add_argument(
        "--models",
        action="store_true",
        help="the window-attention op over whole SwinV2-T/B/L forwards and training steps "
        "(estimates and floors; see tools/cost.py model_summary)",
    )
    args = parser.parse_args(argv)
    if args.models:
        return models_report(args.jobs)
    if args.calibrate:
        return calibration_report(args.calibrate)
    if args.candidates:
        return candidates_report(args.jobs)
    if args.cost:
        return cost_report(args.jobs, args.only, args.histogram)
    head_dims = tuple(int(h) for h in args.head_dims.split(",") if h) or None
    if args.published:
        specs = published_specs(head_dims)
    else:
        specs = launchable_specs(head_dims)
    results = run(specs, args.jobs)
    print(format_table(results))
    failed = [r for r in results if r.error]
    spilled = [r for r in results if not r.error and r.spill_bytes > 0]
    print(
        f"\n{len(results)} compilations ({len(specs)} specializations x {len(ARCHS)} archs, Triton "
        f"{tiles.triton_version()}): {len(failed)} failed, {len(spilled)} with spills; max registers "
        f"{max((r.registers for r in results if not r.error), default=0)}, max shared memory "
        f"{max((r.shared_bytes for r in results if not r.error), default=0)} B"
    )
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
