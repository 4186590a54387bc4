"""Time a checkpoint save: seconds per write of ``checkpoint.pth`` and its size, for the R50
variants' models with their AdamW state, as ``main.py`` writes it (crash-safe: a temporary file,
flushed, fsynced and renamed).

    python tools/benchmark_checkpoint.py [--variants r50_deformable_detr ...] [--rounds 5] [--dir /tmp]

Each variant's model is built with random weights (the size and the time do not depend on them),
its optimizer takes one step so that AdamW holds its two moment tensors per parameter, and the
checkpoint dict is written ``--rounds`` times into ``--dir`` (a folder on the disk the runs write
to: the time is mostly that disk's); the median is printed.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from util.checkpoint import save_on_main  # noqa: E402
from util.flags import VARIANTS, config_flags, get_args_parser  # noqa: E402
from util.optim import build_optimizer  # noqa: E402


def training_checkpoint(variant: str) -> dict:
    """The dict main.py saves after an epoch of ``variant``, with random weights."""
    args = get_args_parser().parse_args([*config_flags(variant), "--backbone_weights", "none", "--device", "cpu"])
    model, _, _ = build_model(args)
    optimizer, lr_scheduler = build_optimizer(args, model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "epoch": 0, "args": args}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                        help="configs/ scripts whose models to save (default: the five)")
    parser.add_argument("--rounds", type=int, default=5, help="writes per variant; the median is printed")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "checkpoint.pth"
        print(f"{'variant':<75} {'size (MB)':>10} {'s per save':>11}")
        for variant in args.variants:
            checkpoint = training_checkpoint(variant)
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                save_on_main(checkpoint, path)
                times.append(time.perf_counter() - start)
            print(f"{variant:<75} {path.stat().st_size / 2 ** 20:>10.1f} {statistics.median(times):>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
