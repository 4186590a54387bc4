"""tools/gpu_check.py where no GPU is needed: arguments, the report, and the skip messages (the GPU
parts themselves run only on a CUDA machine, with ``make gpu-check``)."""
import ast
import subprocess
import sys

import pytest
import torch

from tools import gpu_check

from helpers import REPO, subprocess_env


def run_check(*args: str) -> subprocess.CompletedProcess:
    """tools/gpu_check.py with every GPU hidden, so that it behaves as on a machine without one."""
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(CUDA_VISIBLE_DEVICES=""))


def test_without_a_gpu_every_gpu_part_is_skipped_and_the_report_says_so(tmp_path):
    result = run_check("--out", str(tmp_path / "report"))
    assert result.returncode == gpu_check.NO_GPU_EXIT, result.stderr
    report = (tmp_path / "report" / "report.txt").read_text()
    assert report == result.stdout
    assert f"torch {torch.__version__}" in report
    for part in gpu_check.PARTS:
        assert f"=== {part.name} ===" in report
        status = "PASS" if part.name == "environment" else "SKIP"
        assert any(line.split() == [part.name, status] for line in report.splitlines()), part.name
    assert report.count("SKIP: no CUDA GPU is visible") == len(gpu_check.PARTS) - 1
    assert "nothing GPU-specific was checked" in report


def test_parts_can_be_chosen(tmp_path):
    result = run_check("--out", str(tmp_path), "--parts", "tests", "build")
    report = (tmp_path / "report.txt").read_text()
    assert "=== environment ===" not in report
    assert report.index("=== build ===") < report.index("=== tests ===")  # in the usual order
    assert result.returncode == gpu_check.NO_GPU_EXIT


@pytest.mark.parametrize("args, message", [
    (["--parts", "benchmarks"], "invalid choice: 'benchmarks'"),
    (["--wheels", "no/such/wheels"], "--wheels no/such/wheels: no such folder"),
])
def test_bad_arguments_are_named(tmp_path, args, message):
    result = run_check("--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_part_whose_packages_are_missing_is_skipped_naming_them(tmp_path):
    part = gpu_check.Part("probe", False, ("numpy", "no_such_package_xyz"), 10, lambda args, work: [])
    report = gpu_check.Report(tmp_path / "report.txt")
    assert gpu_check.run_part(part, None, tmp_path, report, gpu=True) == "SKIP"
    assert "SKIP: needs no_such_package_xyz, not installed" in (tmp_path / "report.txt").read_text()


def test_a_failing_command_fails_its_part_and_keeps_its_output(tmp_path):
    def commands(args, work):
        return [[sys.executable, "-c", "print('first')"],
                [sys.executable, "-c", "import sys; print('went wrong'); sys.exit(4)"],
                [sys.executable, "-c", "print('never')"]]

    report = gpu_check.Report(tmp_path / "report.txt")
    status = gpu_check.run_part(gpu_check.Part("probe", False, (), 60, commands), None, tmp_path, report, gpu=True)
    text = (tmp_path / "report.txt").read_text()
    assert status == "FAIL"
    assert "first" in text and "went wrong" in text and "[exit 4," in text and "never" not in text


def test_a_part_over_its_time_limit_fails(tmp_path):
    def commands(args, work):
        return [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]]

    report = gpu_check.Report(tmp_path / "report.txt")
    status = gpu_check.run_part(gpu_check.Part("probe", False, (), 2, commands), None, tmp_path, report, gpu=True)
    text = (tmp_path / "report.txt").read_text()
    assert status == "FAIL" and "over the part's 2 s limit" in text and "started" in text


def test_without_torchvision_the_parts_that_build_the_model_are_skipped_naming_it(tmp_path, monkeypatch):
    find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchvision" else find_spec(name, *a))
    report = gpu_check.Report(tmp_path / "report.txt")
    for part in gpu_check.PARTS:
        if part.name in ("tests", "train_benchmark", "distributed", "devices"):
            assert gpu_check.run_part(part, None, tmp_path, report, gpu=True) == "SKIP", part.name
    text = (tmp_path / "report.txt").read_text()
    assert text.count("SKIP: needs torchvision, not installed") == 4


def _imported_at_module_level(path) -> set[str]:
    """Top-level package names of the import statements outside functions and classes (what
    importing, or collecting, the file needs)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_parts_need_every_package_the_tree_imports():
    """A package imported when a module loads or a test file is collected, but missing from
    RUNTIME, would fail the GPU machine's parts instead of skipping them, naming it."""
    local = {path.stem for path in REPO.glob("*.py")} | {path.name for path in REPO.iterdir() if path.is_dir()}
    local |= {path.stem for path in (REPO / "tests").glob("*.py")}
    # Left out: the build script (setuptools comes with pip) and the ONNX functions, which only
    # the export loads, and the export tests after pytest.importorskip("onnx").
    optional = {REPO / "ops" / "setup.py", REPO / "ops" / "onnx.py"}
    files = [*REPO.glob("*.py"), *(p for d in ("models", "datasets", "util", "ops", "tools", "tests")
                                   for p in (REPO / d).rglob("*.py") if p not in optional)]
    imported = set().union(*(_imported_at_module_level(path) for path in files))
    third_party = imported - set(sys.stdlib_module_names) - local - {"torch"}
    assert third_party - {"pytest"} <= set(gpu_check.RUNTIME), third_party - set(gpu_check.RUNTIME)
    assert "matplotlib" in third_party and "tensorboard" in third_party  # the check sees test files
