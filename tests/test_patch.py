"""swinv2_fast.patch / unpatch on transformers and timm models: same outputs, gradients and state dicts."""

import pytest
import torch

import swinv2_fast
from swinv2_fast.kernels import tiles

from _utils import (
    KERNEL_DEVICE,
    assert_patch_matches_unpatched,
    assert_training_step_matches_unpatched,
    output_tensors,
    perturb_,
)

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.models import swin_transformer_v2 as timm_swin  # noqa: E402

HF_CONFIG = dict(
    image_size=36,
    patch_size=4,
    window_size=4,
    embed_dim=16,
    depths=[2, 2],
    num_heads=[1, 2],
    drop_path_rate=0.0,
    num_labels=3,
)
TIMM_CONFIG = dict(
    img_size=(36, 28),
    strict_img_size=False,
    patch_size=4,
    window_size=4,
    embed_dim=16,
    depths=(2, 2),
    num_heads=(1, 2),
    drop_path_rate=0.0,
)
SIZE = (36, 28)  # a 9x7 token grid: every window layout needs padding, and odd blocks shift


def _hf(name):
    config = transformers.Swinv2Config(**HF_CONFIG)
    if name == "Swinv2Backbone":
        config.out_features = ["stage1", "stage2"]
    if name == "Swinv2ForMaskedImageModeling":  # its loss reads image_size; its decoder upsamples by the stride
        config.image_size, config.encoder_stride = 40, 8
    return perturb_(getattr(transformers, name)(config))


def _timm(kind):
    if kind == "features_only":
        model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, features_only=True, **TIMM_CONFIG)
    else:
        model = timm_swin.SwinTransformerV2(num_classes=3 if kind == "head" else 0, **TIMM_CONFIG)
    return perturb_(model)


MODELS = [
    pytest.param(lambda n=n: _hf(n), id=n)
    for n in ("Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling", "Swinv2Backbone")
]
MODELS += [pytest.param(lambda k=k: _timm(k), id=f"timm-{k}") for k in ("head", "headless", "features_only")]


def _run(model, x):
    kwargs = {}
    if isinstance(model, transformers.Swinv2ForMaskedImageModeling):
        # SimMIM's decoder wants a square image, a multiple of the encoder stride (8 here): 40x40, a 10x10 grid
        x = torch.nn.functional.pad(x, (0, 40 - x.shape[-1], 0, 40 - x.shape[-2]))
        patches = (x.shape[-1] // 4) ** 2
        kwargs["bool_masked_pos"] = (torch.arange(patches, device=x.device) % 3 == 0).expand(x.shape[0], patches)
    return output_tensors(model(x, **kwargs))


# "triton" runs the kernels: the launch proof (conftest) fails the test if a patched model took another path
TRITON = pytest.param("triton", marks=pytest.mark.kernels)
# training through the fused backward under the interpreter is slow; the eager case stays in the quick run
TRITON_TRAINING = pytest.param("triton", marks=(pytest.mark.kernels(backward=True), pytest.mark.slow))


@pytest.mark.parametrize("implementation", [TRITON, "eager"])
@pytest.mark.parametrize("make", MODELS)
def test_patched_matches_unpatched(make, implementation):
    model = make().eval().to(KERNEL_DEVICE)
    assert_patch_matches_unpatched(model, torch.randn(2, 3, *SIZE, device=KERNEL_DEVICE), implementation, run=_run)


def _loss(model, x):
    return sum(t.float().square().mean() for t in _run(model, x))


@pytest.mark.parametrize("implementation", [TRITON_TRAINING, "eager"])
@pytest.mark.parametrize("make", MODELS)
def test_training_step_gradients_match(make, implementation):
    model = make().train().to(KERNEL_DEVICE)
    assert_training_step_matches_unpatched(
        model, torch.randn(2, 3, *SIZE, device=KERNEL_DEVICE), implementation, loss=_loss
    )


def test_checkpoints_move_between_patched_and_unpatched(tmp_path):
    model = _hf("Swinv2ForImageClassification").eval()
    patched = swinv2_fast.patch(_hf("Swinv2ForImageClassification"), "eager").eval()
    patched.load_state_dict(model.state_dict())
    torch.save(patched.state_dict(), tmp_path / "patched.pt")
    fresh = _hf("Swinv2ForImageClassification")
    fresh.load_state_dict(torch.load(tmp_path / "patched.pt"))
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x).logits, model(x).logits)


def test_hooks_on_blocks_still_fire():
    model = swinv2_fast.patch(_timm("head"), "eager")
    calls = []
    model.layers[0].blocks[1].register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(1, 3, *SIZE))
    assert calls == [1]


def test_output_attentions_runs_the_original_chain():
    model = _hf("Swinv2Model").eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        expected = model(x, output_attentions=True).attentions
        swinv2_fast.patch(model, "eager")
        got = model(x, output_attentions=True).attentions
    assert len(got) == len(expected) >= 1 and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_rejects_other_objects_and_unknown_structures():
    with pytest.raises(TypeError, match="transformers Swinv2 model"):
        swinv2_fast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="set_attn_implementation"):
        swinv2_fast.patch(swinv2_fast.Swinv2Model(swinv2_fast.Swinv2Config(**HF_CONFIG)))
    with pytest.raises(ValueError, match="attn_implementation"):
        swinv2_fast.patch(_timm("head"), "fast")
    model = _hf("Swinv2Model")
    del model.encoder.layers[0].blocks[0].attention.self.logit_scale  # a structure the patch does not know
    with pytest.raises(RuntimeError, match=r"attention\.self\.logit_scale.*transformers 5\.17\.0 and 5\.18\.0"):
        swinv2_fast.patch(model)
    assert not swinv2_fast.is_patched(model)  # nothing was half-patched


@pytest.mark.kernels(forward=False)  # a refusal: needs the kernel module, launches nothing
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(tiles, "INTERPRETED", False)
    model = swinv2_fast.patch(_timm("head"), "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        model(torch.randn(1, 3, *SIZE))
