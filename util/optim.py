"""The optimizer's parameter groups, the optimizer and the learning-rate schedule of the original."""
import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from util.errors import ParameterError


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(k in name for k in keywords)


def build_param_groups(model: nn.Module, lr: float, lr_backbone: float, backbone_names: Sequence[str],
                       linear_proj_names: Sequence[str], lr_linear_proj_mult: float) -> list[dict[str, Any]]:
    """The original's three optimizer groups over the trainable parameters, by substring of the name:
    the rest at ``lr``, backbone names at ``lr_backbone``, and the deformable attention's
    sampling-offset and reference-point projections at ``lr * lr_linear_proj_mult``."""
    rest, backbone, linear_proj = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone, in_proj = _matches(name, backbone_names), _matches(name, linear_proj_names)
        if in_backbone and in_proj:
            raise ParameterError("lr_linear_proj_names", list(linear_proj_names),
                                 f"and lr_backbone_names={list(backbone_names)} both match parameter {name}")
        (backbone if in_backbone else linear_proj if in_proj else rest).append(param)
    return [{"params": rest, "lr": lr},
            {"params": backbone, "lr": lr_backbone},
            {"params": linear_proj, "lr": lr * lr_linear_proj_mult}]


def build_optimizer(args: argparse.Namespace, model: nn.Module
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """AdamW (or SGD with momentum 0.9 under ``args.sgd``) over :func:`build_param_groups`, and
    ``StepLR`` dividing every rate by 10 each ``args.lr_drop`` epochs; PyTorch's fused kernel with
    ``args.fused_optimizer``, else its multi-tensor one."""
    groups = build_param_groups(model, args.lr, args.lr_backbone, args.lr_backbone_names,
                                args.lr_linear_proj_names, args.lr_linear_proj_mult)
    # foreach: the multi-tensor implementation, which PyTorch picks by itself on CUDA; on the CPU it
    # computes the same values as the per-parameter loop it would pick, with far fewer calls.
    # --fused_optimizer: one fused kernel per step, the same update rounded differently.
    implementation = {"fused": True} if args.fused_optimizer else {"foreach": True}
    if args.sgd:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, **implementation)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, **implementation)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
