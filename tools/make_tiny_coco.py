"""Write a tiny synthetic COCO 2017 detection dataset for tests and smoke runs.

Layout under the output directory, as ``--coco_path`` expects::

    train2017/<12-digit id>.jpg   val2017/<12-digit id>.jpg
    annotations/instances_train2017.json   annotations/instances_val2017.json

Each image is a noisy grey background with a few non-overlapping filled shapes; the shape and
colour give the class (see :data:`CATEGORIES`, whose ids are non-contiguous like COCO's). Every
box is the tight pixel box of its shape: a shape covering pixel columns ``x0 .. x0 + w - 1`` and
rows ``y0 .. y0 + h - 1`` has ``bbox = [x0, y0, w, h]``. The first validation image also holds one
crowd annotation (``iscrowd = 1``), and with two or more training images the last one has no
objects. Output depends only on the arguments.

Usage: ``python tools/make_tiny_coco.py OUT_DIR [--num_train 8] [--num_val 4] [--seed 0]``
"""
import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "red_rectangle", "supercategory": "shape",
     "shape": "rectangle", "color": (220, 40, 40)},
    {"id": 3, "name": "green_ellipse", "supercategory": "shape",
     "shape": "ellipse", "color": (40, 200, 60)},
    {"id": 7, "name": "blue_rectangle", "supercategory": "shape",
     "shape": "rectangle", "color": (40, 70, 220)},
)
MIN_OBJECT_SIZE = 12
# Empty pixels kept between shapes, so every shape's box border is background.
OBJECT_GAP = 4
FIRST_IMAGE_ID = {"train": 1, "val": 100000}
IMAGE_ID_STEP = 7


def _place_box(rng: np.random.Generator, width: int, height: int,
               placed: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """A random ``(x0, y0, w, h)`` inside the image and ``OBJECT_GAP`` away from ``placed``, or None."""
    for _ in range(50):
        w = int(rng.integers(MIN_OBJECT_SIZE, max(MIN_OBJECT_SIZE, width // 2) + 1))
        h = int(rng.integers(MIN_OBJECT_SIZE, max(MIN_OBJECT_SIZE, height // 2) + 1))
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        if all(x0 + w + OBJECT_GAP <= px or px + pw + OBJECT_GAP <= x0 or
               y0 + h + OBJECT_GAP <= py or py + ph + OBJECT_GAP <= y0 for px, py, pw, ph in placed):
            return x0, y0, w, h
    return None


def _draw(draw: ImageDraw.ImageDraw, category: dict[str, Any], box: tuple[int, int, int, int]) -> float:
    """Fill ``category``'s shape in ``box = (x0, y0, w, h)``; returns the shape's area."""
    x0, y0, w, h = box
    corners = [x0, y0, x0 + w - 1, y0 + h - 1]  # PIL includes the last row and column
    if category["shape"] == "ellipse":
        draw.ellipse(corners, fill=category["color"])
        return round(math.pi * w * h / 4, 2)
    draw.rectangle(corners, fill=category["color"])
    return float(w * h)


def _make_split(split: str, num_images: int, out_dir: Path, rng: np.random.Generator,
                min_size: int, max_size: int, max_objects: int, noise: int,
                next_ann_id: int, size: tuple[int, int] | None) -> tuple[dict[str, Any], int]:
    """Draw and save one split's images; returns its COCO json dict and the next free annotation id."""
    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in range(num_images):
        image_id = FIRST_IMAGE_ID[split] + IMAGE_ID_STEP * k
        if size is None:
            width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        else:
            width, height = size
        background = int(rng.integers(90, 160))
        pixels = background + rng.integers(-noise, noise + 1, size=(height, width, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)

        # (category, iscrowd) per object; the first object cycles through the classes so that
        # every class occurs once there are at least as many images as classes.
        objects = [(CATEGORIES[k % len(CATEGORIES)], 0)]
        objects += [(CATEGORIES[int(rng.integers(len(CATEGORIES)))], 0)
                    for _ in range(int(rng.integers(0, max_objects)))]
        if split == "val" and k == 0:
            objects.insert(0, (CATEGORIES[0], 1))
        if split == "train" and k == num_images - 1 and num_images >= 2:
            objects = []

        placed: list[tuple[int, int, int, int]] = []
        for category, iscrowd in objects:
            box = _place_box(rng, width, height, placed)
            if box is None:
                continue
            placed.append(box)
            area = _draw(draw, category, box)
            annotations.append({"id": next_ann_id, "image_id": image_id, "category_id": category["id"],
                                "bbox": [float(v) for v in box], "area": area, "iscrowd": iscrowd})
            next_ann_id += 1

        file_name = f"{image_id:012d}.jpg"
        # 4:4:4 chroma so colours stay sharp up to the shape borders.
        image.save(image_dir / file_name, quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})

    dataset = {
        "info": {"description": f"tiny synthetic COCO ({split})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES],
    }
    return dataset, next_ann_id


def make_tiny_coco(out_dir: str | Path, num_train: int = 8, num_val: int = 4, min_size: int = 64,
                   max_size: int = 160, max_objects: int = 3, noise: int = 10, seed: int = 0,
                   size: tuple[int, int] | None = None) -> Path:
    """Write the dataset under ``out_dir`` (created if needed) and return ``out_dir`` as a Path.

    Args:
        num_train, num_val: images per split.
        min_size, max_size: image width and height are drawn from ``[min_size, max_size]``.
        size: ``(width, height)`` of every image instead of drawn sizes.
        max_objects: at most this many non-crowd objects per image (fewer if they do not fit).
        noise: background pixels vary by up to this much around a per-image grey level.
        seed: seeds everything drawn.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train ({num_train}) and num_val ({num_val}) must be >= 0")
    if not MIN_OBJECT_SIZE <= min_size <= max_size:
        raise ValueError(f"need {MIN_OBJECT_SIZE} <= min_size ({min_size}) <= max_size ({max_size})")
    if size is not None and min(size) < MIN_OBJECT_SIZE:
        raise ValueError(f"need a width and height of at least {MIN_OBJECT_SIZE}, got {size}")
    if max_objects < 1 or noise < 0:
        raise ValueError(f"need max_objects >= 1 (got {max_objects}) and noise >= 0 (got {noise})")
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    next_ann_id = 1
    for split, num_images in (("train", num_train), ("val", num_val)):
        dataset, next_ann_id = _make_split(split, num_images, out_dir, rng, min_size, max_size,
                                           max_objects, noise, next_ann_id, size)
        with open(out_dir / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(dataset, f)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write (used as --coco_path)")
    parser.add_argument("--num_train", type=int, default=8)
    parser.add_argument("--num_val", type=int, default=4)
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="SIZE",
                        help="images of this size: one number for squares, or WIDTH HEIGHT "
                        "(overrides --min_size and --max_size)")
    parser.add_argument("--min_size", type=int, default=64)
    parser.add_argument("--max_size", type=int, default=160)
    parser.add_argument("--max_objects", type=int, default=3)
    parser.add_argument("--noise", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = None
    if args.size is not None:
        if len(args.size) > 2:
            parser.error(f"--size takes one number or WIDTH HEIGHT, got {len(args.size)} numbers")
        size = (args.size[0], args.size[-1])
    out_dir = make_tiny_coco(args.out_dir, args.num_train, args.num_val, args.min_size, args.max_size,
                             args.max_objects, args.noise, args.seed, size)
    print(f"wrote {args.num_train} train and {args.num_val} val images to {out_dir}")


if __name__ == "__main__":
    main()
