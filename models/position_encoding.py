"""Positional encodings of the image feature maps."""
import math

import torch
from torch import Tensor, nn

from util.errors import ParameterError
from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the (y, x) position of each unpadded pixel.

    With ``normalize`` the cumulative positions are mapped to ``(0, scale]`` over each
    image's valid extent, so padding does not shift the encoding of the image.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """Encode the positions of ``tensor_list.mask (B, H, W)``; returns ``(B, 2 * num_pos_feats, H, W)``."""
        not_mask = ~tensor_list.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            # Deformable DETR centres each position (the -0.5) before normalising; DETR does
            # not. Kept as in the original models/position_encoding.py.
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even features) and cos (odd features)
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: one embedding per row and per column (at most 50 of each)."""

    def __init__(self, num_pos_feats: int = 256, max_len: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_len, num_pos_feats)
        self.col_embed = nn.Embedding(max_len, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """Returns ``(B, 2 * num_pos_feats, H, W)`` for ``tensor_list.tensors (B, C, H, W)``."""
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        max_len = self.row_embed.num_embeddings
        if h > max_len or w > max_len:
            raise ParameterError("position_embedding", "learned", f"covers at most {max_len}x{max_len} "
                                 f"feature maps, got {h}x{w}; use 'sine'")
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, -1, -1), y_emb.unsqueeze(1).expand(-1, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(args) -> nn.Module:
    num_pos_feats = args.hidden_dim // 2
    if args.position_embedding == "sine":
        return PositionEmbeddingSine(num_pos_feats, normalize=True)
    if args.position_embedding == "learned":
        return PositionEmbeddingLearned(num_pos_feats)
    raise ParameterError("position_embedding", args.position_embedding, "is not 'sine' or 'learned'")
