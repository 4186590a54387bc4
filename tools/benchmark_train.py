"""Time the training step: seconds per iteration, time waiting for data, and peak memory, for one
or several configurations side by side.

Takes main.py's flags (model, data, --batch_size, --num_workers, --device) plus --num_iters,
--warmup and --rounds, e.g.::

    python tools/benchmark_train.py --coco_path data/coco --batch_size 2 --num_iters 50
    python tools/benchmark_train.py --coco_path data/shapes --amp none bf16 --compare_backends
    python tools/benchmark_train.py --device cpu --image_size 608 800 --batch_size 1 --compare_backends

It builds the model, optimizer and training DataLoader as main.py does (one process) and times
:func:`engine.train_step`. With ``--image_size H W`` it needs no data: every step trains on one
fixed batch of random ImageNet-normalised images of that size, each with ``--num_boxes`` random
boxes of random classes (seeded), so that every configuration sees exactly the same work; the
data time is then zero. The backbone starts from random weights (``--backbone_weights none``) unless
given, since speed does not depend on them; the model loads no checkpoint (``--resume`` and
``--finetune`` are refused). ``--amp`` takes several modes and ``--compare_backends`` adds the
pure-PyTorch sampling core (``MSDA_BACKEND=pytorch``, the original's computation) beside the
compiled op: each configuration gets ``--warmup`` untimed steps, then ``--rounds`` rounds each time
``--num_iters`` steps of every configuration in turn, so that a change in the machine's load hits
all alike. It prints the median over the rounds of each configuration's seconds per iteration,
its data time, its peak memory (``torch.cuda.max_memory_allocated`` on CUDA, the peak resident set
size on the CPU, both reset before each configuration's steps) and its speed relative to the first
configuration and, where it was timed, to the float32 pure-PyTorch core. ``--profile`` then
profiles ``--num_iters`` more steps of each configuration (``torch.profiler``) and prints its five
most expensive operators by their own time.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms.functional import normalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset  # noqa: E402
from datasets.loaders import build_loaders  # noqa: E402
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from engine import AMP_DTYPES, to_device, train_step  # noqa: E402
from models import build_model  # noqa: E402
from ops import BACKEND_ENV, sampling_backend  # noqa: E402
from util.errors import InputError, InputValueError  # noqa: E402
from util.flags import check_model_flags, cli_parser, error_message  # noqa: E402
from util.logger import format_costs, peak_memory_mb, reset_peak_memory, top_costs  # noqa: E402
from util.misc import NestedTensor, nested_tensor_from_tensor_list, seed_everything  # noqa: E402
from util.optim import build_optimizer  # noqa: E402

Config = tuple[str, str]  # (amp, MSDA_BACKEND)


def synthetic_batch(batch_size: int, height: int, width: int, num_boxes: int, num_classes: int,
                    seed: int) -> tuple[NestedTensor, list[dict[str, Tensor]]]:
    """``batch_size`` random ImageNet-normalised ``(3, height, width)`` images, each with
    ``num_boxes`` random boxes ``(cx, cy, w, h)`` (normalised, inside the image) of random labels in
    ``[1, num_classes)``, as the training loader would give them."""
    generator = torch.Generator().manual_seed(seed)
    images = [normalize(torch.rand(3, height, width, generator=generator), IMAGENET_MEAN, IMAGENET_STD)
              for _ in range(batch_size)]
    targets = []
    for i in range(batch_size):
        size = torch.rand(num_boxes, 2, generator=generator) * 0.4 + 0.05
        centre = size / 2 + torch.rand(num_boxes, 2, generator=generator) * (1 - size)
        targets.append({"boxes": torch.cat([centre, size], 1),
                        "labels": torch.randint(1, num_classes, (num_boxes,), generator=generator),
                        "image_id": torch.tensor(i), "orig_size": torch.tensor([height, width]),
                        "size": torch.tensor([height, width])})
    return nested_tensor_from_tensor_list(images), targets


def benchmark(args: argparse.Namespace) -> tuple[dict[Config, dict[str, float]], dict[Config, str]]:
    """Per configuration: medians over the rounds of ``sec_per_iter`` and ``data_sec_per_iter``,
    ``images_per_sec`` and the largest ``peak_mem_mb``; and with ``--profile`` its top five
    operators (see the module docstring)."""
    check_model_flags(args)
    if args.num_iters < 1 or args.warmup < 0 or args.rounds < 1:
        raise InputValueError(f"need --num_iters >= 1, --warmup >= 0 and --rounds >= 1, got {args.num_iters}, "
                              f"{args.warmup} and {args.rounds}")
    if args.image_size and (min(args.image_size) < 1 or args.num_boxes < 0):
        raise InputValueError(f"need a positive --image_size and --num_boxes >= 0, got {args.image_size} and "
                              f"{args.num_boxes}")
    for flag in ("resume", "finetune"):
        if getattr(args, flag):
            raise InputValueError(f"--{flag} {getattr(args, flag)}: the benchmark times training steps of a freshly "
                                  f"built model and loads no checkpoint, since speed does not depend on the weights")
    device = torch.device(args.device)
    seed_everything(args.seed)
    model, criterion, _ = build_model(args)
    model.to(device).train()
    criterion.to(device).train()
    optimizer, _ = build_optimizer(args, model)
    if args.image_size:
        loader = [synthetic_batch(args.batch_size, *args.image_size, args.num_boxes, args.num_classes, args.seed)]
    else:
        dataset_train = build_dataset("train", args)
        loader = build_loaders(dataset_train, dataset_train, args.batch_size, args.num_workers,
                               pin_memory=device.type == "cuda").train
    backends = ["compiled", "pytorch"] if args.compare_backends else [os.environ.get(BACKEND_ENV, "auto")]
    configs = [(amp, backend) for amp in args.amp for backend in backends]
    scalers = {amp: torch.amp.GradScaler(device.type) if amp == "fp16" else None for amp in args.amp}

    def batches():
        while True:
            yield from loader

    stream = batches()

    def run(config: Config, steps: int) -> tuple[float, float]:
        amp, backend = config
        data_time = step_time = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            samples, targets = next(stream)
            fetched = time.perf_counter()
            samples, targets = to_device(samples, targets, device)
            with sampling_backend(backend):
                train_step(model, criterion, samples, targets, optimizer, args.clip_max_norm, AMP_DTYPES[amp],
                           scalers[amp])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            data_time += fetched - start
            step_time += time.perf_counter() - start
        return step_time / max(steps, 1), data_time / max(steps, 1)

    for config in configs:
        run(config, args.warmup)
    times: dict[Config, list[tuple[float, float]]] = {c: [] for c in configs}
    peaks = dict.fromkeys(configs, 0.0)
    for _ in range(args.rounds):
        for config in configs:
            reset_peak_memory(device)
            times[config].append(run(config, args.num_iters))
            peaks[config] = max(peaks[config], peak_memory_mb(device))
    results = {}
    for config in configs:
        sec = statistics.median(t for t, _ in times[config])
        results[config] = {"sec_per_iter": sec, "data_sec_per_iter": statistics.median(d for _, d in times[config]),
                           "images_per_sec": args.batch_size / sec, "peak_mem_mb": peaks[config]}
    costs = {c: format_costs(top_costs(lambda c=c: run(c, args.num_iters), device)) for c in configs if args.profile}
    return results, costs


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("Deformable DETR training-step benchmark", redefines=True)
    parser.add_argument("--num_iters", default=20, type=int, help="timed iterations per configuration and round")
    parser.add_argument("--warmup", default=3, type=int, help="untimed iterations of each configuration first")
    parser.add_argument("--rounds", default=1, type=int, help="rounds of timed iterations over all configurations")
    parser.add_argument("--image_size", default=None, type=int, nargs=2, metavar=("H", "W"),
                        help="train on one fixed batch of random images of this size instead of --coco_path")
    parser.add_argument("--num_boxes", default=8, type=int, help="boxes per random image (with --image_size)")
    parser.add_argument("--compare_backends", action="store_true",
                        help="also time the pure-PyTorch sampling core (MSDA_BACKEND=pytorch) beside the compiled op")
    parser.add_argument("--profile", action="store_true",
                        help="then profile each configuration and print its five most expensive operators")
    # Several modes here, side by side, where main.py takes one.
    parser.add_argument("--amp", default=["none"], nargs="+", choices=tuple(AMP_DTYPES), help="mixed-precision modes")
    # speed does not depend on the weights: a random backbone unless --backbone_weights names some
    parser.set_defaults(backbone_weights="none")
    args = parser.parse_args(argv)
    try:
        results, costs = benchmark(args)
    except InputError as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    data = (f"one fixed batch of random {args.image_size[0]}x{args.image_size[1]} images" if args.image_size
            else f"{args.num_workers} data workers")
    print(f"device {args.device}, {torch.get_num_threads()} threads, batch size {args.batch_size}, "
          f"{data}, {args.rounds} rounds of {args.num_iters} timed iterations after "
          f"{args.warmup} warm-up; medians over the rounds")
    # the original's computation, where timed: the float32 pure-PyTorch core
    original = results.get(("none", "pytorch"), {}).get("sec_per_iter")
    print(f"{'amp':5s} {'sampling':9s} {'s/iter':>8s} {'images/s':>9s} {'data s/iter':>12s} "
          f"{'peak MB':>8s} ({memory})  " + ("vs float32 pytorch  " if original else "") + "speed vs first")
    first = next(iter(results.values()))["sec_per_iter"]
    for (amp, backend), r in results.items():
        versus = f"{original / r['sec_per_iter']:.2f}x  " if original else ""
        print(f"{amp:5s} {backend:9s} {r['sec_per_iter']:8.4f} {r['images_per_sec']:9.2f} "
              f"{r['data_sec_per_iter']:12.4f} {r['peak_mem_mb']:8.0f}  {versus}{first / r['sec_per_iter']:.2f}x")
    for (amp, backend), line in costs.items():
        print(f"top operators, amp {amp}, sampling {backend}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
