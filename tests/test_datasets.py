"""Tests of datasets/ (COCO dataset, transforms, sampler, evaluator) and tools/make_tiny_coco.py.

Expected values are computed independently of the code under test: sizes by hand from the
original's formula, boxes from the annotation json, pixels with PIL/numpy directly, metrics with
pycocotools' COCOeval called directly.
"""
import contextlib
import copy
import io
import json
import random
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from torch.utils.data import DataLoader, DistributedSampler, Subset

import datasets.coco_eval
import datasets.transforms as T
import engine
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco import CocoDetection, prepare_target
from datasets.coco_eval import BACKENDS, CocoEvaluator
from datasets.samplers import NodeDistributedSampler
from tools import benchmark_coco_eval
from tools.make_tiny_coco import CATEGORIES, make_tiny_coco
from util.box_ops import box_cxcywh_to_xyxy
from util.misc import NestedTensor, collate_fn

from helpers import REPO, SMALL_MODEL, parse, run_main, subprocess_env, tree_digest

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
COLORS = {c["id"]: np.array(c["color"]) for c in CATEGORIES}
SHAPES = {c["id"]: c["shape"] for c in CATEGORIES}
TARGET_KEYS = {"boxes", "labels", "image_id", "area", "iscrowd", "orig_size", "size"}
NUM_TRAIN, NUM_VAL = 6, 4


def data_args(coco_path):
    """main.py's defaults (original resize sizes) with ``--coco_path``."""
    return parse(["--coco_path", str(coco_path)])


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)


@pytest.fixture(scope="module")
def val_set(coco_root):
    return build_dataset("val", data_args(coco_root))


@pytest.fixture(scope="module")
def train_set(coco_root):
    return build_dataset("train", data_args(coco_root))


def load_json(coco_root, split):
    with open(coco_root / "annotations" / f"instances_{split}2017.json") as f:
        return json.load(f)


def quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def is_color(pixel, category_id) -> bool:
    return np.abs(pixel.astype(int) - COLORS[category_id]).sum() < 60


def is_not_color(pixel, category_id) -> bool:
    return np.abs(pixel.astype(int) - COLORS[category_id]).sum() > 100


def denormalize(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` normalised tensor to ``(H, W, 3)`` 0..255 floats."""
    image = image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return (image * 255).permute(1, 2, 0).numpy()


def target_to_pixels(target):
    """Relative cxcywh boxes to absolute xyxy in the original image."""
    h, w = target["orig_size"].tolist()
    return box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h], dtype=torch.float32)


# ---------------------------------------------------------------- eval transform sizes

# (w, h) in -> (h, w) out for short side 800, long side at most 1333, per the original's
# get_size_with_aspect_ratio:
#   640x427: long/short*800 = 1199.06 <= 1333, no clamp; h = 800, w = int(800*640/427) = int(1199.06) = 1199
#   500x375: 1066.67 <= 1333; h = 800, w = int(800*500/375) = int(1066.67) = 1066 (truncated, not 1067)
#   427x640: portrait of the first case: w = 800, h = 1199
#   375x500: portrait of the second: w = 800, h = int(800*500/375) = 1066
#   1000x400: 2.5*800 = 2000 > 1333 -> short = int(round(1333*400/1000)) = round(533.2) = 533,
#             w = int(533*1000/400) = int(1332.5) = 1332
#   2666x1001: 2130.7 > 1333 -> short = round(1333*1001/2666) = round(500.5) = 500 (half to even;
#             half-up would give 501), w = int(500*2666/1001) = int(1331.67) = 1331
#   1200x800: short side already 800 -> unchanged
#   64x48: 1066.67 <= 1333; h = 800, w = int(800*64/48) = 1066
EVAL_SIZES = [((640, 427), (800, 1199)), ((500, 375), (800, 1066)),
              ((427, 640), (1199, 800)), ((375, 500), (1066, 800)),
              ((1000, 400), (533, 1332)), ((2666, 1001), (500, 1331)), ((1200, 800), (800, 1200)),
              ((64, 48), (800, 1066))]


@pytest.mark.parametrize("wh, expected_hw", EVAL_SIZES)
def test_eval_transform_size(wh, expected_hw):
    assert T.get_size_with_aspect_ratio(wh, 800, 1333) == expected_hw
    image = PIL.Image.new("RGB", wh, (10, 20, 30))
    target = {"boxes": torch.tensor([[0.0, 0.0, wh[0], wh[1]]]), "area": torch.tensor([float(wh[0] * wh[1])]),
              "size": torch.tensor([wh[1], wh[0]])}
    out, out_target = T.make_coco_transforms("val")(image, target)
    assert tuple(out.shape) == (3, *expected_hw)
    assert out_target["size"].tolist() == list(expected_hw)
    # The whole-image box stays the whole image.
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    torch.testing.assert_close(out_target["area"], torch.tensor([float(expected_hw[0] * expected_hw[1])]))


def test_val_transform_pixels_match_pil_and_numpy():
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    out, _ = T.make_coco_transforms("val")(image, {"boxes": torch.zeros(0, 4)})
    resized = np.asarray(image.resize((1066, 800), PIL.Image.BILINEAR))
    expected = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255
    expected = (expected - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_make_coco_transforms_rejects_unknown_split():
    with pytest.raises(ValueError, match="test"):
        T.make_coco_transforms("test")


# ---------------------------------------------------------------- target preparation

def test_prepare_target_crowd_degenerate_and_clipping():
    annotations = [
        {"id": 1, "bbox": [10, 20, 30, 40], "category_id": 3, "area": 1000.5, "iscrowd": 0},
        {"id": 2, "bbox": [0, 0, 50, 50], "category_id": 1, "area": 2500, "iscrowd": 1},   # crowd
        {"id": 3, "bbox": [90, 70, 30, 30], "category_id": 7, "area": 900, "iscrowd": 0},  # past bottom-right
        {"id": 4, "bbox": [-5, -6, 10, 10], "category_id": 1, "area": 100, "iscrowd": 0},  # past top-left
        {"id": 5, "bbox": [50, 10, 0, 20], "category_id": 3, "area": 0, "iscrowd": 0},     # zero width
        {"id": 6, "bbox": [120, 10, 10, 10], "category_id": 7, "area": 100, "iscrowd": 0}, # right of image
        {"id": 7, "bbox": [5, 5, 10, 0.5], "category_id": 90, "area": 5},                  # no iscrowd key
    ]
    target = prepare_target((100, 80), 42, annotations)
    assert set(target) == TARGET_KEYS
    assert torch.equal(target["boxes"], torch.tensor(
        [[10, 20, 40, 60], [90, 70, 100, 80], [0, 0, 5, 4], [5, 5, 15, 5.5]], dtype=torch.float32))
    assert torch.equal(target["labels"], torch.tensor([3, 7, 1, 90]))
    assert torch.equal(target["area"], torch.tensor([1000.5, 900, 100, 5], dtype=torch.float32))
    assert torch.equal(target["iscrowd"], torch.zeros(4, dtype=torch.int64))
    assert torch.equal(target["image_id"], torch.tensor([42]))
    assert torch.equal(target["orig_size"], torch.tensor([80, 100]))
    assert torch.equal(target["size"], torch.tensor([80, 100]))
    for key, dtype in [("boxes", torch.float32), ("labels", torch.int64), ("image_id", torch.int64),
                       ("area", torch.float32), ("iscrowd", torch.int64), ("orig_size", torch.int64)]:
        assert target[key].dtype == dtype, key


def test_prepare_target_empty_and_missing_key():
    target = prepare_target((30, 20), 1, [])
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["iscrowd"].dtype == torch.int64 and target["area"].dtype == torch.float32
    with pytest.raises(KeyError, match="'bbox'"):
        prepare_target((30, 20), 1, [{"id": 9, "category_id": 1, "area": 1.0}])


# ---------------------------------------------------------------- train transforms

def coordinate_image(w, h):
    """Red channel = x, green channel = y, so a crop reveals its offset in its first pixel."""
    ys, xs = np.mgrid[0:h, 0:w]
    return PIL.Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8))


def boxes_target(boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    n = len(boxes)
    return {"boxes": boxes, "labels": torch.arange(1, n + 1), "area": torch.full((n,), 7.0),
            "iscrowd": torch.zeros(n, dtype=torch.int64), "size": torch.tensor([0, 0])}


def test_horizontal_flip_mirrors_image_and_box_centres():
    image = coordinate_image(40, 30)
    target = boxes_target([[2, 3, 12, 20], [30, 0, 40, 30]])
    plain = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    flipped = T.Compose([T.RandomHorizontalFlip(p=1.0), T.ToTensor(), T.Normalize(MEAN, STD)])
    img0, t0 = plain(image, target)
    img1, t1 = flipped(image, target)
    assert torch.equal(img1, img0.flip(-1))
    torch.testing.assert_close(t1["boxes"][:, 0], 1 - t0["boxes"][:, 0])
    torch.testing.assert_close(t1["boxes"][:, 1:], t0["boxes"][:, 1:])
    assert torch.equal(target["boxes"], torch.tensor([[2, 3, 12, 20], [30, 0, 40, 30]], dtype=torch.float32))


@pytest.mark.parametrize("seed", range(6))
def test_random_size_crop_keeps_only_boxes_inside(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    original = [[0, 0, 10, 10], [20, 15, 60, 50], [70, 5, 99, 25], [5, 60, 30, 79], [45, 40, 55, 45]]
    image = coordinate_image(100, 80)
    cropped, target = T.RandomSizeCrop(20, 60)(image, boxes_target(original))
    cw, ch = cropped.size
    left, top = np.asarray(cropped)[0, 0, :2].tolist()  # offsets read back from the pixels
    assert 20 <= cw <= 60 and 20 <= ch <= 60
    expected, kept = [], []
    for k, (x0, y0, x1, y1) in enumerate(original):
        ix0, iy0 = max(x0, left) - left, max(y0, top) - top
        ix1, iy1 = min(x1, left + cw) - left, min(y1, top + ch) - top
        if ix1 > ix0 and iy1 > iy0:
            expected.append([ix0, iy0, ix1, iy1])
            kept.append(k)
    assert torch.equal(target["boxes"], torch.tensor(expected, dtype=torch.float32).reshape(-1, 4))
    assert target["labels"].tolist() == [k + 1 for k in kept]
    assert len(target["iscrowd"]) == len(kept)
    expected_area = [(b[2] - b[0]) * (b[3] - b[1]) for b in expected]
    assert target["area"].tolist() == pytest.approx(expected_area)
    assert target["size"].tolist() == [ch, cw]


def test_train_transforms_keep_boxes_on_their_shapes(train_set, coco_root):
    gt = load_json(coco_root, "train")
    image_info = {im["id"]: im for im in gt["images"]}
    transforms = T.make_coco_transforms("train")
    random.seed(0)
    torch.manual_seed(0)
    checked = 0
    for _ in range(3):
        for index in range(len(train_set)):
            image_id = train_set.ids[index]
            image = PIL.Image.open(coco_root / "train2017" / image_info[image_id]["file_name"]).convert("RGB")
            anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
            out, target = transforms(image, prepare_target(image.size, image_id, anns))
            h, w = out.shape[-2:]
            assert target["size"].tolist() == [h, w]
            assert max(h, w) <= 1333
            assert min(h, w) in T.DEFAULT_SCALES or max(h, w) > 1300
            boxes = target["boxes"]
            assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
            assert set(target["labels"].tolist()) <= {a["category_id"] for a in anns}
            pixels = denormalize(out)
            for (cx, cy, bw, bh), label in zip(boxes.tolist(), target["labels"].tolist()):
                # A rectangle cut by a crop is still filled; an ellipse's centre may be cut off.
                if SHAPES[label] == "rectangle" and bw * w >= 8 and bh * h >= 8:
                    assert is_color(pixels[int(cy * h), int(cx * w)], label)
                    checked += 1
    assert checked >= 10


# ---------------------------------------------------------------- make_tiny_coco

def test_tiny_coco_loads_and_boxes_lie_on_shapes(coco_root):
    crowd = 0
    for split, num_images in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        coco = quiet_coco(coco_root / "annotations" / f"instances_{split}2017.json")
        assert len(coco.getImgIds()) == num_images
        assert sorted(coco.getCatIds()) == [1, 3, 7]
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            pixels = np.asarray(PIL.Image.open(coco_root / f"{split}2017" / info["file_name"]).convert("RGB"))
            assert pixels.shape == (info["height"], info["width"], 3)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                crowd += ann["iscrowd"]
                x, y, bw, bh = (int(v) for v in ann["bbox"])
                label = ann["category_id"]
                assert x >= 0 and y >= 0 and x + bw <= info["width"] and y + bh <= info["height"]
                assert is_color(pixels[y + bh // 2, x + bw // 2], label)
                mid_x, mid_y = x + bw // 2, y + bh // 2
                # The box is tight: a rectangle fills its border pixels, an ellipse reaches within two
                # pixels of each edge midpoint (its extreme points are thin); just outside is background.
                d = 0 if SHAPES[label] == "rectangle" else 2
                inside = [(x + d, mid_y), (x + bw - 1 - d, mid_y), (mid_x, y + d), (mid_x, y + bh - 1 - d)]
                for px, py in inside:
                    assert is_color(pixels[py, px], label), (split, ann["id"], px, py)
                for px, py in [(x - 1, mid_y), (x + bw, mid_y), (mid_x, y - 1), (mid_x, y + bh)]:
                    if 0 <= px < info["width"] and 0 <= py < info["height"]:
                        assert is_not_color(pixels[py, px], label), (split, ann["id"], px, py)
    assert crowd == 1


def test_tiny_coco_is_deterministic(tmp_path, coco_root):
    again = make_tiny_coco(tmp_path / "again", num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    other = make_tiny_coco(tmp_path / "other", num_train=NUM_TRAIN, num_val=NUM_VAL, seed=1)
    for split in ("train", "val"):
        assert load_json(again, split) == load_json(coco_root, split)
        assert load_json(other, split) != load_json(coco_root, split)
        for im in load_json(coco_root, split)["images"]:
            name = f"{split}2017/{im['file_name']}"
            assert (again / name).read_bytes() == (coco_root / name).read_bytes()


def test_tiny_coco_fixed_size(tmp_path):
    """size=(w, h) gives every image that size."""
    wide = make_tiny_coco(tmp_path / "wide", num_train=3, num_val=1, size=(200, 120), seed=0)
    for split in ("train", "val"):
        for im in load_json(wide, split)["images"]:
            assert (im["width"], im["height"]) == (200, 120)
            with PIL.Image.open(wide / f"{split}2017" / im["file_name"]) as image:
                assert image.size == (200, 120)
    with pytest.raises(ValueError, match="at least"):
        make_tiny_coco(tmp_path / "small", size=(200, 5))


def test_tiny_coco_command_line(tmp_path):
    """The command tools/gpu_check.py runs (a fixed size) and the size range: the files the
    function writes for the same arguments; a --size of three numbers is refused."""
    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "tools/make_tiny_coco.py", *argv], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)

    proc = cli(str(tmp_path / "fixed"), "--num_train", "3", "--num_val", "2", "--size", "96", "72")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote 3 train and 2 val images to {tmp_path / 'fixed'}\n"
    assert tree_digest(tmp_path / "fixed") == tree_digest(
        make_tiny_coco(tmp_path / "fixed_function", num_train=3, num_val=2, size=(96, 72)))
    proc = cli(str(tmp_path / "range"), "--num_train", "2", "--num_val", "1", "--min_size", "70", "--max_size", "90",
               "--max_objects", "2", "--noise", "3", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(tmp_path / "range") == tree_digest(
        make_tiny_coco(tmp_path / "range_function", num_train=2, num_val=1, min_size=70, max_size=90, max_objects=2,
                       noise=3, seed=5))
    proc = cli(str(tmp_path / "bad"), "--size", "1", "2", "3")
    assert proc.returncode == 2 and "--size takes one number or WIDTH HEIGHT, got 3 numbers" in proc.stderr
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- dataset

def test_dataset_items(val_set, train_set, coco_root):
    for dataset, split in ((val_set, "val"), (train_set, "train")):
        gt = load_json(coco_root, split)
        images = {im["id"]: im for im in gt["images"]}
        assert dataset.ids == sorted(images)
        for index in range(len(dataset)):
            image, target = dataset[index]
            assert set(target) == TARGET_KEYS
            assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
            assert target["size"].tolist() == list(image.shape[-2:])
            image_id = dataset.ids[index]
            assert target["image_id"].tolist() == [image_id]
            assert target["orig_size"].tolist() == [images[image_id]["height"], images[image_id]["width"]]
            for key, dtype in [("boxes", torch.float32), ("labels", torch.int64), ("image_id", torch.int64),
                               ("area", torch.float32), ("iscrowd", torch.int64), ("orig_size", torch.int64),
                               ("size", torch.int64)]:
                assert target[key].dtype == dtype, key
            anns = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
            assert target["boxes"].shape == (len(anns), 4)
            if split == "val":
                # Back in original pixels the boxes are the json boxes (the val transform only resizes).
                expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
                torch.testing.assert_close(target_to_pixels(target), expected.reshape(-1, 4),
                                           atol=1e-3, rtol=0)
                assert target["labels"].tolist() == [a["category_id"] for a in anns]
    # The crowd annotation of the first val image is dropped; the last train image has no objects.
    first_val = load_json(coco_root, "val")["annotations"]
    assert len(val_set[0][1]["boxes"]) == sum(a["image_id"] == val_set.ids[0] for a in first_val) - 1
    assert len(train_set[len(train_set) - 1][1]["boxes"]) == 0


def test_cache_mode_caches_local_share_and_matches(coco_root, val_set):
    folder, ann_file = coco_root / "val2017", coco_root / "annotations" / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        cached = CocoDetection(folder, ann_file, T.make_coco_transforms("val"), cache_mode=True,
                               local_rank=1, local_size=2)
    names = [cached.coco.imgs[i]["file_name"] for i in cached.ids]
    assert set(cached.cache) == {names[i] for i in range(1, len(names), 2)}
    for index in range(len(cached)):
        image, target = cached[index]
        ref_image, ref_target = val_set[index]
        assert torch.equal(image, ref_image)
        assert all(torch.equal(target[k], ref_target[k]) for k in TARGET_KEYS)


def test_get_coco_api_and_missing_path(val_set, tmp_path):
    nested = Subset(Subset(val_set, [0, 1, 2]), [1])
    assert get_coco_api_from_dataset(nested) is val_set.coco
    with pytest.raises(TypeError):
        get_coco_api_from_dataset([1, 2, 3])
    missing = tmp_path / "no_coco_here"
    with pytest.raises(FileNotFoundError, match="no_coco_here"):
        build_dataset("val", data_args(missing))


def test_collate_fn_batches_with_padding(val_set):
    loader = DataLoader(Subset(val_set, [0, 1]), batch_size=2, collate_fn=collate_fn)
    samples, targets = next(iter(loader))
    sizes = [val_set[i][0].shape[-2:] for i in (0, 1)]
    assert isinstance(samples, NestedTensor) and len(targets) == 2
    max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    assert samples.tensors.shape == (2, 3, max_h, max_w) and samples.mask.shape == (2, max_h, max_w)
    for k, (h, w) in enumerate(sizes):
        assert torch.equal(samples.tensors[k, :, :h, :w], val_set[k][0])
        assert not samples.mask[k, :h, :w].any() and samples.mask[k].sum() == max_h * max_w - h * w
        assert (samples.tensors[k][:, h:, :] == 0).all() and (samples.tensors[k][:, :, w:] == 0).all()
        assert torch.equal(targets[k]["boxes"], val_set[k][1]["boxes"])


# ---------------------------------------------------------------- sampler

@pytest.mark.parametrize("n, world", [(10, 4), (7, 3), (2, 4)])
def test_node_sampler_with_one_process_per_node_is_torch_distributed_sampler(n, world):
    for epoch in (0, 3):
        for rank in range(world):
            ours = NodeDistributedSampler(range(n), num_replicas=world, rank=rank, local_rank=0, local_size=1)
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


@pytest.mark.parametrize("shuffle", [True, False])
def test_node_sampler_reads_only_local_share(shuffle):
    n, world, local = 23, 6, 3  # 2 nodes of 3 processes
    per_rank = -(-n // world)
    seen = []
    for rank in range(world):
        sampler = NodeDistributedSampler(range(n), num_replicas=world, rank=rank, local_rank=rank % local,
                                         local_size=local, shuffle=shuffle)
        sampler.set_epoch(5)
        indices = list(sampler)
        assert len(indices) == len(sampler) == per_rank
        assert all(i % local == rank % local for i in indices)
        seen += indices
    assert set(seen) == set(range(n))
    sampler = NodeDistributedSampler(range(n), num_replicas=world, rank=0, local_rank=0, local_size=local)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    with pytest.raises(ValueError, match="local rank"):
        NodeDistributedSampler(range(n), num_replicas=world, rank=1, local_rank=0, local_size=local)


# ---------------------------------------------------------------- evaluator

def gt_predictions(dataset):
    """Ground-truth boxes of every dataset item as score-1 predictions in original-image pixels."""
    predictions = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        predictions[int(target["image_id"])] = {"boxes": target_to_pixels(target),
                                                "scores": torch.ones(len(target["boxes"])),
                                                "labels": target["labels"]}
    return predictions


def run_evaluator(evaluator):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.coco_eval["bbox"].stats, out.getvalue()


# pycocotools' precision tp / (tp + fp + machine epsilon) where tp + fp = 1; faster-coco-eval's
# tp / (tp + fp) is 1 there. For any larger tp + fp the epsilon is lost in rounding.
PYCOCOTOOLS_ONE = 1 / (1 + np.spacing(1))


def pycocotools_reference(coco_gt: COCO, results: list[dict], image_ids: list[int]) -> tuple[COCOeval, list[str]]:
    """pycocotools' COCOeval run directly on ``results`` over ``image_ids``, and its printed summary."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        reference = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        reference.params.imgIds = image_ids
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    return reference, summary_lines(out.getvalue())


def summary_lines(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith(" Average")]


def as_predictions(results: list[dict], image_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """pycocotools' result dicts as the evaluator's input (float64 xyxy boxes), for each of
    ``image_ids`` (those without results get empty tensors), in the results' order."""
    predictions = {}
    for image_id in image_ids:
        rows = [r for r in results if r["image_id"] == image_id]
        xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float64).reshape(-1, 4)
        predictions[image_id] = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                                 "scores": torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                                 "labels": torch.tensor([r["category_id"] for r in rows], dtype=torch.int64)}
    return predictions


def assert_matches_pycocotools(evaluated, reference: COCOeval, backend: str) -> None:
    """``evaluated`` (a CocoEvaluator's ``coco_eval["bbox"]``) has ``reference``'s 12 numbers and
    precision, recall and score tables, bit for bit; with faster-coco-eval, once each
    ``PYCOCOTOOLS_ONE`` precision of the reference is 1, which moves the 12 numbers by less than 1e-15."""
    np.testing.assert_allclose(evaluated.stats, reference.stats, rtol=0, atol=1e-15)
    if backend == "faster":
        precision = reference.eval["precision"]
        reference = copy.copy(reference)
        reference.eval = {**reference.eval, "precision": np.where(precision == PYCOCOTOOLS_ONE, 1.0, precision)}
        with contextlib.redirect_stdout(io.StringIO()):
            reference.summarize()  # pycocotools' 12 numbers of that table
    np.testing.assert_array_equal(evaluated.stats, reference.stats)
    for key in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(evaluated.eval[key], reference.eval[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluator_perfect_predictions(val_set, backend):
    evaluator = CocoEvaluator(get_coco_api_from_dataset(val_set), ("bbox",), backend=backend)
    predictions = gt_predictions(val_set)
    for image_id in predictions:  # one image per batch
        evaluator.update({image_id: predictions[image_id]})
    stats, printed = run_evaluator(evaluator)
    assert stats.shape == (12,)
    assert stats[0] == stats[1] == stats[2] == 1.0
    assert stats[8] == 1.0  # AR@100
    assert printed.count("Average Precision") == 6 and printed.count("Average Recall") == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluator_matches_pycocotools_on_noisy_detections(val_set, monkeypatch, backend):
    coco_gt = get_coco_api_from_dataset(val_set)
    rng = np.random.default_rng(0)
    results = []  # pycocotools result format, the independent reference
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        for _ in range(2):  # a jittered and a worse copy, multiples of 1/8 so xyxy <-> xywh is exact
            x, y, w, h = (np.array(ann["bbox"]) + rng.integers(-24, 25, size=4) / 8).tolist()
            results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": [x, y, max(w, 1.0), max(h, 1.0)], "score": rng.integers(1, 1000) / 1000})
    for image_id in coco_gt.getImgIds():  # false positives, some with the wrong class
        for _ in range(3):
            x, y = rng.integers(0, 40, size=2).tolist()
            results.append({"image_id": image_id, "category_id": int(rng.choice([1, 3, 7])),
                            "bbox": [float(x), float(y), 20.0, 16.0], "score": rng.integers(1, 1000) / 1000})

    reference, reference_summary = pycocotools_reference(coco_gt, results, coco_gt.getImgIds())
    assert 0.1 < reference.stats[0] < 0.95

    # Two simulated processes; the shared image appears on both (sampler padding) and counts once.
    predictions = as_predictions(results, coco_gt.getImgIds())
    image_ids = coco_gt.getImgIds()
    rank0, rank1 = CocoEvaluator(coco_gt, backend=backend), CocoEvaluator(coco_gt, backend=backend)
    rank0.update({i: predictions[i] for i in image_ids[:2]})
    rank0.update({image_ids[2]: predictions[image_ids[2]]})
    rank1.update({i: predictions[i] for i in image_ids[2:]})
    monkeypatch.setattr(datasets.coco_eval, "all_gather", lambda obj: [rank0.detections, rank1.detections])
    _, printed = run_evaluator(rank0)
    assert_matches_pycocotools(rank0.coco_eval["bbox"], reference, backend)
    assert summary_lines(printed) == reference_summary


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluator_empty_predictions(val_set, backend):
    coco_gt = get_coco_api_from_dataset(val_set)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)}
    evaluator = CocoEvaluator(coco_gt, backend=backend)
    evaluator.update({i: empty for i in coco_gt.getImgIds()})
    stats, _ = run_evaluator(evaluator)
    assert stats[0] == 0.0 and stats[8] == 0.0
    stats, _ = run_evaluator(CocoEvaluator(coco_gt, backend=backend))  # nothing evaluated at all
    assert (stats == -1).all()
    with pytest.raises(KeyError, match="123456789"):
        CocoEvaluator(coco_gt, backend=backend).update({123456789: empty})
    with pytest.raises(RuntimeError, match="synchronize"):
        CocoEvaluator(coco_gt, backend=backend).accumulate()
    with pytest.raises(ValueError, match="backend must be one of"):
        CocoEvaluator(coco_gt, backend="fast")


def synthetic_evaluation_set(seed: int, num_images: int = 480) -> tuple[dict, list[dict], list[int]]:
    """Ground truth (a COCO dataset dict), detections (pycocotools' result dicts) and the ids of the
    images predicted on, for the corners of COCO evaluation: crowd boxes with detections inside,
    images without objects, images predicted with no detections and images not predicted at all,
    more than 100 detections on some images, tied scores, wrong classes, a category without
    annotations, annotated areas unlike the boxes' and all three area ranges.

    Coordinates are multiples of 1/8 below 1024, so xywh <-> xyxy is exact in float64.
    """
    rng = np.random.default_rng(seed)
    categories = [{"id": c, "name": f"class{c}"} for c in (1, 3, 7, 12)]  # 12: never annotated
    images, annotations, results, predicted = [], [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480})
        objects = [] if image_id % 6 == 0 else range(int(rng.integers(1, 16)))
        for _ in objects:
            crowd = rng.random() < 0.1
            w, h = np.round(np.exp(rng.uniform(np.log(4), np.log(400 if crowd else 300), size=2)) * 8) / 8
            x, y = rng.integers(0, 2400, size=2) / 8
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice([1, 3, 7])), "bbox": [x, y, w, h],
                                "area": float(w * h * rng.uniform(0.4, 1.0)), "iscrowd": int(crowd)})
        if image_id % 6 == 2:  # not predicted: left out of the evaluation
            continue
        predicted.append(image_id)
        if image_id % 6 == 1:  # predicted, with no detections
            continue
        detections = []  # (x, y, w, h, category, score in 64ths): 64 levels, so scores tie
        for ann in (a for a in annotations if a["image_id"] == image_id):
            x, y, w, h = ann["bbox"]
            for _ in range(int(rng.integers(0, 8 if ann["iscrowd"] else 4))):
                if ann["iscrowd"]:  # half-size boxes inside the crowd region
                    dx, dy, sw, sh = *(rng.integers(0, 5, size=2) / 8), 0.5, 0.5
                else:  # jittered by up to 1/16 of the size, 7/8 to 9/8 as large
                    dx, dy, sw, sh = *(rng.integers(-4, 5, size=2) / 64), *(rng.integers(7, 10, size=2) / 8)
                category = ann["category_id"] if rng.random() < 0.85 else int(rng.choice([1, 3, 7, 12]))
                detections.append((x + dx * w, y + dy * h, np.ceil(w * sw * 8) / 8, np.ceil(h * sh * 8) / 8,
                                   category, int(rng.integers(16, 65))))
        for _ in range(int(rng.integers(0, 160)) if image_id % 3 == 0 else int(rng.integers(0, 20))):
            w, h = np.round(np.exp(rng.uniform(np.log(2), np.log(300), size=2)) * 8) / 8
            detections.append((*(rng.integers(0, 2400, size=2) / 8), w, h, int(rng.choice([1, 3, 7, 12])),
                               int(rng.integers(1, 49))))
        results += [{"image_id": image_id, "category_id": category, "bbox": [float(x), float(y), float(w), float(h)],
                     "score": score / 64} for x, y, w, h, category, score in detections]
    return {"images": images, "annotations": annotations, "categories": categories}, results, predicted


@pytest.fixture(scope="module")
def synthetic_evaluation():
    """The synthetic set (:func:`synthetic_evaluation_set`), its ground truth as pycocotools'
    ``COCO``, and pycocotools' COCOeval run on it directly with its printed summary."""
    dataset, results, predicted = synthetic_evaluation_set(seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
    return coco_gt, results, predicted, *pycocotools_reference(coco_gt, results, predicted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluator_matches_pycocotools_on_a_larger_synthetic_set(synthetic_evaluation, monkeypatch, backend):
    coco_gt, results, predicted, reference, reference_summary = synthetic_evaluation
    assert 0.1 < reference.stats[0] < 0.5 and reference.stats[3] > 0  # all three area ranges have AP
    per_image = np.bincount([r["image_id"] for r in results])
    assert per_image.max() > 100 and len(predicted) < len(coco_gt.imgs)
    assert any(a["iscrowd"] for a in coco_gt.dataset["annotations"])
    assert any(not coco_gt.imgToAnns[i] for i in predicted) and any(per_image[i] == 0 for i in predicted[:-1])
    assert len({r["score"] for r in results}) < len(results) / 100  # many ties

    # Three simulated processes; the last one repeats the first two images (sampler padding).
    predictions = as_predictions(results, predicted)
    ranks = [CocoEvaluator(coco_gt, backend=backend) for _ in range(3)]
    for k, image_id in enumerate(predicted):
        ranks[k % 3].update({image_id: predictions[image_id]})
    ranks[2].update({i: predictions[i] for i in predicted[:2]})
    monkeypatch.setattr(datasets.coco_eval, "all_gather", lambda obj: [rank.detections for rank in ranks])
    _, printed = run_evaluator(ranks[0])
    assert_matches_pycocotools(ranks[0].coco_eval["bbox"], reference, backend)
    assert summary_lines(printed) == reference_summary


def test_faster_backend_keeps_pycocotools_eval(val_set, tmp_path):
    """The ``eval`` that main.py saves (eval/*.pth) is pycocotools' dict with either backend, and
    unpickles without faster-coco-eval."""
    coco_gt = get_coco_api_from_dataset(val_set)
    evaluated = {}
    for backend in BACKENDS:
        evaluator = CocoEvaluator(coco_gt, backend=backend)
        evaluator.update(gt_predictions(val_set))
        run_evaluator(evaluator)
        evaluated[backend] = evaluator.coco_eval["bbox"].eval
    reference, faster = evaluated["pycocotools"], evaluated["faster"]
    assert list(faster) == list(reference) == ["params", "counts", "date", "precision", "recall", "scores"]
    assert type(faster["params"]) is type(reference["params"])
    assert sorted(vars(faster["params"])) == sorted(vars(reference["params"]))
    for name, value in vars(reference["params"]).items():
        np.testing.assert_equal(getattr(faster["params"], name), value, err_msg=name)
    assert faster["counts"] == reference["counts"]
    for key in ("precision", "recall", "scores"):  # their values: the tests above
        assert faster[key].shape == reference[key].shape and faster[key].dtype == reference[key].dtype

    torch.save(faster, tmp_path / "eval.pth")
    read = ("import sys; sys.modules['faster_coco_eval'] = None; import torch; "
            f"e = torch.load({str(tmp_path / 'eval.pth')!r}, weights_only=False); "
            "print(type(e['params']).__module__, sorted(e), e['precision'].shape)")
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["pycocotools.cocoeval", "['counts',", "'date',", "'params',", "'precision',",
                           "'recall',", "'scores']", "(10,", "101,", "3,", "4,", "3)"]


def test_main_evaluates_with_the_chosen_backend(coco_root, tmp_path, monkeypatch):
    backends = []

    class Recorded(CocoEvaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            backends.append(self.backend)

    monkeypatch.setattr(engine, "CocoEvaluator", Recorded)
    assert parse([]).coco_eval_backend == "pycocotools"
    proc = run_main([*SMALL_MODEL, "--coco_path", str(coco_root), "--output_dir", str(tmp_path), "--eval",
                     "--coco_eval_backend", "faster"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert backends == ["faster"]
    assert proc.stdout.count("Average Precision") == 6 and proc.stdout.count("Average Recall") == 6
    assert type(torch.load(tmp_path / "eval.pth", weights_only=False)["params"]) is Params


def test_benchmark_coco_eval_times_both_backends_on_a_coco_like_set(capsys):
    coco, predictions = benchmark_coco_eval.make_synthetic_evaluation(200, 100, seed=1)
    assert len(coco.imgs) == len(predictions) == 200 and len(coco.getCatIds()) == 80
    assert 6.5 < len(coco.anns) / 200 < 8.1 and any(a["iscrowd"] for a in coco.anns.values())
    assert all(len(p["scores"]) == len(p["labels"]) == len(p["boxes"]) == 100 for p in predictions.values())
    boxes = torch.cat([p["boxes"] for p in predictions.values()])
    assert boxes.dtype == torch.float32 and (boxes[:, 2:] > boxes[:, :2]).all()

    benchmark_coco_eval.main(["--images", "40", "--detections", "30", "--rounds", "3"])
    out = capsys.readouterr().out
    assert re.search(r"synthetic set: 40 images, \d+ objects, 1200 detections", out), out
    assert len(re.findall(r"round \d: pycocotools [\d.]+ s, faster [\d.]+ s", out)) == 3
    assert re.search(r"median of 3 rounds: pycocotools [\d.]+ s, faster [\d.]+ s \([\d.]+x\)", out), out
    ap, difference = re.search(r"AP ([\d.]+); largest difference between the backends' 12 numbers: (\S+)",
                               out).groups()
    assert 0.1 < float(ap) < 0.9 and float(difference) < 1e-15
