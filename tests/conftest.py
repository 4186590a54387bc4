"""Shared fixtures: the tiny COCO-format data set the training, engine and failure tests run on."""
import shutil
from pathlib import Path

import pytest

from tools.make_tiny_coco import make_tiny_coco


@pytest.fixture(scope="session")
def tiny_coco_root(tmp_path_factory) -> Path:
    """Four training and three validation images (category ids up to 7), made once per session;
    tests must not change it (take ``coco`` for a copy of one's own)."""
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"), num_train=4, num_val=3, seed=0)


@pytest.fixture()
def coco(tiny_coco_root, tmp_path) -> Path:
    """A copy of the tiny COCO set that the test may damage."""
    return Path(shutil.copytree(tiny_coco_root, tmp_path / "coco"))
