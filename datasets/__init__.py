"""Datasets, transforms, samplers and COCO evaluation."""
from argparse import Namespace

import torch.utils.data
from pycocotools.coco import COCO

from .coco import CocoDetection
from .coco import build as build_coco

__all__ = ["build_dataset", "get_coco_api_from_dataset"]


def build_dataset(image_set: str, args: Namespace) -> CocoDetection:
    """The ``"train"`` or ``"val"`` split under ``args.coco_path``, resized to ``args.train_scales``
    (training; or resized to ``args.crop_resize_scales``, cropped to ``args.crop_size`` and then
    resized) or ``args.val_scale`` (evaluation), with the long side at most ``args.max_size``.

    With ``args.cache_mode`` the encoded images are kept in memory, and with
    ``args.skip_bad_images`` unreadable images are skipped (see :class:`CocoDetection`).
    """
    return build_coco(image_set, args.coco_path, cache_mode=args.cache_mode, scales=args.train_scales,
                      val_size=args.val_scale, max_size=args.max_size, crop_resize_sizes=args.crop_resize_scales,
                      crop_size_range=tuple(args.crop_size), skip_bad_images=args.skip_bad_images)


def get_coco_api_from_dataset(dataset: torch.utils.data.Dataset) -> COCO:
    """The pycocotools ``COCO`` ground truth of a :class:`CocoDetection`, also inside (nested) ``Subset``s."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, CocoDetection):
        raise TypeError(f"expected a CocoDetection or a Subset of one, got {type(dataset).__name__}")
    return dataset.coco
