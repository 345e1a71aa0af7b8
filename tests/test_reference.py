"""The window-attention contract (kernels/reference.py) against literal re-statements and against timm's block."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FP32_ATOL, assert_close
from swinv2_fast.kernels import (
    PAD_THEN_ROLL,
    ROLL_THEN_PAD,
    shift_mask,
    window_attention_reference,
    window_layout,
)


def literal_window_attention(qkv, qkv_bias, logit_scale, position_bias, grid, heads, window, shift, pad_order,
                             mask_value):
    """The chain as the public codebases write it: F.pad, torch.roll, view/permute partition, explicit
    softmax, reverse, roll back, crop. Square windows only. Independent of the gather indices."""
    B, L, C3 = qkv.shape
    H, W = grid
    C = C3 // 3
    d = C // heads
    ws, s = window, shift
    x = qkv.view(B, H, W, C3)
    pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
    bias = torch.zeros(C3, dtype=qkv.dtype) if qkv_bias is None else qkv_bias

    def pad(t):
        # Padded tokens are the projection of a zero input: the bias.
        out = bias.view(1, 1, 1, C3).expand(B, t.shape[1] + pad_b, t.shape[2] + pad_r, C3).clone()
        out[:, : t.shape[1], : t.shape[2]] = t
        return out

    if pad_order == PAD_THEN_ROLL:
        x = torch.roll(pad(x), (-s, -s), (1, 2))
    else:
        x = pad(torch.roll(x, (-s, -s), (1, 2)))
    Hp, Wp = x.shape[1:3]
    win = x.view(B, Hp // ws, ws, Wp // ws, ws, C3).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, 3, heads, d)
    q, k, v = win.permute(2, 0, 3, 1, 4).unbind(0)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(logit_scale.view(heads, 1, 1), max=math.log(100.0)).exp() + position_bias
    if s > 0:
        img = torch.zeros(Hp, Wp)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[hs, wsl] = cnt
                cnt += 1
        mw = img.view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        mask = (mw[:, None, :] != mw[:, :, None]).float() * mask_value
        nW = mask.shape[0]
        attn = (attn.view(B, nW, heads, ws * ws, ws * ws) + mask[None, :, None]).view_as(attn)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, Hp // ws, Wp // ws, ws, ws, C)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if pad_order == PAD_THEN_ROLL:
        out = torch.roll(out, (s, s), (1, 2))[:, :H, :W]
    else:
        out = torch.roll(out[:, :H, :W], (s, s), (1, 2))
    return out.reshape(B, H * W, C)


def random_inputs(B, grid, heads, head_dim, window, dtype=torch.float32, bias=True):
    C = heads * head_dim
    N = window * window
    qkv = torch.randn(B, grid[0] * grid[1], 3 * C, dtype=dtype)
    qkv_bias = torch.randn(3 * C, dtype=dtype) if bias else None
    if qkv_bias is not None:
        qkv_bias[C : 2 * C] = 0  # k has no bias in every published model
    logit_scale = torch.log(10 * torch.ones(heads, 1, 1)) + 0.5 * torch.randn(heads, 1, 1)
    position_bias = 16 * torch.sigmoid(torch.randn(heads, N, N))
    return qkv, qkv_bias, logit_scale.to(dtype), position_bias.to(dtype)


CASES = [
    # (B, grid, heads, head_dim, window, shift)
    pytest.param(2, (8, 8), 2, 16, 4, 0, id="B2-8x8-w4-s0"),
    pytest.param(2, (8, 8), 2, 16, 4, 2, id="B2-8x8-w4-s2"),
    pytest.param(1, (7, 7), 3, 8, 7, 0, id="B1-7x7-w7-full"),
    pytest.param(2, (10, 13), 2, 8, 4, 2, id="B2-10x13-w4-s2-padded"),
    pytest.param(1, (9, 9), 1, 32, 8, 4, id="B1-9x9-w8-s4-padded"),
    pytest.param(3, (5, 6), 2, 8, 8, 0, id="B3-5x6-w8-grid-below-window"),
    pytest.param(1, (14, 14), 2, 8, 7, 3, id="B1-14x14-w7-s3"),
]


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", CASES)
def test_reference_matches_literal_chain(B, grid, heads, head_dim, window, shift, pad_order):
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(B, grid, heads, head_dim, window)
    kwargs = dict(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift, pad_order=pad_order,
                  mask_value=-100.0)
    expected = literal_window_attention(qkv, qkv_bias, logit_scale, position_bias, grid, heads, window, shift,
                                        pad_order, -100.0)
    fused = window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, **kwargs)
    explicit, probs = window_attention_reference(qkv, qkv_bias, logit_scale, position_bias,
                                                 return_attention_probs=True, **kwargs)
    assert_close(fused, expected, atol=FP32_ATOL, name="sdpa branch")
    assert_close(explicit, expected, atol=FP32_ATOL, name="explicit branch")
    assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, name="probability rows")


def test_padding_orders_differ_where_they_should():
    """Same inputs, padded shifted grid: the two orders must give different results (else one test above
    would be testing nothing)."""
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(1, (10, 10), 2, 8, 4)
    kwargs = dict(grid_size=(10, 10), num_heads=2, window_size=4, shift_size=2)
    a = window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, pad_order=PAD_THEN_ROLL, **kwargs)
    b = window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, pad_order=ROLL_THEN_PAD, **kwargs)
    assert (a - b).abs().max() > 1e-2


def test_padded_positions_use_the_bias():
    """A padded window's tokens see q = q_bias, k = k_bias, v = v_bias: changing v_bias changes the output
    of real tokens that share a window with padding, and only those."""
    qkv, qkv_bias, logit_scale, position_bias = random_inputs(1, (6, 6), 1, 8, 4)
    kwargs = dict(grid_size=(6, 6), num_heads=1, window_size=4, shift_size=0)
    base = window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, **kwargs)
    other_bias = qkv_bias.clone()
    other_bias[16:] += 1.0
    moved = window_attention_reference(qkv, other_bias, logit_scale, position_bias, **kwargs)
    changed = ((base - moved).abs().amax(-1) > 1e-6).view(6, 6)
    # Only the top-left 4x4 window is free of padding.
    expected = torch.ones(6, 6, dtype=torch.bool)
    expected[:4, :4] = False
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("pad_order", [PAD_THEN_ROLL, ROLL_THEN_PAD])
def test_layout_indices_are_inverse(pad_order):
    layout = window_layout((10, 13), 4, 2, pad_order)
    assert layout.padded_size == (12, 16)
    assert layout.gather_index.numel() == layout.num_windows * 16 == 12 * 16
    # every real token appears exactly once; all the rest point at the padding token
    real = layout.gather_index[layout.gather_index < 130]
    assert torch.equal(real.sort().values, torch.arange(130))
    assert torch.equal(layout.gather_index[layout.scatter_index], torch.arange(130))


def test_shift_mask_matches_transformers():
    from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer
    from transformers import Swinv2Config

    layer = Swinv2Layer(Swinv2Config(window_size=4), dim=8, input_resolution=(16, 16), num_heads=1, shift_size=2)
    expected = layer.get_attn_mask(12, 16, dtype=torch.float32)
    ours = shift_mask(window_layout((12, 16), 4, 2), -100.0, torch.float32)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("grid", [(16, 16), (10, 13), (5, 11)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_roll_then_pad_matches_timm_block(grid):
    """timm's own block (roll, pad, dynamic mask on the padded grid) against the contract with ROLL_THEN_PAD."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    block = SwinTransformerV2Block(dim=16, input_resolution=(16, 16), num_heads=2, window_size=8, shift_size=4).eval()
    block.dynamic_mask = True
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, grid[0], grid[1], 16)
    attn = block.attn
    with torch.no_grad():
        expected = block._attn(x).reshape(2, -1, 16)
        qkv_bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        qkv = F.linear(x.reshape(2, -1, 16), attn.qkv.weight, qkv_bias)
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, 2)
        position_bias = 16 * torch.sigmoid(table[attn.relative_position_index.view(-1)].view(64, 64, 2).permute(2, 0, 1))
        out = window_attention_reference(
            qkv, qkv_bias, attn.logit_scale, position_bias, grid_size=grid, num_heads=2, window_size=8,
            shift_size=4, pad_order=ROLL_THEN_PAD, mask_value=-100.0,
        )
        out = attn.proj(out)
    assert_close(out, expected, name=f"timm block {grid}")
