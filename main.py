"""Train and evaluate Deformable DETR: ``python main.py [flags]`` (see README.md)."""
import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.samplers import NodeDistributedSampler
from datasets.transforms import DEFAULT_SCALES
from engine import NonFiniteLossError, evaluate, train_one_epoch
from models import build_model
from util.checkpoint import (append_line_on_main, load_checkpoint, load_for_finetuning, load_for_resume,
                             save_on_main, trim_log_on_main)
from util.dist import destroy_distributed, init_distributed, is_main_process
from util.logger import print_main
from util.misc import collate_fn


def get_args_parser() -> argparse.ArgumentParser:
    """The original ``main.py`` flags, names, defaults and types, plus the ones README lists."""
    parser = argparse.ArgumentParser("Deformable DETR Detector", add_help=False)
    parser.add_argument("--lr", default=2e-4, type=float)
    parser.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    parser.add_argument("--lr_backbone", default=2e-5, type=float)
    parser.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"],
                        type=str, nargs="+")
    parser.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--lr_drop", default=40, type=int)
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    parser.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of AdamW")

    # Variants
    parser.add_argument("--with_box_refine", default=False, action="store_true")
    parser.add_argument("--two_stage", default=False, action="store_true")

    # Backbone
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="resnet18, resnet34, resnet50, resnet101 (torchvision's) or resnet10")
    parser.add_argument("--backbone_weights", default="imagenet", type=str,
                        help="'imagenet' (torchvision's ImageNet V1 weights, from the torch hub "
                             "cache), 'none' (random init) or a path to a ResNet state_dict")
    parser.add_argument("--backbone_norm", default="frozen", choices=("frozen", "batch"),
                        help="BatchNorm of the backbone: 'frozen' (the original) or 'batch' (trainable, "
                             "for training from scratch)")
    parser.add_argument("--train_backbone_stem", action="store_true",
                        help="also train the backbone's stem and layer1 (the original freezes them)")
    parser.add_argument("--backbone_width", default=64, type=int,
                        help="first-stage width of a basic-block ResNet (resnet10/18/34); 64 is torchvision's")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last ResNet stage by dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                        help="type of positional embedding on top of the image features")
    parser.add_argument("--num_feature_levels", default=4, type=int, help="number of feature levels")

    # Transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="number of encoder layers")
    parser.add_argument("--dec_layers", default=6, type=int, help="number of decoder layers")
    parser.add_argument("--dim_feedforward", default=1024, type=int,
                        help="intermediate size of the feed-forward layers")
    parser.add_argument("--hidden_dim", default=256, type=int, help="transformer width")
    parser.add_argument("--dropout", default=0.1, type=float, help="dropout in the transformer")
    parser.add_argument("--nheads", default=8, type=int, help="attention heads")
    parser.add_argument("--num_queries", default=300, type=int, help="number of query slots")
    parser.add_argument("--dec_n_points", default=4, type=int)
    parser.add_argument("--enc_n_points", default=4, type=int)

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary losses at every decoder layer")

    # Matcher
    parser.add_argument("--set_cost_class", default=2, type=float, help="class weight in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")

    # Loss coefficients
    parser.add_argument("--cls_loss_coef", default=2, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--focal_alpha", default=0.25, type=float)

    # Dataset
    parser.add_argument("--dataset_file", default="coco", choices=("coco",))
    parser.add_argument("--coco_path", default="./data/coco", type=str)
    parser.add_argument("--num_classes", default=91, type=int,
                        help="classifier outputs: largest category id + 1 (91 for COCO)")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default="cuda", help="device to use for training / testing")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint")
    parser.add_argument("--auto_resume", action="store_true",
                        help="resume from output_dir/checkpoint.pth when it exists (for preemptible jobs)")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--cache_mode", default=False, action="store_true",
                        help="keep the images in memory, each node holding its own share")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="warn about and skip images that cannot be read, instead of stopping")

    # Added by this reimplementation (not in the original).
    parser.add_argument("--finetune", default="", type=str,
                        help="initialise from this checkpoint's weights only (no optimizer, schedule or "
                             "epoch); class heads whose shape differs from the model's (another "
                             "--num_classes) are left out")
    parser.add_argument("--dist_timeout", default=30.0, type=float,
                        help="minutes a process waits for the others in a collective before failing")
    parser.add_argument("--train_scales", default=list(DEFAULT_SCALES), type=int, nargs="+",
                        help="training short-side sizes, one drawn per image")
    parser.add_argument("--crop_resize_scales", default=[400, 500, 600], type=int, nargs="+",
                        help="training: short-side sizes before the random crop (the other half of the images)")
    parser.add_argument("--crop_size", default=[384, 600], type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="training: range of the random crop's height and width")
    parser.add_argument("--val_scale", default=800, type=int, help="evaluation short-side size")
    parser.add_argument("--max_size", default=1333, type=int,
                        help="longest image side after resizing (train and evaluation)")
    return parser


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(k in name for k in keywords)


def build_param_groups(model: nn.Module, lr: float, lr_backbone: float, backbone_names: Sequence[str],
                       linear_proj_names: Sequence[str], lr_linear_proj_mult: float) -> List[Dict[str, Any]]:
    """The original's three optimizer groups over the trainable parameters, by substring of the name:
    the rest at ``lr``, backbone names at ``lr_backbone``, and the deformable attention's
    sampling-offset and reference-point projections at ``lr * lr_linear_proj_mult``."""
    rest, backbone, linear_proj = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone, in_proj = _matches(name, backbone_names), _matches(name, linear_proj_names)
        if in_backbone and in_proj:
            raise ValueError(f"parameter {name} matches both --lr_backbone_names {list(backbone_names)} "
                             f"and --lr_linear_proj_names {list(linear_proj_names)}")
        (backbone if in_backbone else linear_proj if in_proj else rest).append(param)
    return [{"params": rest, "lr": lr},
            {"params": backbone, "lr": lr_backbone},
            {"params": linear_proj, "lr": lr * lr_linear_proj_mult}]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_data(args: argparse.Namespace) -> Tuple[Any, Any, DataLoader, DataLoader]:
    """``(dataset_val, sampler_train, loader_train, loader_val)``, with the original's samplers:
    distributed (node-local shares with ``--cache_mode``) or random/sequential."""
    dataset_train = build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    if args.distributed:
        if args.cache_mode:
            sampler_train = NodeDistributedSampler(dataset_train)
            sampler_val = NodeDistributedSampler(dataset_val, shuffle=False)
        else:
            sampler_train = DistributedSampler(dataset_train)
            sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_train = RandomSampler(dataset_train)
        sampler_val = SequentialSampler(dataset_val)
    pin = args.device.startswith("cuda")
    batch_sampler = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=True)
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                              num_workers=args.num_workers, pin_memory=pin)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=pin)
    return dataset_val, sampler_train, loader_train, loader_val


def check_num_classes(coco: COCO, num_classes: int) -> None:
    """The classifier indexes classes by category id, so it needs more outputs than the largest id."""
    category_ids = coco.getCatIds()
    if category_ids and max(category_ids) >= num_classes:
        raise ValueError(f"--num_classes {num_classes} is too small: the annotations hold category id "
                         f"{max(category_ids)}; pass --num_classes {max(category_ids) + 1} or more")


def _epoch_seed(args: argparse.Namespace, epoch: int) -> int:
    """Distinct per (process, epoch), so a resumed run draws what an uninterrupted one would."""
    return args.seed + args.rank + epoch * args.world_size


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values and combinations that cannot work, naming the flags, before any work."""
    positive = ["batch_size", "epochs", "lr_drop", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                "dim_feedforward", "num_queries", "num_feature_levels", "enc_n_points", "dec_n_points",
                "num_classes", "val_scale", "max_size", "backbone_width"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "start_epoch", "clip_max_norm", "lr", "lr_backbone", "dropout"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    if min(args.train_scales + args.crop_resize_scales + args.crop_size) < 1:
        raise ValueError("--train_scales, --crop_resize_scales and --crop_size must be positive sizes")
    if args.crop_size[0] > args.crop_size[1]:
        raise ValueError(f"--crop_size MIN MAX needs MIN <= MAX, got {args.crop_size}")
    if args.hidden_dim % args.nheads:
        raise ValueError(f"--hidden_dim {args.hidden_dim} must be divisible by --nheads {args.nheads}")
    if args.hidden_dim % 32:
        raise ValueError(f"--hidden_dim {args.hidden_dim} must be a multiple of 32 (the input projections' "
                         f"GroupNorm has 32 groups)")
    if args.num_feature_levels == 2:
        raise ValueError("--num_feature_levels must be 1 (the last backbone stage) or at least 3 (its last "
                         "three stages, plus extra levels), got 2")
    if args.two_stage and not args.with_box_refine:
        raise ValueError("--two_stage needs --with_box_refine (the original's two-stage variant is "
                         "'++ two-stage': refinement plus two-stage)")
    if args.resume and args.finetune:
        raise ValueError("--resume and --finetune exclude each other: --resume continues a run, "
                         "--finetune starts a new one from a checkpoint's weights")
    if args.auto_resume and not args.output_dir:
        raise ValueError("--auto_resume needs --output_dir (it resumes from output_dir/checkpoint.pth)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} but no CUDA device is visible; pass --device cpu")


def main(args: argparse.Namespace) -> None:
    """Train (or with ``--eval`` only evaluate) as configured by ``args``; see README.md."""
    check_args(args)
    if args.auto_resume and not args.resume and (Path(args.output_dir) / "checkpoint.pth").is_file():
        args.resume = str(Path(args.output_dir) / "checkpoint.pth")
    env = init_distributed(torch.device(args.device).type, datetime.timedelta(minutes=args.dist_timeout))
    args.distributed, args.rank, args.world_size = env.distributed, env.rank, env.world_size
    args.gpu = env.local_rank
    try:
        _train_and_evaluate(args)
    finally:
        destroy_distributed()


def _train_and_evaluate(args: argparse.Namespace) -> None:
    print_main(args)
    device = torch.device(args.device)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    seed_everything(args.seed + args.rank)

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print_main("number of params:", n_parameters)

    dataset_val, sampler_train, loader_train, loader_val = build_data(args)
    base_ds = get_coco_api_from_dataset(dataset_val)
    for dataset in (loader_train.dataset, dataset_val):
        check_num_classes(get_coco_api_from_dataset(dataset), args.num_classes)

    param_groups = build_param_groups(model_without_ddp, args.lr, args.lr_backbone, args.lr_backbone_names,
                                      args.lr_linear_proj_names, args.lr_linear_proj_mult)
    if args.sgd:
        optimizer = torch.optim.SGD(param_groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)

    if args.finetune:
        checkpoint = load_checkpoint(args.finetune)
        dropped = load_for_finetuning(model_without_ddp, checkpoint["model"], args.finetune)
        print_main(f"fine-tuning from {args.finetune}; class heads left out (shape differs from "
                   f"--num_classes {args.num_classes}): {dropped if dropped else 'none'}")

    if args.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module

    output_dir = Path(args.output_dir)
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        unexpected = load_for_resume(model_without_ddp, checkpoint["model"], args.resume)
        if unexpected:
            print_main(f"ignored keys of {args.resume} that the model does not have: {unexpected}")
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            args.start_epoch = checkpoint["epoch"] + 1
            if args.output_dir:
                trim_log_on_main(output_dir / "log.txt", checkpoint["epoch"])
            if lr_scheduler.step_size != args.lr_drop:
                print_main(f"note: continuing the saved schedule of {args.resume} (lr drop every "
                           f"{lr_scheduler.step_size} epochs), not --lr_drop {args.lr_drop}")
            print_main(f"resumed from {args.resume} at epoch {args.start_epoch}, learning rates "
                       f"{[g['lr'] for g in optimizer.param_groups]}")
        if not args.eval:
            # The original evaluates the resumed model before continuing, as a check.
            evaluate(model, criterion, postprocessors, loader_val, base_ds, device)

    if args.eval:
        _, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device)
        if args.output_dir:
            save_on_main(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
        return

    print_main("Start training")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        seed_everything(_epoch_seed(args, epoch))
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                      args.clip_max_norm)
        lr_scheduler.step()
        test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device)
        if not args.output_dir:
            continue
        # Evaluation results first, checkpoints last: a run killed in between resumes from the
        # previous checkpoint, and the resume drops this epoch's log line (see trim_log_on_main).
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        append_line_on_main(output_dir / "log.txt", json.dumps(log_stats))
        (output_dir / "eval").mkdir(exist_ok=True)
        for name in ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else []):
            save_on_main(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / name)
        paths = [output_dir / "checkpoint.pth"]
        # An extra copy before each learning-rate drop and every 5 epochs.
        if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 5 == 0:
            paths.append(output_dir / f"checkpoint{epoch:04}.pth")
        checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                      "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args}
        for path in paths:
            save_on_main(checkpoint, path)

    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print_main(f"Training time {total}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser("Deformable DETR training and evaluation script", parents=[get_args_parser()])
    cli_args = cli.parse_args()
    if cli_args.output_dir:
        Path(cli_args.output_dir).mkdir(parents=True, exist_ok=True)
    try:
        main(cli_args)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
