"""Shared helpers: transformers/ours pairs on identical random weights, tolerances, comparison with context."""
import pytest
import torch

# fp32 parity with transformers and timm on identical weights (the contract). Both sides run the
# same math in fp32; the only differences are summation orders (fused attention, one q/k/v GEMM), which
# stay around 1e-6 for these sizes.
FP32_ATOL = 1e-4


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
