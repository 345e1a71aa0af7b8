"""Every kernel specialization compiles ahead of time for sm_80 and sm_90 without register spills (no GPU)."""
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_compile_check_passes():
    result = subprocess.run([sys.executable, "-m", "swinv2_fast.kernels.compile_check"], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "0 failed, 0 with spills" in summary, summary
    # every published window size's specializations appear, for both archs
    assert result.stdout.count("sm_80") == result.stdout.count("sm_90") > 0
    for dtype in ("fp32", "fp16", "bf16"):
        assert f"\n{dtype}" in result.stdout


def test_launchable_specs_cover_what_the_host_launches():
    import torch

    from swinv2_fast.kernels.compile_check import launchable_specs
    from swinv2_fast.kernels.triton_window_attention import KERNEL_HEAD_DIMS, block_config

    specs = launchable_specs()
    for head_dim in KERNEL_HEAD_DIMS:
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            for window in (7, 8, 12, 16, 24):
                m, n, w = block_config(window * window, head_dim, dtype)
                for roll in (False, True):
                    for bias in (False, True):
                        assert (name, head_dim, m, n, w, roll, bias) in specs
