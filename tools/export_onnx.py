"""Export a Deformable DETR checkpoint to ONNX for inference.

    python tools/export_onnx.py --resume CKPT --out model.onnx
        [--opset 18] [--dynamic] [--with_postprocess] [--custom_op] [--image_size H W] [--class_names JSON]
    python tools/export_onnx.py [main.py flags of the variant] --random_weights --out model.onnx [...]

The model is built from the checkpoint's own training arguments (``checkpoint['args']``), as
``tools/infer.py`` builds it, so every variant exports as trained without repeating its flags.
``main.py`` flags given on the command line must agree with the checkpoint: an architecture flag
that contradicts it is refused, naming the ``configs/`` script the checkpoint fits; others (such
as ``--val_scale``) replace the checkpoint's value. A checkpoint without saved arguments is built
from the command line's flags alone, with a warning. Exporting a model of random weights, for
speed measurements, takes ``--random_weights`` instead of ``--resume``.

The graph takes ``images`` ``(B, 3, H, W)``, normalised as in evaluation (ImageNet mean and
standard deviation, zero-padded at the bottom and right), and ``mask`` ``(B, H, W)`` bool, True on
padding; it returns ``pred_logits`` ``(B, queries, classes)`` and ``pred_boxes`` ``(B, queries, 4)``
(relative ``cx, cy, w, h``). With ``--with_postprocess`` it also takes ``orig_sizes`` ``(B, 2)``
(``h, w`` of the original images) and returns instead the top-100 ``scores``, ``labels`` and
``boxes`` (``x0, y0, x1, y1`` in pixels of the original images), as evaluation's post-processing.

The deformable sampling becomes standard ONNX operators (one ``GridSample`` per level, opset >= 16;
see :mod:`ops.onnx`), so any ONNX runtime runs the file; ``--custom_op`` writes it instead as one
``MultiscaleDeformableAttnPlugin_TRT`` node per attention layer for TensorRT, which ONNX Runtime
cannot run. ``--dynamic`` makes the batch size (1 to 64), height and width (32 to 4096) dynamic;
otherwise the graph is for one image of ``--image_size``, and smaller images go in padded. The
model is traced with the compiled op (``ops._C`` must be built). The exported model is float32.

The file's metadata (``metadata_props``) records what inference needs besides the graph
(:func:`metadata`): the architecture flags, the evaluation sizes ``val_scale`` and ``max_size``,
the class names where known (``--class_names``, else the checkpoint's ``<stem>.names.json``
beside it), the opset, whether the graph is dynamic, the traced size and where the weights came
from. The file is written only once the export succeeded, and whole (through a temporary file).
"""
import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from ops import _extension  # noqa: E402
from tools.infer import class_names_from, sidecar_names  # noqa: E402
from util.checkpoint import checkpoint_weights, load_checkpoint, load_weights  # noqa: E402
from util.errors import InputError, InputValueError  # noqa: E402
from util.flags import (  # noqa: E402
    ARCHITECTURE_FLAGS,
    check_checkpoint_args,
    check_model_flags,
    cli_parser,
    error_message,
    get_args_parser,
)
from util.misc import NestedTensor  # noqa: E402

IMAGE_INPUTS = ["images", "mask"]
RAW_OUTPUTS = ["pred_logits", "pred_boxes"]
# The dynamo exporter's own opset; GridSample needs 16, and older opsets are not written.
MIN_OPSET = 18
POSTPROCESSED_OUTPUTS = ["scores", "labels", "boxes"]
# Saved training arguments that describe the training run, not the model: never taken over.
# Flags of the run that wrote a checkpoint, not of the model it holds: --ema says which weights to take here.
RUN_ONLY = ("resume", "device", "backbone_weights", "ema")


class ExportedDetector(nn.Module):
    """The detector on plain tensors, with or without the post-processing (see the module docstring)."""

    def __init__(self, model: nn.Module, postprocess: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.postprocess = postprocess

    def forward(self, images: Tensor, mask: Tensor, orig_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        outputs = self.model(NestedTensor(images, mask))
        if self.postprocess is None:
            return outputs["pred_logits"], outputs["pred_boxes"]
        return self.postprocess.batched(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes)


def example_inputs(height: int, width: int, batch: int = 1, with_sizes: bool = False) -> tuple[Tensor, ...]:
    """Random normalised images of ``height`` x ``width``, no padding, and their sizes."""
    images = torch.randn(batch, 3, height, width)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
    return (images, mask, sizes) if with_sizes else (images, mask)


def resolve_args(parser: argparse.ArgumentParser,
                 argv: Sequence[str]) -> tuple[argparse.Namespace, Mapping[str, Tensor] | None]:
    """The export's flags and the weights to export (None: random weights).

    With a checkpoint that saved its training arguments, every ``main.py`` flag not given in
    ``argv`` takes the checkpoint's value, and the architecture flags that are given must agree
    with it (:func:`util.flags.check_checkpoint_args`).
    """
    args = parser.parse_args(argv)
    if args.resume and args.random_weights:
        raise InputValueError(f"--resume {args.resume} and --random_weights: pass one, the weights to export")
    if not args.resume:
        if not args.random_weights:
            raise InputValueError("no weights to export: pass --resume CHECKPOINT, or --random_weights to export "
                                  "the flags' model with random weights")
        return args, None
    checkpoint = load_checkpoint(args.resume)
    saved = checkpoint.get("args")
    if isinstance(saved, argparse.Namespace):
        main_flags = vars(get_args_parser().parse_args([]))
        taken = {k: v for k, v in vars(saved).items() if k in main_flags and k not in RUN_ONLY}
        # parse_args fills in a default only where the namespace has no value yet, so the flags
        # given on the command line replace the checkpoint's and the others keep it.
        args = parser.parse_args(argv, namespace=argparse.Namespace(**taken))
        check_checkpoint_args(checkpoint, args, args.resume)
    else:
        print(f"warning: {args.resume} records no training arguments ('args'); the model is built from the command "
              f"line's flags, which only the weights' names and shapes check", file=sys.stderr)
    args.backbone_weights = "none"  # the checkpoint holds the backbone's weights
    return args, checkpoint_weights(checkpoint, args.resume, args.ema)


def export(args: argparse.Namespace, weights: Mapping[str, Tensor] | None) -> torch.onnx.ONNXProgram:
    """The ONNX program of ``args``' model with ``weights`` (random ones for None), see the module
    docstring."""
    reason = _extension.unavailable_reason("cpu")
    if reason is not None:
        raise InputValueError(f"export traces the compiled op, but {reason}")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= args.opset <= newest:
        raise InputValueError(f"--opset {args.opset}: the exporter writes opsets {MIN_OPSET} to {newest} (the "
                              f"installed onnx's newest)")
    if min(args.image_size) < 1:
        raise InputValueError(f"--image_size {' '.join(map(str, args.image_size))} must be positive")
    # torch.export fixes a dimension of size 1 into the graph, so a dynamic graph traced where the
    # smallest feature map is one pixel high or wide would take that size only.
    stride = (16 if args.dilation else 32) * 2 ** max(args.num_feature_levels - 3, 0)
    if args.dynamic and min(args.image_size) <= stride:
        raise InputValueError(f"--dynamic --image_size {' '.join(map(str, args.image_size))}: trace at more than "
                              f"{stride} pixels a side (the smallest feature map's stride), so that its size is not "
                              f"fixed to 1")
    from ops.onnx import DECOMPOSED, TENSORRT_PLUGIN

    args.device = "cpu"
    model, _, postprocessors = build_model(args)
    if weights is not None:
        load_weights(model, weights, args.resume)
    detector = ExportedDetector(model, postprocessors["bbox"] if args.with_postprocess else None).eval()
    # A batch of 2 to trace a dynamic batch size: torch.export takes a size of 1 for a constant.
    inputs = example_inputs(*args.image_size, batch=2 if args.dynamic else 1, with_sizes=args.with_postprocess)
    dynamic_shapes = None
    if args.dynamic:
        batch = torch.export.Dim("batch", min=1, max=64)
        height, width = torch.export.Dim("height", min=32, max=4096), torch.export.Dim("width", min=32, max=4096)
        dynamic_shapes = [{0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width}]
        if args.with_postprocess:
            dynamic_shapes.append({0: batch})
    names = POSTPROCESSED_OUTPUTS if args.with_postprocess else RAW_OUTPUTS
    with torch.no_grad():
        return torch.onnx.export(
            detector, inputs, dynamo=True, opset_version=args.opset, dynamic_shapes=dynamic_shapes, verbose=False,
            input_names=IMAGE_INPUTS + (["orig_sizes"] if args.with_postprocess else []), output_names=names,
            custom_translation_table=TENSORRT_PLUGIN if args.custom_op else DECOMPOSED)


def metadata(args: argparse.Namespace, names: Mapping[int, str]) -> dict[str, str]:
    """The ONNX file's ``metadata_props``: strings, JSON where the value is not a plain number."""
    recorded = {"model_args": json.dumps({flag: getattr(args, flag) for flag in ARCHITECTURE_FLAGS}),
                "val_scale": str(args.val_scale), "max_size": str(args.max_size), "opset": str(args.opset),
                "dynamic": json.dumps(args.dynamic), "image_size": json.dumps(list(args.image_size)),
                "weights": Path(args.resume).name if args.resume else "random"}
    if names:
        recorded["class_names"] = json.dumps({str(label): name for label, name in sorted(names.items())})
    return recorded


def save(program: torch.onnx.ONNXProgram, out: Path) -> None:
    """Write ``program`` as one file, whole or not at all: to a temporary file beside ``out``,
    renamed onto it once complete."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # One file: weights in a separate data file would be named after the temporary file.
        program.save(str(tmp), external_data=False)
        os.replace(tmp, out)
    except OSError as err:
        raise InputValueError(f"cannot write --out {out}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def get_parser() -> argparse.ArgumentParser:
    parser = cli_parser("Export Deformable DETR to ONNX")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--random_weights", action="store_true",
                        help="export the flags' model with random weights (no --resume), e.g. to measure speed")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset ({MIN_OPSET} or later)")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch size, height and width")
    parser.add_argument("--with_postprocess", action="store_true",
                        help="end in the top-100 scores, labels and boxes in pixels of orig_sizes")
    parser.add_argument("--custom_op", action="store_true",
                        help="the sampling as one TensorRT MultiscaleDeformableAttnPlugin_TRT node per attention "
                             "layer; ONNX Runtime cannot run such a file, and its numbers are not verified")
    parser.add_argument("--image_size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"),
                        help="the size traced (and, without --dynamic, the largest size the graph takes: smaller "
                             "images are padded)")
    parser.add_argument("--class_names", default=None,
                        help="class names to record in the file: a JSON file or inline JSON (a list indexed by "
                             "label, an {id: name} object or a COCO annotation file); default: the checkpoint's "
                             "<stem>.names.json beside it, if any")
    parser.set_defaults(backbone_weights="none")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_parser()
    try:
        args, weights = resolve_args(parser, argv)
        if args.out.is_dir():
            raise InputValueError(f"--out {args.out} is a folder; name the .onnx file to write")
        check_model_flags(args)
        names = class_names_from(None, args.class_names) if args.class_names else sidecar_names(args.resume)
        program = export(args, weights)
        written = program.model.opset_imports.get("")
        if written != args.opset:
            raise InputValueError(f"--opset {args.opset}: the exporter could not convert the graph, and wrote opset "
                                  f"{written}; pass another")
        program.model.metadata_props.update(metadata(args, names))
        save(program, args.out)
    except InputError as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
