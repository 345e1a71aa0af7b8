"""pytest's hooks and fixtures for the suite: honest skips, launch proof, a seeded RNG.
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
  slow part). Marked in the test files (`_utils.slow_where` marks the larger cases of a parametrized family).
Every test, marked or not: if `window_attention` took the fused path on real, non-empty tensors while the test
ran, a forward kernel must have launched (a fused path that silently computes something else fails).
"""

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
