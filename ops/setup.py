"""Builds ``ops._C``, the compiled multi-scale deformable attention kernels.

Run from anywhere; the extension is always placed next to this file::

    python ops/setup.py build_ext --inplace

The CPU kernel is always built. The CUDA kernel is added when the CUDA toolkit is found
(``CUDA_HOME``, ``CUDA_PATH``, ``/usr/local/cuda`` or ``nvcc`` on ``PATH``) and PyTorch was
built with CUDA; no GPU is needed. The target architectures come from ``TORCH_CUDA_ARCH_LIST``;
when it is unset, the build is for the GPUs that are visible (fast), or, with none visible, for
:data:`DEFAULT_ARCH_LIST`. A failed build (the CUDA part included) exits non-zero after the
compiler's error, and nothing stands in for it: ``MSDA_WITH_CUDA=0`` is the one way to build the
CPU kernel alone where the CUDA kernel would be built (``make demo`` uses it).

What the extension was built with is recorded beside it (:data:`BUILD_RECORD`), after a build
that succeeded. An extension newer than its sources and built against this torch is kept when it
has everything asked for (a CUDA build also serves a CPU-only request, and a build for more
architectures one for fewer); otherwise it is rebuilt, so that a CPU-only build (``make demo``)
does not stand in for the CUDA one ``make test`` asks for, and ``make demo`` after ``make build``
keeps the CUDA build.
"""
import json
import os
import shutil
import sys
from pathlib import Path

OPS_DIR = Path(__file__).resolve().parent
REPO_ROOT = OPS_DIR.parent
BUILD_RECORD = OPS_DIR / "_C.build.json"
# The GPUs people train and evaluate on that CUDA 13 supports: T4 (7.5), A100 (8.0), A10 and
# RTX 30xx (8.6), L4 and RTX 40xx (8.9), H100/H200 (9.0), B200/B300 (10.0), RTX 50xx and
# RTX PRO 6000 (12.0), with PTX for GPUs newer still. A binary for x.0 also runs on x.y (12.0 on
# GB10's 12.1, 10.0 on 10.3); Jetson (8.7, 11.0) needs its own TORCH_CUDA_ARCH_LIST.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def find_cuda_home() -> str | None:
    """The CUDA toolkit directory (with ``bin/nvcc`` and ``include/cuda_runtime.h``), or ``None``."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append(str(Path(nvcc_on_path).resolve().parent.parent))
    for candidate in candidates:
        if (candidate and (Path(candidate) / "bin" / "nvcc").is_file()
                and (Path(candidate) / "include" / "cuda_runtime.h").is_file()):
            return candidate
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME is not None:
    # torch.utils.cpp_extension reads it when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from setuptools.errors import CCompilerError  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

NAME = "ops._C"
CSRC = Path("ops") / "csrc"
CPU_SOURCES = [str(CSRC / "ms_deform_attn.cpp"), str(CSRC / "cpu" / "ms_deform_attn_cpu.cpp")]
CUDA_SOURCES = [str(CSRC / "cuda" / "ms_deform_attn_cuda.cu")]
CXX_FLAGS = ["-O3"]
# --threads: nvcc compiles for the architectures in parallel.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", f"--threads={os.cpu_count() or 1}"]
LINK_FLAGS = []
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    # at::parallel_for expands to `#pragma omp parallel` in our own sources: without -fopenmp
    # the CPU kernel would run on one thread. The resulting libgomp.so.1 dependency resolves
    # to the copy PyTorch has already loaded.
    CXX_FLAGS.append("-fopenmp")
    LINK_FLAGS.append("-fopenmp")


def cpu_extension():
    return CppExtension(NAME, CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS},
                        extra_link_args=LINK_FLAGS)


def cuda_extension():
    return CUDAExtension(
        NAME,
        CPU_SOURCES + CUDA_SOURCES,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=LINK_FLAGS,
    )


def cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs' compute capabilities, else
    :data:`DEFAULT_ARCH_LIST`."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
    return DEFAULT_ARCH_LIST


def cuda_unavailable_reason() -> str | None:
    if os.environ.get("MSDA_WITH_CUDA", "1") == "0":
        return "MSDA_WITH_CUDA=0"
    if CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} was built without CUDA"
    return None


def read_build_record() -> dict | None:
    """What :data:`BUILD_RECORD` says the extension was built with, or ``None`` if it says nothing."""
    try:
        record = json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def build_covers(record: dict | None, wanted: str | None) -> bool:
    """Whether the build described by ``record`` has what a build for ``wanted`` would have.

    ``wanted`` is a ``TORCH_CUDA_ARCH_LIST`` or ``None`` for the CPU kernel alone; a record holds
    ``cuda_arch_list``, ``None`` for a CPU-only build.
    """
    if record is None:
        return False
    if wanted is None:
        return True
    built = record.get("cuda_arch_list")
    return built is not None and set(wanted.split(";")) <= set(built.split(";"))


def newer_than_sources(path: Path) -> bool:
    """Whether ``path`` exists and is newer than every file under ``ops/csrc`` and this script."""
    if not path.exists():
        return False
    sources = [f for f in (OPS_DIR / "csrc").rglob("*") if f.is_file()] + [OPS_DIR / "setup.py"]
    return path.stat().st_mtime_ns > max(f.stat().st_mtime_ns for f in sources)


def can_keep(record: dict | None, wanted: str | None, outputs: list[Path]) -> bool:
    """Whether the built ``outputs`` described by ``record`` serve a build for ``wanted``: built
    against this torch (another's would not load), covering ``wanted`` and newer than the sources."""
    return (record is not None and record.get("torch") == torch.__version__ and build_covers(record, wanted)
            and all(newer_than_sources(path) for path in outputs))


class BuildOrKeep(BuildExtension):
    """Keeps an extension that has what is asked for, else builds it and records what it built."""

    def build_extensions(self) -> None:
        with_cuda = any(source.endswith(".cu") for ext in self.extensions for source in ext.sources)
        wanted = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None
        outputs = [Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions]
        if can_keep(read_build_record(), wanted, outputs):
            print("ops/setup.py: the extension is up to date and has what is asked for "
                  f"({BUILD_RECORD.name}); keeping it")
            return
        # Decided here rather than by setuptools' own check (which looks at the sources only) or
        # by ninja's (which torch always runs, rebuilding a CUDA build into a CPU-only one).
        self.force = True
        try:
            super().build_extensions()
        except (RuntimeError, CCompilerError) as exc:  # a compiler error, a toolkit mismatch, ...
            # A clear last line instead of a traceback; the compiler's own output is above it.
            hint = "; MSDA_WITH_CUDA=0 builds the CPU kernel alone" if with_cuda else ""
            raise SystemExit(f"ops/setup.py: building {NAME} failed: {exc}{hint}") from exc
        record = {"torch": torch.__version__, "cuda_arch_list": wanted}
        BUILD_RECORD.write_text(json.dumps(record) + "\n")


def main() -> None:
    os.chdir(REPO_ROOT)
    reason = cuda_unavailable_reason()
    if reason is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        print(f"ops/setup.py: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        extension = cuda_extension()
    else:
        print(f"ops/setup.py: building the CPU kernel only: {reason}")
        extension = cpu_extension()
    setup(
        name="deformable_detr_ops",
        version="0.1.0",
        description="Multi-scale deformable attention kernels for Deformable DETR",
        ext_modules=[extension],
        cmdclass={"build_ext": BuildOrKeep},
    )


if __name__ == "__main__":
    main()
