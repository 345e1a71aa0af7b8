"""The oracle (kernels/naive.py) against transformers' and timm's own blocks, the eager path (kernels/reference.py)
against the oracle, the window geometry's validation, and the bounds of the reference's process-wide caches."""

import dataclasses
import gc
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from swinv2_fast.kernels import (
    PAD_ORDERS,
    PAD_THEN_ROLL,
    ROLL_THEN_PAD,
    WindowGeometry,
    reference,
    shift_mask,
    window_attention_naive,
    window_attention_reference,
    window_layout,
    window_log_sum_exp,
)
from swinv2_fast.kernels.naive import shift_mask_naive

from _utils import (
    FP32_ATOL,
    LOW_PRECISION_FACTOR,
    LOW_PRECISION_FLOOR,
    assert_close,
    make_inputs,
    outputs_and_grads,
    rounding_sensitivity,
)


def random_inputs(B, grid, heads, head_dim, window, dtype=torch.float32, bias=True):
    """The op's inputs (tests/_utils.make_inputs) on the CPU, the logit scale in `dtype` too."""
    qkv, qkv_bias, logit_scale, position_bias = make_inputs(
        B, grid, heads, head_dim, window, dtype=dtype, bias=bias, device="cpu"
    )
    return qkv, qkv_bias, logit_scale.to(dtype), position_bias


CASES = [
    # (B, grid, heads, head_dim, window, shift)
    pytest.param(2, (8, 8), 2, 16, 4, 0, id="B2-8x8-w4-s0"),
    pytest.param(2, (8, 8), 2, 16, 4, 2, id="B2-8x8-w4-s2"),
    pytest.param(1, (7, 7), 3, 8, 7, 0, id="B1-7x7-w7-full"),
    pytest.param(2, (10, 13), 2, 8, 4, 2, id="B2-10x13-w4-s2-padded"),
    pytest.param(1, (9, 9), 1, 32, 8, 4, id="B1-9x9-w8-s4-padded"),
    pytest.param(3, (5, 6), 2, 8, 8, 0, id="B3-5x6-w8-grid-below-window"),
    pytest.param(1, (14, 14), 2, 8, 7, 3, id="B1-14x14-w7-s3"),
    pytest.param(2, (7, 10), 2, 8, (3, 5), (1, 2), id="B2-7x10-w3x5-s1x2-padded"),
    pytest.param(1, (9, 8), 1, 8, (6, 4), (0, 2), id="B1-9x8-w6x4-s0x2-one-axis-shift"),
    pytest.param(1, (8, 9), 1, 8, (4, 6), (2, 0), id="B1-8x9-w4x6-s2x0-one-axis-shift"),
]


@pytest.mark.parametrize("pad_order", PAD_ORDERS)
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", CASES)
def test_reference_matches_the_naive_chain(B, grid, heads, head_dim, window, shift, pad_order):
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(B, grid, heads, head_dim, window)
    kwargs = dict(
        grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order, mask_value=-100.0
    )
    expected, expected_probs = window_attention_naive(
        qkv, qkv_bias, logit_scale, position_bias, return_attention_probs=True, **kwargs
    )
    fused = window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, **kwargs)
    explicit, probs = window_attention_reference(
        qkv, qkv_bias, logit_scale, position_bias, return_attention_probs=True, **kwargs
    )
    geometry = WindowGeometry.from_args(**kwargs)
    from_geometry = window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, geometry=geometry)
    assert_close(fused, expected, atol=FP32_ATOL, name="sdpa branch")
    assert_close(explicit, expected, atol=FP32_ATOL, name="explicit branch")
    assert_close(probs, expected_probs, atol=1e-6, name="probabilities")
    assert torch.equal(from_geometry, fused)


def test_padding_orders_differ_where_they_should():
    """Same inputs, padded shifted grid: the two orders must give different results, in the oracle and in the
    reference (else the parametrized tests above would be testing nothing)."""
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(1, (10, 10), 2, 8, 4)
    kwargs = dict(grid_size=(10, 10), num_heads=2, window_size=4, shift_size=2)
    for attention in (window_attention_naive, window_attention_reference):
        a = attention(qkv, qkv_bias, logit_scale, position_bias, pad_order=PAD_THEN_ROLL, **kwargs)
        b = attention(qkv, qkv_bias, logit_scale, position_bias, pad_order=ROLL_THEN_PAD, **kwargs)
        assert (a - b).abs().max() > 1e-2, attention.__name__


def test_padded_positions_use_the_bias():
    """A padded window's tokens see q = q_bias, k = k_bias, v = v_bias: changing v_bias changes the output
    of real tokens that share a window with padding, and only those."""
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(1, (6, 6), 1, 8, 4)
    kwargs = dict(grid_size=(6, 6), num_heads=1, window_size=4, shift_size=0)
    other_bias = qkv_bias.clone()
    other_bias[16:] += 1.0
    # Only the top-left 4x4 window is free of padding.
    expected = torch.ones(6, 6, dtype=torch.bool)
    expected[:4, :4] = False
    for attention in (window_attention_naive, window_attention_reference):
        base = attention(qkv, qkv_bias, logit_scale, position_bias, **kwargs)
        moved = attention(qkv, other_bias, logit_scale, position_bias, **kwargs)
        changed = ((base - moved).abs().amax(-1) > 1e-6).view(6, 6)
        assert torch.equal(changed, expected), attention.__name__


@pytest.mark.parametrize("pad_order", PAD_ORDERS)
def test_layout_indices_are_inverse(pad_order):
    layout = window_layout((10, 13), 4, 2, pad_order)
    assert layout.padded_size == (12, 16)
    assert layout.gather_index.numel() == layout.num_windows * 16 == 12 * 16
    # every real token appears exactly once; all the rest point at the padding token
    real = layout.gather_index[layout.gather_index < 130]
    assert torch.equal(real.sort().values, torch.arange(130))
    assert torch.equal(layout.gather_index[layout.scatter_index], torch.arange(130))


@pytest.mark.parametrize("window,shift", [(4, 2), ((4, 6), (2, 0)), ((6, 4), (0, 2)), ((3, 5), (1, 2))])
def test_shift_masks_agree(window, shift):
    """The reference's region arithmetic and the oracle's slice assignments give the same mask."""
    geometry = WindowGeometry.from_args((12, 10), 1, window, shift, mask_value=-100.0)
    ours = shift_mask(reference.layout_of(geometry), -100.0, torch.float32)
    assert torch.equal(ours, shift_mask_naive(geometry))


def test_shift_mask_matches_transformers():
    from transformers import Swinv2Config
    from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer

    layer = Swinv2Layer(Swinv2Config(window_size=4), dim=8, input_resolution=(16, 16), num_heads=1, shift_size=2)
    expected = layer.get_attn_mask(12, 16, dtype=torch.float32)
    assert torch.equal(shift_mask(window_layout((12, 16), 4, 2), -100.0, torch.float32), expected)
    geometry = WindowGeometry.from_args((12, 16), 1, 4, 2, PAD_THEN_ROLL, -100.0)
    assert torch.equal(shift_mask_naive(geometry), expected)


def _perturbed(module, scale=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@pytest.mark.parametrize("grid", [(16, 16), (10, 13), (5, 11)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_naive_and_reference_match_transformers_layer(grid):
    """transformers' own layer (pad, then roll, its -100 mask added twice) reduced to its attention: the
    oracle and the reference with PAD_THEN_ROLL and mask -200."""
    from transformers import Swinv2Config
    from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer

    dim, heads = 16, 2
    layer = _perturbed(
        Swinv2Layer(Swinv2Config(window_size=8), dim=dim, input_resolution=(16, 16), num_heads=heads, shift_size=4)
    ).eval()
    # layer(x) = x + attention output: norms removed, MLP zeroed, output projection the identity
    layer.layernorm_before = nn.Identity()
    layer.layernorm_after = nn.Identity()
    attn = layer.attention.self
    with torch.no_grad():
        layer.output.dense.weight.zero_()
        layer.output.dense.bias.zero_()
        layer.attention.output.dense.weight.copy_(torch.eye(dim))
        layer.attention.output.dense.bias.zero_()
        attn.logit_scale.add_(torch.tensor([[[1.0]], [[-0.5]]]))  # heads with different scales
    x = torch.randn(2, grid[0] * grid[1], dim)
    with torch.no_grad():
        expected = layer(x, grid)[0] - x
        qkv = torch.cat([attn.query(x), attn.key(x), attn.value(x)], -1)
        qkv_bias = torch.cat([attn.query.bias, torch.zeros(dim), attn.value.bias])
        table = attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, heads)
        position_bias = 16 * torch.sigmoid(
            table[attn.relative_position_index.view(-1)].view(64, 64, heads).permute(2, 0, 1)
        )
        kwargs = dict(
            grid_size=grid, num_heads=heads, window_size=8, shift_size=4, pad_order=PAD_THEN_ROLL, mask_value=-200.0
        )
        naive = window_attention_naive(qkv, qkv_bias, attn.logit_scale, position_bias, **kwargs)
        eager = window_attention_reference(qkv, qkv_bias, attn.logit_scale, position_bias, **kwargs)
    assert_close(naive, expected, name=f"naive vs transformers layer {grid}")
    assert_close(eager, expected, name=f"reference vs transformers layer {grid}")


@pytest.mark.parametrize("grid", [(16, 16), (10, 13), (5, 11)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_naive_and_reference_match_timm_block(grid):
    """timm's own block (roll, pad, dynamic mask on the padded grid) against the oracle and the reference with
    ROLL_THEN_PAD and mask -100."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    block = _perturbed(
        SwinTransformerV2Block(dim=16, input_resolution=(16, 16), num_heads=2, window_size=8, shift_size=4)
    ).eval()
    block.dynamic_mask = True
    x = torch.randn(2, grid[0], grid[1], 16)
    attn = block.attn
    with torch.no_grad():
        expected = block._attn(x).reshape(2, -1, 16)
        qkv_bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        qkv = F.linear(x.reshape(2, -1, 16), attn.qkv.weight, qkv_bias)
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, 2)
        position_bias = 16 * torch.sigmoid(
            table[attn.relative_position_index.view(-1)].view(64, 64, 2).permute(2, 0, 1)
        )
        kwargs = dict(
            grid_size=grid, num_heads=2, window_size=8, shift_size=4, pad_order=ROLL_THEN_PAD, mask_value=-100.0
        )
        naive = attn.proj(window_attention_naive(qkv, qkv_bias, attn.logit_scale, position_bias, **kwargs))
        eager = attn.proj(window_attention_reference(qkv, qkv_bias, attn.logit_scale, position_bias, **kwargs))
    assert_close(naive, expected, name=f"naive vs timm block {grid}")
    assert_close(eager, expected, name=f"reference vs timm block {grid}")


def _own_rounding(function, inputs, kwargs, dtype):
    """What computing `function` in `dtype` may be off by: LOW_PRECISION_FACTOR times the exact result's
    change when the inputs are rounded to `dtype` (rounding_sensitivity), plus the rounding of the result
    itself (one unit of `dtype` at its largest element)."""
    exact = function(*[None if t is None else t.double() for t in inputs], **kwargs)
    (sensitivity,) = rounding_sensitivity(
        lambda ts: [function(*ts, **kwargs)], list(inputs), dtype, lambda a, b: (a - b).abs().max().item()
    )
    return LOW_PRECISION_FACTOR * sensitivity + torch.finfo(dtype).eps * exact.abs().max().item()


@pytest.mark.parametrize("pad_order", PAD_ORDERS)
def test_log_sum_exp_matches_the_gathered_scores(pad_order):
    """The oracle's log-sum-exp of every window row, in window order, against the same statistic formed from
    the reference's gather indices and region mask (an independent route to the same scores), in fp64; the
    fp32 result within fp32 rounding of it."""
    B, grid, heads, head_dim, window, shift = 2, (10, 7), 2, 8, (4, 3), (2, 1)
    inputs = random_inputs(B, grid, heads, head_dim, window)
    qkv, qkv_bias, logit_scale, position_bias = [t.double() for t in inputs]
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    g = WindowGeometry.from_args(**kwargs)
    layout = reference.layout_of(g)
    tokens = torch.cat([qkv, qkv_bias.expand(B, 1, -1)], 1)[:, layout.gather_index]  # (B, nW * N, 3C)
    windows = tokens.view(B, g.num_windows, g.N, 3, heads, head_dim)
    q = F.normalize(windows[:, :, :, 0], dim=-1).permute(0, 3, 1, 2, 4)  # (B, heads, nW, N, d)
    k = F.normalize(windows[:, :, :, 1], dim=-1).permute(0, 3, 1, 2, 4)
    scale = logit_scale.clamp(max=math.log(100.0)).exp().view(heads, 1, 1, 1)
    scores = (q @ k.transpose(-1, -2)) * scale + position_bias[:, None] + shift_mask(layout, -100.0, torch.float64)
    expected = scores.logsumexp(-1).reshape(B, heads, -1)
    exact = window_log_sum_exp(qkv, qkv_bias, logit_scale, position_bias, **kwargs)
    assert exact.shape == (B, heads, g.num_windows * g.N) and exact.dtype == torch.float64
    assert_close(exact, expected, atol=1e-12, name="log-sum-exp, fp64")
    fp32 = window_log_sum_exp(*inputs, **kwargs)
    assert fp32.dtype == torch.float32
    assert_close(
        fp32.double(),
        expected,
        atol=_own_rounding(window_log_sum_exp, inputs, kwargs, torch.float32),
        name="log-sum-exp, fp32",
    )


# ------------------------------------------------------------------------------------------ the geometry
def test_geometry_derived_sizes_and_op_args():
    g = WindowGeometry.from_args(
        grid_size=(10, 13), num_heads=3, window_size=(4, 6), shift_size=(2, 3), pad_order=ROLL_THEN_PAD, mask_value=-200
    )
    assert (g.grid, g.window, g.shift, g.num_heads, g.mask_value) == ((10, 13), (4, 6), (2, 3), 3, -200.0)
    assert g.padded_size == (12, 18) and g.windows_per_axis == (3, 3) and g.num_windows == 9 and g.N == 24
    assert g.needs_padding and g.shifted and g.num_tokens == 130 and g.roll_shift == (2, 3)
    assert g.as_op_args() == ([10, 13], 3, [4, 6], [2, 3], ROLL_THEN_PAD, -200.0)
    assert WindowGeometry.from_args(*g.as_op_args()) == g
    assert WindowGeometry.from_args(**g.as_kwargs()) == g
    assert hash(g) == hash(WindowGeometry.from_args(**g.as_kwargs()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.num_heads = 4
    assert WindowGeometry.from_args((8, 8), 1, 4).shift == (0, 0)
    assert WindowGeometry.from_args((3, 5), 1, 4, 3, PAD_THEN_ROLL).roll_shift == (3, 3)  # rolls the 4x8 grid
    assert WindowGeometry.from_args((3, 5), 1, 4, 3, ROLL_THEN_PAD).roll_shift == (0, 3)  # rolls the 3x5 grid
    assert g.head_dim(3 * 3 * 8) == 8
    with pytest.raises(ValueError, match=r"3 \* num_heads \* head_dim; got 70 with num_heads=3"):
        g.head_dim(70)


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (dict(grid_size=(8, 0)), ValueError, r"grid_size must be positive, got \(8, 0\)"),
        (dict(grid_size=(8, 8, 1)), TypeError, r"grid_size must be an int or a pair of ints, got \(8, 8, 1\)"),
        (dict(grid_size=(8, True)), TypeError, r"grid_size must be an int or a pair of ints"),
        (dict(window_size=0), ValueError, r"window_size must be at least 1, got \(0, 0\)"),
        (dict(window_size=4.0), TypeError, r"window_size must be an int or a pair of ints, got 4.0"),
        (dict(shift_size=4), ValueError, r"shift_size must lie in \[0, window_size\) = \[0, \(4, 4\)\), got \(4, 4\)"),
        (dict(shift_size=(-1, 0)), ValueError, r"shift_size must lie in .* got \(-1, 0\)"),
        (
            dict(pad_order="pad"),
            ValueError,
            r"pad_order must be one of \('pad_then_roll', 'roll_then_pad'\), got 'pad'",
        ),
        (dict(mask_value=float("-inf")), ValueError, r"mask_value must be a finite real number .* got -inf"),
        (dict(mask_value="-100"), ValueError, r"mask_value must be a finite real number .* got '-100'"),
        (dict(num_heads=2.0), TypeError, r"num_heads must be an int, got float 2.0"),
        (dict(num_heads=0), ValueError, r"num_heads must be at least 1, got 0"),
    ],
    ids=[
        "grid-zero",
        "grid-triple",
        "grid-bool",
        "window-zero",
        "window-float",
        "shift-window",
        "shift-negative",
        "pad-order",
        "mask-inf",
        "mask-str",
        "heads-float",
        "heads-zero",
    ],
)
def test_geometry_validation_names_argument_expected_and_received(change, error, pattern):
    args = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2, pad_order=PAD_THEN_ROLL, mask_value=-100.0)
    with pytest.raises(error, match=pattern):
        WindowGeometry.from_args(**dict(args, **change))


def test_numpy_and_tensor_integers_are_accepted():
    np = pytest.importorskip("numpy")
    g = WindowGeometry.from_args((np.int64(8), np.int32(8)), torch.tensor(2), np.int64(4), 2)
    assert g == WindowGeometry.from_args((8, 8), 2, 4, 2)
    assert all(type(v) is int for v in (*g.grid, *g.window, *g.shift, g.num_heads))


def test_geometry_or_keywords_not_both():
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(1, (8, 8), 2, 8, 4)
    g = WindowGeometry.from_args((8, 8), 2, 4)
    for attention in (window_attention_naive, window_attention_reference):
        with pytest.raises(TypeError, match=r"not both; got geometry and \['shift_size'\]"):
            attention(qkv, qkv_bias, logit_scale, position_bias, geometry=g, shift_size=2)
        with pytest.raises(TypeError, match=r"num_heads required"):
            attention(qkv, qkv_bias, logit_scale, position_bias, grid_size=(8, 8), window_size=4)
        with pytest.raises(TypeError, match=r"geometry must be a WindowGeometry, got dict"):
            attention(qkv, qkv_bias, logit_scale, position_bias, geometry=g.as_kwargs())


# ------------------------------------------------------------------------------------------ the caches
def _live_storages() -> int:
    """Distinct storages of the tensors alive in the process (a view and its base count once: the memory)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len({key for key in map(_storage_key, tensors) if key is not None})


def _storage_key(t: torch.Tensor):
    """The address of a tensor's memory, or None for one that holds none: meta and empty tensors, and tensor
    subclasses such as the fake/functional tensors torch.compile leaves behind in earlier tests (their data
    pointer raises or warns; a subclass holding memory wraps plain tensors, which are counted themselves)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
        return None
    try:
        storage = t.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else None
    except RuntimeError:
        return None


def test_caches_stay_bounded_over_many_geometries():
    """120 distinct grids through the reference with a table autograd does not track (as a model's eval-mode
    table): the layout cache holds at most LAYOUT_CACHE_SIZE layouts, the SDPA-mask cache at most
    SDPA_MASK_CACHE_SIZE masks, and once the tables are freed their masks are freed with them. Counted both
    from the caches and from the storages of every tensor alive in the process."""
    reference.clear_caches()
    before = _live_storages()
    heads, window = 2, 4
    tables = []
    for i in range(120):
        grid = (4 + i % 12, 5 + i // 12)
        qkv, qkv_bias, logit_scale, table = random_inputs(1, grid, heads, 8, window)
        tables.append(table)
        with torch.no_grad():
            window_attention_reference(
                qkv, qkv_bias, logit_scale, table, grid_size=grid, num_heads=heads, window_size=window, shift_size=2
            )
    del qkv, qkv_bias, logit_scale, table
    bound = 3 * reference.LAYOUT_CACHE_SIZE + reference.SDPA_MASK_CACHE_SIZE
    assert len(reference._layouts) == reference.LAYOUT_CACHE_SIZE
    assert len(reference._sdpa_masks) == reference.SDPA_MASK_CACHE_SIZE  # the tables are alive
    assert reference.cached_tensors() <= bound
    assert _live_storages() - before <= bound + len(tables)
    tables.clear()
    gc.collect()
    assert len(reference._sdpa_masks) == 0, "masks outlive their tables"
    assert reference.cached_tensors() <= 3 * reference.LAYOUT_CACHE_SIZE
    assert _live_storages() - before <= 3 * reference.LAYOUT_CACHE_SIZE
    reference.clear_caches()
    assert reference.cached_tensors() == 0


def test_layouts_are_per_device_and_reused():
    reference.clear_caches()
    a = window_layout((10, 10), 4, 2)
    assert window_layout((10, 10), 4, 2) is a
    assert window_layout((10, 10), (4, 4), (2, 2), PAD_THEN_ROLL, "cpu") is a
    assert window_layout((10, 10), 4, 2, ROLL_THEN_PAD) is not a
    meta = window_layout((10, 10), 4, 2, device="meta")
    assert meta.gather_index.device.type == "meta" and a.gather_index.device.type == "cpu"
    assert len(reference._layouts) == 3


def test_sdpa_mask_follows_in_place_changes_and_new_tables():
    heads, n = 2, 16
    qkv = torch.randn(1, 64, 3 * heads * 8)
    logit_scale = torch.zeros(heads, 1, 1)
    table = torch.rand(heads, n, n)
    kwargs = dict(grid_size=(8, 8), num_heads=heads, window_size=4, shift_size=2)
    reference.clear_caches()
    first = window_attention_reference(qkv, None, logit_scale, table, **kwargs)
    assert len(reference._sdpa_masks) == 1
    assert torch.equal(window_attention_reference(qkv, None, logit_scale, table, **kwargs), first)
    table.mul_(3.0)
    changed = window_attention_reference(qkv, None, logit_scale, table, **kwargs)
    fresh = window_attention_reference(qkv, None, logit_scale, table.clone(), **kwargs)
    assert torch.equal(changed, fresh)
    assert not torch.equal(changed, first)
    with torch.no_grad():
        table.data = torch.rand(heads, n, n)  # a new storage, no version bump
    assert torch.equal(
        window_attention_reference(qkv, None, logit_scale, table, **kwargs),
        window_attention_reference(qkv, None, logit_scale, table.clone(), **kwargs),
    )
    trained = table.clone().requires_grad_()
    window_attention_reference(qkv, None, logit_scale, trained, **kwargs)
    assert len(reference._sdpa_masks) == 1, "a table autograd tracks is never cached"


def test_reference_keeps_nothing_under_inference_mode_tables():
    reference.clear_caches()
    with torch.inference_mode():
        qkv, _, logit_scale, table = random_inputs(1, (8, 8), 2, 8, 4)
        window_attention_reference(
            qkv, None, logit_scale, table, grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2
        )
    assert len(reference._sdpa_masks) == 0  # inference tensors have no version counter
    assert len(reference._layouts) == 1
    assert not torch.is_inference(window_layout((8, 8), 4, 2).gather_index)


def test_naive_runs_in_low_precision_without_nan():
    """float16 with a zero k bias: the padded tokens' k is all zeros; normalised in float32 it stays 0, not 0/0."""
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(1, (6, 6), 2, 8, 4, dtype=torch.float16)
    out = window_attention_naive(
        qkv, qkv_bias, logit_scale, position_bias, grid_size=(6, 6), num_heads=2, window_size=4, shift_size=2
    )
    exact = window_attention_naive(
        qkv.double(),
        qkv_bias.double(),
        logit_scale.double(),
        position_bias.double(),
        grid_size=(6, 6),
        num_heads=2,
        window_size=4,
        shift_size=2,
    )
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_close(
        out,
        exact,
        atol=_own_rounding(
            window_attention_naive,
            (qkv, qkv_bias, logit_scale, position_bias),
            dict(grid_size=(6, 6), num_heads=2, window_size=4, shift_size=2),
            torch.float16,
        ),
        name="naive in float16",
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_tensor_modes_neither_fill_nor_read_the_layout_cache():
    """Under a fake-tensor mode (torch.export, shape propagation) the layout is built in that mode for the call
    only; a default device (a torch-function mode too) does not stop caching, and the layout stays on the CPU;
    a layout first built while torch.jit.trace records is a plain tensor, not part of the trace."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    reference.clear_caches()
    with FakeTensorMode():
        fake = window_layout((10, 10), 4, 2)
    assert isinstance(fake.gather_index, FakeTensor) and len(reference._layouts) == 0
    with torch.device("meta"):
        kept = window_layout((10, 10), 4, 2)
    assert type(kept.gather_index) is torch.Tensor and kept.gather_index.device.type == "cpu"
    assert window_layout((10, 10), 4, 2) is kept
    qkv, _, logit_scale, table = random_inputs(1, (6, 6), 2, 8, 4)
    kwargs = dict(grid_size=(6, 6), num_heads=2, window_size=4, shift_size=2)
    traced = torch.jit.trace(lambda x: window_attention_reference(x, None, logit_scale, table, **kwargs), (qkv,))
    layout = window_layout((6, 6), 4, 2)
    assert type(layout.gather_index) is torch.Tensor and not layout.gather_index.requires_grad
    assert_close(
        traced(qkv),
        window_attention_naive(qkv, None, logit_scale, table, **kwargs),
        atol=FP32_ATOL,
        name="traced reference",
    )


# ------------------------------------------------------------------------------------------ SDPA or explicit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
def test_the_cpu_eager_path_takes_sdpa_but_in_bf16_training(monkeypatch, dtype, needs_grad):
    """On a CPU, softmax(S) @ v goes through SDPA but where autograd differentiates a bfloat16 call, where the
    explicit chain is faster (`sdpa_serves`, measured by benchmarks/cpu_attention.py); counted at the SDPA
    call. On a GPU always SDPA."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(reference.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    inputs = [t.requires_grad_(needs_grad) for t in random_inputs(2, (8, 8), 2, 16, 4, dtype=dtype)]
    out = window_attention_reference(*inputs, grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)
    expect_sdpa = not (dtype == torch.bfloat16 and needs_grad)
    assert reference.sdpa_serves(torch.device("cpu"), dtype, needs_grad) is expect_sdpa
    assert reference.sdpa_serves(torch.device("cuda"), dtype, needs_grad)
    assert len(calls) == int(expect_sdpa) and out.dtype == dtype


BF16_CASES = [CASES[1], CASES[3], CASES[6], pytest.param(2, (16, 16), 3, 32, 8, 4, id="B2-16x16-h3d32-w8s4")]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=["table-fp32", "table-bf16"])
@pytest.mark.parametrize("pad_order", PAD_ORDERS)
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", BF16_CASES)
def test_bf16_on_a_cpu_is_as_accurate_as_the_peers_chain(
    B, grid, heads, head_dim, window, shift, pad_order, table_dtype, seed
):
    """bf16 on a CPU (SDPA in inference, the explicit chain in training): the output and every gradient,
    measured against fp64, within LOW_PRECISION_FACTOR times PyTorch's own bf16 error plus the floor.
    PyTorch's own error is that of the chain transformers and timm run (kernels/naive.py, their steps
    literally) in bf16, or the problem's sensitivity to rounding its bf16 inputs where that is larger (one
    sample of rounding can be lucky: tests/_utils.py, ROUNDING_DRAWS). The table in fp32 (as under
    autocast, with an fp32 logit scale) or bf16 (a bf16 model's, scale included)."""
    qkv, qkv_bias, logit_scale, position_bias = make_inputs(
        B, grid, heads, head_dim, window, dtype=torch.bfloat16, table_dtype=table_dtype, device="cpu", seed=seed
    )
    inputs = [qkv, qkv_bias, logit_scale.to(table_dtype), position_bias]
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order)
    gen = torch.Generator().manual_seed(seed + 7)
    grad_out = torch.randn(B, grid[0] * grid[1], heads * head_dim, generator=gen)

    def run(function, tensors, grad=None):
        leaves = [t.detach().clone().requires_grad_(grad is not None) for t in tensors]
        out = function(*leaves, **kwargs)
        if grad is None:
            return [out]
        out.backward(grad.to(out.dtype))
        return [out] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]

    def relative(a, x):
        return (a.double() - x).abs().max().item() / max(x.abs().max().item(), 1e-30)

    for grad in (None, grad_out):
        exact = run(window_attention_naive, [t.double() for t in inputs], grad)
        peers, ours = run(window_attention_naive, inputs, grad), run(window_attention_reference, inputs, grad)
        sensitivity = rounding_sensitivity(
            lambda ts, grad=grad: run(window_attention_naive, ts, grad), inputs, torch.bfloat16, relative, seed=seed
        )
        for name, o, p, x, sens in zip(
            ["output", "qkv", "qkv_bias", "logit_scale", "table"], ours, peers, exact, sensitivity
        ):
            if not x.abs().max().item():  # the bias is read only where the grid is padded
                continue
            own = max(relative(p, x), sens)
            assert relative(o, x) <= LOW_PRECISION_FACTOR * own + LOW_PRECISION_FLOOR, (
                name,
                grad is not None,
                relative(o, x),
                relative(p, x),
                sens,
            )


def test_per_sample_gradients_and_forward_mode_through_the_eager_path():
    """torch.func over the eager path with the permutation gather (an unpadded grid): per-sample gradients
    (vmap of grad) equal each sample's own gradient, and forward-mode AD (jvp) equals autograd's
    directional derivative."""
    from torch import func

    inputs = random_inputs(3, (8, 8), 2, 16, 4)
    qkv, rest = inputs[0], inputs[1:]
    kwargs = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)

    def loss(x):
        return window_attention_reference(x.unsqueeze(0), *rest, **kwargs).square().sum()

    per_sample = func.vmap(func.grad(loss))(qkv)
    for i in range(qkv.shape[0]):
        x = qkv[i : i + 1].clone().requires_grad_()
        (expected,) = torch.autograd.grad(window_attention_reference(x, *rest, **kwargs).square().sum(), x)
        assert_close(per_sample[i], expected[0], atol=FP32_ATOL, name=f"sample {i}")
    # forward mode through the explicit chain (SDPA's CPU kernel has no forward-mode formula of its own)
    kwargs["fused_softmax"] = False
    # on a tensor that also requires grad, as in a training step (the permutation's own jvp then runs)
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(qkv)
    x = qkv.clone().requires_grad_()
    with fwAD.dual_level():
        forward_mode = fwAD.unpack_dual(window_attention_reference(fwAD.make_dual(x, tangent), *rest, **kwargs)).tangent
    out = window_attention_reference(x, *rest, **kwargs)
    (reverse,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=False)
    assert_close((forward_mode).sum(), (reverse * tangent).sum(), atol=1e-3, name="jvp against vjp")


def test_the_permutation_backward_equals_autograds(monkeypatch):
    """Without padding the gather into windows and the scatter back are permutations, differentiated by the
    inverse gather (`_PermuteRows`); every gradient bit for bit what autograd's index_select backward
    (index_add_ into zeros) gives, and the Function is used only where the grid is not padded."""
    used = []
    permute = reference._PermuteRows.apply
    monkeypatch.setattr(reference._PermuteRows, "apply", lambda *a: used.append(1) or permute(*a))
    grad_out = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(2))
    inputs = random_inputs(2, (8, 8), 2, 16, 4)
    kwargs = dict(grid_size=(8, 8), num_heads=2, window_size=4, shift_size=2)
    _, fast = outputs_and_grads("eager", inputs, grad_out, **kwargs)
    assert len(used) == 2  # the gather and the scatter
    monkeypatch.setattr(reference._PermuteRows, "apply", lambda x, dim, index, inverse: x.index_select(dim, index))
    _, plain = outputs_and_grads("eager", inputs, grad_out, **kwargs)
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)
    used.clear()
    monkeypatch.setattr(reference._PermuteRows, "apply", lambda *a: used.append(1) or permute(*a))
    padded = random_inputs(1, (9, 9), 1, 32, 8)
    outputs_and_grads("eager", padded, torch.randn(1, 81, 32), grid_size=(9, 9), num_heads=1, window_size=8)
    assert used == []
