"""The GPU tile sweep's table, its record format and its selection logic, on CPU: a stand-in timer and spill
reader (nothing is compiled or run), and launches recorded on meta tensors (launches.recording_launches)."""

import json

import pytest
import torch

pytest.importorskip("triton")

from swinv2_fast.kernels import tiles
from swinv2_fast.kernels.tiles import fused_backward_applies

from _utils import use_tools

use_tools()
from tools import launches, sweep  # noqa: E402


def test_candidates_are_five_values_and_hold_the_default_launches():
    """(BLOCK_M, BLOCK_N, num_warps, maxnreg, num_stages) each; at every sweep shape the default launch (the tables'
    tiles, register_cap's sm_90 budget, launch_stages's num_stages or Triton's default 3) is a candidate, so a
    pick is never slower than it; num_stages variants are in the table."""
    for direction, configs in sweep.CANDIDATES.items():
        assert configs and len(set(configs)) == len(configs), direction
        for config in configs:
            assert tiles.tuned_entry(config, direction) == tuple(config)
        assert {c[4] for c in configs} >= {1, 2, 3} if direction == "fwd" else {2, 3} <= {c[4] for c in configs}
    for shape in sweep.SHAPES:
        n = shape.window**2
        for direction in ("fwd", "bwd"):
            backward = direction == "bwd"
            if backward and fused_backward_applies(n, shape.head_dim, torch.bfloat16):
                continue
            stages = tiles.launch_stages(n, shape.head_dim, torch.bfloat16, backward, 90)
            default = tiles.block_config(n, shape.head_dim, torch.bfloat16, backward) + (
                tiles.register_cap(n, shape.head_dim, torch.bfloat16, backward, 90),
                3 if stages is None else stages,  # none passed: Triton's default
            )
            assert default in sweep.CANDIDATES[direction], (shape.name, direction, default)


def _launch_options(window, backward, head_dim=32, dtype="bf16"):
    found = launches.reference_launches(window, dtype, head_dim, backward=backward)
    return {kernel: [launch.kwargs for launch in launches] for kernel, launches in found.items()}


def test_num_stages_reaches_the_launch_from_a_record_or_the_tables():
    key_fwd = sweep.entry_key("bf16", 32, 256, "fwd")
    key_bwd = sweep.entry_key("bf16", 32, 256, "bwd")
    # nothing recorded: the default launch options (the forward passes no num_stages: Triton's default; the
    # 16-bit backward at head_dim 32 its table's, launch_stages)
    for kernel, options in _launch_options(16, True).items():
        for kwargs in options:
            if kernel == "fwd":
                assert "num_stages" not in kwargs, kernel
            else:
                assert kwargs["num_stages"] == tiles.launch_stages(256, 32, torch.bfloat16, True) == 1, kernel
    try:
        tiles.TILE_OVERRIDES[key_fwd] = (64, 64, 4, 255, 2)
        tiles.TILE_OVERRIDES[key_bwd] = (32, 32, 4, 255, 1)
        found = _launch_options(16, True)
        # the record's backward tiles are the dk/dv kernel's; the rows kernel keeps its own (tiles.rows_tiles)
        assert sorted(found) == ["bwd_dkdv", "bwd_rows", "fwd"]
        for kernel, options in found.items():
            for kwargs in options:
                expected = {
                    "fwd": (64, 64, 4, 255, 2),
                    "bwd_rows": (*tiles.rows_tiles(256, 32, False)[:3], 255, 1),
                }.get(kernel, (32, 32, 4, 255, 1))
                assert tuple(kwargs[f] for f in tiles.TUNED_FIELDS) == expected, kernel
    finally:
        tiles.TILE_OVERRIDES.clear()
    # the fused backward (N = 64) keeps its own num_stages=1, tiles and warps, and the forward at another N
    # is untouched by a record at N = 256
    tiles.TILE_OVERRIDES[key_fwd] = (64, 64, 4, 255, 2)
    try:
        found = _launch_options(8, True)
        assert "num_stages" not in found["fwd"][0]
        assert found["bwd_fused"][0]["num_stages"] == 1
    finally:
        tiles.TILE_OVERRIDES.clear()


def test_malformed_record_raises_naming_file_key_and_values(tmp_path):
    path = tmp_path / "tuned_tiles.json"
    good = {"bf16/hd32/N256/fwd": [128, 64, 8, 128, 2]}
    path.write_text(json.dumps({"device": "x", "triton": "3.6.0", "entries": good}))
    assert tiles.load_tuned_tiles(str(path)) == {"bf16/hd32/N256/fwd": (128, 64, 8, 128, 2)}
    path.write_text(json.dumps({"entries": {"bf16/hd32/N256/fwd": [128, 64, 8, 128]}}))
    with pytest.raises(ValueError) as info:
        tiles.load_tuned_tiles(str(path))
    message = str(info.value)
    assert str(path) in message and "bf16/hd32/N256/fwd" in message and "num_stages" in message
    assert "[128, 64, 8, 128]" in message
    path.write_text(json.dumps({"bf16/hd32/N256/fwd": [128, 64, 8, 128, 2]}))  # no "entries"
    with pytest.raises(ValueError, match="entries"):
        tiles.load_tuned_tiles(str(path))
    tiles.TILE_OVERRIDES["bf16/hd32/N256/fwd"] = (128, 64, 8, 128)
    try:
        with pytest.raises(ValueError, match=r"TILE_OVERRIDES\['bf16/hd32/N256/fwd'\].*got \(128, 64, 8, 128\)"):
            tiles.block_config(256, 32, torch.bfloat16)
    finally:
        tiles.TILE_OVERRIDES.clear()


def test_sweep_rejects_spilling_candidates_and_skips_bwd_where_the_fused_kernel_runs(tmp_path):
    """Selection with a stand-in timer and spill reader (nothing launched): the fastest candidate that does not
    spill is recorded; a spilling candidate is never timed; at a shape where the fused backward runs no bwd
    candidate is tried and nothing is recorded, and the log says so."""
    fp32 = sweep.SweepShape("fp32-toy", 1, 8, 1, 16, 4)  # N = 16, fp32: the four backward kernels
    candidates = {
        "fwd": [(16, 16, 4, 255, 3), (32, 16, 4, 255, 3), (32, 16, 4, 255, 1)],
        "bwd": [(16, 16, 4, 255, 3), (16, 16, 4, 255, 2)],
    }
    fast = {
        (16, 16, 4, 255, 3): 3.0,
        (32, 16, 4, 255, 3): 2.0,
        (32, 16, 4, 255, 1): 1.0,  # the fastest spills
        (16, 16, 4, 255, 2): 0.5,
    }
    spilling = {(32, 16, 4, 255, 1), (16, 16, 4, 255, 2)}
    read, timed, logs = [], [], []

    def spill_reader(fn):
        ((key, config),) = tiles.TILE_OVERRIDES.items()
        read.append((key, config))
        return {"fwd" if key.endswith("fwd") else "bwd_dq": 48 if config in spilling else 0}

    def timer(fn):
        ((key, config),) = tiles.TILE_OVERRIDES.items()
        timed.append((key, config))
        return fast[config]

    entries = sweep.sweep(60.0, [fp32], "fp32", "cpu", timer, candidates, logs.append, spill_reader)
    assert entries == {"fp32/hd16/N16/fwd": [32, 16, 4, 255, 3], "fp32/hd16/N16/bwd": [16, 16, 4, 255, 3]}
    assert [c for _, c in read] == candidates["fwd"] + candidates["bwd"]
    assert not spilling & {c for _, c in timed}
    assert any("(32, 16, 4, 255, 1) rejected: spills fwd 48 B" in line for line in logs)
    assert tiles.TILE_OVERRIDES == {}

    bf16 = sweep.SweepShape("bf16-toy", 1, 8, 1, 16, 8)  # N = 64 in bf16: the fused backward kernel
    assert fused_backward_applies(64, 16, torch.bfloat16)
    read.clear(), logs.clear()
    entries = sweep.sweep(
        60.0, [bf16], "bf16", "cpu", timer, {**candidates, "fwd": candidates["fwd"][:2]}, logs.append, spill_reader
    )
    assert entries == {"bf16/hd16/N64/fwd": [32, 16, 4, 255, 3]}
    assert all(key.endswith("fwd") for key, _ in read)
    assert any("bf16/hd16/N64/bwd" in line and "fused backward" in line and "nothing" in line for line in logs)
    record = str(tmp_path / "tuned_tiles.json")
    sweep.write(entries, record, "cpu", 90)
    assert tiles.load_tuned_tiles(record) == {"bf16/hd16/N64/fwd": (32, 16, 4, 255, 3)}
    # a record applies on the architecture and Triton it was swept with only
    assert tiles.load_tuned_tiles(record, 90) == {"bf16/hd16/N64/fwd": (32, 16, 4, 255, 3)}
    assert tiles.load_tuned_tiles(record, 80) == {}
    with open(record) as fh:
        data = json.load(fh)
    data["triton"] = "0.0.0"
    with open(record, "w") as fh:
        json.dump(data, fh)
    assert tiles.load_tuned_tiles(record, 90) == {}


def test_sweep_times_the_whole_window_forward_and_records_a_pick_only_where_it_is_slower():
    """Window 12 in bf16 at head_dim 32 (whole-window forward programs on sm_90, the stand-in run's arch): the
    default is timed beside the candidates, with a record masked (an override of None); nothing is recorded for
    the forward where it is the fastest (a record would replace it), the faster candidate where it is not."""
    shape = sweep.SweepShape("w12-toy", 1, 24, 1, 32, 12)
    candidates = {"fwd": [(64, 32, 4, 255, 1), (64, 64, 4, 255, 1)], "bwd": []}
    for whole_window_us, expected in [(1.0, {}), (3.0, {"bf16/hd32/N144/fwd": [64, 64, 4, 255, 1]})]:
        timed, logs = [], []

        def timer(fn, whole_window_us=whole_window_us, timed=timed):
            ((_key, config),) = tiles.TILE_OVERRIDES.items()  # None: the defaults, a record masked
            config = config or sweep.WHOLE_WINDOW
            timed.append(config)
            return {sweep.WHOLE_WINDOW: whole_window_us, (64, 32, 4, 255, 1): 4.0}.get(config, 2.0)

        entries = sweep.sweep(60.0, [shape], "bf16", "cpu", timer, candidates, logs.append, lambda fn: {})
        assert entries == expected
        assert timed == [sweep.WHOLE_WINDOW] + candidates["fwd"]
        assert any("whole-window default; nothing recorded" in line for line in logs) == (not expected)
        assert tiles.TILE_OVERRIDES == {}


def test_sweep_shapes_n64_records_forward_only():
    """SHAPES' N = 64 row: the fused backward runs there, so the sweep records only its forward."""
    n64 = [s for s in sweep.SHAPES if s.window == 8]
    assert n64 and all(fused_backward_applies(64, s.head_dim, torch.bfloat16) for s in n64)


def test_sweep_launches_each_candidate_under_the_interpreter(tmp_path):
    """The sweep's plumbing end to end on the interpreter (tiny shape): each candidate's tiles and num_stages
    reach block_config / register_cap / the launch while it is timed, the fastest is recorded per direction,
    and nothing stays overridden. (Replaces test_kernel_cost's 4-value version.)"""
    from _utils import INTERPRETER, count_launches

    if not INTERPRETER:
        pytest.skip("the sweep proper runs on the GPU (scripts/gpu.sh)")
    seen = []

    def timer(fn):
        ((key, config),) = tiles.TILE_OVERRIDES.items()
        backward = key.endswith("bwd")
        assert tiles.block_config(16, 16, torch.float32, backward) == config[:3]
        assert tiles.register_cap(16, 16, torch.float32, backward) == config[3]
        assert tiles.launch_stages(16, 16, torch.float32, backward) == config[4]
        with count_launches() as launches:
            fn()
        assert sum(launches.values()) > 0
        seen.append(config)
        return {16: 2.0, 32: 1.0}[config[0]]  # 32-row tiles "faster"

    def no_spills(fn):  # the interpreter compiles nothing: the warm-up launch, no spill figures
        fn()
        return {}

    shape = sweep.SweepShape("toy", 1, 8, 1, 16, 4)
    candidates = {"fwd": [(16, 16, 4, 255, 3), (32, 16, 4, 255, 2)], "bwd": [(16, 16, 4, 255, 1)]}
    entries = sweep.sweep(60.0, [shape], "fp32", "cpu", timer, candidates, lambda *_: None, no_spills)
    assert entries == {"fp32/hd16/N16/fwd": [32, 16, 4, 255, 2], "fp32/hd16/N16/bwd": [16, 16, 4, 255, 1]}
    assert seen == candidates["fwd"] + candidates["bwd"]
    assert tiles.TILE_OVERRIDES == {}


def test_register_capped_candidates_are_tried_only_where_register_cap_caps():
    """A 128-register candidate spills where register_cap leaves the budget uncapped (sm_80, N = 49, 576,
    triton 3.6) and may on other tiles than those the cap was checked with: the sweep and `compile_check
    --candidates` try it only where register_cap caps at 128, on block_config's tiles."""
    capped, uncapped = (128, 64, 8, 128, 3), (128, 64, 8, 255, 3)
    bf16 = torch.bfloat16
    for n in (49, 64, 144, 256, 576):
        for arch in (80, 90):
            assert sweep.candidate_applies(uncapped, n, 32, bf16, False, arch)
            assert sweep.candidate_applies(capped, n, 32, bf16, False, arch) == (
                tiles.register_cap(n, 32, bf16, False, arch) == 128
                and tiles.block_config(n, 32, bf16, False, arch) == capped[:3]
            )
    assert not sweep.candidate_applies(capped, 144, 32, bf16, False, 90)
    assert not sweep.candidate_applies(capped, 256, 32, bf16, False, 80)
    logs, timed = [], []
    shape = sweep.SweepShape("capped-toy", 1, 12, 1, 16, 12)  # N = 144: capped on other tiles
    entries = sweep.sweep(
        60.0,
        [shape],
        "bf16",
        "cpu",
        lambda fn: timed.append(1) or 1.0,
        {"fwd": [capped, uncapped], "bwd": []},
        logs.append,
        lambda fn: {},
    )
    assert entries == {"bf16/hd16/N144/fwd": list(uncapped)} and len(timed) == 1
    assert any("(128, 64, 8, 128, 3) not tried" in line for line in logs)


def test_table_kernel_tiles_on_sm80_only_from_64x64_tiles(monkeypatch):
    """sm_80's table kernel runs (64, 64) tiles over at least 8 warps (over 4 it spills at N = 144 unshifted,
    and the dot keeps its mma instruction), and half-width key tiles where one key tile would hold a smaller
    window (N = 49: at full width it spills with Triton 3.6); sm_90's keeps the other kernels' tiles and warps
    (either would change its wgmma); smaller tiles keep theirs. The launches are recorded for sm_90
    (`launches.for_arch` gives sm_80 its tiles, warps and grid; the committed gate table,
    benchmarks/results/compile_check.txt, lists them per arch). Window 7 as Triton 3.6 launches it (from 3.8 on, the
    fused backward at head_dim 32)."""
    monkeypatch.setattr(tiles, "_triton_release", lambda: (3, 6))
    assert tiles.table_kernel_tiles(144, 64, 64, 4, 80) == (64, 64, 8)
    assert tiles.table_kernel_tiles(49, 64, 64, 4, 80) == (64, 32, 8)
    assert tiles.table_kernel_tiles(49, 64, 64, 4, 90) == (64, 64, 4)
    assert tiles.table_kernel_tiles(144, 64, 64, 4, 90) == (64, 64, 4)
    assert tiles.table_kernel_tiles(144, 32, 32, 4, 80) == (32, 32, 4)
    assert tiles.table_kernel_tiles(49, 64, 32, 8, 80) == (64, 32, 8)
    for window in (7, 24):
        found = launches.reference_launches(window, "bf16", 32)
        for kernel in ("bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias"):
            a = found[kernel][0].kwargs
            assert (a["BLOCK_M"], a["BLOCK_N"], a["num_warps"]) == (64, 64, 4), (window, kernel)
        table = found["bwd_dbias"][0]
        n = window * window
        assert table.grid[0] == launches.cdiv(n, 64) ** 2
        block_n = 32 if window == 7 else 64
        # for_arch(sm_90's launches, 80) is what the host launches on sm_80: tiles, warps, grid, groups of windows
        with monkeypatch.context() as m:
            m.setattr(launches.triton_backward, "device_arch", lambda t: 80)
            made_on_sm80 = launches.reference_launches(window, "bf16", 32)["bwd_dbias"]
        fields = ("BLOCK_M", "BLOCK_N", "num_warps", "WINDOWS_PER_GROUP", "NUM_BW")
        for recorded, made in zip(found["bwd_dbias"], made_on_sm80):
            on_sm80 = launches.for_arch(recorded, 80)
            assert on_sm80.kwargs["BLOCK_N"] == block_n and on_sm80.kwargs["num_warps"] == 8
            assert on_sm80.grid == made.grid and [on_sm80.kwargs[f] for f in fields] == [made.kwargs[f] for f in fields]
            assert on_sm80.grid[0] == launches.cdiv(n, 64) * launches.cdiv(n, block_n)
            assert launches.for_arch(on_sm80, 80).grid == on_sm80.grid  # asked again: the same
            assert launches.for_arch(recorded, 90).grid == recorded.grid
