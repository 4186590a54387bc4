"""Tests of the demo tools: synthetic COCO generator, log plotting, inference and benchmark."""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import models.ms_deform_attn as ms_deform_attn_module
from datasets import build_dataset
from models import build_model
from tools import benchmark as benchmark_tool
from tools import benchmark_train, infer, plot_logs
from tools.make_synthetic_coco import CATEGORIES, make_synthetic_coco
from util.logger import format_costs, top_costs

from helpers import BOX_REFINE, MULTI_SCALE, REPO, TWO_STAGE, VARIANT_FLAGS, parse, subprocess_env, tree_digest

TINY_MODEL = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--nheads", "2",
              "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "10",
              "--num_classes", "13"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=6, num_val=40, image_size=128, seed=3)


# ----- make_synthetic_coco -----

def test_synthetic_coco_layout(shapes):
    image_ids, ann_ids = set(), set()
    for split in ("train", "val"):
        coco = COCO(str(shapes / "annotations" / f"instances_{split}2017.json"))
        assert sorted(coco.getCatIds()) == sorted(c["id"] for c in CATEGORIES) == [1, 3, 4, 7, 9, 12]
        for image in coco.dataset["images"]:
            with Image.open(shapes / f"{split}2017" / image["file_name"]) as pil:
                assert pil.format == "JPEG" and pil.size == (image["width"], image["height"]) == (128, 128)
            assert image["file_name"] == f"{image['id']:012d}.jpg"
        for ann in coco.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and ann["image_id"] in coco.imgs
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 1 and h >= 1
            assert 0 < ann["area"] <= w * h
        assert not image_ids & set(coco.imgs) and not ann_ids & set(coco.anns)
        image_ids |= set(coco.imgs)
        ann_ids |= set(coco.anns)

    val = json.loads((shapes / "annotations" / "instances_val2017.json").read_text())
    per_image = np.bincount([a["image_id"] for a in val["annotations"]])
    assert per_image.max() >= 12, "no crowded validation image"
    sides = [max(a["bbox"][2:]) for a in val["annotations"]]
    assert min(sides) < 16 and max(sides) > 64, "object sizes do not range from small to large"
    assert {a["category_id"] for a in val["annotations"]} == {c["id"] for c in CATEGORIES}

    # main.py reads it as it reads COCO
    args = parse(["--coco_path", str(shapes)])
    image, target = build_dataset("val", args)[0]
    assert image.shape[-2:] == (800, 800) and len(target["boxes"]) > 0


def _overlaps(a: list[float], b: list[float], margin: float) -> bool:
    return not (a[0] + a[2] + margin <= b[0] or b[0] + b[2] + margin <= a[0]
                or a[1] + a[3] + margin <= b[1] or b[1] + b[3] + margin <= a[1])


def test_synthetic_boxes_are_tight_on_the_shapes(shapes):
    """For objects whose box, grown by 2 px, meets no other box: the box centre has the object's
    colour, far from the 1-px ring just outside the box, no pixel of which has that colour, while
    each of the box's own edge rows and columns holds a pixel of it (the box is tight)."""
    data = json.loads((shapes / "annotations" / "instances_val2017.json").read_text())
    ring_id = next(c["id"] for c in CATEGORIES if c["name"] == "ring")  # a ring's centre is background
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    checked = 0
    for image in data["images"]:
        px = np.asarray(Image.open(shapes / "val2017" / image["file_name"]).convert("RGB"), dtype=np.float32)
        anns = by_image.get(image["id"], [])
        for ann in anns:
            x, y, w, h = (int(v) for v in ann["bbox"])
            if (ann["category_id"] == ring_id or x < 1 or y < 1 or x + w > 127 or y + h > 127
                    or any(_overlaps(ann["bbox"], other["bbox"], 2) for other in anns if other is not ann)):
                continue
            cx, cy = x + w // 2, y + h // 2
            colour = px[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            outside = np.concatenate([px[y - 1, x - 1:x + w + 1], px[y + h, x - 1:x + w + 1],
                                      px[y - 1:y + h + 1, x - 1], px[y - 1:y + h + 1, x + w]])
            assert np.linalg.norm(outside.mean(0) - colour) > 50, (image["file_name"], ann)
            assert np.linalg.norm(outside - colour, axis=1).min() > 25, (image["file_name"], ann)
            for edge in (px[y, x:x + w], px[y + h - 1, x:x + w], px[y:y + h, x], px[y:y + h, x + w - 1]):
                assert np.linalg.norm(edge - colour, axis=1).min() < 50, (image["file_name"], ann)
            checked += 1
    assert checked >= 20


def test_synthetic_coco_deterministic(tmp_path):
    kwargs = dict(num_train=3, num_val=2, image_size=64)
    first = tree_digest(make_synthetic_coco(tmp_path / "a", seed=5, **kwargs))
    assert first == tree_digest(make_synthetic_coco(tmp_path / "b", seed=5, **kwargs))
    other = tree_digest(make_synthetic_coco(tmp_path / "c", seed=6, **kwargs))
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first if k.endswith(".jpg"))
    # the validation images do not depend on the number of training images
    more_train = tree_digest(make_synthetic_coco(tmp_path / "d", seed=5, num_train=4, num_val=2, image_size=64))
    assert all(more_train[f"val2017/{4 + k:012d}.jpg"] == first[f"val2017/{3 + k:012d}.jpg"] for k in (1, 2))


def test_synthetic_coco_command_line(tmp_path):
    """The command tools/run_demo.sh runs: the files the function writes for the same arguments, and
    the --num_classes the data needs."""
    proc = subprocess.run([sys.executable, "tools/make_synthetic_coco.py", "--out", str(tmp_path / "cli"),
                           "--num_train", "3", "--num_val", "2", "--image_size", "48", "--seed", "7"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    largest = max(c["id"] for c in CATEGORIES)
    assert proc.stdout == (f"wrote 3 training and 2 validation images of 48x48 to {tmp_path / 'cli'} "
                           f"({len(CATEGORIES)} classes, largest category id {largest}: train with --num_classes "
                           f"{largest + 1})\n")
    want = make_synthetic_coco(tmp_path / "function", num_train=3, num_val=2, image_size=48, seed=7)
    assert tree_digest(tmp_path / "cli") == tree_digest(want)
    proc = subprocess.run([sys.executable, "tools/make_synthetic_coco.py", "--num_train", "3"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the following arguments are required: --out" in proc.stderr


# ----- plot_logs -----

def _fake_log(path: Path, epochs: int, with_ap: bool = True, ema_ap: bool = False, **extra) -> Path:
    """A log.txt of ``epochs`` epochs; ``ema_ap`` adds the EMA weights' evaluation, ``extra`` more keys."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(epochs):
        entry = {"train_loss": 10.0 - epoch, "train_loss_ce": 1.0, "train_loss_bbox": 0.5 / (epoch + 1),
                 "train_loss_giou": 0.8, "train_class_error": 50.0, "test_loss": 9.0, "epoch": epoch,
                 "n_parameters": 1000, **extra}
        if with_ap:
            entry["test_coco_eval_bbox"] = [0.1 * epoch, 0.2 * epoch] + [0.0] * 10
        if ema_ap:
            entry["test_ema_coco_eval_bbox"] = [0.1 * epoch + 0.05, 0.3 * epoch] + [0.0] * 10
            entry["test_ema_loss"] = 8.0
        lines.append(json.dumps(entry))
    (path / "log.txt").write_text("\n".join(lines) + "\n")
    return path


def test_plot_logs_png(tmp_path, capsys):
    run_a = _fake_log(tmp_path / "run_a", 3)
    run_b = _fake_log(tmp_path / "run_b", 2, with_ap=False)
    plot_logs.main([str(run_a), str(run_b / "log.txt")])
    out = run_a / "curves.png"
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1300, 480)
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not blank
    assert plot_logs.plot_logs([run_b], tmp_path / "sub" / "b.png").stat().st_size > 0


@pytest.mark.parametrize("content, message", [
    ("", r"log\.txt is empty"),
    ('{"train_loss": 1.0, "epoch": 0}\nnot json\n', r"log\.txt, line 2: not valid JSON"),
    ('[1, 2]\n', r"log\.txt, line 1: expected a JSON object"),
    ('{"test_loss": 1.0}\n', r"no epoch has 'train_loss'"),
    ('{"train_loss": 1.0, "test_coco_eval_bbox": "high"}\n', r"line 1: 'test_coco_eval_bbox' must be a list"),
    ('{"train_loss": 1.0, "test_ema_coco_eval_bbox": [0.5]}\n', r"line 1: 'test_ema_coco_eval_bbox' must be a list"),
])
def test_plot_logs_malformed(tmp_path, content, message):
    (tmp_path / "log.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        plot_logs.plot_logs([tmp_path])
    assert not (tmp_path / "curves.png").exists()


def _curves(ax) -> dict[str, tuple[list, list]]:
    """An axis's lines by legend label: their x and y data."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_plot_logs_draws_the_ema_curves_beside_the_raw_ones(tmp_path):
    # New keys of other kinds in every epoch are ignored, whatever their values.
    extra = {"test_ema_class_error": 40.0, "train_lr": 2e-4, "epoch_time": "0:01:02", "test_ema_skipped_images": 0,
             "best": {"epoch": 1, "ap": 0.2}, "train_lrs": [2e-4, 2e-5], "test_ema_note": None}
    ema = _fake_log(tmp_path / "ema", 3, ema_ap=True, **extra)
    raw = _fake_log(tmp_path / "raw", 2)
    ema_only = _fake_log(tmp_path / "ema_only", 2, with_ap=False, ema_ap=True)
    fig = plot_logs.make_figure([ema, raw, ema_only])
    loss_ax, ap_ax = fig.axes
    ap = _curves(ap_ax)
    expected = {  # 100 x the first two numbers of each key, per epoch
        f"{ema}: AP": ([0, 1, 2], [0.0, 10.0, 20.0]), f"{ema}: AP50": ([0, 1, 2], [0.0, 20.0, 40.0]),
        f"{ema}: EMA AP": ([0, 1, 2], [5.0, 15.0, 25.0]), f"{ema}: EMA AP50": ([0, 1, 2], [0.0, 30.0, 60.0]),
        f"{raw}: AP": ([0, 1], [0.0, 10.0]), f"{raw}: AP50": ([0, 1], [0.0, 20.0]),
        f"{ema_only}: EMA AP": ([0, 1], [5.0, 15.0]), f"{ema_only}: EMA AP50": ([0, 1], [0.0, 30.0])}
    assert ap.keys() == expected.keys()
    for label, (x, y) in expected.items():
        assert ap[label][0] == x and ap[label][1] == pytest.approx(y), label
    lines = {line.get_label(): line for line in ap_ax.get_lines()}
    # one colour per run; EMA told apart by line style
    assert len({lines[f"{ema}: {kind}"].get_color() for kind in ("AP", "AP50", "EMA AP", "EMA AP50")}) == 1
    assert lines[f"{ema}: AP"].get_color() != lines[f"{raw}: AP"].get_color()
    assert len({lines[f"{ema}: {kind}"].get_linestyle() for kind in ("AP", "AP50", "EMA AP", "EMA AP50")}) == 4
    assert {text.get_text() for text in ap_ax.get_legend().get_texts()} == set(expected)
    # the training losses as before, the evaluation losses (raw or EMA) not drawn
    losses = _curves(loss_ax)
    assert losses.keys() == {f"{run}: {key}" for run in (ema, raw, ema_only) for key in ("loss", "loss_ce",
                                                                                          "loss_bbox", "loss_giou")}
    assert losses[f"{ema}: loss"] == ([0, 1, 2], [10.0, 9.0, 8.0])
    plot_logs.plt.close(fig)
    assert plot_logs.plot_logs([ema, raw]).stat().st_size > 0


def test_plot_logs_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no log at .*nowhere"):
        plot_logs.plot_logs([tmp_path / "nowhere"])


# ----- infer -----

def _tiny_args(variant: str, *extra: str) -> argparse.Namespace:
    return parse(TINY_MODEL + VARIANT_FLAGS[variant] + list(extra))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Freshly initialised tiny models saved as main.py saves them (evaluation size 96, max 160)."""
    paths = {}
    for variant in (MULTI_SCALE, BOX_REFINE):
        torch.manual_seed(0)
        args = _tiny_args(variant, "--val_scale", "96", "--max_size", "160")
        model, _, _ = build_model(args)
        paths[variant] = tmp_path_factory.mktemp(variant) / "checkpoint.pth"
        torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, paths[variant])
    return paths


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory) -> Path:
    """A 160x100 (w x h) image, so that resizing scales the two axes differently after rounding."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images") / "wide.png"
    Image.fromarray(rng.integers(0, 256, size=(100, 160, 3), dtype=np.uint8)).save(path)
    return path


def _parse_detections(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


def test_infer_draws_and_prints(checkpoints, shapes, wide_image, tmp_path, capsys):
    val_image = shapes / "val2017" / f"{7:012d}.jpg"
    assert infer.main(["--resume", str(checkpoints[BOX_REFINE]), str(val_image), str(wide_image.parent),
                       "--threshold", "0", "--top_k", "3", "--coco_path", str(shapes), "--out_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("# ") == 2
    lines = _parse_detections(printed)
    assert len(lines) == 6 and all(len(fields) == 6 for fields in lines)
    names = {c["name"] for c in CATEGORIES}
    assert all(fields[0] in names or fields[0].isdigit() for fields in lines)
    assert any(fields[0] in names for fields in lines), "no class named from --coco_path"

    for source, fields in ((val_image, lines[:3]), (wide_image, lines[3:])):
        original = np.asarray(Image.open(source).convert("RGB")).astype(int)
        with Image.open(tmp_path / f"{source.stem}_det.png") as drawn:
            assert drawn.size == (original.shape[1], original.shape[0])
            drawn = np.asarray(drawn.convert("RGB")).astype(int)
        changed = (drawn != original).any(-1)
        assert changed.any()
        h, w = changed.shape
        allowed = np.zeros_like(changed)
        for det in fields:
            x0, y0, x1, y1 = (float(v) for v in det[2:])
            outline = set()
            for t in np.linspace(0, 1, 50):
                outline |= {(round(x0 + t * (x1 - x0)), round(y0)), (round(x0 + t * (x1 - x0)), round(y1)),
                            (round(x0), round(y0 + t * (y1 - y0))), (round(x1), round(y0 + t * (y1 - y0)))}
            inside = [(x, y) for x, y in outline if 1 <= x < w - 1 and 1 <= y < h - 1]
            # every outline pixel inside the image is painted (within a pixel of rounding)
            assert all(changed[y - 1:y + 2, x - 1:x + 2].any() for x, y in inside)
            # painting stays on the outline or the label next to its top-left corner
            xs, ys = np.arange(w)[None, :], np.arange(h)[:, None]
            near_x = (np.abs(xs - x0) <= 2) | (np.abs(xs - x1) <= 2)
            near_y = (np.abs(ys - y0) <= 2) | (np.abs(ys - y1) <= 2)
            within_x = (xs >= x0 - 2) & (xs <= x1 + 2)
            within_y = (ys >= y0 - 2) & (ys <= y1 + 2)
            label = (xs >= x0 - 2) & (xs <= x0 + 100) & (np.abs(ys - y0) <= 16)
            allowed |= (near_x & within_y) | (near_y & within_x) | label
        assert not (changed & ~allowed).any()


@pytest.mark.parametrize("variant", [MULTI_SCALE, BOX_REFINE, TWO_STAGE])
def test_sampling_recorder_matches_msdeformattn(variant, monkeypatch):
    """The hook's locations and weights are exactly those MSDeformAttn hands to the sampling op."""
    torch.manual_seed(0)
    model, _, _ = build_model(_tiny_args(variant))
    model.eval()
    seen = []
    real_op = ms_deform_attn_module.ms_deform_attn

    def spy(value, shapes, start, locations, weights):
        seen.append((locations, weights))
        return real_op(value, shapes, start, locations, weights)

    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn", spy)
    with infer.SamplingRecorder(model.transformer.decoder.layers[-1].cross_attn) as recorder, torch.no_grad():
        model([torch.rand(3, 64, 96)])
    locations, weights = seen[-1]  # the last decoder layer's cross-attention is the last call
    assert recorder.locations.shape == (1, 10, 2, 4, 4, 2)
    assert torch.equal(recorder.locations, locations) and torch.equal(recorder.weights, weights)


def test_infer_sampling_points(checkpoints, wide_image, tmp_path, capsys):
    """Untrained plain model: the box centre is the query's reference point (the last box layer
    starts at zero) and the sampling offsets are symmetric about it (opposite head directions,
    zero offset weights), so in pixels the points' mean must be the printed box centre; this
    checks the mapping from padded-input coordinates to the original (non-square, resized) image."""
    model, train_args = infer.load_model(checkpoints[MULTI_SCALE], "cpu")
    _, detections, points = infer.infer_image(model, train_args, wide_image, torch.device("cpu"),
                                              threshold=0.0, top_k=3, num_sampling_dets=2)
    assert len(detections) == 3 and len(points) == 2
    for det, (xy, weights) in zip(detections, points):
        assert xy.shape == (2 * 4 * 4, 2) and weights.shape == (32,)
        x0, y0, x1, y1 = det.box
        assert torch.allclose(xy.mean(0), torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2]), atol=1e-2)

    common = ["--resume", str(checkpoints[MULTI_SCALE]), str(wide_image), "--threshold", "0", "--top_k", "3"]
    assert infer.main(common + ["--out_dir", str(tmp_path / "boxes")]) == 0
    assert infer.main(common + ["--out_dir", str(tmp_path / "points"), "--show_sampling_points",
                                "--num_sampling_dets", "2"]) == 0
    assert len(_parse_detections(capsys.readouterr().out)) == 6
    boxes = np.asarray(Image.open(tmp_path / "boxes" / "wide_det.png")).astype(int)
    with_points = np.asarray(Image.open(tmp_path / "points" / "wide_det.png")).astype(int)
    differ = np.argwhere((boxes != with_points).any(-1))
    assert len(differ) > 0
    # every pixel the points changed lies within a dot's radius of a sampling point
    centres = torch.cat([xy for xy, _ in points]).numpy()
    distance = np.linalg.norm(differ[:, None, ::-1] + 0.5 - centres[None], axis=-1).min(1)
    assert distance.max() <= 3


def test_infer_in_bfloat16_prints_the_float32_detections_to_its_rounding(wide_image, tmp_path, capsys):
    # class heads spread out, so that the five best scores lie further apart than bfloat16 rounding
    args = _tiny_args(BOX_REFINE, "--val_scale", "96", "--max_size", "160")
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    with torch.no_grad():
        for head in model.class_embed:
            head.weight.normal_(0, 0.2)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, tmp_path / "checkpoint.pth")
    common = ["--resume", str(tmp_path / "checkpoint.pth"), str(wide_image), "--threshold", "0", "--top_k", "5",
              "--out_dir", str(tmp_path)]
    assert infer.main(common) == 0
    want = _parse_detections(capsys.readouterr().out)
    assert infer.main(common + ["--amp", "bf16"]) == 0
    got = _parse_detections(capsys.readouterr().out)
    assert got != want  # it ran in bfloat16
    assert [d[0] for d in got] == [d[0] for d in want]
    for a, b in zip(got, want):
        assert abs(float(a[1]) - float(b[1])) <= 0.01, (a, b)  # score
        assert max(abs(float(x) - float(y)) for x, y in zip(a[2:], b[2:])) <= 2, (a, b)  # box corners in pixels


def test_infer_checkpoint_and_input_handling(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image or folder at .*missing.jpg"):
        infer.image_paths([tmp_path / "missing.jpg"])
    with pytest.raises(FileNotFoundError, match="holds no images"):
        infer.image_paths([tmp_path])
    checkpoint = torch.load(checkpoints[MULTI_SCALE], weights_only=False)
    # args of the original's checkpoints lack --val_scale and --max_size: the original's sizes apply
    old_args = tmp_path / "old_args.pth"
    del checkpoint["args"].val_scale, checkpoint["args"].max_size
    torch.save(checkpoint, old_args)
    _, args = infer.load_model(old_args, "cpu")
    assert (args.val_scale, args.max_size) == (800, 1333)
    no_args = tmp_path / "no_args.pth"
    torch.save({"model": checkpoint["model"]}, no_args)
    with pytest.raises(ValueError, match="no_args.pth has no 'args' entry"):
        infer.load_model(no_args, "cpu")
    wrong = tmp_path / "wrong.pth"
    checkpoint["args"].num_queries = 7
    torch.save(checkpoint, wrong)
    with pytest.raises(ValueError, match=r"wrong.pth \(rebuilt from its own args\) does not fit the model"):
        infer.load_model(wrong, "cpu")
    assert infer.class_names_from(None, '["a", "b"]') == {0: "a", 1: "b"}
    assert infer.class_names_from(None, '{"3": "cat"}') == {3: "cat"}
    with pytest.raises(ValueError, match="neither a file nor valid JSON"):
        infer.class_names_from(None, "cats.json")


def test_infer_reports_bad_input_in_one_line(checkpoints, tmp_path, capsys):
    assert infer.main(["--resume", str(checkpoints[MULTI_SCALE]), str(tmp_path / "missing.jpg")]) == 2
    assert capsys.readouterr().err == f"error: no image or folder at {tmp_path / 'missing.jpg'}\n"


@pytest.mark.parametrize("flags, message", [
    (["--draw_scale", "nan"], "--draw_scale must be a positive number, got nan"),
    (["--draw_scale", "0"], "--draw_scale must be a positive number, got 0.0"),
    (["--threshold", "nan"], "--threshold must be a number, got nan"),
])
def test_infer_refuses_values_that_cannot_work(checkpoints, wide_image, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--resume", str(checkpoints[MULTI_SCALE]), str(wide_image), "--out_dir", str(tmp_path / "o"),
                    *flags])
    assert exit_.value.code == 2 and capsys.readouterr().err.rstrip().endswith(f"error: {message}")
    assert not (tmp_path / "o").exists()


def test_infer_says_when_no_detection_passes_for_sampling_points(checkpoints, wide_image, tmp_path, capsys):
    argv = ["--resume", str(checkpoints[MULTI_SCALE]), str(wide_image), "--threshold", "1.0",
            "--show_sampling_points", "--out_dir", str(tmp_path)]
    assert infer.main(argv) == 0
    out = capsys.readouterr().out
    assert "0 detections above 1.0" in out and "no sampling points drawn" in out


def test_infer_val_scale_and_max_size_replace_the_checkpoints(checkpoints, wide_image, tmp_path, capsys):
    """Given here, the evaluation sizes act as a checkpoint trained with them would."""
    checkpoint = torch.load(checkpoints[MULTI_SCALE], weights_only=False)
    checkpoint["args"].val_scale, checkpoint["args"].max_size = 64, 96
    torch.save(checkpoint, tmp_path / "small.pth")
    common = [str(wide_image), "--threshold", "0", "--top_k", "5", "--out_dir", str(tmp_path)]
    assert infer.main(["--resume", str(tmp_path / "small.pth"), *common]) == 0
    want = _parse_detections(capsys.readouterr().out)
    assert infer.main(["--resume", str(checkpoints[MULTI_SCALE]), "--val_scale", "64", "--max_size", "96",
                       *common]) == 0
    given = _parse_detections(capsys.readouterr().out)
    assert infer.main(["--resume", str(checkpoints[MULTI_SCALE]), *common]) == 0
    assert len(given) == 5 and given == want != _parse_detections(capsys.readouterr().out)


# ----- benchmark -----

def test_benchmark_loads_only_a_checkpoint_of_its_flags(tmp_path, capsys):
    torch.manual_seed(0)
    model, _, _ = build_model(parse(TINY_MODEL))
    torch.save({"model": model.state_dict(), "args": parse(TINY_MODEL)}, tmp_path / "same.pth")
    common = TINY_MODEL + ["--device", "cpu", "--image_size", "64", "96", "--batch_sizes", "1", "--num_iters", "1",
                           "--warmup", "0"]
    assert benchmark_tool.main(common + ["--resume", str(tmp_path / "same.pth")]) == 0
    capsys.readouterr()
    # DC5: the same weight names and shapes, so only the saved args tell
    torch.save({"model": model.state_dict(), "args": parse(TINY_MODEL + ["--dilation"])}, tmp_path / "dc5.pth")
    assert benchmark_tool.main(common + ["--resume", str(tmp_path / "dc5.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'dc5.pth'} was trained with other architecture flags than these: "
                          f"--dilation (checkpoint: True, here: False). It fits configs/") and err.count("\n") == 1



def test_benchmark_prints_fps(capsys):
    assert benchmark_tool.main(TINY_MODEL + ["--device", "cpu", "--image_size", "64", "96", "--num_iters", "1",
                                             "--warmup", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "images/s" in line]
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 4"]
    assert all(float(line.split()[2]) > 0 for line in lines)


def assert_printed_ratios(rows: list[list[str]]) -> None:
    """tools/benchmark.py's rows (``batch B: FPS images/s ...``, split on blanks): each speed over
    the first row's and over the float32 pure-PyTorch row's, as printed, to their rounding."""
    fps = [float(r[2]) for r in rows]
    baseline = next(float(r[2]) for r in rows if (r[9], r[11]) == ("none", "pytorch"))
    for r, speed in zip(rows, fps):
        assert r[-4:-1] == ["speed", "vs", "first"] and r[12:15] == ["vs", "float32", "pytorch"], r
        assert float(r[-1].removesuffix("x")) == pytest.approx(speed / fps[0], rel=2e-3, abs=6e-3), r
        assert float(r[15].removesuffix("x")) == pytest.approx(speed / baseline, rel=2e-3, abs=6e-3), r


def test_benchmark_compares_precisions_and_backends_side_by_side(capsys):
    assert benchmark_tool.main(TINY_MODEL + ["--device", "cpu", "--image_size", "64", "96", "--num_iters", "1",
                                             "--warmup", "0", "--batch_sizes", "2", "--amp", "none", "bf16",
                                             "--compare_backends"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("batch 2:")]
    assert [(r[9], r[11]) for r in rows] == [("none", "compiled"), ("none", "pytorch"), ("bf16", "compiled"),
                                           ("bf16", "pytorch")]
    assert_printed_ratios(rows)


@pytest.mark.slow  # Inductor compiles the model: tens of seconds on two cores
def test_benchmark_times_torch_compile_beside_eager_and_checks_its_outputs(capsys):
    assert benchmark_tool.main(TINY_MODEL + ["--device", "cpu", "--image_size", "64", "96", "--num_iters", "1",
                                             "--warmup", "0", "--batch_sizes", "1", "--compare_backends",
                                             "--torch_compile", "--profile"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith("batch 1:")]
    assert [r[11] for r in rows] == ["compiled", "pytorch", "compiled+torch.compile"]
    assert_printed_ratios(rows)
    note = next(line for line in lines if line.startswith("batch 1, amp none, compiled+torch.compile: "))
    differences = re.findall(r"pred_(?:logits|boxes) (\S+?)(?:,|$)", note)
    # the same model to float32 rounding, checked against eager
    assert len(differences) == 2 and all(float(d) < 1e-4 for d in differences)
    assert float(re.search(r"compilation\) (\S+) s", note).group(1)) > 0
    profiled = next(line for line in lines if line.startswith("top operators, batch 1, amp none, sampling "
                                                              "compiled+torch.compile"))
    # that configuration runs Inductor's graph, and the eager ones do not
    assert "CompiledFxGraph" in profiled
    assert not any("CompiledFxGraph" in line for line in lines if line.startswith("top operators") and line != profiled)


def test_top_costs_ranks_operators_by_their_own_time():
    big, small = torch.randn(400, 400), torch.randn(8)

    def work():
        for _ in range(3):
            big @ big
        for _ in range(5):
            small + small

    costs = top_costs(work, torch.device("cpu"), k=2)
    assert costs[0][0] == "aten::mm" and costs[0][2] == 3 and costs[0][1] > 0.5
    assert len(costs) == 2 and costs[1][1] <= costs[0][1]
    assert format_costs(costs).startswith(f"aten::mm {100 * costs[0][1]:.1f}% (3), ")


def test_benchmark_profiles_each_configuration(capsys):
    assert benchmark_tool.main(TINY_MODEL + ["--device", "cpu", "--image_size", "64", "96", "--num_iters", "1",
                                             "--warmup", "0", "--batch_sizes", "1", "--compare_backends",
                                             "--profile"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("top operators")]
    assert [line.split(":")[0] for line in lines] == ["top operators, batch 1, amp none, sampling compiled",
                                                      "top operators, batch 1, amp none, sampling pytorch"]
    # the pure-PyTorch configuration really runs without the compiled op
    assert "ms_deform_attn" not in lines[1] and all(line.count("%") == 5 for line in lines)


def test_benchmark_train_compares_precisions_and_backends_side_by_side(tiny_coco_root, capsys):
    argv = TINY_MODEL + ["--device", "cpu", "--coco_path", str(tiny_coco_root), "--train_scales", "64",
                         "--max_size", "96", "--num_workers", "0", "--batch_size", "2", "--num_iters", "1",
                         "--warmup", "0", "--amp", "none", "fp16", "--compare_backends", "--profile"]
    argv[argv.index("--num_classes") + 1] = "8"
    assert benchmark_train.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:6]]
    configs = [(amp, backend) for amp in ("none", "fp16") for backend in ("compiled", "pytorch")]
    assert [line.split(":")[0] for line in lines[6:]] == [f"top operators, amp {a}, sampling {b}" for a, b in configs]
    assert [(r[0], r[1]) for r in rows] == [("none", "compiled"), ("none", "pytorch"), ("fp16", "compiled"),
                                           ("fp16", "pytorch")]
    assert all(float(r[2]) > 0 and float(r[5]) > 0 for r in rows)
    # images/s and each speed relative to the first row and to the float32 pure-PyTorch core, from
    # the printed seconds per iteration, to their rounding
    assert "vs float32 pytorch" in lines[1]
    seconds = [float(r[2]) for r in rows]
    for r, sec in zip(rows, seconds):
        assert float(r[3]) == pytest.approx(2 / sec, rel=2e-3, abs=6e-3), r
        assert float(r[-1].removesuffix("x")) == pytest.approx(seconds[0] / sec, rel=2e-3, abs=6e-3), r
        assert float(r[-2].removesuffix("x")) == pytest.approx(seconds[1] / sec, rel=2e-3, abs=6e-3), r


def test_benchmark_train_on_a_fixed_random_batch(capsys):
    images, targets = benchmark_train.synthetic_batch(3, 40, 56, 5, 8, seed=0)
    assert images.tensors.shape == (3, 3, 40, 56) and not images.mask.any()
    for target in targets:
        cx, cy, w, h = target["boxes"].unbind(1)
        assert ((cx - w / 2 >= 0) & (cx + w / 2 <= 1) & (cy - h / 2 >= 0) & (cy + h / 2 <= 1) & (w > 0)).all()
        assert target["labels"].min() >= 1 and target["labels"].max() < 8
    again, _ = benchmark_train.synthetic_batch(3, 40, 56, 5, 8, seed=0)
    assert torch.equal(images.tensors, again.tensors)

    argv = TINY_MODEL + ["--device", "cpu", "--image_size", "64", "96", "--batch_size", "2", "--num_iters", "1",
                         "--warmup", "0", "--compare_backends"]
    assert benchmark_train.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "one fixed batch of random 64x96 images" in lines[0]
    rows = [line.split() for line in lines[2:4]]
    assert [(r[0], r[1]) for r in rows] == [("none", "compiled"), ("none", "pytorch")]
    assert float(rows[0][4]) == 0.0 and float(rows[1][2]) > 0
    assert benchmark_train.main(TINY_MODEL + ["--device", "cpu", "--image_size", "0", "96"]) == 2
    capsys.readouterr()
    # it would train from fresh weights anyway: a checkpoint is refused, not ignored
    assert benchmark_train.main(argv + ["--resume", "checkpoint.pth"]) == 2
    assert capsys.readouterr().err == ("error: --resume checkpoint.pth: the benchmark times training steps of a "
                                       "freshly built model and loads no checkpoint, since speed does not depend on "
                                       "the weights\n")


def test_infer_draw_scale_enlarges_picture_and_boxes(checkpoints, wide_image, tmp_path, capsys):
    common = ["--resume", str(checkpoints[MULTI_SCALE]), str(wide_image), "--threshold", "0", "--top_k", "1"]
    assert infer.main(common + ["--out_dir", str(tmp_path / "x1")]) == 0
    assert infer.main(common + ["--out_dir", str(tmp_path / "x3"), "--draw_scale", "3"]) == 0
    with Image.open(wide_image) as original, Image.open(tmp_path / "x3" / f"{wide_image.stem}_det.png") as big:
        assert big.size == (original.width * 3, original.height * 3)
        big = np.asarray(big.convert("RGB")).astype(int)
        plain = np.asarray(original.convert("RGB").resize(big.shape[1::-1], Image.BICUBIC)).astype(int)
    (fields,) = _parse_detections(capsys.readouterr().out)[:1]
    x0, y0, x1, y1 = (float(v) * 3 for v in fields[2:])
    # the box outline is drawn at three times the printed (original-pixel) coordinates
    row = round((y0 + y1) / 2)
    assert (big[row, round(x1)] != plain[row, round(x1)]).any()
    assert (big[row, round((x0 + x1) / 2)] == plain[row, round((x0 + x1) / 2)]).all()
