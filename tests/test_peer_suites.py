"""The peers' own test suites run on models patched by swinv2_fast, against the same suites on the
unpatched libraries: every test that passes on the library must pass (or, where it cannot apply to a
patched model, be reported as skipped with the reason) on the patched side."""
import os
import time
from pathlib import Path

import pytest

from _peers import counts, require_peer_tests, run_child_pytest

TESTS_DIR = Path(__file__).resolve().parent

# The smallest model of each timm Swin V2 family (parameters, then input size; checked with
# timm.list_models("swinv2_*") on timm 1.0.29): swinv2_tiny_window8_256 (28.35 M, 256 px; window 8 has the
# cheaper attention of the two tiny 256 models) and swinv2_cr_tiny_ns_224 (28.33 M, 224 px). swinv2_cr_tiny_224
# is 1344 parameters smaller but has no pretrained config, so timm's default-config tests skip it.
TIMM_MODELS = ("swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224")
# timm's tests that download pretrained weights cannot run offline (they fail on both sides).
TIMM_SELECTION = f"({' or '.join(TIMM_MODELS)}) and not pretrained"


def _child_env(patched: bool) -> dict:
    # tests/ on PYTHONPATH for the plugin (and _utils); never the repository root, whose kernels/ folder
    # would shadow Hugging Face's `kernels` package. The fused op runs as on a user's CPU: no interpreter.
    env = {"PYTHONPATH": str(TESTS_DIR), "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] += "".join(os.pathsep + p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                 if p and Path(p).resolve() != TESTS_DIR.parent)
    return env


@pytest.mark.slow
def test_timm_model_tests(tmp_path):
    """timm's tests/test_models.py on the two smallest Swin V2 models, plain and patched (tests/peer_timm_plugin.py
    patches every model timm.create_model returns and fails a test whose patched blocks ran without the
    patched step). ~6 minutes per side on 2 CPU cores."""
    suite = require_peer_tests("timm") / "test_models.py"
    args = [str(suite), "-k", TIMM_SELECTION, "-rs"]
    results, seconds = {}, {}
    for side in ("timm", "patched"):
        start = time.perf_counter()
        plugin = ["-p", "peer_timm_plugin"] if side == "patched" else []
        env = dict(_child_env(side == "patched"), SWINV2_FAST_PEER_FAILURES=str(tmp_path / "failures.txt"))
        results[side] = run_child_pytest(plugin + args, env=env)
        seconds[side] = time.perf_counter() - start
        print(f"{side}: {counts(results[side])} in {seconds[side]:.0f} s")
    plain, patched = results["timm"], results["patched"]
    assert plain.keys() == patched.keys(), sorted(plain.keys() ^ patched.keys())
    for side, outcomes in results.items():
        ran = sum(v == "passed" for v in outcomes.values())
        assert ran >= 15, f"{side}: only {ran} of timm's tests passed ({counts(outcomes)}): the selection is wrong"
    offenders = {t: patched[t] for t, v in plain.items() if v == "passed" and patched[t] == "failed"}
    not_applied = sorted(t for t, v in plain.items() if v == "passed" and patched[t] == "skipped")
    print("cannot apply to a patched model (skipped on the patched side):", not_applied)
    messages = (tmp_path / "failures.txt").read_text() if (tmp_path / "failures.txt").exists() else ""
    assert not offenders, f"tests that pass on timm but fail patched: {sorted(offenders)}\n{messages}"
    # the only tests allowed to skip instead are the torch.jit.script ones the patch refuses by design
    assert all("torchscript" in t and "fx_torchscript" not in t for t in not_applied), not_applied
