"""Shared set-up for the engine, main and distributed tests: a tiny model and data configuration."""
import argparse
import os
import socket
from pathlib import Path
from typing import Dict, List

from main import get_args_parser
from tools.make_tiny_coco import make_tiny_coco

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


def parse(argv: List[str]) -> argparse.Namespace:
    """main.py's parser on ``argv``, with the fields main() sets for a single process."""
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(argv)
    args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
    return args


def tiny_coco(out_dir: Path, num_train: int = 4, num_val: int = 3, **kwargs) -> Path:
    return make_tiny_coco(out_dir, num_train=num_train, num_val=num_val, seed=0, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The current environment without any launcher variables, so a child runs as one process,
    and with the repository on ``PYTHONPATH``, so a child script finds its modules."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
