"""Every kernel specialization compiles ahead of time for sm_80 and sm_90 without register spills (no GPU)."""

import subprocess
import sys

import pytest

pytest.importorskip("triton")

from _utils import REPO_ROOT, use_tools

use_tools()


@pytest.mark.slow  # compiles the published head dim's specializations for two architectures (minutes)
def test_compile_check_passes():
    # --published: Swin V2's head dim 32 over every published window and geometry, Swin2SR's 30 and 10 at its
    # window and geometries; the full gate over every head dim of GATE_HEAD_DIMS is the check to run before
    # changing a kernel, too long for CI
    result = subprocess.run(
        [sys.executable, "-m", "tools.compile_check", "--published"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "0 failed, 0 with spills" in summary, summary
    # every published window size's specializations appear, for both archs
    assert result.stdout.count("sm_80") == result.stdout.count("sm_90") > 0
    from tools import launches
    from tools.launches import KERNELS, SWIN2SR_WINDOWS, WINDOW_SIZES

    for kernel in KERNELS:
        for dtype in ("fp32", "fp16", "bf16"):
            for head_dim in (32, 30, 10):
                windows = WINDOW_SIZES if head_dim == 32 else SWIN2SR_WINDOWS
                found = any(line.split()[:3] == [kernel, dtype, str(head_dim)] for line in result.stdout.splitlines())
                assert found == any(launches.launched(kernel, w, head_dim, dtype) for w in windows), (
                    kernel,
                    dtype,
                    head_dim,
                )


@pytest.mark.slow  # 16 compilations: a spec's two launches on the shifted grid, two archs (a minute or two)
def test_rows_kernel_compiles_without_spills_at_16_channel_heads():
    """The rows kernel at head dims up to 16, which no published model has and --published does not compile: it
    runs them in masked 32-channel tiles (tiles.rows_channel_block); in 16-channel tiles it spilled 4-8 KB at
    windows 12 and 16."""
    from tools.compile_check import launchable_specs, run

    specs = [s for s in launchable_specs((16, 10), ("shift+bias",), (12, 16)) if s.kernel == "bwd_rows"]
    specs = [s for s in specs if s.dtype == "bf16"]
    assert len(specs) == 4
    results = run(specs, 2)
    assert len(results) == 8 and not any(r.error for r in results), [r.error for r in results]
    assert all(r.spill_bytes == 0 for r in results), [(r.spec, r.arch, r.spill_bytes) for r in results]


def test_gate_fails_a_build_the_register_file_cannot_hold(monkeypatch):
    """A program's registers, allocated per warp in units of 256, must fit an SM's 65536: fp32 window 8's fused
    backward over 16 warps is built at 128 registers a thread (tiles.program_register_budget); at 129 the gate
    reports it failed, as the driver would refuse the launch. Nothing is compiled (the compiler is replaced)."""
    from swinv2_fast.kernels import tiles
    from tools import compile_check

    assert [tiles.program_register_budget(w) for w in (4, 8, 16)] == [255, 255, 128]
    compile_check.check_register_file(255, 8)
    compile_check.check_register_file(128, 16)
    with pytest.raises(RuntimeError, match="the launch would fail"):
        compile_check.check_register_file(129, 16)

    class Compiled:
        class metadata:
            shared = 0

    monkeypatch.setattr(compile_check, "compile_launch", lambda launch, arch: (Compiled, "", ""))
    spec = compile_check.Spec("bwd_fused", "fp32", 32, 8, "shift+bias")
    for registers, failed in ((128, False), (129, True)):
        monkeypatch.setattr(compile_check, "resource_usage", lambda usage, sass, r=registers: (r, 0))
        result = compile_check.compile_spec(spec, 90)
        assert result.tiles == "64,64,16" and bool(result.error) == failed, (registers, result)


def test_launchable_specs_cover_what_the_host_launches():
    """The spill gate's specialisations: for every head dim, dtype, published window and geometry (every flag
    combination the host can launch), the forward, and the backward kernels where the fused backward serves."""
    import torch

    from swinv2_fast.kernels.tiles import channel_block, fused_backward_supported
    from tools import launches
    from tools.compile_check import launchable_specs
    from tools.launches import GATE_HEAD_DIMS, GEOMETRIES, KERNELS, WINDOW_SIZES

    # the gate's head dims: every channel tile, whole and masked (below 16, and between powers of two)
    assert {channel_block(h) for h in GATE_HEAD_DIMS} == {16, 32, 64, 128}
    assert any(h < 16 for h in GATE_HEAD_DIMS) and any(channel_block(h) != h for h in GATE_HEAD_DIMS if h > 16)
    specs = set(launchable_specs())
    for head_dim in GATE_HEAD_DIMS:
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            backward = fused_backward_supported(head_dim, dtype)
            for window in WINDOW_SIZES:
                for geometry in GEOMETRIES:
                    for kernel in KERNELS:
                        padded = GEOMETRIES[geometry][0]
                        launched = kernel == "fwd" or (
                            backward and launches.launched(kernel, window, head_dim, name, padded)
                        )
                        assert ((kernel, name, head_dim, window, geometry) in specs) == launched
    # the published models' head dims (Swin V2's 32, Swin2SR's 30 and 10): fused backward in every dtype
    for head_dim in (32, 30, 10):
        assert all(fused_backward_supported(head_dim, d) for d in (torch.float32, torch.float16, torch.bfloat16))


def test_candidates_gate_compiles_each_candidate_where_the_sweep_tries_it(monkeypatch):
    """compile_check --candidates: every candidate at every sweep shape (bwd only where the fused kernel does not),
    each launch recorded with the candidate's tiles and num_stages; a register-capped candidate only on the
    archs where register_cap caps at its budget. Compiling is replaced by a stand-in (nothing compiled)."""
    import torch

    from swinv2_fast.kernels.tiles import TILE_OVERRIDES, block_config, fused_backward_applies, register_cap
    from tools import compile_check, sweep

    work = compile_check.candidate_work()
    for shape in sweep.SHAPES:
        n = shape.window**2
        for direction, configs in sweep.CANDIDATES.items():
            expected = direction == "fwd" or not fused_backward_applies(n, shape.head_dim, torch.bfloat16)
            assert all(((direction, c, shape) in work) == expected for c in configs), (shape.name, direction)
    compiled = []

    def fake_compile(launch, arch):
        compiled.append((launch.kernel, arch, launch.kwargs["num_stages"], launch.kwargs["BLOCK_M"]))
        return None, "REG:100", ""

    monkeypatch.setattr(compile_check, "compile_launch", fake_compile)
    monkeypatch.setattr(compile_check, "resource_usage", lambda usage, sass: (100, 0))
    by_n = {s.window**2: s for s in sweep.SHAPES}
    # N = 256: the rows kernel keeps its own tiles, a candidate sets the dk/dv kernel's (two launches on the
    # shifted grid: the windows off its border, then the border); N = 576: the four kernels'
    rows = compile_check.compile_candidate("bwd", (32, 32, 4, 255, 2), by_n[256])
    assert sorted(k for k, a, _, _ in compiled) == ["bwd_dkdv"] * 2 * len(compile_check.ARCHS)
    assert {(s, m) for _, _, s, m in compiled} == {(2, 32)} and len(rows) == len(compiled)
    compiled.clear()
    rows = compile_check.compile_candidate("bwd", (32, 32, 4, 255, 2), by_n[576])
    assert sorted({(k, a) for k, a, _, _ in compiled}) == sorted(
        (k, a) for k in ("bwd_dbias", "bwd_dkdv", "bwd_dq", "bwd_stats") for a in compile_check.ARCHS
    )
    assert {(s, m) for _, _, s, m in compiled} == {(2, 32)} and len(rows) == len(compiled)
    for n in (144, 256):
        compiled.clear()
        rows = compile_check.compile_candidate("fwd", (128, 64, 8, 128, 1), by_n[n])
        archs = [
            a
            for a in compile_check.ARCHS
            if register_cap(n, 32, torch.bfloat16, False, a) == 128
            and block_config(n, 32, torch.bfloat16, False, a) == (128, 64, 8)
        ]
        assert sorted({a for _, a, _, _ in compiled}) == archs and all(s == 1 for _, _, s, _ in compiled)
        assert 80 not in archs and (n == 256 or not archs)
    assert TILE_OVERRIDES == {}
