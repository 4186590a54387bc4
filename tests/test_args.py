"""main.py's command line: the original's flags, defaults and types; help for every flag; the
variants' configs."""
import re
import subprocess
import sys

import pytest

import datasets.transforms
from util.flags import config_flags

from helpers import REPO, parse, subprocess_env

# The original main.py's defaults (fundamentalvision/Deformable-DETR, main.py), flag by flag.
ORIGINAL_DEFAULTS = {
    "lr": 2e-4, "lr_backbone_names": ["backbone.0"], "lr_backbone": 2e-5,
    "lr_linear_proj_names": ["reference_points", "sampling_offsets"], "lr_linear_proj_mult": 0.1,
    "batch_size": 2, "weight_decay": 1e-4, "epochs": 50, "lr_drop": 40, "clip_max_norm": 0.1, "sgd": False,
    "with_box_refine": False, "two_stage": False, "backbone": "resnet50", "dilation": False,
    "position_embedding": "sine", "num_feature_levels": 4, "enc_layers": 6, "dec_layers": 6,
    "dim_feedforward": 1024, "hidden_dim": 256, "dropout": 0.1, "nheads": 8, "num_queries": 300,
    "dec_n_points": 4, "enc_n_points": 4, "aux_loss": True, "set_cost_class": 2, "set_cost_bbox": 5,
    "set_cost_giou": 2, "cls_loss_coef": 2, "bbox_loss_coef": 5, "giou_loss_coef": 2, "focal_alpha": 0.25,
    "dataset_file": "coco", "coco_path": "./data/coco", "output_dir": "", "device": "cuda", "seed": 42,
    "resume": "", "start_epoch": 0, "eval": False, "num_workers": 2, "cache_mode": False,
}
# Flags the original declares but never reads, or that serve its segmentation code, which
# this project does not carry (docs/differences.md).
DROPPED = ["--lr_drop_epochs", "--position_embedding_scale", "--remove_difficult", "--masks",
           "--frozen_weights", "--mask_loss_coef", "--dice_loss_coef", "--coco_panoptic_path"]


def test_defaults_match_the_original():
    args = vars(parse([]))
    for name, value in ORIGINAL_DEFAULTS.items():
        assert args[name] == value, name
    assert args["num_classes"] == 91 and args["backbone_weights"] == "imagenet"
    assert args["train_scales"] == list(datasets.transforms.DEFAULT_SCALES)


def test_types_match_the_original():
    args = parse(["--lr", "1e-3", "--batch_size", "4", "--lr_backbone_names", "backbone.0", "input_proj",
                  "--no_aux_loss", "--set_cost_class", "1", "--num_feature_levels", "1"])
    assert args.lr == pytest.approx(1e-3) and isinstance(args.lr, float)
    assert args.batch_size == 4 and isinstance(args.batch_size, int)
    assert args.lr_backbone_names == ["backbone.0", "input_proj"]
    assert args.aux_loss is False
    assert isinstance(args.set_cost_class, float)
    with pytest.raises(SystemExit):
        parse(["--position_embedding", "v2"])


@pytest.mark.parametrize("flag", DROPPED)
def test_dropped_flags_are_rejected(flag):
    with pytest.raises(SystemExit):
        parse([flag, "1"])


def run_main(*argv: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "main.py", *argv], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_help_documents_every_flag_with_its_default_without_importing_torch():
    proc = run_main("--help", python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for flag in ("--coco_path", "--eval", "--epochs", "--batch_size", "--lr_drop", "--with_box_refine", "--two_stage"):
        assert flag in text
    assert "(default: 50)" in text and "(default: ./data/coco)" in text
    for group in ("variant:", "backbone:", "transformer:", "data:", "run:", "added by this reimplementation"):
        assert group in text
    # Every flag has a help text: argparse adds "(default: ...)" to each help text and only there.
    assert text.count("(default:") == len(vars(parse([])))
    # a switch's default reads as the switch not given, never as a value that could mean it is on
    assert "(default: True)" not in text and "(default: False)" not in text
    assert re.search(r"--no_aux_loss +no auxiliary losses at the intermediate decoder layers \(default: not given\)",
                     text)
    # The parser answers before torch is imported (which takes seconds on a small machine).
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "util.flags" in imported and "torch" not in imported


def test_misspelled_flag_suggests_the_closest():
    proc = run_main("--lr_dorp", "3")
    assert proc.returncode == 2
    assert "unrecognized arguments: --lr_dorp 3 (--lr_dorp: did you mean --lr_drop?)" in proc.stderr


def test_unknown_config_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="r50_deformable_detr_single_scale"):
        config_flags("r50_nonexistent")
