"""Measure inference speed (images per second) of a Deformable DETR configuration, for one or
several precisions and sampling backends side by side.

Takes main.py's model flags (variant, backbone, sizes, ``--device``, ``--resume`` for weights,
which must be of the model the flags describe) plus ``--batch_sizes``, ``--num_iters``,
``--warmup``, ``--rounds`` and ``--image_size H W``, e.g.::

    python tools/benchmark.py --with_box_refine --two_stage --device cuda
    python tools/benchmark.py --device cpu --image_size 608 800 --amp none bf16 --compare_backends

As the original's ``benchmark.py`` does, it times forward passes under ``torch.no_grad`` over one
fixed batch (here random images of ``--image_size``, ImageNet-normalised), after ``--warmup``
untimed passes, synchronising CUDA around each timed one. ``--amp`` takes several modes and
``--compare_backends`` adds the pure-PyTorch sampling core (``MSDA_BACKEND=pytorch``, the
original's computation) beside the compiled op; every configuration is timed ``--num_iters``
passes per round, in turn, for ``--rounds`` rounds, and the median over the rounds is printed with
the speed relative to the first configuration and, where it was timed, to the float32 pure-PyTorch
core. The backbone starts from random weights (``--backbone_weights none``) unless given, since
speed does not depend on them.
``--profile`` then profiles ``--num_iters`` more passes of each PyTorch configuration
(``torch.profiler``) and prints its five most expensive operators by their own time.
``--onnx FILE`` adds a model exported by ``tools/export_onnx.py`` (of the model the flags describe,
which the file's metadata must confirm where it records it), run by ONNX Runtime on the CPU, to
the configurations compared. ``--torch_compile`` adds, for every batch size
and ``--amp`` mode, the same model under ``torch.compile`` (Inductor, one static graph per batch
size and mode, with the first backend's sampling core, labelled ``<backend>+torch.compile``):
Inductor fuses the element-wise work between the matrix products, so it rounds differently from
eager; its first pass, the compilation, is timed on its own, and its outputs on the fixed batch
are compared with eager's and the largest difference printed.
``--image_size`` defaults to 800x1333 (COCO evaluation size) on CUDA and to 320x480 on CPU.
``--device`` defaults to cuda where one is visible, else cpu.
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.transforms.functional import normalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from engine import AMP_DTYPES, forward  # noqa: E402
from models import build_model  # noqa: E402
from ops import BACKEND_ENV, sampling_backend  # noqa: E402
from util.checkpoint import checkpoint_weights, load_checkpoint, load_weights  # noqa: E402
from util.errors import InputError, InputValueError  # noqa: E402
from util.flags import (  # noqa: E402
    architecture_differences,
    check_checkpoint_args,
    check_model_flags,
    cli_parser,
    error_message,
)
from util.logger import format_costs, top_costs  # noqa: E402
from util.misc import NestedTensor, nested_tensor_from_tensor_list  # noqa: E402

GPU_IMAGE_SIZE = (800, 1333)
CPU_IMAGE_SIZE = (320, 480)

Config = tuple[int, str, str]  # (batch size, amp, MSDA_BACKEND, or another runtime)
TORCH_COMPILE = "+torch.compile"


@torch.no_grad()
def seconds_per_batch(model: nn.Module, inputs: NestedTensor, num_iters: int, device: torch.device,
                      amp: torch.dtype | None = None) -> float:
    """Mean wall time of the forward pass over ``num_iters`` passes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total = 0.0
    for _ in range(num_iters):
        sync()
        start = time.perf_counter()
        forward(model, inputs, amp)
        sync()
        total += time.perf_counter() - start
    return total / num_iters


def max_difference(outputs: dict[str, Tensor], reference: dict[str, Tensor]) -> str:
    """The largest absolute difference of the final class logits and boxes, as text."""
    return ", ".join(f"{key} {(outputs[key].float() - reference[key].float()).abs().max().item():.1e}"
                     for key in ("pred_logits", "pred_boxes"))


def benchmark(args: argparse.Namespace) -> tuple[dict[Config, float], dict[Config, str], dict[Config, str]]:
    """Images per second (median over the rounds) for each batch size, amp mode and backend; with
    ``--profile`` each PyTorch configuration's top five operators; and with ``--torch_compile`` each
    compiled configuration's compilation time and difference from eager (see the module docstring)."""
    if args.num_iters < 1 or args.warmup < 0 or args.rounds < 1:
        raise InputValueError(f"need --num_iters >= 1, --warmup >= 0 and --rounds >= 1, got {args.num_iters}, "
                              f"{args.warmup} and {args.rounds}")
    check_model_flags(args)
    if args.image_size and min(args.image_size) < 1:
        raise InputValueError(f"--image_size {' '.join(map(str, args.image_size))} must be positive")
    if any(b < 1 for b in args.batch_sizes):
        raise InputValueError(f"--batch_sizes must be positive, got {args.batch_sizes}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputValueError(f"--device {args.device} but no CUDA device is visible; pass --device cpu")
    height, width = args.image_size or (GPU_IMAGE_SIZE if device.type == "cuda" else CPU_IMAGE_SIZE)

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        check_checkpoint_args(checkpoint, args, args.resume)
    session = onnx_session(args.onnx, args) if args.onnx else None

    torch.manual_seed(args.seed)
    model, _, _ = build_model(args)
    if checkpoint is not None:
        load_weights(model, checkpoint_weights(checkpoint, args.resume, args.ema), args.resume)
    model.to(device).eval()
    image = normalize(torch.rand(3, height, width), IMAGENET_MEAN, IMAGENET_STD).to(device)
    backends = ["compiled", "pytorch"] if args.compare_backends else [os.environ.get(BACKEND_ENV, "auto")]
    configs = [(batch, amp, backend) for batch in args.batch_sizes for amp in args.amp for backend in backends]
    inputs = {batch: nested_tensor_from_tensor_list([image] * batch) for batch in args.batch_sizes}
    if session is not None:
        configs += [(batch, "none", "onnxruntime") for batch in args.batch_sizes]
    # dynamic=False: the fixed input compiles to static shapes; each batch size and mode recompiles.
    compiled_model = torch.compile(model, dynamic=False) if args.torch_compile else None
    if compiled_model is not None:
        configs += [(batch, amp, backends[0] + TORCH_COMPILE) for batch in args.batch_sizes for amp in args.amp]

    def run(config: Config, passes: int) -> float:
        batch, amp, backend = config
        if not passes:
            return 0.0
        if backend.endswith(TORCH_COMPILE):
            with sampling_backend(backend.removesuffix(TORCH_COMPILE)):
                return seconds_per_batch(compiled_model, inputs[batch], passes, device, AMP_DTYPES[amp])
        if backend == "onnxruntime":
            feed = {"images": inputs[batch].tensors.cpu().numpy(), "mask": inputs[batch].mask.cpu().numpy()}
            start = time.perf_counter()
            for _ in range(passes):
                session.run(None, feed)
            return (time.perf_counter() - start) / passes
        with sampling_backend(backend):
            return seconds_per_batch(model, inputs[batch], passes, device, AMP_DTYPES[amp])

    notes = {}
    for config in configs:
        batch, amp, backend = config
        if backend.endswith(TORCH_COMPILE):
            compile_seconds = run(config, 1)
            sampling = backend.removesuffix(TORCH_COMPILE)
            with torch.no_grad(), sampling_backend(sampling):
                eager = forward(model, inputs[batch], AMP_DTYPES[amp])
                compiled = forward(compiled_model, inputs[batch], AMP_DTYPES[amp])
            notes[config] = (f"first pass (compilation) {compile_seconds:.1f} s; largest difference from eager "
                             f"({sampling}): {max_difference(compiled, eager)}")
        run(config, args.warmup)
    seconds: dict[Config, list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            seconds[config].append(run(config, args.num_iters))
    costs = {c: format_costs(top_costs(lambda c=c: run(c, args.num_iters), device))
             for c in configs if args.profile and c[2] != "onnxruntime"}
    return {config: config[0] / statistics.median(times) for config, times in seconds.items()}, costs, notes


def onnx_session(path: str, args: argparse.Namespace):
    """An ONNX Runtime session (CPU) of a model exported by tools/export_onnx.py without
    post-processing, for the same architecture flags as the PyTorch side where the file records them."""
    import onnxruntime

    if not Path(path).is_file():
        raise InputValueError(f"--onnx {path}: no such file")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    if [i.name for i in session.get_inputs()] != ["images", "mask"]:
        raise InputValueError(f"--onnx {path}: expected the inputs images and mask (an export without "
                              f"--with_postprocess), got {[i.name for i in session.get_inputs()]}")
    recorded = session.get_modelmeta().custom_metadata_map.get("model_args")
    if recorded is not None:
        try:
            exported = argparse.Namespace(**json.loads(recorded))
        except (json.JSONDecodeError, TypeError):
            raise InputValueError(f"--onnx {path}: its metadata model_args is not a JSON object") from None
        differences = architecture_differences(exported, args)
        if differences:
            listed = ", ".join(f"--{name} (file: {mine}, here: {theirs})"
                               for name, (mine, theirs) in differences.items())
            raise InputValueError(f"--onnx {path} was exported from another model than these flags build: {listed}")
    return session


def get_parser() -> argparse.ArgumentParser:
    """main.py's flags plus the benchmark's own."""
    parser = cli_parser("Deformable DETR inference benchmark", redefines=True)
    parser.add_argument("--batch_sizes", default=[1, 4], type=int, nargs="+")
    parser.add_argument("--num_iters", default=20, type=int, help="timed forward passes per configuration and round")
    parser.add_argument("--warmup", default=3, type=int, help="untimed forward passes of each configuration first")
    parser.add_argument("--rounds", default=1, type=int, help="rounds of timed passes over all configurations")
    parser.add_argument("--image_size", default=None, type=int, nargs=2, metavar=("H", "W"),
                        help=f"input size (default {GPU_IMAGE_SIZE[0]} {GPU_IMAGE_SIZE[1]} on CUDA, "
                             f"{CPU_IMAGE_SIZE[0]} {CPU_IMAGE_SIZE[1]} on CPU)")
    parser.add_argument("--onnx", default="", help="also time this exported model (tools/export_onnx.py, "
                                                   "--dynamic or for --image_size) with ONNX Runtime")
    parser.add_argument("--compare_backends", action="store_true",
                        help="also time the pure-PyTorch sampling core (MSDA_BACKEND=pytorch) beside the compiled op")
    parser.add_argument("--torch_compile", action="store_true",
                        help="also time the model under torch.compile (inductor) for every batch size and amp mode")
    parser.add_argument("--profile", action="store_true",
                        help="then profile each configuration and print its five most expensive operators")
    # Several modes here, side by side, where main.py takes one.
    parser.add_argument("--amp", default=["none"], nargs="+", choices=tuple(AMP_DTYPES), help="mixed-precision modes")
    parser.set_defaults(backbone_weights="none", device="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        results, costs, notes = benchmark(args)
    except InputError as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2
    variant = "two-stage" if args.two_stage else "box refinement" if args.with_box_refine else "plain"
    height, width = args.image_size or (GPU_IMAGE_SIZE if args.device.startswith("cuda") else CPU_IMAGE_SIZE)
    print(f"Deformable DETR ({variant}, {args.backbone}, {args.num_feature_levels} levels), {height}x{width}, "
          f"device {args.device}, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.num_iters} timed "
          f"passes after {args.warmup} warm-up; medians over the rounds")
    first = {}
    for (batch, amp, backend), fps in results.items():
        first.setdefault(batch, fps)
        # the original's computation, where timed: the float32 pure-PyTorch core
        original = results.get((batch, "none", "pytorch"))
        versus = f"  vs float32 pytorch {fps / original:.2f}x" if original else ""
        print(f"batch {batch}: {fps:.2f} images/s ({1000 * batch / fps:.1f} ms per batch)  amp {amp:4s}  "
              f"sampling {backend:8s}{versus}  speed vs first {fps / first[batch]:.2f}x")
    for (batch, amp, backend), line in notes.items():
        print(f"batch {batch}, amp {amp}, {backend}: {line}")
    for (batch, amp, backend), line in costs.items():
        print(f"top operators, batch {batch}, amp {amp}, sampling {backend}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
