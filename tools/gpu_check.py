"""GPU acceptance check (``make gpu-check``): everything this project does on a CUDA machine, in
one command, written to a plain-text report.

Parts, each a child process with its own time limit, in order:

* ``environment``: Python, torch, CUDA and driver versions, the GPUs, nvcc, missing packages;
* ``build``: ``ops/setup.py`` for the visible GPUs (unless ``TORCH_CUDA_ARCH_LIST`` is set);
* ``tests``: ``pytest -m cuda tests`` (the op, the model, the engine and mixed precision on CUDA);
* ``op_benchmark``: ``tools/benchmark_msda.py`` on CUDA, float32, bfloat16 and float16, then
  float32 under ``torch.use_deterministic_algorithms``, against the pure-PyTorch core;
* ``train_benchmark``: ``tools/benchmark_train.py``, r50 multi-scale, 1333x800 synthetic images,
  batch 2 and 4, float32 and bf16;
* ``distributed``: a one-epoch ``tools/run_dist_launch.sh`` run, one process per visible GPU (NCCL);
* ``devices``: every variant's outputs on CUDA against its outputs on the CPU, same weights.

Nothing is downloaded: data are synthetic, weights random. Packages missing on the machine are
installed from wheels given with ``--wheels DIR`` (``pip install --no-index``); without them the
parts that need a missing package are skipped, saying which. Without a GPU every GPU part is
skipped and the exit status is 3; otherwise it is 1 if any part failed, else 0. See docs/gpu.md.

Usage::

    python tools/gpu_check.py --out gpu_check            # or: make gpu-check
    python tools/gpu_check.py --parts build tests --wheels wheels/
"""
import argparse
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_GPU_EXIT = 3

# Import names of the pip packages whose names differ.
IMPORT_NAMES = {"pillow": "PIL", "faster-coco-eval": "faster_coco_eval"}
PIP_NAMES = {module: pip for pip, module in IMPORT_NAMES.items()}


def requirements(path: Path) -> tuple[str, ...]:
    """Import names of the packages a requirements file lists, torch left out (a GPU machine keeps
    its own)."""
    names = []
    for line in path.read_text().splitlines():
        pip = re.split(r"[=<>!~\[;\s]", line.split("#", 1)[0].strip(), maxsplit=1)[0]
        if pip and pip.lower() != "torch":
            names.append(IMPORT_NAMES.get(pip.lower(), pip.lower()))
    return tuple(names)


# What the parts need beyond torch: requirements.txt, whose every package some module of the
# tree imports (the test files at collection).
RUNTIME = requirements(REPO / "requirements.txt")


@dataclass
class Part:
    name: str
    needs_gpu: bool
    needs: tuple[str, ...]
    timeout_s: int
    commands: Callable[[argparse.Namespace, Path], list[list[str]]]


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _environment(args: argparse.Namespace, work: Path) -> list[list[str]]:
    script = (
        "import platform, torch\n"
        "print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,"
        " '| cuDNN', torch.backends.cudnn.version() if torch.cuda.is_available() else None)\n"
        "for i in range(torch.cuda.device_count()):\n"
        "    p = torch.cuda.get_device_properties(i)\n"
        "    print(f'GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB')\n")
    commands = [_python("-c", script)]
    if shutil.which("nvidia-smi"):
        commands.append(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"])
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if Path(nvcc).is_file():
        commands.append([nvcc, "--version"])
    return commands


def _build(args: argparse.Namespace, work: Path) -> list[list[str]]:
    return [_python("ops/setup.py", "build_ext", "--inplace"),
            _python("-c", "import ops._C as c, ops._extension as e; print('with_cuda =', c.with_cuda); "
                    "r = e.unavailable_reason('cuda'); print('CUDA kernel:', r or 'runs'); "
                    "raise SystemExit(r is not None)")]


def _tests(args: argparse.Namespace, work: Path) -> list[list[str]]:
    return [_python("-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests")]


def _op_benchmark(args: argparse.Namespace, work: Path) -> list[list[str]]:
    return [_python("tools/benchmark_msda.py", "--device", "cuda", "--dtypes", "float32", "bfloat16", "float16",
                    "--repeat", "10"),
            _python("tools/benchmark_msda.py", "--device", "cuda", "--deterministic", "--repeat", "10")]


def _data(work: Path, width: int, height: int, num_train: int) -> list[str]:
    return _python("tools/make_tiny_coco.py", str(work / f"coco_{width}x{height}"), "--num_train", str(num_train),
                   "--num_val", "2", "--size", str(width), str(height))


def _train_benchmark(args: argparse.Namespace, work: Path) -> list[list[str]]:
    commands = [_data(work, 1333, 800, 16)]
    for batch in (2, 4):
        commands.append(_python("tools/benchmark_train.py", "--coco_path", str(work / "coco_1333x800"),
                                "--device", "cuda", "--backbone_weights", "none", "--batch_size", str(batch),
                                "--train_scales", "800", "--max_size", "1333", "--num_workers", "4",
                                "--num_iters", "10", "--warmup", "3", "--rounds", "3", "--amp", "none", "bf16"))
    return commands


def _distributed(args: argparse.Namespace, work: Path) -> list[list[str]]:
    import torch

    gpus = max(torch.cuda.device_count(), 1)
    out = work / "distributed"
    return [_data(work, 320, 256, 4 * gpus),
            # PYTHON: the launcher's torchrun runs with this interpreter (there may be no `python`).
            ["env", f"PYTHON={sys.executable}", "bash", "tools/run_dist_launch.sh", str(gpus), sys.executable,
             "main.py",
             "--coco_path", str(work / "coco_320x256"), "--output_dir", str(out), "--backbone_weights", "none",
             "--epochs", "1", "--batch_size", "2", "--num_workers", "2", "--train_scales", "256",
             "--val_scale", "256", "--max_size", "320", "--num_classes", "8"]]


def _devices(args: argparse.Namespace, work: Path) -> list[list[str]]:
    return [_python(__file__, "--compare_devices")]


PARTS = (
    Part("environment", False, (), 60, _environment),
    Part("build", True, (), 600, _build),
    Part("tests", True, ("pytest", *RUNTIME), 300, _tests),
    Part("op_benchmark", True, (), 240, _op_benchmark),
    Part("train_benchmark", True, RUNTIME, 300, _train_benchmark),
    Part("distributed", True, RUNTIME, 240, _distributed),
    Part("devices", True, RUNTIME, 180, _devices),
)
PART_NAMES = tuple(part.name for part in PARTS)


class Report:
    """Appends to ``report.txt`` as it goes, flushed, and echoes to stdout: a part cut short by its
    time limit (or the whole check by the machine's) leaves what it had written."""

    def __init__(self, path: Path):
        self.path = path
        self.path.write_text("")

    def write(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def missing_packages(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def install_wheels(wheels: Path, report: Report) -> None:
    """``pip install --no-index --find-links wheels`` the packages that are missing."""
    names = missing_packages(("pytest", *RUNTIME))
    if not names:
        report.write(f"wheels: nothing missing, {wheels} not used\n")
        return
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
           *(PIP_NAMES.get(n, n) for n in names)]
    result = subprocess.run(pip, capture_output=True, text=True)
    status = "installed" if result.returncode == 0 else f"pip failed (exit {result.returncode})"
    report.write(f"wheels: {status}: {' '.join(PIP_NAMES.get(n, n) for n in names)} from {wheels}\n")
    if result.returncode != 0:
        report.write(result.stdout + result.stderr)


def run_part(part: Part, args: argparse.Namespace, work: Path, report: Report, gpu: bool) -> str:
    """Runs one part; returns PASS, FAIL or SKIP (with the reason written to the report)."""
    report.write(f"\n=== {part.name} ===\n")
    if part.needs_gpu and not gpu:
        report.write("SKIP: no CUDA GPU is visible\n")
        return "SKIP"
    missing = missing_packages(part.needs)
    if missing:
        report.write(f"SKIP: needs {', '.join(PIP_NAMES.get(n, n) for n in missing)}, not installed "
                     "(give wheels with --wheels DIR; see docs/gpu.md)\n")
        return "SKIP"
    deadline = time.monotonic() + part.timeout_s
    for command in part.commands(args, work):
        left = deadline - time.monotonic()
        shown = " ".join(Path(c).name if c == sys.executable else c for c in command)
        report.write(f"$ {shown}\n")
        started = time.monotonic()
        try:
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(left, 1))
        except subprocess.TimeoutExpired as exc:
            # TimeoutExpired carries the output so far as bytes, even with text=True.
            output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            report.write(output[-4000:] + f"\nFAIL: over the part's {part.timeout_s} s limit\n")
            return "FAIL"
        output = (result.stdout + result.stderr).rstrip()
        # Long logs (a build, a training run) are cut to their end, where the result is.
        lines = output.splitlines()
        if len(lines) > 60:
            output = "\n".join([f"[{len(lines) - 60} lines left out]", *lines[-60:]])
        report.write(output + f"\n[exit {result.returncode}, {time.monotonic() - started:.0f} s]\n")
        if result.returncode != 0:
            report.write("FAIL\n")
            return "FAIL"
    report.write("PASS\n")
    return "PASS"


def compare_devices() -> int:
    """Each variant with random weights (seed 0), eval mode, on two images: CUDA (TF32 off)
    against the CPU. Prints the largest differences; exit 1 when one is over 1e-3."""
    import torch

    sys.path.insert(0, str(REPO))
    from models import build_model
    from util.flags import VARIANTS, config_flags, get_args_parser
    from util.misc import NestedTensor

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    images = torch.rand(2, 3, 320, 416, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 320, 416, dtype=torch.bool)
    mask[1, :, 300:] = True
    worst = 0.0
    for name in VARIANTS:
        args = get_args_parser().parse_args([*config_flags(name), "--backbone_weights", "none"])
        torch.manual_seed(0)
        model, _, _ = build_model(args)
        model.eval()
        with torch.no_grad():
            cpu = model(NestedTensor(images, mask))
            model.cuda()
            gpu = model(NestedTensor(images.cuda(), mask.cuda()))
        diffs = {key: (cpu[key] - gpu[key].cpu()).abs().max().item() for key in ("pred_logits", "pred_boxes")}
        worst = max(worst, *diffs.values())
        print(f"{name}: max |CUDA - CPU| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return 1 if worst > 1e-3 else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check",
                        help="folder for report.txt and the parts' data and outputs (default: %(default)s)")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES),
                        help="parts to run, in the usual order (default: all)")
    parser.add_argument("--wheels", type=Path, help="folder of wheels for missing packages (pip --no-index)")
    parser.add_argument("--compare_devices", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare_devices:
        return compare_devices()
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: no such folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {args.out}: {exc.strerror}")
    report = Report(args.out / "report.txt")
    report.write(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {platform.node()}; "
                 f"parts: {' '.join(args.parts)}\n")
    if args.wheels is not None:
        install_wheels(args.wheels, report)
    import torch

    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="work_", dir=args.out))
    results = {part.name: run_part(part, args, work, report, gpu) for part in PARTS if part.name in args.parts}
    report.write("\n=== summary ===\n" + "\n".join(f"{name:16s} {status}" for name, status in results.items()) + "\n")
    if not gpu:
        report.write("no CUDA GPU is visible: nothing GPU-specific was checked\n")
        return NO_GPU_EXIT
    return 1 if "FAIL" in results.values() else 0


if __name__ == "__main__":
    sys.exit(main())
