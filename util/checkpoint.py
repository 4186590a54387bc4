"""Checkpoint files and the run's other outputs: crash-safe saving on the main process, safe
loading, resuming, and fine-tuning weight transfer."""
import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from util.dist import is_main_process
from util.errors import InputFileNotFoundError, InputValueError

PathLike = str | Path


def _replace_durably(tmp: Path, path: Path) -> None:
    """Rename the fully written ``tmp`` onto ``path`` and make the rename itself durable."""
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_on_main(obj: Any, path: PathLike) -> None:
    """``torch.save`` from the main process only, crash-safe: the data goes to a temporary file in
    the same folder, is flushed and fsynced, then renamed over ``path``. A process killed at any
    moment leaves either the old file or the new one, never a truncated one."""
    if not is_main_process():
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _replace_durably(tmp, path)


def _write_text_durably(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _replace_durably(tmp, path)


def append_line_on_main(path: PathLike, line: str) -> None:
    """Append ``line`` (and a newline) to a text file from the main process only, crash-safe like
    :func:`save_on_main`: the file is rewritten whole to a temporary file and renamed, so it never
    ends in half a line."""
    if not is_main_process():
        return
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    _write_text_durably(path, old + line + "\n")


def trim_log_on_main(path: PathLike, last_epoch: int) -> None:
    """Drop the lines of a ``log.txt`` whose ``epoch`` is after ``last_epoch``: those of an epoch
    whose checkpoint was never written (the run was killed in between), which a resumed run
    trains again."""
    path = Path(path)
    if not is_main_process() or not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("epoch", -1) <= last_epoch]
    if len(kept) != len(lines):
        _write_text_durably(path, "".join(line + "\n" for line in kept))


def _load_error(path: PathLike, err: Exception) -> str:
    """What went wrong in ``torch.load``, without its advice to unpickle the file."""
    text = str(err)
    detail = text.splitlines()[0] if text else type(err).__name__
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        if detail.startswith("Unsupported global"):
            detail = detail.split(" was not an allowed global")[0]
            return (f"{path} holds something other than tensors, containers and argparse.Namespace ({detail}); "
                    f"checkpoints are read with weights_only=True and never unpickled")
    return f"{path} is not a readable checkpoint (truncated, or not written by torch.save): {detail}"


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``.

    The only class allowed beyond tensors and containers is ``argparse.Namespace``, which this
    project's and the original's checkpoints keep under ``'args'``.
    """
    if not Path(path).is_file():
        what = "is a folder, not a checkpoint file" if Path(path).is_dir() else "does not exist"
        raise InputFileNotFoundError(f"checkpoint {path} {what}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails on foreign bytes in many ways (KeyError, EOFError, ...)
        raise InputValueError(_load_error(path, err)) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise InputValueError(f"{path} is not a Deformable DETR checkpoint: expected a dict with a 'model' "
                              f"entry, got {type(checkpoint).__name__}"
                              + (f" with keys {sorted(checkpoint)}" if isinstance(checkpoint, dict) else ""))
    return checkpoint


def _is_class_head(key: str) -> bool:
    return "class_embed" in key.split(".")


def _listed(keys: list[str], limit: int = 10) -> str:
    return f"{keys[:limit]}" + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str,
                 other_classes: bool = False) -> list[str]:
    """Copy ``state_dict`` into ``model``; every key and shape must match in both directions.

    With ``other_classes`` (fine-tuning on other classes), the classification heads
    (``class_embed.*``, also ``transformer.decoder.class_embed.*`` in two-stage models) whose
    shapes differ from the model's are left out and keep the model's values. Returns the keys left
    out. Any other difference raises :class:`~util.errors.InputValueError` listing the keys: the
    checkpoint is of another architecture.
    """
    own = model.state_dict()
    dropped = [k for k, v in state_dict.items()
               if other_classes and _is_class_head(k) and k in own and own[k].shape != v.shape]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and k not in dropped and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if mismatched or missing or unexpected:
        problems = [f"shape mismatches {_listed(mismatched)}" if mismatched else "",
                    f"keys missing from the checkpoint {_listed(missing)}" if missing else "",
                    f"keys the model does not have {_listed(unexpected)}" if unexpected else ""]
        hint = "" if other_classes else ("; a checkpoint with another number of classes can start a new run "
                                         "through fine-tuning")
        raise InputValueError(f"{source} does not fit the model, it is of another architecture "
                              f"({'; '.join(p for p in problems if p)}){hint}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in dropped}, strict=not dropped)
    return dropped


def completed_epoch(checkpoint: Mapping[str, Any]) -> int | None:
    """The last epoch a training checkpoint completed; None for one that holds weights only (no
    optimizer and schedule to continue from)."""
    if not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        return None
    return checkpoint["epoch"]


def mid_epoch_progress(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a mid-epoch checkpoint saved about the epoch in progress (``epoch``, ``iteration``,
    ``batch_size``, ``world_size``, ``order``, ``processes``); None for one written at an epoch's
    end."""
    progress = checkpoint.get("mid_epoch")
    return progress if isinstance(progress, dict) else None


def _optimizer_kind(groups: list[Mapping[str, Any]]) -> str:
    return "SGD" if any("momentum" in group for group in groups) else "AdamW"


def check_optimizer_state(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer, path: PathLike,
                          args: argparse.Namespace) -> list[str]:
    """A training checkpoint's optimizer state must fit the optimizer ``args`` built: the same
    kind (``--sgd``) and parameter groups of the same sizes (``--lr_backbone`` 0 or not,
    ``--train_backbone_stem``, ``--backbone_norm``, the name lists); otherwise
    :class:`~util.errors.InputValueError` naming the flags that differ. Returns the rate flags
    (``--lr``, ...) that differ from the checkpoint's: the saved rates are the ones continued."""
    saved_groups = checkpoint["optimizer"].get("param_groups", [])
    saved = checkpoint.get("args") if isinstance(checkpoint.get("args"), argparse.Namespace) else None
    fresh = (f"; resume with the flags it was trained with, or start a new optimizer from its weights with "
             f"--finetune {path}")
    kind = type(optimizer).__name__
    if _optimizer_kind(saved_groups) != kind:
        raise InputValueError(f"{path} was trained with {_optimizer_kind(saved_groups)}, these flags build {kind} "
                              f"({'--sgd' if kind == 'SGD' else 'no --sgd'}){fresh}")
    differing = []
    if saved is not None:
        for name in ("lr_backbone_names", "lr_linear_proj_names", "train_backbone_stem", "backbone_norm"):
            if hasattr(saved, name) and getattr(saved, name) != getattr(args, name):
                differing.append(f"--{name} (checkpoint: {getattr(saved, name)}, here: {getattr(args, name)})")
        if hasattr(saved, "lr_backbone") and (saved.lr_backbone > 0) != (args.lr_backbone > 0):
            differing.append(f"--lr_backbone (checkpoint: {saved.lr_backbone}, here: {args.lr_backbone}; "
                             f"0 freezes the backbone)")
    because = f" ({', '.join(differing)})" if differing else ""
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    saved_sizes = [len(group.get("params", [])) for group in saved_groups]
    if sizes != saved_sizes:
        raise InputValueError(f"{path} cannot continue with these flags: its optimizer's parameter groups hold "
                              f"{saved_sizes} parameters, these flags give {sizes}{because}{fresh}")
    # Groups of the same sizes may still hold other parameters: each one's saved moments must have
    # its shape, and the flags that choose the groups must be the checkpoint's.
    state = checkpoint["optimizer"].get("state", {})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved_groups for i in group["params"]]
    shapes_differ = any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != param.shape
                        for i, param in zip(saved_ids, params) for v in state.get(i, {}).values())
    if shapes_differ or differing:
        raise InputValueError(f"{path} cannot continue with these flags: its optimizer's parameter groups hold "
                              f"other parameters than these flags give them{because}{fresh}")
    if saved is None:
        return []
    return [f"--{name} {getattr(args, name)} (saved: {getattr(saved, name)})"
            for name in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay")
            if hasattr(saved, name) and getattr(saved, name) != getattr(args, name)]


def restore_training_state(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                           lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                           scaler: torch.amp.GradScaler | None = None) -> None:
    """Load a training checkpoint's optimizer, learning-rate schedule and, for a ``scaler``
    (float16 training), its loss scale; a checkpoint of a run without one leaves the scaler fresh.
    The optimizer keeps the implementation it was built with (``--fused_optimizer`` or not), which
    ``load_state_dict`` would otherwise take from the checkpoint's groups."""
    implementation = [{k: group[k] for k in ("foreach", "fused") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, chosen in zip(optimizer.param_groups, implementation):
        group.update(chosen)
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])


def checkpoint_paths(output_dir: Path, epoch: int, lr_drop: int) -> list[Path]:
    """Where the checkpoint after ``epoch`` goes: ``checkpoint.pth``, and a numbered copy
    ``checkpoint{epoch:04}.pth`` before each learning-rate drop and every 5 epochs."""
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % lr_drop == 0 or (epoch + 1) % 5 == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    return paths


def save_epoch(output_dir: Path, epoch: int, log_stats: Mapping[str, Any], coco_eval: Any,
               checkpoint: Mapping[str, Any], lr_drop: int, best: bool = False) -> None:
    """Write an epoch's outputs from the main process: its ``log.txt`` line, pycocotools' ``eval``
    state (``eval/latest.pth``, and ``eval/{epoch:03}.pth`` every 50 epochs), ``checkpoint_best.pth``
    when the epoch is the ``best`` so far, then the checkpoint (:func:`checkpoint_paths`).

    Checkpoints last: a run killed in between resumes from the previous checkpoint, and the resume
    drops this epoch's log line (:func:`trim_log_on_main`) and evaluates the epoch again, so that
    ``checkpoint_best.pth`` is rewritten if it should be.
    """
    append_line_on_main(output_dir / "log.txt", json.dumps(log_stats))
    if is_main_process():
        (output_dir / "eval").mkdir(exist_ok=True)
    for name in ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else []):
        save_on_main(coco_eval, output_dir / "eval" / name)
    paths = ([output_dir / "checkpoint_best.pth"] if best else []) + checkpoint_paths(output_dir, epoch, lr_drop)
    for path in paths:
        save_on_main(checkpoint, path)


def checkpoint_weights(checkpoint: Mapping[str, Any], path: PathLike, ema: bool = False) -> Mapping[str, Tensor]:
    """A checkpoint's model weights: ``model``, or with ``ema`` the averaged weights a run with
    ``--ema`` saved (:class:`~util.errors.InputValueError` if it has none)."""
    if not ema:
        return checkpoint["model"]
    averaged = checkpoint.get("ema")
    if not isinstance(averaged, dict) or "model" not in averaged:
        raise InputValueError(f"--ema: {path} holds no averaged weights (it was not trained with --ema)")
    return averaged["model"]
