"""Write a synthetic COCO-format detection dataset of coloured shapes, for demos and short trainings.

Layout under ``--out``, exactly as ``--coco_path`` expects of COCO 2017::

    train2017/<12-digit id>.jpg   val2017/<12-digit id>.jpg
    annotations/instances_train2017.json   annotations/instances_val2017.json

Each image is a square ``--image_size`` RGB picture: a textured background (a colour gradient,
stripes at a random angle or low-frequency blotches, all with pixel noise) and filled shapes of
six classes (:data:`CATEGORIES`; their ids are non-contiguous like COCO's, so train with
``--num_classes 13``). The class is the shape; colours are drawn per object (saturated, while
backgrounds are greyish), sizes range from small to large, shapes other than circles and rings
are rotated, and every shape's aspect ratio is jittered. About one image in twelve is crowded
(many smaller objects).

Annotation conventions:

* Objects are painted in order, later ones on top, so they may partly hide earlier ones.
  ``bbox = [x, y, w, h]`` is the full extent of the shape as drawn (COCO's convention: the whole
  object, occluded parts included): the shape covers pixel columns ``x .. x + w - 1`` and rows
  ``y .. y + h - 1``.
* ``area`` is the number of visible pixels of the shape (COCO's area is that of the visible
  segmentation); it decides COCO's small / medium / large split.
* No annotated object is more than :data:`MAX_OCCLUSION` hidden: a new object whose placement
  would hide more of any earlier one is not drawn (another placement is tried), so every drawn
  object is annotated. Shapes lie wholly inside the image.
* All annotations have ``iscrowd = 0``; image and annotation ids are unique over both splits.

Output depends only on the arguments; each image is drawn from its own random stream
(``seed``, split, index), so the validation images do not change with ``--num_train``.

Usage::

    python tools/make_synthetic_coco.py --out data/shapes [--num_train 2000] [--num_val 200]
        [--image_size 128] [--seed 0]
"""
import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "star", "supercategory": "shape"},
    {"id": 9, "name": "cross", "supercategory": "shape"},
    {"id": 12, "name": "ring", "supercategory": "shape"},
)
MAX_OCCLUSION = 0.6
MIN_OBJECT_SIZE = 8
CROWDED_FRACTION = 1 / 12
SPLIT_INDEX = {"train": 0, "val": 1}
# (min, max) objects attempted per image, ordinary and crowded; fewer when placements fail.
OBJECTS_PER_IMAGE = (1, 6)
OBJECTS_PER_CROWDED_IMAGE = (12, 24)
PLACEMENT_TRIES = 20
# log aspect ratio (width / height) drawn from [-ASPECT_JITTER, ASPECT_JITTER]
ASPECT_JITTER = 0.25
NOISE_STD = 6.0


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in ``[0, 1]``) as float RGB in ``[0, 255]``."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` float32 greyish texture: gradient, stripes or blotches."""
    def dull() -> np.ndarray:
        return _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.85))

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    if kind == 0:  # linear gradient between two colours, random direction
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:  # soft stripes at a random angle and period
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.05, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    else:  # low-frequency blotches: a coarse random grid, bilinearly upsampled
        cells = int(rng.integers(3, 7))
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        t = np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    first, second = dull(), dull()
    return first + t[..., None] * (second - first)


def _shape_mask(rng: np.random.Generator, shape: str, size: int, extent: float,
                center: tuple[float, float]) -> np.ndarray:
    """Boolean ``(size, size)`` mask of one ``shape`` about ``extent`` pixels across at ``center``."""
    cx, cy = center
    # aspect jitter: the shape is stretched along x and squeezed along y (or the reverse)
    aspect = math.exp(rng.uniform(-ASPECT_JITTER, ASPECT_JITTER))
    rx, ry = extent / 2 * aspect ** 0.5, extent / 2 / aspect ** 0.5
    rotation = rng.uniform(0, 2 * math.pi)

    def polygon(radii: list[float], angles: list[float]) -> list[tuple[float, float]]:
        points = []
        for r, a in zip(radii, angles):
            x, y = r * math.cos(a + rotation), r * math.sin(a + rotation)
            points.append((cx + x * rx / max(rx, ry), cy + y * ry / max(rx, ry)))
        return points

    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    radius = max(rx, ry)
    if shape in ("circle", "ring"):
        corners = [cx - rx, cy - ry, cx + rx, cy + ry]
        if shape == "circle":
            draw.ellipse(corners, fill=255)
        else:
            draw.ellipse(corners, outline=255, width=max(2, int(round(min(rx, ry) * rng.uniform(0.25, 0.45)))))
    elif shape == "square":
        draw.polygon(polygon([radius] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon([radius] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]), fill=255)
    elif shape == "star":
        inner = radius * rng.uniform(0.38, 0.5)
        draw.polygon(polygon([radius, inner] * 5, [-math.pi / 2 + k * math.pi / 5 for k in range(10)]), fill=255)
    elif shape == "cross":
        # a plus sign: 12 corners at arm half-width ``a`` and arm length ``radius``
        a = radius * rng.uniform(0.25, 0.38)
        corners = [(a, radius), (-a, radius), (-a, a), (-radius, a), (-radius, -a), (-a, -a),
                   (-a, -radius), (a, -radius), (a, -a), (radius, -a), (radius, a), (a, a)]
        draw.polygon(polygon([math.hypot(x, y) for x, y in corners],
                             [math.atan2(y, x) for x, y in corners]), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {[c['name'] for c in CATEGORIES]}")
    return np.asarray(image) > 0


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of the pixels set in ``mask`` (the last row and column included)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _draw_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (``uint8 (size, size, 3)``) and its objects: ``category_id``, ``bbox``, ``area``."""
    crowded = rng.random() < CROWDED_FRACTION
    low, high = OBJECTS_PER_CROWDED_IMAGE if crowded else OBJECTS_PER_IMAGE
    num_objects = int(rng.integers(low, high + 1))
    max_extent = max(MIN_OBJECT_SIZE, size * (0.3 if crowded else 0.7))

    image = _background(rng, size)
    masks: list[np.ndarray] = []
    categories: list[dict[str, Any]] = []
    for _ in range(num_objects):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        visible = _visible_masks(masks, size)
        for _ in range(PLACEMENT_TRIES):
            # log-uniform extent: as many small objects as large ones
            extent = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_extent)))
            # widest half-extent: aspect jitter, and the cross's corners lie beyond its arm length
            half = extent / 2 * math.exp(ASPECT_JITTER / 2) * 1.1 + 1
            if 2 * half >= size:
                continue
            center = (rng.uniform(half, size - half), rng.uniform(half, size - half))
            mask = _shape_mask(rng, category["name"], size, extent, center)
            if mask.any() and all(_visible(v & ~mask, m) for v, m in zip(visible, masks)):
                break
        else:
            continue
        masks.append(mask)
        categories.append(category)
        colour = _hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        image[mask] = colour

    image += rng.normal(0.0, NOISE_STD, size=image.shape).astype(np.float32)
    objects = []
    for mask, visible, category in zip(masks, _visible_masks(masks, size), categories):
        objects.append({"category_id": category["id"], "bbox": [float(v) for v in _mask_box(mask)],
                        "area": float(visible.sum())})
    return image.clip(0, 255).round().astype(np.uint8), objects


def _visible_masks(masks: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Each mask less the masks painted after it."""
    visible = []
    above = np.zeros((size, size), dtype=bool)
    for mask in reversed(masks):
        visible.append(mask & ~above)
        above |= mask
    return visible[::-1]


def _visible(visible: np.ndarray, full: np.ndarray) -> bool:
    """Whether at most :data:`MAX_OCCLUSION` of ``full`` is hidden."""
    return visible.sum() >= (1 - MAX_OCCLUSION) * full.sum()


def _make_split(out_dir: Path, split: str, num_images: int, image_size: int, seed: int,
                first_image_id: int, first_ann_id: int) -> dict[str, Any]:
    """Draw and save one split's images; returns its COCO json dict."""
    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for k in range(num_images):
        rng = np.random.default_rng([seed, SPLIT_INDEX[split], k])
        image_id = first_image_id + k
        pixels, objects = _draw_image(rng, image_size)
        file_name = f"{image_id:012d}.jpg"
        # 4:4:4 chroma and high quality keep colours sharp up to the shape borders.
        Image.fromarray(pixels).save(image_dir / file_name, quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append({"id": ann_id, "image_id": image_id, "iscrowd": 0, **obj})
            ann_id += 1
    return {
        "info": {"description": f"synthetic shapes ({split}), seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }


def make_synthetic_coco(out: str | Path, num_train: int = 2000, num_val: int = 200,
                        image_size: int = 128, seed: int = 0) -> Path:
    """Write the dataset under ``out`` (created if needed; existing files of the same names are
    overwritten) and return ``out`` as a Path. See the module docstring for the conventions."""
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train ({num_train}) and num_val ({num_val}) must be >= 0")
    if image_size < 4 * MIN_OBJECT_SIZE:
        raise ValueError(f"image_size ({image_size}) must be at least {4 * MIN_OBJECT_SIZE}")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    next_ann_id = 1
    first_image_id = {"train": 1, "val": num_train + 1}
    for split, num_images in (("train", num_train), ("val", num_val)):
        dataset = _make_split(out, split, num_images, image_size, seed, first_image_id[split], next_ann_id)
        next_ann_id += len(dataset["annotations"])
        with open(out / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(dataset, f)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("Synthetic COCO-format shapes dataset")
    parser.add_argument("--out", required=True, help="output directory (the future --coco_path)")
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_val", type=int, default=200)
    parser.add_argument("--image_size", type=int, default=128, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_synthetic_coco(args.out, args.num_train, args.num_val, args.image_size, args.seed)
    print(f"wrote {args.num_train} training and {args.num_val} validation images of "
          f"{args.image_size}x{args.image_size} to {out} ({len(CATEGORIES)} classes, "
          f"largest category id {max(c['id'] for c in CATEGORIES)}: train with --num_classes "
          f"{max(c['id'] for c in CATEGORIES) + 1})")


if __name__ == "__main__":
    main()
