"""Matcher, set criterion, post-processing and positional encoding against hand computations."""
import itertools
import math

import pytest
import torch

from models.deformable_detr import PostProcess, SetCriterion
from models.matcher import HungarianMatcher
from models.position_encoding import PositionEmbeddingSine
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from util.misc import NestedTensor


def xyxy(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def giou_f64(a, b):
    """GIoU of two (cx, cy, w, h) boxes in plain Python floats."""
    ax0, ay0, ax1, ay1 = xyxy(a)
    bx0, by0, bx1, by1 = xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def focal_cost_f64(p, alpha=0.25, gamma=2.0):
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    return pos - neg


def pair_cost(logits, boxes, label, box, weights=(2, 5, 2)):
    p = 1 / (1 + math.exp(-logits[label]))
    l1 = sum(abs(x - y) for x, y in zip(boxes, box))
    return weights[0] * focal_cost_f64(p) + weights[1] * l1 - weights[2] * giou_f64(boxes, box)


def random_outputs(batch, queries, classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=g)
    centres = torch.rand(batch, queries, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(batch, queries, 2, generator=g) * 0.3 + 0.05
    return {"pred_logits": logits, "pred_boxes": torch.cat([centres, sizes], -1)}


def random_targets(counts, classes, seed):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, classes, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes], -1)})
    return targets


def test_matcher_is_optimal_against_brute_force():
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    outputs = random_outputs(1, 5, 4, seed=0)
    targets = random_targets([3], 4, seed=1)
    (rows, cols), = matcher(outputs, targets)
    logits = outputs["pred_logits"][0].double().tolist()
    boxes = outputs["pred_boxes"][0].double().tolist()
    labels = targets[0]["labels"].tolist()
    tboxes = targets[0]["boxes"].double().tolist()
    cost = [[pair_cost(logits[q], boxes[q], labels[t], tboxes[t]) for t in range(3)] for q in range(5)]
    best = min(sum(cost[q][t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    got = sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist()))
    assert len(rows) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    assert got == pytest.approx(best, rel=1e-6)


def test_matcher_batched_equals_single_and_handles_empty():
    matcher = HungarianMatcher(2, 5, 2)
    outputs = random_outputs(3, 12, 6, seed=2)
    targets = random_targets([4, 0, 7], 6, seed=3)
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        alone = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[i][0], alone[0]) and torch.equal(batched[i][1], alone[1])
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    assert batched[1][0].dtype == torch.int64
    empty = matcher(random_outputs(2, 5, 3, seed=4), random_targets([0, 0], 3, seed=5))
    assert all(r.numel() == 0 and c.numel() == 0 for r, c in empty)


def original_batched_costs(matcher: HungarianMatcher, outputs: dict, targets: list[dict]) -> list[torch.Tensor]:
    """The original's cost matrices: every query of the batch against every target of the batch,
    (B * Q, sum N_i), split into each image's diagonal block."""
    batch, queries = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
    boxes = outputs["pred_boxes"].flatten(0, 1)
    ids = torch.cat([t["labels"] for t in targets])
    tgt = torch.cat([t["boxes"] for t in targets])
    neg = 0.75 * (prob ** 2) * (-(1 - prob + 1e-8).log())
    pos = 0.25 * ((1 - prob) ** 2) * (-(prob + 1e-8).log())
    cost = (matcher.cost_bbox * torch.cdist(boxes, tgt, p=1) + matcher.cost_class * (pos[:, ids] - neg[:, ids])
            - matcher.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt)))
    cost = cost.view(batch, queries, -1)
    return [c[i] for i, c in enumerate(cost.split([len(t["boxes"]) for t in targets], -1))]


@pytest.mark.parametrize("sizes", [[4, 0, 7], [9, 9], [1], [0, 0, 3, 12, 5]])
def test_matcher_costs_are_the_originals_bit_for_bit(sizes, monkeypatch):
    """Per-image costs over targets padded to the longest list are the original's batch-wide
    matrix, block for block and bit for bit, so the assignments are the original's."""
    import models.matcher as matcher_module

    matcher = HungarianMatcher(2, 5, 2)
    outputs = random_outputs(len(sizes), 30, 13, seed=sum(sizes))
    targets = random_targets(sizes, 13, seed=len(sizes))
    seen = []
    real = matcher_module.linear_sum_assignment
    monkeypatch.setattr(matcher_module, "linear_sum_assignment", lambda c: seen.append(torch.as_tensor(c)) or real(c))
    indices = matcher(outputs, targets)
    expected = original_batched_costs(matcher, outputs, targets)
    assert len(seen) == len(expected)
    for got, want, (rows, cols) in zip(seen, expected, indices):
        assert got.shape == want.shape and torch.equal(got, want)
        want_rows, want_cols = real(want)
        assert rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist()


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


def make_criterion(num_classes=3):
    weights = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
    return SetCriterion(num_classes, HungarianMatcher(2, 5, 2), weights, ["labels", "boxes", "cardinality"])


def test_losses_match_hand_computation():
    """Two queries, one target: the matched query and every loss worked out in float64."""
    logits = torch.tensor([[[2.0, -1.0, 0.5], [-3.0, 0.2, -0.4]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    losses = make_criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)

    # query 0 is matched (confident class 0, overlapping box); num_boxes = 1
    alpha, gamma = 0.25, 2
    total = 0.0
    for q in range(2):
        for c in range(3):
            x = logits[0, q, c].item()
            p = 1 / (1 + math.exp(-x))
            t = 1.0 if (q == 0 and c == 0) else 0.0
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = alpha * t + (1 - alpha) * (1 - t)
            total += a_t * ce * (1 - p_t) ** gamma
    # summed over queries and classes, / num_boxes
    expected_ce = total / 1
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    # L1: |0.2 - 0.4| * 2 = 0.4; IoU = 0.04 / 0.16, the hull is the target: GIoU = 0.25
    assert losses["loss_bbox"].item() == pytest.approx(0.4, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(0.75, rel=1e-5)
    assert losses["class_error"].item() == pytest.approx(0.0)
    # argmax of both queries differs from the last class (2): 2 predicted vs 1 target
    assert losses["cardinality_error"].item() == pytest.approx(1.0)


def test_losses_normalised_by_number_of_boxes():
    criterion = make_criterion(5)
    outputs = random_outputs(2, 10, 5, seed=6)
    targets = random_targets([3, 5], 5, seed=7)
    losses = criterion(outputs, targets)
    indices = criterion.matcher(outputs, targets)
    l1 = sum((outputs["pred_boxes"][i][r] - t["boxes"][c]).abs().sum() for i, ((r, c), t) in
             enumerate(zip(indices, targets)))
    assert losses["loss_bbox"].item() == pytest.approx(l1.item() / 8, rel=1e-5)
    # an image batch without any target normalises by 1, not 0
    empty = criterion(outputs, random_targets([0, 0], 5, seed=8))
    assert torch.isfinite(empty["loss_ce"]) and empty["loss_bbox"].item() == 0.0
    assert empty["class_error"].item() == 100.0


def test_aux_and_encoder_losses():
    criterion = make_criterion(4)
    outputs = random_outputs(2, 8, 4, seed=9)
    outputs["aux_outputs"] = [random_outputs(2, 8, 4, seed=10 + i) for i in range(2)]
    outputs["enc_outputs"] = random_outputs(2, 30, 4, seed=20)
    targets = random_targets([2, 3], 4, seed=11)
    losses = criterion(outputs, targets)
    names = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]
    assert set(losses) == {"class_error"} | {name + suffix for name in names for suffix in ["", "_0", "_1", "_enc"]}
    # each decoder layer's outputs are matched and scored on their own, as the last layer's are
    # (the same num_boxes: the targets are the same), and the encoder's proposals against
    # class-agnostic targets: every label 0
    bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    for suffix, layer, layer_targets in [("", {k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets),
                                         ("_0", outputs["aux_outputs"][0], targets),
                                         ("_1", outputs["aux_outputs"][1], targets),
                                         ("_enc", outputs["enc_outputs"], bin_targets)]:
        alone = criterion(layer, layer_targets)
        for name in names:
            assert losses[name + suffix].item() == pytest.approx(alone[name].item(), rel=1e-6), name + suffix
    assert len({losses["loss_bbox" + suffix].item() for suffix in ["", "_0", "_1", "_enc"]}) == 4  # not one layer's
    # the caller's targets are not modified
    assert targets[0]["labels"].numel() == 2 and any(t["labels"].any() for t in targets)


def test_postprocess_top_pairs_and_scaling():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1] = 3.0
    logits[0, 0, 0] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    result = PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    assert result["labels"].tolist() == [1, 0]
    # (cx, cy, w, h) -> corners, x scaled by width 200, y by height 100
    torch.testing.assert_close(result["boxes"], torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]]))
    assert len(PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[1, 1]]))[0]["scores"]) == 6
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))


def test_sine_position_encoding_hand_case():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True  # last column is padding
    pos = PositionEmbeddingSine(num_pos_feats=4, normalize=True)(NestedTensor(torch.zeros(1, 1, 2, 3), mask))
    assert pos.shape == (1, 8, 2, 3)
    scale, eps = 2 * math.pi, 1e-6
    for y in range(2):
        for x in range(2):
            ye = (y + 1 - 0.5) / (2 + eps) * scale
            xe = (x + 1 - 0.5) / (2 + eps) * scale
            expected = []
            for e in (ye, xe):
                for k in range(4):
                    angle = e / 10000 ** (2 * (k // 2) / 4)
                    expected.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
            torch.testing.assert_close(pos[0, :, y, x], torch.tensor(expected), atol=1e-6, rtol=1e-6)
