"""Partial fine-tuning through the fused op: any subset of its inputs may need gradients (frozen logit scale
and position-bias MLP, frozen biases, frozen q/k/v weights, adapters), on the op itself, on swinv2_fast
models, on patched transformers models and on patched timm models, each against the eager path's gradients
on identical weights, with the kernels proven to run."""

import copy
import itertools

import pytest
import torch

import swinv2_fast

from _utils import (
    KERNEL_DEVICE,
    LOW_PRECISION_FACTOR,
    OP_GRAD_FP32_RTOL,
    assert_grads_close,
    backward_launches,
    count_launches,
    forward_launches,
    perturb_,
    sum_grad_fp32_rtol,
)

pytestmark = pytest.mark.kernels  # the kernels must run here (conftest: skip, or fail in CI, where they cannot)
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.models import swin_transformer_v2 as timm_swin  # noqa: E402

NAMES = ("qkv", "qkv_bias", "logit_scale", "position_bias")
# a 6x5 grid in windows of 4 shifted by 2: padding (so the q/k/v bias is read), the shift mask, 2x2 windows
GRID, WINDOW, SHIFT, HEADS, HEAD_DIM, BATCH = (6, 5), 4, 2, 2, 16, 2
OP_KWARGS = dict(grid_size=GRID, num_heads=HEADS, window_size=WINDOW, shift_size=SHIFT)


def _op_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    C = HEADS * HEAD_DIM
    n = WINDOW * WINDOW
    qkv = torch.randn(BATCH, GRID[0] * GRID[1], 3 * C, generator=gen)
    qkv_bias = torch.cat([torch.randn(C, generator=gen), torch.zeros(C), torch.randn(C, generator=gen)])
    logit_scale = torch.log(torch.tensor([10.0, 30.0])).view(HEADS, 1, 1)
    table = 16 * torch.sigmoid(torch.randn(HEADS, n, n, generator=gen))
    return [t.to(KERNEL_DEVICE, dtype) for t in (qkv, qkv_bias, logit_scale, table)]


def _grads(implementation, inputs, needs, grad_out):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    out = swinv2_fast.window_attention(*leaves, implementation=implementation, **OP_KWARGS)
    wanted = [t for t in leaves if t.requires_grad]
    found = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return [next(found) if need else None for need in needs]


SUBSETS = [needs for needs in itertools.product([False, True], repeat=4) if any(needs)]


# one input needing a gradient, and all of them, in the quick run; the other ten subsets in the slow part
@pytest.mark.parametrize(
    "needs",
    [needs if sum(needs) in (1, 4) else pytest.param(needs, marks=pytest.mark.slow) for needs in SUBSETS],
    ids=lambda needs: "+".join(n for n, x in zip(NAMES, needs) if x),
)
def test_every_subset_of_inputs_needing_gradients(needs):
    """Only the asked-for gradients: each against fp64 no further off than the eager reference in fp32
    (LOW_PRECISION_FACTOR times its error plus the sum-aware floor); the table/scale kernel runs only when
    the scale or the table trains, the dq kernel only when the q/k/v activation does."""
    inputs = _op_inputs()
    grad_out = torch.randn(BATCH, GRID[0] * GRID[1], HEADS * HEAD_DIM, device=KERNEL_DEVICE)
    with count_launches() as launches:
        fused = _grads("triton", inputs, needs, grad_out)
    eager = _grads("eager", inputs, needs, grad_out)
    exact = _grads("eager", [t.double() for t in inputs], needs, grad_out.double())
    windows = -(-GRID[0] // WINDOW) * -(-GRID[1] // WINDOW)
    n = WINDOW * WINDOW
    floors = [
        OP_GRAD_FP32_RTOL,
        sum_grad_fp32_rtol(BATCH * windows * n),
        sum_grad_fp32_rtol(BATCH * windows * n * n),
        sum_grad_fp32_rtol(BATCH * windows),
    ]
    for name, need, f, e, x, floor in zip(NAMES, needs, fused, eager, exact, floors):
        if not need:
            assert f is None, name
            continue
        assert f is not None and f.shape == x.shape and f.dtype == e.dtype, name
        scale = max(x.abs().max().item(), 1e-30)
        fused_error = (f.double() - x).abs().max().item() / scale
        eager_error = (e.double() - x).abs().max().item() / scale
        assert fused_error <= LOW_PRECISION_FACTOR * eager_error + floor, (name, fused_error, eager_error)
    # each kernel twice: the windows off the shifted border, then the border windows
    assert forward_launches(launches) == 2
    assert launches["_window_attention_bwd_stats_kernel"] == 2
    assert launches["_window_attention_bwd_dq_kernel"] == 2 * int(needs[0])
    assert launches["_window_attention_bwd_dkdv_kernel"] == 2 * int(needs[0] or needs[1])
    assert launches["_window_attention_bwd_dbias_kernel"] == 2 * int(needs[2] or needs[3])


@pytest.mark.slow
@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, False, True, True), (False, True, False, True)],
    ids=["qkv", "scale+table", "bias+table"],
)
def test_opcheck_with_frozen_inputs(needs):
    """torch.library.opcheck of the op (schema, fake implementation, autograd registration, AOT dispatch
    with the backward) and of its backward op, with some inputs frozen: no two outputs alias each other or
    an input, and the fake implementation gives the real outputs' shapes and dtypes."""
    inputs = _op_inputs()
    args = [t.clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    options = (list(GRID), HEADS, [WINDOW] * 2, [SHIFT] * 2, "pad_then_roll", -200.0)
    torch.library.opcheck(torch.ops.swinv2_fast.window_attention_fused, (*args, *options))
    grad_out = torch.randn(BATCH, GRID[0] * GRID[1], HEADS * HEAD_DIM, device=KERNEL_DEVICE)
    flags = (needs[0], needs[1], needs[2] or needs[3])
    torch.library.opcheck(torch.ops.swinv2_fast.window_attention_fused_backward, (grad_out, *inputs, *options, *flags))
    outputs = torch.ops.swinv2_fast.window_attention_fused_backward(grad_out, *inputs, *options, *flags)
    storages = [t.untyped_storage() for t in outputs]
    assert all(
        (a is not b and a.data_ptr() != b.data_ptr()) or a.nbytes() == 0 for a, b in itertools.combinations(storages, 2)
    )
    for t, asked in zip(outputs, (flags[0], flags[1], flags[2], flags[2])):
        assert (t.numel() > 0) == asked


# ------------------------------------------------------------------------------------------- models
# one stage of two blocks (the second shifted) on a 9x7 token grid: every window layout is padded
SIZE = (36, 28)
HF_CONFIG = dict(
    image_size=36,
    patch_size=4,
    window_size=4,
    embed_dim=32,
    depths=[2],
    num_heads=[2],
    drop_path_rate=0.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=3,
)
TIMM_CONFIG = dict(
    img_size=SIZE,
    strict_img_size=False,
    patch_size=4,
    window_size=4,
    embed_dim=32,
    depths=(2,),
    num_heads=(2,),
    drop_path_rate=0.0,
    num_classes=3,
)


def _ours():
    config = swinv2_fast.Swinv2Config(**HF_CONFIG)
    model = perturb_(swinv2_fast.Swinv2ForImageClassification(config), seed=3)
    return model.set_attn_implementation("eager"), copy.deepcopy(model).set_attn_implementation("triton")


def _transformers():
    model = perturb_(transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**HF_CONFIG)), seed=3)
    return model, swinv2_fast.patch(copy.deepcopy(model), "triton")


def _timm():
    model = perturb_(timm_swin.SwinTransformerV2(**TIMM_CONFIG), seed=3)
    return model, swinv2_fast.patch(copy.deepcopy(model), "triton")


FAMILIES = {"swinv2_fast": _ours, "transformers": _transformers, "timm": _timm}
# swinv2_fast's models in the quick run; the patched transformers and timm models (15 s to 100 s each on 2
# cores) in the slow part
FAMILY_PARAMS = [
    family if family == "swinv2_fast" else pytest.param(family, marks=pytest.mark.slow) for family in FAMILIES
]


def _frozen_scale_and_cpb(name):
    return "logit_scale" in name or "continuous_position_bias_mlp" in name or "cpb_mlp" in name


def _query_value(name):
    return any(part in name for part in (".query.", ".value.", "attn.qkv.", "q_bias", "v_bias"))


# which parameters train in each scenario (everything else is frozen with requires_grad_(False))
SCENARIOS = {
    "scale-and-cpb-frozen": lambda name: not _frozen_scale_and_cpb(name),
    "head-only": lambda name: name.startswith(("classifier.", "head.")),
    "attention-frozen-but-query-value": lambda name: _query_value(name),
    "biases-frozen": lambda name: not name.endswith(("bias", "_bias")),
}


def _step(model, x, labels):
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach()


def _compare_training(eager, fused, family):
    x = torch.randn(1, 3, *SIZE, device=KERNEL_DEVICE)
    labels = torch.tensor([2], device=KERNEL_DEVICE)
    _step(eager, x, labels)
    with count_launches() as launches:
        _step(fused, x, labels)
    trained = {name: p for name, p in fused.named_parameters() if p.requires_grad}
    assert trained, "the scenario froze everything"
    reference = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        expected = reference[name].grad
        if not p.requires_grad:
            assert p.grad is None and expected is None, name
            continue
        assert p.grad is not None and expected is not None, name
    assert_grads_close(
        {name: p.grad for name, p in trained.items()},
        {name: reference[name].grad for name in trained},
        prefix=f"{family} ",
    )
    assert forward_launches(launches) > 0
    return launches


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_partial_fine_tuning_matches_eager(family, scenario):
    eager, fused = FAMILIES[family]()
    eager.to(KERNEL_DEVICE).train()
    fused.to(KERNEL_DEVICE).train()
    trains = SCENARIOS[scenario]
    for model in (eager, fused):
        for name, p in model.named_parameters():
            p.requires_grad_(trains(name))
    launches = _compare_training(eager, fused, family)
    # the fused backward ran wherever something at or before the attention trains; with the head alone,
    # nothing upstream needs a gradient and autograd never calls the op's backward
    if scenario == "head-only":
        assert backward_launches(launches) == 0
    else:
        assert launches["_window_attention_bwd_stats_kernel"] > 0
    if scenario == "scale-and-cpb-frozen":
        assert launches["_window_attention_bwd_dbias_kernel"] == 0  # nothing allocated or run for them


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_peft_lora_on_query_value(family):
    """A real PEFT LoRA adapter: the base model frozen, the adapters train with the eager path's gradients.
    On query/value for transformers' layout; timm's SwinTransformerV2 reads `qkv.weight` directly (F.linear),
    so an adapter on `qkv` never runs in timm itself, patched or not: there the adapters go on the attention's
    output projection and the MLP, upstream of the next block's attention."""
    peft = pytest.importorskip("peft")
    eager, fused = FAMILIES[family]()
    targets = ["attn.proj", "mlp.fc1"] if family == "timm" else ["query", "value"]
    models = []
    for model in (eager, fused):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
        torch.manual_seed(7)  # identical adapter weights on both sides
        models.append(peft.inject_adapter_in_model(config, model).to(KERNEL_DEVICE).train())
    for model in models:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    launches = _compare_training(*models, family)
    assert launches["_window_attention_bwd_dq_kernel"] > 0
    assert launches["_window_attention_bwd_dbias_kernel"] == 0
    lora = [p for name, p in models[1].named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
