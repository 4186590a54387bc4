"""main.py end to end on a tiny COCO: checkpoints and their schedule, log.txt, --resume, --eval,
--finetune, the non-finite-loss exit, and the optimizer's parameter groups."""
import argparse
import ast
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from datasets.coco import check_num_classes
from models import build_model
from util.checkpoint import checkpoint_paths, load_checkpoint, load_weights, save_epoch
from util.errors import ParameterError
from util.optim import build_param_groups

import helpers
from helpers import SMALL_MODEL, parse

EXPECTED_LOG_KEYS = {"train_lr", "train_class_error", "train_grad_norm", "train_loss", "train_loss_ce",
                     "train_loss_bbox", "train_loss_giou", "train_loss_ce_0", "train_loss_ce_unscaled",
                     "train_class_error_unscaled", "train_cardinality_error_unscaled",
                     "test_class_error", "test_loss", "test_loss_ce", "test_loss_giou_unscaled",
                     "test_coco_eval_bbox", "epoch", "n_parameters"}


def run_main(argv: list[str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    proc = helpers.run_main(argv)
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def train_argv(coco: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*SMALL_MODEL, "--coco_path", str(coco), "--batch_size", "2", "--output_dir", str(output_dir),
            *extra]


@pytest.fixture(scope="module")
def three_epochs(tiny_coco_root, tmp_path_factory):
    """Three epochs with the learning rate dropping every 2 epochs (so after the second)."""
    out = tmp_path_factory.mktemp("run")
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "3", "--lr_drop", "2"))
    return out, proc


@pytest.mark.slow
def test_training_writes_checkpoints_on_schedule_and_a_json_log(three_epochs):
    out, proc = three_epochs
    # checkpoint.pth every epoch; checkpoint{epoch:04}.pth when (epoch + 1) % lr_drop == 0 or % 5;
    # checkpoint_best.pth at the first epoch of the best AP
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth", "checkpoint0001.pth",
                                                                    "checkpoint_best.pth"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["000.pth", "latest.pth"]
    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0, 1, 2]
    model, _, _ = build_model(parse(SMALL_MODEL))
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for entry in log:
        assert EXPECTED_LOG_KEYS <= set(entry), EXPECTED_LOG_KEYS - set(entry)
        assert len(entry["test_coco_eval_bbox"]) == 12
        assert entry["n_parameters"] == n_parameters
    assert [entry["train_lr"] for entry in log] == pytest.approx([2e-4, 2e-4, 2e-5])
    aps = [entry["test_coco_eval_bbox"][0] for entry in log]
    best = load_checkpoint(out / "checkpoint_best.pth")
    assert best["epoch"] == aps.index(max(aps)) and best["best"] == {"epoch": best["epoch"], "ap": max(aps),
                                                                     "weights": "model"}
    assert f"best validation AP so far: {max(aps):.4f} after epoch {best['epoch']}" in proc.stdout
    line = (r"Epoch: \[1\]  \[1/2\]  eta: \d+:\d\d:\d\d  lr: 0\.000200  class_error: \S+  grad_norm: \S+  "
            r"loss: .*  time: \S+  data: \S+  max mem: \d+")
    assert re.search(line, proc.stdout), proc.stdout[-2000:]
    assert proc.stdout.count("IoU metric: bbox") == 3
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only_and_the_namespace_allow_list(three_epochs):
    out, _ = three_epochs
    path = out / "checkpoint0001.pth"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)  # Namespace is not allowed by default
    checkpoint = load_checkpoint(path)
    assert set(checkpoint) == {"model", "optimizer", "lr_scheduler", "epoch", "args", "best"}
    assert checkpoint["epoch"] == 1
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"].lr_drop == 2
    assert checkpoint["lr_scheduler"]["last_epoch"] == 2 and checkpoint["lr_scheduler"]["step_size"] == 2
    model, _, _ = build_model(parse(SMALL_MODEL))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in checkpoint["model"].items()} == shapes
    groups = build_param_groups(model, 2e-4, 2e-5, ["backbone.0"], ["reference_points", "sampling_offsets"], 0.1)
    assert [len(g["params"]) for g in checkpoint["optimizer"]["param_groups"]] == [len(g["params"]) for g in groups]


@pytest.mark.slow
def test_resume_continues_the_saved_schedule_like_the_uninterrupted_run(three_epochs, tiny_coco_root, tmp_path):
    out, _ = three_epochs
    shutil.copy(out / "checkpoint0001.pth", tmp_path / "epoch1.pth")
    # A different --lr_drop on the command line does not change the saved schedule.
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--epochs", "3", "--lr_drop", "100",
                               "--resume", str(tmp_path / "epoch1.pth")))
    assert "epoch 1 completed, continuing with epoch 2 of 3" in proc.stdout and "not --lr_drop 100" in proc.stdout
    assert proc.stdout.count("IoU metric: bbox") == 2  # the resumed model is checked first
    log = read_log(tmp_path)
    assert [entry["epoch"] for entry in log] == [2]
    assert log[0]["train_lr"] == pytest.approx(2e-5)  # dropped after epoch 1, as saved
    resumed, straight = load_checkpoint(tmp_path / "checkpoint.pth"), load_checkpoint(out / "checkpoint.pth")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert log[0]["train_loss"] == pytest.approx(read_log(out)[2]["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_eval_only_reproduces_the_epochs_test_loss(three_epochs, tiny_coco_root, tmp_path):
    out, _ = three_epochs
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--eval", "--resume", str(out / "checkpoint0001.pth")))
    assert (tmp_path / "eval.pth").is_file()
    assert not (tmp_path / "log.txt").exists() and not list(tmp_path.glob("checkpoint*.pth"))
    assert proc.stdout.count("IoU metric: bbox") == 1
    averaged = re.search(r"Averaged stats: class_error: \S+  loss: \S+ \((\S+)\)", proc.stdout)
    assert averaged, proc.stdout[-2000:]
    assert float(averaged.group(1)) == pytest.approx(read_log(out)[1]["test_loss"], abs=1e-4)


@pytest.mark.slow
def test_finetune_with_another_num_classes_leaves_out_and_reports_the_class_heads(three_epochs, tiny_coco_root,
                                                                                   tmp_path):
    out, _ = three_epochs
    argv = train_argv(tiny_coco_root, tmp_path, "--epochs", "1", "--finetune", str(out / "checkpoint.pth"))
    argv[argv.index("--num_classes") + 1] = "12"
    proc = run_main(argv)
    class_heads = sorted(k for k in load_checkpoint(out / "checkpoint.pth")["model"] if "class_embed" in k)
    assert class_heads  # e.g. class_embed.0.weight
    reported = re.search(r"class heads left out .*: (\[.*\])", proc.stdout)
    assert reported, proc.stdout[-2000:]
    assert sorted(ast.literal_eval(reported.group(1))) == class_heads
    assert [entry["epoch"] for entry in read_log(tmp_path)] == [0]


@pytest.mark.slow
def test_non_finite_loss_exits_1_and_keeps_the_checkpoint(three_epochs, tiny_coco_root, tmp_path, monkeypatch):
    out, _ = three_epochs
    shutil.copy(out / "checkpoint0001.pth", tmp_path / "checkpoint.pth")
    before = (tmp_path / "checkpoint.pth").read_bytes()
    # the box losses NaN, the predictions finite
    l1_loss = torch.nn.functional.l1_loss
    monkeypatch.setattr(torch.nn.functional, "l1_loss", lambda *a, **k: l1_loss(*a, **k) * float("nan"))
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--epochs", "3",
                               "--resume", str(tmp_path / "checkpoint.pth")), expect_rc=1)
    assert "loss is nan, stopping training" in proc.stderr
    assert "loss_ce_unscaled" in proc.stderr  # the losses are printed
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert not (tmp_path / "log.txt").exists()


def averaged_test_loss(stdout: str) -> float:
    """The epoch's average evaluation loss, as the last "Averaged stats" line prints it."""
    return float(re.findall(r"Averaged stats: class_error: \S+  loss: \S+ \((\S+)\)", stdout)[-1])


def test_eval_in_bfloat16_gives_the_float32_losses_to_its_rounding(tiny_coco_root, tmp_path):
    # at most 64 pixels a side: see test_failures.py on oneDNN's bfloat16 convolutions of width-1 inputs
    common = train_argv(tiny_coco_root, tmp_path, "--eval", "--max_size", "64")
    float32 = averaged_test_loss(run_main([*common, "--amp", "none"]).stdout)
    bfloat16 = averaged_test_loss(run_main([*common, "--amp", "bf16"]).stdout)
    assert bfloat16 != float32 and bfloat16 == pytest.approx(float32, rel=1e-2)
    assert (tmp_path / "eval.pth").is_file()


def test_seed_decides_the_weights_and_start_epoch_the_first_epoch(tiny_coco_root, tmp_path):
    """--seed: the same seed gives the same weights, another seed others. --start_epoch 4 with
    --epochs 5 trains epoch 4 alone, under the schedule's first rate (the original does not step
    the schedule for the epochs skipped), and saves it as epoch 4 (numbered: 4 + 1 is a multiple of 5)."""
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run_main(train_argv(tiny_coco_root, tmp_path / name, "--seed", seed, "--start_epoch", "4", "--epochs", "5"))
    a, b, c = (load_checkpoint(tmp_path / name / "checkpoint.pth") for name in "abc")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the stem is frozen, so its weights are the initial ones: the seed decides the initialisation
    assert not torch.equal(a["model"]["backbone.0.body.conv1.weight"], c["model"]["backbone.0.body.conv1.weight"])
    assert not torch.equal(a["model"]["transformer.level_embed"], c["model"]["transformer.level_embed"])
    assert a["epoch"] == 4 and sorted(p.name for p in (tmp_path / "a").glob("checkpoint*.pth")) == [
        "checkpoint.pth", "checkpoint0004.pth", "checkpoint_best.pth"]
    (entry,) = read_log(tmp_path / "a")
    assert entry["epoch"] == 4 and entry["train_lr"] == pytest.approx(2e-4)


@pytest.fixture(scope="module")
def diverged(three_epochs, tmp_path_factory) -> Path:
    """The run's checkpoint with one infinite value in the class head's bias."""
    out, _ = three_epochs
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    checkpoint["model"]["class_embed.0.bias"][3] = float("inf")
    path = tmp_path_factory.mktemp("diverged") / "checkpoint.pth"
    torch.save(checkpoint, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("how, where", [("--finetune", "in a training step, stopping training"),
                                        ("--resume", "in evaluation, stopping"),
                                        ("--eval", "in evaluation, stopping")])
def test_non_finite_predictions_stop_with_one_line_before_the_matcher(diverged, tiny_coco_root, tmp_path, how,
                                                                      where):
    flags = ["--eval", "--resume", str(diverged)] if how == "--eval" else [how, str(diverged)]
    before = diverged.read_bytes()
    proc = run_main(train_argv(tiny_coco_root, tmp_path / "out", "--epochs", "4", *flags), expect_rc=1)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # every query's logit of class 3 is infinite, in every decoder layer's output (the heads are shared)
    assert re.fullmatch(rf"error: the model's predictions hold \d+ NaN or infinite values {where}", lines[0]), lines
    assert diverged.read_bytes() == before and not (tmp_path / "out" / "log.txt").exists()


# --------------------------------------------------------------------------------------------
# In-process pieces

def test_numbered_checkpoints_before_each_lr_drop_and_every_5_epochs():
    """The original's rule: checkpoint{epoch:04}.pth after an epoch whose number plus one is a
    multiple of --lr_drop or of 5 (the lists below are worked out by hand from that rule)."""
    def numbered(lr_drop: int, epochs: int) -> list[str]:
        return [path.name for epoch in range(epochs) for path in checkpoint_paths(Path("out"), epoch, lr_drop)
                if path.name != "checkpoint.pth"]

    assert all(checkpoint_paths(Path("out"), epoch, 40)[0] == Path("out/checkpoint.pth") for epoch in range(50))
    assert numbered(40, 50) == [f"checkpoint{e:04}.pth" for e in (4, 9, 14, 19, 24, 29, 34, 39, 44, 49)]
    assert numbered(7, 30) == [f"checkpoint{e:04}.pth" for e in (4, 6, 9, 13, 14, 19, 20, 24, 27, 29)]
    assert numbered(3, 7) == [f"checkpoint{e:04}.pth" for e in (2, 4, 5)]


def test_save_epoch_writes_the_log_the_evaluation_every_50_epochs_and_the_checkpoints(tmp_path):
    """eval/latest.pth every epoch and eval/NNN.pth after epochs 0, 50, 100, ...; the checkpoint
    and its numbered copies; one log line per epoch."""
    epochs = [0, 1, 48, 49, 50, 51, 99, 100, 149, 150]
    for epoch in epochs:
        save_epoch(tmp_path, epoch, {"epoch": epoch}, {"evaluated_after": epoch}, {"model": {}, "epoch": epoch}, 40)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["000.pth", "050.pth", "100.pth", "150.pth",
                                                                     "latest.pth"]
    for name, epoch in (("000.pth", 0), ("050.pth", 50), ("100.pth", 100), ("150.pth", 150), ("latest.pth", 150)):
        assert torch.load(tmp_path / "eval" / name, weights_only=True) == {"evaluated_after": epoch}, name
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pth")) == ["checkpoint.pth", "checkpoint0049.pth",
                                                                        "checkpoint0099.pth", "checkpoint0149.pth"]
    assert load_checkpoint(tmp_path / "checkpoint0099.pth")["epoch"] == 99
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 150
    assert [entry["epoch"] for entry in read_log(tmp_path)] == epochs


def test_param_groups_follow_the_original_names_and_rates():
    model, _, _ = build_model(parse(SMALL_MODEL + ["--lr_backbone", "2e-5"]))
    groups = build_param_groups(model, 2e-4, 2e-5, ["backbone.0"], ["reference_points", "sampling_offsets"], 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    rest, backbone, proj = ([names[id(p)] for p in g["params"]] for g in groups)
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 2e-5, 2e-5])
    assert backbone and all(n.startswith("backbone.0.") for n in backbone)
    assert proj and all("reference_points" in n or "sampling_offsets" in n for n in proj)
    assert not any("backbone.0" in n or "reference_points" in n or "sampling_offsets" in n for n in rest)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(rest + backbone + proj) == sorted(trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & set(backbone)  # layer1 and the stem stay out of every group


@pytest.mark.parametrize("sgd", [False, True])
def test_optimizer_steps_as_the_per_parameter_loop_bit_for_bit(sgd):
    """build_optimizer's multi-tensor (foreach) AdamW / SGD, with engine's foreach clipping, gives the
    weights of PyTorch's per-parameter loop, its default on the CPU (and the original's there)."""
    from engine import train_step
    from util.optim import build_optimizer

    args = parse(SMALL_MODEL + ["--lr_backbone", "1e-4"] + (["--sgd", "--lr", "1e-3"] if sgd else []))
    generator = torch.Generator().manual_seed(0)
    images = random_batches(generator)
    models = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model, criterion, _ = build_model(args)
        optimizer, _ = build_optimizer(args, model)
        if not foreach:
            groups = build_param_groups(model, args.lr, args.lr_backbone, args.lr_backbone_names,
                                        args.lr_linear_proj_names, args.lr_linear_proj_mult)
            if sgd:
                optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                            foreach=False)
            else:
                optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, foreach=False)
        else:
            assert optimizer.defaults["foreach"] is True
        model.train()
        for samples, targets in images:
            train_step(model, criterion, samples, targets, optimizer, max_norm=0.1)
        models.append(model.state_dict())
    for key, value in models[0].items():
        assert torch.equal(value, models[1][key]), key


def test_fused_optimizer_rounds_differently_only_and_resumes_either_way():
    """--fused_optimizer: PyTorch's fused AdamW, the same update up to rounding; a checkpoint of one
    implementation resumes into the other, which keeps the implementation the flags chose."""
    from engine import train_step
    from util.checkpoint import restore_training_state
    from util.optim import build_optimizer

    weights, optimizers = [], []
    for fused in (False, True):
        args = parse(SMALL_MODEL + ["--lr_backbone", "1e-4"] + (["--fused_optimizer"] if fused else []))
        torch.manual_seed(0)
        model, criterion, _ = build_model(args)
        optimizer, scheduler = build_optimizer(args, model)
        assert optimizer.defaults["fused"] is (True if fused else None)
        model.train()
        for samples, targets in random_batches(torch.Generator().manual_seed(0)):
            train_step(model, criterion, samples, targets, optimizer, max_norm=0.1)
        weights.append(model.state_dict())
        optimizers.append((optimizer, scheduler))
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-6, msg=key)
    (foreach_optimizer, scheduler), (fused_optimizer, _) = optimizers
    restore_training_state({"optimizer": foreach_optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()},
                           fused_optimizer, scheduler)
    assert all(g["fused"] and not g.get("foreach") for g in fused_optimizer.param_groups)
    fused_optimizer.step()  # the restored state runs in the fused kernel


def random_batches(generator: torch.Generator) -> list:
    """Three small training batches of random images and boxes."""
    from util.misc import nested_tensor_from_tensor_list
    batches = []
    for _ in range(3):
        images = [torch.randn(3, 64, 80, generator=generator), torch.randn(3, 48, 64, generator=generator)]
        targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]),
                    "labels": torch.tensor([1, 3])} for _ in images]
        batches.append((nested_tensor_from_tensor_list(images), targets))
    return batches


def test_param_groups_reject_a_name_in_two_groups():
    model, _, _ = build_model(parse(SMALL_MODEL))
    with pytest.raises(ParameterError, match="both match parameter backbone.0.body.layer4"):
        build_param_groups(model, 1e-4, 1e-5, ["backbone.0"], ["backbone.0.body.layer4"], 0.1)


def test_finetune_loading_drops_only_mismatched_class_heads_in_two_stage():
    variant = ["--with_box_refine", "--two_stage"]
    torch.manual_seed(0)
    source, _, _ = build_model(parse(SMALL_MODEL + variant))
    state = source.state_dict()
    argv = SMALL_MODEL + variant
    argv[argv.index("--num_classes") + 1] = "12"
    target, _, _ = build_model(parse(argv))
    dropped = load_weights(target, state, "source", other_classes=True)
    assert any(k.startswith("transformer.decoder.class_embed.") for k in dropped)
    assert any(k.startswith("class_embed.") for k in dropped)
    assert sorted(dropped) == sorted(k for k in state if "class_embed" in k)
    for key, value in target.state_dict().items():
        if key not in dropped:
            assert torch.equal(value, state[key]), key

    same, _, _ = build_model(parse(SMALL_MODEL + variant))
    assert load_weights(same, state, "source", other_classes=True) == []

    single_scale = SMALL_MODEL + variant + ["--num_feature_levels", "1"]
    with pytest.raises(ValueError, match=r"keys the model does not have \[.*'input_proj\.1\.0\.weight'"):
        load_weights(build_model(parse(single_scale))[0], state, "source", other_classes=True)
    # Resuming or evaluating (no other classes) refuses the class heads of another shape too.
    mismatch = r"source does not fit the model.*shape mismatches \[.*'class_embed\.0\.weight"
    with pytest.raises(ValueError, match=mismatch):
        load_weights(target, state, "source")


def test_too_few_classes_for_the_dataset_is_a_clear_error(tiny_coco_root):
    ground_truth = COCO(str(tiny_coco_root / "annotations" / "instances_train2017.json"))
    check_num_classes(ground_truth, 8)
    with pytest.raises(ParameterError, match=r"num_classes=5 is too small: .* category id 7; use 8 or more"):
        check_num_classes(ground_truth, 5)
