"""Multi-scale deformable attention (the module; its sampling core is ``ops.ms_deform_attn``)."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops import ms_deform_attn
from util.misc import full_precision


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and feature level.

    Args:
        d_model: channels of queries and values; split evenly over ``n_heads``.
        n_levels: number of feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's initialisation: offsets start on a ring of ``n_heads`` directions,
        point ``k`` at distance ``k + 1``; uniform attention; Xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        # scale each direction so its larger coordinate is +-1 (points on a square ring)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2) * distance
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def sampling_locations_and_weights(self, query: Tensor, reference_points: Tensor,
                                       input_spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Where each query samples and with what weight (arguments as in :meth:`forward`).

        Returns:
            Sampling locations ``(B, Lq, heads, levels, points, 2)``, normalised ``(x, y)`` over
            each level's padded map, and attention weights ``(B, Lq, heads, levels, points)``,
            summing to 1 over levels and points. Under autocast both are float32: a bfloat16
            location is off by up to half a pixel on a 1333-pixel level.
        """
        batch, num_queries, _ = query.shape
        shape = (batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        sampling_offsets = full_precision(self.sampling_offsets(query)).view(*shape, 2)
        reference_points = full_precision(reference_points)
        attention_weights = full_precision(self.attention_weights(query)).view(batch, num_queries, self.n_heads, -1)
        attention_weights = F.softmax(attention_weights, -1).view(shape)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l) and add to the
            # reference point. The same float32 operations, element for element, as the
            # original's broadcast over (heads, levels, points, 2), but over one flat inner
            # dimension of levels * points * 2: broadcasting over a trailing dimension of 2 runs
            # about 25x slower on the CPU.
            flat = (batch * num_queries, self.n_heads, self.n_levels * self.n_points * 2)
            normalizer = input_spatial_shapes.flip(-1).to(sampling_offsets.dtype)
            normalizer = normalizer[:, None, :].expand(self.n_levels, self.n_points, 2).reshape(flat[2])
            offsets = sampling_offsets.reshape(flat) / normalizer
            if reference_points.requires_grad:
                # the original's broadcast, so that the reference points' gradient is summed over
                # heads and points in the same order
                sampling_locations = reference_points[:, :, None, :, None, :] + offsets.view(sampling_offsets.shape)
            else:  # constant reference points (the encoder's)
                points = reference_points[:, :, :, None, :].expand(batch, num_queries, self.n_levels, self.n_points, 2)
                sampling_locations = (points.reshape(flat[0], 1, flat[2]) + offsets).view(sampling_offsets.shape)
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the reference box: a point at offset n_points reaches
            # half the box's width/height
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got shape "
                             f"{tuple(reference_points.shape)}")
        return sampling_locations, attention_weights

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: Tensor, input_level_start_index: Tensor,
                input_padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: ``(B, Lq, d_model)``.
            reference_points: ``(B, Lq, levels, 2)`` normalised ``(x, y)`` with ``(0, 0)`` the
                top-left and ``(1, 1)`` the bottom-right of the padded map, or
                ``(B, Lq, levels, 4)`` reference boxes ``(cx, cy, w, h)``.
            input_flatten: ``(B, S, d_model)``, the levels flattened and concatenated,
                ``S = sum_l H_l * W_l``.
            input_spatial_shapes: ``(levels, 2)`` int64 ``(H_l, W_l)``.
            input_level_start_index: ``(levels,)`` int64 offset of each level in ``S``.
            input_padding_mask: ``(B, S)`` bool, ``True`` on padding.

        Returns:
            ``(B, Lq, d_model)``.

        Under autocast the values are projected and sampled in the autocast dtype (the kernels
        accumulate in float32) while the sampling locations and attention weights stay float32.
        """
        batch, num_values, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # in place: the projection's fresh output is read by nothing else
            value = value.masked_fill_(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)
        sampling_locations, attention_weights = self.sampling_locations_and_weights(
            query, reference_points, input_spatial_shapes)
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                                sampling_locations, attention_weights)
        return self.output_proj(output)
