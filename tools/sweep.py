"""Tile sweep on a GPU: time the candidate tile configurations at the benchmark shapes and record the fastest.

    python -m tools.sweep OUT_DIR [--budget SECONDS]    # writes OUT_DIR/tuned_tiles.json (from the repository root)

The candidates live in one table (CANDIDATES), the launches' defaults among them, so a pick is never slower than
the default at the shape it was timed on; where the forward runs whole-window programs (`tiles.forward_window_tiles`:
windows 12 and 16 on sm_90), which any forward override replaces, they are timed too, and nothing is recorded for that
shape's forward when they are the fastest. The forward and the backward are swept separately; a backward
candidate sets the tiles of all four backward kernels together (they share one tile shape: the
probabilities they recompute are then bitwise the same), or of the dk/dv kernel where the rows kernel runs
(`rows_backward_applies`: it keeps its own tiles, `rows_tiles`). Each configuration is timed with
`triton.testing.do_bench` after a warm-up launch that compiles it. Shapes are swept in order until the
budget (default 50 s) is spent; a shape is recorded only if all its candidates were timed.

The result, committed as `kernels/tuned_tiles.json` (package data of swinv2_fast.kernels), is read by `block_config` and
`register_cap` on a CUDA device (never under the interpreter, whose tests keep one fixed configuration):
entries keyed "<dtype>/hd<head_dim>/N<n>/<fwd|bwd>" -> [BLOCK_M, BLOCK_N, num_warps, maxnreg, num_stages]
(a malformed entry raises, naming the file and the key). A recorded entry passes its num_stages to the
launch; without a record the tiles, register cap and num_stages are the tables' (`block_config`,
`register_cap`, `launch_stages`: the best-scoring candidates of the static cost report, `python -m
tools.compile_check --cost`; a num_stages of None passes none, Triton's default, 3 on CUDA).

Spills: the warm-up launch returns each kernel's CompiledKernel (JITFunction.run returns it in triton 3.6
and 3.8); the sweep reads the spill bytes of its cubin as the spill gate does (`launches.resource_usage`:
local-memory stores and loads in the SASS) and rejects a candidate that spills at that shape (logged).

The backward candidates set the four-kernel backward's tiles (the dk/dv kernel's where the rows kernel runs).
Where the one fused backward kernel runs
(`fused_backward_applies`: fp16/bf16 windows of 64 tokens or at most 32, head dims up to 32, and of 49 tokens
at head_dim 32 with Triton 3.8 or later; fp32 windows of 64 tokens at head_dim 32 and 16) it fixes its own
tiles, warps and num_stages=1, so a "bwd" candidate changes nothing there: the sweep times no "bwd" candidate
at such a shape, says so in its log and records nothing for it (SHAPES' N = 64 rows record "fwd" only, and with
Triton 3.8 or later the N = 49 row).
Every candidate compiles without spills at SHAPES for sm_80 and sm_90 where the sweep tries it, with Triton 3.8
(`python -m tools.compile_check --candidates`; a register-capped candidate is tried only where `register_cap`
caps at its budget: `candidate_applies`). With Triton 3.6 (the GPU machine's) one of 360 spills: the
four-kernel backward's (64, 64, 4, 255, 2), its table kernel at N = 49 on sm_90 (104 B; with 3.8 window 7 runs
the fused backward instead); the sweep rejects it where it runs, as it rejects any candidate that spills.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from swinv2_fast.kernels import tiles
from swinv2_fast.kernels.geometry import WindowGeometry
from swinv2_fast.kernels.launch import device_arch
from swinv2_fast.kernels.tiles import INTERPRETED, MAXNREG, block_config, fused_backward_applies, register_cap
from swinv2_fast.kernels.triton_backward import window_attention_triton_backward
from swinv2_fast.kernels.triton_forward import window_attention_triton_forward

from .launches import _short, _torch_dtype, cubin_listings, replaced_kernels, resource_usage

# (BLOCK_M, BLOCK_N, num_warps, maxnreg, num_stages). The defaults of block_config/register_cap/launch_stages
# are among them: the forward's (64, 64, 4, 128, 3) at N = 64 on sm_90 and (128, 64, 8, 128, 3) where 128
# divides N on sm_90 (3: what the launches get without passing any, Triton's default on CUDA), its
# (64, 64, 4, 255, 1) (N = 49, 576) and (64, 32, 4, 128, 1) (N = 144 on sm_90 at head_dim 16; at head_dim 32 the
# default there, as at N = 256, is the whole-window programs, timed beside the candidates); the 16-bit backward's
# (64, 64, 4, 255, 1) at head_dim 32 at N = 49 and beyond N = 64. Variants of those: other num_stages (1: no software
# pipelining, fewer live registers), register caps and warps, and the earlier defaults (the forward's
# (64, 64, 4, 255, 3), the backward's (64, 32, 8, 255, 3)). (The backward's (64, 64, 4) tiles with 3 stages spill on
# sm_80 at N = 144 and 576.)
# A candidate that spills at a sweep shape on sm_80 or sm_90 with a supported Triton is not in the table
# (`python -m tools.compile_check --candidates`; the committed rows: benchmarks/results/
# compile_check_candidates.txt): e.g. 128 query rows over 4 warps at 255 registers hold too many live values.
CANDIDATES: Dict[str, List[Tuple[int, int, int, int, int]]] = {
    "fwd": [
        (64, 64, 4, 255, 3),
        (128, 64, 8, 128, 3),
        (64, 32, 4, 255, 3),
        (128, 64, 8, 255, 3),
        (64, 64, 8, 255, 3),
        (64, 64, 4, 128, 3),
        (64, 64, 4, 255, 2),
        (128, 64, 8, 128, 2),
        (64, 64, 4, 255, 1),
        (64, 32, 4, 128, 1),
        (64, 32, 4, 255, 1),
        (64, 32, 2, 255, 1),
    ],
    "bwd": [(64, 64, 4, 255, 1), (64, 64, 4, 255, 2), (64, 32, 8, 255, 3), (64, 32, 8, 255, 1), (32, 32, 4, 255, 3)],
}


def candidate_applies(config, n: int, head_dim: int, dtype, backward: bool, arch: int) -> bool:
    """Whether a candidate is tried at a shape on sm_<arch>: uncapped ones (maxnreg MAXNREG) everywhere; a
    register-capped one only where `register_cap` itself caps at that budget, on the tiles the cap was checked
    with there (block_config's: the 16-bit forward's (64, 64, 4) at N = 64, (128, 64, 8) where 128 divides N,
    (64, 32, 4) at N = 144 and head_dim 16, on sm_90 with triton 3.8; elsewhere a 128-register cap spills: see
    register_cap).
    Asked with no override set for that shape (register_cap and block_config would return the override's)."""
    if config[3] >= MAXNREG:
        return True
    return register_cap(n, head_dim, dtype, backward, arch) == config[3] and tuple(config[:3]) == block_config(
        n, head_dim, dtype, backward, arch
    )


class SweepShape(NamedTuple):
    name: str
    batch: int
    grid: int
    heads: int
    head_dim: int
    window: int


# stage 1 of the published models (the op benchmark's shapes; head_dim 32 throughout), most common first
SHAPES = (
    SweepShape("tiny-w8-256", 32, 64, 3, 32, 8),
    SweepShape("base-w16-256", 32, 64, 4, 32, 16),
    SweepShape("tiny-w12-192", 32, 48, 3, 32, 12),
    SweepShape("base-w24-384", 16, 96, 4, 32, 24),
    SweepShape("tiny-w7-224", 32, 56, 3, 32, 7),
)


def entry_key(dtype: str, head_dim: int, n: int, direction: str) -> str:
    return f"{dtype}/hd{head_dim}/N{n}/{direction}"


def _inputs(shape: SweepShape, dtype, device):
    import torch

    C = shape.heads * shape.head_dim
    n = shape.window * shape.window
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(shape.batch, shape.grid * shape.grid, 3 * C, generator=gen).to(device, dtype)
    bias = (0.1 * torch.randn(3 * C, generator=gen)).to(device, dtype)
    logit_scale = torch.log(10 * torch.ones(shape.heads, 1, 1)).to(device)
    table = torch.randn(shape.heads, n, n, generator=gen).to(device, dtype)  # a bf16/fp16 model's table
    grad_out = torch.randn(shape.batch, shape.grid * shape.grid, C, generator=gen).to(device, dtype)
    geometry = WindowGeometry.from_args((shape.grid, shape.grid), shape.heads, shape.window, shape.window // 2)
    return qkv, bias, logit_scale, table, grad_out, geometry


def _do_bench(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


@contextlib.contextmanager
def capturing_launches():
    """Launch as usual, and collect (kernel short name, what the launch returned) for each launch of a
    `*_kernel` global of the kernel modules: the CompiledKernel on a GPU (triton 3.6 and 3.8)."""
    captured: List[Tuple[str, object]] = []

    class _Capture:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                result = self.fn[grid](*args, **kwargs)
                captured.append((_short(self.name), result))
                return result

            return launch

    with replaced_kernels(_Capture):
        yield captured


def compiled_spill_bytes(compiled) -> int:
    """Spill bytes of a CompiledKernel's cubin, as the spill gate counts them (`launches.resource_usage`)."""
    return resource_usage(*cubin_listings(compiled.asm["cubin"]))[1]


def launch_spills(fn) -> Dict[str, int]:
    """Run fn (the warm-up launch, which compiles) and return the spill bytes of each kernel it launched."""
    with capturing_launches() as captured:
        fn()
    spills: Dict[str, int] = {}
    for name, compiled in captured:
        if compiled is None or not hasattr(compiled, "asm"):
            raise RuntimeError(
                f"the launch of {name} returned {compiled!r}, not a CompiledKernel: the sweep needs "
                "compiled kernels on a CUDA device"
            )
        spills[name] = max(spills.get(name, 0), compiled_spill_bytes(compiled))
    return spills


def sweep(
    budget_s: float = 50.0,
    shapes: Sequence[SweepShape] = SHAPES,
    dtype_name: str = "bf16",
    device: str = "cuda",
    timer: Callable = _do_bench,
    candidates=None,
    log=print,
    spill_reader: Callable = launch_spills,
) -> Dict[str, list]:
    """Time every candidate of each direction at each shape until the budget is spent; the fastest per
    (shape, direction) among those that do not spill, as entries for tuned_tiles.json. `spill_reader(fn)`
    runs the warm-up launch fn and returns {kernel: spill bytes}; a candidate with spills is not timed."""
    import torch

    candidates = candidates or CANDIDATES
    dtype = _torch_dtype(dtype_name)
    arch = device_arch(torch.empty(0, device=device))
    start = time.monotonic()
    entries: Dict[str, list] = {}
    for shape in shapes:
        qkv, bias, logit_scale, table, grad_out, geometry = _inputs(shape, dtype, device)
        op_args = geometry.as_op_args()
        n = shape.window * shape.window
        runs = {
            "fwd": functools.partial(window_attention_triton_forward, qkv, bias, logit_scale, table, *op_args),
            "bwd": functools.partial(
                window_attention_triton_backward, grad_out, qkv, bias, logit_scale, table, *op_args
            ),
        }
        for direction, fn in runs.items():
            key = entry_key(dtype_name, shape.head_dim, n, direction)
            if direction == "bwd" and fused_backward_applies(n, shape.head_dim, dtype):
                log(
                    f"sweep: {shape.name} {key}: the fused backward kernel runs at this shape (its own tiles, "
                    f"warps and num_stages=1): no bwd candidate has an effect; nothing timed or recorded"
                )
                continue
            times: Dict[Union[str, Tuple[int, ...]], float] = {}
            if direction == "fwd":
                # the whole-window programs, which a record or any fwd override replaces: timed first with the record
                # masked (an override of None), and where they are the fastest nothing is recorded (the default stays)
                tiles.TILE_OVERRIDES[key] = None
                try:
                    if tiles.forward_window_tiles(n, shape.head_dim, dtype, arch) is not None:
                        _time_candidate(WHOLE_WINDOW, key, fn, times, timer, spill_reader, log, device)
                finally:
                    del tiles.TILE_OVERRIDES[key]
            for config in candidates[direction]:
                if time.monotonic() - start > budget_s:
                    log(f"sweep: budget of {budget_s:.0f} s spent; {key} and later shapes not recorded")
                    return entries
                if not candidate_applies(config, n, shape.head_dim, dtype, direction == "bwd", arch):
                    log(
                        f"sweep: {key} {tuple(config)} not tried: its register cap is not checked for spills "
                        f"with these tiles at this shape on sm_{arch} (register_cap, block_config)"
                    )
                    continue
                tiles.TILE_OVERRIDES[key] = tuple(config)
                try:
                    _time_candidate(tuple(config), key, fn, times, timer, spill_reader, log, device)
                finally:
                    del tiles.TILE_OVERRIDES[key]
            if not times:
                log(f"sweep: {shape.name} {key}: no candidate timed; nothing recorded")
                continue
            best = min(times, key=times.__getitem__)
            if not isinstance(best, str):  # a candidate's tiles (the whole-window default is recorded as nothing)
                entries[key] = list(best)
            log(
                f"sweep: {shape.name} {key}: "
                + ", ".join(f"{c}={t * 1000:.1f}us" for c, t in times.items())
                + (f" -> {best}" if best != WHOLE_WINDOW else " -> the whole-window default; nothing recorded")
            )
    return entries


WHOLE_WINDOW = "whole-window"  # the forward's whole-window programs (tiles.forward_window_tiles) among the timings


def _time_candidate(config, key, fn, times, timer, spill_reader, log, device) -> None:
    """Time fn (the launch as the overrides set it) into times[config], unless its warm-up launch spills or
    fails (logged)."""
    import torch

    try:
        spills = spill_reader(fn)  # the warm-up launch: compiles
        torch.cuda.synchronize() if device == "cuda" else None
        spilled = {k: b for k, b in spills.items() if b > 0}
        if spilled:
            log(
                f"sweep: {key} {config} rejected: spills " + ", ".join(f"{k} {b} B" for k, b in sorted(spilled.items()))
            )
            return
        times[config] = timer(fn)
    except Exception as exc:  # a candidate that does not compile or launch is not a pick
        log(f"sweep: {key} {config} failed: {type(exc).__name__}: {str(exc).splitlines()[-1][:200]}")


def write(entries: Dict[str, list], path: str, device_name: str, arch: int) -> None:
    """The record: the device's name, its architecture and the Triton version (a record applies only where
    both match: `load_tuned_tiles`), and the entries."""
    import triton

    with open(path, "w") as fh:
        json.dump(
            {"device": device_name, "arch": f"sm_{arch}", "triton": triton.__version__, "entries": entries},
            fh,
            indent=1,
            sort_keys=True,
        )
        fh.write("\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--budget", type=float, default=50.0, help="seconds of sweeping (compiles included)")
    args = parser.parse_args(argv)
    import torch

    if INTERPRETED or not torch.cuda.is_available():
        print(
            "tools.sweep: needs a CUDA device and compiled kernels (TRITON_INTERPRET unset); nothing written",
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    entries = sweep(args.budget)
    path = os.path.join(args.out_dir, "tuned_tiles.json")
    major, minor = torch.cuda.get_device_capability()
    write(entries, path, torch.cuda.get_device_name(), 10 * major + minor)
    print(f"sweep: {len(entries)} entries -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
