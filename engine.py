"""One training epoch and one evaluation pass, as ``main.py`` runs them."""
import contextlib
import io
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from datasets.coco_eval import CocoEvaluator
from util.dist import get_world_size, is_main_process, reduce_dict
from util.ema import ModelEMA
from util.errors import InputValueError
from util.logger import MetricLogger, SmoothedValue, print_main
from util.misc import NestedTensor, full_precision

Targets = list[dict[str, Any]]

# --amp: the autocast dtype of the forward pass (None: float32 throughout, the original).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(FloatingPointError):
    """Training or evaluation met a NaN or infinite value and must stop (``main.py`` exits with 1)."""


class NonFiniteLossError(NonFiniteError):
    """The weighted loss (averaged over processes) is NaN or infinite; training must stop."""


class NonFinitePredictionError(NonFiniteError):
    """The model's outputs (on some process) hold NaN or infinite values: a diverged model, or an
    overflow in half precision."""


@dataclass
class StepRequests:
    """What a process asks of all at a training step: a checkpoint after it (``save``), and to
    stop after that (``stop``). :func:`train_step` replaces the fields by what the processes agreed
    at the step's one reduction: True on every process when True on any."""
    save: bool = False
    stop: bool = False


class EpochControl(Protocol):
    """Hooks of :func:`train_one_epoch` around each step (mid-epoch checkpoints, stopping)."""

    def requests(self) -> StepRequests:
        """This process's requests for the step in progress (asked after its backward pass)."""

    def after_step(self, iteration: int, agreed: StepRequests, logger: MetricLogger) -> None:
        """Called after step ``iteration`` (counted from the epoch's start) with what the processes
        agreed; may save, and may end the epoch by raising."""


def to_device(samples: NestedTensor, targets: Sequence[Mapping[str, Any]],
              device: torch.device) -> tuple[NestedTensor, Targets]:
    """Move a batch to ``device`` without blocking (the tensors of each target; other values as is)."""
    samples = samples.to(device, non_blocking=True)
    moved = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
             for t in targets]
    return samples, moved


def _non_finite_count(outputs: Any, device: torch.device) -> Tensor:
    """How many values of the model's floating-point outputs (nested dicts and lists) are NaN or
    infinite, as a tensor on ``device`` (no synchronisation)."""
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, list):
        return sum((_non_finite_count(v, device) for v in outputs), torch.zeros((), dtype=torch.int64, device=device))
    if isinstance(outputs, Tensor) and outputs.is_floating_point():
        return (~torch.isfinite(outputs.detach())).sum()
    return torch.zeros((), dtype=torch.int64, device=device)


def _loss_scalars(loss_dict: Mapping[str, Tensor], weight_dict: Mapping[str, float], extra: Sequence[Tensor] = (),
                  shared: Sequence[Tensor] = (),
                  counted: bool = True) -> tuple[dict[str, float], list[float], list[float]]:
    """Average ``loss_dict`` over processes and bring it to the host with a single transfer.

    Returns the logged values -- ``loss`` (weighted sum), each weighted loss under its own name,
    and every entry of ``loss_dict`` as ``<name>_unscaled`` --, the ``extra`` scalars (this
    process's), and the ``shared`` scalars summed over processes (in the same reduction). A
    process that takes part without a batch of its own passes ``counted=False``: the average is
    over the others (when all count, it is, bit for bit, the sum divided by the number of processes).
    """
    names = sorted(loss_dict)
    if get_world_size() > 1:
        first = loss_dict[names[0]]
        to_reduce = {k: v.detach() if counted else torch.zeros_like(v) for k, v in loss_dict.items()}
        # these names sort before any loss name
        to_reduce["\0count"] = first.new_full((), float(counted))
        to_reduce.update((f"\0shared{i}", value.to(first.dtype)) for i, value in enumerate(shared))
        reduced = reduce_dict(to_reduce, average=False)
        count = reduced.pop("\0count")
        summed = [reduced.pop(f"\0shared{i}") for i in range(len(shared))]
        reduced = {k: v / count for k, v in reduced.items()}
    else:
        reduced, summed = {k: v.detach() for k, v in loss_dict.items()}, list(shared)
    weighted = [k for k in names if k in weight_dict]
    unscaled = torch.stack([reduced[k].float().reshape(()) for k in names])
    scaled = torch.stack([reduced[k].float().reshape(()) * weight_dict[k] for k in weighted])
    tail = [e.detach().float().reshape(()) for e in extra] + [s.float().reshape(()) for s in summed]
    packed = torch.cat([scaled.sum().reshape(1), scaled, unscaled] + ([torch.stack(tail)] if tail else []))
    host = packed.cpu().tolist()
    values = {"loss": host[0]}
    values.update(zip(weighted, host[1:1 + len(weighted)]))
    offset = 1 + len(weighted)
    values.update((f"{k}_unscaled", v) for k, v in zip(names, host[offset:offset + len(names)]))
    offset += len(names)
    return values, host[offset:offset + len(extra)], host[offset + len(extra):]


def _evaluate_nothing(model: nn.Module, criterion: nn.Module, device: torch.device,
                      amp: torch.dtype | None) -> list[str]:
    """What an evaluation batch does across processes, for a process whose batch is empty (all its
    images left out as unreadable): the same collectives, in the same order, on a blank 800x800
    image without objects (large enough for any two-stage model's proposals), its losses not
    counted. Returns the names of the values a batch logs."""
    blank = NestedTensor(torch.zeros(1, 3, 800, 800, device=device),
                         torch.zeros(1, 800, 800, dtype=torch.bool, device=device))
    outputs = forward(model, blank, amp)
    nothing = [{"labels": torch.zeros(0, dtype=torch.int64, device=device),
                "boxes": torch.zeros(0, 4, device=device)}]
    values, _, _ = _loss_scalars(criterion(outputs, nothing), criterion.weight_dict,
                                 shared=[torch.zeros((), dtype=torch.int64, device=device)], counted=False)
    return list(values)


def _check_predictions(count: float, where: str, amp: torch.dtype | None) -> None:
    """Raise :class:`NonFinitePredictionError` if ``count`` (non-finite output values, summed over
    processes) is not 0."""
    if count:
        hint = ("; under --amp fp16 the forward pass can overflow float16's range: --amp bf16 keeps float32's range"
                if amp == torch.float16 else "")
        raise NonFinitePredictionError(f"the model's predictions hold {int(count)} NaN or infinite values "
                                       f"{where}{hint}")


def _to_float32(outputs: Any) -> Any:
    """The model's outputs (nested dicts and lists of tensors) with half-precision tensors in float32."""
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float32(v) for v in outputs]
    return full_precision(outputs) if isinstance(outputs, Tensor) else outputs


def forward(model: nn.Module, samples: NestedTensor, amp: torch.dtype | None = None) -> dict[str, Any]:
    """``model(samples)``; with ``amp``, under autocast to that dtype on the samples' device, and
    the outputs brought back to float32: the matcher, the losses and the post-processing run in
    float32, since their costs in half precision would change the matches."""
    if amp is None:
        return model(samples)
    with torch.autocast(samples.tensors.device.type, dtype=amp):
        outputs = model(samples)
    return _to_float32(outputs)


def train_step(model: nn.Module, criterion: nn.Module, samples: NestedTensor, targets: Targets,
               optimizer: torch.optim.Optimizer, max_norm: float, amp: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None,
               requests: Callable[[], StepRequests] | None = None) -> dict[str, float]:
    """Forward (see :func:`forward` for ``amp``), weighted loss, backward, gradient clipping and
    optimizer step for one batch.

    Returns the logged values (see :func:`_loss_scalars`) plus ``grad_norm`` (before clipping).
    ``requests`` is called after the backward pass (so that a signal that came during the step
    counts for it), and the fields of the :class:`StepRequests` it returns are replaced by what the
    processes agreed. Beyond those of the model and criterion, the step synchronises with the host
    once: one transfer of all logged values, after the backward pass and before the optimizer step,
    which also carries the count of non-finite predictions and the requests. Non-finite predictions
    raise :class:`NonFinitePredictionError` and a non-finite loss :class:`NonFiniteLossError` there,
    on every process alike, leaving the weights and optimizer state unchanged.

    With a ``scaler`` (float16), the loss is scaled for the backward pass and the gradients are
    unscaled before clipping; a step whose gradients overflow is skipped by the scaler (no error,
    and no ``grad_norm`` logged for it), which costs one more synchronisation.
    """
    outputs = forward(model, samples, amp)
    non_finite = _non_finite_count(outputs, samples.tensors.device)
    loss_dict = criterion(outputs, targets)
    weight_dict = criterion.weight_dict
    loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

    optimizer.zero_grad()
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    # foreach: the same values as the per-tensor loop (PyTorch's default on the CPU), in a few
    # multi-tensor calls instead of several per parameter
    if max_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    asked = requests() if requests is not None else StepRequests()
    # new_full launches a fill on the device: no host-to-device copy, no synchronisation
    shared = [non_finite, grad_norm.new_full((), float(asked.save)), grad_norm.new_full((), float(asked.stop))]
    values, (grad_norm_value,), agreed = _loss_scalars(loss_dict, weight_dict, extra=[grad_norm], shared=shared)
    _check_predictions(agreed[0], "in a training step, stopping training", amp)
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(f"loss is {values['loss']}, stopping training; losses averaged "
                                 f"over processes: {values}")
    asked.save, asked.stop = agreed[1] > 0, agreed[2] > 0
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if scaler is None or math.isfinite(grad_norm_value):
        values["grad_norm"] = grad_norm_value
    return values


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    max_norm: float = 0, print_freq: int = 10, amp: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, start: int = 0,
                    meters: Mapping[str, tuple[int, float, Sequence[float]]] | None = None,
                    controls: Sequence[EpochControl] = (), ema: ModelEMA | None = None) -> dict[str, float]:
    """Train for one pass over ``data_loader``; return each logged value's average over the epoch
    and over all processes.

    ``max_norm > 0`` clips the gradient norm to it; ``grad_norm`` is logged either way (before
    clipping). ``amp`` and ``scaler``: see :func:`train_step`. A resumed epoch passes the
    iterations already done as ``start`` (``data_loader`` then holds the rest) and the meters of
    that part (:meth:`~util.logger.MetricLogger.state`), so the averages are the whole epoch's.
    ``controls`` are called around every step, in order (their requests combined); ``ema`` is
    updated after every step.
    """
    agreed = StepRequests()

    def ask() -> StepRequests:
        asked = [control.requests() for control in controls]
        agreed.save, agreed.stop = any(r.save for r in asked), any(r.stop for r in asked)
        return agreed

    model.train()
    criterion.train()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    logger.add_meter("grad_norm", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    if meters:
        logger.restore(meters)
    header = f"Epoch: [{epoch}]"
    for iteration, (samples, targets) in logger.log_every(data_loader, print_freq, header, device, start=start):
        samples, targets = to_device(samples, targets, device)
        values = train_step(model, criterion, samples, targets, optimizer, max_norm, amp, scaler, ask)
        if ema is not None:
            ema.update(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
        logger.update(**values)
        if "class_error_unscaled" in values:
            logger.update(class_error=values["class_error_unscaled"])
        logger.update(lr=optimizer.param_groups[0]["lr"])
        for control in controls:
            control.after_step(iteration, agreed, logger)
    logger.synchronize_between_processes(device)
    print_main("Averaged stats:", logger)
    return logger.global_averages()


@contextlib.contextmanager
def _quiet_unless_main() -> Iterator[None]:
    """Swallow stdout on processes other than the main one (COCO's summaries print on every rank)."""
    if is_main_process():
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: Mapping[str, nn.Module],
             data_loader: Iterable, base_ds: Any, device: torch.device,
             print_freq: int = 10, amp: torch.dtype | None = None,
             backend: str = "pycocotools") -> tuple[dict[str, Any], CocoEvaluator]:
    """Losses and COCO box AP of ``model`` over ``data_loader`` (every process's share of it).

    Predictions from all processes are gathered before COCO evaluation, whose 12-line summary is
    printed by the main process. Non-finite predictions raise :class:`NonFinitePredictionError`
    on every process. Returns the averaged losses plus ``coco_eval_bbox`` (the 12 COCO
    numbers) and ``skipped_images`` (images of ``base_ds`` that got no predictions: left out as
    unreadable, see :class:`~datasets.coco.CocoDetection`), and the evaluator. ``backend`` picks
    the COCO evaluation's implementation (:class:`~datasets.coco_eval.CocoEvaluator`).
    """
    model.eval()
    criterion.eval()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    evaluator = CocoEvaluator(base_ds, ("bbox",), backend=backend)
    for _, (samples, targets) in logger.log_every(data_loader, print_freq, "Test:", device):
        if samples is None:  # every image of the batch was left out (unreadable)
            if get_world_size() > 1:  # the others reduce their batch's losses, and the meters: take part
                for name in _evaluate_nothing(model, criterion, device, amp):
                    logger.meters.setdefault(name, SmoothedValue())
            continue
        image_ids = [int(t["image_id"]) for t in targets]
        samples, targets = to_device(samples, targets, device)
        outputs = forward(model, samples, amp)
        non_finite = _non_finite_count(outputs, device)
        loss_dict = criterion(outputs, targets)
        values, _, (bad,) = _loss_scalars(loss_dict, criterion.weight_dict, shared=[non_finite])
        _check_predictions(bad, "in evaluation, stopping", amp)
        logger.update(**values)
        if "class_error_unscaled" in values:
            logger.update(class_error=values["class_error_unscaled"])
        orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_sizes)
        evaluator.update(dict(zip(image_ids, results)))

    logger.synchronize_between_processes(device)
    print_main("Averaged stats:", logger)
    evaluator.synchronize_between_processes()
    if not evaluator.detections:  # known alike on every process, once gathered
        folder = getattr(getattr(data_loader, "dataset", None), "img_folder", "the validation set")
        raise InputValueError(f"no image under {folder} could be read (all {len(evaluator.coco_gt.imgs)} were "
                              f"left out): nothing to evaluate")
    with _quiet_unless_main():
        evaluator.accumulate()
        evaluator.summarize()
    stats: dict[str, Any] = logger.global_averages()
    stats["coco_eval_bbox"] = evaluator.coco_eval["bbox"].stats.tolist()
    stats["skipped_images"] = len(evaluator.coco_gt.imgs) - len(evaluator.detections)
    if stats["skipped_images"]:
        print_main(f"{stats['skipped_images']} of {len(evaluator.coco_gt.imgs)} images left out of the evaluation "
                   f"(unreadable; their ground truth is not counted either)")
    return stats, evaluator
