"""What a run starts from, checked before it starts: --auto_resume's precedence over --resume and
--finetune, the optimizer flags against a checkpoint's, an evaluation that needs neither the
training split nor a download, and every numeric flag's range."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import main
from util.checkpoint import load_checkpoint
from util.errors import ParameterError
from util.flags import FLAG_BOUNDS, Bounds, get_args_parser

from helpers import SMALL_MODEL, parse, run_main


def train_argv(coco: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*SMALL_MODEL, "--coco_path", str(coco), "--batch_size", "2", "--output_dir", str(output_dir), *extra]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_epochs(tiny_coco_root, tmp_path_factory) -> Path:
    """Two epochs with a numbered checkpoint after each (--lr_drop 1)."""
    out = tmp_path_factory.mktemp("run")
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "2", "--lr_drop", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------
# --auto_resume continues the output folder first

def test_auto_resume_of_an_unreadable_checkpoint_says_what_to_do(tiny_coco_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"not a checkpoint")
    before = snapshot(out)
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "1", "--auto_resume"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {out / 'checkpoint.pth'} is not a readable checkpoint")
    assert "--auto_resume took it from --output_dir: move it aside" in proc.stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_auto_resume_prefers_the_output_folders_checkpoint_over_resume_and_finetune(two_epochs, tiny_coco_root,
                                                                                     tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(two_epochs / "checkpoint0000.pth", out / "checkpoint.pth")  # epoch 0 completed
    for given in ("--resume", "--finetune"):
        proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "2", "--lr_drop", "1", "--auto_resume", given,
                                   str(two_epochs / "checkpoint.pth")))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (f"--auto_resume: continuing {out / 'checkpoint.pth'}, not {given} {two_epochs / 'checkpoint.pth'} "
                f"(the run started before and saved there)") in proc.stdout
        assert (f"resumed from {out / 'checkpoint.pth'}: epoch 0 completed, continuing with epoch 1 of 2"
                in proc.stdout)
        assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
        shutil.copy(two_epochs / "checkpoint0000.pth", out / "checkpoint.pth")


@pytest.mark.slow
def test_auto_resume_without_a_checkpoint_yet_starts_from_resume(two_epochs, tiny_coco_root, tmp_path):
    out = tmp_path / "out"
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "3", "--lr_drop", "1", "--auto_resume",
                               "--resume", str(two_epochs / "checkpoint0000.pth")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"--auto_resume: no {out / 'checkpoint.pth'} yet, starting from --resume "
            f"{two_epochs / 'checkpoint0000.pth'}") in proc.stdout
    assert "epoch 0 completed, continuing with epoch 1 of 3" in proc.stdout
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------------------------------
# The optimizer flags must fit the checkpoint's optimizer

@pytest.mark.slow
@pytest.mark.parametrize("flags, fragments", [
    (["--sgd"], ["was trained with AdamW, these flags build SGD (--sgd)"]),
    (["--lr_backbone", "0"], ["optimizer's parameter groups hold", "--lr_backbone (checkpoint: 2e-05, here: 0.0; 0 "
                                                                    "freezes the backbone)"]),
    (["--train_backbone_stem"], ["--train_backbone_stem (checkpoint: False, here: True)"]),
    # groups of the same sizes, but other parameters in them
    (["--lr_linear_proj_names", "reference_points", "attention_weights"],
     ["optimizer's parameter groups hold other parameters than these flags give them (--lr_linear_proj_names "
      "(checkpoint: ['reference_points', 'sampling_offsets'], here: ['reference_points', 'attention_weights']))"]),
])
def test_resume_with_other_optimizer_flags_stops_before_anything_runs(two_epochs, tiny_coco_root, tmp_path, flags,
                                                                      fragments):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(two_epochs / "checkpoint0000.pth", out / "checkpoint.pth")
    before = snapshot(out)
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "2", "--auto_resume", *flags))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / 'checkpoint.pth'} "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert lines[0].endswith(f"start a new optimizer from its weights with --finetune {out / 'checkpoint.pth'}")
    assert "Test:" not in proc.stdout  # stopped before the resume's check evaluation
    assert snapshot(out) == before


@pytest.mark.slow
def test_resume_with_another_learning_rate_says_it_continues_the_saved_one(two_epochs, tiny_coco_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(two_epochs / "checkpoint0000.pth", out / "checkpoint.pth")
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "2", "--lr_drop", "1", "--auto_resume", "--lr", "1e-3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"note: continuing the saved learning rates and weight decay of {out / 'checkpoint.pth'}, not --lr 0.001 "
            f"(saved: 0.0002)") in proc.stdout
    assert load_checkpoint(out / "checkpoint.pth")["optimizer"]["param_groups"][0]["initial_lr"] == 2e-4


# ------------------------------------------------------------------------------------------
# An evaluation reads the validation split alone and downloads nothing

@pytest.mark.slow
def test_eval_of_a_checkpoint_offline_with_the_validation_split_alone(two_epochs, tiny_coco_root, tmp_path,
                                                                       monkeypatch):
    val_only = tmp_path / "coco"
    shutil.copytree(tiny_coco_root / "val2017", val_only / "val2017")
    (val_only / "annotations").mkdir()
    shutil.copy(tiny_coco_root / "annotations" / "instances_val2017.json", val_only / "annotations")

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    # the default --backbone_weights imagenet: the checkpoint replaces them
    argv = [*train_argv(val_only, tmp_path / "eval"), "--backbone_weights", "imagenet", "--eval",
            "--resume", str(two_epochs / "checkpoint.pth")]
    proc = run_main(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads((two_epochs / "log.txt").read_text().splitlines()[-1])
    assert "IoU metric: bbox" in proc.stdout
    assert (tmp_path / "eval" / "eval.pth").is_file()
    # the same numbers as the run's own evaluation of that checkpoint
    stats = [float(line.rsplit("=", 1)[1]) for line in proc.stdout.splitlines() if line.startswith(" Average")]
    assert stats == pytest.approx(reference["test_coco_eval_bbox"], abs=5e-4)
    # a training run still needs the training split
    proc = run_main([*train_argv(val_only, tmp_path / "train"), "--epochs", "1"])
    assert proc.returncode == 2 and "has no train2017" in proc.stderr


# ------------------------------------------------------------------------------------------
# Numeric flags: one table, every flag

NUMERIC = sorted(action.dest for action in get_args_parser()._actions if action.type in (int, float))


def test_every_numeric_flag_has_bounds():
    assert set(NUMERIC) == set(FLAG_BOUNDS)


def bad_values(name: str) -> list[str]:
    bounds = FLAG_BOUNDS[name]
    is_float = next(a for a in get_args_parser()._actions if a.dest == name).type is float
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - 1)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + 1)
    strings = [f"{v:g}" if is_float else str(int(v)) for v in values]
    return strings + (["nan", "inf"] if is_float else [])


@pytest.mark.parametrize("name, value", [(name, value) for name in NUMERIC for value in bad_values(name)])
def test_a_numeric_flag_out_of_range_is_named_with_its_value(name, value, tmp_path):
    words = [f"--{name}", value]
    nargs = next(a for a in get_args_parser()._actions if a.dest == name).nargs
    if nargs == 2:
        words.append(value)
    args = parse(["--coco_path", str(tmp_path)] + words)
    with pytest.raises(ValueError) as err:
        main.check_args(args)
    parsed = getattr(args, name)
    shown = " ".join(map(str, parsed)) if isinstance(parsed, list) else str(parsed)
    assert str(err.value).startswith(f"--{name} {shown} must be "), str(err.value)
    assert str(err.value).endswith(FLAG_BOUNDS[name].describe())


@pytest.mark.parametrize("name", NUMERIC)
def test_the_defaults_are_within_bounds(name):
    value = getattr(parse([]), name)
    assert all(FLAG_BOUNDS[name].admits(v) for v in (value if isinstance(value, list) else [value]))


def test_a_switch_is_named_as_a_switch(tiny_coco_root):
    assert ParameterError("dilation", True, "(DC5) needs a bottleneck ResNet").as_flag() == \
        "--dilation (DC5) needs a bottleneck ResNet"
    assert ParameterError("two_stage", False, "is needed").as_flag() == "without --two_stage, is needed"
    proc = run_main([*SMALL_MODEL, "--coco_path", str(tiny_coco_root), "--dilation", "--epochs", "1"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --dilation (DC5) needs a bottleneck ResNet"), proc.stderr


def test_all_matching_costs_zero_is_refused(tmp_path):
    args = parse(["--coco_path", str(tmp_path), "--set_cost_class", "0", "--set_cost_bbox", "0",
                  "--set_cost_giou", "0"])
    with pytest.raises(ValueError, match="all 0: the matching needs at least one cost"):
        main.check_args(args)


def test_bounds_describe_and_admit_their_ends():
    assert Bounds(low=0, high=1, high_open=True).describe() == "at least 0 and below 1"
    assert Bounds(low=0, low_open=True, why="minutes").describe() == "above 0 (minutes)"
    assert Bounds(low=0, high=1, high_open=True).admits(0) and not Bounds(low=0, high=1, high_open=True).admits(1)
    assert not Bounds(low=0, low_open=True).admits(0) and Bounds(low=0, low_open=True).admits(1e-9)
    assert not Bounds(low=0).admits(math.nan) and not Bounds().admits(math.inf)
