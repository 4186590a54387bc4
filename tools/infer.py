"""Run a trained Deformable DETR checkpoint on images: print the detections and draw them.

Usage::

    python tools/infer.py --resume exps/run/checkpoint.pth IMAGE_OR_FOLDER [...]
        [--threshold 0.5] [--top_k 100] [--device cpu|cuda] [--out_dir detections]
        [--coco_path data/shapes | --class_names names.json] [--show_sampling_points]
    python tools/infer.py --onnx model.onnx IMAGE_OR_FOLDER [...]

The model is rebuilt from the checkpoint's own training arguments (``checkpoint['args']``), so
every variant (single/multi-scale, box refinement, two-stage) loads as trained, and each image is
resized as that training's evaluation did (its ``--val_scale`` / ``--max_size``, or the original's
800 / 1333 for checkpoints without them, such as the original's own); ``--val_scale`` and
``--max_size`` given here replace them. A folder contributes its image files (not recursively).

With ``--onnx`` the model is a file written by ``tools/export_onnx.py``, run by ONNX Runtime, so
neither this repository's model code nor the compiled op is needed. The evaluation sizes and the
class names come from the file's metadata, where the export recorded them (800 / 1333 and numeric
labels for a file without). A graph exported without ``--dynamic`` is for one size: a smaller
resized image is padded up to it (zeros, marked in the mask, as in a batch with a larger image), a
larger one is refused before anything is written. The model's outputs depend on the padding (the
backbone's convolutions and the deformable sampling near the right and bottom edges see it), so
such a graph's detections are the checkpoint's on the padded image, not on the image alone; a
``--dynamic`` graph gives the latter.

For each image it prints a header line and one line per detection whose score exceeds
``--threshold`` (best first, at most ``--top_k``)::

    <class name> <score> <x0> <y0> <x1> <y1>

in original-image pixels, and writes ``<out_dir>/<image stem>_det.png``: the image with the
boxes and labels drawn. Class names come from ``--coco_path``'s annotation categories, or from
``--class_names`` (a JSON file or inline JSON: a list indexed by label, an ``{id: name}`` object,
or a COCO annotation file), else from the ONNX file's metadata or the checkpoint's
``<stem>.names.json`` beside it (as ``tools/convert_checkpoint.py`` writes), else the numeric
label is printed; whitespace in names is printed as ``_`` so every line splits into six fields.

With ``--show_sampling_points``, the ``--num_sampling_dets`` best detections also get the
sampling locations of their query in the last decoder layer's cross-attention (every head, level
and point), as dots coloured from dark blue (low) to yellow (high) by attention weight relative
to that query's largest one. They are caught by a forward hook on that ``MSDeformAttn`` which
recomputes them from its inputs exactly as its forward does (:class:`SamplingRecorder`); being
normalised over the padded input, which for one image is the resized image, they are mapped to
original-image pixels as ``location * resized size / resize scale``.
"""
import argparse
import inspect
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.transforms import get_size_with_aspect_ratio, make_coco_transforms  # noqa: E402
from engine import AMP_DTYPES, forward  # noqa: E402
from models import build_model  # noqa: E402
from util.checkpoint import checkpoint_weights, load_checkpoint, load_weights  # noqa: E402
from util.errors import InputError, InputFileNotFoundError, InputValueError  # noqa: E402
from util.flags import get_args_parser  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402
from util.visualize import Detection, draw_detections, select_detections  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PathLike = str | Path


def load_model(checkpoint_path: PathLike, device: str | torch.device,
               ema: bool = False) -> tuple[nn.Module, argparse.Namespace]:
    """The model of a ``main.py`` checkpoint, rebuilt from its saved ``args``, in eval mode on ``device``,
    with the averaged weights of a run with ``--ema`` when ``ema``.

    ``args`` is completed with this ``main.py``'s defaults for flags the checkpoint predates
    (checkpoints of the original lack ``--val_scale`` and ``--max_size``, and get its 800 and
    1333); the backbone is built without ImageNet weights since the checkpoint holds its own.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    saved = checkpoint.get("args")
    if not isinstance(saved, argparse.Namespace):
        raise InputValueError(f"{checkpoint_path} has no 'args' entry (argparse.Namespace) to rebuild the "
                              f"model from; keys: {sorted(checkpoint)}")
    args = get_args_parser().parse_args([])
    vars(args).update(vars(saved))
    args.backbone_weights = "none"
    args.device = str(device)
    model, _, _ = build_model(args)
    load_weights(model, checkpoint_weights(checkpoint, checkpoint_path, ema),
                 f"{checkpoint_path} (rebuilt from its own args)")
    return model.to(device).eval(), args


def class_names_from(coco_path: str | None, class_names: str | None) -> dict[int, str]:
    """Label -> name from a COCO directory's annotation categories or a ``--class_names`` JSON
    (see the module docstring); empty when neither is given."""
    if coco_path:
        candidates = [Path(coco_path) / "annotations" / f"instances_{split}2017.json" for split in ("val", "train")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise InputFileNotFoundError(f"--coco_path {coco_path}: neither {candidates[0]} nor {candidates[1]} exists")
        with open(found[0]) as f:
            return _names_from_json(json.load(f), str(found[0]))
    if class_names:
        if Path(class_names).is_file():
            with open(class_names) as f:
                return _names_from_json(json.load(f), class_names)
        try:
            return _names_from_json(json.loads(class_names), "--class_names")
        except json.JSONDecodeError:
            raise InputValueError(f"--class_names {class_names!r} is neither a file nor valid JSON") from None
    return {}


def sidecar_names(checkpoint_path: PathLike | None) -> dict[int, str]:
    """Label -> name from ``<stem>.names.json`` beside a checkpoint (see ``tools/convert_checkpoint.py``);
    empty when there is none."""
    sidecar = Path(checkpoint_path).with_suffix(".names.json") if checkpoint_path else None
    return class_names_from(None, str(sidecar)) if sidecar is not None and sidecar.is_file() else {}


def _names_from_json(data: Any, source: str) -> dict[int, str]:
    if isinstance(data, dict) and "categories" in data:
        try:
            return {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError):
            raise InputValueError(f"{source}: every entry of 'categories' needs an integer 'id' and a 'name'") from None
    if isinstance(data, list):
        return {i: str(name) for i, name in enumerate(data)}
    if isinstance(data, dict):
        try:
            return {int(k): str(v) for k, v in data.items()}
        except ValueError:
            raise InputValueError(f"{source}: class-name keys must be integer labels, got {sorted(data)[:5]}") from None
    raise InputValueError(f"{source}: expected a list of names, an {{id: name}} object or a COCO annotation "
                          f"file, got {type(data).__name__}")


def image_paths(inputs: Sequence[PathLike]) -> list[Path]:
    """The given image files, and the image files directly inside the given folders (sorted)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise InputFileNotFoundError(f"folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise InputFileNotFoundError(f"no image or folder at {item}")
    return paths


class SamplingRecorder:
    """Forward hook on an ``MSDeformAttn`` keeping the last call's sampling locations and
    attention weights (see ``MSDeformAttn.sampling_locations_and_weights``). Use as a context manager."""

    def __init__(self, attn: nn.Module):
        self.attn = attn
        self.locations: Tensor | None = None
        self.weights: Tensor | None = None
        self._signature = inspect.signature(attn.forward)
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        inputs = self._signature.bind(*args, **kwargs).arguments
        self.locations, self.weights = module.sampling_locations_and_weights(
            inputs["query"], inputs["reference_points"], inputs["input_spatial_shapes"])

    def __enter__(self) -> "SamplingRecorder":
        self._handle = self.attn.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


class OnnxDetector:
    """A model exported by tools/export_onnx.py, run by ONNX Runtime on one image at a time, with
    what its metadata records."""

    def __init__(self, path: PathLike):
        import onnxruntime

        if not Path(path).is_file():
            raise InputFileNotFoundError(f"--onnx {path}: no such file")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # its errors reach the user as this tool's one line, not in its own log
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own error types for files it cannot take
            raise InputValueError(f"--onnx {path} is not an ONNX model ONNX Runtime can run: {err}") from None
        self.path = path
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        shape = self.session.get_inputs()[0].shape[2:]
        # the graph's only image size, or None for a dynamic graph (symbolic dimensions are strings)
        self.size = tuple(shape) if all(isinstance(d, int) for d in shape) else None

    def recorded_size(self, key: str, default: int) -> int:
        """The evaluation size ``key`` (``val_scale`` or ``max_size``) the export recorded, else ``default``."""
        value = self.metadata.get(key)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise InputValueError(f"--onnx {self.path}: its metadata {key} {value!r} is not an integer") from None

    def recorded_names(self) -> dict[int, str]:
        """The class names the export recorded; empty when none."""
        value = self.metadata.get("class_names")
        if value is None:
            return {}
        try:
            return _names_from_json(json.loads(value), f"--onnx {self.path}'s metadata class_names")
        except json.JSONDecodeError:
            raise InputValueError(f"--onnx {self.path}: its metadata class_names is not JSON") from None

    def check_fits(self, height: int, width: int, image: PathLike, sizes: argparse.Namespace) -> None:
        """A graph for one size takes an image of at most that size after resizing (it is padded)."""
        if self.size is not None and (height > self.size[0] or width > self.size[1]):
            raise InputValueError(
                f"--onnx {self.path} is a graph for images of at most {self.size[0]}x{self.size[1]} (exported "
                f"without --dynamic), but {image} is {height}x{width} after resizing to --val_scale "
                f"{sizes.val_scale} / --max_size {sizes.max_size}; export with --dynamic or a larger --image_size")

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, feed)
        except Exception as err:  # onnxruntime's own error types
            height, width = feed["images"].shape[-2:]
            raise InputValueError(f"--onnx {self.path} failed on an image of {height}x{width}: "
                                  f"{str(err).strip().splitlines()[0]}") from None

    def detect(self, tensor: Tensor, orig_size: tuple[int, int], threshold: float, top_k: int) -> list[Detection]:
        """Detections in one resized image, which must fit the graph (:meth:`check_fits`)."""
        height, width = tensor.shape[-2:]
        padded = self.size or (height, width)
        images = np.zeros((1, 3, *padded), dtype=np.float32)
        images[0, :, :height, :width] = tensor.numpy()
        mask = np.ones((1, *padded), dtype=bool)
        mask[0, :height, :width] = False
        feed = {"images": images, "mask": mask}
        if "orig_sizes" in self.inputs:  # exported with --with_postprocess
            feed["orig_sizes"] = np.array([orig_size], dtype=np.int64)
            scores, labels, boxes = (torch.from_numpy(a[0]) for a in self._run(feed))
            keep = (scores > threshold).nonzero().flatten()[:top_k]
            return [Detection(-1, int(labels[i]), float(scores[i]), tuple(float(v) for v in boxes[i])) for i in keep]
        logits, boxes = self._run(feed)
        return select_detections({"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)},
                                 orig_size, threshold, top_k)


def resized_size(path: Path, sizes: argparse.Namespace) -> tuple[int, int]:
    """``(h, w)`` of an image after evaluation's resize to ``sizes.val_scale`` / ``sizes.max_size``,
    from its header alone."""
    try:
        with Image.open(path) as image:
            return get_size_with_aspect_ratio(image.size, sizes.val_scale, sizes.max_size)
    except OSError as e:
        raise InputValueError(f"cannot read image {path}: {e}") from None


def infer_image(model: nn.Module, args: argparse.Namespace, path: Path, device: torch.device, threshold: float,
                top_k: int, num_sampling_dets: int = 0,
                amp: torch.dtype | None = None) -> tuple[Image.Image, list[Detection], list[tuple[Tensor, Tensor]]]:
    """Detect in one image (with ``amp``, under autocast: see :func:`engine.forward`). Returns the
    image, its detections and, for the first
    ``num_sampling_dets`` of them, the last decoder layer's sampling points of their query:
    ``xy (N, 2)`` in original-image pixels (points outside the image included; they sample
    zeros) and their attention weights ``(N,)``, ``N = heads * levels * points``."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise InputValueError(f"cannot read image {path}: {e}") from None
    transform = make_coco_transforms("val", max_size=args.max_size, val_size=args.val_scale)
    tensor, _ = transform(image, None)
    orig_w, orig_h = image.size
    if isinstance(model, OnnxDetector):
        return image, model.detect(tensor, (orig_h, orig_w), threshold, top_k), []
    with SamplingRecorder(model.transformer.decoder.layers[-1].cross_attn) as recorder, torch.no_grad():
        outputs = forward(model, nested_tensor_from_tensor_list([tensor.to(device)]), amp)
    detections = select_detections(outputs, (orig_h, orig_w), threshold, top_k)

    points = []
    if num_sampling_dets > 0:
        # Locations are normalised over the padded input, which for a single image is the
        # resized image itself: location * padded size is a resized-image pixel, and dividing
        # by the resize scale (resized / original size) gives an original-image pixel.
        padded_h, padded_w = tensor.shape[-2:]
        scale = torch.tensor([padded_w / orig_w, padded_h / orig_h])
        to_pixels = torch.tensor([padded_w, padded_h]) / scale
        for det in detections[:num_sampling_dets]:
            points.append((recorder.locations[0, det.query].reshape(-1, 2).cpu() * to_pixels,
                           recorder.weights[0, det.query].reshape(-1).cpu()))
    return image, detections, points


def main(argv: list[str] | None = None) -> int:
    """Run :func:`infer` on the command line; bad input is one ``error:`` line and status 2."""
    try:
        infer(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def infer(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("Deformable DETR inference on images")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--resume", help="checkpoint written by main.py")
    model_source.add_argument("--onnx", help="a model exported by tools/export_onnx.py, run with ONNX Runtime "
                                             "(no model code or op needed; no --show_sampling_points)")
    parser.add_argument("--val_scale", default=None, type=int,
                        help="the short side the images are resized to (default: the training's, from the "
                             "checkpoint or the ONNX file's metadata, else 800)")
    parser.add_argument("--max_size", default=None, type=int,
                        help="the longest side after resizing (default: the training's, else 1333)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threshold", default=0.5, type=float, help="print and draw scores above this")
    parser.add_argument("--top_k", default=100, type=int, help="at most this many detections per image")
    parser.add_argument("--out_dir", default="detections", help="where <image stem>_det.png are written")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--coco_path", default=None, help="COCO-layout dataset whose categories name the labels")
    names.add_argument("--class_names", default=None,
                        help="JSON file or inline JSON: a list indexed by label, an {id: name} object "
                             "or a COCO annotation file")
    parser.add_argument("--show_sampling_points", action="store_true",
                        help="also draw the last decoder layer's sampling points of the best detections")
    parser.add_argument("--num_sampling_dets", default=3, type=int,
                        help="with --show_sampling_points: how many of the best detections get their points")
    parser.add_argument("--draw_scale", default=1.0, type=float,
                        help="draw on the image enlarged by this factor (for small images)")
    parser.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES),
                        help="run the model under autocast to bfloat16 or float16 (see main.py --amp)")
    parser.add_argument("--ema", action="store_true",
                        help="take the checkpoint's averaged weights (of a run with main.py --ema)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}")
    if not 0 < args.draw_scale < math.inf:
        parser.error(f"--draw_scale must be a positive number, got {args.draw_scale}")
    if not math.isfinite(args.threshold):
        parser.error(f"--threshold must be a number, got {args.threshold}")
    for flag in ("val_scale", "max_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.num_sampling_dets < 0:
        parser.error(f"--num_sampling_dets must be >= 0, got {args.num_sampling_dets}")
    if args.onnx and args.show_sampling_points:
        parser.error("--show_sampling_points needs the PyTorch model (--resume), not --onnx")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but no CUDA device is visible; pass --device cpu")

    names = class_names_from(args.coco_path, args.class_names)
    paths = image_paths(args.inputs)
    if args.onnx:
        model = OnnxDetector(args.onnx)
        train_args = argparse.Namespace(val_scale=model.recorded_size("val_scale", 800),
                                        max_size=model.recorded_size("max_size", 1333))
        names = names or model.recorded_names()
    else:
        model, train_args = load_model(args.resume, device, args.ema)
        names = names or sidecar_names(args.resume)
    for flag in ("val_scale", "max_size"):
        if getattr(args, flag) is not None:
            setattr(train_args, flag, getattr(args, flag))
    if args.onnx:  # every image must fit a graph for one size before any is drawn
        for path in paths:
            model.check_fits(*resized_size(path, train_args), path, train_args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_sampling_dets = args.num_sampling_dets if args.show_sampling_points else 0
    for path in paths:
        image, detections, points = infer_image(model, train_args, path, device, args.threshold, args.top_k,
                                                num_sampling_dets, AMP_DTYPES[args.amp])
        out = out_dir / f"{path.stem}_det.png"
        draw_detections(image, detections, names, points if args.show_sampling_points else None,
                        args.draw_scale).save(out)
        print(f"# {path}: {len(detections)} detections above {args.threshold} -> {out}")
        if args.show_sampling_points and num_sampling_dets and not detections:
            print(f"# {path}: no sampling points drawn, since no detection scores above --threshold {args.threshold}")
        for det in detections:
            name = "_".join(str(names.get(det.label, det.label)).split())
            print(f"{name} {det.score:.3f} " + " ".join(f"{v:.1f}" for v in det.box))


if __name__ == "__main__":
    sys.exit(main())
