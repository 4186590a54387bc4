"""Drawing detections: the boxes, labels and sampling points a model finds in an image (for
``tools/infer.py`` and the detections a training run shows in TensorBoard)."""
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from util import box_ops

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
# Attention-weight colour ramp, low to high: dark blue, teal, green, yellow.
RAMP = ((40, 20, 120), (30, 140, 140), (90, 200, 70), (255, 235, 30))


class Detection(NamedTuple):
    """One detection of an image: the query that made it, its class, score and box."""
    query: int  # -1 where unknown (an ONNX graph that ends in the post-processing)
    label: int
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels


def select_detections(outputs: dict[str, Tensor], orig_size: tuple[int, int], threshold: float,
                      top_k: int) -> list[Detection]:
    """The (query, class) pairs of image 0 scoring above ``threshold``, best first, at most
    ``top_k``: PostProcess's detections (sigmoid scores, boxes scaled to ``orig_size = (h, w)``),
    with their query index kept."""
    prob = outputs["pred_logits"][0].sigmoid().cpu()
    scores, flat = prob.flatten().topk(min(top_k, prob.numel()))
    keep = scores > threshold
    scores, flat = scores[keep], flat[keep]
    queries = torch.div(flat, prob.shape[1], rounding_mode="floor")
    h, w = orig_size
    boxes = box_ops.box_cxcywh_to_xyxy(outputs["pred_boxes"][0].cpu()[queries]) * torch.tensor([w, h, w, h])
    return [Detection(int(q), int(c), float(s), tuple(float(v) for v in b))
            for q, c, s, b in zip(queries, flat % prob.shape[1], scores, boxes)]


def _ramp(t: float) -> tuple[int, int, int]:
    """Colour of ``t`` in ``[0, 1]`` on :data:`RAMP`."""
    position = min(max(t, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(position), len(RAMP) - 2)
    f = position - i
    return tuple(int(round(a + f * (b - a))) for a, b in zip(RAMP[i], RAMP[i + 1]))


def draw_detections(image: Image.Image, detections: Sequence[Detection], names: dict[int, str],
                    points: Sequence[tuple[Tensor, Tensor]] | None = None, scale: float = 1.0) -> Image.Image:
    """A copy of ``image`` with each detection's box and ``name score`` label, and, when given,
    per detection ``(xy (N, 2) original-image pixels, weights (N,))`` sampling points (those
    outside the image are clipped away by the drawing). With ``scale`` the picture is the image
    enlarged by that factor (for small images, so that labels stay legible)."""
    canvas = image.convert("RGB")
    if scale != 1.0:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 250))
    for k, det in enumerate(detections):
        colour = PALETTE[det.label % len(PALETTE)]
        box = [v * scale for v in det.box]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{names.get(det.label, det.label)} {det.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x0, y0 = box[0], box[1] - (bottom - top) - 2
        if y0 < 0:  # no room above the box: label inside its top edge
            y0 = box[1] + width
        draw.rectangle([x0, y0, x0 + right - left + 2, y0 + bottom - top + 2], fill=colour)
        draw.text((x0 + 1 - left, y0 + 1 - top), text, fill=(0, 0, 0), font=font)
        if points is not None and k < len(points):
            xy, weights = points[k]
            xy = xy * scale
            radius = max(1.5, min(canvas.size) / 200)
            relative = weights / weights.max()
            # low weights first, so the strongest points end up on top
            for i in relative.argsort().tolist():
                x, y = xy[i].tolist()
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=_ramp(relative[i].item()))
    return canvas
