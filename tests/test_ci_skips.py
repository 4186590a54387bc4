"""conftest.py's rule for CI: under ``CI=true`` a skip for any reason but missing hardware (or CUDA
toolkit) fails the run and is listed."""
import os
import subprocess
import sys

from helpers import REPO, subprocess_env

PROBE = '''
import pytest

from helpers import needs_cuda


@needs_cuda
def test_that_needs_a_gpu():
    pass


def test_that_skips_for_another_reason():
    pytest.skip("the op is not built")
'''


def test_under_ci_a_skip_for_another_reason_fails_the_run_and_is_named(tmp_path):
    """pytest on two probe tests, with this repository's conftest.py as a plugin."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    pythonpath = os.pathsep.join([str(REPO), str(REPO / "tests")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "test_probe.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**subprocess_env(CI="true"), "PYTHONPATH": pythonpath})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "test_probe.py::test_that_skips_for_another_reason: the op is not built" in proc.stdout
    assert "test_that_needs_a_gpu:" not in proc.stdout  # no GPU is a skip CI allows (or it ran)
