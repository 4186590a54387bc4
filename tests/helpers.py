"""Constants and helpers shared by the tests: a tiny model configuration, main.py's parser, the
variants' flags (read from configs/), main.py run in this process, and a clean environment for
child processes."""
import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from util.flags import VARIANTS, config_flags, get_args_parser

REPO = Path(__file__).resolve().parents[1]

# The tiny COCO's category ids go up to 7, so 8 classifier outputs.
NUM_CLASSES = 8

# A ResNet-18 Deformable DETR small enough for a CPU step in a fraction of a second, on images
# resized to 64 px. The input projections' GroupNorm has 32 groups, so hidden_dim 64 keeps two
# values per group even on a 1x1 feature map with batch 1.
SMALL_MODEL = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
               "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
               "--num_queries", "10", "--enc_n_points", "2", "--dec_n_points", "2",
               "--num_classes", str(NUM_CLASSES), "--device", "cpu", "--train_scales", "64",
               "--val_scale", "64", "--max_size", "96", "--num_workers", "0"]

# Each variant's main.py flags, as its configs/ script passes them.
VARIANT_FLAGS = {name: config_flags(name) for name in VARIANTS}
MULTI_SCALE, BOX_REFINE, TWO_STAGE = ("r50_deformable_detr", "r50_deformable_detr_plus_iterative_bbox_refinement",
                                      "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage")


def parse(argv: list[str]) -> argparse.Namespace:
    """main.py's flags parsed from ``argv``."""
    return get_args_parser().parse_args(list(argv))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment without any launcher variables, so a child runs as one process,
    and with the repository on ``PYTHONPATH``, so a child script finds its modules."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def run_main(argv: Sequence[str], in_process: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python main.py ARGV`` as a finished process: exit status, stdout and stderr.

    By default ``main.main(argv)`` runs in this process, with both streams captured and the
    environment a child would get (:func:`subprocess_env`, restored afterwards), which spares the
    seconds a new interpreter spends importing torch and torchvision; an exception main.py would
    not catch propagates into the test. ``in_process=False`` starts a real ``main.py``.
    """
    if not in_process:
        return subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=timeout)
    import main

    out, err = io.StringIO(), io.StringIO()
    with (mock.patch.dict(os.environ, subprocess_env(), clear=True), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err)):
        status = main.main(list(argv))
    return subprocess.CompletedProcess(["main.py", *argv], status, out.getvalue(), err.getvalue())
