"""The benchmark harness cannot rot: one tiny case of every CPU provider, the CSV and the chart."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import cases, cpu_linear, harness, main, plot  # noqa: E402
from swinv2_fast import linear as L  # noqa: E402

CPU = torch.device("cpu")
TINY_OP = cases.OpShape("test-w4", (6, 7), 32, 2, 4)
TINY_MODEL = cases.ModelSpec("tiny", 32, 4)
TINY_LAYOUT = dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2])


@pytest.fixture(autouse=True)
def _real_execution(monkeypatch):
    # the suite sets TRITON_INTERPRET=1 for the kernel tests; the CPU providers timed here never use Triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="interpreter"):
        harness.time_call(lambda: None, CPU)


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", cases.providers_for(CPU, "op"))
def test_every_cpu_op_provider_runs_and_agrees(provider, mode):
    fn = cases.op_case(provider, TINY_OP, 1, torch.float32, mode, CPU)
    expected = cases.op_case("eager", TINY_OP, 1, torch.float32, mode, CPU)()
    timing = harness.time_call(fn, CPU, rounds=2, warmup=1)
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    torch.testing.assert_close(fn().detach(), expected.detach(), atol=1e-5, rtol=0)  # same math, fp32


def test_triton_provider_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        cases.op_case("triton", TINY_OP, 1, torch.float32, "forward", CPU)


# torch.compile of whole models takes about a minute per mode on 2 cores: CI compiles the inference mode only
@pytest.mark.parametrize("mode,compiled", [("inference", False), ("train step", False), ("inference", True)],
                         ids=["inference", "train-step", "inference-compiled"])
def test_every_cpu_model_provider_runs(mode, compiled):
    models = cases.build_models(TINY_MODEL, layout=TINY_LAYOUT)
    for provider in cases.providers_for(CPU, "model", mode):
        fn = cases.model_case(provider, models, 2, TINY_MODEL.image_size, torch.float32, mode, CPU, compiled)
        timing = harness.time_call(fn, CPU, rounds=1, warmup=1)
        assert timing.median_ms > 0


@pytest.mark.skipif(not L.onednn_linear_available(), reason="this PyTorch has no oneDNN linear op")
def test_cpu_linear_comparison_runs(capsys):
    assert cpu_linear.main(["--batch", "1", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 16 + 1 and all(" x" in line for line in lines[2:])


def test_rows_csv_and_chart(tmp_path):
    timing = harness.Timing(2.0, 1.5, 2.5, 3.0)
    rows = [harness.make_row(CPU, "model", "SwinV2-T 32 w4", p, "inference", torch.float32, 2, timing, 1000.0,
                             "img/s") for p in ("swinv2_fast", "transformers")]
    path = str(tmp_path / "results.csv")
    harness.append_rows(rows, path)
    harness.append_rows(rows[:1], path)
    read = harness.read_rows(path)
    assert [r["provider"] for r in read] == ["swinv2_fast", "transformers", "swinv2_fast"]
    assert set(read[0]) == set(harness.COLUMNS) and float(read[0]["median_ms"]) == 2.0
    charts = plot.plot(path)
    assert len(charts) == 1 and os.path.getsize(charts[0]) > 0
    assert "x 1.00 vs transformers".replace(" ", "") in "".join(main.ratio_table(rows)).replace(" ", "")


def test_main_rejects_bad_options():
    with pytest.raises(SystemExit):
        main.parse_args(["--op-shapes", "no-such-shape"])
    with pytest.raises(SystemExit):
        main.parse_args(["--rounds", "0"])
