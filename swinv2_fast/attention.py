"""The parts of the window-attention step that every Swin V2 attention shares: the continuous position bias
and the q/k/v projection.

Four steps call these: swinv2_fast's `Swinv2SelfAttention` and the patched steps of transformers' layers,
timm's `SwinTransformerV2Block` and timm's `SwinTransformerV2CrBlock` (`swinv2_fast.patch`). What differs
between the libraries is a parameter here, passed by each caller; the window rules come from
`swinv2_fast.windows.SEMANTICS`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, cast

import torch
from torch import nn

from .linear import project_qkv
from .windows import grid_is_padded

__all__ = ["continuous_position_bias", "project_qkv_modules", "qkv_weight_and_bias"]


def continuous_position_bias(
    mlp: nn.Module,
    coords: torch.Tensor,
    num_heads: int,
    window_area: int,
    index: Optional[torch.Tensor] = None,
    sigmoid: bool = True,
) -> torch.Tensor:
    """The (heads, N, N) position bias of an N-token window from the position-bias MLP, computed on every call.

    The MLP is called as a module (hooks, swapped layers, autocast and its own dropout apply) on `coords`,
    which the caller passes in the dtype the MLP takes.
    - transformers and timm `SwinTransformerV2` (`index` given, `sigmoid=True`): `coords` is the
      (2wh-1)(2ww-1) relative-coordinate table and the bias is 16 * sigmoid(mlp(coords))[index]. 16 * sigmoid
      is taken on the table, before the gather to (heads, N, N): elementwise, so the values are those of the
      other order (gather, then sigmoid), with N*N/(2wh-1)(2ww-1) ~ 4 times fewer sigmoids, and the gather
      writes head-major rows directly.
    - timm `SwinTransformerV2Cr` (`index` None, `sigmoid=False`): `coords` holds one row per query/key pair
      (N * N rows) and the bias is mlp(coords) itself, without sigmoid or factor 16.
    """
    table = mlp(coords).reshape(-1, num_heads)
    if sigmoid:
        table = 16 * torch.sigmoid(table)
    if index is None:
        return table.t().reshape(num_heads, window_area, window_area)
    return table.t().index_select(1, index.view(-1)).view(-1, window_area, window_area)


def qkv_weight_and_bias(
    projections: Sequence[nn.Module], bias_when_absent: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight and bias of one GEMM computing the q/k/v of plain `nn.Linear` projections (`is_plain_linear`),
    concatenated on every call from the layers' parameters: (3C, C) and (3C,) for three layers, the layer's
    own for one fused layer.

    A layer without a bias contributes zeros. When no layer has a bias, the bias is None unless
    `bias_when_absent` (then zeros): swinv2_fast's models pass None (the op reads None as zeros), transformers'
    patched layers the zeros transformers' own layout holds.
    """
    linears = cast(Sequence[nn.Linear], projections)  # plain nn.Linear layers: the callers check is_plain_linear
    if len(linears) == 1:
        return linears[0].weight, linears[0].bias
    weight = torch.cat([m.weight for m in linears], dim=0)
    if not bias_when_absent and all(m.bias is None for m in linears):
        return weight, None
    bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
    return weight, bias


def project_qkv_modules(
    tokens: torch.Tensor, projections: Sequence[nn.Module], grid, window
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q/k/v of (B, H*W, C) tokens by calling the projection modules (three, or one fused `qkv`): for
    projections that are not plain (LoRA, quantized, parametrized or hooked layers), whose calls are their
    own. Returns ((B, H*W, 3C), pad), pad being what a padded position holds (the projection of a zero token)
    when the (H, W) grid is padded to `window` multiples, else None (`swinv2_fast.linear.project_qkv`)."""
    return project_qkv(tokens, *projections, padded=grid_is_padded(grid[0], grid[1], window))
