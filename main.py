"""Train and evaluate Deformable DETR: ``python main.py [flags]`` (see README.md and ``--help``)."""
import argparse
import contextlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from util.errors import InputError, InputValueError
from util.flags import check_checkpoint_args, check_model_flags, cli_parser, error_message


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
    check_model_flags(args)
    if args.crop_size[0] > args.crop_size[1]:
        raise InputValueError(f"--crop_size MIN MAX needs MIN <= MAX, got {args.crop_size}")
    if args.set_cost_class == args.set_cost_bbox == args.set_cost_giou == 0:
        raise InputValueError("--set_cost_class, --set_cost_bbox and --set_cost_giou are all 0: the matching "
                              "needs at least one cost")
    if args.start_epoch >= args.epochs and not (args.eval or args.resume or args.auto_resume):
        raise InputValueError(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing to "
                              f"train")
    if args.resume and args.finetune:
        raise InputValueError("--resume and --finetune exclude each other: --resume continues a run, "
                              "--finetune starts a new one from a checkpoint's weights")
    if args.coco_eval_backend == "faster" and importlib.util.find_spec("faster_coco_eval") is None:
        raise InputValueError("--coco_eval_backend faster needs the faster-coco-eval package (in requirements.txt): "
                              "pip install -r requirements.txt")
    if args.ema_eval_only and not args.ema:
        raise InputValueError("--ema_eval_only needs --ema (it evaluates the averaged weights only)")
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


@dataclass
class Start:
    """What a run starts from: a checkpoint (``path``, empty for none) continued, or with
    ``finetune`` only its weights taken, and a ``note`` saying why when ``--auto_resume`` chose."""
    path: str
    finetune: bool
    note: str = ""


def choose_start(args: argparse.Namespace) -> Start:
    """``--auto_resume`` continues ``output_dir/checkpoint.pth`` when it exists, before any
    ``--resume`` or ``--finetune`` (which start the run the first time); otherwise those."""
    given = ("--resume", args.resume) if args.resume else ("--finetune", args.finetune) if args.finetune else None
    start = Start(args.resume or args.finetune, bool(args.finetune))
    if not args.auto_resume:
        return start
    own = Path(args.output_dir) / "checkpoint.pth"
    if own.is_file():
        note = f"--auto_resume: continuing {own}"
        if given is not None and Path(given[1]).resolve() != own.resolve():
            note += f", not {given[0]} {given[1]} (the run started before and saved there)"
        return Start(str(own), False, note)
    start.note = f"--auto_resume: no {own} yet, " + (f"starting from {given[0]} {given[1]}" if given else
                                                      "starting afresh")
    return start


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
    from datasets.samplers import epoch_order
    from engine import AMP_DTYPES, evaluate, train_one_epoch
    from models import build_model
    from util.board import TrainingBoard
    from util.checkpoint import (
        check_optimizer_state,
        checkpoint_weights,
        completed_epoch,
        load_checkpoint,
        load_weights,
        mid_epoch_progress,
        restore_training_state,
        save_epoch,
        save_on_main,
        trim_log_on_main,
    )
    from util.dist import all_gather, destroy_distributed, init_distributed
    from util.ema import ModelEMA
    from util.logger import MetricLogger, print_main
    from util.misc import epoch_seed, seed_everything
    from util.optim import build_optimizer
    from util.preemption import (
        MidEpochCheckpoints,
        StopSignals,
        ignore_stop_signals,
        resume_within_epoch,
        resumed_skip,
        rng_state,
    )

    check_args(args)
    check_device(args.device)
    output_dir = Path(args.output_dir)
    start = choose_start(args)
    # Cheap checks first: the annotation files, the image files and the checkpoint, before the
    # model is built. An evaluation reads the validation split alone.
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    for dataset in (dataset_train, dataset_val):
        if dataset is not None:
            check_num_classes(dataset.coco, args.num_classes)
    try:
        checkpoint = load_checkpoint(start.path) if start.path else None
    except InputError as err:
        if not start.note.startswith("--auto_resume: continuing"):
            raise
        raise InputValueError(f"{err}; --auto_resume took it from --output_dir: move it aside to continue from a "
                              f"numbered checkpoint of that folder (--resume), or to start afresh") from err
    if checkpoint is not None:
        check_checkpoint_args(checkpoint, args, start.path, finetune=start.finetune)
    last_epoch = completed_epoch(checkpoint) if checkpoint is not None and not (start.finetune or args.eval) else None
    progress = mid_epoch_progress(checkpoint) if last_epoch is not None else None

    env = init_distributed(torch.device(args.device).type, datetime.timedelta(minutes=args.dist_timeout))
    board = None
    # A training run with an output folder holds the stop signals from here on: one that comes
    # while it sets up (or evaluates a resumed checkpoint) stops it after its first step. Without
    # an output folder nothing could be saved, and a signal ends the process as usual.
    signals = StopSignals()
    held = contextlib.ExitStack()
    try:
        if args.output_dir and not args.eval:
            held.enter_context(signals)
        if start.note:
            print_main(start.note)
        if checkpoint is not None and not isinstance(checkpoint.get("args"), argparse.Namespace):
            print_main(f"warning: {start.path} records no training arguments ('args'): the model is built from these "
                       f"flags, which only its weights' names and shapes check (--dilation, for one, changes none)")
        if last_epoch is not None and last_epoch + 1 >= args.epochs:
            print_main(f"{start.path} completed epoch {last_epoch}, the last of --epochs {args.epochs}: "
                       f"nothing left to train")
            return
        print_main(args)
        device = torch.device(args.device)
        if device.type == "cuda" and env.distributed:
            device = torch.device("cuda", env.local_rank)
        if args.check_images:
            # before the seeding below: the check's loader draws from the random generator
            for dataset in (dataset_train, dataset_val):
                if dataset is not None:
                    check_images(dataset, args.num_workers, env.rank, env.world_size, report=print_main)
        seed_everything(args.seed + env.rank)

        # A checkpoint's weights replace the backbone's, so ImageNet's are not even downloaded.
        model_args = args if checkpoint is None else argparse.Namespace(**{**vars(args), "backbone_weights": "none"})
        model, criterion, postprocessors = build_model(model_args)
        model.to(device)
        criterion.to(device)
        n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print_main("number of params:", n_parameters)
        loaders = build_loaders(dataset_train, dataset_val, args.batch_size, args.num_workers,
                                distributed=env.distributed, node_local=args.cache_mode,
                                pin_memory=device.type == "cuda", rank=env.rank, world_size=env.world_size,
                                seed=args.seed, worker_init_fn=ignore_stop_signals)
        if loaders.train is not None and len(loaders.train) == 0:
            share = f", the share of each of {env.world_size} processes" if env.distributed else ""
            raise InputValueError(f"--batch_size {args.batch_size} is more than the {len(loaders.train_sampler)} "
                                  f"training images{share}")
        optimizer, lr_scheduler = build_optimizer(args, model)
        rate_notes = check_optimizer_state(checkpoint, optimizer, start.path, args) if last_epoch is not None else []
        amp = AMP_DTYPES[args.amp]
        # float16 needs loss scaling (its range is too small for the gradients); bfloat16 does not.
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        if args.eval and args.ema and checkpoint is None:
            raise InputValueError("--eval --ema evaluates a checkpoint's averaged weights: give it with --resume")
        if checkpoint is not None:
            weights = checkpoint_weights(checkpoint, start.path, ema=args.eval and args.ema)
            dropped = load_weights(model, weights, start.path, other_classes=start.finetune)
            if start.finetune:
                print_main(f"fine-tuning from {start.path}; class heads left out (shape differs from "
                           f"--num_classes {args.num_classes}): {dropped if dropped else 'none'}")
        ema = ModelEMA(model, args.ema_decay, args.ema_warmup) if args.ema and not args.eval else None
        if ema is not None and last_epoch is not None:
            if "ema" in checkpoint:
                ema.load_state_dict(checkpoint["ema"])
            else:
                print_main(f"note: {start.path} holds no averaged weights; the average starts from its weights")
        model_without_ddp = model
        if env.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.local_rank] if device.type == "cuda" else None)

        def run_evaluation(weights: nn.Module = model):
            return evaluate(weights, criterion, postprocessors, loaders.val, dataset_val.coco, device,
                            print_freq=args.print_freq, amp=amp, backend=args.coco_eval_backend)

        if args.eval:
            after = ""
            within = mid_epoch_progress(checkpoint) if checkpoint is not None else None
            if within:
                after = f" (after {within['iteration']} iterations of epoch {within['epoch']})"
            elif checkpoint is not None and "epoch" in checkpoint:
                after = f" (after epoch {checkpoint['epoch']})"
            averaged = " (its averaged weights)" if args.ema else ""
            print_main(f"evaluating {start.path or 'the initial weights'}{averaged}{after}")
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
                print_main(f"note: continuing the saved schedule of {start.path} (lr drop every "
                           f"{lr_scheduler.step_size} epochs), not --lr_drop {args.lr_drop}")
            if rate_notes:
                print_main(f"note: continuing the saved learning rates and weight decay of {start.path}, not "
                           f"{', '.join(rate_notes)}")
            if progress:
                where = f"continuing epoch {start_epoch} of {args.epochs} after its iteration {progress['iteration']}"
            else:
                where = f"epoch {last_epoch} completed, continuing with epoch {start_epoch} of {args.epochs}"
            rates = [group["lr"] for group in optimizer.param_groups]
            print_main(f"resumed from {start.path}: {where}, learning rates {rates}")
        if start.path and not start.finetune:
            # The original evaluates the resumed model before continuing, as a check.
            run_evaluation(ema.module if args.ema_eval_only else model)
        # Created only now, when every check has passed, so that a failed start leaves nothing behind.
        if args.output_dir:
            output_dir.mkdir(parents=True, exist_ok=True)
            if last_epoch is not None:
                trim_log_on_main(output_dir / "log.txt", last_epoch)

        # A resumed run continues its saved schedule; its checkpoints' args say so.
        saved_args = argparse.Namespace(**{**vars(args), "lr_drop": lr_scheduler.step_size})

        # The best validation AP so far (of the averaged weights with --ema), carried by the checkpoints.
        best = checkpoint.get("best") if last_epoch is not None else None

        def training_state(epoch: int) -> dict:
            state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": saved_args}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if ema is not None:
                state["ema"] = ema.state_dict()
            if best is not None:
                state["best"] = best
            return state

        iterations_per_epoch = len(loaders.train)
        if args.output_dir and args.tensorboard and env.rank == 0:
            done = 0
            if last_epoch is not None:  # the iterations the run has done, counted as this run counts them
                within = resumed_skip(progress, env.world_size, args.batch_size) // args.batch_size if progress else 0
                done = start_epoch * iterations_per_epoch + within
            board = TrainingBoard(output_dir / "tensorboard", iterations_per_epoch, list(criterion.weight_dict),
                                  optimizer, args.print_freq, resume_step=done)
            # the detections of a few fixed validation images, drawn after every epoch
            pictures = [(dataset_val.decode(i), dataset_val[i][0], dataset_val.ids[i])
                        for i in range(min(4, len(dataset_val)))]
            class_names = {c["id"]: c["name"] for c in dataset_val.coco.cats.values() if "name" in c}

        print_main("Start training")
        start_time = time.time()
        checkpoint_path = output_dir / "checkpoint.pth"
        control = MidEpochCheckpoints(args.save_every_iters, args.save_every_minutes, signals, str(checkpoint_path),
                                      env.rank == 0, device) if args.output_dir else None
        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.time()
            seed_everything(epoch_seed(args.seed, env.rank, env.world_size, epoch))
            order = epoch_order(len(dataset_train), epoch)
            skip, meters = 0, None
            if progress is not None and progress["epoch"] == epoch:
                skip, meters = resume_within_epoch(progress, order, env.rank, env.world_size, args.batch_size,
                                                   args.seed, device)
            loaders.train_sampler.set_epoch(epoch, skip=skip)
            first = skip // args.batch_size

            def save_progress(done: int, logger: MetricLogger, epoch: int = epoch, order=order) -> None:
                processes = all_gather({"rng": rng_state(device), "meters": logger.state()})
                state = training_state(epoch - 1)
                state["mid_epoch"] = {"epoch": epoch, "iteration": done, "batch_size": args.batch_size,
                                      "world_size": env.world_size, "order": order.to(torch.int32),
                                      "processes": processes}
                save_on_main(state, checkpoint_path)

            if board is not None:
                board.begin_epoch(epoch, first + len(loaders.train))
            if control is not None:
                control.begin_epoch(epoch, first + len(loaders.train), save_progress)
            controls = [c for c in (board, control) if c is not None]
            train_stats = train_one_epoch(model, criterion, loaders.train, optimizer, device, epoch,
                                          args.clip_max_norm, args.print_freq, amp=amp, scaler=scaler,
                                          start=first, meters=meters, controls=controls, ema=ema)
            lr_scheduler.step()
            # the raw weights as the original, and (or, with --ema_eval_only, only) the averaged ones
            evaluations = {}
            if not args.ema_eval_only:
                evaluations["test"] = run_evaluation()
            if ema is not None:
                evaluations["test_ema"] = run_evaluation(ema.module)
            tracked = "test_ema" if ema is not None else "test"
            ap = evaluations[tracked][0]["coco_eval_bbox"][0]
            improved = best is None or ap > best["ap"]
            if improved:
                best = {"epoch": epoch, "ap": ap, "weights": "averaged" if ema is not None else "model"}
            if args.output_dir:
                log_stats = {f"train_{k}": v for k, v in train_stats.items()}
                for prefix, (stats, _) in evaluations.items():
                    log_stats.update((f"{prefix}_{k}", v) for k, v in stats.items())
                log_stats.update(epoch=epoch, n_parameters=n_parameters)
                coco_eval = evaluations.get("test", evaluations[tracked])[1].coco_eval["bbox"].eval
                if board is not None:
                    # on disk before the checkpoint: a run resumed from it does not write them again
                    board.epoch_end(epoch, {prefix: stats for prefix, (stats, _) in evaluations.items()},
                                    time.time() - epoch_start)
                    board.detections(epoch, ema.module if ema is not None else model_without_ddp, pictures,
                                     class_names, device)
                    board.flush()
                save_epoch(output_dir, epoch, log_stats, coco_eval, training_state(epoch), lr_scheduler.step_size,
                           best=improved)
                if improved:
                    print_main(f"best validation AP so far{' (averaged weights)' if ema is not None else ''}: "
                               f"{ap:.4f} after epoch {epoch}, in {output_dir / 'checkpoint_best.pth'}")
                if epoch + 1 < args.epochs:
                    control.after_epoch(epoch)
        print_main(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    finally:
        held.close()
        if board is not None:
            board.close()
        destroy_distributed()


def _message(err: Exception) -> str:
    """The error's message, naming flags rather than library parameters."""
    text = error_message(err)
    if "Original Traceback" in text:
        # Re-raised from a DataLoader worker with the worker's traceback: its last line is the error.
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), run, and return the exit status: 0; 1 for a
    non-finite loss or predictions, or when the other processes of a distributed job are lost; 2
    for bad input (printed as one ``error:`` line; with ``--debug``, or ``DDETR_DEBUG=1`` in the
    environment, with its traceback); ``128 + N`` after stopping on signal N with a checkpoint."""
    args = cli_parser("Deformable DETR training and evaluation script").parse_args(argv)
    # torch loads only once the flags are parsed
    from datasets.coco import BadImageError
    from engine import NonFiniteError
    from util.dist import lost_contact
    from util.preemption import TrainingStopped

    try:
        train_and_evaluate(args)
    except TrainingStopped as stop:
        if stop.main_process:
            print(stop, file=sys.stderr, flush=True)
        return stop.exit_status
    except (NonFiniteError, InputError) as err:
        if args.debug or os.environ.get("DDETR_DEBUG") == "1":
            traceback.print_exc()
        hint = "; --skip_bad_images skips such images" if isinstance(err, BadImageError) else ""
        print(f"error: {_message(err)}{hint}", file=sys.stderr)
        return 1 if isinstance(err, NonFiniteError) else 2
    except RuntimeError as err:
        if not lost_contact(err):
            raise
        # Another process died or hangs; what happened to it is in its own output.
        if args.debug or os.environ.get("DDETR_DEBUG") == "1":
            traceback.print_exc()
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"stopping: lost contact with the other processes of the job ({detail[:300]}); the first process "
              f"to fail says why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
