"""The command line of ``main.py``: its flags, their groups and defaults, and the flags of each
``configs/`` script.

Nothing here imports torch, so ``--help`` and flag errors answer before the heavy imports.
"""
import argparse
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from util.errors import InputValueError, ParameterError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The flags that tell the paper's five variants apart.
VARIANT_DEFINING = ("num_feature_levels", "dilation", "with_box_refine", "two_stage")
# The flags that decide a model's state_dict keys and shapes.
ARCHITECTURE_FLAGS = ("num_feature_levels", "dilation", "with_box_refine", "two_stage", "backbone",
                      "backbone_width", "backbone_norm", "position_embedding", "hidden_dim", "dim_feedforward",
                      "enc_layers", "dec_layers", "nheads", "enc_n_points", "dec_n_points", "num_queries",
                      "num_classes")


def get_args_parser() -> argparse.ArgumentParser:
    """The original ``main.py`` flags (names, defaults, types) and this project's, in groups.

    Without ``-h``, so that ``main.py`` and the tools can take it as a parent and add their own.
    """
    parser = argparse.ArgumentParser("Deformable DETR Detector", add_help=False)

    group = parser.add_argument_group("variant")
    group.add_argument("--with_box_refine", default=False, action="store_true",
                       help="iterative bounding-box refinement: each decoder layer refines the previous "
                            "layer's boxes, with a box and class head per layer")
    group.add_argument("--two_stage", default=False, action="store_true",
                       help="two-stage: the encoder proposes the decoder's reference boxes (needs "
                            "--with_box_refine)")

    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default="resnet50", type=str,
                       help="resnet18, resnet34, resnet50, resnet101 (torchvision's) or resnet10 (one "
                            "basic block per stage)")
    group.add_argument("--dilation", action="store_true",
                       help="replace the stride of the last ResNet stage by dilation (DC5)")
    group.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                       help="positional embedding of the image features")
    group.add_argument("--num_feature_levels", default=4, type=int,
                       help="feature levels: 1 (the last backbone stage) or at least 3 (the last three "
                            "stages plus extra strided levels)")

    group = parser.add_argument_group("transformer")
    group.add_argument("--enc_layers", default=6, type=int, help="encoder layers")
    group.add_argument("--dec_layers", default=6, type=int, help="decoder layers")
    group.add_argument("--dim_feedforward", default=1024, type=int,
                       help="intermediate size of the feed-forward layers")
    group.add_argument("--hidden_dim", default=256, type=int, help="transformer width")
    group.add_argument("--dropout", default=0.1, type=float, help="dropout in the transformer")
    group.add_argument("--nheads", default=8, type=int, help="attention heads")
    group.add_argument("--num_queries", default=300, type=int, help="object queries")
    group.add_argument("--dec_n_points", default=4, type=int,
                       help="sampling points per head and level in the decoder's cross-attention")
    group.add_argument("--enc_n_points", default=4, type=int,
                       help="sampling points per head and level in the encoder's self-attention")

    group = parser.add_argument_group("loss and matching")
    group.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                       help="no auxiliary losses at the intermediate decoder layers")
    group.add_argument("--set_cost_class", default=2, type=float, help="class weight in the matching cost")
    group.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    group.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")
    group.add_argument("--cls_loss_coef", default=2, type=float, help="weight of the focal classification loss")
    group.add_argument("--bbox_loss_coef", default=5, type=float, help="weight of the L1 box loss")
    group.add_argument("--giou_loss_coef", default=2, type=float, help="weight of the GIoU box loss")
    group.add_argument("--focal_alpha", default=0.25, type=float, help="alpha of the focal loss")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--lr", default=2e-4, type=float, help="learning rate of the transformer and heads")
    group.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+",
                       help="parameters whose name contains one of these train at --lr_backbone")
    group.add_argument("--lr_backbone", default=2e-5, type=float,
                       help="learning rate of the backbone; 0 freezes it")
    group.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], type=str,
                       nargs="+", help="parameters whose name contains one of these train at "
                                       "--lr times --lr_linear_proj_mult")
    group.add_argument("--lr_linear_proj_mult", default=0.1, type=float,
                       help="learning-rate factor of the sampling-offset and reference-point projections")
    group.add_argument("--batch_size", default=2, type=int, help="images per process and step")
    group.add_argument("--weight_decay", default=1e-4, type=float, help="weight decay")
    group.add_argument("--epochs", default=50, type=int, help="epochs to train")
    group.add_argument("--lr_drop", default=40, type=int, help="divide the learning rates by 10 every this "
                                                                "many epochs")
    group.add_argument("--clip_max_norm", default=0.1, type=float,
                       help="clip the gradient norm to this; 0 does not clip")
    group.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of AdamW")

    group = parser.add_argument_group("data")
    group.add_argument("--dataset_file", default="coco", choices=("coco",), help="data set format")
    group.add_argument("--coco_path", default="./data/coco", type=str,
                       help="folder with train2017/, val2017/ and annotations/instances_{train,val}2017.json")
    group.add_argument("--num_workers", default=2, type=int, help="data-loading processes per training process")
    group.add_argument("--cache_mode", default=False, action="store_true",
                       help="keep the encoded images in memory, each node holding its own share")

    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="",
                       help="folder for the checkpoints (checkpoint.pth, the last; checkpoint_best.pth, the best "
                            "validation AP so far; numbered copies), log.txt, eval/ and tensorboard/; empty saves "
                            "nothing")
    group.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    group.add_argument("--seed", default=42, type=int, help="random seed")
    group.add_argument("--resume", default="", help="checkpoint to continue training from, or to evaluate "
                                                    "with --eval")
    group.add_argument("--start_epoch", default=0, type=int, metavar="N",
                       help="first epoch (a resumed run starts after its checkpoint's epoch)")
    group.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint) on val2017")

    group = parser.add_argument_group("added by this reimplementation (not in the original)")
    group.add_argument("--num_classes", default=91, type=int,
                       help="classifier outputs: largest category id + 1 (91 for COCO)")
    group.add_argument("--backbone_weights", default="imagenet", type=str,
                       help="'imagenet' (torchvision's ImageNet V1 weights, from the torch hub cache), "
                            "'none' (random initialisation) or the path of a ResNet state_dict")
    group.add_argument("--backbone_norm", default="frozen", choices=("frozen", "batch"),
                       help="BatchNorm of the backbone: 'frozen' (the original) or 'batch' (trainable, for "
                            "training from scratch)")
    group.add_argument("--train_backbone_stem", action="store_true",
                       help="also train the backbone's stem and layer1 (the original freezes them)")
    group.add_argument("--backbone_width", default=64, type=int,
                       help="first-stage width of a basic-block ResNet (resnet10/18/34); 64 is torchvision's")
    group.add_argument("--fused_optimizer", action="store_true",
                       help="AdamW / SGD as PyTorch's fused kernel (one call per step): the same update, rounded "
                            "differently from the original's per-parameter arithmetic; faster, most of all on the CPU")
    group.add_argument("--channels_last", action="store_true",
                       help="run the backbone in the channels-last (NHWC) memory format, which PyTorch's CPU "
                            "convolutions and BatchNorm compute faster; results differ from the original's "
                            "NCHW by float rounding")
    group.add_argument("--finetune", default="", type=str,
                       help="start a new run from this checkpoint's weights (no optimizer, schedule or "
                            "epoch); class heads of another --num_classes are left out")
    group.add_argument("--auto_resume", action="store_true",
                       help="continue output_dir/checkpoint.pth when it exists, in preference to --resume and "
                            "--finetune (which then only start the run): for jobs that are preempted and started "
                            "again with the same command")
    group.add_argument("--save_every_iters", default=0, type=int, metavar="N",
                       help="also write checkpoint.pth inside each epoch, after every N-th iteration, for an exact "
                            "resume there (0: at epoch ends only, as the original)")
    group.add_argument("--save_every_minutes", default=0.0, type=float, metavar="M",
                       help="also write checkpoint.pth inside an epoch once M minutes have passed since the last "
                            "write (0: never)")
    group.add_argument("--print_freq", default=10, type=int, metavar="N",
                       help="print the training and evaluation progress every N iterations")
    group.add_argument("--no_tensorboard", dest="tensorboard", action="store_false",
                       help="write no TensorBoard events (by default, with --output_dir, written to "
                            "output_dir/tensorboard: losses, learning rates and timing every --print_freq "
                            "iterations, the COCO numbers and some validation images' detections every epoch)")
    group.add_argument("--ema", action="store_true",
                       help="also keep an exponential moving average of the weights, evaluated after every epoch "
                            "beside them (log.txt keys test_ema_*) and saved in the checkpoints; with --eval (and "
                            "in the tools), take a checkpoint's averaged weights")
    group.add_argument("--ema_decay", default=0.9999, type=float,
                       help="decay of the average per training step (--ema)")
    group.add_argument("--ema_warmup", default=2000.0, type=float, metavar="STEPS",
                       help="steps over which the decay ramps up to --ema_decay (--ema): decay * (1 - exp(-step / "
                            "STEPS)); 0 for none")
    group.add_argument("--ema_eval_only", action="store_true",
                       help="after every epoch, evaluate the averaged weights only (--ema)")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="leave out images whose files are missing, empty, undecodable or not of the annotated "
                            "size (with a warning naming them), instead of stopping")
    group.add_argument("--check_images", action="store_true",
                       help="decode every image before training (with --num_workers loader processes), so that an "
                            "undecodable file stops the run (or is left out, with --skip_bad_images) at start-up, "
                            "not when it is first read; missing and empty files are always found at start-up")
    group.add_argument("--dist_timeout", default=30.0, type=float,
                       help="minutes a process waits for the others in a collective before failing")
    group.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                       help="mixed precision: the forward pass under autocast to bfloat16 or float16 (with loss "
                            "scaling); matching, losses and post-processing stay float32. 'none' is the "
                            "original's float32")
    group.add_argument("--coco_eval_backend", default="pycocotools", choices=("pycocotools", "faster"),
                       help="COCO evaluation: 'pycocotools' (the original's) or 'faster' (the faster-coco-eval "
                            "package's C++ evaluation: pycocotools' 12 numbers but for their last bits, about 5 "
                            "times faster)")
    group.add_argument("--debug", action="store_true",
                       help="print the traceback of an error in the input (flags, files, data), not only its message")
    # The original's sizes; datasets.transforms.DEFAULT_SCALES is the same list for library callers.
    group.add_argument("--train_scales", default=list(range(480, 801, 32)), type=int, nargs="+",
                       help="training short-side sizes, one drawn per image")
    group.add_argument("--crop_resize_scales", default=[400, 500, 600], type=int, nargs="+",
                       help="training short-side sizes before the random crop (the other half of the images)")
    group.add_argument("--crop_size", default=[384, 600], type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="training range of the random crop's height and width")
    group.add_argument("--val_scale", default=800, type=int, help="evaluation short-side size")
    group.add_argument("--max_size", default=1333, type=int,
                       help="longest image side after resizing (training and evaluation)")
    return parser


@dataclass(frozen=True)
class Bounds:
    """The values a numeric flag may take: finite, from ``low`` to ``high`` (either may be None),
    each end included unless ``low_open`` / ``high_open``; ``why`` explains a limit that is not
    obvious."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {self.high:g}")
        return " and ".join(parts) + (f" ({self.why})" if self.why else "")

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


_COUNT, _NOT_NEGATIVE = Bounds(low=1), Bounds(low=0)
# Every numeric flag of main.py (tests/test_args.py checks that none is missing).
FLAG_BOUNDS: dict[str, Bounds] = {
    **dict.fromkeys(["enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "nheads", "num_queries",
                     "dec_n_points", "enc_n_points", "num_feature_levels", "batch_size", "epochs", "lr_drop",
                     "num_classes", "backbone_width", "train_scales", "crop_resize_scales", "crop_size",
                     "val_scale", "max_size"], _COUNT),
    **dict.fromkeys(["set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
                     "giou_loss_coef", "lr", "lr_linear_proj_mult", "weight_decay", "clip_max_norm",
                     "num_workers", "start_epoch", "seed", "save_every_iters", "save_every_minutes"],
                    _NOT_NEGATIVE),
    "print_freq": _COUNT,
    "ema_decay": Bounds(low=0, high=1, high_open=True),
    "ema_warmup": _NOT_NEGATIVE,
    "lr_backbone": Bounds(low=0, why="0 freezes the backbone"),
    "dropout": Bounds(low=0, high=1, high_open=True),
    "focal_alpha": Bounds(high=1, why="the weight of the positives; a negative value weighs both alike"),
    "dist_timeout": Bounds(low=0, low_open=True, why="minutes"),
}


def check_flag_bounds(args: argparse.Namespace) -> None:
    """Every flag of :data:`FLAG_BOUNDS` that ``args`` has within its bounds (each value of a
    list flag); otherwise :class:`~util.errors.InputValueError` naming the flag and its value."""
    for name, bounds in FLAG_BOUNDS.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        if not all(bounds.admits(v) for v in values):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            finite = "finite and " if not all(math.isfinite(v) for v in values) else ""
            raise InputValueError(f"--{name} {shown} must be {'each ' if isinstance(value, list) else ''}"
                                  f"{finite}{bounds.describe()}")


def check_model_flags(args: argparse.Namespace) -> None:
    """The checks of ``main.py``'s flags that every tool building its model applies: each numeric
    flag's range (:data:`FLAG_BOUNDS`), then the model's flags that do not fit together; otherwise
    :class:`~util.errors.InputValueError` naming them."""
    check_flag_bounds(args)
    if args.hidden_dim % args.nheads:
        raise InputValueError(f"--hidden_dim {args.hidden_dim} must be divisible by --nheads {args.nheads}")
    if args.hidden_dim % 32:
        raise InputValueError(f"--hidden_dim {args.hidden_dim} must be a multiple of 32 (the input projections' "
                              f"GroupNorm has 32 groups)")
    if args.num_feature_levels == 2:
        raise InputValueError("--num_feature_levels must be 1 (the last backbone stage) or at least 3 (its last "
                              "three stages, plus extra levels), got 2")
    if args.two_stage and not args.with_box_refine:
        raise InputValueError("--two_stage needs --with_box_refine (the original's two-stage variant is "
                              "'++ two-stage': refinement plus two-stage)")


# Library parameters whose command-line flag has another name.
FLAG_OF_PARAMETER = {"weights": "backbone_weights", "norm": "backbone_norm", "base_width": "backbone_width",
                     "train_stem": "train_backbone_stem", "d_model": "hidden_dim", "nhead": "nheads",
                     "two_stage_num_proposals": "num_queries"}


def error_message(err: Exception) -> str:
    """An input error's message for the command line: a library parameter named by its flag."""
    if isinstance(err, ParameterError):
        return err.as_flag(FLAG_OF_PARAMETER.get(err.param))
    return str(err)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every flag's default; a switch's reads "not given" (``--no_aux_loss``'s
    default value is True, which would read as if the switch were on)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 and isinstance(action.const, bool):
            return f"{action.help} (default: not given)"
        return super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """An argument parser that shows defaults in ``--help`` and, for a misspelled flag, suggests
    the closest known one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [s for action in self._actions for s in action.option_strings]
            hints = []
            for word in unknown.group(1).split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                if word.startswith("-") and close:
                    hints.append(f"{word}: did you mean {close[0]}?")
            if hints:
                message = f"{message} ({'; '.join(hints)})"
        super().error(message)


def cli_parser(description: str, redefines: bool = False) -> FlagParser:
    """``main.py``'s flags and ``-h``, for a program that adds its own flags to them (with
    ``redefines``, also flags of the same name that replace main.py's)."""
    return FlagParser(description=description, parents=[get_args_parser()],
                      conflict_handler="resolve" if redefines else "error")


def config_flags(name: str) -> list[str]:
    """The ``main.py`` flags that ``configs/<name>.sh`` passes: those between its ``--output_dir``
    and the pass-through arguments."""
    path = CONFIGS / f"{name}.sh"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(CONFIGS.glob("*.sh")))
        raise FileNotFoundError(f"no config {path}; the configs are: {known}")
    words = path.read_text()
    words = words[words.index("main.py"):].replace("\\\n", " ").split()
    return words[words.index("--output_dir") + 2:words.index('"${PY_ARGS[@]}"')]


# The paper's five variants, one configs/ script each.
VARIANTS = tuple(sorted(p.stem for p in CONFIGS.glob("r50_*.sh")))


def architecture_differences(saved: argparse.Namespace, given: argparse.Namespace,
                             ignore: tuple[str, ...] = ()) -> dict[str, tuple[object, object]]:
    """``{flag: (saved value, given value)}`` for the architecture flags on which two sets of flags
    differ; a flag that ``saved`` lacks (checkpoints of the original have no ``num_classes``, for
    one) is not compared."""
    return {name: (getattr(saved, name), getattr(given, name)) for name in ARCHITECTURE_FLAGS
            if name not in ignore and hasattr(saved, name) and getattr(saved, name) != getattr(given, name)}


def closest_config(saved: argparse.Namespace) -> tuple[str, dict[str, tuple[object, object]]]:
    """The ``configs/`` script whose model is nearest to ``saved``'s (the same variant first, then
    the fewest other differences), and the architecture flags it would still need:
    ``(name, {flag: (saved value, the script's value)})``."""
    candidates = []
    for path in sorted(CONFIGS.glob("*.sh")):
        script = get_args_parser().parse_args(config_flags(path.stem))
        candidates.append((path.stem, architecture_differences(saved, script)))
    return min(candidates, key=lambda c: (len(set(c[1]) & set(VARIANT_DEFINING)), len(c[1])))


def describe_flags(values: dict[str, object]) -> str:
    """``--flag value`` words that set each flag to its value (a switch alone, or ``--no_...``)."""
    words = []
    for name, value in values.items():
        if isinstance(value, bool):
            words.append(f"--{name}" if value else f"(no --{name})")
        else:
            words.append(f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(words)


def check_checkpoint_args(checkpoint: Mapping[str, Any], args: argparse.Namespace, path: str,
                          finetune: bool = False) -> None:
    """A checkpoint's saved flags must describe the model the command line builds (all but
    ``--num_classes`` when fine-tuning); otherwise name the flags that differ and the ``configs/``
    script that fits the checkpoint."""
    saved = checkpoint.get("args")
    if not isinstance(saved, argparse.Namespace):
        return
    differences = architecture_differences(saved, args, ignore=("num_classes",) if finetune else ())
    if not differences:
        return
    listed = ", ".join(f"--{name} (checkpoint: {mine}, here: {theirs})" for name, (mine, theirs) in differences.items())
    config, extra = closest_config(saved)
    fits = f"configs/{config}.sh" + (f" with {describe_flags({k: v[0] for k, v in extra.items()})}" if extra else "")
    raise InputValueError(f"{path} was trained with other architecture flags than these: {listed}. It fits {fits}")
