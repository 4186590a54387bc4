"""Watching a run and keeping its best: TensorBoard events read back with TensorBoard's own reader,
checkpoint_best.pth, and the exponential moving average of the weights (--ema)."""
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import engine
from tools import infer
from tools.convert_checkpoint import to_hf
from util.board import COCO_NAMES
from util.checkpoint import load_checkpoint
from util.ema import ModelEMA

from helpers import SMALL_MODEL, run_main


def train_argv(coco: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*SMALL_MODEL, "--coco_path", str(coco), "--batch_size", "1", "--output_dir", str(output_dir), *extra]


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def log_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


# ------------------------------------------------------------------------------------------
# The moving average

def test_model_ema_follows_its_formula_in_float64():
    """Also for a layer two modules share, as the model's per-layer heads without box refinement:
    listed under both names, it is averaged once per step."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), shared, shared)
    decay, warmup = 0.9, 2.0
    ema = ModelEMA(model, decay, warmup)
    expected = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm statistics and its step count
        ema.update(model)
        d = decay * (1 - math.exp(-n / warmup))
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v.double()
    mine = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(mine[k].double(), v, rtol=1e-6, atol=1e-7)
    assert mine["1.num_batches_tracked"] == model.state_dict()["1.num_batches_tracked"] == 5
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training

    restored = ModelEMA(copy.deepcopy(model), decay, warmup)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5 and all(torch.equal(a, b) for a, b in
                                         zip(restored.module.state_dict().values(), mine.values()))
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, 1.0, 0)


# ------------------------------------------------------------------------------------------
# TensorBoard

@pytest.fixture(scope="module")
def ema_run(tiny_coco_root, tmp_path_factory) -> tuple[Path, str]:
    """Two epochs of 4 iterations with --ema, progress every 2 iterations."""
    out = tmp_path_factory.mktemp("ema_run")
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "2", "--print_freq", "2", "--ema",
                               "--ema_decay", "0.5", "--ema_warmup", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_a_run_writes_tensorboard_events_with_the_expected_tags_and_steps(ema_run, tiny_coco_root):
    out, _ = ema_run
    events = read_events(out / "tensorboard")
    scalars = set(events.Tags()["scalars"])
    losses = {"loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    expected = ({f"train/{name}" for name in losses | {"class_error", "grad_norm", "lr", "lr_backbone",
                                                       "lr_linear_proj", "seconds_per_iteration"}}
                | {f"{prefix}/{name}" for prefix in ("test", "test_ema") for name in COCO_NAMES + ("loss",)}
                | {"epoch/seconds"})
    assert expected <= scalars, expected - scalars
    # every 2nd iteration (from the first) and each epoch's last; steps are iterations done
    assert [e.step for e in events.Scalars("train/loss")] == [1, 3, 4, 5, 7, 8]
    assert [e.value for e in events.Scalars("train/lr_backbone")] == pytest.approx([2e-5] * 6)
    log = log_lines(out)
    for prefix in ("test", "test_ema"):
        ap = events.Scalars(f"{prefix}/AP")
        assert [e.step for e in ap] == [4, 8]
        assert [e.value for e in ap] == pytest.approx([entry[f"{prefix}_coco_eval_bbox"][0] for entry in log])
        assert [e.value for e in events.Scalars(f"{prefix}/loss")] == pytest.approx(
            [entry[f"{prefix}_loss"] for entry in log])
    val = json.loads((tiny_coco_root / "annotations" / "instances_val2017.json").read_text())
    first = sorted(image["id"] for image in val["images"])[:4]
    assert sorted(events.Tags()["images"]) == sorted(f"detections/{image_id}" for image_id in first)
    assert [e.step for e in events.Images(f"detections/{first[0]}")] == [4, 8]


@pytest.mark.slow
def test_no_tensorboard_writes_none(tiny_coco_root, tmp_path):
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--epochs", "1", "--no_tensorboard"))
    assert proc.returncode == 0 and not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------------------------------
# The best checkpoint

EVALUATE = engine.evaluate


def scripted_ap(monkeypatch, aps: list[float]) -> list[float]:
    """Make every evaluation report the next AP of ``aps`` (the rest of its numbers as evaluated)."""
    left = list(aps)

    def scripted(*args, **kwargs):
        stats, evaluator = EVALUATE(*args, **kwargs)
        stats["coco_eval_bbox"][0] = left.pop(0)
        return stats, evaluator

    monkeypatch.setattr(engine, "evaluate", scripted)
    return left


@pytest.mark.slow
def test_the_best_checkpoint_follows_the_ap_and_survives_a_resume(tiny_coco_root, tmp_path, monkeypatch):
    left = scripted_ap(monkeypatch, [0.1, 0.3])
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--epochs", "2"))
    assert proc.returncode == 0 and not left, proc.stderr[-3000:]
    best = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert best["epoch"] == 1 and best["best"] == {"epoch": 1, "ap": 0.3, "weights": "model"}
    assert [line for line in proc.stdout.splitlines() if line.startswith("best validation AP")] == [
        f"best validation AP so far: 0.1000 after epoch 0, in {tmp_path / 'checkpoint_best.pth'}",
        f"best validation AP so far: 0.3000 after epoch 1, in {tmp_path / 'checkpoint_best.pth'}"]
    kept = (tmp_path / "checkpoint_best.pth").read_bytes()

    # resumed: the check evaluation (0.9) does not count, and epoch 2 does not improve
    left = scripted_ap(monkeypatch, [0.9, 0.25])
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--epochs", "3", "--auto_resume"))
    assert proc.returncode == 0 and not left, proc.stderr[-3000:]
    assert (tmp_path / "checkpoint_best.pth").read_bytes() == kept
    assert load_checkpoint(tmp_path / "checkpoint.pth")["best"] == {"epoch": 1, "ap": 0.3, "weights": "model"}

    left = scripted_ap(monkeypatch, [0.0, 0.5])
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--epochs", "4", "--auto_resume"))
    assert proc.returncode == 0 and not left, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "checkpoint_best.pth")["epoch"] == 3


# ------------------------------------------------------------------------------------------
# --ema in training, evaluation and the tools

@pytest.mark.slow
def test_ema_weights_are_evaluated_saved_and_taken_when_asked(ema_run, tiny_coco_root, tmp_path):
    out, stdout = ema_run
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["ema"]["updates"] == 8  # one per step
    assert checkpoint["best"]["weights"] == "averaged"
    assert any(not torch.equal(checkpoint["ema"]["model"][k], checkpoint["model"][k]) for k in checkpoint["model"])
    last = log_lines(out)[-1]

    for flags, key in ((["--ema"], "test_ema_coco_eval_bbox"), ([], "test_coco_eval_bbox")):
        proc = run_main(train_argv(tiny_coco_root, tmp_path / "eval", "--eval", "--resume",
                                   str(out / "checkpoint.pth"), *flags))
        assert proc.returncode == 0, proc.stderr[-3000:]
        stats = [float(line.rsplit("=", 1)[1]) for line in proc.stdout.splitlines() if line.startswith(" Average")]
        assert stats == pytest.approx(last[key], abs=5e-4)

    model, _ = infer.load_model(out / "checkpoint.pth", "cpu", ema=True)
    assert all(torch.equal(v, checkpoint["ema"]["model"][k]) for k, v in model.state_dict().items())
    _, weights, _ = to_hf(out / "checkpoint.pth", ema=True)
    _, raw_weights, _ = to_hf(out / "checkpoint.pth")
    assert any(not torch.equal(weights[k], raw_weights[k]) for k in weights)


@pytest.mark.slow
def test_ema_of_a_checkpoint_without_it_is_one_line(tiny_coco_root, tmp_path):
    proc = run_main(train_argv(tiny_coco_root, tmp_path / "plain", "--epochs", "1"))
    assert proc.returncode == 0
    shutil.copy(tmp_path / "plain" / "checkpoint.pth", tmp_path / "c.pth")
    proc = run_main(train_argv(tiny_coco_root, tmp_path / "eval", "--eval", "--ema", "--resume",
                               str(tmp_path / "c.pth")))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --ema: {tmp_path / 'c.pth'} holds no averaged weights (it was not trained " \
                                  f"with --ema)"
