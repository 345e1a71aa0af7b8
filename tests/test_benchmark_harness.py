"""The benchmark harness cannot rot: one tiny case of every CPU provider, the transformers chain against the
reference, the presets' plans, compiled-case fallbacks reported as failures, run ids, the CSV and the chart."""

import os

import pytest
import torch

from benchmarks import cases, cpu_attention, cpu_linear, harness, main, plot
from swinv2_fast import linear as L

CPU = torch.device("cpu")
TINY_OP = cases.OpShape("test-w4", (6, 7), 32, 2, 4)
TINY_MODEL = cases.ModelSpec("tiny", 32, 4)
TINY_LAYOUT = dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2])


@pytest.fixture(autouse=True)
def _real_execution(monkeypatch):
    # the suite sets TRITON_INTERPRET=1 for the kernel tests; the CPU providers timed here never use Triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize(
    "vendor,family,model,expected",
    [
        ("AuthenticAMD", 25, 17, "AMD EPYC 9B14 (AuthenticAMD family 25 model 17, Zen 4)"),
        ("AuthenticAMD", 25, 1, "AMD EPYC 9B14 (AuthenticAMD family 25 model 1, Zen 3)"),
        ("AuthenticAMD", 26, 2, "AMD EPYC 9B14 (AuthenticAMD family 26 model 2, Zen 5)"),
        ("GenuineIntel", 6, 143, "AMD EPYC 9B14 (GenuineIntel family 6 model 143)"),
    ],
)
def test_the_device_column_names_the_cpu(vendor, family, model, expected):
    """The CPU rows' device column carries what the oneDNN route's gain depends on: vendor, family and model
    (the first processor's block of /proc/cpuinfo) and AMD's microarchitecture."""
    block = (
        f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        "model name\t: AMD EPYC 9B14\n"
    )
    other = "processor\t: 1\nvendor_id\t: Other\ncpu family\t: 1\nmodel\t\t: 1\nmodel name\t: other\n"
    assert harness.cpu_identity(block + "\n" + other) == expected
    assert harness.device_name(CPU).startswith("CPU ") and harness.device_name(CPU).endswith(
        f", {torch.get_num_threads()} threads"
    )


def test_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="interpreter"):
        harness.time_call(lambda: None, CPU)


@pytest.mark.parametrize("mode", cases.OP_MODES)
# the compiled chain takes 20 s and more to compile on 2 cores: in the slow part
@pytest.mark.parametrize(
    "provider",
    [pytest.param(p, marks=pytest.mark.slow) if p == "compile" else p for p in cases.providers_for(CPU, "op")],
)
def test_every_cpu_op_provider_runs_and_agrees(provider, mode):
    fn = cases.op_case(provider, TINY_OP, 1, torch.float32, mode, CPU)
    expected = cases.op_case("sdpa", TINY_OP, 1, torch.float32, mode, CPU)()
    timing = harness.time_call(fn, CPU, rounds=2, warmup=1)
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    torch.testing.assert_close(fn().detach(), expected.detach(), atol=1e-5, rtol=0)  # same math, fp32


@pytest.mark.parametrize(
    "shape",
    [
        cases.OpShape("pad-w4", (6, 7), 32, 2, 4),
        cases.OpShape("w4", (8, 8), 32, 2, 4),
        cases.OpShape("pad-w3", (7, 5), 16, 1, 3),
    ],
    ids=lambda s: s.name,
)
def test_transformers_chain_is_transformers_and_the_reference(shape):
    """The op baseline is the chain transformers runs: on a Swinv2Layer's own attention (same q/k/v weights,
    CPB MLP) it gives the layer's attention output, and it equals the package's reference (mask -200, pad
    then roll), forward and every gradient, in fp64."""
    import transformers

    inputs = cases.op_inputs(shape, 2, torch.float64, CPU, True)
    qkv, _, logit_scale, table = inputs
    chain = cases.op_function("transformers-chain", shape, inputs)
    sdpa = cases.op_function("sdpa", shape, inputs)
    out = chain(qkv)
    torch.testing.assert_close(out, sdpa(qkv), atol=1e-10, rtol=0)
    leaves = [qkv, logit_scale, table]
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(sdpa(qkv).sum(), leaves)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # against transformers' own layer: hidden states x, q/k/v from its Linear layers, bias from its MLP
    config = transformers.Swinv2Config(
        window_size=shape.window, embed_dim=shape.channels, depths=[1], num_heads=[shape.heads]
    )
    layer = transformers.models.swinv2.modeling_swinv2.Swinv2Layer(
        config, dim=shape.channels, input_resolution=shape.grid, num_heads=shape.heads, shift_size=shape.shift
    ).double()
    attn = layer.attention.self
    x = torch.randn(2, shape.grid[0] * shape.grid[1], shape.channels, dtype=torch.float64)
    projected = torch.cat([attn.query(x), attn.key(x), attn.value(x)], dim=-1).detach()
    bias = torch.cat([attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias]).detach()
    mlp_table = attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, shape.heads).detach()
    own = cases.op_function(
        "transformers-chain",
        shape,
        (projected, bias, torch.nn.Parameter(attn.logit_scale.detach().clone()), torch.nn.Parameter(mlp_table)),
    )
    with torch.no_grad():
        expected = _transformers_layer_attention(layer, x, shape)
        torch.testing.assert_close(own(projected), expected, atol=1e-10, rtol=0)


def _transformers_layer_attention(layer, x, shape):
    """Swinv2Layer.forward up to the attention output (before its output projection and norm): the layer's
    forward with attention.output replaced by the identity and layernorm_before by a hook capturing its input."""
    captured = {}
    handle = layer.layernorm_before.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    saved = layer.attention.output
    layer.attention.output = _Identity()
    try:
        layer(x, shape.grid)
    finally:
        layer.attention.output = saved
        handle.remove()
    return captured["x"]


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, input_tensor=None):
        return hidden_states


def test_triton_provider_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        cases.op_case("triton", TINY_OP, 1, torch.float32, "forward", CPU)


# torch.compile of whole models takes about a minute per mode on 2 cores: CI compiles the inference mode only
@pytest.mark.parametrize(
    "mode,compiled",
    [("inference", False), ("train step", False), pytest.param("inference", True, marks=pytest.mark.slow)],
    ids=["inference", "train-step", "inference-compiled"],
)
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


@pytest.mark.skipif(not L.onednn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_cpu_linear_comparison_runs_under_autocast(capsys):
    assert cpu_linear.main(["--batch", "1", "--rounds", "1", "--autocast"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "bf16 autocast" in lines[0] and len(lines) == 2 + 16 + 1


def test_cpu_attention_comparison_runs(capsys):
    """One row per stage, dtype and mode, naming the chain `sdpa_serves` picks."""
    assert cpu_attention.main(["--batch", "1", "--rounds", "1", "--dtypes", "float32", "bfloat16"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 4 * 2 * 2 and all(" x" in row for row in rows)
    picks = {(row.split()[1], row.split()[2]): row.split()[-1] for row in rows}
    assert picks[("bfloat16", "training")] == "explicit" and picks[("bfloat16", "inference")] == "SDPA"
    assert picks[("float32", "training")] == picks[("float32", "inference")] == "SDPA"


def test_rows_csv_and_chart(tmp_path):
    timing = harness.Timing(2.0, 1.5, 2.5, 3.0)
    rows = [
        harness.make_row(
            CPU, "model", "SwinV2-T 32 w4", p, "inference", torch.float32, 2, timing, 1000.0, "img/s", run_id="run-a"
        )
        for p in ("swinv2_fast", "transformers")
    ]
    path = str(tmp_path / "results.csv")
    harness.append_rows(rows, path)
    harness.append_rows(rows[:1], path)
    read = harness.read_rows(path)
    assert [r["provider"] for r in read] == ["swinv2_fast", "transformers", "swinv2_fast"]
    assert set(read[0]) == set(harness.COLUMNS) and float(read[0]["median_ms"]) == 2.0
    assert read[0]["run_id"] == "run-a" and read[0]["note"] == "noisy"  # p80/p20 = 2.5/1.5
    charts = plot.plot(path)
    assert len(charts) == 1 and os.path.getsize(charts[0]) > 0
    table = "".join(main.ratio_table(rows)).replace(" ", "")
    assert "x1.00vstransformers" in table and "NOISYRUN" in table


def test_chart_draws_one_run(tmp_path):
    """Two runs in one CSV: the chart draws the latest (or the one asked for), never a mix."""
    path = str(tmp_path / "results.csv")
    for run, ms in (("run-old", 4.0), ("run-new", 2.0)):
        harness.append_rows(
            [
                harness.make_row(
                    CPU,
                    "model",
                    "M",
                    p,
                    "inference",
                    torch.float32,
                    2,
                    harness.Timing(ms, ms, ms, 1.0),
                    2 / ms,
                    "img/s",
                    run_id=run,
                )
                for p in ("swinv2_fast", "transformers")
            ],
            path,
        )
    rows = harness.read_rows(path)
    assert {r["run_id"] for r in plot.run_of(rows)} == {"run-new"}
    assert {r["run_id"] for r in plot.run_of(rows, "run-old")} == {"run-old"}


def test_chart_labels_ratios_and_whiskers():
    """Each bar is labelled with its ratio to the group's baseline; the whiskers span the throughput at the
    p80 and p20 call times; swinv2_fast's rows are told apart from the peers'."""
    providers = {
        "transformers": {"median_ms": "4.0", "p20_ms": "3.0", "p80_ms": "5.0", "throughput": "2.0"},
        "swinv2_fast": {"median_ms": "2.0", "p20_ms": "2.0", "p80_ms": "2.5", "throughput": "4.0"},
    }
    assert plot.bar_labels("model", providers) == {"transformers": "x1.00", "swinv2_fast": "x2.00"}
    assert plot.bar_labels("op", providers) == {}  # no transformers-chain row: nothing to compare with
    below, above = plot.whiskers(providers["transformers"])
    assert (below, above) == pytest.approx((2.0 - 2.0 * 4 / 5, 2.0 * 4 / 3 - 2.0))
    assert plot.whiskers(providers["swinv2_fast"]) == pytest.approx((4.0 - 4.0 * 2 / 2.5, 0.0))
    assert [p for p in ("swinv2_fast+compile", "triton", "sdpa", "timm", "transformers-chain") if plot.is_ours(p)] == [
        "swinv2_fast+compile",
        "triton",
        "sdpa",
    ]


def test_old_csv_gets_the_new_columns(tmp_path):
    """A CSV written before run_id/note existed is rewritten once with the current header."""
    path = tmp_path / "results.csv"
    old_columns = [c for c in harness.COLUMNS if c not in ("run_id", "note")]
    path.write_text(
        ",".join(old_columns)
        + "\n"
        + ",".join("1" if c in ("batch",) else "abc1234" if c == "git_sha" else "0" for c in old_columns)
        + "\n"
    )
    row = harness.make_row(
        CPU, "op", "c", "sdpa", "forward", torch.float32, 1, harness.Timing(1, 1, 1, 0), 1.0, "GB/s", run_id="run-x"
    )
    harness.append_rows([row], str(path))
    read = harness.read_rows(str(path))
    assert [r["run_id"] for r in read] == ["legacy-abc1234", "run-x"]


def test_main_rejects_bad_options():
    with pytest.raises(SystemExit):
        main.parse_args(["--op-shapes", "no-such-shape"])
    with pytest.raises(SystemExit):
        main.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        main.parse_args(["--budget", "0"])


def test_results_go_to_the_untracked_folder_unless_asked():
    assert main.parse_args([]).csv.startswith(main.LOCAL_RESULTS_DIR)
    assert main.parse_args(["--commit-results"]).csv == harness.RESULTS_CSV
    assert main.parse_args(["--out-dir", "/tmp/x"]).csv == os.path.join("/tmp/x", "results.csv")


def test_gpu_preset_plan(capsys):
    """The GPU preset: the fused op against the transformers chain first, compiled cases last, at most 7
    builds, every provider and shape the plan promises; --dry-run prints it with an estimate that fits the
    budget scripts/gpu.sh gives it (270 s less its 30 s margin)."""
    args = main.parse_args(["--preset", "gpu", "--dry-run"])
    items = main.sweep_plan(args)
    assert [i["provider"] for i in items[:2]] == ["transformers-chain", "triton"]
    compiled = [n for n, i in enumerate(items) if i["compiled"]]
    assert len(compiled) <= 7 and compiled == list(range(len(items) - len(compiled), len(items)))
    ops = {(i["shape"], i["provider"], i["mode"], str(i["dtype"])) for i in items if i["level"] == "op"}
    for provider in ("transformers-chain", "sdpa", "triton"):
        for mode in cases.OP_MODES:
            assert {(shape, provider, mode, "torch.float32") for shape in main.GPU_OP_SHAPES} <= ops
            assert {(shape, provider, mode, "torch.bfloat16") for shape in main.GPU_BF16_OP_SHAPES} <= ops
    # the op cases of the cost model's per-model summary (tools/compile_check --models)
    from tools import cost

    assert set(cost.SUMMARY_OP_CASES.values()) <= set(main.GPU_BF16_OP_SHAPES)
    assert {(i["shape"], i["mode"]) for i in items if i["provider"] == "compile"} == {
        ("tiny-w8-256", "forward"),
        ("tiny-w8-256", "forward+backward"),
        ("base-w16-256", "forward+backward"),
    }
    assert all(str(i["dtype"]) == "torch.bfloat16" for i in items if i["compiled"])
    models = {(i["variant"], i["mode"], i["provider"], i["compiled"]) for i in items if i["level"] == "model"}
    assert {("tiny", "train step", p, False) for p in ("swinv2_fast", "transformers", "timm")} <= models
    assert {("tiny", "inference", p, True) for p in ("swinv2_fast", "transformers")} <= models
    assert sum(main.estimate_seconds(args, items)) <= 240
    assert main.main(["--preset", "gpu", "--dry-run", "--budget", "240"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"plan: {len(items)} cases, {len(compiled)} torch.compile builds, estimated ")
    assert "would be cut" not in out


def test_smoke_preset_is_the_gpu_plan_on_cpu():
    args = main.parse_args(["--preset", "smoke"])
    items = main.sweep_plan(args)
    assert args.device.type == "cpu" and all(i["provider"] != "triton" for i in items)
    assert sum(i["compiled"] for i in items) == main.MAX_COMPILE["smoke"]
    gpu_items = [
        i for i in main.sweep_plan(main.parse_args(["--preset", "gpu", "--dry-run"])) if i["provider"] != "triton"
    ]
    assert [describe_key(i) for i in items] == [describe_key(i) for i in gpu_items if not i["compiled"]] + [
        describe_key(i) for i in gpu_items if i["compiled"]
    ][: main.MAX_COMPILE["smoke"]]


def describe_key(item):
    return (
        item["level"],
        item.get("shape") or item.get("variant"),
        item["mode"],
        item["provider"],
        str(item["dtype"]),
        item["compiled"],
    )


def test_budget_cuts_the_least_important_cases(tmp_path):
    args = main.parse_args(["--preset", "smoke", "--csv", str(tmp_path / "r.csv"), "--budget", "0.001"])
    items = main.sweep_plan(args)
    rows, cut = main.run_sweep(args, items, "run-cut", progress=False)
    assert rows == [] and cut == items


def test_a_compiled_case_that_falls_back_is_reported_failed(tmp_path, monkeypatch):
    """A graph break inside a compiled op case: the row says failed and has no timing."""
    args = main.parse_args(["--preset", "smoke", "--csv", str(tmp_path / "r.csv")])
    item = next(i for i in main.sweep_plan(args) if i["level"] == "op" and i["compiled"])
    original = cases.TransformersChain.forward

    def breaking(self, qkv):
        torch._dynamo.graph_break()
        return original(self, qkv)

    monkeypatch.setattr(cases.TransformersChain, "forward", breaking)
    row = main.run_case(args, item, {}, "run-f")
    assert row.note.startswith("failed: CompileFellBack: graph break") and row.median_ms != row.median_ms


def test_verdict_compares_the_best_rows():
    """The closing line: swinv2_fast's best row against each library's best row (eager or compiled) and the
    best of both."""
    timing = {"swinv2_fast": 2.0, "swinv2_fast+compile": 1.0, "transformers": 4.0, "timm": 3.5, "timm+compile": 1.5}
    rows = [
        harness.make_row(
            CPU, "model", "M", p, "inference", torch.float32, 8, harness.Timing(ms, ms, ms, 1.0), 8 / ms, "img/s", "r"
        )
        for p, ms in timing.items()
    ]
    (line,) = main.verdict_lines(rows)
    assert line == (
        "M, inference, float32, batch 8: swinv2_fast (swinv2_fast+compile) x4.00 vs transformers (transformers), "
        "x1.50 vs timm (timm+compile), x1.50 vs the best of them (timm+compile)"
    )


def test_cpu_bf16_support_reads_the_flags():
    assert harness.cpu_bf16_support("flags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n") == "AMX"
    assert harness.cpu_bf16_support("flags\t\t: fpu avx512f avx512_bf16\n") == "AVX-512 BF16"
    assert harness.cpu_bf16_support("flags\t\t: fpu sse avx2\n") == ""


@pytest.mark.parametrize("bf16", ["AMX", ""])
def test_cpu_plans_by_length(monkeypatch, bf16):
    """--quick: inference, eager, no op rows; the default: bf16 autocast rows where the CPU has native bf16,
    compiled float32 inference only; --full: compiled op chains and training steps too."""
    monkeypatch.setattr(harness, "cpu_bf16_support", lambda: bf16)

    def plan(*flags):
        return main.sweep_plan(main.parse_args(["--device", "cpu", *flags]))

    quick, default, full = plan("--quick"), plan(), plan("--full")
    assert quick and all(i["level"] == "model" and i["mode"] == "inference" and not i["compiled"] for i in quick)
    autocast = [i for i in default if isinstance(i["dtype"], cases.Autocast)]
    assert bool(autocast) == bool(bf16) and not any(i["compiled"] for i in autocast)
    assert {i["provider"] for i in default if i["compiled"]} == {"swinv2_fast", "transformers", "timm"}
    assert not any(i["level"] == "op" and i["compiled"] for i in default)
    assert any(i["level"] == "op" and i["compiled"] for i in full)
    assert any(i["mode"] == "train step" and i["compiled"] for i in full)


def test_messages_print_above_the_bar(capsys):
    """What goes to stderr while the bar is drawn (Python's warnings and torch's log records write there) is
    written above the bar, whole lines at a time, on the bar's stream."""
    import logging
    import sys

    from tqdm import tqdm

    logger = logging.getLogger("swinv2_fast.test_above_the_bar")
    handler = logging.StreamHandler()  # as torch's handlers: a stream handler that writes to sys.stderr
    logger.addHandler(handler)
    try:
        with tqdm(total=2, file=sys.stdout) as bar, main.warnings_above(bar):
            handler.setStream(sys.stderr)
            logger.warning("a log record")
            sys.stderr.write("half a line")
    finally:
        logger.removeHandler(handler)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "\ra log record\n" in captured.out  # the bar's line cleared first (\r), then the record
    assert "half a line" in captured.out  # flushed when the bar closes
