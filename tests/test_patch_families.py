"""swinv2_fast.patch on the other Swin V2 families: timm's SwinTransformerV2Cr (swinv2_cr_*) and transformers'
Swin2SR. Patched == unpatched (outputs, a training step's gradients, state dicts) with the kernels launched
and on the eager path; unpatch restores the library's code; the cases the Cr patch routes to timm's own
chain by design; clear refusals of unknown structures.

Tiny configs (the kernels run under Triton's interpreter on CPU): head_dim 16 or 32, and Swin2SR's published
head dims 10 and 30 (which the kernels run in a masked power-of-two channel tile).
"""

import copy
import re

import pytest
import torch

import swinv2_fast
from swinv2_fast.patch import TESTED_VERSIONS

from _utils import (
    FP32_ATOL,
    KERNEL_DEVICE,
    assert_close,
    assert_patch_matches_unpatched,
    assert_training_step_matches_unpatched,
    count_launches,
    forward_launches,
    output_tensors,
    perturb_,
)

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.models import swin_transformer_v2_cr as timm_cr  # noqa: E402

# ------------------------------------------------------------------------------------------------ timm Cr
# Each: (constructor kwargs, input size). timm chooses every block's window and shift from its feature size.
CR_CONFIGS = {
    # 9x7 then 5x4 grids: windows 4x4 overhang both (padding), odd blocks shift (2, 2), then (2, 0) in
    # timm 1.0.31 (feature size 5x4) or no shift in 1.0.29 (4x3); masks built per call (dynamic)
    "head-nonsquare-padded": (dict(img_size=(36, 28), strict_img_size=False, window_size=4, num_classes=3), (36, 28)),
    # strict size: the precomputed (static) masks; non-square windows 4x3 that divide the 8x6 grid; extra
    # norm after every block (extra_norm_period=1); headless
    "headless-static-mask-extra-norm": (
        dict(img_size=(32, 24), window_size=(4, 3), extra_norm_period=1, num_classes=0),
        (32, 24),
    ),
    # target window 8 on a 9x7 grid: timm takes (8, 7) and shifts only along H (4, 0), padding H to 16;
    # extra norm every second block; head_dim 32
    "window-ratio-clamped": (
        dict(
            img_size=(36, 28),
            strict_img_size=False,
            window_size=8,
            extra_norm_period=2,
            embed_dim=32,
            num_heads=(1, 2),
            depths=(2, 2),
            num_classes=3,
        ),
        (36, 28),
    ),
    # always_partition: 5x5 windows with shift (2, 2) on a 3x4 grid (stage 1) and 2x2 (stage 2): everything
    # padded, windows larger than the grid
    "always-partition": (
        dict(img_size=(12, 16), strict_img_size=False, window_size=5, always_partition=True, num_classes=3),
        (12, 16),
    ),
}
CR_BASE = dict(patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 1), drop_path_rate=0.0)


def _cr(name):
    kwargs, _ = CR_CONFIGS[name]
    return perturb_(timm_cr.SwinTransformerV2Cr(**{**CR_BASE, **kwargs}))


def _cr_features_only():
    return perturb_(
        timm.create_model(
            "swinv2_cr_tiny_224",
            pretrained=False,
            features_only=True,
            img_size=(36, 28),
            strict_img_size=False,
            **{**CR_BASE, "window_size": 4},
        )
    )


# --------------------------------------------------------------------------------------------------- Swin2SR
# Swin2SRModel pads the image to window multiples (reflect) and every block runs at the full resolution;
# transformers builds the windows from config.image_size. Input 8x12: a non-square 8x12 grid of 4x4 windows.
SR_BASE = dict(
    image_size=8,
    patch_size=1,
    num_channels=3,
    embed_dim=16,
    depths=[2],
    num_heads=[1],
    window_size=4,
    mlp_ratio=2.0,
    drop_path_rate=0.0,
    upscale=2,
)
SR_CONFIGS = {
    "pixelshuffle": dict(upsampler="pixelshuffle"),
    "pixelshuffle_aux": dict(upsampler="pixelshuffle_aux"),
    # the lightweight model's upsampler (published: embed_dim 60, 6 heads)
    "pixelshuffledirect-lightweight": dict(upsampler="pixelshuffledirect", depths=[2, 2], num_heads=[1, 1]),
    # the real-world model's upsampler (upscale 4 only); head_dim 32, 3conv residual connection
    "nearest+conv": dict(upsampler="nearest+conv", upscale=4, embed_dim=32, resi_connection="3conv"),
    # denoising / JPEG artifacts: no upsampler
    "denoise": dict(upsampler="", upscale=1),
    # config.image_size 6 < window 8: transformers takes 6x6 windows without shift on the 8x16 grid the
    # model pads to window multiples of 8, so every block pads its grid to 12x18
    "windows-not-dividing": dict(upsampler="pixelshuffledirect", image_size=6, window_size=8),
    # the published head dims, shrunk: 10 (lightweight: embed_dim 60, 6 heads) and 30 (embed_dim 180, 6 heads),
    # which the kernels run masked in a 16- and a 32-channel tile
    "head-dim-10-lightweight": dict(upsampler="pixelshuffledirect", embed_dim=20, num_heads=[2]),
    "head-dim-30": dict(upsampler="pixelshuffle", embed_dim=30, num_heads=[1]),
}
SR_SIZE = {"windows-not-dividing": (8, 16)}


def _sr(name, model_class="Swin2SRForImageSuperResolution"):
    config = transformers.Swin2SRConfig(**{**SR_BASE, **SR_CONFIGS[name]})
    return perturb_(getattr(transformers, model_class)(config))


# ------------------------------------------------------------------------------------------------- models
MODELS = [pytest.param(lambda n=n: _cr(n), CR_CONFIGS[n][1], id=f"cr-{n}") for n in CR_CONFIGS]
MODELS.append(pytest.param(_cr_features_only, (36, 28), id="cr-features_only"))
MODELS += [pytest.param(lambda n=n: _sr(n), SR_SIZE.get(n, (8, 12)), id=f"sr-{n}") for n in SR_CONFIGS]
MODELS.append(pytest.param(lambda: _sr("pixelshuffle", "Swin2SRModel"), (8, 12), id="sr-Swin2SRModel"))

TRITON = pytest.param("triton", marks=pytest.mark.kernels)
# training through the fused backward under the interpreter is slow; the eager case stays in the quick run
TRITON_TRAINING = pytest.param("triton", marks=(pytest.mark.kernels(backward=True), pytest.mark.slow))


def _run(model, x):
    return output_tensors(model(x))


# Batch 2 (windows of several images in one launch, per-image masks) for one model of each family; the
# others batch 1, which halves the interpreter's work.
BATCH_2 = ("cr-head-nonsquare-padded", "sr-pixelshuffle")


@pytest.mark.parametrize("implementation", [TRITON, "eager"])
@pytest.mark.parametrize("make, size", MODELS)
def test_patched_matches_unpatched(make, size, implementation, request):
    model = make().eval().to(KERNEL_DEVICE)
    batch = 2 if request.node.callspec.id.rsplit("-", 1)[0] in BATCH_2 else 1  # id: "<model>-<implementation>"
    assert_patch_matches_unpatched(model, torch.randn(batch, 3, *size, device=KERNEL_DEVICE), implementation)


# Training through the kernels under the interpreter costs 5-30 s a model on a shared 2-core machine
# (conftest's SLOW_TESTS marks every triton case here slow): the eager cases of two configs run in the quick
# part (Cr: padding, shifts, its bias MLP's dropout; Swin2SR at head_dim 10), the other configs are slow.
_TRAINING_FAST = ("cr-head-nonsquare-padded", "sr-head-dim-10-lightweight")
_TRAINING_SLOW = (
    "cr-window-ratio-clamped",
    "cr-headless-static-mask-extra-norm",
    "sr-pixelshuffle",
    "sr-windows-not-dividing",
    "sr-head-dim-30",
)
TRAINING_MODELS = [m for m in MODELS if m.id in _TRAINING_FAST]
TRAINING_MODELS += [pytest.param(*m.values, id=m.id, marks=pytest.mark.slow) for m in MODELS if m.id in _TRAINING_SLOW]


@pytest.mark.parametrize("implementation", [TRITON_TRAINING, "eager"])
@pytest.mark.parametrize("make, size", TRAINING_MODELS)
def test_training_step_gradients_match(make, size, implementation):
    # the helper seeds both losses alike: timm Cr's position-bias MLP drops 12.5% of its hidden units in
    # training, and the patched step calls that MLP as a module, so both draw the same dropout mask
    model = make().train().to(KERNEL_DEVICE)
    assert_training_step_matches_unpatched(model, torch.randn(1, 3, *size, device=KERNEL_DEVICE), implementation)


def test_cr_bias_mlp_dropout_runs_in_training():
    """The position-bias MLP's dropout is timm's, in the patched model too: two draws differ in training
    (so the equality above compared two runs that both dropped), none in eval."""
    model = swinv2_fast.patch(_cr("head-nonsquare-padded"), "eager").train()
    x = torch.randn(1, 3, 36, 28)
    with torch.no_grad():
        first, second = model(x), model(x)
        assert not torch.equal(first, second)
        model.eval()
        assert torch.equal(model(x), model(x))


def test_cr_attention_dropout_in_training_runs_timms_chain():
    """drop_attn / proj_drop active in training: timm's own _shifted_window_attn (its masks on its window
    layout), so the patched model draws exactly what timm draws, and the kernels do not run."""
    model = perturb_(
        timm_cr.SwinTransformerV2Cr(
            **{**CR_BASE, **CR_CONFIGS["head-nonsquare-padded"][0]}, attn_drop_rate=0.1, proj_drop_rate=0.1
        )
    ).train()
    patched = swinv2_fast.patch(copy.deepcopy(model), "triton")
    x = torch.randn(2, 3, 36, 28)
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    with count_launches() as launches:
        got = patched(x)
    assert torch.equal(got, expected) and not forward_launches(launches)


def test_cr_static_mask_for_another_grid_runs_timms_chain():
    """A shifted block whose precomputed mask covers another grid (a strict-size model's block called
    directly on a 4x12 map; its mask is the 8x6 grid's, with as many windows) adds that mask in timm; the
    patched block runs timm's chain and gives exactly timm's numbers."""
    model = _cr("headless-static-mask-extra-norm").eval()
    block = model.stages[0].blocks[1]
    assert block.shift_size == (2, 1) and not block.dynamic_mask
    x = torch.randn(2, 4, 12, 16)
    with torch.no_grad():
        expected = block(x)
        swinv2_fast.patch(model, "eager")
        assert torch.equal(block(x), expected)


@pytest.mark.parametrize("implementation", ["eager", TRITON])
def test_swin2sr_layer_pads_and_shifts(implementation):
    """Swin2SR's layer on a grid its windows do not divide, shifted: pad then roll, mask added twice (the
    model itself never hands its layers such a grid at the window size it pads to)."""
    model = _sr("pixelshuffle").eval().to(KERNEL_DEVICE)
    layer = model.swin2sr.encoder.stages[0].layers[1]
    assert layer.shift_size == 2 and layer.window_size == 4
    hidden = torch.randn(2, 9 * 7, 16, device=KERNEL_DEVICE)
    with torch.no_grad():
        expected = layer(hidden, (9, 7))[0]
        swinv2_fast.patch(model, implementation)
        with count_launches() as launches:
            got = layer(hidden, (9, 7))[0]
    assert_close(got, expected, atol=FP32_ATOL, name="Swin2SR layer, padded and shifted")
    assert (forward_launches(launches) > 0) == (implementation == "triton")


def test_swin2sr_output_attentions_runs_the_original_chain():
    model = _sr("pixelshuffle", "Swin2SRModel").eval()
    x = torch.randn(1, 3, 8, 12)
    with torch.no_grad():
        expected = model(x, output_attentions=True).attentions
        swinv2_fast.patch(model, "eager")
        got = model(x, output_attentions=True).attentions
    assert len(got) == len(expected) >= 1 and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("make", [lambda: _cr("head-nonsquare-padded"), lambda: _sr("pixelshuffle")], ids=["cr", "sr"])
def test_hooks_on_blocks_and_projections_still_fire(make):
    model = swinv2_fast.patch(make().eval(), "eager")
    calls = []
    if isinstance(model, timm_cr.SwinTransformerV2Cr):
        block, inside = model.stages[0].blocks[1], model.stages[0].blocks[1].attn.proj
        x = torch.randn(1, 3, 36, 28)
    else:
        block = model.swin2sr.encoder.stages[0].layers[1]
        inside = block.attention.output.dense
        x = torch.randn(1, 3, 8, 12)
    block.register_forward_hook(lambda *_: calls.append("block"))
    inside.register_forward_hook(lambda *_: calls.append("projection"))
    with torch.no_grad():
        model(x)
    assert calls == ["projection", "block"]


def test_cr_hooked_qkv_is_called_as_a_module():
    """A hooked (or swapped) qkv layer is called as a module: its hook sees the tokens, and the padded
    positions take its output on a zero token; the outputs stay timm's."""
    model = _cr("head-nonsquare-padded").eval()
    x = torch.randn(1, 3, 36, 28)
    with torch.no_grad():
        expected = model(x)
        seen = []
        model.stages[0].blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        swinv2_fast.patch(model, "eager")
        got = model(x)
    assert_close(got, expected, atol=FP32_ATOL, name="logits with a hooked qkv")
    assert seen[0] == (1, 9 * 7, 48)  # the block's tokens


def test_checkpoints_move_between_patched_and_unpatched(tmp_path):
    for make, x in (
        (lambda: _cr("head-nonsquare-padded"), torch.randn(1, 3, 36, 28)),
        (lambda: _sr("pixelshuffle"), torch.randn(1, 3, 8, 12)),
    ):
        model = make().eval()
        patched = swinv2_fast.patch(make(), "eager").eval()
        assert patched.state_dict().keys() == model.state_dict().keys()
        patched.load_state_dict(model.state_dict())
        torch.save(patched.state_dict(), tmp_path / "patched.pt")
        fresh = make().eval()
        fresh.load_state_dict(torch.load(tmp_path / "patched.pt"))
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(_run(fresh, x), _run(model, x)))


def _versions(library):
    return re.escape(f"{library} {' and '.join(TESTED_VERSIONS[library])}")


def test_rejects_unknown_structures_naming_the_tested_versions():
    with pytest.raises(TypeError, match=r"Swin2SRModel.*SwinTransformerV2Cr"):
        swinv2_fast.patch(torch.nn.Conv2d(3, 3, 1))
    model = _cr("head-nonsquare-padded")
    del model.stages[1].blocks[0].attn.meta_mlp  # a structure the patch does not know
    with pytest.raises(RuntimeError, match=r"SwinTransformerV2CrBlock.*attn\.meta_mlp.*" + _versions("timm")):
        swinv2_fast.patch(model)
    assert not swinv2_fast.is_patched(model)  # nothing was half-patched
    model = _cr("head-nonsquare-padded")
    model.stages[0].blocks[0].window_size = 4  # not the pair timm keeps
    with pytest.raises(RuntimeError, match=r"window_size \(a pair of ints\).*" + _versions("timm")):
        swinv2_fast.patch(model)
    model = _sr("pixelshuffle", "Swin2SRModel")
    del model.encoder.stages[0].layers[1].attention.self.continuous_position_bias_mlp
    with pytest.raises(RuntimeError, match=r"Swin2SRLayer.*continuous_position_bias_mlp.*" + _versions("transformers")):
        swinv2_fast.patch(model)
    assert not swinv2_fast.is_patched(model)


def test_from_timm_refuses_cr_and_names_patch_as_the_route():
    with pytest.raises(TypeError, match=r"SwinTransformerV2Cr.*swinv2_fast\.patch\(model\)"):
        swinv2_fast.from_timm(_cr("head-nonsquare-padded"))
