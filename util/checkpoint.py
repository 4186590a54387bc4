"""Checkpoint files: saving on the main process, safe loading, and fine-tuning weight transfer."""
import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

import torch
from torch import Tensor, nn

from util.dist import is_main_process

PathLike = Union[str, Path]


def save_on_main(obj: Any, path: PathLike) -> None:
    """``torch.save`` from the main process only, through a temporary file renamed into place, so an
    interrupted save never leaves a truncated checkpoint behind."""
    if not is_main_process():
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``.

    The only class allowed beyond tensors and containers is ``argparse.Namespace``, which this
    project's and the original's checkpoints keep under ``'args'``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a Deformable DETR checkpoint: expected a dict with a 'model' "
                         f"entry, got {type(checkpoint).__name__}"
                         + (f" with keys {sorted(checkpoint)}" if isinstance(checkpoint, dict) else ""))
    return checkpoint


def _is_class_head(key: str) -> bool:
    return "class_embed" in key.split(".")


def load_for_finetuning(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> List[str]:
    """Copy ``state_dict`` into ``model``, leaving out the classification heads (``class_embed.*``,
    also ``transformer.decoder.class_embed.*`` in two-stage models) whose shapes differ from the
    model's, i.e. when the number of classes changed. Returns the keys left out.

    Any other difference (a key missing on either side, another shape mismatch) raises
    ``ValueError`` naming the keys, since it means the checkpoint is of a different architecture.
    """
    own = model.state_dict()
    dropped = [k for k, v in state_dict.items()
               if _is_class_head(k) and k in own and own[k].shape != v.shape]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items()
                  if k in own and k not in dropped and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if mismatched or missing or unexpected:
        problems = [f"shape mismatches {mismatched}" if mismatched else "",
                    f"missing keys {missing}" if missing else "",
                    f"unexpected keys {unexpected}" if unexpected else ""]
        raise ValueError(f"cannot fine-tune from {source}: the checkpoint's architecture differs from "
                         f"the model's ({'; '.join(p for p in problems if p)}); check the variant flags "
                         "(--with_box_refine, --two_stage, --num_feature_levels, --num_queries, ...)")
    kept = {k: v for k, v in state_dict.items() if k not in dropped}
    model.load_state_dict(kept, strict=False)
    return dropped
