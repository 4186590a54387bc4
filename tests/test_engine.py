"""engine.py and util/logger.py: loss weighting and logging, clipping, the non-finite-loss stop,
host synchronisations of the training step, and COCO evaluation against pycocotools itself."""
import copy
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.overrides import TorchFunctionMode

from datasets import build_dataset
from datasets.loaders import build_loaders
from engine import NonFiniteLossError, evaluate, to_device, train_one_epoch, train_step
from models import build_model
from util.logger import MetricLogger, SmoothedValue
from util.misc import nested_tensor_from_tensor_list

from helpers import SMALL_MODEL, needs_cuda, parse

# --------------------------------------------------------------------------------------------
# Fakes: a linear "detector" and a criterion with two weighted losses and an unweighted one.

class LinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
            self.proj.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, samples):
        return {"out": self.proj(samples.tensors.mean(dim=(2, 3)))}


class TwoLossCriterion(nn.Module):
    weight_dict = {"loss_a": 2.0, "loss_b": 3.0}

    def __init__(self, poison_b: float = 1.0):
        super().__init__()
        self.poison_b = poison_b

    def forward(self, outputs, targets):
        out = outputs["out"]
        return {"loss_a": (out[:, 0] ** 2).mean(), "loss_b": (out[:, 1] - 1).abs().mean() * self.poison_b,
                "class_error": torch.tensor(25.0)}


def _batch(seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 4, 5, generator=g) for _ in range(batch)]
    targets = [{"labels": torch.tensor([1]), "image_id": torch.tensor(i)} for i in range(batch)]
    return nested_tensor_from_tensor_list(images), targets


# --------------------------------------------------------------------------------------------
# Logger

def test_smoothed_value_window_and_global_average():
    meter = SmoothedValue(window_size=3)
    for v in [1.0, 2.0, 3.0, 4.0, 10.0]:
        meter.update(v)
    assert meter.median == 4.0
    assert meter.avg == pytest.approx(17 / 3)
    assert meter.global_avg == pytest.approx(4.0)
    assert meter.max == 10.0 and meter.value == 10.0
    assert str(meter) == "4.0000 (4.0000)"


def test_log_every_prints_every_10_iterations_and_the_last(capsys):
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    for _ in logger.log_every(list(range(23)), 10, "Epoch: [3]", torch.device("cpu")):
        logger.update(lr=2e-4, loss=7.5)
    lines = capsys.readouterr().out.strip().splitlines()
    pattern = (r"Epoch: \[3\]  \[(..)/23\]  eta: \d+:\d\d:\d\d  lr: 0\.000200  loss: 7\.5000 \(7\.5000\)  "
               r"time: \d+\.\d{4}  data: \d+\.\d{4}  max mem: \d+")
    progress = [re.fullmatch(pattern, line) for line in lines[:-1]]
    assert all(progress), lines
    assert [m.group(1) for m in progress] == [" 0", "10", "20", "22"]
    assert re.fullmatch(r"Epoch: \[3\] Total time: 0:00:\d\d \(\d+\.\d{4} s / it\)", lines[-1])


def test_logger_rejects_tensors():
    with pytest.raises(TypeError, match="loss"):
        MetricLogger().update(loss=torch.tensor(1.0))


# --------------------------------------------------------------------------------------------
# Training step

def test_train_step_weights_losses_clips_and_logs_the_unclipped_norm():
    model, criterion = LinearModel(), TwoLossCriterion()
    reference = copy.deepcopy(model)
    samples, targets = _batch(0)
    lr, max_norm = 0.5, 0.05
    values = train_step(model, criterion, samples, targets, torch.optim.SGD(model.parameters(), lr=lr), max_norm)

    # By hand: weighted loss, gradient, its norm, the clipped SGD update.
    out = reference(samples)["out"]
    loss_a, loss_b = (out[:, 0] ** 2).mean(), (out[:, 1] - 1).abs().mean()
    (2.0 * loss_a + 3.0 * loss_b).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    assert norm > max_norm  # so that clipping acts
    scale = max_norm / (norm + 1e-6)
    for p, p_ref, g in zip(model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p.detach(), p_ref.detach() - lr * scale * g, rtol=1e-6, atol=1e-7)

    assert values["loss"] == pytest.approx(2 * loss_a.item() + 3 * loss_b.item(), rel=1e-6)
    assert values["loss_a"] == pytest.approx(2 * loss_a.item(), rel=1e-6)
    assert values["loss_b"] == pytest.approx(3 * loss_b.item(), rel=1e-6)
    assert values["loss_a_unscaled"] == pytest.approx(loss_a.item(), rel=1e-6)
    assert values["loss_b_unscaled"] == pytest.approx(loss_b.item(), rel=1e-6)
    assert values["class_error_unscaled"] == 25.0
    assert values["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert set(values) == {"loss", "loss_a", "loss_b", "loss_a_unscaled", "loss_b_unscaled",
                           "class_error_unscaled", "grad_norm"}


def test_non_finite_loss_stops_before_the_optimizer_changes_anything():
    model = LinearModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    samples, targets = _batch(1)
    train_step(model, TwoLossCriterion(), samples, targets, optimizer, 0.1)
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(NonFiniteLossError, match=r"loss is nan.*'loss_b_unscaled': nan"):
        train_step(model, TwoLossCriterion(poison_b=float("nan")), samples, targets, optimizer, 0.1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    after = optimizer.state_dict()
    for param_id, param_state in state["state"].items():
        for k, v in param_state.items():
            assert torch.equal(after["state"][param_id][k], v), (param_id, k)


def test_train_one_epoch_averages_over_the_epoch(capsys):
    model, criterion = LinearModel(), TwoLossCriterion()
    batches = [_batch(seed) for seed in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    reference = copy.deepcopy(model)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=1e-3)
    expected: list[dict[str, float]] = [train_step(reference, criterion, s, t, ref_optimizer, 0.1)
                                        for s, t in batches]

    stats = train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), epoch=0, max_norm=0.1)
    for key in ("loss", "loss_a", "loss_b_unscaled", "grad_norm"):
        assert stats[key] == pytest.approx(np.mean([e[key] for e in expected]), rel=1e-6), key
    assert stats["lr"] == 1e-3 and stats["class_error"] == 25.0
    assert "Averaged stats: lr: 0.001000  class_error: 25.00  grad_norm: " in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Host synchronisations

_HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class HostReadCounter(TorchFunctionMode):
    """Counts Python-level reads of tensor values by the host (``.item()``, ``.cpu()``, ``bool(t)``,
    ...); ``.tolist()``/``.numpy()`` of a tensor that ``.cpu()`` just returned is not counted again.
    On CUDA each of these is a device synchronisation."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._fetched: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and not any(args[0] is t for t in self._fetched):
            self.count += 1
        if name == "cpu":
            self._fetched.append(result)
        return result


@pytest.fixture(scope="module")
def tiny_detector(tiny_coco_root):
    args = parse(SMALL_MODEL + ["--coco_path", str(tiny_coco_root), "--batch_size", "2"])
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    return args, model, criterion, postprocessors


def train_loader(args):
    dataset = build_dataset("train", args)
    return build_loaders(dataset, dataset, args.batch_size, args.num_workers).train


def test_training_step_adds_one_host_read_to_those_of_model_criterion_and_optimizer(tiny_detector):
    args, model, criterion, _ = tiny_detector
    samples, targets = to_device(*next(iter(train_loader(args))), torch.device("cpu"))
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with HostReadCounter() as in_forward:
        outputs = model(samples)
    with HostReadCounter() as in_criterion:
        losses = criterion(outputs, targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    # On the CPU, AdamW reads its step counters (host tensors, so no synchronisation on CUDA).
    with HostReadCounter() as in_optimizer:
        optimizer.step()
    with HostReadCounter() as in_step:
        train_step(model, criterion, samples, targets, optimizer, args.clip_max_norm)
    assert in_criterion.count >= 1  # the counter sees the criterion's reads
    assert in_step.count - in_forward.count - in_criterion.count - in_optimizer.count == 1


@pytest.mark.cuda
@needs_cuda
def test_training_step_synchronisations_on_cuda(tiny_detector):
    args, model, criterion, _ = tiny_detector
    loader = train_loader(args)
    device = torch.device("cuda")
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = next(iter(loader))

    def syncs(fn) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    samples, targets = to_device(*batch, device)
    train_step(model, criterion, samples, targets, optimizer, args.clip_max_norm)  # warm-up
    held = {}
    forward = syncs(lambda: held.update(outputs=model(samples)))
    in_criterion = syncs(lambda: held.update(losses=criterion(held["outputs"], targets)))
    loss = sum(held["losses"][k] * w for k, w in criterion.weight_dict.items() if k in held["losses"])
    backward = syncs(loss.backward)
    in_optimizer = syncs(optimizer.step)
    step = syncs(lambda: train_step(model, criterion, samples, targets, optimizer, args.clip_max_norm))
    print(f"CUDA synchronisations: forward {forward}, criterion {in_criterion}, backward {backward}, "
          f"optimizer {in_optimizer}, whole step {step}")
    assert step - forward - in_criterion - backward - in_optimizer == 1


# --------------------------------------------------------------------------------------------
# Evaluation

class ReplayModel(nn.Module):
    """Returns prepared outputs, one batch per call, in order."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, samples):
        return self.outputs.pop(0)


class RecordingPostProcess(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.results: list[dict[str, torch.Tensor]] = []

    def forward(self, outputs, target_sizes):
        results = self.inner(outputs, target_sizes)
        self.results.extend(results)
        return results


def _near_ground_truth_outputs(targets, num_queries: int, num_classes: int, g: torch.Generator):
    """Per image: each object's box jittered with a confident logit for its label, the other
    queries random boxes with low random logits."""
    logits = torch.rand(len(targets), num_queries, num_classes, generator=g) * -6
    boxes = torch.rand(len(targets), num_queries, 4, generator=g) * 0.4 + 0.2
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = (t["boxes"] * (1 + 0.06 * (torch.rand(n, 4, generator=g) - 0.5))).clamp(0, 1)
        logits[i, torch.arange(n), t["labels"]] = 2 + 3 * torch.rand(n, generator=g)
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_evaluate_matches_pycocotools_on_the_same_detections(tiny_detector, capsys):
    args, _, criterion, postprocessors = tiny_detector
    dataset_val = build_dataset("val", args)
    loader_val = build_loaders(dataset_val, dataset_val, args.batch_size, args.num_workers).val
    g = torch.Generator().manual_seed(0)
    batches = list(loader_val)
    image_ids = [int(t["image_id"]) for _, targets in batches for t in targets]
    outputs = [_near_ground_truth_outputs(targets, args.num_queries, args.num_classes, g)
               for _, targets in batches]
    # the logged losses by hand: the criterion on each batch, weighted, averaged over the batches
    per_batch = []
    for output, (_, targets) in zip(outputs, batches):
        losses = {k: float(v) for k, v in criterion(output, targets).items()}
        weighted = {k: v * criterion.weight_dict[k] for k, v in losses.items() if k in criterion.weight_dict}
        per_batch.append({"loss": sum(weighted.values()), **weighted, "class_error": losses["class_error"],
                          **{f"{k}_unscaled": v for k, v in losses.items()}})
    expected = {k: float(np.mean([b[k] for b in per_batch])) for k in per_batch[0]}
    recorder = RecordingPostProcess(postprocessors["bbox"])
    stats, _ = evaluate(ReplayModel(outputs), criterion, {"bbox": recorder}, batches,
                        dataset_val.coco, torch.device("cpu"))
    assert "IoU metric: bbox" in capsys.readouterr().out

    detections = []
    for image_id, result in zip(image_ids, recorder.results):
        for score, label, (x0, y0, x1, y1) in zip(result["scores"].tolist(), result["labels"].tolist(),
                                                  result["boxes"].tolist()):
            detections.append({"image_id": image_id, "category_id": label, "score": score,
                               "bbox": [x0, y0, x1 - x0, y1 - y0]})
    coco_gt = COCO(str(Path(args.coco_path) / "annotations" / "instances_val2017.json"))
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()

    assert len(stats["coco_eval_bbox"]) == 12
    np.testing.assert_allclose(stats["coco_eval_bbox"], coco_eval.stats, rtol=0, atol=1e-12)
    assert coco_eval.stats[0] > 0.3  # the detections are good, so the comparison is not of zeros
    assert len(batches) > 1 and len({b["loss"] for b in per_batch}) > 1  # an average of differing batches
    assert set(expected) <= set(stats)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
