"""Helpers shared by the test modules: import them from here (`from _utils import ...`), never from conftest
or from another test module. tests/conftest.py holds only pytest's hooks and fixtures.

- Where the kernels run: `KERNEL_DEVICE` (cuda on a CUDA machine, else cpu under Triton's interpreter),
  `INTERPRETER`, `tk` (the kernel module, None without Triton), `require_kernels()`. Importing this module
  settles TRITON_INTERPRET (before the kernel module is first imported) and applies the stack shims of
  _triton_compat, so a process that imports a test module (a spawned DDP worker) gets the same setup.
- Launch proof: `count_launches()` (a Counter of kernel name -> launches), `forward_launches(c)`,
  `backward_launches(c)`.
- Tolerances, each with its reason, defined once; `assert_close`, `rounding_sensitivity`,
  `outputs_and_grads`, `perturb_`.
- Shared inputs: the op's inputs and shapes (`make_inputs`, `SHAPES`, `NON_SQUARE`, `ODD_HEAD_DIMS`), the
  gradient budgets of the fused backward (`sum_floors`, `assert_errors_within_pytorch`), small models
  (`TINY`, `CONFIGS`, `make_pair`), the official checkpoint layout (`official_checkpoint_from_timm`).
- Whole-model gradients: `assert_grad_close` (the budget relative to each gradient's size).
- Patched transformers/timm models: `output_tensors`, `count_patched_calls()`, `assert_patch_matches_unpatched`,
  `assert_training_step_matches_unpatched`.
"""

import collections
import contextlib
import math
import os
import re
import sys
from typing import Optional

import pytest
import torch

import _triton_compat  # tests/ is on sys.path (pytest inserts the conftest's folder)

# Where the Triton kernels run. On a machine with a CUDA device: compiled, on CUDA tensors. Without one: on
# CPU tensors under Triton's interpreter. TRITON_INTERPRET is read when a kernel is decorated, i.e. when
# swinv2_fast (kernels/tiles.py) is first imported, so it is settled here, when tests/conftest.py
# imports this module before any test module; a caller may force either mode by exporting it
# (TRITON_INTERPRET=1 on a GPU machine runs the interpreter on CPU tensors).
if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
INTERPRETER = os.environ["TRITON_INTERPRET"] == "1"
# The device of the tensors a kernel test hands to implementation="triton".
KERNEL_DEVICE = torch.device("cpu") if INTERPRETER or not torch.cuda.is_available() else torch.device("cuda")
_triton_compat.install()
# In CI a kernel test that cannot run fails instead of skipping (tests/conftest.py).
CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

try:  # the kernel module (None without Triton): imported here, after TRITON_INTERPRET is settled
    from swinv2_fast.kernels import op
    from swinv2_fast.kernels import triton_backward as tkb
    from swinv2_fast.kernels import triton_forward as tk

    _TRITON_ERROR: Optional[str] = None
except Exception as error:  # ImportError, or a broken install raising anything at import
    op = tk = tkb = None
    _TRITON_ERROR = f"{type(error).__name__}: {error}"


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_tools():
    """Make the repository's tools/ importable (`import tools.cost`): it is not installed, so its folder's parent,
    the repository root, is appended to sys.path, after the installed packages (first on the path, the root's
    kernels/ folder would stand in for an installed `kernels`: see kernels/__init__.py). Processes the tools
    spawn inherit the path."""
    if REPO_ROOT not in sys.path:
        sys.path.append(REPO_ROOT)


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
        pytest.fail(f"CI=true: this kernel test cannot run here and would have been skipped: {reason}", pytrace=False)
    pytest.skip(reason)


def require_kernels():
    """For a test body or helper that needs the kernels: skip (CI: fail) when they cannot run."""
    reason = kernels_unavailable()
    if reason:
        skip_or_fail(reason)


def _is_real(t) -> bool:
    """A tensor holding data that a kernel can read: not fake (torch.compile, torch.export), not meta."""
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, torch.Tensor) and t.device.type != "meta" and not is_fake(t)


@contextlib.contextmanager
def count_fused_calls():
    """Counts the calls of the fused path's entry (`kernels.op.window_attention_fused`, which `window_attention` calls
    after choosing "triton") on real tensors with at least one token; a Counter with key "calls"."""
    counts = collections.Counter()
    entry = op.window_attention_fused

    def counted(qkv, *args, **kwargs):
        if not torch.compiler.is_compiling() and _is_real(qkv) and qkv.numel() > 0:
            counts["calls"] += 1
        return entry(qkv, *args, **kwargs)

    op.window_attention_fused = counted
    try:
        yield counts
    finally:
        op.window_attention_fused = entry


@contextlib.contextmanager
def count_launches():
    """Counts the launches of every Triton kernel of the fused op while active: a Counter of kernel name ->
    launches (e.g. `_window_attention_fwd_kernel`). A test that asks for "triton" uses it to prove the
    kernels ran, not a fallback. Works for the interpreter and for compiled kernels: each kernel object of
    the kernel module is wrapped where the launchers look it up (a module global)."""
    from swinv2_fast.kernels import triton_backward as tkb
    from swinv2_fast.kernels import triton_forward as tk

    counts = collections.Counter()

    class _Counted:
        def __init__(self, name, kernel):
            self._name, self._kernel = name, kernel

        def __getitem__(self, grid):
            counts[self._name] += 1
            return self._kernel[grid]

        def __getattr__(self, attr):
            return getattr(self._kernel, attr)

    originals = [
        (module, name, obj)
        for module in (tk, tkb)
        for name, obj in vars(module).items()
        if name.endswith("_kernel") and hasattr(type(obj), "__getitem__")
    ]
    assert originals, "no Triton kernels found in the kernel modules"
    try:
        for module, name, obj in originals:
            setattr(module, name, _Counted(name, obj))
        yield counts
    finally:
        for module, name, obj in originals:
            setattr(module, name, obj)


def forward_launches(counts) -> int:
    return sum(n for name, n in counts.items() if "fwd" in name)


def backward_launches(counts) -> int:
    return sum(n for name, n in counts.items() if "bwd" in name)


# fp32 parity with transformers and timm on identical weights (the models' contract). Both sides run the
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
    return max(OP_GRAD_FP32_RTOL, SUM_ROUNDING_LAMBDA * terms**0.5 * torch.finfo(torch.float32).eps / 2)


# Parameter gradients of a whole model's training step, fp32, against another implementation on identical
# weights: the op's gradient error carried through every block's projections, norms and the position-bias
# MLP; relative error about 1e-5 of each gradient's size.
MODEL_GRAD_FP32_ATOL, MODEL_GRAD_FP32_RTOL = 1e-4, 1e-4
# The same budget taken relative to each gradient's largest element (assert_grad_close): a loss such as the
# mean of squared outputs gives gradients of 1e-6 to 1e-1 (median ~5e-4 in the patched timm model), where a
# fixed MODEL_GRAD_FP32_ATOL of 1e-4 lets a gradient 20% wrong pass. Measured (eager, patched vs library,
# fp32): errors up to 4e-6 of the gradient's largest element. Gradients that are sums with cancellation (the
# logit scale: a few 1e-8 from terms a million times larger; a position-bias MLP's last bias, whose exact
# gradient is 0 because softmax ignores a constant) carry rounding of their terms' size instead: their scale
# is floored at MODEL_GRAD_SUM_FLOOR times the model's largest gradient element.
MODEL_GRAD_SUM_FLOOR = 1e-3
MODEL_GRAD_FP32_SCALED = 1e-4

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
        moved = [
            None
            if t is None
            else t.double()
            * (1 + unit * (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1).to(t.device))
            if t.dtype == dtype
            else t.double()
            for t in inputs
        ]
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


def assert_grad_close(actual, expected, name="gradient", rel=MODEL_GRAD_FP32_SCALED, floor=0.0):
    """A whole model's parameter gradient against another implementation's: every element within `rel` times
    the larger of the expected gradient's largest element and `floor` (MODEL_GRAD_SUM_FLOOR times the model's
    largest gradient element), plus `rel` relative to the element itself."""
    scale = max(expected.detach().abs().max().item(), floor)
    assert_close(actual, expected, atol=max(rel * scale, torch.finfo(torch.float32).tiny), rtol=rel, name=name)


def assert_grads_close(actual: dict, expected: dict, prefix=""):
    """Parameter gradients (name -> gradient or None) of a whole model against another implementation's:
    the same names, None where the other has None, and each gradient within assert_grad_close with the
    floor MODEL_GRAD_SUM_FLOOR times the largest expected gradient element."""
    assert actual.keys() == expected.keys(), sorted(actual.keys() ^ expected.keys())
    largest = max((g.detach().abs().max().item() for g in expected.values() if g is not None), default=0.0)
    assert largest > 0, "no parameter received a gradient"
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, f"{prefix}{name}: a gradient where the other implementation has none"
            continue
        assert actual[name] is not None, f"{prefix}{name}: no gradient"
        assert_grad_close(actual[name], grad, name=f"{prefix}{name}", floor=MODEL_GRAD_SUM_FLOOR * largest)


# ------------------------------------------------------------------------------------------ the op's inputs
def pair(x):
    """An int or a (height, width) pair as a pair."""
    return (x, x) if isinstance(x, int) else tuple(x)


def split_launches(grid, window, shift) -> int:
    """Launches of each kernel that splits a grid's windows (the forward, every backward kernel): two on a
    shifted grid with windows off its border (those, without the shift mask, and the border), else one."""
    windows = [-(-g // w) for g, w in zip(grid, pair(window))]
    return 2 if any(pair(shift)) and min(windows) > 1 else 1


def make_inputs(
    B,
    grid,
    heads,
    head_dim,
    window,
    dtype=torch.float32,
    table_dtype=None,
    bias=True,
    seed=0,
    zero_k_bias=True,
    device=None,
):
    """Inputs of the op (qkv, qkv_bias, logit_scale, position_bias) on `device` (default KERNEL_DEVICE);
    `window` an int or a (height, width) pair; the logit scale stays fp32."""
    device = KERNEL_DEVICE if device is None else device
    gen = torch.Generator().manual_seed(seed)
    C, N = heads * head_dim, pair(window)[0] * pair(window)[1]
    qkv = torch.randn(B, grid[0] * grid[1], 3 * C, generator=gen)
    qkv_bias = torch.randn(3 * C, generator=gen) if bias else None
    if qkv_bias is not None and zero_k_bias:
        qkv_bias[C : 2 * C] = 0  # k has no bias in the published models
    logit_scale = math.log(10) + 0.5 * torch.randn(heads, 1, 1, generator=gen)
    position_bias = 16 * torch.sigmoid(torch.randn(heads, N, N, generator=gen))
    cast = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731
    return (cast(qkv, dtype), cast(qkv_bias, dtype), logit_scale.to(device), cast(position_bias, table_dtype or dtype))


# (B, grid, heads, head_dim, window, shift): every window size of the published models (N = 49, 64, 144,
# 256, 576), head dims 16/32/64/128, shifted and not, grids that need padding and grids below the window.
SHAPES = [
    pytest.param(2, (8, 8), 2, 16, 4, 2, id="B2-8x8-h2d16-w4s2"),
    pytest.param(1, (14, 14), 2, 32, 7, 3, id="B1-14x14-h2d32-w7s3"),
    pytest.param(1, (10, 13), 1, 32, 7, 3, id="B1-10x13-h1d32-w7s3-padded"),
    pytest.param(2, (8, 8), 1, 32, 8, 0, id="B2-8x8-h1d32-w8s0"),
    pytest.param(1, (16, 11), 1, 64, 8, 4, id="B1-16x11-h1d64-w8s4-padded"),
    pytest.param(1, (12, 12), 1, 32, 12, 6, id="B1-12x12-h1d32-w12s6"),
    pytest.param(1, (9, 10), 1, 128, 12, 0, id="B1-9x10-h1d128-w12s0-below-window"),
    pytest.param(1, (16, 16), 1, 16, 16, 8, id="B1-16x16-h1d16-w16s8"),
    pytest.param(1, (24, 24), 1, 32, 24, 12, id="B1-24x24-h1d32-w24s12"),
    pytest.param(1, (5, 7), 2, 16, 24, 0, id="B1-5x7-h2d16-w24s0-tiny-grid"),
    # per-axis windows (timm's) on non-square grids: a window row and column index read with the wrong
    # extent, or a shift applied on the wrong axis, moves tokens here and nowhere above
    pytest.param(1, (7, 12), 2, 16, (3, 5), (1, 2), id="B1-7x12-h2d16-w3x5s1x2-padded"),
    pytest.param(2, (10, 6), 1, 32, (6, 4), (3, 2), id="B2-10x6-h1d32-w6x4s3x2-padded"),
    pytest.param(1, (8, 15), 1, 16, (4, 5), 0, id="B1-8x15-h1d16-w4x5s0"),
]
NON_SQUARE = SHAPES[10:]


def slow_where(params, *id_parts):
    """`params` with those whose id contains one of `id_parts` marked slow: the larger cases of a family, which
    take 15 s and more each under the interpreter on 2 CPU cores (the quick run keeps the smaller ones)."""
    return [
        pytest.param(*p.values, id=p.id, marks=(*p.marks, pytest.mark.slow)) if any(s in p.id for s in id_parts) else p
        for p in params
    ]


# head dims that are not a power of two of at least 16 (Swin2SR's 30 and 10, 24 from a custom config): the
# kernels run them masked in a channel tile of 16 or 32. Two heads where the head dim is below its tile: a
# padded channel read or stored would reach the other head's channels (or the next token's) and show.
ODD_HEAD_DIMS = [
    pytest.param(1, (6, 7), 2, 10, 4, 2, id="B1-6x7-h2d10-w4s2-padded"),
    pytest.param(2, (8, 8), 2, 30, 4, 0, id="B2-8x8-h2d30-w4s0"),
    pytest.param(1, (5, 6), 2, 24, (3, 4), (1, 2), id="B1-5x6-h2d24-w3x4s1x2-padded"),
    # window 8 at Swin2SR's head_dim 10: in fp32 the four kernels (the fused one takes whole channel tiles there)
    pytest.param(1, (16, 8), 2, 10, 8, 4, id="B1-16x8-h2d10-w8s4"),
]


# ------------------------------------------------------------------- gradient budgets of the fused backward
GRAD_NAMES = ("qkv", "qkv_bias", "logit_scale", "position_bias")


def sum_floors(B, grid, window):
    """Per-gradient floors for fp32 (sum_grad_fp32_rtol): q/k/v elementwise; the rest are sums over
    the windows of the batch (q/k/v bias: B * nW * N terms per element; logit scale: B * nW * N * N; table:
    B * nW)."""
    wh, ww = pair(window)
    nw = -(-grid[0] // wh) * -(-grid[1] // ww)
    n = wh * ww
    return [
        OP_GRAD_FP32_RTOL,
        sum_grad_fp32_rtol(B * nw * n),
        sum_grad_fp32_rtol(B * nw * n * n),
        sum_grad_fp32_rtol(B * nw),
    ]


def assert_errors_within_pytorch(fused, eager, exact, floor, sensitivity=None):
    """Each gradient's error against fp64, relative to its largest element, is at most LOW_PRECISION_FACTOR
    times the eager reference's own error in the same dtype, plus `floor`. Measured against fp64 rather than
    against the eager result: the logit-scale and table gradients are sums over every window and image,
    and the k part of the bias gradient passes through x / max(||x||, 1e-12) at zero vectors (padded k rows
    with the published models' zero k bias), whose slope 1e12 magnifies any rounding; both
    implementations' errors are of that size, and the test asks that ours is no larger."""
    floors = floor if isinstance(floor, list) else [floor] * len(GRAD_NAMES)
    sensitivity = sensitivity or [0.0] * len(GRAD_NAMES)
    for name, f, e, x, fl, sens in zip(GRAD_NAMES, fused, eager, exact, floors, sensitivity):
        scale = max(x.abs().max().item(), 1e-30)
        eager_error = (e.double() - x).abs().max().item() / scale
        fused_error = (f.double() - x).abs().max().item() / scale
        own = max(eager_error, sens)  # PyTorch's own error: one eager sample, or the problem's sensitivity
        assert fused_error <= LOW_PRECISION_FACTOR * own + fl, (name, fused_error, eager_error, sens, fl)


# ------------------------------------------------------------------------------------------ small models
# a two-stage model at window 4 (stage 2 at the window, unshifted): the quickest whole model
TINY = dict(image_size=32, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 1], drop_path_rate=0.0)

# Small models that cover the window sizes of the published models (N = 49, 64, 144, 256), pretrained
# window sizes, stages at or below the window, and inputs not divisible by the patch or the window.
CONFIGS = {
    "w7": dict(image_size=56, window_size=7, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4]),
    "w8": dict(image_size=64, window_size=8, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4]),
    "w12-pretrained": dict(
        image_size=96, window_size=12, embed_dim=16, depths=[2, 2], num_heads=[1, 2], pretrained_window_sizes=[8, 6]
    ),
    "w16": dict(image_size=64, window_size=16, embed_dim=16, depths=[2, 2], num_heads=[2, 2]),
}


def make_pair(cls_name, num_labels=5, **overrides):
    """(transformers model, swinv2_fast model) of class `cls_name` on identical perturbed weights, in eval mode."""
    import transformers

    import swinv2_fast

    kwargs = dict(drop_path_rate=0.0, num_labels=num_labels, **overrides)
    hf_config = transformers.Swinv2Config(**kwargs)
    hf = perturb_(getattr(transformers, cls_name)(hf_config)).eval()
    ours = getattr(swinv2_fast, cls_name)(swinv2_fast.Swinv2Config.from_transformers(hf_config)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def official_checkpoint_from_timm(timm_model):
    """The official layout of the same weights: downsample at the end of stage i, plain `head`, and the
    derived buffers the official code saves (which the converter must ignore)."""
    state = {}
    for key, value in timm_model.state_dict().items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        key = key.replace("head.fc.", "head.")
        state[key] = value.clone()
    for i, stage in enumerate(timm_model.layers):
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}."
            state[prefix + "attn.relative_coords_table"] = block.attn.relative_coords_table.clone()
            state[prefix + "attn.relative_position_index"] = block.attn.relative_position_index.clone()
            if block.attn_mask is not None:
                state[prefix + "attn_mask"] = block.attn_mask.clone()
    return {"model": state, "epoch": 3}


# --------------------------------------------------------------------------- patched transformers/timm models
def output_tensors(output):
    """Every tensor of a model output (ModelOutput, tuple or list), flattened in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [t for item in output if item is not None for t in output_tensors(item)]


def _run_outputs(model, x):
    return output_tensors(model(x))


@contextlib.contextmanager
def count_patched_calls(while_compiling: bool = True):
    """Counts the `window_attention` calls made by patched library blocks (swinv2_fast.patch.step, the step
    every patched block calls, looks it up as a module global): a Counter with key "calls". Proves a patched
    model ran the patched step, on the eager path too, where the outputs alone cannot tell.

    `while_compiling=False` leaves calls traced by TorchDynamo uncounted: the count is a Python side effect,
    which Dynamo guards on, so counting would add recompilations to a test that counts them."""
    import importlib

    # the module, by name: the package's attribute `patch` is the function
    modules = [importlib.import_module("swinv2_fast.patch.step")]
    counts = collections.Counter()
    originals = [module.window_attention for module in modules]

    def counted(entry):
        def call(*args, **kwargs):
            if while_compiling or not torch.compiler.is_compiling():
                counts["calls"] += 1
            return entry(*args, **kwargs)

        return call

    try:
        for module, entry in zip(modules, originals):
            module.window_attention = counted(entry)
        yield counts
    finally:
        for module, entry in zip(modules, originals):
            module.window_attention = entry


def assert_patch_matches_unpatched(model, x, implementation, run=_run_outputs):
    """`swinv2_fast.patch(model, implementation)` in eval without autograd: the patched step runs (counted),
    its outputs equal the library's within FP32_ATOL; `unpatch` brings back the library's code (bitwise the
    same outputs, no patched call); the state dict is untouched. `run(model, x)` -> list of output tensors."""
    import swinv2_fast

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = run(model, x)
        assert swinv2_fast.patch(model, implementation) is model and swinv2_fast.is_patched(model)
        with count_patched_calls() as patched_calls:
            patched = run(model, x)
        swinv2_fast.unpatch(model)
        with count_patched_calls() as restored_calls:
            restored = run(model, x)
    assert patched_calls["calls"] > 0, "the patched model never ran the patched step"
    assert restored_calls["calls"] == 0 and not swinv2_fast.is_patched(model)
    assert len(patched) == len(restored) == len(expected) >= 1
    for i, (a, b) in enumerate(zip(patched, expected)):
        assert_close(a, b, atol=FP32_ATOL, name=f"output {i}")
    for a, b in zip(restored, expected):
        assert torch.equal(a, b)  # the original code runs again
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def _squared_outputs_loss(model, x):
    return sum(t.float().square().mean() for t in _run_outputs(model, x))


def assert_training_step_matches_unpatched(model, x, implementation, loss=_squared_outputs_loss, seed=1):
    """One training step of `model` (in train mode) and of a patched deep copy on the same input: the same
    loss within FP32_ATOL, the patched step ran, and every parameter's gradient within MODEL_GRAD_FP32_*
    (a parameter without a gradient in the library's model has none in the patched one). Both losses are
    computed after torch.manual_seed(seed): a dropout inside the model (timm Cr's position-bias MLP) draws
    the same mask on both sides. `loss(model, x)` -> scalar."""
    import copy

    import swinv2_fast

    patched = swinv2_fast.patch(copy.deepcopy(model), implementation)
    torch.manual_seed(seed)
    expected_loss = loss(model, x)
    torch.manual_seed(seed)
    with count_patched_calls() as calls:
        got_loss = loss(patched, x)
    assert calls["calls"] > 0, "the patched model never ran the patched step"
    assert_close(got_loss.detach(), expected_loss.detach(), atol=FP32_ATOL, name="training loss")
    expected_loss.backward()
    got_loss.backward()
    assert_grads_close(
        {name: p.grad for name, p in patched.named_parameters()}, {name: p.grad for name, p in model.named_parameters()}
    )
