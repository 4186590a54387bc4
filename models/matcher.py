"""Hungarian matching between predictions and ground-truth boxes."""

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to queries minimising a weighted cost.

    The cost of predicting target ``j`` with query ``i`` is
    ``cost_class * focal(i, label_j) + cost_bbox * L1(box_i, box_j) - cost_giou * GIoU(box_i, box_j)``,
    where the class term is the focal loss of the target's class minus that of not predicting it.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three terms.
        focal_alpha, focal_gamma: focal-loss parameters of the class cost. The original fixes
            them at 0.25 and 2 whatever ``--focal_alpha`` says (models/matcher.py), and so does
            :func:`build_matcher`.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("the matching costs cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits (B, Q, num_classes)`` and ``pred_boxes (B, Q, 4)`` (cx, cy, w, h).
            targets: per image ``labels (N_i,)`` and ``boxes (N_i, 4)`` (cx, cy, w, h).

        Returns:
            Per image ``(query_indices, target_indices)``, int64 of length ``min(Q, N_i)``; for
            predictions with NaN or infinite values an arbitrary valid assignment.
        """
        out_prob = outputs["pred_logits"].sigmoid()
        out_bbox = outputs["pred_boxes"]
        # Each image's queries against its own targets only, the targets padded to the most any
        # image has: (B, Q, N_max) costs where the original computed every query of the batch
        # against every target of the batch, (B * Q, sum N_i), and kept the diagonal blocks. Each
        # cost is the same float computation, so the matches are the original's (tested).
        sizes = [len(t["boxes"]) for t in targets]
        tgt_ids = pad_sequence([t["labels"] for t in targets], batch_first=True)
        # padding boxes of any valid shape: their costs are never read
        tgt_bbox = pad_sequence([t["boxes"] for t in targets], batch_first=True, padding_value=0.25)

        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost_class = (1 - alpha) * (out_prob ** gamma) * (-(1 - out_prob + 1e-8).log())
        pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
        index = tgt_ids[:, None, :].expand(-1, out_prob.shape[1], -1)
        cost_class = pos_cost_class.gather(2, index) - neg_cost_class.gather(2, index)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        cost = (self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou).cpu()
        if not torch.isfinite(cost).all():
            # Non-finite predictions (a diverged model, a float16 overflow) would make scipy raise;
            # matched arbitrarily instead, they are reported by the training step and the
            # evaluation (engine), which count them on every process.
            cost = cost.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        indices = [linear_sum_assignment(cost[i, :, :size]) for i, size in enumerate(sizes)]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
