"""The fused kernels' policy, without Triton: what they serve, which tiles and options each launch takes, and
which backward kernels run.

Plain Python and torch only, so that the dispatch (swinv2_fast/functional.py) asks its questions here at
import time on any machine, Triton installed or not; the Triton files (triton_forward.py, triton_backward.py)
and the launch arguments (launch.py) read their tiles from here.

- Capability: `head_dim_supported` / `MAX_HEAD_DIM`, `fused_backward_supported`, `INTERPRETED`.
- Tiles: the forward's and the backward's tables, `block_config`, `launch_stages`, `register_cap` /
  `MAXNREG`, `channel_block`; a GPU tile sweep's record (`TUNED_TILES_PATH`, `load_tuned_tiles`) and the
  overrides the sweep sets while it times a candidate (`TILE_OVERRIDES`).
- The fused backward's rule: `fused_backward_applies` and its tile (`fused_block`, `fused_num_warps`), and
  `backward_kernels`, the kernels a backward launches.

The registers and spill bytes behind each table are in the committed compile-check tables
(benchmarks/results/compile_check.txt, compile_check_candidates.txt; `python -m tools.compile_check`), their
costs in benchmarks/results/cost_report.txt (`python -m tools.compile_check --cost`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "FUSED_DTYPES",
    "FUSED_MAX_BLOCK_D",
    "FUSED_MAX_N",
    "FUSED_PROGRAMS",
    "INTERPRETED",
    "MAXNREG",
    "MAX_HEAD_DIM",
    "REGISTER_FILE",
    "ROWS_TILES",
    "TABLE_PROGRAMS",
    "TILE_OVERRIDES",
    "TUNED_FIELDS",
    "TUNED_TILES_PATH",
    "backward_kernels",
    "block_config",
    "channel_block",
    "dkdv_query_tail",
    "forward_query_tail",
    "forward_window_tiles",
    "fused_backward_applies",
    "fused_backward_supported",
    "fused_block",
    "fused_num_warps",
    "head_dim_supported",
    "launch_stages",
    "load_tuned_tiles",
    "program_register_budget",
    "register_cap",
    "rows_backward_applies",
    "rows_channel_block",
    "rows_tiles",
    "table_kernel_tiles",
    "tuned_entry",
    "window_groups",
]

# The head dims the kernels serve: every one from 1 to MAX_HEAD_DIM. The kernels' channel tiles are BLOCK_D =
# channel_block(head_dim) wide, a power of two of at least 16 (tl.arange and tl.dot need one); a head dim
# below it (10, 24, 30, 48, 96, ...) runs masked in that tile. This is the rule the dispatch asks
# (swinv2_fast.functional): stated here only.
MAX_HEAD_DIM = 128


def head_dim_supported(head_dim: int) -> bool:
    """Whether the fused kernels run heads of `head_dim` channels (1 to MAX_HEAD_DIM)."""
    return 1 <= head_dim <= MAX_HEAD_DIM


def channel_block(head_dim: int) -> int:
    """BLOCK_D, the kernels' channel tile for `head_dim`: the next power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


# Whether the kernels run under Triton's interpreter (CPU tensors), read once, when swinv2_fast is imported.
# Triton reads the same variable when it decorates a kernel, i.e. when the Triton files are imported; they
# refuse to import under another value than this one (triton_common.py), so the dispatch and the kernels
# never disagree.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_M, BLOCK_N, num_warps) per channel tile BLOCK_D = channel_block(head_dim), chosen with the compile
# check as the largest tiles that compile without register spills for sm_80 and sm_90 (registers in the
# compile-check table). A window of N tokens takes ceil(N / BLOCK_M) query blocks and streams ceil(N / BLOCK_N)
# key blocks; a tile that does not divide N is masked. The 16-bit forward at head_dim <= 32 picks its tiles by
# N (_forward_tiles_16bit).
_TILES_16BIT = {16: (64, 32, 4), 32: (64, 32, 4), 64: (32, 32, 8), 128: (16, 32, 8)}
_TILES_FP32 = {16: (32, 32, 8), 32: (32, 32, 8), 64: (16, 16, 8), 128: (16, 16, 8)}
# The fp32 forward at head_dim 32 (IEEE dots: FFMA on the CUDA cores, operands read from shared memory) runs
# (64, 32, 4) tiles with one stage instead (whole channel tiles: at head_dim 30 window 7 spilled 32-64 B on sm_90 on
# padded shifted grids): each thread computes a larger block of every dot, fewer shared-memory
# loads per FFMA. By the static cost report (fp32, head_dim 32, sm_90, H200 estimate over the forward floor) from
# (32, 32, 8) with Triton's 3 stages: N = 49 3.93 -> 2.60, 64 2.39 -> 1.60, 144 2.82 -> 2.34, 256 2.07 -> 1.47,
# 576 2.14 -> 1.50 (at N = 64 (64, 64, 8) was 1.70, (64, 32, 8) 1.97, (64, 16, 4) 1.78; (64, 64, 4) spilled).
_FWD_TILES_FP32_32 = (64, 32, 4)
_FWD_STAGES_FP32_32 = 1


def _fp32_forward_32(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the forward takes _FWD_TILES_FP32_32 and _FWD_STAGES_FP32_32 (fp32 at head_dim 32)."""
    return dtype == torch.float32 and head_dim == 32


_TILES_FP64 = {16: (16, 16, 4), 32: (16, 16, 4), 64: (16, 16, 4), 128: (16, 16, 4)}
# The backward kernels (dq, dk/dv, bias table and scale) hold more live tiles: their own table, from the
# same compile check. fp32 backward with head_dim 64 or 128 has no spill-free tile (IEEE fp32 dots keep
# their operands in registers), and fp64 is a gradcheck dtype: on a GPU those go to the eager path by design
# (`fused_backward_supported`); under the interpreter every dtype and head dim runs. The four backward
# kernels share one tile shape: the probabilities they recompute are then bitwise the same.
_BWD_TILES_16BIT = {16: (64, 32, 4), 32: (64, 32, 8), 64: (32, 16, 8), 128: (16, 32, 8)}
_BWD_TILES_FP32 = {16: (32, 16, 8), 32: (16, 32, 8)}
# The 16-bit backward at head_dim 17 to 32 (at N = 49: 32 only) on the published windows but window 8's (N = 49,
# 144, 256, 576) runs (64, 64, 4) tiles with num_stages 1, no software pipelining of the block loops
# (`_backward_tiles_16bit`, `launch_stages`). By the static cost report (bf16, head_dim 32, sm_90, the four
# kernels together, H200 estimate over the backward floor) they took the backward at N = 144, 256 and 576 from
# 24.0, 16.3 and 18.6 to 13.2, 7.1 and 8.6 (from (64, 32, 8) with Triton's 3 stages; 3 stages were 2-7% above 1),
# and at N = 49 from 9.7 to 4.3 (from (64, 32, 8): half the warps, and one key tile per window instead of two;
# 3.65 with every backward kernel's launches split at the shifted border).
# At N = 144 and 256 only the dk/dv kernel runs them (the rows kernel does the rest: `rows_backward_applies`; at
# N = 144 the dk/dv kernel's last 16 query rows run as a block of their own, `dkdv_query_tail`); at
# N = 49 with Triton 3.8 or later the fused kernel runs instead (`fused_backward_applies`). On sm_80 the table
# kernel runs its own (`table_kernel_tiles`). Only at the windows the spill gate compiles
# (python -m tools.compile_check --published).
_BWD_WIDE_TILES = (64, 64, 4)
_BWD_WIDE_STAGES = 1
_BWD_WIDE_N = (49, 144, 256, 576)
# N = 49 with a masked channel tile (head_dim 30 in 32; no published model) spills 80-400 B in the table kernel on
# sm_90 with Triton 3.6: there the wide tiles serve whole channel tiles only.
_BWD_WIDE_WHOLE_CHANNELS_N = (49,)
# Register budget per thread handed to ptxas (.maxnreg). Without it ptxas may cap 8-warp kernels at 128
# registers and spill; 255 x 256 threads still fits one SM's 64K registers. Kernels that fit in 128
# without spilling are capped there (twice the resident warps of 255): `register_cap`.
MAXNREG = 255
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90): a program's threads share them


def program_register_budget(num_warps: int, cap: int = MAXNREG) -> int:
    """`cap`, lowered to what a program of num_warps warps can hold on one SM: 128 registers per thread over 16
    warps (a build over that would not launch)."""
    return min(cap, REGISTER_FILE // (32 * num_warps))


@functools.cache
def triton_version() -> str:
    """The installed Triton's version string. Imported here, on first use (a launch, a compile check, a tuned
    record read on a GPU), where Triton is needed anyway: at this module's import it would make the dispatch
    need Triton."""
    import triton

    return triton.__version__


def _triton_release() -> Tuple[int, int]:
    """(major, minor) of the installed Triton; (0, 0) where Triton does not import (the rules that ask then answer
    as for an old release: nothing runs the kernels there anyway)."""
    try:
        version = triton_version()
    except ImportError:
        return 0, 0
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _wide_backward(n: int, head_dim: int) -> bool:
    """Whether the 16-bit backward runs `_BWD_WIDE_TILES` with `_BWD_WIDE_STAGES`: channel tiles of 32 and N in
    `_BWD_WIDE_N`, at N = 49 whole ones only (head_dim 32)."""
    return (
        channel_block(head_dim) == 32 and n in _BWD_WIDE_N and (n not in _BWD_WIDE_WHOLE_CHANNELS_N or head_dim == 32)
    )


def _backward_tiles_16bit(n: int, head_dim: int) -> Tuple[int, int, int]:
    """The 16-bit backward's tiles: `_BWD_WIDE_TILES` where `_wide_backward`, the table elsewhere."""
    return _BWD_WIDE_TILES if _wide_backward(n, head_dim) else _BWD_TILES_16BIT[channel_block(head_dim)]


def _forward_tiles_16bit(n: int) -> Tuple[int, int, int]:
    """The 16-bit forward at head_dim <= 32, by the static cost report (benchmarks/results/cost_report.txt):
    128 query rows over 8 warps where they divide N (fewer instructions per score at N = 256); 64 rows over 4
    warps with 64-wide key tiles where 64 divides N or one key block holds the window (N = 49, 64, 576);
    elsewhere 32-wide key tiles (N = 144 = 2 x 64 + 16: the last key tile pads 16 keys instead of 48;
    est/floor 4.43 -> 3.90 on sm_90, under `register_cap`'s 128 registers: 16 resident warps per SM. Over 2
    warps it was 3.47 by the model, but 201 registers: 8 resident warps, too few to hide latency). At head_dim
    32 on sm_90 N = 144 and 256 run whole-window programs instead (`forward_window_tiles`), these tiles on sm_80."""
    if n % 128 == 0:
        return (128, 64, 8)
    if n <= 64 or n % 64 == 0:
        return (64, 64, 4)
    return (64, 32, 4)


def _forward_stages_16bit(n: int) -> Optional[int]:
    """num_stages of the 16-bit forward at head_dim <= 32 without a record: 1 (no software pipelining: fewer
    instructions and registers; by the cost report est/floor 1.27 -> 1.15 at N = 49, 4.43 -> 3.90 at N = 144
    with its (64, 32, 4) tiles, 4.08 -> 3.84 at N = 576; the whole-window programs at N = 144 take it too,
    unmeasured with more) from N = 49 up, but at N = 64 (at its floor) and
    where 128 rows divide N (the whole-window programs at N = 256 too: not measured with 1); None (Triton's
    default) there and below N = 49 (not measured)."""
    return None if n < 49 or n == 64 or n % 128 == 0 else 1


# The 16-bit forward at head_dim 32 and N = 144 (window 12) and 256 (window 16) on sm_90 and later runs whole-window
# programs (`forward_window_tiles`, the kernel's WHOLE_WINDOW): a program loads and normalises a window's k and v
# once, as a 128-key tile and a tail (BLOCK_T: 16 keys at N = 144, 128 at N = 256), and runs the window's query rows
# in blocks of 64 over them, each row's scores whole (no online softmax; at N = 256 the tail's scores join the tile's
# by one online-softmax step, MERGE_TAIL: whole rows of 256 scores spill 40 B); at N = 144 the last 16 rows a block
# of their own (`forward_query_tail`). A shifted grid's border windows take their shift mask from the table (the
# host adds it to a copy per kind of border window): computed in the kernel, it spilled 16-32 B at N = 144 (with the
# 16-row block) and 72-120 B at N = 256. By the static cost report (bf16, sm_90, H200 estimate over the forward
# floor): N = 144 3.90 -> 1.91 (38.4 -> 18.8 instructions per score, k and v read once per window instead of once
# per query block). Only on sm_90, the architecture the spill gate compiles with wgmma; not on sm_80: there every
# warp holds the keys for its dots (mma.sync operands in registers; wgmma reads them from shared memory) and the
# build spills 64-224 B. 8 warps replicate the scores' rows and run twice the exponentials.
_FWD_WINDOW = {144: (64, 128, 16), 256: (64, 128, 128)}  # N -> (BLOCK_M, BLOCK_N, BLOCK_T), BLOCK_N + BLOCK_T == N
_FWD_WINDOW_WARPS = 4


def forward_window_tiles(n: int, head_dim: int, dtype: torch.dtype, arch: int) -> Optional[Tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_T, num_warps) of the forward's whole-window programs for windows of n tokens, heads
    of head_dim channels, the projection's dtype and sm_<arch> (see `_FWD_WINDOW`), or None (the row-block
    programs of `block_config`'s tiles; also where a tile sweep's record or an override sets the forward's
    tiles: an override of None masks a record, as the sweep does when it times these programs)."""
    if (
        n not in _FWD_WINDOW
        or head_dim != 32
        or dtype not in FUSED_DTYPES
        or arch != 90
        or _tuned(n, head_dim, dtype, False, arch) is not None
    ):
        return None
    return (*_FWD_WINDOW[n], _FWD_WINDOW_WARPS)


def forward_query_tail(n: int, block_m: int) -> int:
    """M_TAIL of a whole-window forward launch: the window's last n % block_m rows as a block of their own where
    that is a power of two of at least 16; else 0 (the last block masks its rows beyond the window)."""
    tail = n % block_m
    return tail if tail >= 16 and tail & (tail - 1) == 0 else 0


# Tiles set by the GPU tile sweep while it times a candidate (tools/sweep.py), then those it recorded
# (kernels/tuned_tiles.json, read on a CUDA machine with compiled kernels only, of the architecture and Triton
# version the sweep ran on: the current device's): "<dtype>/hd<head_dim>/N<n>/
# <fwd|bwd>" -> (BLOCK_M, BLOCK_N, num_warps, maxnreg, num_stages), for all four backward kernels at once, or the
# dk/dv kernel where the rows kernel runs with its own tiles (`rows_tiles`) (on
# sm_80 the table kernel may run its own tiles and warps: `table_kernel_tiles`). Without a
# record or override the launch gets the tables' tiles, `register_cap`'s budget and `launch_stages`'s
# num_stages (None for most: Triton's default, 3 on CUDA).
TUNED_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "maxnreg", "num_stages")
TILE_OVERRIDES: Dict[str, Optional[Tuple[int, int, int, int, int]]] = {}
TUNED_TILES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_tiles.json")


def tuned_entry(value, where: str) -> Tuple[int, int, int, int, int]:
    """One tuned configuration, checked: five positive integers in the order of TUNED_FIELDS."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != len(TUNED_FIELDS)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(
            f"{where}: expected {len(TUNED_FIELDS)} positive integers [{', '.join(TUNED_FIELDS)}], got {value!r}"
        )
    return tuple(value)


def load_tuned_tiles(path: str, arch: Optional[int] = None) -> Dict[str, Tuple[int, int, int, int, int]]:
    """The entries of a tile sweep's record ({"arch": "sm_90", "triton": "3.6.0", "entries": {key: [BLOCK_M,
    BLOCK_N, num_warps, maxnreg, num_stages]}, ...}); a malformed file or entry raises, naming the file and the
    key. With `arch`, a record swept on another architecture or with another Triton gives no entries: its
    picks (register caps above all) are only known to fit where they were timed and compiled."""
    with open(path) as fh:
        data = json.load(fh)
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f'{path}: expected a JSON object with an "entries" object, got {str(data)[:200]}')
    checked = {key: tuned_entry(value, f"{path}: entry {key!r}") for key, value in entries.items()}
    if arch is not None and (data.get("arch") != f"sm_{arch}" or data.get("triton") != triton_version()):
        return {}
    return checked


@functools.cache
def _recorded_tiles(arch: int) -> Dict[str, Tuple[int, int, int, int, int]]:
    if INTERPRETED or not os.path.exists(TUNED_TILES_PATH):
        return {}
    return load_tuned_tiles(TUNED_TILES_PATH, arch)


def _tuned(
    n: int, head_dim: int, dtype: torch.dtype, backward: bool, arch: Optional[int] = None
) -> Optional[Tuple[int, int, int, int, int]]:
    """An override, else the record of sm_<arch> (the current CUDA device's when None), if either has the key."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype)
    if name is None:
        return None
    key = f"{name}/hd{head_dim}/N{n}/{'bwd' if backward else 'fwd'}"
    if key in TILE_OVERRIDES:  # None: the tables' defaults, whatever a record says (the sweep times them so)
        value = TILE_OVERRIDES[key]
        return None if value is None else tuned_entry(value, f"TILE_OVERRIDES[{key!r}]")
    if INTERPRETED or not torch.cuda.is_available():
        return None
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    return _recorded_tiles(arch).get(key)


def block_config(
    n: int, head_dim: int, dtype: torch.dtype, backward: bool = False, arch: Optional[int] = None
) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for windows of n tokens, head_dim and the projection dtype, of the
    forward kernel or of the backward kernels: a tile sweep's record for sm_<arch> (default: the current CUDA
    device's) where there is one, else the tables."""
    tuned = _tuned(n, head_dim, dtype, backward, arch)
    if tuned is not None:
        return tuned[:3]
    block_d = channel_block(head_dim)
    if dtype == torch.float64:
        return _TILES_FP64[block_d]
    if backward and dtype == torch.float32:
        return _BWD_TILES_FP32.get(block_d, _TILES_FP32[block_d])  # beyond the table: interpreter only
    if backward:
        return _backward_tiles_16bit(n, head_dim)
    if _fp32_forward_32(head_dim, dtype):
        return _FWD_TILES_FP32_32
    if dtype != torch.float32 and block_d <= 32:
        return _forward_tiles_16bit(n)
    return (_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)[block_d]


def launch_stages(
    n: int, head_dim: int, dtype: torch.dtype, backward: bool = False, arch: Optional[int] = None
) -> Optional[int]:
    """num_stages for the launch: a tile sweep's record (as block_config's) or override where there is one,
    else the 16-bit forward's at head_dim <= 32 (`_forward_stages_16bit`) and the 16-bit backward's on wide
    tiles (`_BWD_WIDE_STAGES`), else None (the launch passes none: Triton's default, 3 on CUDA)."""
    tuned = _tuned(n, head_dim, dtype, backward, arch)
    if tuned is not None:
        return tuned[4]
    if not backward and _fp32_forward_32(head_dim, dtype):
        return _FWD_STAGES_FP32_32
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if backward:
        return _BWD_WIDE_STAGES if _wide_backward(n, head_dim) else None
    return _forward_stages_16bit(n) if channel_block(head_dim) <= 32 else None


def register_cap(
    n: int,
    head_dim: int,
    dtype: torch.dtype,
    backward: bool = False,
    arch: int = 90,
    padded: bool = False,
    whole_window: bool = False,
) -> int:
    """ptxas's register budget per thread for the kernels of this configuration on sm_<arch>: 128 where that
    compiles without spills, MAXNREG elsewhere. 128 for the 16-bit forward at head_dim 16 or 32 (channel
    tiles without a mask) on sm_90 and later without padding, with Triton 3.8 or later: at n == 64 (one key
    block, the bias tile held in registers across the program's windows), where 128 divides n ((128, 64, 8)
    tiles) and at n = 144 ((64, 32, 4) at head_dim 16; other n on those tiles are not in the spill gate).
    Uncapped: the forward's whole-window programs (`whole_window`, `forward_window_tiles`), sm_80,
    masked channel tiles, n = 49 and 576 ((64, 64, 4): a masked tile, or too many live values), a padded grid
    and Triton before 3.8, whose builds spill at 128 (the spill bytes are in the compile check's candidate
    table, benchmarks/results/compile_check_candidates.txt). A tile sweep's record for sm_<arch> or an
    override sets its own."""
    tuned = _tuned(n, head_dim, dtype, backward, arch)
    if tuned is not None:
        return tuned[3]
    if whole_window:  # the forward's whole-window programs (`forward_window_tiles`): their keys, the scores' rows
        return MAXNREG
    if (
        not backward
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim in (16, 32)
        and (n == 64 or n % 128 == 0 or (n == 144 and head_dim == 16))
        and arch >= 90
        and not padded
        and _triton_release() >= (3, 8)
    ):
        return 128
    return MAXNREG


def table_kernel_tiles(n: int, block_m: int, block_n: int, num_warps: int, arch: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the table-gradient kernel (bwd_dbias) for windows of n tokens, the
    backward's tiles and warps and sm_<arch>. It holds two [BLOCK_M, BLOCK_N] fp32 tiles more than the other
    three kernels (the bias tile, loaded once for its group of windows, and the table gradient's running sum).
    On sm_80 from (64, 64) tiles up it runs at least 8 warps: over 4, (64, 64) spills 8 B at N = 144 unshifted.
    Where one key tile holds a smaller window there (N = 49 in (64, 64)), it runs key tiles of the largest power
    of two below N (32): at full width it spills 56 B with Triton 3.6 unshifted, over 8 warps or 16 (its
    registers stay at 255 either way).
    Neither changes the scores it recomputes: on sm_80 every tile shape and warp count runs the same dot
    instruction (mma m16n8k16), tiles and warps split only its rows and columns, never its sum over channels. On
    sm_90 the instruction's width would change with either (wgmma 64x64 -> 64x32), so the tiles and warps are
    those given (no spill there)."""
    if arch < 90 and block_m * block_n >= 64 * 64:
        # the largest power of two below n where one key tile holds the window: the same tiles if asked again
        narrow = max(16, 1 << max(0, (n - 1).bit_length() - 1))  # tl.dot takes 16 and up
        return block_m, block_n if n >= block_n else narrow, max(num_warps, 8)
    return block_m, block_n, num_warps


def fused_backward_supported(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the compiled backward kernels serve this head dim and dtype on a GPU (see the tile tables)."""
    if not head_dim_supported(head_dim):
        return False
    if dtype == torch.float32:
        return channel_block(head_dim) in _BWD_TILES_FP32
    return dtype in (torch.float16, torch.bfloat16) and channel_block(head_dim) in _BWD_TILES_16BIT


# The fused backward (one kernel, `_window_attention_bwd_fused_kernel`) serves fp16/bf16 windows of at most
# FUSED_MAX_N tokens with channel tiles of at most FUSED_MAX_BLOCK_D: one program holds a whole window's [BLOCK,
# BLOCK] score tiles. fp32 (IEEE dots keep their operands in registers) at windows 8 and 7, over 16 warps, at
# head_dim 32 and 16 (`_FUSED_FP32_N`; window 7's table padded to the block, `fused_pads_table`): by the static cost
# report (head_dim 32, sm_90) window 8's backward went from 7.01 (four kernels) to 1.90 of the floor. Not served
# (the four kernels run): larger windows and head dims; the other fp32 windows, and fp64; fp16/bf16 windows of 33 to 63
# tokens but window 7's at head_dim 32 with Triton 3.8 or later (`_FUSED_MASKED_N`). Served in fp16/bf16: the
# published window 8 (N = 64), the tiny windows (N <= 32, 16- or 32-token blocks), and window 7 (N = 49 in a 64-token
# block, its last 15 rows and columns masked): by the static cost report (bf16, head_dim 32, sm_90, H200 estimate over
# the backward floor) 3.65 with the four kernels, 1.73 fused. By the spill gate, its 64-token block spills with Triton
# 3.6 (sm_80: 24-140 B on shifted grids, from the border launch's shift mask; sm_90: 12-48 B on padded shifted grids;
# 16 warps spill more) and, with Triton 3.8, at masked channel tiles (head_dim 24: 48 B on sm_80 on padded shifted
# grids; 30: up to 540 B); with Triton 3.8 at head_dim 32 it compiles without spills on sm_80 and sm_90 on every
# geometry.
FUSED_MAX_N = 64
FUSED_MAX_BLOCK_D = 32
FUSED_DTYPES = (torch.float16, torch.bfloat16)
_FUSED_MASKED_N = (49,)
_FUSED_MASKED_TRITON = (3, 8)  # the first Triton release whose build of it does not spill
# fp32 (IEEE dots, operands in registers): windows 8 and 7 in a whole 64-token block over 16 warps (over 8 it spilled
# about 1 KB on sm_80 and sm_90), at 128 registers a thread (`program_register_budget`), in whole channel tiles:
# masked ones spilled (head_dim 10: 12 B to 1.1 KB on sm_90; 30: about 300 B at 255 registers, which 16 warps cannot
# hold). Window 7 reads its table padded to the block (`fused_pads_table`): read as (heads, 49, 49) it spilled 1.1 KB;
# on padded grids it keeps the four kernels (with the padded keys' k/v bias rows its build spills 12-48 B on sm_90 at
# head_dim 32 with Triton 3.8 and 3.6)
_FUSED_FP32_N = (49, 64)
_FUSED_FP32_HEAD_DIMS = (16, 32)
_FUSED_FP32_WARPS = 16
# Programs the fused backward and the rows kernel aim at (about 4 per SM of an H200's 132): (image, window) pairs
# are grouped per head (and row block) so that the grid's launches together have about this many programs
# (`window_groups`); more windows per group store the table's partial sum fewer times.
FUSED_PROGRAMS = 512


# Programs the table-gradient kernel aims at (about 8 per SM of an H200's 132): see `window_groups`.
TABLE_PROGRAMS = 1024


def window_groups(all_pairs: int, pairs: int, units: int, budget: int) -> Tuple[int, int]:
    """(windows per group, groups) of a launch over `pairs` (image, window) pairs whose programs each take a
    group of consecutive pairs, times `units` (heads, times row blocks or tiles), for about `budget` programs
    over the grid's `all_pairs`: on a shifted grid the two launches (windows off the border, the border) share
    one budget and one group size, as one launch of every window would. Each group stores one partial sum (the
    table's gradient), which the host reduces in a fixed order."""
    per_group = max(1, -(-all_pairs // max(1, budget // max(1, units))))
    return per_group, -(-pairs // per_group)


def fused_backward_applies(n: int, head_dim: int, dtype: torch.dtype, padded: bool = False) -> bool:
    """Whether the backward of windows of n tokens, heads of head_dim channels and a projection in `dtype` on a
    padded grid or not runs as the one fused kernel (else the rows and dk/dv kernels, `rows_backward_applies`, or
    the statistics, dq, dk/dv and table kernels)."""
    if n > FUSED_MAX_N or channel_block(head_dim) > FUSED_MAX_BLOCK_D:
        return False
    if dtype == torch.float32 and dtype not in FUSED_DTYPES:
        served = n in _FUSED_FP32_N and head_dim in _FUSED_FP32_HEAD_DIMS
        return served and not (padded and fused_pads_table(n, dtype))
    return dtype in FUSED_DTYPES and (n <= 32 or n == fused_block(n) or _fused_masked_window(n, head_dim))


def _fused_masked_window(n: int, head_dim: int) -> bool:
    """Whether a window of n tokens that leaves its block partly empty (33 to 63 tokens in 64) runs the fused
    backward: window 7's N = 49 (`_FUSED_MASKED_N`) at head_dim 32 with Triton 3.8 or later (see FUSED_MAX_N)."""
    return n in _FUSED_MASKED_N and head_dim == 32 and _triton_release() >= _FUSED_MASKED_TRITON


def fused_pads_table(n: int, dtype: torch.dtype) -> bool:
    """Whether the fused kernel reads the table padded to its block (the kernel's PAD_TABLE): fp32 windows that leave
    the block partly empty (window 7's 49 tokens in 64). With the table's own rows of N (not a multiple of 4
    fp32) its loads and the partial sums' stores cannot be vectorised: the fp32 build over 16 warps spilled 1.1-1.2
    KB on sm_80 and sm_90 off the shifted border and on it; padded, none (Triton 3.8). The 16-bit build keeps the
    table as it is (padded, its border launch spilled 72 B on sm_80)."""
    return dtype == torch.float32 and fused_block(n) != n


def fused_block(n: int) -> int:
    """The fused kernel's tile: n rounded up to a power of two, at least 16 (what tl.dot takes)."""
    return max(16, 1 << (n - 1).bit_length())


def fused_num_warps(n: int, dtype: torch.dtype) -> int:
    """Warps per program of the fused kernel (compile_check: the registers without spills for sm_80 and
    sm_90): 8 for the 64-token tile, 4 below; fp32's (and fp64's, interpreter only) over _FUSED_FP32_WARPS."""
    if fused_block(n) < 64:
        return 4
    return _FUSED_FP32_WARPS if dtype in (torch.float32, torch.float64) else 8


# The rows backward serves the fp16/bf16 windows of 129 to 256 tokens (windows 12 and 16 among the published),
# head dims up to 32: two kernels instead of four. The first (`_window_attention_bwd_rows_kernel`) holds whole
# rows of scores, ROWS_TILES = (16 query rows, 256 keys, 8 warps), the window's keys in one tile (or two:
# `rows_tiles`): one pass over
# the scores gives the softmax statistics, dq and the table and scale gradients (the work of three of the four
# kernels, the scores computed once instead of three times); the second is the four kernels' dk/dv kernel, on
# their tiles, from those statistics. By the static cost report (bf16, head_dim 32, sm_90, the backward's
# kernels together, H200 estimate over the backward floor) N = 144 and 256 went from 13.2 and 7.1 to 9.1 and 6.4
# (with both kernels' windows off the shifted border run without the mask, as the forward's), over 8 warps.
# At head_dim 32, over 4 warps the row reductions (max, sum, delta, the scale's sum) span half the warps: the rows
# kernel went from 67.6 to 51.4 instructions per score at N = 256 (250 registers); on padded grids it keeps 8 warps
# (over 4 it spills 8-16 B on padded shifted grids with Triton 3.6, sm_80 and sm_90; every published model's grids
# are unpadded at its own resolution). N = 144 (window 12) at head_dim 32 runs its keys as two tiles, 128 and a
# tail of 16 (`rows_tiles`, the kernel's BLOCK_T), over 4 warps on every grid: 144 keys a row instead of 256, none
# of them masked; from 119.2 instructions per score (one 256-key tile, 8 warps) to 111.9 with the tail over 8
# warps, 73.9 over 4 (255 registers). Other head dims keep ROWS_TILES (`rows_tiles`).
# Not served, by the spill gate: 32 query rows spilled 3-5 KB at 256 keys over 8 warps and about 2 KB at 144
# (128 + 16) over 4; 64-key tiles (N = 33 to 63: window 7) spilled 28-400 B on sm_80 with Triton 3.6 at every
# row block (32, 64) and warp count (4, 8, 16) tried; 1024-key tiles (N = 576) would be 44% padding around row
# blocks of 4 queries. 128-key tiles (N = 65 to 128) are not in the gate (no published window). The other N of
# 129 to 256 (no published window) run the 256-key tile with masked keys over 8 warps, as N = 144 did in the gate
# before its tail tile.
ROWS_TILES = (16, 256, 8)
_ROWS_TAIL = {144: (128, 16)}  # N -> (BLOCK_N, BLOCK_T), BLOCK_N + BLOCK_T == N
_ROWS_WARPS = 4  # head_dim 32: N = 256 on unpadded grids, N = 144 on every grid


def rows_tiles(n: int, head_dim: int, padded: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, BLOCK_T) of the rows kernel for windows of n tokens and heads of head_dim
    channels, on a padded grid or not. At head_dim 32 (whole 32-channel tiles): N = 144 runs a 128-key tile and a
    tail of 16 keys (`_ROWS_TAIL`) over _ROWS_WARPS warps; N = 256 runs ROWS_TILES over _ROWS_WARPS warps on an
    unpadded grid. Everything else runs ROWS_TILES (8 warps) and no tail (BLOCK_T 0): padded grids at N = 256,
    the other N (not in the spill gate over 4 warps) and the other head dims (over 4 warps, or with the tail,
    masked channel tiles of 24 and 30 spill 72 B to 2 KB). Head dims up to 16 run 32-channel tiles
    (`rows_channel_block`)."""
    block_m, block_n, num_warps = ROWS_TILES
    if head_dim == 32 and n in _ROWS_TAIL:
        block_n, block_t = _ROWS_TAIL[n]
        return block_m, block_n, _ROWS_WARPS, block_t
    if head_dim == 32 and n == block_n and not padded:
        return block_m, block_n, _ROWS_WARPS, 0
    return block_m, block_n, num_warps, 0


_ROWS_MIN_BLOCK_D = 32


def rows_channel_block(head_dim: int) -> int:
    """BLOCK_D of the rows kernel: `channel_block`, at least _ROWS_MIN_BLOCK_D. With 16-channel tiles (head dims up
    to 16) the kernel spilled 4.4-8.1 KB on sm_80 and sm_90 at N = 144 and 256 (bf16, 8 warps, Triton 3.8): the
    [BLOCK_M, BLOCK_D] products (dq, the rows of q) are too narrow to spread over the warps, so each warp holds
    copies of their whole [BLOCK_M, BLOCK_N] and [BLOCK_N, BLOCK_D] operands. Masked 32-channel tiles, as head dims
    17 to 31 run, compile without spills."""
    return max(channel_block(head_dim), _ROWS_MIN_BLOCK_D)


_DKDV_TAIL_N = (144,)


def dkdv_query_tail(n: int, head_dim: int, dtype: torch.dtype, block_m: int) -> int:
    """M_TAIL of the dk/dv kernel beside the rows kernel (the host asks only there: the four kernels share one tile
    shape): the rows of its last query block when they run as a block of their own (a power of two of at least 16,
    below block_m), else 0 (the last block masks its rows beyond the window). Where the rows kernel runs window 12
    as 128 + 16 keys (`rows_tiles`: N = 144, head_dim 32, fp16/bf16): with 64-row blocks the window's 144 rows
    run as 64 + 64 + 16 instead of 3 x 64 with 48 masked (static cost, bf16, sm_90: 57.9 -> 49.6 instructions
    per score)."""
    tail = n % block_m
    served = n in _DKDV_TAIL_N and head_dim == 32 and dtype in FUSED_DTYPES
    return tail if served and tail >= 16 and tail & (tail - 1) == 0 else 0


def rows_backward_applies(n: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the backward of windows of n tokens, heads of head_dim channels and a projection in `dtype` runs
    the rows kernel and the dk/dv kernel (see ROWS_TILES and `rows_tiles`)."""
    return dtype in FUSED_DTYPES and channel_block(head_dim) <= FUSED_MAX_BLOCK_D and fused_block(n) == ROWS_TILES[1]


def backward_kernels(n: int, head_dim: int, dtype: torch.dtype, padded: bool = False):
    """The short names of the kernels the backward launches for this window, head dim and projection dtype on a
    padded grid or not, every gradient asked for."""
    if fused_backward_applies(n, head_dim, dtype, padded):
        return ("bwd_fused",)
    if rows_backward_applies(n, head_dim, dtype):
        return ("bwd_rows", "bwd_dkdv")
    return ("bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias")
