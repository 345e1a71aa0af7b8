"""Static cost report of the fused window-attention kernels: what they compile to, counted, without a GPU.

    python -m tools.compile_check --cost            # the table (benchmarks/results/cost_report.txt)

For each kernel, projection dtype (bf16, fp16, fp32), head_dim and window on sm_80 and sm_90 (head_dim 32, the
published Swin V2 models', at N = 49, 64, 144, 256, 576 tokens; Swin2SR's 30 and 10, which run masked in
channel tiles of 32 and 16, at its N = 64), one line

    cost <kernel> <dtype> hd<head_dim> N<n> <arch> regs=<int> spill=<bytes> instr_per_score=<float>

and beside it a `model` line: the traffic model and the estimated H200 time.

The reference launch (one per N). The position-bias table in the projection's dtype (a bf16 model's), batch 8,
4 heads of 32 channels, a 64x64 token grid (56x56 for N = 49)
cut into windows of that N, shift = window // 2, with a q/k/v bias, transformers' padding order. The host
functions themselves (`window_attention_triton_forward` / `_backward` with every gradient asked for) are
run on meta tensors with each `*_kernel` module global replaced by a recorder, so the grid, the launch
arguments and the options are exactly those a GPU launch would get (what depends on the target is
recomputed for each arch, `launches.for_arch`: the register cap, and sm_80's table-kernel tiles, warps and
groups). Each recorded launch is specialised
by Triton's own binder (`create_function_from_signature` with the target's backend: integers divisible by
16 and integers equal to 1 specialised, pointers 16-byte aligned, as the JIT does at run time) and
compiled with `triton.compile` for the target down to the cubin the runtime would load.

Counting instructions (instr_per_score). `cuobjdump -sass` lists the cubin's SASS. The count walks it as
one thread of a program executes it:
  * a straight instruction counts once each time it is reached (predicated-off instructions still issue);
  * a branch to a lower address is a loop's back-edge: the loop [target, branch] runs its trip count T,
    i.e. the back-edge is taken T - 1 times, then falls through (nested loops keep one counter each);
  * a conditional branch forward is not taken (the path on which every loop guard passes and no early
    exit happens: for these kernels, loop guards that skip a loop that runs at least once); an
    unconditional one is taken; an unconditional EXIT ends the walk, a predicated one falls through;
  * the trap loop after the last EXIT (`BRA` to itself) is never reached.
The trip counts come from the launch, per kernel (`LOOP_TRIPS`): the source loops of a kernel, in source
order, map one to one to the back-edges in address order; a kernel whose loops the compiler unrolled has
no back-edge and is counted straight. A mismatch raises. Triton's software pipelining keeps the trip
count (its prefetches are predicated in the last iterations), so the loop runs T times. The per-program
count times the program's threads (num_warps x 32) times the programs, over the launch's attention scores
(batch x heads x windows x N^2), is instr_per_score. A program whose loop runs over a range of windows
(the bias-table kernel) is counted at the mean trip count of the launch, exact for a single loop.

The traffic model (per kernel, over every window: a shifted grid's two launches split the windows; from the
recorded arguments and the tiles, with the partial sums of every launch's groups):
  * HBM bytes: every tensor the kernel reads or writes, once (q/k/v, dO, statistics, the table, outputs), the
    table once per launch; the forward's border tables with MASK_IN_TABLE (the table plus the shift mask, three
    copies) as the host builds them and the launch reads them;
  * L2-to-SM bytes: what the programs load, summed (a key block read by every query block counts once per
    query block, the bias tile once per program that reads it: per window, except where a program runs
    several windows of one head (the forward's WINDOWS_PER_PROGRAM, the bias-table kernel's group of
    windows) and loads the tile once for all of them); the forward's per launch, each with its own tiles and
    windows per program;
  * FLOPs: 2 * head_dim per score and per matmul of the kernel;
  * time: max(HBM bytes / 4.8 TB/s, FLOPs / 790 TFLOP/s (16-bit dots; 67 TFLOP/s for IEEE fp32 dots),
    instructions / issue rate), the issue rate being an H200's 132 SMs x 4 schedulers x 1 warp instruction
    per cycle x 32 threads x 1.98 GHz. An estimate to compare versions of the kernels, not a measurement.
Resident warps per SM: from the registers (64K per SM, allocated per warp in units of 256), the shared
memory (228 KB per SM on sm_90, 164 KB on sm_80, 1 KB reserved per CTA) and the 64-warp limit.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections import Counter
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from swinv2_fast.kernels.tiles import REGISTER_FILE

from .launches import (
    REFERENCE_HEAD_DIM,
    Instruction,
    Launch,
    cdiv,
    compile_launch,
    cubin_listings,
    for_arch,
    launched,
    parse_sass,
    program_registers,
    reference_launches,
    resource_usage,
    run_spawned,
)

COST_DTYPES = ("bf16", "fp16", "fp32")
COST_WINDOWS = (7, 8, 12, 16, 24)  # N = 49, 64, 144, 256, 576
COST_HEAD_DIM = REFERENCE_HEAD_DIM
COST_HEAD_DIMS = (32, 30, 10)  # Swin V2's; Swin2SR's (masked channel tiles)
COST_WINDOWS_BY_HEAD_DIM = {30: (8,), 10: (8,)}  # Swin2SR's window; other head dims: COST_WINDOWS
# bwd_fused runs the backward of fp16/bf16 windows of 64 (or at most 32) tokens, head dims up to 32, alone (and of 49
# at head_dim 32 with Triton 3.8 or later; fp32's of 64 and 49 tokens at head_dim 32 and 16, 49 on unpadded grids);
# the other fp16/bf16 windows up to 256 tokens run bwd_rows and bwd_dkdv; the four backward kernels run beyond and
# at the other fp32 windows (`swinv2_fast.kernels.tiles.backward_kernels`)
COST_KERNELS = ("fwd", "bwd_fused", "bwd_rows", "bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias")

HBM_BYTES_PER_S = 4.8e12
DOT_FLOPS_PER_S = {"bf16": 790e12, "fp16": 790e12, "fp32": 67e12}
ISSUE_PER_S = 132 * 4 * 32 * 1.98e9  # thread instructions per second on an H200
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}
MUFU_PER_SM_CLOCK = 16  # special-function results (MUFU.EX2, RCP, RSQ, ...) per SM per clock (sm_80, sm_90)
# the floors of the backward, relative to the forward's (FlashAttention-2's count): q/k/v and dO in, dq/dk/dv out
# is twice the forward's bytes; five matmuls (two recomputed or new per forward one) are 2.5 times its FLOPs
BACKWARD_FLOOR_HBM = 2.0
BACKWARD_FLOOR_DOT = 2.5


class Hardware(NamedTuple):
    """The constants an estimate is made with."""

    name: str
    hbm_bytes_per_s: float
    dot_flops_per_s: Dict[str, float]  # by the dot operands' dtype
    sms: int
    clock_hz: float

    @property
    def issue_per_s(self) -> float:  # thread instructions: 4 schedulers x 1 warp instruction per clock per SM
        return self.sms * 4 * 32 * self.clock_hz

    @property
    def mufu_per_s(self) -> float:
        return self.sms * MUFU_PER_SM_CLOCK * self.clock_hz


H200 = Hardware("h200", HBM_BYTES_PER_S, DOT_FLOPS_PER_S, 132, 1.98e9)
# H100 SXM: 3.35 TB/s, 989 dense fp16/bf16 TFLOP/s (= 132 SMs x 4096 FLOPs per clock at 1.83 GHz, the clock it
# holds under a tensor-core load), 67 TFLOP/s fp32; H100 PCIe: 114 SMs, 2.0 TB/s, 756 TFLOP/s (1.62 GHz)
H100_SXM = Hardware("h100_sxm", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 132, 1.83e9)
H100_PCIE = Hardware("h100_pcie", 2.0e12, {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}, 114, 1.62e9)


class Times(NamedTuple):
    """Microseconds. est: the roofline, max(hbm, dot, issue): every unit overlapped with the others.
    cal_est: max(hbm, dot + issue + mufu): the tensor cores, the issue slots and the special-function
    pipe serialised, as in a kernel whose warps do their own matmuls and softmax (no warp specialisation:
    Triton's); calibrated on Triton's fused-attention tutorial (benchmarks/results/cost_calibration.txt),
    where the roofline predicts twice the published H100 throughput and cal_est is within 1.2x of it."""

    hbm: float
    dot: float
    issue: float
    mufu: float

    @property
    def est(self) -> float:
        return max(self.hbm, self.dot, self.issue)

    @property
    def cal_est(self) -> float:
        return max(self.hbm, self.dot + self.issue + self.mufu)


def times(hbm_bytes: float, flops: float, dtype: str, instructions: float, mufu: float, hw: Hardware = H200) -> Times:
    """The estimate's terms for a launch: bytes from HBM, dot FLOPs (operands in `dtype`), thread
    instructions executed and MUFU thread instructions among them."""
    return Times(
        hbm_bytes / hw.hbm_bytes_per_s * 1e6,
        flops / hw.dot_flops_per_s[dtype] * 1e6,
        instructions / hw.issue_per_s * 1e6,
        mufu / hw.mufu_per_s * 1e6,
    )


def floor_us(fwd_hbm_bytes: float, fwd_flops: float, dtype: str, backward: bool, hw: Hardware = H200) -> float:
    """The floor of a forward, max(HBM time, tensor-core time) of its minimal traffic (q/k/v in, the output
    out, the bias table once) and its matmuls at peak; of a backward, max(2 x the forward's HBM time,
    2.5 x its tensor-core time)."""
    hbm = fwd_hbm_bytes / hw.hbm_bytes_per_s * 1e6
    dot = fwd_flops / hw.dot_flops_per_s[dtype] * 1e6
    if backward:
        return max(BACKWARD_FLOOR_HBM * hbm, BACKWARD_FLOOR_DOT * dot)
    return max(hbm, dot)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"  # a Cost built without the forward's minimum has no floor


class Cost(NamedTuple):
    kernel: str
    dtype: str
    head_dim: int
    n: int
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    instr_per_program: float  # per thread
    instr_per_score: float
    hbm_bytes: int
    l2_bytes: int
    flops: int
    warps_per_sm: int
    scores: int
    programs: int
    error: str
    mufu_per_score: float = 0.0  # MUFU (special-function) instructions among instr_per_score
    fwd_hbm_bytes: int = 0  # the forward's minimal traffic and FLOPs at this launch (`forward_minimum`)
    fwd_flops: int = 0
    opcodes: Tuple[Tuple[str, float], ...] = ()  # instr_per_score by opcode, the most executed first

    @property
    def backward(self) -> bool:
        return self.kernel.startswith("bwd")

    def times(self, hw: Hardware = H200) -> Times:
        return times(
            self.hbm_bytes,
            self.flops,
            self.dtype,
            self.instr_per_score * self.scores,
            self.mufu_per_score * self.scores,
            hw,
        )

    def floor(self, hw: Hardware = H200) -> float:
        """The forward's floor for the forward kernel; the whole backward's floor for a backward kernel."""
        return floor_us(self.fwd_hbm_bytes, self.fwd_flops, self.dtype, self.backward, hw)

    def line(self) -> str:
        return (
            f"cost {self.kernel} {self.dtype} hd{self.head_dim} N{self.n} sm_{self.arch} regs={self.registers} "
            f"spill={self.spill_bytes} instr_per_score={self.instr_per_score:.2f}"
        )

    def opcode_line(self) -> str:
        """Where the issue slots go (`--histogram`): the opcodes at 0.05 per score or more."""
        shown = " ".join(f"{name} {n:.2f}" for name, n in self.opcodes if n >= 0.05)
        return f"opcodes {self.kernel} {self.dtype} hd{self.head_dim} N{self.n} sm_{self.arch} per score: {shown}"

    def model_line(self) -> str:
        t_hbm = self.hbm_bytes / HBM_BYTES_PER_S * 1e6
        t_dot = self.flops / DOT_FLOPS_PER_S[self.dtype] * 1e6
        t_issue = self.instr_per_score * self.scores / ISSUE_PER_S * 1e6
        ratio = self.l2_bytes / self.hbm_bytes
        t = self.times()
        floor = self.floor()
        # a backward kernel is compared with the floor of the whole backward (the sum of its kernels is, on
        # the backward-total line)
        name = "backward_floor" if self.backward else "floor"
        return (
            f"model {self.kernel} {self.dtype} hd{self.head_dim} N{self.n} sm_{self.arch} "
            f"hbm_bytes={self.hbm_bytes} l2_sm_bytes={self.l2_bytes} l2_over_hbm={ratio:.2f} "
            f"flops={self.flops} warps_per_sm={self.warps_per_sm} h200_us: hbm={t_hbm:.1f} dot={t_dot:.1f} "
            f"issue={t_issue:.1f} est={max(t_hbm, t_dot, t_issue):.1f} mufu={t.mufu:.1f} "
            f"cal_est={t.cal_est:.1f} {name}={floor:.1f} est/{name}={_ratio(t.est, floor)} "
            f"cal_est/{name}={_ratio(t.cal_est, floor)}"
        )


# Trip counts of each kernel's source loops, in source order, from its launch arguments (and grid).
def _kv_blocks(a, grid):
    return [cdiv(a["N"], a["BLOCK_N"])]


def _fwd_loops(a, grid):
    """The forward's key-block loop (absent where one block covers the window: a loop of one trip is
    unrolled) inside its loop over the program's windows, at the launch's mean windows per program; in
    whole-window programs (WHOLE_WINDOW) the loop over the window's query blocks instead of the key-block loop
    (the 16-row tail, M_TAIL, straight code before it), the windows per program."""
    if a.get("WHOLE_WINDOW"):  # at one window per program the compiler drops the window loop
        q = cdiv(a["N"] - a.get("M_TAIL", 0), a["BLOCK_M"])
        return ([q] if q > 1 else []) + ([a["NUM_BW"] / grid[0]] if a["WINDOWS_PER_PROGRAM"] > 1 else [])
    kv = cdiv(a["N"], a["BLOCK_N"])
    windows = a["NUM_BW"] * cdiv(a["N"], a["BLOCK_M"]) / grid[0]
    return ([kv] if kv > 1 else []) + [windows]


def _q_blocks(a, grid):
    """The dk/dv kernel's loop over whole query blocks (with a tail block, M_TAIL > 0, run after the loop)."""
    return [cdiv(a["N"] - a.get("M_TAIL", 0), a["BLOCK_M"])]


def _windows_per_program(a, grid):
    return [a["NUM_BW"] / grid[2]]  # the mean over the groups (the last may be shorter)


def _windows_per_group(a, grid):
    return [a["NUM_BW"] / grid[0]]  # the fused backward's groups of windows (grid (groups, heads))


LOOP_TRIPS: Dict[str, Callable] = {
    "fwd": _fwd_loops,
    "bwd_fused": _windows_per_group,
    "bwd_rows": _windows_per_program,
    "bwd_stats": _kv_blocks,
    "bwd_dq": _kv_blocks,
    "bwd_dkdv": _q_blocks,
    "bwd_dbias": _windows_per_program,
}


def opcode(ins: Instruction) -> str:
    """The instruction's opcode without its modifiers (`FFMA`, `MUFU`, `HGMMA`, ...)."""
    return ins.opcode.split(".")[0]


def _branch_target(ins: Instruction) -> Optional[int]:
    if opcode(ins) != "BRA":
        return None
    match = re.search(r"0x([0-9a-f]+)", ins.operands)
    if not match:
        raise ValueError(f"branch without a literal target at {ins.address:#x}: {ins.opcode} {ins.operands}")
    return int(match.group(1), 16)


def back_edges(instructions: Sequence[Instruction]) -> List[int]:
    """Addresses of the loops' back-edges: branches to a lower address, except the trap loop to itself and
    the branches after the function's last unconditional EXIT. Those are out-of-line slow paths (on sm_90
    the retry loops of mbarrier waits, `SYNCS.PHASECHK.TRANS64.TRYWAIT` then a forward conditional branch
    to a block that retries and branches back), entered only when a wait fails its first try, which the
    walk does not take."""
    exits = [ins.address for ins in instructions if opcode(ins) == "EXIT" and not ins.predicated]
    last_exit = exits[-1] if exits else None
    edges = []
    for ins in instructions:
        target = _branch_target(ins)
        if target is not None and target < ins.address and (last_exit is None or ins.address < last_exit):
            edges.append(ins.address)
    return edges


def executed_by_opcode(instructions: Sequence[Instruction], trips: Sequence[float], threads: int) -> Dict[str, float]:
    """Instructions `threads` threads execute (`tally_executed`), per opcode; MUFU the special-function unit's
    (exp2, reciprocal, rsqrt, ...: 16 per SM per clock, an eighth of the issue rate)."""
    return {name: count * threads for name, count in tally_executed(instructions, trips, opcode).items()}


def count_executed(
    instructions: Sequence[Instruction], trips: Sequence[float], select: Optional[Callable[[Instruction], bool]] = None
) -> float:
    """Instructions one thread executes (those `select` accepts, if given), with loop i (back-edges in
    address order) at trip count trips[i]; see the module docstring. Fractional trip counts (a mean over
    programs) are exact for non-nested loops: the count is linear in each trip count, so it is evaluated at
    floor and ceil and interpolated."""
    return tally_executed(instructions, trips, lambda ins: select is None or select(ins)).get(True, 0.0)


def tally_executed(
    instructions: Sequence[Instruction], trips: Sequence[float], key: Callable[[Instruction], Any]
) -> Dict[Any, float]:
    """As `count_executed`, the executed instructions counted per key(instruction) (e.g. `opcode`)."""
    edges = back_edges(instructions)
    if not edges:
        trips = []  # the loops were unrolled: straight-line code
    if len(edges) != len(trips):
        raise ValueError(
            f"{len(edges)} loop back-edges in the SASS ({[hex(e) for e in edges]}), but {len(trips)} "
            f"source loops with trip counts {list(trips)}"
        )
    whole = [int(t) for t in trips]
    base = _walk(instructions, dict(zip(edges, whole)), key)
    total: Dict[Any, float] = dict(base)
    for i, t in enumerate(trips):
        if t != whole[i]:
            bumped = list(whole)
            bumped[i] += 1
            more = _walk(instructions, dict(zip(edges, bumped)), key)
            for k in set(base) | set(more):
                total[k] = total.get(k, 0.0) + (t - whole[i]) * (more.get(k, 0) - base.get(k, 0))
    return total


def _walk(instructions: Sequence[Instruction], trips: Dict[int, int], key: Callable[[Instruction], Any]) -> Counter:
    index = {ins.address: i for i, ins in enumerate(instructions)}
    taken = dict.fromkeys(trips, 0)
    for trip in trips.values():
        if trip < 1:
            raise ValueError("a loop counted here runs at least once (its guard is taken as passing)")
    i, steps = 0, 0
    count: Counter = Counter()
    limit = 100 * len(instructions) * max([1] + list(trips.values())) ** 2
    while i < len(instructions):
        ins = instructions[i]
        steps += 1
        count[key(ins)] += 1
        if steps > limit:
            raise RuntimeError("SASS walk did not terminate")
        if opcode(ins) == "EXIT" and not ins.predicated:
            return count
        target = _branch_target(ins)
        if target is None:
            i += 1
        elif target == ins.address:
            raise ValueError(f"reached the trap loop at {ins.address:#x}")
        elif target < ins.address:  # back-edge
            if taken[ins.address] < trips[ins.address] - 1:
                taken[ins.address] += 1
                i = index[target]
            else:
                taken[ins.address] = 0
                i += 1
        elif ins.predicated:  # forward and conditional: falls through
            i += 1
        else:
            i = index[target]
    raise ValueError("the walk ran off the end of the SASS without an EXIT")


# --------------------------------------------------------------------------------------- traffic model
def _elem(dtype_name: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dtype_name]


# The grid axis of the kernels that store a table partial sum per group of windows
_GROUP_AXIS = {"bwd_fused": 0, "bwd_rows": 2, "bwd_dbias": 2}


def _fwd_l2(a: dict, dtype: str, pairs: int) -> int:
    """L2-to-SM bytes of `pairs` (image, window) pairs run as the forward launch with arguments `a` runs them:
    a program that runs WINDOWS_PER_PROGRAM windows of one head loads each bias tile once for all of them; k and
    v are read once per query block, once per window in whole-window programs."""
    n, rows, t = a["N"], a["HEAD_DIM"] * _elem(dtype), a["POSITION_BIAS"].element_size()
    wh = pairs * a["NUM_HEADS"]  # (image, window, head) triples
    nkv = 1 if a.get("WHOLE_WINDOW") else cdiv(n, a["BLOCK_M"])
    return wh * (n * rows + nkv * n * 2 * rows) + wh * n * n * t // a.get("WINDOWS_PER_PROGRAM", 1)


def traffic(launch: Launch, dtype: str, groups: Optional[int] = None) -> Tuple[int, int, int]:
    """(HBM bytes, L2-to-SM bytes, FLOPs) over every window of the launch's geometry (see the module docstring);
    `groups`: the groups of windows storing a table partial sum, over all the kernel's launches (default: the
    launch's own)."""
    a = launch.kwargs
    if groups is None and launch.kernel in _GROUP_AXIS:
        groups = launch.grid[_GROUP_AXIS[launch.kernel]]
    e = _elem(dtype)
    t = a["POSITION_BIAS"].element_size()  # the table's dtype as launched
    B = a["QKV"].shape[0]
    N, hd, heads, nw = a["N"], a["HEAD_DIM"], a["NUM_HEADS"], a["NUM_WINDOWS"]
    L = a["QKV"].shape[1]
    wh = B * nw * heads  # (image, window, head) triples
    scores = wh * N * N
    rows = hd * e  # one row of q, k, v, dO or an output, one head
    nm, nn = cdiv(N, a["BLOCK_M"]), cdiv(N, a["BLOCK_N"])
    table = heads * N * N * t
    tokens = B * L * heads  # (token, head) pairs
    stats = B * heads * nw * N * 8 + tokens * 4  # (row max, log sum) per window row, delta per token
    k = launch.kernel
    if k == "fwd":
        hbm = tokens * rows * 4 + table
        l2 = _fwd_l2(a, dtype, B * nw)
        flops = scores * 2 * hd * 2
    elif k == "bwd_fused":
        # q, k, v, dO read once and dq, dk, dv written once per (token, head); the table read once; each
        # (group, head) program stores its table partial sum (fp32) and loads the bias tile per window; a table
        # padded to the block (PAD_TABLE) is read and summed at the block's size
        side = a["BLOCK_N"] if a.get("PAD_TABLE") else N
        hbm = tokens * rows * 7 + table + groups * heads * side * side * 4
        l2 = wh * (4 * N * rows + side * side * t)
        flops = scores * 2 * hd * 5  # q.k, dO.v, dS k, dS^T q, P^T dO
    elif k == "bwd_rows":
        # q and dO read once, k and v once per row block (BLOCK_N, with a tail BLOCK_N + BLOCK_T, covers
        # the window); dq written once per
        # (token, head), the statistics written; each (row block, head, group) program loads its bias tile once
        # and stores its table partial sum (fp32)
        hbm = tokens * rows * 5 + table + stats + groups * table // t * 4
        l2 = wh * (2 * N * rows + nm * N * 2 * rows) + groups * table
        flops = scores * 2 * hd * 3  # q.k, dO.v, dS k
    elif k == "bwd_stats":
        hbm = tokens * rows * 4 + table + stats
        l2 = wh * (2 * N * rows + nm * N * 2 * rows + N * N * t)
        flops = scores * 2 * hd * 2
    elif k == "bwd_dq":
        hbm = tokens * rows * 5 + table + stats
        l2 = wh * (2 * N * rows + 12 * N + nm * N * 2 * rows + N * N * t)
        flops = scores * 2 * hd * 3
    elif k == "bwd_dkdv":
        hbm = tokens * rows * 6 + table + stats
        l2 = wh * (2 * N * rows + nn * N * (2 * rows + 12) + N * N * t)
        flops = scores * 2 * hd * 4
    elif k == "bwd_dbias":
        hbm = tokens * rows * 4 + table + stats + groups * table // t * 4
        # each program loads its bias tile once for all the windows of its group
        l2 = wh * (nn * N * (2 * rows + 12) + nm * N * 2 * rows) + groups * table
        flops = scores * 2 * hd * 2  # q.k (scores and the scale gradient), dO.v
    else:
        raise ValueError(f"no traffic model for kernel {k}")
    return hbm, l2, flops


def forward_minimum(launch: Launch, dtype: str) -> Tuple[int, int]:
    """(bytes, FLOPs) a forward over the launch's windows cannot go below, whichever kernel the launch is:
    q, k, v read and the output written once per (token, head), the bias table read once; the two matmuls
    (q.k and P.v), 2 * head_dim FLOPs per score each."""
    a = launch.kwargs
    tokens = a["QKV"].shape[0] * a["QKV"].shape[1] * a["NUM_HEADS"]
    table = a["NUM_HEADS"] * a["N"] * a["N"] * a["POSITION_BIAS"].element_size()
    return tokens * a["HEAD_DIM"] * _elem(dtype) * 4 + table, scores_of(launch) * 2 * a["HEAD_DIM"] * 2


def resident_warps(registers: int, shared: int, num_warps: int, arch: int) -> int:
    by_regs = REGISTER_FILE // program_registers(registers, num_warps)
    by_smem = SM_SHARED[arch] // (shared + 1024)
    ctas = min(by_regs, by_smem, 32, 64 // num_warps)
    return ctas * num_warps


def scores_of(launch: Launch) -> int:
    a = launch.kwargs
    return a["QKV"].shape[0] * a["NUM_HEADS"] * a["NUM_WINDOWS"] * a["N"] ** 2


def _programs(launch: Launch) -> int:
    programs = 1
    for g in launch.grid:
        programs *= g
    return programs


def _table_bytes(launch: Launch) -> int:
    """HBM bytes of the table a launch reads; where the host built it for the launch (the forward's border tables
    with MASK_IN_TABLE, `shift_masked_tables`: (3, heads, N, N)), what building it moved too (the table read, the
    three written) and the launch's reading them."""
    table = launch.kwargs["POSITION_BIAS"]
    size = table.numel() * table.element_size()
    if table.dim() == 4:
        return size // 3 + 2 * size
    return size


def _padded_table_build(launch: Launch) -> int:
    """HBM bytes of building the table padded to the block once per call, for all its launches (the fused
    backward's PAD_TABLE, `padded_table`): the table read, the padded one written; 0 without."""
    a = launch.kwargs
    if not a.get("PAD_TABLE"):
        return 0
    return a["NUM_HEADS"] * a["N"] ** 2 * a["POSITION_BIAS"].element_size() + _table_bytes(launch)


def cost_of(launches: Sequence[Launch], dtype: str, arch: int) -> Cost:
    """The cost of one kernel's launches (each launch's specialisation compiled and counted; registers, spills
    and shared memory the largest of them, instructions summed over their programs)."""
    launches = [for_arch(lch, arch) for lch in launches]  # as sm_<arch> runs them (sm_80's table kernel's tiles)
    launch = launches[0]
    n, hd = launch.kwargs["N"], launch.kwargs["HEAD_DIM"]
    programs = sum(_programs(lch) for lch in launches)
    # the traffic of every window (the launches split the windows), every launch's groups' partial sums
    groups = sum(lch.grid[_GROUP_AXIS[lch.kernel]] for lch in launches) if launch.kernel in _GROUP_AXIS else None
    hbm, l2, flops = traffic(launch, dtype, groups)
    if launch.kernel == "fwd":  # each launch's windows as it runs them (window 16: whole windows off the border)
        l2 = sum(_fwd_l2(lch.kwargs, dtype, lch.kwargs["NUM_BW"]) for lch in launches)
    # each launch reads its table (`traffic` counted the table once)
    table = launch.kwargs["NUM_HEADS"] * n * n * launch.kwargs["POSITION_BIAS"].element_size()
    hbm += sum(_table_bytes(lch) for lch in launches) - table + _padded_table_build(launch)
    try:
        registers = spills = shared = warps = 0
        resident = 64  # warps per SM: the fewest of any launch's
        threads = 0.0
        executed: Dict[str, float] = {}  # instructions all threads of all programs execute, per opcode
        for lch in launches:
            compiled, usage, sass = compile_launch(lch, arch)
            regs, spill = resource_usage(usage, sass)
            registers, spills = max(registers, regs), max(spills, spill)
            lw, ls = compiled.metadata.num_warps, int(compiled.metadata.shared)
            warps, shared = max(warps, lw), max(shared, ls)
            resident = min(resident, resident_warps(regs, ls, lw, arch))
            launch_threads = lw * 32 * _programs(lch)
            threads += launch_threads
            trips = LOOP_TRIPS[lch.kernel](lch.kwargs, lch.grid)
            for name, count in executed_by_opcode(parse_sass(sass), trips, launch_threads).items():
                executed[name] = executed.get(name, 0.0) + count
        total, mufu = sum(executed.values()), executed.get("MUFU", 0.0)
        per_program = total / threads  # per thread of a program, over every launch's
        per_score = total / scores_of(launch)
        fwd_bytes, fwd_flops = forward_minimum(launch, dtype)
        return Cost(
            launch.kernel,
            dtype,
            hd,
            n,
            arch,
            registers,
            spills,
            shared,
            warps,
            per_program,
            per_score,
            hbm,
            l2,
            flops,
            resident,
            scores_of(launch),
            programs,
            "",
            mufu / scores_of(launch),
            fwd_bytes,
            fwd_flops,
            tuple(sorted(((name, count / scores_of(launch)) for name, count in executed.items()), key=lambda o: -o[1])),
        )
    except Exception as exc:  # reported in the table and in the exit status
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        return Cost(
            launch.kernel,
            dtype,
            hd,
            n,
            arch,
            -1,
            -1,
            -1,
            0,
            0.0,
            0.0,
            hbm,
            l2,
            flops,
            0,
            scores_of(launch),
            programs,
            f"{type(exc).__name__}: {lines[-1][:200]}",
            0.0,
            *forward_minimum(launch, dtype),
        )


def _cost_job(args):
    kernel, dtype, head_dim, window, arch = args
    return cost_of(reference_launches(window, dtype, head_dim)[kernel], dtype, arch)


def cost_table(
    jobs: int, kernels=COST_KERNELS, dtypes=COST_DTYPES, windows=None, archs=(80, 90), head_dims=COST_HEAD_DIMS
):
    """Every (kernel, dtype, head_dim, window, arch) of the report, compiled in `jobs` fresh processes; the
    windows of each head dim by default, or `windows` for all."""
    work = [
        (k, d, h, w, a)
        for h in head_dims
        for k in kernels
        for d in dtypes
        for w in (windows or COST_WINDOWS_BY_HEAD_DIM.get(h, COST_WINDOWS))
        for a in archs
        if launched(k, w, h, d)
    ]
    return run_spawned(_cost_job, work, jobs)


def format_cost(costs: List[Cost]) -> str:
    lines = []
    for c in costs:
        if c.error:
            lines.append(f"cost {c.kernel} {c.dtype} hd{c.head_dim} N{c.n} sm_{c.arch} FAILED {c.error}")
        else:
            lines.append(c.line())
            lines.append(c.model_line())
    return "\n".join(lines)


def backward_sum(costs: List[Cost]) -> List[str]:
    """Per (dtype, head_dim, N, arch): the backward kernels' instructions per score added up, their H200
    estimates added up (they run one after another) and the floor of the backward as a whole."""
    groups: Dict[tuple, List[Cost]] = {}
    for c in costs:
        if c.backward and not c.error:
            groups.setdefault((c.dtype, c.head_dim, c.n, c.arch), []).append(c)
    lines = []
    for (d, h, n, a), group in sorted(groups.items()):
        instr = sum(c.instr_per_score for c in group)
        est = sum(c.times().est for c in group)
        cal = sum(c.times().cal_est for c in group)
        floor = group[0].floor()
        lines.append(
            f"backward-total {d} hd{h} N{n} sm_{a} instr_per_score={instr:.2f} h200_us: est={est:.1f} "
            f"cal_est={cal:.1f} floor={floor:.1f} est/floor={est / floor:.2f} cal_est/floor={cal / floor:.2f}"
        )
    return lines


# ------------------------------------------------------------------------------------------- calibration
# Published H100 forward throughput of Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py),
# fp16, TFLOP/s as the tutorial counts them (4 * batch * heads * N_CTX^2 * head_dim, halved when causal), by
# N_CTX: (source URL, hardware, head_dim, causal, batch, heads, {N_CTX: TFLOP/s}).
PUBLISHED_TUTORIAL = (
    (
        "https://github.com/facebookexperimental/triton/pull/205",
        H100_SXM,
        128,
        False,
        4,
        32,
        {1024: 406.8, 2048: 427.8, 4096: 459.6, 8192: 464.4, 16384: 487.0},
    ),
    (
        "https://github.com/triton-lang/triton/pull/4552",
        H100_SXM,
        128,
        False,
        4,
        32,
        {1024: 356.4, 2048: 387.5, 4096: 406.5, 8192: 413.2, 16384: 418.7},
    ),
    (
        "https://github.com/triton-lang/triton/issues/2367",
        H100_SXM,
        64,
        True,
        4,
        48,
        {1024: 169.0, 2048: 211.9, 4096: 239.1, 8192: 254.7, 16384: 265.1},
    ),
    ("https://github.com/Dao-AILab/flash-attention/issues/1777", H100_PCIE, 64, False, 16, 32, {1024: 230.0}),
)


class _TutorialDriver:
    """Stands in for Triton's active driver while the tutorial module is imported and its host code runs on
    meta tensors: a CUDA sm_90 target, the meta device."""

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def _as_hopper():
    import torch
    from triton.runtime import driver

    saved, capability = driver._active, torch.cuda.get_device_capability
    driver.set_active(_TutorialDriver())
    torch.cuda.get_device_capability = lambda *args: (9, 0)
    try:
        yield
    finally:
        driver._active, torch.cuda.get_device_capability = saved, capability


def load_tutorial(path: str):
    """Import the fused-attention tutorial from `path` (it asks the driver for a device at import)."""
    import importlib.util

    with _as_hopper():
        spec = importlib.util.spec_from_file_location("fused_attention_tutorial", path)
        # a path to a .py file always has a spec with a source loader
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def tutorial_forward_launches(module, batch: int, heads: int, n_ctx: int, head_dim: int, causal: bool) -> List[Launch]:
    """The tutorial's forward (`module.attention`) run on fp16 meta tensors with its autotuned kernels
    replaced by a recorder; one Launch per autotuner configuration that compiles at this head_dim (the
    kernel asserts BLOCK_N <= HEAD_DIM), with the configuration's pre-hook applied and the grid evaluated."""
    import torch
    from triton.runtime.autotuner import Autotuner

    recorded = []

    class _Recorder:
        def __init__(self, tuner):
            self.tuner = tuner

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                recorded.append((self.tuner, grid, args, kwargs))

            return launch

    tuners = {name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)}
    q = torch.empty(batch, heads, n_ctx, head_dim, dtype=torch.float16, device="meta")
    try:
        for name, tuner in tuners.items():
            setattr(module, name, _Recorder(tuner))
        with _as_hopper():
            module.attention(q, torch.empty_like(q), torch.empty_like(q), causal, 0.5)
    finally:
        for name, tuner in tuners.items():
            setattr(module, name, tuner)
    if len(recorded) != 1:
        raise RuntimeError(f"expected one autotuned forward launch, recorded {len(recorded)}")
    tuner, grid, args, kwargs = recorded[0]
    fn = tuner.fn
    launches = []
    for config in tuner.configs:
        a = dict(zip(fn.arg_names, args), **kwargs, **config.kwargs)
        # the pre-hook sets the tensor descriptors' block shapes: each configuration gets its own copies
        a = {k: copy.copy(v) if hasattr(v, "block_shape") else v for k, v in a.items()}
        if a["BLOCK_N"] > head_dim:
            continue
        a["num_warps"], a["num_stages"] = config.num_warps, config.num_stages
        if config.pre_hook:
            config.pre_hook(a)
        launches.append(Launch("tutorial_fwd", fn, tuple(grid(a) if callable(grid) else grid), a))
    return launches


def _tutorial_trips(a: dict, grid, n_ctx: int, causal: bool) -> List[float]:
    """The forward's key-block loops: non-causal one over N_CTX; causal the off-band loop (start_m * BLOCK_M
    keys, at its mean over the query blocks) and the diagonal block's (BLOCK_M / BLOCK_N key blocks)."""
    bm, bn = a["BLOCK_M"], a["BLOCK_N"]
    if not causal:
        return [n_ctx / bn]
    # the diagonal block's loop of one trip (BLOCK_M == BLOCK_N) is unrolled: no back-edge
    return [(grid[0] - 1) / 2 * bm / bn] + ([bm / bn] if bm > bn else [])


def calibrate_launch(
    launch: Launch, n_ctx: int, head_dim: int, causal: bool, hw: Hardware, arch: int = 90
) -> Tuple[Times, float, float]:
    """(Times, thread instructions per score, MUFU per score) of one tutorial configuration on `hw`: the
    same compilation, SASS walk and estimate as the window-attention kernels'."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, a = launch.fn, launch.kwargs
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**a)
    options, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options.__dict__,
    )
    _, sass = cubin_listings(compiled.asm["cubin"])
    instructions = parse_sass(sass)
    trips = _tutorial_trips(a, launch.grid, n_ctx, causal)
    threads = compiled.metadata.num_warps * 32 * _programs(launch)
    executed = executed_by_opcode(instructions, trips, threads)
    total, mufu = sum(executed.values()), executed.get("MUFU", 0.0)
    batch_heads = launch.grid[1]
    # the matmuls the kernel runs: BLOCK_M x BLOCK_N x head_dim, twice, per key block of each program
    blocks = sum(trips) * _programs(launch)
    flops = blocks * a["BLOCK_M"] * a["BLOCK_N"] * head_dim * 4
    hbm = batch_heads * n_ctx * (4 * head_dim * 2 + 4)  # q, k, v in, o out (fp16), the row statistics (fp32)
    scores = batch_heads * n_ctx * n_ctx
    return times(hbm, flops, "fp16", total, mufu, hw), total / scores, mufu / scores


def calibration_table(path: str) -> List[str]:
    """Predicted and published TFLOP/s of the tutorial's forward at every published shape: the prediction
    is that of the configuration the model finds fastest (the autotuner keeps the fastest), with the roofline
    (est) and the calibrated estimate (cal_est)."""
    module = load_tutorial(path)
    failed: Dict[tuple, str] = {}
    lines = [
        f"{'source':<58} {'hw':<9} {'hd':>3} {'causal':<6} {'B':>2} {'H':>2} {'N_CTX':>5} {'published':>9} "
        f"{'est_TF':>6} {'est/pub':>7} {'cal_TF':>6} {'cal/pub':>7} {'config (M,N,warps,stages)':<26} "
        f"{'instr/score':>11} {'mufu/score':>10}"
    ]
    for url, hw, head_dim, causal, batch, heads, published in PUBLISHED_TUTORIAL:
        for n_ctx, tflops in published.items():
            counted = 4 * batch * heads * n_ctx**2 * head_dim * (0.5 if causal else 1.0)
            best: Optional[Tuple[Times, float, float, Tuple[int, int, int, int]]] = None
            est_best = float("inf")
            for launch in tutorial_forward_launches(module, batch, heads, n_ctx, head_dim, causal):
                try:
                    t, instr, mufu = calibrate_launch(launch, n_ctx, head_dim, causal, hw)
                except Exception as exc:  # reported below the table (the autotuner drops one that fails)
                    key = (
                        head_dim,
                        causal,
                        tuple(launch.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")),
                    )
                    if key not in failed:
                        failed[key] = str(exc).strip().splitlines()[-1][:120]
                    continue
                a = launch.kwargs
                if best is None or t.cal_est < best[0].cal_est:
                    best = (t, instr, mufu, (a["BLOCK_M"], a["BLOCK_N"], a["num_warps"], a["num_stages"]))
                est_best = min(est_best, t.est)
            assert best is not None, f"no configuration compiled: {failed}"
            t, instr, mufu, config = best
            est_tf = counted / (est_best * 1e-6) / 1e12
            cal_tf = counted / (t.cal_est * 1e-6) / 1e12
            lines.append(
                f"{url:<58} {hw.name:<9} {head_dim:>3} {causal!s:<6} {batch:>2} {heads:>2} {n_ctx:>5} "
                f"{tflops:>9.1f} {est_tf:>6.1f} {est_tf / tflops:>7.2f} {cal_tf:>6.1f} "
                f"{cal_tf / tflops:>7.2f} {config!s:<26} {instr:>11.2f} {mufu:>10.2f}"
            )
    lines += [f"not counted: hd{h} causal={c} {config}: {why}" for (h, c, config), why in sorted(failed.items())]
    return lines


# ------------------------------------------------------------------------------------ per-model summary
SUMMARY_BATCH = 64
SUMMARY_DTYPE = "bf16"
SUMMARY_ARCH = 90
# (name, embed_dim, depths, heads per stage, image size, window); patch 4, head_dim 32
SUMMARY_MODELS = (
    ("SwinV2-T 256 w8", 96, (2, 2, 6, 2), (3, 6, 12, 24), 256, 8),
    ("SwinV2-B 256 w16", 128, (2, 2, 18, 2), (4, 8, 16, 32), 256, 16),
    ("SwinV2-B 192 w12", 128, (2, 2, 18, 2), (4, 8, 16, 32), 192, 12),
    ("SwinV2-L 384 w24", 192, (2, 2, 18, 2), (6, 12, 24, 48), 384, 24),
)
# the benchmark's op cases (benchmarks/cases.py OP_SHAPES) that time a model's first stage, shifted
SUMMARY_OP_CASES = {
    "SwinV2-T 256 w8": "tiny-w8-256",
    "SwinV2-B 256 w16": "base-w16-256",
    "SwinV2-B 192 w12": "base-w12-192",
    "SwinV2-L 384 w24": "large-w24-384",
}


class StageShape(NamedTuple):
    stage: int
    grid: int  # tokens per side
    heads: int
    window: int
    shift: int
    blocks: int  # blocks of the stage with this (window, shift)


def model_stages(depths, heads, image_size: int, window: int) -> List[StageShape]:
    """The window attention's shapes over a model: stage i at image_size / 4 / 2^i tokens a side; a stage
    whose resolution is at most the window uses window = resolution and no shift
    (swinv2_fast.windows.window_and_shift); otherwise blocks alternate unshifted / shifted by window // 2."""
    from swinv2_fast.windows import window_and_shift

    shapes = []
    for i, (depth, h) in enumerate(zip(depths, heads)):
        res = image_size // 4 // 2**i
        (w, _), (s, _) = window_and_shift((res, res), window, window // 2, "timm")
        if s:
            shapes += [StageShape(i, res, h, w, 0, depth - depth // 2), StageShape(i, res, h, w, s, depth // 2)]
        else:
            shapes.append(StageShape(i, res, h, w, 0, depth))
    return shapes


def _stage_job(shape: StageShape) -> List[Cost]:
    """Every kernel of one forward and one backward at a stage shape, batch SUMMARY_BATCH: the launches the
    host functions make for that shape, recorded and compiled (not scaled from the reference launch)."""
    geometry = dict(
        grid_size=(shape.grid, shape.grid),
        num_heads=shape.heads,
        window_size=(shape.window, shape.window),
        shift_size=(shape.shift, shape.shift),
    )
    found = reference_launches(shape.window, SUMMARY_DTYPE, COST_HEAD_DIM, geometry, batch=SUMMARY_BATCH)
    return [cost_of(launches, SUMMARY_DTYPE, SUMMARY_ARCH) for launches in found.values()]


def model_summary(jobs: int) -> List[str]:
    """Per model: a line per stage shape (its forward and its backward for one block) and the totals over
    the model's blocks, a forward and a training step (forward + backward): the H200 estimates (est, cal_est),
    the floor and their ratios."""
    units = sorted({s for m in SUMMARY_MODELS for s in model_stages(*m[2:])}, key=lambda s: s[1:])
    unit_costs = dict(zip(units, run_spawned(_stage_job, units, jobs)))
    lines = []
    for name, _, depths, heads, image, window in SUMMARY_MODELS:
        total = {k: [0.0, 0.0, 0.0] for k in ("forward", "backward")}  # est, cal_est, floor
        for shape in model_stages(depths, heads, image, window):
            costs = unit_costs[shape]
            failed = [c for c in costs if c.error]
            if failed:
                raise RuntimeError(f"{name} {shape}: {failed[0].error}")
            parts = {}
            for kind, group in (
                ("forward", [c for c in costs if not c.backward]),
                ("backward", [c for c in costs if c.backward]),
            ):
                est = sum(c.times().est for c in group)
                cal = sum(c.times().cal_est for c in group)
                floor = group[0].floor()
                parts[kind] = (est, cal, floor)
                for i, v in enumerate((est, cal, floor)):
                    total[kind][i] += v * shape.blocks
            case = SUMMARY_OP_CASES[name] if shape.stage == 0 and shape.shift else ""
            lines.append(
                f"stage {name} s{shape.stage} grid{shape.grid} heads{shape.heads} window{shape.window} "
                f"shift{shape.shift} blocks={shape.blocks} per block h200_us: "
                + " ".join(f"{k}: est={e:.1f} cal_est={c:.1f} floor={f:.1f}" for k, (e, c, f) in parts.items())
                + (f"  (op case {case})" if case else "")
            )
        fwd, bwd = total["forward"], total["backward"]
        step = [f + b for f, b in zip(fwd, bwd)]
        lines.append(
            f"model-summary {name} batch{SUMMARY_BATCH} {SUMMARY_DTYPE} sm_{SUMMARY_ARCH} h200_us: "
            + " ".join(
                f"{k}: est={e:.0f} cal_est={c:.0f} floor={f:.0f} est/floor={e / f:.2f} cal_est/floor={c / f:.2f}"
                for k, (e, c, f) in (("forward", fwd), ("train_step", step))
            )
        )
    return lines
