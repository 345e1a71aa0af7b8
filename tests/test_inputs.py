"""Bad input raises a clear exception naming the argument, what was expected and what was received."""

import pytest
import torch

import swinv2_fast
from swinv2_fast import window_attention
from swinv2_fast.kernels import WindowGeometry

from _utils import CONFIGS


@pytest.fixture(scope="module")
def model():
    return swinv2_fast.Swinv2ForMaskedImageModeling(swinv2_fast.Swinv2Config(**CONFIGS["w8"], encoder_stride=16)).eval()


@pytest.mark.parametrize(
    "pixel_values,error,pattern",
    [
        (torch.randn(3, 64, 64), ValueError, r"pixel_values must be 4-D .* got shape \(3, 64, 64\)"),
        (torch.randn(1, 1, 64, 64), ValueError, r"pixel_values must have 3 channels .* got shape \(1, 1, 64, 64\)"),
        (
            torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
            TypeError,
            r"pixel_values must be a floating-point .* torch.uint8",
        ),
        ([[1.0]], TypeError, r"pixel_values must be a torch.Tensor, got list"),
        (
            torch.randn(1, 64, 64, 3),
            ValueError,
            r"got shape \(1, 64, 64, 3\); it looks channels-last .* pixel_values\.permute\(0, 3, 1, 2\)",
        ),
        (
            torch.randn(1, 3, 64, 64, dtype=torch.float64),
            TypeError,
            r"pixel_values has dtype torch\.float64 but the model's weights are torch\.float32: pass "
            r"pixel_values\.to\(torch\.float32\)",
        ),
    ],
    ids=["3-D", "channels", "uint8", "list", "channels-last", "float64"],
)
def test_bad_pixel_values(model, pixel_values, error, pattern):
    with pytest.raises(error, match=pattern):
        model(pixel_values)


def test_pixel_values_in_another_dtype_run_under_autocast_and_in_a_converted_model(model):
    """What the dtype check lets through works: a float64 model takes float64, and under autocast a float32
    input reaches a bfloat16 model (autocast casts it; without autocast the check refuses it)."""
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    double = swinv2_fast.Swinv2ForMaskedImageModeling(model.config).double().eval()
    with torch.no_grad():
        assert double(x).reconstruction.dtype == torch.float64
    bf16 = swinv2_fast.Swinv2ForMaskedImageModeling(model.config).to(torch.bfloat16).eval()
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"pixel_values\.to\(torch\.bfloat16\)"):
            bf16(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert bf16(x.float()).reconstruction.shape == (1, 3, 64, 64)


def test_bad_bool_masked_pos(model):
    with pytest.raises(
        ValueError,
        match=r"bool_masked_pos must have a shape broadcastable to \(batch_size, num_patches\) = "
        r"\(2, 256\), got \(2, 255\)",
    ):
        model(torch.randn(2, 3, 64, 64), bool_masked_pos=torch.zeros(2, 255, dtype=torch.bool))


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(embed_dim=10, num_heads=[3, 6, 12]), r"stage 0 has 10 channels .* num_heads\[0\]=3"),
        (dict(window_size=0), r"window_size must be an int >= 1, got 0"),
        (dict(num_heads=[1, 2]), r"num_heads must have one entry per stage \(3 stages"),
        (dict(window_semantics="official"), r"window_semantics must be one of .* got 'official'"),
        (dict(out_features=["stage9"]), r"out_features must be a list of stage names"),
    ],
    ids=["heads-divide", "window-0", "heads-len", "semantics", "out-features"],
)
def test_bad_config(overrides, pattern):
    """A config accepts what transformers' config accepts (some settings it cannot check alone); building a
    model from it raises, naming the field (Swinv2Config.validate)."""
    with pytest.raises(ValueError, match=pattern):
        swinv2_fast.Swinv2Model(swinv2_fast.Swinv2Config(**dict(CONFIGS["w8"], **overrides)))


def test_model_rejects_foreign_config():
    with pytest.raises(TypeError, match=r"config must be a swinv2_fast\.Swinv2Config"):
        swinv2_fast.Swinv2Model({"embed_dim": 16})


def _op_inputs(B=1, grid=(8, 8), heads=2, head_dim=8, window=4):
    C = heads * head_dim
    return dict(
        qkv=torch.randn(B, grid[0] * grid[1], 3 * C),
        qkv_bias=torch.randn(3 * C),
        logit_scale=torch.zeros(heads, 1, 1),
        position_bias=torch.zeros(heads, window * window, window * window),
    ), dict(grid_size=grid, num_heads=heads, window_size=window)


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (lambda t, k: t.update(qkv=t["qkv"][0]), ValueError, r"qkv must be a 3-D tensor"),
        (
            lambda t, k: t.update(qkv=t["qkv"].long()),
            TypeError,
            r"qkv must be a floating-point tensor, got dtype torch.int64",
        ),
        (lambda t, k: k.update(grid_size=(8, 7)), ValueError, r"qkv must have H\*W = 56 tokens .* got 64"),
        (lambda t, k: k.update(num_heads=5), ValueError, r"3 \* num_heads \* head_dim; got 48 with num_heads=5"),
        (lambda t, k: t.update(qkv_bias=torch.zeros(47)), ValueError, r"qkv_bias must have shape \(48,\), got \(47,\)"),
        (
            lambda t, k: t.update(logit_scale=torch.zeros(3)),
            ValueError,
            r"logit_scale must have num_heads = 2 elements",
        ),
        (
            lambda t, k: t.update(position_bias=torch.zeros(2, 15, 16)),
            ValueError,
            r"position_bias must have shape \(num_heads, N, N\) = \(2, 16, 16\), got \(2, 15, 16\)",
        ),
        (lambda t, k: k.update(window_size=0), ValueError, r"window_size must be at least 1, got \(0, 0\)"),
        (lambda t, k: k.update(shift_size=4), ValueError, r"shift_size must lie in \[0, window_size\)"),
        (lambda t, k: k.update(shift_size=-1), ValueError, r"shift_size must lie in \[0, window_size\)"),
        (lambda t, k: k.update(pad_order="pad"), ValueError, r"pad_order must be one of"),
        (
            lambda t, k: k.update(implementation="cuda"),
            ValueError,
            r"implementation must be one of \('auto', 'triton', 'eager'\), got 'cuda'",
        ),
    ],
    ids=[
        "rank",
        "dtype",
        "tokens",
        "heads",
        "bias-shape",
        "scale-shape",
        "table-shape",
        "window",
        "shift-high",
        "shift-negative",
        "pad-order",
        "implementation",
    ],
)
def test_bad_window_attention_inputs(change, error, pattern):
    tensors, kwargs = _op_inputs()
    change(tensors, kwargs)
    with pytest.raises(error, match=pattern):
        window_attention(
            tensors["qkv"], tensors["qkv_bias"], tensors["logit_scale"], tensors["position_bias"], **kwargs
        )


def test_window_attention_takes_a_geometry_or_its_keyword_block():
    """`geometry=` and the keyword block are the same call; both at once, a block without a required size, or
    a geometry of another type raise a TypeError saying which."""
    tensors, kwargs = _op_inputs()
    args = (tensors["qkv"], tensors["qkv_bias"], tensors["logit_scale"], tensors["position_bias"])
    geometry = WindowGeometry.from_args(**kwargs, shift_size=2)
    assert torch.equal(window_attention(*args, geometry=geometry), window_attention(*args, **kwargs, shift_size=2))
    assert not torch.equal(window_attention(*args, geometry=geometry), window_attention(*args, **kwargs))
    with pytest.raises(TypeError, match=r"not both; got geometry and \['grid_size'\]"):
        window_attention(*args, geometry=geometry, grid_size=(8, 8))
    with pytest.raises(TypeError, match=r"num_heads required \(or geometry=WindowGeometry\(...\)\), got None"):
        window_attention(*args, grid_size=(8, 8), window_size=4)
    with pytest.raises(TypeError, match=r"geometry must be a WindowGeometry, got dict"):
        window_attention(*args, geometry=kwargs)
