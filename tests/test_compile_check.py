"""Every kernel specialization compiles ahead of time for sm_80 and sm_90 without register spills (no GPU)."""
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow  # compiles the published head dim's specializations for two architectures (minutes)
def test_compile_check_passes():
    # --published: head_dim 32 over every window and flag combination (600 compilations); the full gate over
    # every head dim (about 2,600) is the check to run before changing a kernel, too long for CI
    result = subprocess.run([sys.executable, "-m", "swinv2_fast.kernels.compile_check", "--published"],
                            capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "0 failed, 0 with spills" in summary, summary
    # every published window size's specializations appear, for both archs
    assert result.stdout.count("sm_80") == result.stdout.count("sm_90") > 0
    for kernel in ("fwd", "bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias"):
        for dtype in ("fp32", "fp16", "bf16"):
            assert any(line.split()[:2] == [kernel, dtype] for line in result.stdout.splitlines()), (kernel, dtype)


def test_launchable_specs_cover_what_the_host_launches():
    """The spill gate's specialisations: for every head dim, dtype, published window and geometry (every flag
    combination the host can launch), the forward, and the backward kernels where the fused backward serves."""
    import torch

    from swinv2_fast.kernels.compile_check import GEOMETRIES, KERNELS, WINDOW_SIZES, launchable_specs
    from swinv2_fast.kernels.triton_window_attention import KERNEL_HEAD_DIMS, fused_backward_supported

    specs = set(launchable_specs())
    for head_dim in KERNEL_HEAD_DIMS:
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            backward = fused_backward_supported(head_dim, dtype)
            for window in WINDOW_SIZES:
                for geometry in GEOMETRIES:
                    for kernel in KERNELS:
                        assert ((kernel, name, head_dim, window, geometry) in specs) == (kernel == "fwd" or backward)
    # head_dim 32, the published models': fused backward in every dtype
    assert all(fused_backward_supported(32, d) for d in (torch.float32, torch.float16, torch.bfloat16))
