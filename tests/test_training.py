"""Training through swinv2_fast: gradients against transformers, gradient checkpointing, eval caches."""

import copy

import pytest
import torch

import swinv2_fast

from _utils import CONFIGS, FP32_ATOL, assert_close, assert_grads_close, make_pair, perturb_


def train_step(model, x, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,size", [("w8", (70, 50)), ("w12-pretrained", (96, 96)), ("w7", (56, 56))])
def test_training_step_gradients_match_transformers(name, size):
    hf, ours = make_pair("Swinv2ForImageClassification", **CONFIGS[name])
    x = torch.randn(2, 3, *size)
    labels = torch.tensor([1, 4])
    hf_loss, hf_grads = train_step(hf, x, labels)
    loss, grads = train_step(ours, x, labels)
    assert_close(loss, hf_loss, name="loss")
    assert_grads_close(grads, hf_grads, prefix="grad ")


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    checkpointed = copy.deepcopy(ours)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    loss, grads = train_step(ours, x, labels)
    loss_ckpt, grads_ckpt = train_step(checkpointed, x, labels)
    assert torch.equal(loss, loss_ckpt)
    for key in grads:
        assert_close(grads_ckpt[key], grads[key], atol=1e-6, name=f"checkpointed grad {key}")


def test_drop_path_and_dropout_are_active_in_training_only():
    config = swinv2_fast.Swinv2Config(
        **CONFIGS["w8"], drop_path_rate=0.5, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2
    )
    model = swinv2_fast.Swinv2Model(config)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    a, b = model(x).last_hidden_state, model(x).last_hidden_state
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


def _first_attention(model):
    return model.swinv2.encoder.layers[0].blocks[0].attention.self


def _assert_eval_uses_current_weights(ours, hf, x, name):
    """`ours` in eval without autograd gives bitwise what a freshly built swinv2_fast model loaded with its
    current weights gives, and what transformers gives with them within FP32_ATOL. Fresh models, not deep
    copies of ours: a copy would carry any stale state of ours along with it."""
    fresh = type(ours)(ours.config)
    fresh.load_state_dict(ours.state_dict())
    hf.load_state_dict(ours.state_dict())
    with torch.no_grad():
        got = ours.eval()(x).logits
        assert_close(got, fresh.eval()(x).logits, atol=0.0, name=f"{name}, against a fresh model")
        assert_close(got, hf.eval()(x).logits, atol=FP32_ATOL, name=f"{name}, against transformers")
    return got


def test_eval_after_weight_changes_uses_the_new_weights():
    """load_state_dict (in-place copies), an optimizer step, .to(dtype): each evaluation that follows
    sees the weights as they are then (the models keep no eval caches; nothing may serve the old ones)."""
    hf, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    x = torch.randn(1, 3, 64, 64)
    attention = _first_attention(ours)
    with torch.no_grad():
        before = ours(x).logits

    # load_state_dict (in-place copy): the outputs follow the new weights.
    other = perturb_like(hf, seed=7)
    ours.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = ours(x).logits
        assert_close(loaded, other(x).logits, name="after load_state_dict")
        assert not torch.equal(loaded, before)

    # An optimizer step in training mode, then back to eval.
    ours.train()
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.5)
    ours(x, labels=torch.tensor([1])).loss.backward()
    optimizer.step()
    stepped = _assert_eval_uses_current_weights(ours, hf, x, "after optimizer step")
    assert not torch.equal(stepped, loaded)
    with torch.no_grad():
        # .to(dtype) replaces the parameters: nothing may serve the fp32 table.
        ours_double = ours.to(torch.float64)
        assert attention.position_bias().dtype == torch.float64
        assert ours_double(x.double()).logits.dtype == torch.float64


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD"])
def test_fused_optimizer_steps_invalidate_the_eval_caches(optimizer):
    """Fused optimizers (transformers' Trainer defaults to fused AdamW) update parameters without moving
    their version counters; evaluation after their step must still see the new weights."""
    hf, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = ours(x).logits
    step = getattr(torch.optim, optimizer)(ours.parameters(), lr=0.05, fused=True)
    train_step(ours, x, torch.tensor([1]))
    step.step()
    after = _assert_eval_uses_current_weights(ours, hf, x, f"eval after a fused {optimizer} step")
    assert not torch.equal(after, before)


def test_eval_mode_with_grad_enabled_still_differentiates_the_position_bias():
    _, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    ours.eval()
    x = torch.randn(1, 3, 64, 64)
    ours(x).logits.sum().backward()
    grad = _first_attention(ours).continuous_position_bias_mlp[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def perturb_like(model, seed):

    return perturb_(copy.deepcopy(model), seed=seed).eval()


@pytest.mark.parametrize("chunk_bytes", [1 << 10, 1 << 30], ids=["many-chunks", "one-chunk"])
def test_inference_path_matches_the_autograd_path(chunk_bytes):
    """Eval without autograd runs blocks in pieces (config.cpu_inference_chunk_bytes,
    Swinv2Layer._forward_in_pieces); same numbers as the plain path that eval with autograd takes."""
    _, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    ours.config.cpu_inference_chunk_bytes = chunk_bytes
    x = torch.randn(3, 3, 70, 50)
    plain = ours(x, output_hidden_states=True)
    with torch.no_grad():
        chunked = ours(x, output_hidden_states=True)
    with torch.inference_mode():
        inference = ours(x).logits
    for i, (a, b) in enumerate(zip(chunked.hidden_states, plain.hidden_states)):
        assert_close(a, b.detach(), atol=1e-5, name=f"hidden_states[{i}]")
    assert_close(chunked.logits, plain.logits.detach(), atol=1e-5, name="logits")
    assert torch.equal(inference, chunked.logits)


def test_eval_cache_is_not_lowered_by_autocast():
    _, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ours(x).logits
        ours.clear_caches()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours(x)  # fills the caches under autocast
        assert _first_attention(ours).position_bias().dtype == torch.float32
        assert torch.equal(ours(x).logits, expected)


def test_training_after_inference_mode_on_a_new_grid():
    """Index tables cached by a first call under inference_mode must still serve a later training step."""
    from swinv2_fast.kernels import reference

    reference.clear_caches()  # whatever earlier tests cached: this grid's layouts are built here
    config = swinv2_fast.Swinv2Config(**CONFIGS["w8"])
    model = swinv2_fast.Swinv2ForImageClassification(config)
    x = torch.randn(1, 3, 72, 40)
    with torch.inference_mode():
        model.eval()(x)
    assert len(reference._layouts) > 0, "the first call cached no layout"
    loss, grads = train_step(model, x, torch.tensor([1]))
    assert torch.isfinite(loss) and grads
