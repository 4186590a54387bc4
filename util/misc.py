"""Batching of images with padding masks, seeding, and small tensor helpers shared by model and engine."""
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class NestedTensor:
    """A padded image batch and its padding mask.

    Attributes:
        tensors: ``(B, C, H, W)`` images, zero-padded at the bottom and right.
        mask: ``(B, H, W)`` bool, ``True`` on padded pixels.
    """

    def __init__(self, tensors: Tensor, mask: Tensor):
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device, non_blocking: bool = False) -> "NestedTensor":
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: Sequence[Tensor]) -> NestedTensor:
    """Pad ``C x H_i x W_i`` images to the largest height and width in the list.

    Returns a :class:`NestedTensor` of ``(B, C, H_max, W_max)`` with mask ``(B, H_max, W_max)``.
    """
    if len(tensor_list) == 0:
        raise ValueError("cannot batch an empty list of images")
    for i, img in enumerate(tensor_list):
        if img.dim() != 3:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected (C, H, W)")
    channels = {img.shape[0] for img in tensor_list}
    if len(channels) != 1:
        raise ValueError(f"images have different channel counts {sorted(channels)}")
    max_h = max(img.shape[1] for img in tensor_list)
    max_w = max(img.shape[2] for img in tensor_list)
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), first.shape[0], max_h, max_w))
    mask = torch.ones((len(tensor_list), max_h, max_w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensors, mask):
        pad_img[:, :img.shape[1], :img.shape[2]].copy_(img)
        m[:img.shape[1], :img.shape[2]] = False
    return NestedTensor(tensors, mask)


def collate_fn(batch: list[tuple | None]) -> tuple:
    """DataLoader collate: ``[(image, target), ...]`` -> ``(NestedTensor, (target, ...))``.

    ``None`` items (images a dataset leaves out, see :class:`~datasets.coco.CocoDetection`) are
    dropped; a batch of nothing else is ``(None, ())``.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None, ()
    images, *rest = list(zip(*kept))
    return (nested_tensor_from_tensor_list(images), *rest)


def full_precision(x: Tensor) -> Tensor:
    """``x`` in float32 if it is float16 or bfloat16 (as under autocast), else unchanged.

    For what mixed precision must not round: sampling locations, reference points, softmax
    logits. Without autocast it returns ``x`` itself, so float32 and float64 runs are untouched.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[0, 1]`` and both terms to at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


@torch.no_grad()
def accuracy(output: Tensor, target: Tensor, topk: Sequence[int] = (1,)) -> list[Tensor]:
    """Top-k accuracy in percent of ``output (N, classes)`` against ``target (N,)``.

    An empty ``target`` gives 0 (the original's convention, so ``class_error`` reads 100).
    """
    if target.numel() == 0:
        return [torch.zeros([], device=output.device)]
    maxk = max(topk)
    pred = output.topk(maxk, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0) * (100.0 / target.shape[0]) for k in topk]


def interpolate_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a ``(B, H, W)`` bool padding mask to ``size`` with nearest-neighbour sampling."""
    return torch.nn.functional.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's random generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, world_size: int, epoch: int) -> int:
    """Distinct per (process, epoch), so that what an epoch draws depends on nothing before it and a
    resumed run draws what an uninterrupted one would."""
    return seed + rank + epoch * world_size
