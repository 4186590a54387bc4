"""Pure-PyTorch multi-scale deformable attention sampling core.

This is the reference path: bilinear sampling with ``F.grid_sample`` (zero padding,
``align_corners=False``), which is what the original CUDA kernel computes.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_pytorch(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                           attention_weights: Tensor) -> Tensor:
    """Sample ``value`` at ``sampling_locations`` and sum with ``attention_weights``.

    Args:
        value: ``(B, S, heads, C)`` with ``S = sum_l H_l * W_l``, levels flattened row-major.
        spatial_shapes: ``(levels, 2)`` integer ``(H_l, W_l)`` per level.
        sampling_locations: ``(B, Lq, heads, levels, points, 2)``, ``(x, y)`` normalised to
            ``[0, 1]`` over each level's full (padded) extent; points outside sample zeros.
        attention_weights: ``(B, Lq, heads, levels, points)``.

    Returns:
        ``(B, Lq, heads * C)``.
    """
    batch, _, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (B, H*W, heads, C) -> (B*heads, C, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, h, w)
        # (B, Lq, heads, points, 2) -> (B*heads, Lq, points, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # (B, Lq, heads, levels, points) -> (B*heads, 1, Lq, levels*points)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(batch, heads * channels, num_queries).transpose(1, 2).contiguous()


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention sampling; shapes as in :func:`ms_deform_attn_pytorch`.

    ``level_start_index`` is ``(levels,)``: the offset of each level in ``S``.
    """
    del level_start_index  # the pure-PyTorch path derives the level split from the shapes
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
