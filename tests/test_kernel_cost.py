"""The static cost report (swinv2_fast.kernels.cost, `compile_check --cost`): the SASS walk counts loops at
their trip counts (checked by hand on a small listing), and the report's lines have the documented form."""
import re
import shutil

import pytest

from swinv2_fast.kernels import cost

COST_LINE = re.compile(r"^cost (fwd|bwd_[a-z]+) (bf16|fp16|fp32) hd(\d+) N(\d+) (sm_80|sm_90) regs=(\d+) spill=(\d+) "
                       r"instr_per_score=(\d+\.\d+)$")

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
    instructions = cost.parse_sass(SASS)
    assert len(instructions) == 16
    assert cost.back_edges(instructions) == [0x70]
    # by hand: 4 before the loop + 4 per iteration + the BRA out + @!P0 EXIT, STG, EXIT
    assert cost.count_executed(instructions, [1]) == 4 + 4 * 1 + 1 + 3
    assert cost.count_executed(instructions, [5]) == 4 + 4 * 5 + 1 + 3
    # a mean trip count over programs (the bias-table kernel's window groups) interpolates linearly
    assert cost.count_executed(instructions, [2.5]) == pytest.approx(4 + 4 * 2.5 + 1 + 3)


def test_sass_walk_refuses_a_loop_structure_it_was_not_told():
    instructions = cost.parse_sass(SASS)
    with pytest.raises(ValueError, match="1 loop back-edges"):
        cost.count_executed(instructions, [2, 3])
    straight = cost.parse_sass("\n".join(line for line in SASS.splitlines() if "0x40 ;" not in line))
    assert cost.back_edges(straight) == []
    assert cost.count_executed(straight, [7]) == 4 + 3 + 1 + 3  # unrolled (body of 3 left): counted once


def test_cost_line_format():
    c = cost.Cost("fwd", "bf16", 32, 64, 90, 128, 0, 1024, 4, 2400.0, 75.0, 10, 20, 30, 16, 131072, 512, "")
    assert COST_LINE.match(c.line())
    assert c.line() == "cost fwd bf16 hd32 N64 sm_90 regs=128 spill=0 instr_per_score=75.00"
    assert c.model_line().startswith("model fwd bf16 hd32 N64 sm_90 hbm_bytes=10 l2_sm_bytes=20 l2_over_hbm=2.00 ")


def test_resident_warps():
    # 142 registers -> 4608 per warp (rounded to 256 per warp): 14 warps fit 64K; in CTAs of 4 warps, 12
    assert cost.resident_warps(142, 1024, 4, 90) == 12
    assert cost.resident_warps(128, 0, 4, 90) == 16
    assert cost.resident_warps(32, 0, 8, 90) == 64  # the 64-warp limit


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX shell")
def test_cost_report_compiles_the_reference_launch():
    """One real line: the forward at N = 64, bf16, sm_90, compiled in a fresh process without the interpreter."""
    (c,) = cost.cost_table(1, kernels=("fwd",), dtypes=("bf16",), windows=(8,), archs=(90,))
    assert not c.error, c.error
    match = COST_LINE.match(c.line())
    assert match and match.group(4) == "64" and match.group(5) == "sm_90"
    assert c.scores == cost.REFERENCE_BATCH * cost.REFERENCE_HEADS * 64 * 64 ** 2  # 64 windows of 64 tokens
    assert c.instr_per_score == pytest.approx(c.instr_per_program * c.num_warps * 32 * c.programs / c.scores)
    assert 0 < c.registers <= 255 and c.spill_bytes == 0
