"""An exponential moving average of a model's weights (``--ema``), updated after every training step."""
import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """A copy of ``model`` whose parameters and floating-point buffers follow the model's as an
    exponential moving average; other buffers are copied as they are.

    After the ``n``-th :meth:`update`, every averaged tensor is ``d * ema + (1 - d) * model`` with
    ``d = decay * (1 - exp(-n / warmup))`` (``d = decay`` when ``warmup`` is 0): early in training,
    when the weights move fast, the average follows them closely, and later it averages over about
    ``1 / (1 - decay)`` steps.

    Args:
        model: the model trained (not its DistributedDataParallel wrapper); copied once here.
        decay: in ``[0, 1)``.
        warmup: steps over which the decay ramps up to ``decay``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: float):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if warmup < 0:
            raise ValueError(f"warmup must not be negative, got {warmup}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        """``d`` of the next :meth:`update`."""
        if self.warmup == 0:
            return self.decay
        return self.decay * (1 - math.exp(-(self.updates + 1) / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights."""
        weight = 1 - self.current_decay()
        averaged, targets = [], []
        # parameters() and buffers() list a tensor that several modules share once (state_dict()
        # lists it under every name, and it would be averaged once per name)
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        for own, value in zip(mine, theirs, strict=True):
            if value.is_floating_point():
                averaged.append(own)
                targets.append(value)
            else:
                own.copy_(value)
        # one multi-tensor call: ema + weight * (model - ema), per tensor
        torch._foreach_lerp_(averaged, targets, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (``model``, keyed as the model's ``state_dict``) and ``updates``."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
