"""The benchmark cases as a pytest-benchmark suite (statistics, comparisons and histograms from the plugin).

    pytest benchmarks/test_benchmarks.py --benchmark-only                       # CPU providers, tiny shapes
    pytest benchmarks/test_benchmarks.py --benchmark-only --benchmark-save=run  # keep for --benchmark-compare
    SWINV2_BENCH_DEVICE=cuda pytest benchmarks/test_benchmarks.py --benchmark-only

On CUDA each call is synchronised so the plugin's wall-clock timer measures the kernels. The main job
(python -m benchmarks.main) runs the same cases, writes the CSV and draws the charts.
"""

import os

import pytest
import torch

from benchmarks import cases, harness

DEVICE = torch.device(os.environ.get("SWINV2_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
OP_SHAPE = os.environ.get("SWINV2_BENCH_OP_SHAPE", "tiny-w8-256")


def _synchronised(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return run


@pytest.fixture(autouse=True)
def _no_interpreter():
    harness.refuse_interpreter()


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", cases.providers_for(DEVICE, "op"))
def test_op(benchmark, provider, mode):
    shape = cases.OP_SHAPES[OP_SHAPE]
    fn = _synchronised(cases.op_case(provider, shape, 2, torch.float32, mode, DEVICE))
    fn()  # compiles where the provider compiles
    benchmark.extra_info.update(shape=shape.name, bytes=cases.op_bytes(shape, 2, torch.float32, mode))
    benchmark(fn)


@pytest.fixture(scope="module")
def tiny_models():
    return cases.build_models(cases.MODEL_SPECS["tiny"])


@pytest.mark.parametrize("mode", cases.MODEL_MODES)
@pytest.mark.parametrize("provider", cases.providers_for(DEVICE, "model"))
def test_model(benchmark, tiny_models, provider, mode):
    if provider not in cases.providers_for(DEVICE, "model", mode):
        pytest.skip(f"{provider} has no {mode} row on {DEVICE.type}")
    batch = 8 if mode == "inference" else 2
    fn = _synchronised(cases.model_case(provider, tiny_models, batch, 256, torch.float32, mode, DEVICE, False))
    fn()
    benchmark.extra_info.update(model="SwinV2-T 256 w8", batch=batch)
    benchmark(fn)
