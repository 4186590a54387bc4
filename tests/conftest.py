"""Shared fixtures: the tiny COCO-format data set the training, engine and failure tests run on.

Under ``CI=true`` the run also fails on any skip whose reason is not one of missing hardware that
is really missing here (:func:`allowed_skip_reasons`): a CI run where the op is not built, a test
requirement is missing or a test skips itself for another reason would otherwise pass green with
part of the suite never run."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from tools.make_tiny_coco import make_tiny_coco

from helpers import FEWER_THAN_TWO_GPUS, NO_GPU, no_cuda_build_reason


@pytest.fixture(scope="session")
def tiny_coco_root(tmp_path_factory) -> Path:
    """Four training and three validation images (category ids up to 7), made once per session;
    tests must not change it (take ``coco`` for a copy of one's own)."""
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"), num_train=4, num_val=3, seed=0)


@pytest.fixture()
def coco(tiny_coco_root, tmp_path) -> Path:
    """A copy of the tiny COCO set that the test may damage."""
    return Path(shutil.copytree(tiny_coco_root, tmp_path / "coco"))


# ------------------------------------------------------------------------------------------
# Skips under CI

def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def allowed_skip_reasons() -> set[str]:
    """The skip reasons that are true of this machine: no GPU, fewer than two, no CUDA build."""
    allowed = set()
    if not torch.cuda.is_available():
        allowed.add(NO_GPU)
    if torch.cuda.device_count() < 2:
        allowed.add(FEWER_THAN_TWO_GPUS)
    cuda_build = no_cuda_build_reason()
    if cuda_build is not None:
        allowed.add(cuda_build)
    return allowed


# (test or collector id, reason) of each skip not allowed, gathered over the session.
_unexpected_skips: list[tuple[str, str]] = []


def _note_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    longrepr = report.longrepr
    reason = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)).removeprefix("Skipped: ")
    if reason not in allowed_skip_reasons():
        _unexpected_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)  # a module skipped as a whole (pytest.importorskip, a module-level skip)


def pytest_sessionfinish(session):
    if _unexpected_skips and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _unexpected_skips:
        return
    terminalreporter.section("skips CI does not allow", sep="=", red=True)
    for nodeid, reason in _unexpected_skips:
        terminalreporter.line(f"{nodeid}: {reason}", red=True)
    allowed = "; ".join(sorted(allowed_skip_reasons())) or "none"
    terminalreporter.line(f"under CI=true these fail the run: the only skips allowed are for hardware or a CUDA "
                          f"toolkit this machine lacks ({allowed})", red=True)
