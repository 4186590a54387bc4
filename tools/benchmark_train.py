"""Time the training step: seconds per iteration, time waiting for data, and peak memory.

Takes main.py's flags (model, data, --batch_size, --num_workers, --device) plus --num_iters and
--warmup, e.g.::

    python tools/benchmark_train.py --coco_path data/coco --batch_size 2 --num_iters 50

It builds the model, optimizer and training DataLoader as main.py does (one process), runs
``--warmup`` untimed steps and then ``--num_iters`` timed ones with :func:`engine.train_step`,
and prints the means. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset after the
warm-up) and the process's peak resident set size on CPU (whole run, data included).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset  # noqa: E402
from datasets.loaders import build_loaders  # noqa: E402
from engine import to_device, train_step  # noqa: E402
from models import build_model  # noqa: E402
from util.flags import cli_parser  # noqa: E402
from util.logger import peak_memory_mb  # noqa: E402
from util.misc import seed_everything  # noqa: E402
from util.optim import build_optimizer  # noqa: E402


def benchmark(args: argparse.Namespace) -> dict[str, float]:
    """Mean ``sec_per_iter`` and ``data_sec_per_iter`` over the timed steps, ``data_share`` (their
    ratio), ``images_per_sec`` and ``peak_mem_mb`` (see the module docstring)."""
    if args.num_iters < 1 or args.warmup < 0:
        raise ValueError(f"need --num_iters >= 1 and --warmup >= 0, got {args.num_iters} and {args.warmup}")
    device = torch.device(args.device)
    seed_everything(args.seed)
    model, criterion, _ = build_model(args)
    model.to(device)
    criterion.to(device)
    model.train()
    criterion.train()
    optimizer, _ = build_optimizer(args, model)
    dataset_train = build_dataset("train", args)
    loader = build_loaders(dataset_train, dataset_train, args.batch_size, args.num_workers,
                           pin_memory=device.type == "cuda").train

    def batches():
        while True:
            yield from loader

    stream = batches()
    data_time = step_time = 0.0
    for i in range(args.warmup + args.num_iters):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            data_time = step_time = 0.0
        start = time.perf_counter()
        samples, targets = next(stream)
        fetched = time.perf_counter()
        samples, targets = to_device(samples, targets, device)
        train_step(model, criterion, samples, targets, optimizer, args.clip_max_norm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        data_time += fetched - start
        step_time += end - start
    n = args.num_iters
    return {"sec_per_iter": step_time / n, "data_sec_per_iter": data_time / n,
            "data_share": data_time / step_time, "images_per_sec": n * args.batch_size / step_time,
            "peak_mem_mb": peak_memory_mb(device)}


def main() -> None:
    parser = cli_parser("Deformable DETR training-step benchmark")
    parser.add_argument("--num_iters", default=20, type=int, help="timed iterations")
    parser.add_argument("--warmup", default=3, type=int, help="untimed iterations first")
    args = parser.parse_args()
    result = benchmark(args)
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"device {args.device}, batch size {args.batch_size}, {args.num_workers} data workers, "
          f"{args.num_iters} timed iterations after {args.warmup} warm-up")
    print(f"time/iter   {result['sec_per_iter']:.4f} s  ({result['images_per_sec']:.2f} images/s)")
    print(f"data/iter   {result['data_sec_per_iter']:.4f} s  ({100 * result['data_share']:.1f}% of the step)")
    print(f"peak memory {result['peak_mem_mb']:.0f} MB ({memory})")


if __name__ == "__main__":
    main()
