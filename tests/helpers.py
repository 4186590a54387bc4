"""Constants and helpers shared by the tests: a tiny model configuration, main.py's parser, the
variants' flags (read from configs/), main.py run in this process, a clean environment for child
processes, and the skip conditions (the only reasons a CI run may skip a test, see conftest.py)."""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import torch

from ops import _extension
from util.flags import VARIANTS, config_flags, get_args_parser

REPO = Path(__file__).resolve().parents[1]

# The skip reasons of missing hardware: conftest.py lets a CI run skip for these alone, and only
# where they hold.
NO_GPU = "no CUDA GPU is visible"
FEWER_THAN_TWO_GPUS = "fewer than two CUDA GPUs are visible"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason=FEWER_THAN_TWO_GPUS)
# Skipped outside CI where ops._C does not import (not built, or a stale build); under CI=true
# such a skip fails the run.
needs_extension = pytest.mark.skipif(_extension.unavailable_reason("cpu") is not None,
                                     reason=str(_extension.unavailable_reason("cpu")))


@functools.cache
def ops_setup() -> ModuleType:
    """ops/setup.py as a module (its build runs only as a script)."""
    spec = importlib.util.spec_from_file_location("ops_setup", REPO / "ops" / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_cuda_build_reason() -> str | None:
    """Why setup.py builds no CUDA kernel on this machine (no nvcc, a PyTorch without CUDA, or
    MSDA_WITH_CUDA=0), as a skip reason; ``None`` where it builds one."""
    reason = ops_setup().cuda_unavailable_reason()
    return None if reason is None else f"setup.py builds no CUDA kernel here: {reason}"


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


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


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
