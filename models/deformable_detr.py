"""The Deformable DETR detector, its set criterion and its post-processor."""
import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from util import box_ops
from util.dist import get_world_size, is_dist_avail_and_initialized
from util.errors import ParameterError
from util.misc import NestedTensor, accuracy, interpolate_mask, inverse_sigmoid, nested_tensor_from_tensor_list

from .backbone import Joiner, build_backbone
from .deformable_transformer import DeformableTransformer, build_deformable_transformer
from .matcher import HungarianMatcher, build_matcher


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class DeformableDETR(nn.Module):
    """Deformable DETR: backbone, input projections, deformable transformer, prediction heads.

    Args:
        backbone: :class:`models.backbone.Joiner` of the ResNet and the positional encoding.
        transformer: the deformable transformer (built with ``return_intermediate_dec=True``).
        num_classes: classifier outputs (largest category id + 1; sigmoid, no background).
        num_queries: object queries (in two-stage, the number of proposals kept).
        num_feature_levels: 1, or at least 3 (the backbone's strides 8/16/32 and extra
            stride-2 convolutions on top).
        aux_loss: also return every earlier decoder layer's predictions.
        with_box_refine: iterative box refinement (one box and class head per decoder layer).
        two_stage: queries from the encoder's top proposals.
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False):
        super().__init__()
        num_backbone_outs = len(backbone.strides)
        if num_feature_levels < num_backbone_outs:
            raise ParameterError("num_feature_levels", num_feature_levels,
                                 f"is below the backbone's {num_backbone_outs} feature maps")
        if two_stage and not with_box_refine:
            # the original fails here too: the proposal head is taken from the refinement heads
            raise ParameterError("two_stage", two_stage, "needs with_box_refine")
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # registered here, replaced by per-layer lists below: this fixes the original's
        # state_dict key order (heads before query_embed and input_proj)
        self.class_embed: nn.ModuleList = nn.ModuleList()
        self.bbox_embed: nn.ModuleList = nn.ModuleList()
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        projections = []
        for in_channels in backbone.num_channels:
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=1),
                                             nn.GroupNorm(32, hidden_dim)))
        for _ in range(num_feature_levels - num_backbone_outs):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        # One head per decoder layer, plus one for the encoder's proposals in two-stage.
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            # only the first layer's box head starts at w = h = sigmoid(-2)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # Checkpoint-key quirk of the original (models/deformable_detr.py): the single
            # shared head is listed num_pred times, so state_dict() holds class_embed.0..N and
            # bbox_embed.0..N, all the same tensors.
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            for box_head in self.bbox_embed:
                nn.init.constant_(box_head.layers[-1].bias[2:], 0.0)

    def forward(self, samples: NestedTensor | Sequence[Tensor]) -> dict:
        """
        Args:
            samples: a :class:`NestedTensor` (``tensors (B, 3, H, W)``, ``mask (B, H, W)`` with
                ``True`` on padding) or a list of ``(3, H_i, W_i)`` images.

        Returns:
            ``pred_logits (B, Q, num_classes)``, ``pred_boxes (B, Q, 4)`` (cx, cy, w, h)
            normalised by each image's own size, ``aux_outputs`` (one such dict per earlier
            decoder layer) when ``aux_loss``, and in two-stage ``enc_outputs``
            (``pred_logits (B, S, num_classes)``, ``pred_boxes (B, S, 4)``).
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)

        srcs, masks = [], []
        for level, feat in enumerate(features):
            src, mask = feat.decompose()
            srcs.append(self.input_proj[level](src))
            masks.append(mask)
        for level in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
            mask = interpolate_mask(samples.mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))

        query_embeds = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact = self.transformer(
            srcs, masks, pos, query_embeds)

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_class = self.class_embed[lvl](hs[lvl])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord_unact = delta + reference
            else:
                coord_unact = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_classes.append(outputs_class)
            outputs_coords.append(coord_unact.sigmoid())

        out = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_classes[:-1], outputs_coords[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_outputs_class, "pred_boxes": enc_outputs_coord_unact.sigmoid()}
        return out


class SetCriterion(nn.Module):
    """DETR's set loss with the sigmoid focal classification loss of Deformable DETR.

    Targets are matched to the final predictions, to every ``aux_outputs`` entry and, in
    two-stage, to ``enc_outputs`` (with every label set to 0: class-agnostic proposals).

    Args:
        num_classes: classifier outputs.
        matcher: the Hungarian matcher.
        weight_dict: loss name -> weight (used by the training loop, not here).
        losses: which of ``labels``, ``boxes``, ``cardinality`` to compute.
        focal_alpha: alpha of the focal loss (gamma is 2).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 losses: Sequence[str], focal_alpha: float = 0.25):
        super().__init__()
        unknown = set(losses) - {"labels", "boxes", "cardinality"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = list(losses)
        self.focal_alpha = focal_alpha

    @staticmethod
    def _src_permutation_idx(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs: dict, targets: list[dict], indices, num_boxes: float,
                    log: bool = True) -> dict[str, Tensor]:
        """Sigmoid focal loss over all queries and classes (matched queries' target class is 1)."""
        src_logits = outputs["pred_logits"]
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        # one-hot with an extra "no object" column that is then dropped
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(src_logits.dtype)
        # As the original (models/deformable_detr.py): mean over queries, sum, / num_boxes,
        # x queries; that is, the sum over all queries and classes divided by num_boxes.
        focal = sigmoid_focal_loss(src_logits, onehot, alpha=self.focal_alpha, gamma=2, reduction="none")
        losses = {"loss_ce": focal.mean(1).sum() / num_boxes * src_logits.shape[1]}
        if log:
            losses["class_error"] = 100 - accuracy(src_logits[idx], target_classes_o)[0]
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> dict[str, Tensor]:
        """Logged only. Kept from DETR's softmax head as in the original: it counts queries whose
        top class is not the last one, which with sigmoid logits is nearly every query."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> dict[str, Tensor]:
        """L1 and GIoU losses of the matched boxes, each summed and divided by ``num_boxes``."""
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes),
                                                               box_ops.box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _losses_for(self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str,
                    log: bool) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {}
        for loss in self.losses:
            if loss == "labels":
                result = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
            elif loss == "boxes":
                result = self.loss_boxes(outputs, targets, indices, num_boxes)
            else:
                result = self.loss_cardinality(outputs, targets, indices, num_boxes)
            losses.update({k + suffix: v for k, v in result.items()})
        return losses

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """
        Args:
            outputs: the model's output dict.
            targets: per image ``labels (N_i,)`` int64 and ``boxes (N_i, 4)`` normalised (cx, cy, w, h).

        Returns:
            Unweighted losses: ``loss_ce``, ``loss_bbox``, ``loss_giou``, ``class_error``,
            ``cardinality_error``, and the same with suffix ``_{i}`` per auxiliary layer and
            ``_enc`` for the encoder proposals.
        """
        device = outputs["pred_logits"].device
        # average number of target boxes over all processes, at least 1
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(num_boxes)
        num_boxes = torch.clamp(num_boxes / get_world_size(), min=1).item()

        main_outputs = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        losses = self._losses_for(main_outputs, targets, num_boxes, "", log=True)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses_for(aux_outputs, targets, num_boxes, f"_{i}", log=False))
        if "enc_outputs" in outputs:
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses_for(outputs["enc_outputs"], bin_targets, num_boxes, "_enc", log=False))
        return losses


class PostProcess(nn.Module):
    """Model output -> COCO-style detections: the top ``num_select`` (query, class) pairs."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)``.
            target_sizes: ``(B, 2)`` ``(h, w)`` to scale the boxes to (the original image size
                for evaluation).

        Returns:
            Per image ``scores (n,)``, ``labels (n,)`` and ``boxes (n, 4)`` in absolute
            ``(x0, y0, x1, y1)``, with ``n = min(num_select, Q * K)``, best first.
        """
        out_logits = outputs["pred_logits"]
        if len(out_logits) != len(target_sizes) or target_sizes.dim() != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be ({len(out_logits)}, 2), got {tuple(target_sizes.shape)}")
        scores, labels, boxes = self.batched(out_logits, outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]

    def batched(self, out_logits: Tensor, out_bbox: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward`'s detections as ``(B, n)`` scores, ``(B, n)`` labels and ``(B, n, 4)``
        boxes (for an exported graph, whose batch size may vary)."""
        num_classes = out_logits.shape[2]
        prob = out_logits.sigmoid().flatten(1)
        scores, topk_indexes = torch.topk(prob, min(self.num_select, prob.shape[1]), dim=1)
        topk_boxes = torch.div(topk_indexes, num_classes, rounding_mode="floor")
        labels = topk_indexes % num_classes
        boxes = box_ops.box_cxcywh_to_xyxy(out_bbox)
        boxes = torch.gather(boxes, 1, topk_boxes.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        return scores, labels, boxes * scale_fct[:, None, :]


def build(args) -> tuple[DeformableDETR, SetCriterion, dict[str, nn.Module]]:
    """``(model, criterion, postprocessors)`` from the command-line arguments."""
    backbone = build_backbone(args)
    transformer = build_deformable_transformer(args)
    model = DeformableDETR(backbone, transformer, num_classes=args.num_classes, num_queries=args.num_queries,
                           num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                           with_box_refine=args.with_box_refine, two_stage=args.two_stage)
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef,
                   "loss_giou": args.giou_loss_coef}
    if args.aux_loss:
        aux_weight_dict = {}
        for i in range(args.dec_layers - 1):
            aux_weight_dict.update({k + f"_{i}": v for k, v in weight_dict.items()})
        aux_weight_dict.update({k + "_enc": v for k, v in weight_dict.items()})
        weight_dict.update(aux_weight_dict)
    criterion = SetCriterion(args.num_classes, build_matcher(args), weight_dict,
                             losses=["labels", "boxes", "cardinality"], focal_alpha=args.focal_alpha)
    return model, criterion, {"bbox": PostProcess()}
