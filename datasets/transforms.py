"""Joint image + detection-target transforms with the original Deformable DETR size arithmetic.

Every transform is a callable ``(image, target) -> (image, target)``. Until :class:`ToTensor` the
image is a ``PIL.Image``; the target is a dict whose ``"boxes"`` are ``(N, 4)`` float32 absolute
``(x0, y0, x1, y1)`` pixels of the current image, ``"area"`` ``(N,)`` float32 and ``"size"`` the
current ``(h, w)`` as int64. :class:`Normalize` turns the boxes into ``(cx, cy, w, h)`` divided by
the image width/height. Transforms never modify the target passed in; they return a new dict.

Random choices use Python's ``random`` (flip, select, sizes) and ``torch.randint`` (crop offsets,
through ``torchvision.transforms.RandomCrop.get_params``), the same generators as the original, so
seeding both reproduces its draws.
"""
import random
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torch import Tensor

from util.box_ops import box_xyxy_to_cxcywh

Target = dict[str, Tensor]
Transform = Callable[..., tuple]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Training short-side scales of the original: 480, 512, ..., 800.
DEFAULT_SCALES = tuple(range(480, 801, 32))


def crop(image: PIL.Image.Image, target: Target, region: tuple[int, int, int, int]
         ) -> tuple[PIL.Image.Image, Target]:
    """Crop ``region = (top, left, height, width)``.

    Boxes are shifted, clipped to the crop and their ``area`` becomes the clipped box area; boxes
    left with no width or no height are dropped together with their ``labels``, ``area`` and
    ``iscrowd``.
    """
    top, left, height, width = region
    cropped = F.crop(image, top, left, height, width)
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        corners = (target["boxes"] - torch.tensor([left, top, left, top])).reshape(-1, 2, 2)
        corners = torch.min(corners, torch.tensor([width, height], dtype=torch.float32)).clamp(min=0)
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
        keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
        for field in ("boxes", "labels", "area", "iscrowd"):
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


def hflip(image: PIL.Image.Image, target: Target) -> tuple[PIL.Image.Image, Target]:
    """Mirror left-right; a box ``(x0, y0, x1, y1)`` becomes ``(w - x1, y0, w - x0, y1)``."""
    flipped = F.hflip(image)
    target = dict(target)
    if "boxes" in target:
        width = image.width
        boxes = target["boxes"]
        target["boxes"] = torch.stack(
            [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return flipped, target


def get_size_with_aspect_ratio(image_size: tuple[int, int], size: int,
                               max_size: int | None = None) -> tuple[int, int]:
    """Output ``(h, w)`` when resizing ``image_size = (w, h)`` so its short side is ``size``.

    If the long side would then exceed ``max_size``, the short side target shrinks instead. The
    rounding reproduces datasets/transforms.py of the original exactly (it decides the tensor
    shapes, hence the numbers, of every evaluated image):

    * the clamped short side is ``int(round(max_size * short / long))`` (Python's round, i.e.
      half to even);
    * an image whose short side already equals ``size`` keeps its size;
    * the long side is ``int(size * long / short)``, truncated, not rounded.
    """
    w, h = image_size
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        # Same expression order as the original, so the float comparison agrees with it.
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image: PIL.Image.Image, target: Target | None, size: int,
           max_size: int | None = None) -> tuple[PIL.Image.Image, Target | None]:
    """Resize so the short side is ``size`` (see :func:`get_size_with_aspect_ratio`).

    PIL images are resampled bilinearly (torchvision's default, as in the original). Boxes and
    areas are scaled by the ratios of the actual output and input sizes.
    """
    out_h, out_w = get_size_with_aspect_ratio(image.size, size, max_size)
    resized = F.resize(image, [out_h, out_w])
    if target is None:
        return resized, None
    ratio_w = float(resized.width) / float(image.width)
    ratio_h = float(resized.height) / float(image.height)
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([out_h, out_w])
    return resized, target


class RandomHorizontalFlip:
    """Flip with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: PIL.Image.Image, target: Target) -> tuple[PIL.Image.Image, Target]:
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """Resize the short side to a size drawn uniformly from ``sizes``, long side at most ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if not isinstance(sizes, (list, tuple)) or len(sizes) == 0:
            raise ValueError(f"sizes must be a non-empty list or tuple of ints, got {sizes!r}")
        self.sizes = sizes
        self.max_size = max_size

    def __call__(self, image: PIL.Image.Image, target: Target | None = None
                 ) -> tuple[PIL.Image.Image, Target | None]:
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={list(self.sizes)}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose width and height are drawn from ``[min_size, min(side, max_size)]``.

    The image must be at least ``min_size`` on both sides.
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f"min_size {min_size} is larger than max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: PIL.Image.Image, target: Target) -> tuple[PIL.Image.Image, Target]:
        if min(image.width, image.height) < self.min_size:
            raise ValueError(f"image of size (w, h) = {image.size} is smaller than the crop "
                             f"minimum {self.min_size}")
        # Width first, then height, then the offsets: the original's order of random draws.
        w = random.randint(self.min_size, min(image.width, self.max_size))
        h = random.randint(self.min_size, min(image.height, self.max_size))
        region = T.RandomCrop.get_params(image, [h, w])
        return crop(image, target, region)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``transforms1`` with probability ``p``, otherwise ``transforms2``."""

    def __init__(self, transforms1: Transform, transforms2: Transform, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, image: PIL.Image.Image, target: Target) -> tuple[PIL.Image.Image, Target]:
        if random.random() < self.p:
            return self.transforms1(image, target)
        return self.transforms2(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms1!r}, {self.transforms2!r}, p={self.p})"


class ToTensor:
    """PIL image to a ``(3, H, W)`` float32 tensor in ``[0, 1]``; the target is unchanged."""

    def __call__(self, image: PIL.Image.Image, target: Target | None = None
                 ) -> tuple[Tensor, Target | None]:
        return F.to_tensor(image), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """Normalise a ``(3, H, W)`` tensor per channel and make boxes relative ``(cx, cy, w, h)``.

    Output boxes are ``(N, 4)`` float32 in ``[0, 1]``: centre and size divided by the image width
    and height.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Tensor, target: Target | None = None) -> tuple[Tensor, Target | None]:
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        body = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({body}\n)"


def make_coco_transforms(image_set: str, scales: Sequence[int] = DEFAULT_SCALES, max_size: int = 1333,
                         crop_resize_sizes: Sequence[int] = (400, 500, 600),
                         crop_size_range: tuple[int, int] = (384, 600), val_size: int = 800) -> Compose:
    """The original's COCO pipelines; the defaults reproduce it exactly.

    ``"train"``: horizontal flip (p=0.5), then with equal probability either a resize of the short
    side to one of ``scales`` (long side <= ``max_size``) or a resize to one of
    ``crop_resize_sizes``, a random crop with sides in ``crop_size_range`` and a resize to one of
    ``scales``; then :class:`ToTensor` and ImageNet :class:`Normalize`.

    ``"val"``: resize the short side to ``val_size`` (long side <= ``max_size``), ToTensor, Normalize.
    """
    normalize = Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    scales = list(scales)
    if image_set == "train":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose([
                    # No max_size here, as in the original.
                    RandomResize(list(crop_resize_sizes)),
                    RandomSizeCrop(*crop_size_range),
                    RandomResize(scales, max_size=max_size),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
