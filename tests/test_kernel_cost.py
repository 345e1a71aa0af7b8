"""The static cost report (tools/cost.py, `python -m tools.compile_check --cost`): the SASS walk counts loops at
their trip counts (checked by hand on a small listing), and the report's lines have the documented form."""

import re
import shutil

import pytest

pytest.importorskip("triton")  # tools/ records and compiles launches of the Triton files

from _utils import use_tools

use_tools()
from tools import cost, launches  # noqa: E402

COST_LINE = re.compile(
    r"^cost (fwd|bwd_[a-z]+) (bf16|fp16|fp32) hd(\d+) N(\d+) (sm_80|sm_90) regs=(\d+) spill=(\d+) "
    r"instr_per_score=(\d+\.\d+)$"
)

# A cuobjdump-style listing: 3 instructions, a guard, a loop of 4 (0x40 .. 0x70, back-edge at 0x70), a
# forward branch over a 2-instruction block (the zero-trip path), a predicated EXIT, a store, EXIT, trap.
SASS = """
        code for sm_90a
                Function : toy_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                      /* 0x0000000000007919 */
        /*0020*/                   ISETP.GE.AND P1, PT, R0, 0x1, PT ;      /* 0x0000000100007919 */
        /*0030*/              @!P1 BRA 0xa0 ;                              /* 0x0000003800389947 */
        /*0040*/                   IMAD R2, R0, R0, R2 ;                   /* 0x0000000000007919 */
        /*0050*/                   FADD R3, R3, R2 ;                       /* 0x0000000000007919 */
        /*0060*/                   ISETP.GE.AND P1, PT, R2, 0x4, PT ;      /* 0x0000000000007919 */
        /*0070*/              @!P1 BRA 0x40 ;                              /* 0xffffffcc00ec9947 */
        /*0080*/                   BRA 0xc0 ;                              /* 0x0000000000907947 */
        /*0090*/                   NOP ;                                   /* 0x0000000000907947 */
        /*00a0*/                   MOV R3, RZ ;                            /* 0x0000000000907947 */
        /*00b0*/                   MOV R2, RZ ;                            /* 0x0000000000907947 */
        /*00c0*/              @!P0 EXIT ;                                  /* 0x000000000000894d */
        /*00d0*/                   STG.E [R4.64], R3 ;                     /* 0x000000000000894d */
        /*00e0*/                   EXIT ;                                  /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                               /* 0xfffffffc00fc7947 */
"""


def test_sass_walk_counts_loops_at_their_trip_count():
    instructions = launches.parse_sass(SASS)
    assert len(instructions) == 16
    assert cost.back_edges(instructions) == [0x70]
    # by hand: 4 before the loop + 4 per iteration + the BRA out + @!P0 EXIT, STG, EXIT
    assert cost.count_executed(instructions, [1]) == 4 + 4 * 1 + 1 + 3
    assert cost.count_executed(instructions, [5]) == 4 + 4 * 5 + 1 + 3
    # a mean trip count over programs (the bias-table kernel's window groups) interpolates linearly
    assert cost.count_executed(instructions, [2.5]) == pytest.approx(4 + 4 * 2.5 + 1 + 3)
    # per opcode (the --histogram lines): the loop's body (IMAD, FADD, ISETP, BRA) at its trip count, interpolated too
    tally = cost.tally_executed(instructions, [2.5], cost.opcode)
    assert tally == pytest.approx(
        {"LDC": 1, "S2R": 1, "ISETP": 1 + 2.5, "BRA": 1 + 2.5 + 1, "IMAD": 2.5, "FADD": 2.5, "EXIT": 2, "STG": 1}
    )
    assert sum(tally.values()) == pytest.approx(cost.count_executed(instructions, [2.5]))


def test_sass_walk_refuses_a_loop_structure_it_was_not_told():
    instructions = launches.parse_sass(SASS)
    with pytest.raises(ValueError, match="1 loop back-edges"):
        cost.count_executed(instructions, [2, 3])
    straight = launches.parse_sass("\n".join(line for line in SASS.splitlines() if "0x40 ;" not in line))
    assert cost.back_edges(straight) == []
    assert cost.count_executed(straight, [7]) == 4 + 3 + 1 + 3  # unrolled (body of 3 left): counted once


def test_cost_line_format():
    c = cost.Cost("fwd", "bf16", 32, 64, 90, 128, 0, 1024, 4, 2400.0, 75.0, 10, 20, 30, 16, 131072, 512, "")
    assert COST_LINE.match(c.line())
    assert c.line() == "cost fwd bf16 hd32 N64 sm_90 regs=128 spill=0 instr_per_score=75.00"
    assert c.model_line().startswith("model fwd bf16 hd32 N64 sm_90 hbm_bytes=10 l2_sm_bytes=20 l2_over_hbm=2.00 ")


def test_spills_are_local_memory_traffic():
    usage = "Function toy_kernel:\n  REG:152 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:656"
    assert launches.resource_usage(usage, SASS) == (152, 0)  # a reserved frame nothing touches is no spill
    spilled = SASS.replace("MOV R3, RZ ;", "STL.64 [R1+0x8], R2 ;").replace("MOV R2, RZ ;", "LDL R2, [R1+0x8] ;")
    assert launches.resource_usage(usage, spilled) == (152, 8 + 4)


def test_resident_warps():
    # 142 registers -> 4608 per warp (rounded to 256 per warp): 14 warps fit 64K; in CTAs of 4 warps, 12
    assert cost.resident_warps(142, 1024, 4, 90) == 12
    assert cost.resident_warps(128, 0, 4, 90) == 16
    assert cost.resident_warps(32, 0, 8, 90) == 64  # the 64-warp limit


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX shell")
def test_cost_report_compiles_the_reference_launch():
    """One real line: the forward at N = 64, bf16, sm_90, compiled in a fresh process without the interpreter."""
    (c,) = cost.cost_table(1, kernels=("fwd",), dtypes=("bf16",), windows=(8,), archs=(90,), head_dims=(32,))
    assert not c.error, c.error
    match = COST_LINE.match(c.line())
    assert match and match.group(4) == "64" and match.group(5) == "sm_90"
    assert c.scores == launches.REFERENCE_BATCH * launches.REFERENCE_HEADS * 64 * 64**2  # 64 windows of 64 tokens
    assert c.instr_per_score == pytest.approx(c.instr_per_program * c.num_warps * 32 * c.programs / c.scores)
    assert 0 < c.registers <= 255 and c.spill_bytes == 0
    # the --histogram line of the same kernel: its opcodes add up to the instructions per score
    counts = dict(c.opcodes)
    assert sum(counts.values()) == pytest.approx(c.instr_per_score) and counts["HGMMA"] > 0 and counts["MUFU"] >= 1


def test_spill_gate_geometries_cover_every_flag_combination():
    """The gate's geometries (compile_check.GEOMETRIES, at the published windows) reach every combination of
    the kernels' compile-time flags the host can launch; recorded from the host functions on meta tensors
    (nothing is compiled or run)."""
    from tools import compile_check

    flags = set()
    for window in compile_check.WINDOW_SIZES:
        for geometry in compile_check.GEOMETRIES:
            spec = compile_check.Spec("bwd_dq", "fp32", 30, window, geometry)
            launch = compile_check.spec_launches(spec)[0]  # on a shifted grid the first of two
            a = launch.kwargs
            assert (a["WH"], a["WW"], a["N"]) == (window, window, window * window)
            flags.add((a["SHIFTED"], a["PADDED"], a["ROLL_THEN_PAD"], a["HAS_BIAS"]))
    # without padding the order and the bias are not told apart (nothing reads the bias)
    possible = {(s, False, False, False) for s in (False, True)} | {
        (s, True, r, b) for s in (False, True) for r in (False, True) for b in (False, True)
    }
    assert flags == possible


def test_forward_launches_split_the_shifted_grid():
    """On a shifted grid the forward runs the windows off the shifted border (no shift mask) and the border
    windows as two launches that together cover every window once; unshifted, one launch of every window.
    Recorded on meta tensors (nothing is compiled or run)."""
    from swinv2_fast.kernels import triton_forward as tk

    recorded = launches.reference_launches(8, "bf16", backward=False)["fwd"]  # 64x64 grid: 8x8 windows, shifted
    m_blocks = -(-64 // recorded[0].kwargs["BLOCK_M"])

    def covered(launch):  # (window set, (image, window) pairs); the grid runs WINDOWS_PER_PROGRAM pairs a program
        a = launch.kwargs
        assert launch.grid[0] == -(-a["NUM_BW"] // a["WINDOWS_PER_PROGRAM"]) * m_blocks
        return a["WINDOW_SET"], a["NUM_BW"]

    assert [covered(a) for a in recorded] == [
        (tk.INTERIOR_WINDOWS, launches.REFERENCE_BATCH * 49),
        (tk.BORDER_WINDOWS, launches.REFERENCE_BATCH * 15),
    ]
    unshifted = dict(grid_size=(64, 64), window_size=(8, 8), shift_size=(0, 0))
    (launch,) = launches.reference_launches(8, "bf16", geometry=unshifted, backward=False)["fwd"]
    assert covered(launch) == (tk.ALL_WINDOWS, launches.REFERENCE_BATCH * 64)
    # a single window row (or column) has no interior: one launch of every window, masked
    one_row = dict(grid_size=(8, 64), window_size=(8, 8), shift_size=(4, 4))
    (launch,) = launches.reference_launches(8, "bf16", geometry=one_row, backward=False)["fwd"]
    assert launch.kwargs["WINDOW_SET"] == tk.ALL_WINDOWS and launch.kwargs["SHIFTED"]


def test_reference_launches_record_the_backward_the_launcher_runs(monkeypatch):
    """fp16/bf16 windows of 64 tokens (head dims up to 32), of 49 at head_dim 32 with Triton 3.8 or later, and fp32
    windows of 64 and 49 (unpadded grids) at head_dim 32 and 16: the fused backward alone, one program per (group
    of windows, head), its loop counted at the windows per group, fp32 window 7's table padded to the block;
    windows 12 and 16 (N = 129 to 256): the rows kernel, one program per (row block, head, group of windows), and
    the dk/dv kernel; window 24, window 7 with Triton 3.6 in fp16/bf16 and on a padded grid in fp32, and the other
    fp32 windows: the four kernels. Recorded on meta tensors (nothing is compiled or run)."""
    from swinv2_fast.kernels import tiles
    from swinv2_fast.kernels import triton_forward as tk

    monkeypatch.setattr(tiles, "_triton_release", lambda: (3, 8))
    fused_cases = (
        (8, "bf16", 32),
        (8, "fp16", 32),
        (8, "bf16", 30),
        (8, "fp16", 10),
        (7, "bf16", 32),
        (7, "fp16", 32),
        (8, "fp32", 32),
        (8, "fp32", 16),
        (7, "fp32", 32),
        (7, "fp32", 16),
    )
    for window, dtype, head_dim in fused_cases:
        recorded = launches.reference_launches(window, dtype, head_dim)
        assert sorted(recorded) == ["bwd_fused", "fwd"], (window, dtype, head_dim)
        # the reference grid is shifted: the windows off its border (no shift mask), then the border
        interior, border = recorded["bwd_fused"]
        assert [lch.kwargs["WINDOW_SET"] for lch in (interior, border)] == [tk.INTERIOR_WINDOWS, tk.BORDER_WINDOWS]
        num_bw = launches.REFERENCE_BATCH * interior.kwargs["NUM_WINDOWS"]
        assert interior.kwargs["NUM_BW"] + border.kwargs["NUM_BW"] == num_bw
        # one group size for both launches, from every window of the grid (as one launch would have)
        per_group = -(-num_bw // (tiles.FUSED_PROGRAMS // launches.REFERENCE_HEADS))
        assert interior.kwargs["WINDOWS_PER_GROUP"] == border.kwargs["WINDOWS_PER_GROUP"] == per_group
        for launch in (interior, border):
            a = launch.kwargs
            groups, heads = launch.grid
            assert heads == launches.REFERENCE_HEADS
            assert groups == -(-a["NUM_BW"] // a["WINDOWS_PER_GROUP"]) and groups * heads <= tiles.FUSED_PROGRAMS
            assert a["BLOCK_M"] == a["BLOCK_N"] == 64
            # 8 warps, 16 in fp32, at a register budget one SM holds; the spill gate compiles what the host launches
            assert a["num_warps"] == tiles.fused_num_warps(a["N"], a["QKV"].dtype) == (16 if dtype == "fp32" else 8)
            assert a["maxnreg"] * 32 * a["num_warps"] <= tiles.REGISTER_FILE
            assert launches.for_arch(launch, 90).kwargs["maxnreg"] == a["maxnreg"]
            # the reference grid is not padded
            assert (a["NEED_DQ"], a["NEED_DKV"], a["NEED_PAD"], a["NEED_TABLE"]) == (True, True, False, True)
            assert cost.LOOP_TRIPS["bwd_fused"](a, launch.grid) == [a["NUM_BW"] / groups]
            # fp32 window 7 reads the table padded to its block (tiles.fused_pads_table)
            assert a["PAD_TABLE"] == (window == 7 and dtype == "fp32")
            side = 64 if a["PAD_TABLE"] else a["N"]
            assert tuple(a["POSITION_BIAS"].shape) == (heads, side, side)
            assert tuple(a["DBIAS"].shape) == (groups, heads, side, side)
        hbm, l2, flops = cost.traffic(interior, dtype)
        assert flops == cost.scores_of(interior) * 2 * head_dim * 5 and hbm > 0 and l2 > 0
    for window, dtype in ((12, "fp16"), (16, "bf16")):
        recorded = launches.reference_launches(window, dtype)
        assert sorted(recorded) == ["bwd_dkdv", "bwd_rows", "fwd"], (window, dtype)
        # the reference grid is shifted: the windows off its border (no shift mask), then the border
        interior, border = recorded["bwd_rows"]
        assert [lch.kwargs["WINDOW_SET"] for lch in (interior, border)] == [tk.INTERIOR_WINDOWS, tk.BORDER_WINDOWS]
        num_bw = launches.REFERENCE_BATCH * interior.kwargs["NUM_WINDOWS"]
        assert interior.kwargs["NUM_BW"] + border.kwargs["NUM_BW"] == num_bw
        for launch in (interior, border):
            a = launch.kwargs
            row_blocks, heads, groups = launch.grid
            # the reference grid is not padded: 4 warps; window 12's keys in a 128-key tile and a tail of 16
            tail = {12: (128, 16)}.get(window, (256, 0))
            assert (a["BLOCK_M"], a["BLOCK_N"], a["num_warps"], a["BLOCK_T"]) == (16, tail[0], 4, tail[1])
            assert (a["BLOCK_M"], a["BLOCK_N"], a["num_warps"], a["BLOCK_T"]) == tiles.rows_tiles(
                a["N"], a["HEAD_DIM"], False
            )
            assert row_blocks == -(-a["N"] // a["BLOCK_M"]) and a["BLOCK_N"] + a["BLOCK_T"] >= a["N"]
            assert heads == launches.REFERENCE_HEADS and a["NEED_DQ"] and a["NEED_TABLE"]
            assert groups == -(-a["NUM_BW"] // a["WINDOWS_PER_GROUP"])
            assert row_blocks * heads * groups <= tiles.FUSED_PROGRAMS
            assert cost.LOOP_TRIPS["bwd_rows"](a, launch.grid) == [a["NUM_BW"] / groups]
        hbm, l2, flops = cost.traffic(interior, dtype)
        assert flops == cost.scores_of(interior) * 2 * 32 * 3 and hbm > 0 and l2 > 0
    # window 12's dk/dv kernel runs its last 16 query rows as a block of their own (tiles.dkdv_query_tail)
    dkdv = [launches.reference_launches(w, "bf16")["bwd_dkdv"][0] for w in (12, 16)]
    assert [launch.kwargs["M_TAIL"] for launch in dkdv] == [16, 0]
    # its loop runs over the whole blocks (the tail block after it)
    assert [cost.LOOP_TRIPS["bwd_dkdv"](launch.kwargs, launch.grid) for launch in dkdv] == [[2], [4]]
    # heads of up to 16 channels: the rows kernel in 32-channel tiles (tiles.rows_channel_block), the dk/dv kernel in 16
    for head_dim in (16, 10):
        recorded = launches.reference_launches(12, "bf16", head_dim)
        assert {k: recorded[k][0].kwargs["BLOCK_D"] for k in ("bwd_rows", "bwd_dkdv")} == {
            "bwd_rows": 32,
            "bwd_dkdv": 16,
        }
    monkeypatch.setattr(tiles, "_triton_release", lambda: (3, 6))
    padded7 = dict(grid_size=(60, 60), window_size=(7, 7), shift_size=(3, 3))  # 60 = 8 windows of 7, 4 padded
    for window, dtype, geometry in ((24, "bf16", None), (7, "bf16", None), (7, "fp32", padded7), (12, "fp32", None)):
        recorded = launches.reference_launches(window, dtype, geometry=geometry)
        assert sorted(recorded) == ["bwd_dbias", "bwd_dkdv", "bwd_dq", "bwd_stats", "fwd"], (window, dtype)
        # each kernel: the windows off the shifted border (no shift mask), then the border, every window once
        for kernel in ("bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias"):
            interior, border = recorded[kernel]
            assert [lch.kwargs["WINDOW_SET"] for lch in (interior, border)] == [tk.INTERIOR_WINDOWS, tk.BORDER_WINDOWS]
            a = interior.kwargs
            num_bw = launches.REFERENCE_BATCH * a["NUM_WINDOWS"]
            if kernel == "bwd_dbias":  # (tiles, heads, groups of windows): one group size for both launches
                assert interior.kwargs["NUM_BW"] + border.kwargs["NUM_BW"] == num_bw
                units = interior.grid[0] * interior.grid[1]
                per_group = -(-num_bw // (tiles.TABLE_PROGRAMS // units))
                assert interior.kwargs["WINDOWS_PER_GROUP"] == border.kwargs["WINDOWS_PER_GROUP"] == per_group
                for launch in (interior, border):
                    groups = launch.grid[2]
                    assert groups == -(-launch.kwargs["NUM_BW"] // launch.kwargs["WINDOWS_PER_GROUP"])
            else:  # (blocks of every window of the set, heads)
                block = a["BLOCK_N"] if kernel == "bwd_dkdv" else a["BLOCK_M"]
                assert interior.grid[0] + border.grid[0] == num_bw * -(-a["N"] // block), kernel
    assert launches.launched("bwd_fused", 8, 32, "bf16") and not launches.launched("bwd_stats", 8, 32, "bf16")
    assert launches.launched("bwd_fused", 8, 32, "fp32") and not launches.launched("bwd_fused", 16, 32, "bf16")
    assert launches.launched("bwd_stats", 8, 30, "fp32") and launches.launched("bwd_fused", 7, 32, "fp32")
    assert launches.launched("bwd_stats", 7, 32, "fp32", padded=True)
    assert launches.launched("bwd_stats", 8, 10, "fp32")
    assert launches.launched("bwd_rows", 12, 32, "bf16") and not launches.launched("bwd_rows", 24, 32, "bf16")
    assert not launches.launched("bwd_rows", 7, 32, "bf16") and launches.launched("bwd_stats", 7, 32, "bf16")
    monkeypatch.setattr(tiles, "_triton_release", lambda: (3, 8))
    assert launches.launched("bwd_fused", 7, 32, "bf16") and not launches.launched("bwd_fused", 7, 30, "bf16")


@pytest.mark.slow
def test_fused_backward_meets_the_instruction_budget():
    """The fused backward's instruction budget: at most 150 SASS instructions per score at N = 64 (bf16, head_dim 32,
    sm_90), without spills; compiled in a fresh process without the interpreter."""
    costs = cost.cost_table(
        1, kernels=cost.COST_KERNELS[1:], dtypes=("bf16",), windows=(8,), archs=(90,), head_dims=(32,)
    )
    assert [c.kernel for c in costs] == ["bwd_fused"] and not costs[0].error, costs
    (total,) = cost.backward_sum(costs)
    assert float(total.split("=")[-1]) <= 150 and costs[0].spill_bytes == 0, (total, costs[0].line())


def test_floors_by_hand():
    """The forward's floor is max(HBM, tensor-core) time of its minimal traffic and matmuls; the backward's
    max(2 x that HBM time, 2.5 x that tensor time). At the reference launch of N = 64 (bf16, head_dim 32,
    batch 8, 4 heads, a 64x64 grid) by hand: 131072 (token, head) pairs x 32 channels x 2 bytes x (q, k, v,
    out) + the 4 x 64 x 64 bf16 table = 33587200 B, 6.997 us at 4.8 TB/s; 8 x 4 x 64 windows x 64^2 scores
    x 2 matmuls x 64 FLOPs = 1073741824 FLOPs, 1.359 us at 790 TFLOP/s."""
    (launch, *_) = launches.reference_launches(8, "bf16", backward=False)["fwd"]
    fwd_bytes, fwd_flops = cost.forward_minimum(launch, "bf16")
    assert (fwd_bytes, fwd_flops) == (33587200, 1073741824)
    assert cost.floor_us(fwd_bytes, fwd_flops, "bf16", backward=False) == pytest.approx(6.99733, rel=1e-5)
    assert cost.floor_us(fwd_bytes, fwd_flops, "bf16", backward=True) == pytest.approx(13.99467, rel=1e-5)
    # a tensor-bound launch: 1 byte, 790e6 FLOPs -> 1 us forward, 2.5 us backward
    assert cost.floor_us(1, 790e6, "fp16", backward=False) == pytest.approx(1.0)
    assert cost.floor_us(1, 790e6, "fp16", backward=True) == pytest.approx(2.5)
    assert cost.floor_us(1, 67e6, "fp32", backward=False) == pytest.approx(1.0)  # IEEE fp32 dots


def test_estimates_and_model_line_fields():
    # 4.8e6 B (1 us), 790e6 FLOPs (1 us), 2 us of issue, 1 us of MUFU: roofline 2 us, serialised 4 us
    issue = 2 * cost.H200.issue_per_s * 1e-6
    mufu = cost.H200.mufu_per_s * 1e-6
    t = cost.times(4.8e6, 790e6, "bf16", issue, mufu)
    assert (t.hbm, t.dot, t.issue, t.mufu) == pytest.approx((1, 1, 2, 1))
    assert t.est == pytest.approx(2) and t.cal_est == pytest.approx(4)
    assert cost.times(48e6, 790e6, "bf16", issue, mufu).cal_est == pytest.approx(10)  # HBM-bound
    c = cost.Cost(
        "fwd",
        "bf16",
        32,
        64,
        90,
        128,
        0,
        1024,
        4,
        2400.0,
        2.0,
        4800000,
        20,
        790000000,
        16,
        int(issue // 2),
        512,
        "",
        0.5 * mufu / (issue // 2) * 2,
        4800000,
        790000000,
    )
    line = c.model_line()
    assert line.startswith("model fwd bf16 hd32 N64 sm_90 hbm_bytes=4800000 l2_sm_bytes=20 ")
    assert " est=2.0 mufu=1.0 cal_est=4.0 floor=1.0 est/floor=2.00 cal_est/floor=4.00" in line
    b = c._replace(kernel="bwd_dq")
    assert " backward_floor=2.5 est/backward_floor=0.80 cal_est/backward_floor=1.60" in b.model_line()
    (total,) = cost.backward_sum([b, b._replace(kernel="bwd_dkdv"), c])
    assert total == (
        "backward-total bf16 hd32 N64 sm_90 instr_per_score=4.00 h200_us: est=4.0 cal_est=8.0 "
        "floor=2.5 est/floor=1.60 cal_est/floor=3.20"
    )


def test_model_stages_follow_the_window_rules():
    """Stage i at image / 4 / 2^i tokens a side; a stage at most a window across takes the resolution as
    its window and no shift; otherwise half its blocks (the odd ones) shift by window // 2."""
    tiny = cost.model_stages((2, 2, 6, 2), (3, 6, 12, 24), 256, 8)
    assert [tuple(s) for s in tiny] == [
        (0, 64, 3, 8, 0, 1),
        (0, 64, 3, 8, 4, 1),
        (1, 32, 6, 8, 0, 1),
        (1, 32, 6, 8, 4, 1),
        (2, 16, 12, 8, 0, 3),
        (2, 16, 12, 8, 4, 3),
        (3, 8, 24, 8, 0, 2),
    ]
    large = cost.model_stages((2, 2, 18, 2), (6, 12, 24, 48), 384, 24)
    assert [tuple(s) for s in large][-2:] == [(2, 24, 24, 24, 0, 18), (3, 12, 48, 12, 0, 2)]
    base192 = cost.model_stages((2, 2, 18, 2), (4, 8, 16, 32), 192, 12)
    assert tuple(base192[-1]) == (3, 6, 32, 6, 0, 2)  # 6x6 tokens: one window of 36
    for _, _, depths, heads, image, window in cost.SUMMARY_MODELS:
        assert sum(s.blocks for s in cost.model_stages(depths, heads, image, window)) == sum(depths)


def test_sass_walk_skips_out_of_line_retry_loops():
    """A retry loop after the last EXIT (sm_90 mbarrier waits) is not a loop of the walk."""
    retry = SASS.replace(
        "        /*00f0*/                   BRA 0xf0;",
        "        /*00f0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;\n"
        "        /*0100*/              @!P0 BRA 0xf0 ;\n        /*0110*/                   BRA 0x110;",
    )
    instructions = launches.parse_sass(retry)
    assert cost.back_edges(instructions) == [0x70]
    assert cost.count_executed(instructions, [5]) == 4 + 4 * 5 + 1 + 3
    assert cost.count_executed(instructions, [5], lambda ins: ins.opcode == "FADD") == 5


def test_forward_traffic_per_launch():
    """The forward's traffic model per launch (cost._fwd_l2, cost._table_bytes): on one launch it is the
    kernel's traffic; the whole-window border launch's masked tables count as built (one table read, three
    written) and read (three), the interior's table once; each launch's L2 bytes with its own windows per
    program."""
    n, heads = 256, launches.REFERENCE_HEADS
    table = heads * n * n * 2  # bf16
    interior, border = launches.reference_launches(16, "bf16", backward=False)["fwd"]
    assert cost._table_bytes(interior) == table and cost._table_bytes(border) == 7 * table
    # unshifted: one launch over every window, whose L2 bytes are the traffic model's
    geometry = dict(grid_size=(64, 64), window_size=(16, 16), shift_size=(0, 0))
    (whole,) = launches.reference_launches(16, "bf16", geometry=geometry, backward=False)["fwd"]
    a = whole.kwargs
    assert cost.traffic(whole, "bf16")[1] == cost._fwd_l2(a, "bf16", a["NUM_BW"])
    # per launch: the border's windows with its own windows per program
    for launch in (interior, border):
        a = launch.kwargs
        wh, rows = a["NUM_BW"] * heads, 32 * 2
        assert (
            cost._fwd_l2(a, "bf16", a["NUM_BW"])
            == wh * (n * rows + n * 2 * rows) + wh * n * n * 2 // a["WINDOWS_PER_PROGRAM"]
        )


def test_for_arch_gives_sm80_the_forward_launches_the_host_makes_there(monkeypatch):
    """Windows 12 and 16's forward, recorded as for sm_90 (whole-window programs, the border's table with the shift
    mask added), rebuilt for sm_80 by for_arch: the tiles, stages, windows per program, grid, the table (the border's
    with the mask added there too: several key blocks) and every other launch value the host itself gives on sm_80."""
    from swinv2_fast.kernels import launch

    plain = lambda kwargs: {k: v for k, v in kwargs.items() if not hasattr(v, "shape")}  # noqa: E731
    for window in (12, 16):
        recorded = launches.reference_launches(window, "bf16", backward=False)["fwd"]
        assert all(lch.kwargs["WHOLE_WINDOW"] for lch in recorded)
        with monkeypatch.context() as m:
            m.setattr(launch, "device_arch", lambda t: 80)
            on_sm80 = launches.reference_launches(window, "bf16", backward=False)["fwd"]
        assert [(lch.grid, plain(lch.kwargs)) for lch in (launches.for_arch(lch, 80) for lch in recorded)] == [
            (lch.grid, plain(lch.kwargs)) for lch in on_sm80
        ]
        assert not any(lch.kwargs.get("WHOLE_WINDOW") for lch in on_sm80)
        tables = [launches.for_arch(lch, 80).kwargs["POSITION_BIAS"].shape for lch in recorded]
        # row-block programs over several key blocks: the border reads the tables with the shift mask added too
        n = window**2
        assert tables == [lch.kwargs["POSITION_BIAS"].shape for lch in on_sm80] == [(4, n, n), (3, 4, n, n)]
