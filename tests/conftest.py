"""pytest's hooks and fixtures for the suite: honest skips, launch proof, the slow marks, a seeded RNG.
The helpers the tests use live in tests/_utils.py (import them from there).

Markers (pytest.ini) and what this file does with them:
- `kernels`: the test runs the fused Triton kernels. It needs Triton and a place to run them (a CUDA device,
  or CPU under TRITON_INTERPRET=1): without them it skips, and with CI=true it FAILS instead (a CI run that
  cannot run the kernels must not pass as "N skipped"). Launch proof: the test fails unless a forward kernel
  launched while it ran (`kernels(backward=True)`: a backward kernel too; `kernels(forward=False)`: it needs
  the kernel runtime but launches nothing by design, e.g. an empty batch or a refusal).
- `interpreter`: meaningful only under Triton's interpreter on CPU tensors; skips where a GPU runs the
  kernels, and is handled like `kernels` where neither runs.
- `gpu`: needs a CUDA device running the compiled kernels; skips elsewhere (also in CI, which has no GPU).
- `slow`: long-running; `pytest -m "not slow"` deselects it (scripts/test.sh runs the quick part, then the
  slow part). Marked in the test files, and for the tests listed in SLOW_TESTS below by
  pytest_collection_modifyitems.
Every test, marked or not: if `window_attention` took the fused path on real, non-empty tensors while the test
ran, a forward kernel must have launched (a fused path that silently computes something else fails).
"""

import fnmatch

import pytest
import torch

# imported first: settles TRITON_INTERPRET before any test module imports the kernels (see tests/_utils.py)
from _utils import (
    INTERPRETER,
    KERNEL_DEVICE,
    backward_launches,
    count_fused_calls,
    count_launches,
    forward_launches,
    kernels_unavailable,
    skip_or_fail,
    tk,
)

# Tests marked slow here rather than in their files, as node-id patterns (fnmatch) relative to tests/, with
# the reason. Chosen from per-test durations under the interpreter on 2 CPU cores: each takes 15 s to 70 s,
# and together with the tests marked in their files they are about half the suite's time. The quick run
# (-m "not slow") keeps the smaller cases of each family.
SLOW_TESTS = (
    # training steps of patched transformers/timm models through the fused backward (the eager ones stay)
    "test_patch.py::test_training_step_gradients_match[[]*triton*",
    "test_patch_families.py::test_training_step_gradients_match[[]*triton*",
    # the fused backward at windows of 12 and more, and head dims 64/128 (windows 4-8 at head dims 16/32 stay)
    "test_triton_backward.py::test_fp32_gradients_match_reference[[]*-w12*",
    "test_triton_backward.py::test_fp32_gradients_match_reference[[]*-w16*",
    "test_triton_backward.py::test_fp32_gradients_match_reference[[]*-w24*",
    "test_triton_backward.py::test_fp32_gradients_match_reference[[]*-h1d64-*",
    "test_triton_backward.py::test_backward_statistics_and_delta[[]*-w24*",
    "test_triton_backward.py::test_gradients_are_deterministic",
    "test_triton_backward.py::test_gradient_checkpointing_with_the_fused_path",
    "test_triton_backward.py::test_training_step_triton_matches_eager_and_transformers*",
    "test_triton_backward.py::test_ordinary_backward_runs_the_fused_kernels[[]*reentrant*",
    # the forward at window 24 and whole models at window 12 (the other windows stay)
    "test_triton_forward.py::test_forward_matches_reference_fp32[[]*-w24*",
    "test_triton_forward.py::test_model_with_published_windows_matches_transformers[[]w12*",
    # determinism (two full forward+backward passes) and the almost-all-padding windows
    "test_robustness.py::test_forward_and_backward_are_bitwise_deterministic",
    "test_robustness.py::test_windows_that_are_almost_all_padding",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.split("tests/", 1)[-1]
        if any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item):
    reason = kernels_unavailable()
    if item.get_closest_marker("kernels") is not None and reason:
        skip_or_fail(reason)
    if item.get_closest_marker("interpreter") is not None:
        if reason:
            skip_or_fail(reason)
        if not INTERPRETER:
            pytest.skip(
                "meaningful only under Triton's interpreter on CPU tensors; here the kernels run compiled on CUDA"
            )
    if item.get_closest_marker("gpu") is not None and KERNEL_DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device running the compiled kernels (TRITON_INTERPRET unset or 0)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Launch proof around every test's call phase (see the module docstring)."""
    if tk is None:
        return (yield)
    marker = item.get_closest_marker("kernels")
    with count_launches() as launches, count_fused_calls() as fused:
        result = yield
    forward, backward = forward_launches(launches), backward_launches(launches)
    if fused["calls"] and not forward:
        raise AssertionError(
            f"launch proof: window_attention took the fused path {fused['calls']} time(s) but no "
            f"forward kernel launched ({dict(launches) or 'no launches'})"
        )
    if marker is not None:
        if marker.kwargs.get("forward", True) and not forward:
            raise AssertionError(
                "launch proof: this test asks for the fused kernels but no forward kernel "
                f"launched ({dict(launches) or 'no launches'})"
            )
        if marker.kwargs.get("backward", False) and not backward:
            raise AssertionError(
                "launch proof: this test trains through the fused kernels but no backward "
                f"kernel launched ({dict(launches) or 'no launches'})"
            )
    return result


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
