"""Export a Deformable DETR model to ONNX for inference.

    python tools/export_onnx.py [main.py flags of the variant] --resume CKPT --out model.onnx
        [--opset 18] [--dynamic] [--with_postprocess] [--custom_op] [--image_size H W]

The graph takes ``images`` ``(B, 3, H, W)``, normalised as in evaluation (ImageNet mean and
standard deviation, zero-padded at the bottom and right), and ``mask`` ``(B, H, W)`` bool, True on
padding; it returns ``pred_logits`` ``(B, queries, classes)`` and ``pred_boxes`` ``(B, queries, 4)``
(relative ``cx, cy, w, h``). With ``--with_postprocess`` it also takes ``orig_sizes`` ``(B, 2)``
(``h, w`` of the original images) and returns instead the top-100 ``scores``, ``labels`` and
``boxes`` (``x0, y0, x1, y1`` in pixels of the original images), as evaluation's post-processing.

The deformable sampling becomes standard ONNX operators (one ``GridSample`` per level, opset >= 16;
see :mod:`ops.onnx`), so any ONNX runtime runs the file; ``--custom_op`` writes it instead as one
``MultiscaleDeformableAttnPlugin_TRT`` node for TensorRT (not run here). ``--dynamic`` makes the
batch size (1 to 64), height and width (32 to 4096) dynamic; otherwise the graph is for one image of
``--image_size`` alone. The model
is traced with the compiled op (``ops._C`` must be built). The exported model is float32.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from ops import _extension  # noqa: E402
from util.checkpoint import load_checkpoint, load_weights  # noqa: E402
from util.errors import InputError, InputValueError  # noqa: E402
from util.flags import cli_parser  # noqa: E402
from util.misc import NestedTensor  # noqa: E402

IMAGE_INPUTS = ["images", "mask"]
RAW_OUTPUTS = ["pred_logits", "pred_boxes"]
POSTPROCESSED_OUTPUTS = ["scores", "labels", "boxes"]


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


def export(args: argparse.Namespace) -> torch.onnx.ONNXProgram:
    """The ONNX program of ``args``' model (see the module docstring)."""
    reason = _extension.unavailable_reason("cpu")
    if reason is not None:
        raise InputValueError(f"export traces the compiled op, but {reason}")
    if args.opset < 16:
        raise InputValueError(f"--opset {args.opset}: GridSample needs opset 16 or later")
    from ops.onnx import DECOMPOSED, TENSORRT_PLUGIN

    args.device = "cpu"
    model, _, postprocessors = build_model(args)
    if args.resume:
        load_weights(model, load_checkpoint(args.resume)["model"], args.resume)
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


def get_parser() -> argparse.ArgumentParser:
    parser = cli_parser("Export Deformable DETR to ONNX")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (16 or later, for GridSample)")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch size, height and width")
    parser.add_argument("--with_postprocess", action="store_true",
                        help="end in the top-100 scores, labels and boxes in pixels of orig_sizes")
    parser.add_argument("--custom_op", action="store_true",
                        help="the sampling as one TensorRT MultiscaleDeformableAttnPlugin_TRT node (not tested)")
    parser.add_argument("--image_size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"),
                        help="the size traced (and, without --dynamic, the only size of the graph)")
    parser.set_defaults(backbone_weights="none")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        program = export(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
