"""Benchmarks the compiled multi-scale deformable attention kernel against the pure-PyTorch core.

Times forward and backward of ``torch.ops.deformable_detr.ms_deform_attn`` (``ops._C``) and of
``ops.ms_deform_attn_pytorch`` at the shapes of the multi-scale Deformable DETR on an 800x1066
image (levels 100x134, 50x67, 25x34, 13x17; 8 heads, 32 channels, 4 points): the encoder
(queries = all 17,821 tokens) and the decoder (300 queries), batch 1 and 2.

Peak memory is the extra memory one forward + backward needs on top of its inputs: on CUDA from
``torch.cuda.max_memory_allocated``; on the CPU from the peak resident set size (``VmHWM``,
reset through ``/proc/self/clear_refs``) of a fresh subprocess per measurement.

Usage::

    python tools/benchmark_msda.py --device cpu --threads 2
    python tools/benchmark_msda.py --device cuda --dtypes float32 bfloat16

With several ``--dtypes`` every implementation runs in each of them, alternating within each
repetition, and the compiled kernel's speed-up of each later dtype over the first is printed too.
``--deterministic`` times everything under ``torch.use_deterministic_algorithms(True,
warn_only=True)``: the CUDA kernel's deterministic backward; the pure-PyTorch core has none on
CUDA (``grid_sample``'s backward), so it runs as usual beside it, with a warning.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ops  # noqa: E402
from ops import _extension  # noqa: E402

SPATIAL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]
HEADS, CHANNELS, POINTS = 8, 32, 4
NUM_TOKENS = sum(h * w for h, w in SPATIAL_SHAPES)
CASES = {"encoder": NUM_TOKENS, "decoder": 300}
IMPLS = ("compiled", "pytorch")
Inputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def make_inputs(batch: int, queries: int, device: torch.device, dtype: torch.dtype,
                locations: str = "reference") -> Inputs:
    """Random inputs at the benchmark shape; value, locations and weights require grad.

    ``locations="reference"`` places the points as the model does: within a few pixels of each
    query's reference point (the token's own position in the encoder, a random point in the
    decoder). ``"uniform"`` scatters them uniformly over each level (the cache-hostile case).
    """
    generator = torch.Generator().manual_seed(0)
    levels = len(SPATIAL_SHAPES)
    spatial_shapes = torch.tensor(SPATIAL_SHAPES, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = sizes.cumsum(0) - sizes
    value = torch.randn(batch, NUM_TOKENS, HEADS, CHANNELS, generator=generator)
    shape = (batch, queries, HEADS, levels, POINTS, 2)
    if locations == "uniform":
        sampling_locations = torch.rand(shape, generator=generator)
    else:
        if queries == NUM_TOKENS:
            centres = [torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w,
                                                  (torch.arange(h) + 0.5) / h, indexing="xy"), -1)
                       for h, w in SPATIAL_SHAPES]
            reference = torch.cat([c.reshape(-1, 2) for c in centres]).expand(batch, -1, -1)
        else:
            reference = torch.rand(batch, queries, 2, generator=generator)
        pixels = (torch.rand(shape, generator=generator) * 2 - 1) * POINTS
        level_size = spatial_shapes.flip(-1).to(torch.float32).view(1, 1, 1, levels, 1, 2)
        sampling_locations = reference.view(batch, queries, 1, 1, 1, 2) + pixels / level_size
    weights = torch.rand(batch, queries, HEADS, levels * POINTS, generator=generator).softmax(-1)
    weights = weights.view(batch, queries, HEADS, levels, POINTS)
    value, sampling_locations, weights = (t.to(device, dtype).requires_grad_()
                                          for t in (value, sampling_locations, weights))
    return (value, spatial_shapes.to(device), level_start_index.to(device), sampling_locations,
            weights)


def impl_fn(name: str) -> Callable[[Inputs], Tensor]:
    if name == "compiled":
        return lambda inputs: torch.ops.deformable_detr.ms_deform_attn(*inputs)
    return lambda inputs: ops.ms_deform_attn_pytorch(inputs[0], inputs[1], inputs[3], inputs[4])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn: Callable[[Inputs], Tensor], inputs: Inputs, grad: Tensor,
             device: torch.device) -> tuple[float, float]:
    """Seconds of one forward and of its backward."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(inputs)
    synchronize(device)
    middle = time.perf_counter()
    out.backward(grad)
    synchronize(device)
    end = time.perf_counter()
    for tensor in (inputs[0], inputs[3], inputs[4]):
        tensor.grad = None
    return middle - start, end - middle


def time_impls(inputs: dict[torch.dtype, Inputs], device: torch.device, warmup: int,
               repeat: int) -> dict[tuple[str, torch.dtype], list[tuple[float, float]]]:
    """(forward, backward) seconds per repetition for each implementation and dtype.

    The implementations and dtypes alternate within each repetition, so that a machine whose
    load changes over time (shared cores) affects all alike."""
    grads = {}
    for dtype, dtype_inputs in inputs.items():
        batch, _, heads, channels = dtype_inputs[0].shape
        grads[dtype] = torch.randn(batch, dtype_inputs[3].shape[1], heads * channels,
                                   generator=torch.Generator().manual_seed(1)).to(device, dtype)
    times: dict[tuple[str, torch.dtype], list[tuple[float, float]]] = {
        (impl, dtype): [] for impl in IMPLS for dtype in inputs}
    for step in range(warmup + repeat):
        for impl in IMPLS:
            for dtype, dtype_inputs in inputs.items():
                result = run_once(impl_fn(impl), dtype_inputs, grads[dtype], device)
                if step >= warmup:
                    times[impl, dtype].append(result)
    return times


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_cpu_memory(impl: str, case: str, batch: int, threads: int, locations: str) -> float:
    """Peak extra MiB of one forward + backward, measured in this (fresh) process."""
    torch.set_num_threads(threads)
    inputs = make_inputs(batch, CASES[case], torch.device("cpu"), torch.float32, locations)
    fn = impl_fn(impl)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    out = fn(inputs)
    out.backward(torch.ones_like(out))
    return (_rss_kib("VmHWM") - before) / 1024


def cpu_peak_mib(impl: str, case: str, batch: int, threads: int,
                 locations: str) -> float | None:
    command = [sys.executable, __file__, "--probe-memory", f"{impl},{case},{batch}",
               "--threads", str(threads), "--locations", locations]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"memory probe failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def cuda_peak_mib(fn: Callable[[Inputs], Tensor], inputs: Inputs, device: torch.device) -> float:
    synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(inputs)
    out.backward(torch.ones_like(out))
    synchronize(device)
    for tensor in (inputs[0], inputs[3], inputs[4]):
        tensor.grad = None
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op CPU threads (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"],
                        choices=("float32", "float64", "float16", "bfloat16"),
                        help="dtypes to time, side by side (default: %(default)s)")
    parser.add_argument("--locations", choices=("reference", "uniform"), default="reference",
                        help="sampling points near each query's reference point, as in the model, "
                             "or uniform over each level")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--deterministic", action="store_true",
                        help="under torch.use_deterministic_algorithms (see the module docstring)")
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.probe_memory:
        impl, case, batch = args.probe_memory.split(",")
        peak = probe_cpu_memory(impl, case, int(batch), args.threads, args.locations)
        print(json.dumps({"peak_mib": peak}))
        return

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible")
    reason = _extension.unavailable_reason(args.device)
    if reason is not None:
        sys.exit(f"cannot benchmark the compiled kernel: {reason}")
    torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(args.device)
    dtypes = [getattr(torch, name) for name in dict.fromkeys(args.dtypes)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {args.threads} threads, "
          f"{', '.join(args.dtypes)}, {args.locations} locations"
          f"{', deterministic algorithms' if args.deterministic else ''}; "
          f"{args.repeat} timed runs after {args.warmup} warm-up, implementations alternating; "
          f"median times and best total in ms, peak memory in MiB")
    print(f"{'case':<8} {'B':>2} {'impl':<9} {'dtype':<8} {'forward':>9} {'backward':>9} "
          f"{'total':>9} {'best total':>10} {'peak mem':>9}")
    for case, queries in CASES.items():
        for batch in args.batches:
            inputs = {dtype: make_inputs(batch, queries, device, dtype, args.locations)
                      for dtype in dtypes}
            times = time_impls(inputs, device, args.warmup, args.repeat)
            summary: dict[tuple[str, torch.dtype], tuple[float, float, float, float]] = {}
            for (impl, dtype), runs in times.items():
                forward = statistics.median(f for f, _ in runs)
                backward = statistics.median(b for _, b in runs)
                total = statistics.median(f + b for f, b in runs)
                best = min(f + b for f, b in runs)
                summary[impl, dtype] = (forward, backward, total, best)
                peak = None
                if not args.no_memory:
                    if device.type == "cuda":
                        peak = cuda_peak_mib(impl_fn(impl), inputs[dtype], device)
                    elif dtype == torch.float32:
                        peak = cpu_peak_mib(impl, case, batch, args.threads, args.locations)
                memory = "n/a" if peak is None else f"{peak:.1f}"
                print(f"{case:<8} {batch:>2} {impl:<9} {dtype_name(dtype):<8} "
                      f"{forward * 1e3:>9.2f} {backward * 1e3:>9.2f} {total * 1e3:>9.2f} "
                      f"{best * 1e3:>10.2f} {memory:>9}")
            ratios = []
            for dtype in dtypes:
                ratios.append((f"{dtype_name(dtype):<8}", "pytorch / compiled",
                               summary["pytorch", dtype], summary["compiled", dtype]))
            for dtype in dtypes[1:]:
                ratios.append((f"{dtype_name(dtype):<8}", f"compiled {dtype_name(dtypes[0])} / "
                               f"compiled {dtype_name(dtype)}", summary["compiled", dtypes[0]],
                               summary["compiled", dtype]))
            for label, what, slow, fast in ratios:
                print(f"{case:<8} {batch:>2} {'speed-up':<9} {label} "
                      + " ".join(f"{a / b:>{w - 1}.1f}x" for a, b, w in zip(slow, fast, (9, 9, 9, 10)))
                      + f"  ({what})")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

if __name__ == "__main__":
    main()
