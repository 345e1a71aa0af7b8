"""A pytest plugin that runs timm's own tests on models patched by `swinv2_fast.patch`.

Loaded in a child pytest (`-p peer_timm_plugin`, with tests/ on PYTHONPATH: see
tests/test_peer_suites.py). In `pytest_configure`, before timm's test module is imported (it does
`from timm import create_model`), `timm.create_model` is replaced, where the tests look it up
(`timm.create_model`, `timm.models.create_model`, `timm.models._factory.create_model`), by a wrapper that
passes every Swin V2 model it returns (`swinv2_*`, `swinv2_cr_*`, also features_only) through
`swinv2_fast.patch` (implementation from $SWINV2_FAST_PEER_IMPLEMENTATION, default "auto").

Proof that the patch was exercised: during each test the patched step's calls are counted
(`count_patched_calls`), and so are the forward calls, on real tensors, of the patched blocks (a forward
pre-hook on each). A test in which a patched block ran but the patched step never did fails. A test
without a block forward (config checks, pretrained-weight loading) is not held to it.

A test that fails because torch.jit.script refused a patched model (`PatchedModelNotScriptable`: scripting
would silently drop the patch, see swinv2_fast/patch.py) is reported as skipped, with the reason: it cannot
apply to a patched model, and the caller lists it. With $SWINV2_FAST_PEER_FAILURES set, every failure's
test id and message are appended to that file.
"""

import os

import pytest
import torch

CANNOT_APPLY = "cannot apply to a patched model"

_state = {"blocks_ran": 0}


def _swin_blocks(model):
    from swinv2_fast.patch import _timm_families

    classes = tuple(block for _, block in _timm_families())
    return [m for m in model.modules() if isinstance(m, classes)]


def _count_block_forward(module, args):
    # not while TorchDynamo traces: a Python side effect there becomes a guard on the counter, and timm's
    # recompilation tests count the graphs
    if torch.compiler.is_compiling():
        return
    if torch.jit.is_tracing():  # a traced timm block runs timm's own step by design (swinv2_fast.patch.timm.timm_attn)
        return
    if args and isinstance(args[0], torch.Tensor) and not isinstance(args[0], torch.fx.Proxy):
        _state["blocks_ran"] += 1


def pytest_configure(config):
    import timm
    import timm.models
    import timm.models._factory as factory

    import swinv2_fast

    implementation = os.environ.get("SWINV2_FAST_PEER_IMPLEMENTATION", "auto")
    original = factory.create_model

    def create_model(*args, **kwargs):
        model = original(*args, **kwargs)
        blocks = _swin_blocks(model)
        if blocks:  # a Swin V2 model: patched (patch raises on one it cannot patch, failing the test)
            swinv2_fast.patch(model, implementation)
            for block in blocks:
                block.register_forward_pre_hook(_count_block_forward)
        return model

    create_model.__wrapped__ = original
    timm.create_model = timm.models.create_model = factory.create_model = create_model


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    from _utils import count_patched_calls

    _state["blocks_ran"] = 0
    with count_patched_calls(while_compiling=False) as calls:
        outcome = yield
    if outcome.excinfo is None and _state["blocks_ran"] and not calls["calls"]:
        pytest.fail(
            f"swinv2_fast: {_state['blocks_ran']} patched block forward(s) ran but the patched step never did",
            pytrace=False,
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    failures = os.environ.get("SWINV2_FAST_PEER_FAILURES")
    if failures and report.failed:  # the caller lists offenders with their messages
        message = str(call.excinfo.value if call.excinfo is not None else report.longrepr).strip()
        with open(failures, "a") as out:
            out.write(f"{item.nodeid} ({call.when}): {message[:600]}\n")
    if call.when == "call" and call.excinfo is not None:
        from swinv2_fast.patch import PatchedModelNotScriptable

        if call.excinfo.errisinstance(PatchedModelNotScriptable):
            report.outcome = "skipped"
            report.longrepr = (
                str(item.fspath),
                item.location[1] or 0,
                f"Skipped: {CANNOT_APPLY}: {call.excinfo.value}",
            )
