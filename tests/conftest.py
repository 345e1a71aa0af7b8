"""Shared helpers: where the kernels run, launch proof, honest skips, tolerances, comparison with context,
deterministic weight perturbation.

Markers (pytest.ini) and what this file does with them:
- `kernels`: the test runs the fused Triton kernels. It needs Triton and a place to run them (a CUDA device,
  or CPU under TRITON_INTERPRET=1): without them it skips, and with CI=true it FAILS instead (a CI run that
  cannot run the kernels must not pass as "N skipped"). Launch proof: the test fails unless a forward kernel
  launched while it ran (`kernels(backward=True)`: a backward kernel too; `kernels(forward=False)`: it needs
  the kernel runtime but launches nothing by design, e.g. an empty batch or a refusal).
- `interpreter`: meaningful only under Triton's interpreter on CPU tensors; skips where a GPU runs the
  kernels, and is handled like `kernels` where neither runs.
- `gpu`: needs a CUDA device running the compiled kernels; skips elsewhere (also in CI, which has no GPU).
- `slow`: long-running; `pytest -m "not slow"` deselects it.
Every test, marked or not: if `window_attention` took the fused path on real, non-empty tensors while the test
ran, a forward kernel must have launched (a fused path that silently computes something else fails).
"""
import collections
import contextlib
import os
from typing import Optional

import pytest
import torch

import _triton_compat  # tests/ is on sys.path (pytest inserts the conftest's folder)

# Where the Triton kernels run. On a machine with a CUDA device: compiled, on CUDA tensors. Without one: on
# CPU tensors under Triton's interpreter. TRITON_INTERPRET is read when a kernel is decorated, i.e. when
# swinv2_fast.kernels.triton_window_attention is first imported, so it is settled here, before any test
# imports it; a caller may force either mode by exporting it (TRITON_INTERPRET=1 on a GPU machine runs the
# interpreter on CPU tensors).
if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
INTERPRETER = os.environ["TRITON_INTERPRET"] == "1"
# The device of the tensors a kernel test hands to implementation="triton".
KERNEL_DEVICE = torch.device("cpu") if INTERPRETER or not torch.cuda.is_available() else torch.device("cuda")
_triton_compat.install()
# In CI a kernel test that cannot run fails instead of skipping (see the module docstring).
CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

try:  # the kernel module (None without Triton): imported here, after TRITON_INTERPRET is settled
    from swinv2_fast.kernels import triton_window_attention as tk
    _TRITON_ERROR: Optional[str] = None
except Exception as error:  # ImportError, or a broken install raising anything at import
    tk, _TRITON_ERROR = None, f"{type(error).__name__}: {error}"


def kernels_unavailable() -> Optional[str]:
    """Why the fused kernels cannot run in this process, or None when they can."""
    if tk is None:
        return f"Triton does not import ({_TRITON_ERROR})"
    if not INTERPRETER and KERNEL_DEVICE.type != "cuda":
        return "no CUDA device and TRITON_INTERPRET is not 1 (the kernels run on CUDA or under the interpreter)"
    return None


def skip_or_fail(reason: str):
    """Skip, or in CI (CI=true) fail: a CI run must not pass a kernel test it did not run."""
    if CI:
        pytest.fail(f"CI=true: this kernel test cannot run here and would have been skipped: {reason}",
                    pytrace=False)
    pytest.skip(reason)


def require_kernels():
    """For a test body or helper that needs the kernels: skip (CI: fail) when they cannot run."""
    reason = kernels_unavailable()
    if reason:
        skip_or_fail(reason)


def pytest_runtest_setup(item):
    reason = kernels_unavailable()
    if item.get_closest_marker("kernels") is not None and reason:
        skip_or_fail(reason)
    if item.get_closest_marker("interpreter") is not None:
        if reason:
            skip_or_fail(reason)
        if not INTERPRETER:
            pytest.skip("meaningful only under Triton's interpreter on CPU tensors; here the kernels run compiled "
                        "on CUDA")
    if item.get_closest_marker("gpu") is not None and KERNEL_DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device running the compiled kernels (TRITON_INTERPRET unset or 0)")


def _is_real(t) -> bool:
    """A tensor holding data that a kernel can read: not fake (torch.compile, torch.export), not meta."""
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, torch.Tensor) and t.device.type != "meta" and not is_fake(t)


@contextlib.contextmanager
def count_fused_calls():
    """Counts the calls of the fused path's entry (`fused_window_attention`, which `window_attention` calls
    after choosing "triton") on real tensors with at least one token; a Counter with key "calls"."""
    counts = collections.Counter()
    entry = tk.fused_window_attention

    def counted(qkv, *args, **kwargs):
        if not torch.compiler.is_compiling() and _is_real(qkv) and qkv.numel() > 0:
            counts["calls"] += 1
        return entry(qkv, *args, **kwargs)

    tk.fused_window_attention = counted
    try:
        yield counts
    finally:
        tk.fused_window_attention = entry


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
        raise AssertionError(f"launch proof: window_attention took the fused path {fused['calls']} time(s) but no "
                             f"forward kernel launched ({dict(launches) or 'no launches'})")
    if marker is not None:
        if marker.kwargs.get("forward", True) and not forward:
            raise AssertionError("launch proof: this test asks for the fused kernels but no forward kernel "
                                 f"launched ({dict(launches) or 'no launches'})")
        if marker.kwargs.get("backward", False) and not backward:
            raise AssertionError("launch proof: this test trains through the fused kernels but no backward "
                                 f"kernel launched ({dict(launches) or 'no launches'})")
    return result


@contextlib.contextmanager
def count_launches():
    """Counts the launches of every Triton kernel of the fused op while active: a Counter of kernel name ->
    launches (e.g. `_window_attention_fwd_kernel`). A test that asks for "triton" uses it to prove the
    kernels ran, not a fallback. Works for the interpreter and for compiled kernels: each kernel object of
    the kernel module is wrapped where the launchers look it up (a module global)."""
    from swinv2_fast.kernels import triton_window_attention as tk

    counts = collections.Counter()

    class _Counted:
        def __init__(self, name, kernel):
            self._name, self._kernel = name, kernel

        def __getitem__(self, grid):
            counts[self._name] += 1
            return self._kernel[grid]

        def __getattr__(self, attr):
            return getattr(self._kernel, attr)

    originals = {name: obj for name, obj in vars(tk).items()
                 if name.endswith("_kernel") and hasattr(type(obj), "__getitem__")}
    assert originals, "no Triton kernels found in the kernel module"
    try:
        for name, obj in originals.items():
            setattr(tk, name, _Counted(name, obj))
        yield counts
    finally:
        for name, obj in originals.items():
            setattr(tk, name, obj)


def forward_launches(counts) -> int:
    return sum(n for name, n in counts.items() if "fwd" in name)


def backward_launches(counts) -> int:
    return sum(n for name, n in counts.items() if "bwd" in name)

# fp32 parity with transformers and timm on identical weights (the contract). Both sides run the
# same math in fp32; the only differences are summation orders (fused attention, one q/k/v GEMM), which
# stay around 1e-6 for these sizes.
FP32_ATOL = 1e-4

# The fused op against the reference, both fp32 on the same inputs: the same math with other summation
# orders (online softmax over key blocks, scale folded into q), O(1) outputs. The interpreter's fp32 dots
# are exact; compiled kernels use IEEE fp32 dots (input_precision="ieee"), never TF32.
OP_FP32_ATOL = 1e-5
# The scores' rounding error grows with the logit scale (cos * scale): OP_FP32_ATOL holds for scales near
# the published initialisation (10); at the clamp (100) the error is ten times as large.
OP_FP32_ATOL_AT_CLAMP = 10 * OP_FP32_ATOL

# Gradients of the fused op against the reference's autograd, fp32: sums over whole windows and over the
# batch in another order; about 1e-6 of the gradient's size. Gradients that are sums over every window of
# the batch (logit scale, bias) are instead held to the reference's own fp32 error against fp64 (see
# test_triton_backward.assert_errors_within_pytorch), with OP_GRAD_FP32_RTOL as the floor.
OP_GRAD_FP32_ATOL, OP_GRAD_FP32_RTOL = 1e-5, 1e-5

# Gradients that are sums over the batch and the windows (logit scale: B * nW * N * N terms; bias table:
# B * nW per element; q/k/v bias: B * nW * N): besides PyTorch's own error (the eager reference's, or the
# problem's sensitivity to rounding its inputs, whichever is larger: see rounding_sensitivity), a sum of n
# rounded terms in another order may differ by the probabilistic rounding bound of a sum, lambda * sqrt(n) * u
# relative to the sum's terms (Higham & Mary 2019; u = eps / 2, lambda = 4: exceeded with probability below
# 1e-3): the fused backward sums dS over tiles and window groups, the reference's autograd in another order.
# Measured (fp32, interpreter): logit-scale errors 4e-9 to 5e-5, this floor 1e-5 to 1.4e-4 (the former
# worst-case n * eps allowed 1e-3 to 8e-3).
SUM_ROUNDING_LAMBDA = 4.0


def sum_grad_fp32_rtol(terms: int) -> float:
    return max(OP_GRAD_FP32_RTOL, SUM_ROUNDING_LAMBDA * terms ** 0.5 * torch.finfo(torch.float32).eps / 2)


# Parameter gradients of a whole model's training step, fp32, against another implementation on identical
# weights: the op's gradient error carried through every block's projections, norms and the position-bias
# MLP; relative error about 1e-5 of each gradient's size.
MODEL_GRAD_FP32_ATOL, MODEL_GRAD_FP32_RTOL = 1e-4, 1e-4

# Low precision: the kernel's error against an fp64 reference may be at most LOW_PRECISION_FACTOR times the
# error of the eager reference run in that dtype (plus a floor for cases where that error is ~0).
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-3

# The eager reference's error is one sample of rounding. Where a result has few elements (a window of 3
# tokens, one real) and the problem is ill-conditioned (logit scale near the clamp), one sample can be
# lucky: eager's CPU fp16 path keeps P and the scores in fp32 where a tensor-core kernel rounds them to
# fp16, so a single draw may sit far below what fp16 arithmetic can promise. There the "own error" of
# PyTorch in a low-precision dtype is taken as the larger of the eager error and the problem's sensitivity
# to rounding its inputs: the exact (fp64) result's change when each low-precision input is moved by a
# random relative amount up to the dtype's unit roundoff (the forward error a backward-stable algorithm may
# have), the largest of ROUNDING_DRAWS draws.
ROUNDING_DRAWS = 2


def rounding_sensitivity(compute, inputs, dtype, error, seed=0):
    """Largest `error(compute(perturbed), compute(exact))` over ROUNDING_DRAWS perturbations, per result.

    compute: maps a list of fp64 tensors (None kept) to a list of fp64 results; inputs: the low-precision
    tensors (those of another dtype, e.g. autocast's fp32 table, are not perturbed); error(a, exact) -> float.
    """
    unit = torch.finfo(dtype).eps / 2
    gen = torch.Generator().manual_seed(seed)
    exact = compute([t.double() if t is not None else None for t in inputs])
    worst = [0.0] * len(exact)
    for _ in range(ROUNDING_DRAWS):
        moved = [None if t is None else
                 t.double() * (1 + unit * (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1)
                               .to(t.device)) if t.dtype == dtype else t.double() for t in inputs]
        worst = [max(w, error(a, b)) for w, a, b in zip(worst, compute(moved), exact)]
    return worst


def outputs_and_grads(implementation, inputs, grad_out, **kwargs):
    """(output, gradients) of swinv2_fast.window_attention on fresh leaves made from `inputs`; a None input
    stays None and has no gradient in the tuple; one autograd reports unused is zero (without padding the
    reference never reads qkv_bias)."""
    from swinv2_fast import window_attention

    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = window_attention(*leaves, implementation=implementation, **kwargs)
    wanted = [t for t in leaves if t is not None]
    found = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    return out, tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wanted, found))


def perturb_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initialisation (zero biases, equal logit scales, zero mask tokens
    would hide mistakes), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def assert_close(actual, expected, atol=FP32_ATOL, rtol=0.0, name="tensor"):
    """allclose that reports how many elements are off, the worst one and where."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = diff > bound
    if bad.any() or torch.isnan(diff).any():
        worst = int(diff.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"max abs diff {diff.max().item():.3e} at {idx}: {actual[idx].item():.6g} vs {expected[idx].item():.6g}"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
