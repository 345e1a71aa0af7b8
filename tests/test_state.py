"""State: importing swinv2_fast changes nothing in torch; a model keeps nothing derived from its parameters, so
no optimizer (fused or not), `.data` write, `load_state_dict` or `.to()` can leave a stale value; what the
package caches process-wide stays small after a model has seen many input sizes; the CPU switches are config
fields that decide alone."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import swinv2_fast

from _utils import assert_close, perturb_

TINY = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, num_labels=3)

# What a fresh interpreter records of torch's process-wide registries: the optimizer hook dicts, every
# nn.Module `_global_*` dict (hooks and registration hooks), and the identity of every attribute of the
# classes a package could monkeypatch.
_SNAPSHOT = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.modules.module as module_globals, torch.optim.optimizer as optimizer_globals

    def snapshot():
        registries = {name: list(map(repr, getattr(module_globals, name).items()))
                      for name in dir(module_globals) if name.startswith("_global_")
                      and isinstance(getattr(module_globals, name), dict)}
        for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
            registries["optimizer." + name] = list(map(repr, getattr(optimizer_globals, name).items()))
        classes = {cls.__name__: {k: id(v) for k, v in vars(cls).items()}
                   for cls in (torch.nn.Module, torch.nn.Linear, torch.optim.Optimizer, torch.Tensor)}
        return {"registries": registries, "classes": classes}

    before = snapshot()
    import swinv2_fast, swinv2_fast.modeling, swinv2_fast.linear, swinv2_fast.functional, swinv2_fast.patch
    after = snapshot()
    json.dump({"before": before, "after": after}, sys.stdout)
""")


def test_import_leaves_torch_registries_as_they_were():
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", _SNAPSHOT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    before, after = data["before"], data["after"]
    assert set(before["registries"]) >= {
        "_global_forward_hooks",
        "_global_backward_hooks",
        "optimizer._global_optimizer_post_hooks",
    }, "the snapshot read nothing"
    for name, entries in before["registries"].items():
        assert after["registries"][name] == entries, f"import swinv2_fast changed torch's {name}"
    for cls, attributes in before["classes"].items():
        changed = sorted(
            k for k in set(attributes) | set(after["classes"][cls]) if attributes.get(k) != after["classes"][cls].get(k)
        )
        assert not changed, f"import swinv2_fast changed torch {cls} attributes {changed}"


def test_no_hook_of_the_package_is_registered_in_this_process():
    """Also in this (test) process, whatever else is loaded: no global hook comes from swinv2_fast."""
    import torch.nn.modules.module as module_globals
    import torch.optim.optimizer as optimizer_globals

    dicts = [
        getattr(module_globals, n)
        for n in dir(module_globals)
        if n.startswith("_global_") and isinstance(getattr(module_globals, n), dict)
    ]
    dicts += [optimizer_globals._global_optimizer_pre_hooks, optimizer_globals._global_optimizer_post_hooks]
    owners = [getattr(hook, "__module__", "") or "" for d in dicts for hook in d.values() if callable(hook)]
    assert not [o for o in owners if o.startswith("swinv2_fast")], owners


def _tensors_alive() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


# A bound for what the process-wide layout caches may keep (a few index tensors per cached geometry, a small
# bounded LRU); the model's own tensors are all freed with it.
MAX_TENSORS_LEFT = 64


@pytest.mark.parametrize("semantics", ["transformers", "timm"])
def test_many_input_sizes_leave_few_tensors_behind(semantics):
    """120 distinct input sizes through a small backbone (eval without autograd, eval with autograd, and a
    training step), then `del model`: at most a few dozen tensors stay alive anywhere (before: hundreds, one
    set of layouts and masks per size and block)."""
    torch.manual_seed(0)
    baseline = _tensors_alive()
    config = swinv2_fast.Swinv2Config(**TINY, window_semantics=semantics, out_features=["stage1", "stage2"])
    model = perturb_(swinv2_fast.Swinv2Backbone(config)).eval()
    sizes = [(h, w) for h in range(9, 49, 2) for w in (12, 19, 27, 33, 40, 46)][:120]
    assert len(set(sizes)) == 120
    for i, (h, w) in enumerate(sizes):
        x = torch.randn(1, 3, h, w)
        if i % 3 == 0:
            with torch.no_grad():
                model(x)
        elif i % 3 == 1:
            model(x).feature_maps[-1].sum().backward()
        else:
            with torch.inference_mode():
                model(x)
    model.zero_grad(set_to_none=True)
    del model, x
    left = _tensors_alive() - baseline
    assert left <= MAX_TENSORS_LEFT, f"{left} tensors stay alive after the model is gone (at most {MAX_TENSORS_LEFT})"


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = swinv2_fast.Swinv2Config(**dict(TINY, **overrides))
    return perturb_(swinv2_fast.Swinv2ForImageClassification(config), seed=seed).eval()


def _fresh_copy(model):
    """A new model of the same config holding `model`'s current weights (built, never run before)."""
    fresh = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config.from_dict(model.config.to_dict()))
    fresh.load_state_dict(model.state_dict())
    return fresh.to(model.dtype).eval()


def _eval_logits(model, x):
    with torch.no_grad():
        no_grad = model(x).logits
    with torch.inference_mode():
        inference = model(x).logits
    return no_grad, inference.clone()


def _fused_available(cls):
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


UPDATES = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
    "AdamW-foreach": lambda params: torch.optim.AdamW(params, lr=0.05, foreach=True),
    "AdamW-fused": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
    "SGD-fused": lambda params: torch.optim.SGD(params, lr=0.5, fused=True),
}


@pytest.mark.parametrize("update", [*UPDATES, "data-add", "no-grad-mul"])
def test_eval_after_a_parameter_update_sees_the_new_weights(update):
    """Eval outputs (no_grad and inference_mode) after each kind of in-place update equal those of a fresh
    model holding the updated weights, exactly: nothing computed from the old weights is served. Fused
    optimizers and `.data` writes move no version counter, so no cache keyed on one could pass this."""
    if update.endswith("fused") and not _fused_available(getattr(torch.optim, update.split("-")[0])):
        pytest.skip(f"this PyTorch has no fused {update.split('-')[0]} on CPU")
    model = _model()
    x = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    before, _ = _eval_logits(model, x)  # whatever a model might keep from an eval call, kept now
    if update in UPDATES:
        optimizer = UPDATES[update](model.parameters())
        model.train()
        model(x, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        model.eval()
    elif update == "data-add":
        for p in model.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
    after, after_inference = _eval_logits(model, x)
    expected, _ = _eval_logits(_fresh_copy(model), x)
    assert not torch.equal(after, before), "the update changed nothing: the test would prove nothing"
    assert torch.equal(after, expected), f"stale output after {update}: max diff {(after - expected).abs().max()}"
    assert torch.equal(after_inference, expected)


def test_load_state_dict_and_to_dtype_are_seen():
    model, other = _model(seed=0), _model(seed=7)
    x = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(2))
    _eval_logits(model, x)
    model.load_state_dict(other.state_dict())
    after, _ = _eval_logits(model, x)
    assert torch.equal(after, _eval_logits(other, x)[0]), "stale output after load_state_dict"

    double = model.to(torch.float64)
    out, _ = _eval_logits(double, x.double())
    assert out.dtype == torch.float64
    assert torch.equal(out, _eval_logits(_fresh_copy(double), x.double())[0]), "stale output after .to(float64)"
    assert_close(out.float(), after, atol=1e-5, name="float64 against float32 logits")


@pytest.mark.parametrize("chunk_bytes", [1 << 10, 1 << 30], ids=["many-pieces", "one-piece"])
def test_inference_in_pieces_matches_whole_blocks(chunk_bytes):
    """config.cpu_inference_chunk_bytes: pieces (tiny ones: many per block) give the numbers of whole blocks
    (0) and of the autograd path, in no_grad and inference_mode; switched per model, per call."""
    model = _model(cpu_inference_chunk_bytes=chunk_bytes)
    x = torch.randn(3, 3, 38, 45, generator=torch.Generator().manual_seed(3))
    autograd = model(x, output_hidden_states=True)
    with torch.no_grad():
        pieces = model(x, output_hidden_states=True)
        model.config.cpu_inference_chunk_bytes = 0
        whole = model(x, output_hidden_states=True)
    for i, (a, b, c) in enumerate(zip(pieces.hidden_states, whole.hidden_states, autograd.hidden_states)):
        assert_close(a, b, atol=1e-5, name=f"hidden_states[{i}] pieces vs whole")
        assert_close(a, c.detach(), atol=1e-5, name=f"hidden_states[{i}] pieces vs autograd")
    model.config.cpu_inference_chunk_bytes = chunk_bytes
    with torch.inference_mode():
        assert torch.equal(model(x).logits, pieces.logits)


def test_hooks_never_change_the_path_the_switch_chose():
    """The switch alone decides: with pieces, a hook inside a block sees every piece (here 2 images in pieces
    of one image each); with 0, one call per block, as in transformers. Registering the hook changes neither."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    calls = {}
    for chunk_bytes in (1, 0):  # 1 byte: one image per attention piece
        model = _model(cpu_inference_chunk_bytes=chunk_bytes)
        block = model.swinv2.encoder.layers[0].blocks[0]
        seen = calls.setdefault(chunk_bytes, [])
        block.attention.register_forward_hook(lambda module, args, out, seen=seen: seen.append(args[0].shape[0]))
        with torch.no_grad():
            model(x)
    assert calls == {1: [1, 1], 0: [2]}


@pytest.mark.parametrize("value,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_the_chunk_switch_checks_its_value(value, error):
    with pytest.raises(error, match="cpu_inference_chunk_bytes"):
        swinv2_fast.Swinv2Config(cpu_inference_chunk_bytes=value)


def test_switches_round_trip_through_config_json_only_when_set(tmp_path):
    default = swinv2_fast.Swinv2Config(**TINY)
    assert "cpu_onednn_linear" not in default.to_dict() and "cpu_inference_chunk_bytes" not in default.to_dict()
    config = swinv2_fast.Swinv2Config(**TINY, cpu_onednn_linear=False, cpu_inference_chunk_bytes=0)
    config.save_pretrained(str(tmp_path))
    loaded = swinv2_fast.Swinv2Config.from_pretrained(str(tmp_path))
    assert loaded.cpu_onednn_linear is False and loaded.cpu_inference_chunk_bytes == 0
