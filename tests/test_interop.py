"""What users do with a drop-in model besides calling it: adapters on its layers, hooks, pickling, tracing
and exporting, torch.func, fake and meta tensors. Each against transformers' model on identical weights,
or against the same model run plainly."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

import swinv2_fast
from swinv2_fast.kernels import reference, window_attention_reference, window_layout

from _utils import FP32_ATOL, assert_close, assert_grad_close, assert_grads_close, make_pair

TINY = dict(image_size=40, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2])


class LowRankAdapter(nn.Module):
    """A LoRA-style wrapper, base(x) + x A^T B^T, written here so that no adapter library is needed (PEFT's
    LoRA replaces a layer the same way: the model's attribute becomes a module that is not an nn.Linear)."""

    def __init__(self, base: nn.Linear, seed: int, rank: int = 2):
        super().__init__()
        self.base = base
        gen = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) * 0.2)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, generator=gen) * 0.2)

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T


def _add_adapters(model, blocks):
    """Adapters on every block's query and value, the usual targets; seeded by position, so that two models
    get the same ones."""
    for i, block in enumerate(blocks):
        attn = block.attention.self
        attn.query = LowRankAdapter(attn.query, seed=2 * i)
        attn.value = LowRankAdapter(attn.value, seed=2 * i + 1)
    return model


def _blocks(model):
    return [b for m in model.modules() for b in getattr(m, "blocks", [])]


@pytest.mark.parametrize("size", [(40, 40), (38, 45)], ids=["grid-fits-window", "padded-grid"])
def test_swapped_projections_are_called_like_transformers_calls_them(size):
    """Layers replaced by wrappers (LoRA) are called as modules: same logits as transformers with the same
    adapters, also where padded positions hold the projection of a zero token, and the adapters get the
    same gradients."""
    hf, ours = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    hf, ours = _add_adapters(hf, _blocks(hf)), _add_adapters(ours, _blocks(ours))
    x, labels = torch.randn(2, 3, *size), torch.tensor([0, 2])
    with torch.no_grad():
        assert_close(ours(x).logits, hf(x).logits, name="eval logits with adapters")
    for model in (hf, ours):
        model.train()
        model(x, labels=labels).loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if n.endswith(("down", "up"))}
    grads = {n: p.grad for n, p in ours.named_parameters() if n.endswith(("down", "up"))}
    assert grads.keys() == hf_grads.keys() and len(grads) == 4 * sum(TINY["depths"])
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    assert_grads_close(grads, hf_grads)


def test_patched_transformers_model_calls_its_swapped_projections():
    transformers = pytest.importorskip("transformers")
    config = transformers.Swinv2Config(**TINY, num_labels=3)
    model = transformers.Swinv2ForImageClassification(config).eval()
    model = _add_adapters(model, _blocks(model))
    x = torch.randn(2, 3, 38, 45)
    with torch.no_grad():
        expected = model(x).logits
        swinv2_fast.patch(model, "eager")
        assert_close(model(x).logits, expected, name="patched logits with adapters")


def test_hooks_inside_a_block_see_what_transformers_shows_them():
    """CPU inference without autograd runs blocks in pieces unless config.cpu_inference_chunk_bytes is 0;
    with 0, each hooked module fires once per block call on (B, L, C), as in transformers."""
    hf, ours = make_pair("Swinv2Model", **TINY)
    # whole blocks, as docs/benchmarks.md ("CPU switches") says to set for such hooks
    ours.config.cpu_inference_chunk_bytes = 0
    x = torch.randn(3, 3, 40, 40)
    seen = {}
    for name, model in (("transformers", hf), ("ours", ours)):
        block = model.encoder.layers[0].blocks[0]
        record = seen.setdefault(name, [])
        for sub in ("layernorm_before", "intermediate", "output", "layernorm_after"):
            getattr(block, sub).register_forward_hook(
                lambda module, args, out, sub=sub, record=record: record.append((sub, tuple(out.shape)))
            )
        with torch.no_grad():
            model(x)
    assert seen["ours"] == seen["transformers"] and len(seen["ours"]) == 4


def test_backward_hooks_on_layers_fire_like_in_transformers():
    """A layer whose weights the model would otherwise read itself (q/k/v, the MLP's first GEMM) is called
    as a module while it has a backward hook, so the hook sees the gradient transformers' hook sees."""
    hf, ours = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    x, labels = torch.randn(2, 3, 38, 45), torch.tensor([0, 1])  # stage 0: a 10x12 grid, padded to 12x12
    seen = {}
    for name, model in (("transformers", hf), ("ours", ours)):
        block = model.swinv2.encoder.layers[0].blocks[1]
        record = seen.setdefault(name, {})
        for sub, layer in (("value", block.attention.self.value), ("intermediate", block.intermediate.dense)):
            layer.register_full_backward_hook(
                lambda module, grad_in, grad_out, sub=sub, record=record: record.setdefault(sub, []).append(grad_out[0])
            )
        model.train()
        model(x, labels=labels).loss.backward()
    ours_seen, hf_seen = seen["ours"], seen["transformers"]
    assert len(ours_seen["intermediate"]) == len(hf_seen["intermediate"]) == 1
    assert_grad_close(ours_seen["intermediate"][0], hf_seen["intermediate"][0], name="intermediate grad_output")
    # transformers projects padded windows (padded positions included) in one call; ours projects the grid's
    # tokens and, for the padded positions, one zero token: the gradient summed over every position agrees
    assert len(hf_seen["value"]) == 1 and len(ours_seen["value"]) == 2
    total = sum(g.sum() for g in ours_seen["value"])
    # a sum with cancellation: its budget is relative to the sum of its terms' magnitudes
    assert_grad_close(
        total, hf_seen["value"][0].sum(), name="value grad_output, summed", floor=hf_seen["value"][0].abs().sum().item()
    )


def test_models_pickle_with_every_builtin_activation():
    x = torch.randn(1, 3, 40, 40)
    for act in ("gelu", "gelu_new", "relu"):
        model = swinv2_fast.Swinv2Model(swinv2_fast.Swinv2Config(**TINY, hidden_act=act)).eval()
        copy_ = pickle.loads(pickle.dumps(model))
        with torch.no_grad():
            assert torch.equal(copy_(x).last_hidden_state, model(x).last_hidden_state), act


def test_meta_and_fake_tensors_leave_the_process_caches_alone():
    """A forward under `torch.device("meta")` (shape inference) and a torch.export (fake tensors) build
    their window layouts for themselves: a CPU model afterwards still matches transformers."""
    reference.clear_caches()  # so that this test's layouts are built during it
    hf, ours = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    x = torch.randn(2, 3, 40, 40)
    with torch.device("meta"):
        meta_model = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**TINY, num_labels=3))
        assert meta_model.eval()(torch.empty(2, 3, 40, 40)).logits.shape == (2, 3)
    exported = torch.export.export(ours, (x,), strict=False)
    with torch.no_grad():
        expected = hf(x).logits
        assert_close(exported.module()(x).logits, expected, name="exported program")
        assert_close(ours(x).logits, expected, name="eager after export")
    layout = window_layout((10, 10), 4, 2)
    assert type(layout.gather_index) is torch.Tensor and layout.gather_index.device.type == "cpu"


def test_a_default_device_keeps_the_caches():
    """`torch.set_default_device` / `with torch.device(...)` is a torch-function mode too, but not one that
    changes what the caches hold: under it, layouts are still kept and reused."""
    hf, ours = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    x = torch.randn(2, 3, 40, 40)
    with torch.device("cpu"), torch.no_grad():
        assert_close(ours(x).logits, hf(x).logits, name="logits under a default device")
        assert window_layout((10, 10), 4, 2) is window_layout((10, 10), 4, 2)


@pytest.mark.slow  # inductor compiles a whole model
def test_fullgraph_compile_in_inference():
    hf, ours = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    x = torch.randn(2, 3, 40, 40)
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x).logits, hf(x).logits, name="fullgraph compiled logits")


def test_jit_trace_with_tuple_outputs():
    """torch.jit.trace (what older export paths use) on a model configured for tuples, as transformers'
    torchscript users do: the trace reproduces transformers' logits, also for another batch size."""
    hf, _ = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    ours = swinv2_fast.Swinv2ForImageClassification(
        swinv2_fast.Swinv2Config(**TINY, num_labels=3, return_dict=False)
    ).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        traced = torch.jit.trace(ours, (x,))  # checks that a second run records the same graph
        for batch in (x, torch.randn(3, 3, 40, 40)):
            assert_close(traced(batch)[0], hf(batch).logits, name=f"traced logits, batch {len(batch)}")


def test_vmap_in_inference_matches_the_batch():
    _, ours = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        mapped = torch.func.vmap(lambda image: ours(image[None]).logits[0])(x)
        assert_close(mapped, ours(x).logits, atol=FP32_ATOL, name="vmap over images")


def test_numpy_integers_are_accepted_as_sizes():
    gen = torch.Generator().manual_seed(0)
    qkv, table = torch.randn(1, 64, 48, generator=gen), torch.rand(2, 16, 16, generator=gen)
    scale = torch.zeros(2, 1, 1)
    expected = swinv2_fast.window_attention(
        qkv, None, scale, table, grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2, implementation="eager"
    )
    got = swinv2_fast.window_attention(
        qkv,
        None,
        scale,
        table,
        grid_size=(np.int64(8), np.int64(8)),
        num_heads=np.int64(2),
        window_size=np.int32(4),
        shift_size=np.int64(2),
        implementation="eager",
    )
    assert torch.equal(got, expected)
    with pytest.raises(TypeError, match="num_heads must be an int, got float"):
        swinv2_fast.window_attention(qkv, None, scale, table, grid_size=8, num_heads=2.0, window_size=4)
    with pytest.raises(TypeError, match="grid_size must be an int or a pair of ints"):
        window_attention_reference(qkv, None, scale, table, grid_size=(8, True), num_heads=2, window_size=4)


def test_checkpointing_arguments_and_input_gradients_as_in_transformers(monkeypatch):
    """gradient_checkpointing_kwargs reach torch.utils.checkpoint; with frozen embeddings, reentrant
    checkpointing gives the blocks gradients only after enable_input_require_grads (transformers' recipe for
    adapters on frozen models)."""
    _, ours = make_pair("Swinv2ForImageClassification", num_labels=3, **TINY)
    seen = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *args, **kwargs: seen.append(kwargs) or checkpoint(*args, **kwargs)
    )
    ours.swinv2.embeddings.requires_grad_(False)
    ours.gradient_checkpointing_enable({"use_reentrant": True, "preserve_rng_state": False})
    x, labels = torch.randn(2, 3, 40, 40), torch.tensor([0, 1])
    logit_scale = ours.swinv2.encoder.layers[0].blocks[0].attention.self.logit_scale
    ours.train()
    ours(x, labels=labels).loss.backward()
    assert seen and all(kwargs == {"use_reentrant": True, "preserve_rng_state": False} for kwargs in seen)
    assert logit_scale.grad is None  # reentrant checkpointing of an input that requires no gradient
    ours.enable_input_require_grads()
    ours(x, labels=labels).loss.backward()
    assert logit_scale.grad is not None and logit_scale.grad.abs().sum() > 0
    frozen = sum(p.numel() for p in ours.swinv2.embeddings.parameters())
    assert ours.num_parameters() == sum(p.numel() for p in ours.parameters())
    assert ours.num_parameters(only_trainable=True) == ours.num_parameters() - frozen
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs must be a dict"):
        ours.gradient_checkpointing_enable(["use_reentrant"])
