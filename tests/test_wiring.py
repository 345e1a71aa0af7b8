"""Wiring: every config field the models read reaches its place (and not a neighbour's), the mask value each
library's semantics asks for reaches the op, and patch() routes through the implementation it was given,
also when patched again with another one."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import swinv2_fast
import swinv2_fast.modeling as modeling
from swinv2_fast.attention import continuous_position_bias

from _utils import FP32_ATOL, KERNEL_DEVICE, assert_close, count_launches, forward_launches, perturb_

# Every neighbour differs from every other, so a field read from a neighbour shows: the two dropout
# probabilities, the stochastic-depth rate, and the norm epsilon all have distinct, non-default values.
BASE = dict(
    image_size=32,
    patch_size=4,
    window_size=4,
    embed_dim=16,
    depths=[2, 2],
    num_heads=[1, 2],
    hidden_dropout_prob=0.0625,
    attention_probs_dropout_prob=0.125,
    drop_path_rate=0.1875,
    layer_norm_eps=2e-5,
    mlp_ratio=4.0,
    qkv_bias=True,
    hidden_act="gelu",
    use_absolute_embeddings=False,
    pretrained_window_sizes=[0, 0],
    num_labels=3,
)
FIELDS = {
    "attention_probs_dropout_prob": 0.375,
    "hidden_dropout_prob": 0.25,
    "drop_path_rate": 0.4375,
    "layer_norm_eps": 0.05,  # large enough to change the outputs, not only the attribute
    "qkv_bias": False,
    "mlp_ratio": 2.5,
    "pretrained_window_sizes": [6, 3],
    "hidden_act": "relu",
    # (use_absolute_embeddings is left out: transformers 5.18 sizes the table num_patches + 1 and then fails to
    # add it to num_patches tokens, so no parity is possible)
    "patch_size": 2,
    "window_size": 3,
}


def _pair(**overrides):
    config = dict(BASE, **overrides)
    hf = perturb_(transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**config)))
    ours = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**config))
    ours.load_state_dict(hf.state_dict())  # strict: every parameter's shape must agree
    return hf, ours


def _hyperparameters(module):
    """What a config field can set on a module, by kind."""
    found = {}
    if isinstance(module, torch.nn.Dropout):
        found["p"] = module.p
    if isinstance(module, torch.nn.LayerNorm):
        found["eps"], found["shape"] = module.eps, tuple(module.normalized_shape)
    if isinstance(module, torch.nn.Linear):
        found["linear"] = (module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, torch.nn.Conv2d):
        found["conv"] = (module.in_channels, module.out_channels, module.kernel_size, module.stride)
    if hasattr(module, "drop_prob"):
        found["drop_prob"] = float(module.drop_prob)
    for name in ("window_size", "shift_size", "pretrained_window_size"):
        if isinstance(getattr(module, name, None), (int, tuple, list)):
            value = getattr(module, name)
            found[name] = (value, value) if isinstance(value, int) else tuple(value)
    for name in ("relative_coords_table", "relative_position_index"):
        if isinstance(getattr(module, name, None), torch.Tensor):
            found[name] = getattr(module, name)
    return found


@pytest.mark.parametrize("field", list(FIELDS))
def test_config_field_reaches_its_place(field):
    """Module by module (same names as transformers), every hyperparameter a config field sets equals
    transformers' for the same config; then the eval outputs agree (activation, eps, ratios, tables)."""
    hf, ours = _pair(**{field: FIELDS[field]})
    theirs = dict(hf.named_modules())
    compared = 0
    for name, module in ours.named_modules():
        if name not in theirs:
            continue
        mine, expected = _hyperparameters(module), _hyperparameters(theirs[name])
        for key in expected:
            assert key in mine, f"{name}: transformers has {key}, ours does not"
            a, b = mine[key], expected[key]
            same = torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b
            assert same, f"{field}: {name}.{key} = {a} where transformers has {b}"
            compared += 1
    assert compared > 50, compared
    x = torch.randn(2, 3, 36, 28)  # a padded grid
    with torch.no_grad():
        assert_close(ours.eval()(x).logits, hf.eval()(x).logits, atol=FP32_ATOL, name=f"logits with {field}")


@pytest.mark.parametrize("field", ["attention_probs_dropout_prob", "hidden_dropout_prob"])
def test_dropout_probabilities_reach_the_op_and_the_layers(field, monkeypatch):
    """In training the attention op gets attention_probs_dropout_prob as its dropout_p (the eager path, by
    design); the block's other dropouts are hidden_dropout_prob's or attention_probs_dropout_prob's where
    transformers puts them (checked module by module above); in eval the op gets 0."""
    _, ours = _pair(**{field: FIELDS[field]})
    seen = []
    original = modeling.window_attention
    monkeypatch.setattr(
        modeling,
        "window_attention",
        lambda *args, **kwargs: seen.append(kwargs["dropout_p"]) or original(*args, **kwargs),
    )
    x = torch.randn(1, 3, 32, 32)
    ours.train()(x)
    expected = dict(BASE, **{field: FIELDS[field]})["attention_probs_dropout_prob"]
    assert seen and set(seen) == {expected}, (seen, expected)
    seen.clear()
    with torch.no_grad():
        ours.eval()(x)
    assert seen and set(seen) == {0.0}


def test_drop_path_rates_follow_the_depth():
    """Stochastic depth grows linearly over all blocks to drop_path_rate, as in transformers."""
    _, ours = _pair(drop_path_rate=0.3)
    rates = [
        float(getattr(block.drop_path, "drop_prob", 0.0))
        for layer in ours.swinv2.encoder.layers
        for block in layer.blocks
    ]
    expected = torch.linspace(0, 0.3, sum(BASE["depths"])).tolist()
    assert rates == pytest.approx(expected, abs=1e-7)
    assert isinstance(ours.swinv2.encoder.layers[0].blocks[0].drop_path, torch.nn.Identity)  # rate 0


# ------------------------------------------------------------------------------------------- mask value
def _adversarial_block(model_cls=transformers.Swinv2Model):
    """A transformers model whose stage-0 second block (8x8 grid, window 4, shift 2) is set so that the
    shift mask's value decides the output: every q is one unit vector e per head, k = +-e from the sign of
    channel 0 of the input (-e for tokens of shift region (1, 1)), the logit scale at the clamp (100).
    A query of region (1, 1) sees its own region at logit -100 + bias and masked keys at bias + 0 with a
    -100 mask, bias - 100 with -200: the masked keys dominate in one case and not in the other.
    Returns (model, block, hidden_states)."""
    config = transformers.Swinv2Config(
        **dict(
            BASE,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            drop_path_rate=0.0,
            num_heads=[2, 2],
            embed_dim=32,
        )
    )
    model = perturb_(model_cls(config)).eval()
    block = model.encoder.layers[0].blocks[1]
    assert (block.window_size, block.shift_size) == (4, 2)
    attn = block.attention.self
    dim, heads = 32, 2
    head_dim = dim // heads
    e = torch.zeros(dim)
    e[::head_dim] = 1.0  # channel 0 of each head
    with torch.no_grad():
        attn.query.weight.zero_()
        attn.query.bias.copy_(e)
        attn.key.weight.zero_()
        attn.key.weight[:, 0] = e
        attn.logit_scale.fill_(math.log(100) + 1.0)
    shifted = (torch.arange(8) - 2) % 8
    region = (shifted >= 4).long() + (shifted >= 6).long()
    sign = torch.where((region[:, None] == 1) & (region[None, :] == 1), -1.0, 1.0).flatten()
    hidden = torch.randn(2, 64, dim)
    hidden[..., 0] = sign
    return model, block, hidden


def test_the_adversarial_block_tells_the_two_mask_values_apart():
    _, block, hidden = _adversarial_block()
    attn = block.attention.self
    weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
    bias = torch.cat([attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias])
    qkv = F.linear(hidden, weight, bias)
    with torch.no_grad():
        table = continuous_position_bias(
            attn.continuous_position_bias_mlp, attn.relative_coords_table, 2, 16, index=attn.relative_position_index
        )
        outs = [
            swinv2_fast.window_attention(
                qkv,
                bias,
                attn.logit_scale,
                table,
                grid_size=(8, 8),
                num_heads=2,
                window_size=4,
                shift_size=2,
                mask_value=m,
                implementation="eager",
            )
            for m in (-100.0, -200.0)
        ]
    assert (outs[0] - outs[1]).abs().max() > 100 * FP32_ATOL  # far beyond the parity tolerance below


@pytest.mark.parametrize("implementation", ["eager", pytest.param("triton", marks=pytest.mark.kernels)])
def test_our_block_adds_transformers_doubled_mask(implementation):
    hf, block, hidden = _adversarial_block()
    ours = swinv2_fast.Swinv2Model(swinv2_fast.Swinv2Config.from_transformers(hf.config)).eval()
    ours.load_state_dict(hf.state_dict())
    ours.set_attn_implementation(implementation)
    hf, ours, hidden = hf.to(KERNEL_DEVICE), ours.to(KERNEL_DEVICE), hidden.to(KERNEL_DEVICE)
    with torch.no_grad():
        expected = block(hidden, (8, 8))[0]
        actual = ours.encoder.layers[0].blocks[1](hidden, (8, 8))[0]
    assert_close(actual, expected, atol=FP32_ATOL, name="block output, mask -200")


@pytest.mark.parametrize("implementation", ["eager", pytest.param("triton", marks=pytest.mark.kernels)])
def test_patched_transformers_block_adds_the_doubled_mask(implementation):
    hf, block, hidden = _adversarial_block()
    hf, hidden = hf.to(KERNEL_DEVICE), hidden.to(KERNEL_DEVICE)
    with torch.no_grad():
        expected = block(hidden, (8, 8))[0]
        swinv2_fast.patch(hf, implementation)
        actual = block(hidden, (8, 8))[0]
    assert_close(actual, expected, atol=FP32_ATOL, name="patched block output, mask -200")


# ------------------------------------------------------------------------------------ patch and re-patch
def _transformers_model():
    config = transformers.Swinv2Config(
        **dict(BASE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    )
    return perturb_(transformers.Swinv2ForImageClassification(config)).eval()


def _timm_model():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return perturb_(
        SwinTransformerV2(
            img_size=(36, 28),
            strict_img_size=False,
            window_size=4,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(1, 2),
            num_classes=3,
        )
    ).eval()


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.kernels
@pytest.mark.parametrize("make", [_transformers_model, _timm_model], ids=["transformers", "timm"])
def test_patch_again_with_another_implementation(make):
    """patch(model, a) then patch(model, b): b runs (the kernels launch exactly when b is "triton"), the
    outputs stay the library's, and unpatch restores the original code."""
    model = make().to(KERNEL_DEVICE)
    x = torch.randn(2, 3, 36, 28, device=KERNEL_DEVICE)
    with torch.no_grad():
        expected = _logits(model, x)
        for implementation in ("eager", "triton", "eager", "triton"):
            swinv2_fast.patch(model, implementation)
            with count_launches() as launches:
                got = _logits(model, x)
            assert (forward_launches(launches) > 0) == (implementation == "triton"), (implementation, launches)
            assert_close(got, expected, atol=FP32_ATOL, name=f"patched with {implementation}")
        swinv2_fast.unpatch(model)
        with count_launches() as launches:
            assert torch.equal(_logits(model, x), expected)
        assert not launches and not swinv2_fast.is_patched(model)


# ------------------------------------------------------------------------------------------ the installed package
def test_a_built_wheel_holds_the_tree_as_swinv2_fast(tmp_path):
    """pyproject.toml's packaging: a wheel built offline (as on the GPU machine: setuptools and wheel only) holds
    every module of swinv2_fast/ and of kernels/ (as swinv2_fast.kernels, never a top-level `kernels`), the
    kernels' JSON data (a tile sweep's tuned_tiles.json), py.typed, and swinv2_fast.__version__ as its version."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(root, "swinv2_fast"), source / "swinv2_fast", ignore=ignore)
    shutil.copytree(os.path.join(root, "kernels"), source / "kernels", ignore=ignore)
    (source / "kernels" / "tuned_tiles.json").write_text("{}")  # as a GPU tile sweep leaves it
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    def tree(folder, installed_as, suffixes):  # every file of the folder and its subfolders, as installed
        return {
            os.path.join(installed_as, os.path.relpath(os.path.join(where, f), folder)).replace(os.sep, "/")
            for where, _, files in os.walk(folder)
            for f in files
            if f.endswith(suffixes)
        }

    expected = tree(source / "swinv2_fast", "swinv2_fast", (".py", ".typed"))
    expected |= tree(source / "kernels", "swinv2_fast/kernels", (".py", ".json"))
    assert "swinv2_fast/patch/step.py" in expected  # subpackages are walked too
    assert "swinv2_fast/py.typed" in expected and "swinv2_fast/kernels/tuned_tiles.json" in expected
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith("kernels/") for n in names), "kernels/ installed as a top-level package"
    assert wheel.name.startswith(f"swinv2_fast-{swinv2_fast.__version__}-"), wheel.name


def test_the_top_level_name_kernels_never_loads_our_folder():
    """A process whose sys.path starts with the repository root (`python -m ...` or `python -c` run there) finds
    the root's kernels/ folder under the name `kernels`, which Hugging Face's package (imported by transformers
    >= 5.25) also has. Under that name the folder must hand over to the installed package, or be an empty module
    transformers reads as "not installed"; transformers must still build its Swinv2 models there."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = (
        "import sys, kernels, transformers\n"
        f"assert sys.path[0] in ('', {str(root)!r}), sys.path[:2]\n"
        "assert not hasattr(kernels, 'WindowGeometry'), 'our kernels/ folder loaded as kernels'\n"
        f"assert kernels.__file__ is None or not kernels.__file__.startswith({str(root / 'kernels')!r}), "
        "kernels.__file__\n"
        "transformers.Swinv2Model(transformers.Swinv2Config(image_size=32, embed_dim=16, depths=[1], num_heads=[1],"
        " window_size=4))\n"
        "import swinv2_fast.kernels\n"
        "assert hasattr(swinv2_fast.kernels, 'WindowGeometry')\n"
        "print(kernels.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
