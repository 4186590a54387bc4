"""COCO box evaluation across processes with pycocotools' own ``COCOeval``, or optionally with the
faster-coco-eval package's C++ one.

Detections are collected per image on every process, gathered once, and evaluated in a single
``COCOeval.evaluate()`` over all images that were predicted on.
"""
import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from torch import Tensor

from util.dist import all_gather

SUPPORTED_IOU_TYPES = ("bbox",)
BACKENDS = ("pycocotools", "faster")


def _detections_array(image_id: int, prediction: Mapping[str, Tensor]) -> np.ndarray:
    """``(N, 7)`` float64 rows ``[image_id, x, y, w, h, score, category_id]`` (pycocotools' array format).

    An empty ``prediction`` mapping means no detections.
    """
    if len(prediction) == 0:
        return np.zeros((0, 7))
    for key in ("boxes", "scores", "labels"):
        if key not in prediction:
            raise KeyError(f"prediction for image {image_id} has no '{key}'")
    boxes = prediction["boxes"].detach().cpu()
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"prediction boxes for image {image_id} have shape {tuple(boxes.shape)}; "
                         f"expected (N, 4) xyxy")
    x0, y0, x1, y1 = boxes.unbind(-1)
    # Width and height in the boxes' own dtype, as the original's conversion does.
    xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1).double()
    scores = prediction["scores"].detach().cpu().double().reshape(-1, 1)
    labels = prediction["labels"].detach().cpu().double().reshape(-1, 1)
    if not len(xywh) == len(scores) == len(labels):
        raise ValueError(f"prediction for image {image_id} has {len(xywh)} boxes, {len(scores)} scores "
                         f"and {len(labels)} labels")
    ids = torch.full((len(xywh), 1), float(image_id), dtype=torch.float64)
    return torch.cat([ids, xywh, scores, labels], dim=1).numpy()


def _as_pycocotools_eval(accumulated: Mapping[str, Any]) -> dict[str, Any]:
    """faster-coco-eval's ``COCOeval.eval`` as pycocotools' dict: its keys only (faster-coco-eval adds
    ``matched`` and ``evaluations_size``) and its ``Params`` class, so that a saved ``eval``
    unpickles without faster-coco-eval installed."""
    params = Params(iouType=accumulated["params"].iouType)
    for name in ("imgIds", "catIds", "iouThrs", "recThrs", "maxDets", "areaRng", "areaRngLbl", "useCats"):
        setattr(params, name, copy.deepcopy(getattr(accumulated["params"], name)))
    return {"params": params, **{key: accumulated[key] for key in ("counts", "date", "precision", "recall", "scores")}}


class CocoEvaluator:
    """Accumulates detections, gathers them from all processes and runs COCO evaluation.

    Use: :meth:`update` per batch, then :meth:`synchronize_between_processes` (on every process),
    :meth:`accumulate` and :meth:`summarize`. Afterwards ``coco_eval["bbox"]`` is the backend's
    ``COCOeval`` with its ``stats`` (the 12 summary numbers) and ``eval``, which is pycocotools'
    dict with either backend.

    Args:
        coco_gt: ground truth; a deep copy is evaluated against, since both backends annotate the
            ground-truth dicts in place.
        iou_types: only ``("bbox",)`` is supported.
        backend: ``"pycocotools"`` (the original's evaluation) or ``"faster"`` (faster-coco-eval's
            ``COCOeval_faster``, evaluating against its own ``COCO`` copy of ``coco_gt``). Their
            numbers differ only where pycocotools' precision is 1 - 2**-52 (machine epsilon added
            to tp + fp) and faster-coco-eval's exactly 1.
    """

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str] = ("bbox",), backend: str = "pycocotools"):
        if isinstance(iou_types, str) or not set(iou_types) <= set(SUPPORTED_IOU_TYPES) or not iou_types:
            raise ValueError(f"iou_types must be a non-empty sequence from {SUPPORTED_IOU_TYPES}, "
                             f"got {iou_types!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.iou_types = tuple(iou_types)
        self.backend = backend
        # Either backend's COCOeval; typed loosely since faster-coco-eval's is not pycocotools' subclass.
        self.coco_eval: dict[str, Any]
        if backend == "faster":
            # Imported here: the default backend does not need the package.
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster

            self.coco_gt = FasterCOCO(coco_gt.dataset, use_deepcopy=True)
            self.coco_eval = {t: COCOeval_faster(self.coco_gt, iouType=t, print_function=print)
                              for t in self.iou_types}
        else:
            self.coco_gt = copy.deepcopy(coco_gt)
            self.coco_eval = {t: COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}
        # Image id -> its detections, in first-seen order; an image seen again keeps its first
        # detections (the original keeps the first occurrence of a repeated image id too).
        self.detections: dict[int, np.ndarray] = {}
        self._evaluated = False

    def update(self, predictions: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Add detections: ``{image_id: {"scores": (N,), "labels": (N,) category ids,
        "boxes": (N, 4) xyxy in original-image pixels}}``. Images with no detections count as
        evaluated images."""
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image id {image_id} is not in the ground-truth annotations")
            if image_id not in self.detections:
                self.detections[image_id] = _detections_array(image_id, prediction)
        self._evaluated = False

    def synchronize_between_processes(self) -> None:
        """Gather every process's detections and run ``COCOeval.evaluate()`` on all of them."""
        merged: dict[int, np.ndarray] = {}
        for detections in all_gather(self.detections):
            for image_id, rows in detections.items():
                merged.setdefault(image_id, rows)
        self.detections = merged
        image_ids = list(merged.keys())
        rows = np.concatenate(list(merged.values()), axis=0) if merged else np.zeros((0, 7))
        for coco_eval in self.coco_eval.values():
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.cocoDt = self.coco_gt.loadRes(rows) if len(rows) else self._empty_results()
                coco_eval.params.imgIds = image_ids
                coco_eval.evaluate()
        self._evaluated = True

    def _empty_results(self) -> COCO:
        """A detection set with no detections (``loadRes`` rejects an empty result list)."""
        results = COCO()
        results.dataset = {"images": list(self.coco_gt.dataset["images"]), "annotations": [],
                           "categories": list(self.coco_gt.dataset.get("categories", []))}
        results.createIndex()
        return results

    def accumulate(self) -> None:
        """Per-image results to precision/recall tables (``COCOeval.accumulate``)."""
        if not self._evaluated:
            raise RuntimeError("call synchronize_between_processes() before accumulate()")
        for coco_eval in self.coco_eval.values():
            coco_eval.accumulate()
            if self.backend == "faster":
                coco_eval.eval = _as_pycocotools_eval(coco_eval.eval)

    def summarize(self) -> None:
        """Print the standard 12-line COCO summary per IoU type and fill ``coco_eval[t].stats``."""
        for iou_type, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            if self.backend == "faster":
                lines: list[str] = []
                coco_eval.print_function = lines.append
                coco_eval.summarize()
                coco_eval.print_function = print
                # pycocotools' 12 lines; faster-coco-eval prints two more (recall at IoU 0.5 and 0.75).
                print("\n".join(lines[:len(coco_eval.stats)]))
            else:
                coco_eval.summarize()

