"""TensorBoard event files of a training run (``output_dir/tensorboard``), written by the main process.

Steps are training iterations done, counted from the run's start, so that a resumed run continues
the same curves: its writer hides the events a killed run wrote past the checkpoint it resumes
from (TensorBoard's ``purge_step``).
"""
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine import StepRequests
from util.logger import MetricLogger
from util.misc import nested_tensor_from_tensor_list
from util.visualize import draw_detections, select_detections

# Names of the 12 COCO box numbers, in pycocotools' order.
COCO_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100", "AR_small",
              "AR_medium", "AR_large")
# Names of the optimizer's three groups (util.optim.build_param_groups).
GROUP_NAMES = ("lr", "lr_backbone", "lr_linear_proj")


class TrainingBoard:
    """Writes a run's scalars and pictures; an :class:`~engine.EpochControl` of the training epochs.

    Every ``print_freq`` iterations (with the console's progress lines) and at an epoch's last:
    each weighted loss and their sum (``train/loss``), ``train/class_error``, ``train/grad_norm``
    (the medians of the console's windows), each optimizer group's learning rate
    (``train/lr``, ``train/lr_backbone``, ``train/lr_linear_proj``) and ``train/seconds_per_iteration``
    (since the previous write). After each epoch's evaluation (:meth:`epoch_end`): the 12 COCO
    numbers (``test/AP``, ..., ``test/AR_large``) and the evaluation losses (``test/loss``, ...),
    ``test_ema/...`` for the averaged weights (``--ema``), ``epoch/seconds``, and the detections
    on a few fixed validation images (``detections/<image id>``).

    Args:
        log_dir: the event files' folder.
        iterations_per_epoch: training iterations of an epoch (of one process).
        weight_names: the weighted losses (the criterion's ``weight_dict`` keys).
        optimizer: whose groups' learning rates are written.
        print_freq: iterations between writes.
        resume_step: the iterations a resumed run has done (0 for a new one); events of a later
            step, written by a run that was killed, are hidden.
    """

    def __init__(self, log_dir: Path, iterations_per_epoch: int, weight_names: Sequence[str],
                 optimizer: torch.optim.Optimizer, print_freq: int, resume_step: int = 0):
        self.log_dir = log_dir
        self.purge_step = resume_step + 1 if resume_step else None
        self._writer = None
        self.iterations_per_epoch = iterations_per_epoch
        self.weight_names = set(weight_names)
        self.optimizer = optimizer
        self.print_freq = print_freq
        self.epoch = 0
        self.iterations = 0
        self._last = (0, time.monotonic())

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, created with the first event (a run that fails before its first
        step leaves no event file)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def step(self, epoch: int, iteration: int) -> int:
        """The global step after ``iteration`` (counted from 0) of ``epoch``."""
        return epoch * self.iterations_per_epoch + iteration + 1

    def begin_epoch(self, epoch: int, iterations: int) -> None:
        """Epoch ``epoch`` has ``iterations`` in all (a resumed one included)."""
        self.epoch, self.iterations = epoch, iterations
        self._last = (self.step(epoch, -1), time.monotonic())

    def requests(self) -> StepRequests:
        return StepRequests()

    def after_step(self, iteration: int, agreed: StepRequests, logger: MetricLogger) -> None:
        if iteration % self.print_freq and iteration != self.iterations - 1:
            return
        step = self.step(self.epoch, iteration)
        for name, meter in logger.meters.items():
            if (name in self.weight_names or name in ("loss", "class_error", "grad_norm")) and meter.window:
                self.writer.add_scalar(f"train/{name}", meter.median, step)
        for name, group in zip(GROUP_NAMES, self.optimizer.param_groups):
            self.writer.add_scalar(f"train/{name}", group["lr"], step)
        last_step, last_time = self._last
        now = time.monotonic()
        if step > last_step:
            self.writer.add_scalar("train/seconds_per_iteration", (now - last_time) / (step - last_step), step)
        self._last = (step, now)

    def epoch_end(self, epoch: int, stats: Mapping[str, Mapping[str, Any]], seconds: float) -> None:
        """After epoch ``epoch``: ``stats`` by prefix (``test``, ``test_ema``) as
        :func:`~engine.evaluate` returns them, and the epoch's duration."""
        step = self.step(epoch, self.iterations_per_epoch - 1)
        for prefix, values in stats.items():
            for name, value in values.items():
                if name == "coco_eval_bbox":
                    for coco_name, number in zip(COCO_NAMES, value):
                        self.writer.add_scalar(f"{prefix}/{coco_name}", number, step)
                elif isinstance(value, float):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.add_scalar("epoch/seconds", seconds, step)

    @torch.no_grad()
    def detections(self, epoch: int, model: nn.Module, samples: Sequence[tuple[Image.Image, torch.Tensor, int]],
                   names: Mapping[int, str], device: torch.device, threshold: float = 0.3) -> None:
        """The model's detections (scores above ``threshold``, at most 20) drawn on each
        ``(image, normalised tensor, image id)`` of ``samples``."""
        was_training = model.training
        model.eval()
        step = self.step(epoch, self.iterations_per_epoch - 1)
        for image, tensor, image_id in samples:
            outputs = model(nested_tensor_from_tensor_list([tensor.to(device)]))
            found = select_detections(outputs, (image.height, image.width), threshold, 20)
            scale = max(1.0, 256 / max(image.size))  # small images enlarged, so labels stay legible
            drawn = np.asarray(draw_detections(image, found, dict(names), scale=scale))
            self.writer.add_image(f"detections/{image_id}", drawn, step, dataformats="HWC")
        model.train(was_training)

    def flush(self) -> None:
        """Write the events so far to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
