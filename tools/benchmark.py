"""Measure inference speed (images per second) of a Deformable DETR configuration.

Takes main.py's model flags (variant, backbone, sizes, ``--device``, ``--resume`` for weights)
plus ``--batch_sizes``, ``--num_iters``, ``--warmup`` and ``--image_size H W``, e.g.::

    python tools/benchmark.py --with_box_refine --two_stage --device cuda
    python tools/benchmark.py --backbone resnet18 --device cpu --num_iters 10

As the original's ``benchmark.py`` does, it times forward passes under ``torch.no_grad`` over one
fixed batch (here random images of ``--image_size``, ImageNet-normalised), discards the
``--warmup`` first passes and synchronises CUDA around each timed one. The backbone starts from
random weights (``--backbone_weights none``) unless given, since speed does not depend on them.
``--image_size`` defaults to 800x1333 (COCO evaluation size) on CUDA and to 320x480 on CPU.
``--device`` defaults to cuda where one is visible, else cpu.
"""
import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402
from util.flags import cli_parser  # noqa: E402
from util.misc import NestedTensor, nested_tensor_from_tensor_list  # noqa: E402

GPU_IMAGE_SIZE = (800, 1333)
CPU_IMAGE_SIZE = (320, 480)


@torch.no_grad()
def seconds_per_batch(model: nn.Module, inputs: NestedTensor, num_iters: int, warmup: int,
                      device: torch.device) -> float:
    """Mean wall time of ``model(inputs)`` over ``num_iters`` passes after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(inputs)
    total = 0.0
    for _ in range(num_iters):
        sync()
        start = time.perf_counter()
        model(inputs)
        sync()
        total += time.perf_counter() - start
    return total / num_iters


def benchmark(args: argparse.Namespace) -> dict[int, float]:
    """Images per second for each of ``args.batch_sizes``."""
    if args.num_iters < 1 or args.warmup < 0:
        raise ValueError(f"need --num_iters >= 1 and --warmup >= 0, got {args.num_iters} and {args.warmup}")
    if any(b < 1 for b in args.batch_sizes):
        raise ValueError(f"--batch_sizes must be positive, got {args.batch_sizes}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} but no CUDA device is visible; pass --device cpu")
    height, width = args.image_size or (GPU_IMAGE_SIZE if device.type == "cuda" else CPU_IMAGE_SIZE)

    torch.manual_seed(args.seed)
    model, _, _ = build_model(args)
    if args.resume:
        model.load_state_dict(load_checkpoint(args.resume)["model"])
    model.to(device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    image = ((torch.rand(3, height, width) - mean) / std).to(device)
    return {batch: batch / seconds_per_batch(model, nested_tensor_from_tensor_list([image] * batch),
                                             args.num_iters, args.warmup, device)
            for batch in args.batch_sizes}


def get_parser() -> argparse.ArgumentParser:
    """main.py's flags plus the benchmark's own."""
    parser = cli_parser("Deformable DETR inference benchmark")
    parser.add_argument("--batch_sizes", default=[1, 4], type=int, nargs="+")
    parser.add_argument("--num_iters", default=20, type=int, help="timed forward passes per batch size")
    parser.add_argument("--warmup", default=3, type=int, help="untimed forward passes first")
    parser.add_argument("--image_size", default=None, type=int, nargs=2, metavar=("H", "W"),
                        help=f"input size (default {GPU_IMAGE_SIZE[0]} {GPU_IMAGE_SIZE[1]} on CUDA, "
                             f"{CPU_IMAGE_SIZE[0]} {CPU_IMAGE_SIZE[1]} on CPU)")
    parser.set_defaults(backbone_weights="none", device="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    results = benchmark(args)
    variant = "two-stage" if args.two_stage else "box refinement" if args.with_box_refine else "plain"
    print(f"Deformable DETR ({variant}, {args.backbone}, {args.num_feature_levels} levels), device {args.device}, "
          f"{args.num_iters} timed passes after {args.warmup} warm-up")
    for batch, fps in results.items():
        print(f"batch {batch}: {fps:.2f} images/s ({1000 * batch / fps:.1f} ms per batch)")


if __name__ == "__main__":
    main()
