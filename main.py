"""Train and evaluate Deformable DETR: ``python main.py [flags]`` (see README.md and ``--help``)."""
import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from util.errors import InputError, InputValueError, ParameterError
from util.flags import check_checkpoint_args, cli_parser

# Library parameters whose command-line flag has another name.
FLAG_OF_PARAMETER = {"weights": "backbone_weights", "norm": "backbone_norm", "base_width": "backbone_width",
                     "train_stem": "train_backbone_stem", "d_model": "hidden_dim", "nhead": "nheads",
                     "two_stage_num_proposals": "num_queries"}


def _check_output_dir(output_dir: str) -> None:
    """An ``--output_dir`` that could not be created or written fails now, not after the first epoch."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise InputValueError(f"--output_dir {output_dir} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputValueError(f"--output_dir {output_dir} cannot be written: {existing} is not writable")


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values and combinations that cannot work, naming the flags, before any work."""
    positive = ["batch_size", "epochs", "lr_drop", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                "dim_feedforward", "num_queries", "num_feature_levels", "enc_n_points", "dec_n_points",
                "num_classes", "val_scale", "max_size", "backbone_width"]
    for name in positive:
        if getattr(args, name) < 1:
            raise InputValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "start_epoch", "clip_max_norm", "lr", "lr_backbone", "dropout"):
        if getattr(args, name) < 0:
            raise InputValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    if min(args.train_scales + args.crop_resize_scales + args.crop_size) < 1:
        raise InputValueError("--train_scales, --crop_resize_scales and --crop_size must be positive sizes")
    if args.crop_size[0] > args.crop_size[1]:
        raise InputValueError(f"--crop_size MIN MAX needs MIN <= MAX, got {args.crop_size}")
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
    if args.resume and args.finetune:
        raise InputValueError("--resume and --finetune exclude each other: --resume continues a run, "
                              "--finetune starts a new one from a checkpoint's weights")
    if args.auto_resume and not args.output_dir:
        raise InputValueError("--auto_resume needs --output_dir (it resumes from output_dir/checkpoint.pth)")
    if args.output_dir:
        _check_output_dir(args.output_dir)


def check_device(device: str) -> None:
    """``--device`` must name a device type torch knows, and a CUDA device that is visible."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputValueError(f"--device {device} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputValueError(f"--device {device} but no CUDA device is visible; pass --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise InputValueError(f"--device {device} but only {torch.cuda.device_count()} CUDA devices are visible")


def train_and_evaluate(args: argparse.Namespace) -> None:
    """Train (or with ``--eval`` only evaluate) as configured by ``args``; see docs/training.md."""
    # Imported here, not at the top, so that --help and flag errors answer without loading torch.
    import datetime
    import time

    import torch
    from torch import nn

    from datasets import build_dataset
    from datasets.coco import check_images, check_num_classes
    from datasets.loaders import build_loaders
    from engine import AMP_DTYPES, evaluate, train_one_epoch
    from models import build_model
    from util.checkpoint import (
        completed_epoch,
        load_checkpoint,
        load_weights,
        restore_training_state,
        save_epoch,
        save_on_main,
        trim_log_on_main,
    )
    from util.dist import destroy_distributed, init_distributed
    from util.logger import print_main
    from util.misc import epoch_seed, seed_everything
    from util.optim import build_optimizer

    check_args(args)
    check_device(args.device)
    output_dir = Path(args.output_dir)
    if args.auto_resume and not args.resume and (output_dir / "checkpoint.pth").is_file():
        args.resume = str(output_dir / "checkpoint.pth")
    # Cheap checks first: the annotation files and the checkpoint, before the model is built.
    dataset_train, dataset_val = build_dataset("train", args), build_dataset("val", args)
    for dataset in (dataset_train, dataset_val):
        check_num_classes(dataset.coco, args.num_classes)
    source = args.resume or args.finetune
    checkpoint = load_checkpoint(source) if source else None
    if checkpoint is not None:
        check_checkpoint_args(checkpoint, args, source, finetune=bool(args.finetune))
    last_epoch = completed_epoch(checkpoint) if args.resume and not args.eval else None
    if last_epoch is not None and last_epoch + 1 >= args.epochs:
        print(f"{source} completed epoch {last_epoch}, the last of --epochs {args.epochs}: nothing left to train")
        return

    env = init_distributed(torch.device(args.device).type, datetime.timedelta(minutes=args.dist_timeout))
    try:
        print_main(args)
        device = torch.device(args.device)
        if device.type == "cuda" and env.distributed:
            device = torch.device("cuda", env.local_rank)
        if args.check_images:
            # before the seeding below: the check's loader draws from the random generator
            for dataset in (dataset_val,) if args.eval else (dataset_train, dataset_val):
                check_images(dataset, args.num_workers, env.rank, env.world_size, report=print_main)
        seed_everything(args.seed + env.rank)

        model, criterion, postprocessors = build_model(args)
        model.to(device)
        criterion.to(device)
        n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print_main("number of params:", n_parameters)
        loaders = build_loaders(dataset_train, dataset_val, args.batch_size, args.num_workers,
                                distributed=env.distributed, node_local=args.cache_mode,
                                pin_memory=device.type == "cuda")
        if len(loaders.train) == 0 and not args.eval:
            share = f", the share of each of {env.world_size} processes" if env.distributed else ""
            raise InputValueError(f"--batch_size {args.batch_size} is more than the {len(loaders.train_sampler)} "
                                  f"training images{share}")
        optimizer, lr_scheduler = build_optimizer(args, model)
        amp = AMP_DTYPES[args.amp]
        # float16 needs loss scaling (its range is too small for the gradients); bfloat16 does not.
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        if checkpoint is not None:
            dropped = load_weights(model, checkpoint["model"], source, other_classes=bool(args.finetune))
            if args.finetune:
                print_main(f"fine-tuning from {source}; class heads left out (shape differs from "
                           f"--num_classes {args.num_classes}): {dropped if dropped else 'none'}")
        model_without_ddp = model
        if env.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.local_rank] if device.type == "cuda" else None)

        def run_evaluation():
            return evaluate(model, criterion, postprocessors, loaders.val, dataset_val.coco, device, amp=amp)

        if args.eval:
            print_main(f"evaluating {source or 'the initial weights'}"
                       + (f" (after epoch {checkpoint['epoch']})" if checkpoint and "epoch" in checkpoint else ""))
            _, coco_evaluator = run_evaluation()
            if args.output_dir:
                output_dir.mkdir(parents=True, exist_ok=True)
                save_on_main(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
            return

        start_epoch = args.start_epoch
        if last_epoch is not None:
            restore_training_state(checkpoint, optimizer, lr_scheduler, scaler)
            start_epoch = last_epoch + 1
            if lr_scheduler.step_size != args.lr_drop:
                print_main(f"note: continuing the saved schedule of {source} (lr drop every "
                           f"{lr_scheduler.step_size} epochs), not --lr_drop {args.lr_drop}")
            print_main(f"resumed from {source}: epoch {last_epoch} completed, continuing with epoch {start_epoch} "
                       f"of {args.epochs}, learning rates {[g['lr'] for g in optimizer.param_groups]}")
        if args.resume:
            # The original evaluates the resumed model before continuing, as a check.
            run_evaluation()
        # Created only now, when every check has passed, so that a failed start leaves nothing behind.
        if args.output_dir:
            output_dir.mkdir(parents=True, exist_ok=True)
            if last_epoch is not None:
                trim_log_on_main(output_dir / "log.txt", last_epoch)

        # A resumed run continues its saved schedule; its checkpoints' args say so.
        saved_args = argparse.Namespace(**{**vars(args), "lr_drop": lr_scheduler.step_size})
        print_main("Start training")
        start_time = time.time()
        for epoch in range(start_epoch, args.epochs):
            seed_everything(epoch_seed(args.seed, env.rank, env.world_size, epoch))
            if env.distributed:
                loaders.train_sampler.set_epoch(epoch)
            train_stats = train_one_epoch(model, criterion, loaders.train, optimizer, device, epoch,
                                          args.clip_max_norm, amp=amp, scaler=scaler)
            lr_scheduler.step()
            test_stats, coco_evaluator = run_evaluation()
            if args.output_dir:
                log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                             **{f"test_{k}": v for k, v in test_stats.items()},
                             "epoch": epoch, "n_parameters": n_parameters}
                state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": saved_args}
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                save_epoch(output_dir, epoch, log_stats, coco_evaluator.coco_eval["bbox"].eval, state,
                           lr_scheduler.step_size)
        print_main(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    finally:
        destroy_distributed()


def _message(err: Exception) -> str:
    """The error's message, naming flags rather than library parameters."""
    if isinstance(err, ParameterError):
        return err.as_flag(FLAG_OF_PARAMETER.get(err.param))
    text = str(err)
    if "Original Traceback" in text:
        # Re-raised from a DataLoader worker with the worker's traceback: its last line is the error.
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), run, and return the exit status: 0, 1 for a
    non-finite loss, 2 for bad input (printed as one ``error:`` line; with ``--debug``, or
    ``DDETR_DEBUG=1`` in the environment, with its traceback)."""
    args = cli_parser("Deformable DETR training and evaluation script").parse_args(argv)
    # torch loads only once the flags are parsed
    from datasets.coco import BadImageError
    from engine import NonFiniteLossError

    try:
        train_and_evaluate(args)
    except (NonFiniteLossError, InputError) as err:
        if args.debug or os.environ.get("DDETR_DEBUG") == "1":
            traceback.print_exc()
        hint = "; --skip_bad_images skips such images" if isinstance(err, BadImageError) else ""
        print(f"error: {_message(err)}{hint}", file=sys.stderr)
        return 1 if isinstance(err, NonFiniteLossError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
