"""The deformable transformer: encoder and decoder of multi-scale deformable attention."""
import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.errors import ParameterError
from util.misc import full_precision, inverse_sigmoid

from .ms_deform_attn import MSDeformAttn


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _activation(name: str):
    # ReLU in place: it is applied to a linear layer's fresh output, which nothing else reads (the
    # linear layer's backward needs its input, not its output); the same values, without a second
    # (tokens, d_ffn) tensor.
    activations = {"relu": functools.partial(F.relu, inplace=True), "gelu": F.gelu, "glu": F.glu}
    if name not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)}, got {name!r}")
    return activations[name]


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a feed-forward block."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``src``, ``pos``: ``(B, S, d_model)``; ``reference_points``: ``(B, S, levels, 2)``."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor,
                             device: torch.device) -> Tensor:
        """Pixel centres of every level as reference points for every level.

        Each point is normalised by its own level's valid (unpadded) size, then scaled by
        every level's valid ratio, so it lands on the same image location on each level.

        Args:
            spatial_shapes: ``(H_l, W_l)`` per level.
            valid_ratios: ``(B, levels, 2)`` valid fraction ``(w, h)`` of each level.

        Returns:
            ``(B, S, levels, 2)`` normalised ``(x, y)``.
        """
        points = []
        for level, (h, w) in enumerate(spatial_shapes):
            # Pixel centres. The original's linspace(0.5, h - 0.5, h) gives the same float32 values;
            # arange also keeps h and w symbolic when the model is exported with dynamic sizes.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: Tensor, spatial_shapes_list: list[tuple[int, int]],
                level_start_index: Tensor, valid_ratios: Tensor, pos: Tensor,
                padding_mask: Tensor | None = None) -> Tensor:
        """``src``, ``pos``: ``(B, S, d_model)``; returns the memory ``(B, S, d_model)``."""
        reference_points = self.get_reference_points(spatial_shapes_list, valid_ratios, device=src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention among queries, deformable cross-attention, feed-forward."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                src_spatial_shapes: Tensor, level_start_index: Tensor,
                src_padding_mask: Tensor | None = None) -> Tensor:
        """``tgt``, ``query_pos``: ``(B, Q, d_model)``; ``reference_points``: ``(B, Q, levels, 2|4)``;
        ``src``: ``(B, S, d_model)``."""
        q = k = tgt + query_pos
        # need_weights stays True: PyTorch then takes its explicit softmax(QK^T)V path, the
        # original's, which keeps float32 results bit-identical to it; need_weights=False
        # would switch to scaled_dot_product_attention, which rounds differently.
        tgt2 = self.self_attn(q, k, tgt)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        tgt2 = self.cross_attn(tgt + query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                               src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """Stack of decoder layers.

    ``bbox_embed`` and ``class_embed`` are the detector's prediction heads, attached by
    :class:`models.deformable_detr.DeformableDETR` after construction (``None`` until then):
    ``bbox_embed`` for iterative box refinement and both for two-stage proposals. They are
    registered here, as in the original, because released checkpoints store them under
    ``transformer.decoder.bbox_embed.*`` and ``transformer.decoder.class_embed.*``.
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int,
                 return_intermediate: bool = False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, src: Tensor, src_spatial_shapes: Tensor,
                src_level_start_index: Tensor, src_valid_ratios: Tensor, query_pos: Tensor,
                src_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """
        Args:
            tgt, query_pos: ``(B, Q, d_model)``.
            reference_points: ``(B, Q, 2)`` points or ``(B, Q, 4)`` boxes, normalised to the
                valid image area.
            src: ``(B, S, d_model)`` encoder memory.
            src_valid_ratios: ``(B, levels, 2)``.

        Returns:
            ``(L, B, Q, d_model)`` and ``(L, B, Q, 2|4)`` with ``L`` the number of layers when
            ``return_intermediate``, else the last layer's ``(B, Q, d_model)``, ``(B, Q, 2|4)``.
            The references returned for a layer are those refined by it (inputs to the next).
        """
        output = tgt
        intermediate = []
        intermediate_reference_points = []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                reference_points_input = (reference_points[:, :, None]
                                          * torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None])
            else:
                reference_points_input = reference_points[:, :, None] * src_valid_ratios[:, None]
            output = layer(output, query_pos, reference_points_input, src, src_spatial_shapes,
                           src_level_start_index, src_padding_mask)

            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    # 2-d reference points become boxes: the centre is refined, the size is
                    # predicted outright
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
                reference_points = new_reference_points.detach()

            if self.return_intermediate:
                intermediate.append(output)
                intermediate_reference_points.append(reference_points)

        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_reference_points)
        return output, reference_points


class DeformableTransformer(nn.Module):
    """Encoder and decoder of Deformable DETR, with two-stage proposal generation.

    Args:
        d_model: hidden width.
        nhead: attention heads.
        num_encoder_layers, num_decoder_layers: depths.
        dim_feedforward: feed-forward width.
        dropout: dropout in every layer.
        activation: ``relu``, ``gelu`` or ``glu``.
        return_intermediate_dec: return every decoder layer's output (for auxiliary losses).
        num_feature_levels: number of feature levels.
        dec_n_points, enc_n_points: sampling points per head and level.
        two_stage: take the decoder's queries from the encoder's top-scoring proposals.
        two_stage_num_proposals: how many proposals (the number of queries).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", return_intermediate_dec: bool = False,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, dec_n_points)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers, return_intermediate_dec)

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
        """Sine encoding of ``(B, K, 4)`` unactivated proposals: ``(B, K, 4 * num_pos_feats)``.

        The original fixes ``num_pos_feats`` at 128, which only fits ``d_model`` 256; the caller
        passes ``d_model // 2``, the same at 256 and valid at any width.
        """
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = proposals.sigmoid()[:, :, :, None] * scale / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory: Tensor, memory_padding_mask: Tensor,
                                     spatial_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """One proposal box per encoder token: centred on its pixel, of size ``0.05 * 2**level``.

        Args:
            memory: ``(B, S, d_model)``.
            memory_padding_mask: ``(B, S)`` bool.

        Returns:
            ``(B, S, d_model)`` transformed memory (zeroed on padding and invalid proposals) and
            ``(B, S, 4)`` proposals in inverse-sigmoid space (``inf`` where padded or invalid).
        """
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (h, w) in enumerate(spatial_shapes):
            mask = memory_padding_mask[:, start:start + h * w].view(batch, h, w)
            valid_h = torch.sum(~mask[:, :, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :], 1)
            # linspace(0, h - 1, h) in the original: the same values (see get_reference_points)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += h * w
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))

        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """``(B, H, W)`` padding mask -> ``(B, 2)`` valid fraction ``(w, h)``."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """
        Args:
            srcs: per level ``(B, d_model, H_l, W_l)``.
            masks: per level ``(B, H_l, W_l)`` bool, ``True`` on padding.
            pos_embeds: per level ``(B, d_model, H_l, W_l)``.
            query_embed: ``(Q, 2 * d_model)`` learned query position and content (single-stage);
                ``None`` in two-stage.

        Returns:
            ``hs (L, B, Q, d_model)``, initial references ``(B, Q, 2|4)``, per-layer refined
            references ``(L, B, Q, 2|4)``, and in two-stage the encoder's class logits
            ``(B, S, num_classes)`` and unactivated proposal boxes ``(B, S, 4)`` (else ``None``).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage")
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes_list = [], [], [], []
        for level, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes_list.append((src.shape[2], src.shape[3]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        # Element by element rather than torch.as_tensor(spatial_shapes_list): the same values, and
        # an exported graph computes them from its input's size instead of keeping the traced ones.
        spatial_shapes = torch.stack([torch.full((), size, dtype=torch.long, device=src_flatten.device)
                                      for shape in spatial_shapes_list for size in shape]).view(-1, 2)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flatten, spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios,
                              lvl_pos_embed_flatten, mask_flatten)

        batch, _, channels = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            num_tokens = sum(h * w for h, w in spatial_shapes_list)
            if self.two_stage_num_proposals > num_tokens:
                raise ParameterError("two_stage_num_proposals", self.two_stage_num_proposals,
                                     f"two-stage proposals are more than the encoder's {num_tokens} tokens "
                                     f"for feature maps {spatial_shapes_list}: use larger images or fewer")
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten,
                                                                                spatial_shapes_list)
            # The proposal heads are the detector's extra (last) class and box heads.
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            # Proposals are ranked by the logit of class 0 alone: the encoder is trained with
            # every target relabelled 0 (see SetCriterion), as in the original.
            topk_proposals = torch.topk(enc_outputs_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1,
                                             topk_proposals.unsqueeze(-1).expand(-1, -1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(
                self.get_proposal_pos_embed(topk_coords_unact, num_pos_feats=channels // 2)))
            query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = full_precision(self.reference_points(query_pos)).sigmoid()
        init_reference_out = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, mask_flatten)
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact


def build_deformable_transformer(args) -> DeformableTransformer:
    return DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        activation="relu", return_intermediate_dec=True, num_feature_levels=args.num_feature_levels,
        dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points, two_stage=args.two_stage,
        two_stage_num_proposals=args.num_queries)
