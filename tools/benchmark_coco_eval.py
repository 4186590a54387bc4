"""Time the COCO box evaluation with pycocotools and with faster-coco-eval, side by side, on a
synthetic set of COCO val2017's size made in memory (no files, no model).

Usage::

    python tools/benchmark_coco_eval.py [--images 5000] [--detections 100] [--rounds 5] [--seed 0]

The set has ``--images`` images of 320 to 640 pixels a side, about 7.3 objects per image as in
val2017 (1% of them crowd regions) over COCO's 80 category ids, and ``--detections`` per image as
a detector's post-processing returns them (float32 xyxy boxes, scores and labels): two jittered
copies of each object, mostly of its class, and random boxes for the rest. Each round runs
:class:`~datasets.coco_eval.CocoEvaluator` once per backend, alternating which goes first, from
construction to the printed summary, as ``engine.evaluate`` does after each epoch (gathering is
a no-op in one process). Prints each round, the medians, their ratio and the largest difference
between the two backends' 12 numbers.
"""
import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco_eval import BACKENDS, CocoEvaluator  # noqa: E402

# COCO's 80 category ids: 1 to 90 without the ten that the 2014 paper's list has but no annotation.
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
OBJECTS_PER_IMAGE = 7.3  # val2017: 36,781 annotations on 5,000 images


def make_synthetic_evaluation(num_images: int, detections_per_image: int,
                              seed: int = 0) -> tuple[COCO, dict[int, dict[str, Tensor]]]:
    """Ground truth as pycocotools' ``COCO`` and each image's detections as the evaluator takes
    them (``{"scores", "labels", "boxes"}``, float32 xyxy in pixels)."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        width, height = (int(v) for v in rng.integers(320, 641, size=2))
        images.append({"id": image_id, "width": width, "height": height})
        n = int(rng.poisson(OBJECTS_PER_IMAGE))
        sizes = np.exp(rng.uniform(np.log(4), np.log(400), size=(n, 2))).clip(max=(width, height))
        corners = rng.uniform(0, 1, size=(n, 2)) * ((width, height) - sizes)
        labels = rng.choice(CATEGORY_IDS, size=n)
        for (x, y), (w, h), label in zip(corners.tolist(), sizes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x, y, w, h], "area": w * h * rng.uniform(0.4, 1.0),
                                "iscrowd": int(rng.random() < 0.01)})
        # Two copies of each object, jittered by up to a tenth of its size, 90% with its class.
        copies = min(2 * n, detections_per_image)
        source = np.repeat(np.arange(n), 2)[:copies]
        xywh = np.concatenate([corners, sizes], axis=1)[source]
        xywh = xywh + rng.uniform(-0.1, 0.1, size=(copies, 4)) * np.tile(xywh[:, 2:], 2)
        copy_labels = np.where(rng.random(copies) < 0.9, labels[source], rng.choice(CATEGORY_IDS, copies))
        rest = detections_per_image - copies
        random_sizes = np.exp(rng.uniform(np.log(4), np.log(400), size=(rest, 2)))
        random_xywh = np.concatenate([rng.uniform(0, 1, size=(rest, 2)) * (width, height), random_sizes], axis=1)
        xywh = np.concatenate([xywh, random_xywh])
        scores = np.concatenate([rng.uniform(0.3, 1.0, copies), rng.uniform(0.0, 0.6, rest)])
        predictions[image_id] = {
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(np.concatenate([copy_labels, rng.choice(CATEGORY_IDS, rest)]), dtype=torch.int64),
            "boxes": torch.tensor(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                                  dtype=torch.float32)}
    categories = [{"id": i, "name": f"category{i}", "supercategory": "thing"} for i in CATEGORY_IDS]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
        coco.createIndex()
    return coco, predictions


def evaluate_once(coco: COCO, predictions: dict[int, dict[str, Tensor]], backend: str) -> tuple[float, np.ndarray]:
    """Seconds for one whole evaluation with ``backend`` (its printing discarded), and the 12 numbers."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = CocoEvaluator(coco, ("bbox",), backend=backend)
        evaluator.update(predictions)
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, evaluator.coco_eval["bbox"].stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("Time COCO evaluation: pycocotools and faster-coco-eval")
    parser.add_argument("--images", type=int, default=5000, help="images (val2017 has 5,000)")
    parser.add_argument("--detections", type=int, default=100, help="detections per image (the original keeps 100)")
    parser.add_argument("--rounds", type=int, default=5, help="timed evaluations per backend, interleaved")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    args = parser.parse_args(argv)
    if min(args.images, args.detections, args.rounds) < 1:
        parser.error("--images, --detections and --rounds must be positive")

    coco, predictions = make_synthetic_evaluation(args.images, args.detections, args.seed)
    print(f"synthetic set: {len(coco.imgs)} images, {len(coco.anns)} objects, "
          f"{sum(len(p['scores']) for p in predictions.values())} detections")
    seconds: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    stats = {}
    for round_index in range(args.rounds):
        # Alternating the order spreads any drift of the machine's speed over both backends.
        order = BACKENDS if round_index % 2 == 0 else BACKENDS[::-1]
        for backend in order:
            elapsed, stats[backend] = evaluate_once(coco, predictions, backend)
            seconds[backend].append(elapsed)
        print(f"round {round_index + 1}: " + ", ".join(f"{b} {seconds[b][-1]:.2f} s" for b in BACKENDS), flush=True)
    medians = {backend: statistics.median(values) for backend, values in seconds.items()}
    reference, faster = medians["pycocotools"], medians["faster"]
    print(f"median of {args.rounds} rounds: pycocotools {reference:.2f} s, faster {faster:.2f} s "
          f"({reference / faster:.1f}x)")
    print(f"AP {stats['pycocotools'][0]:.3f}; largest difference between the backends' 12 numbers: "
          f"{np.abs(stats['pycocotools'] - stats['faster']).max():.1e}")


if __name__ == "__main__":
    main()
