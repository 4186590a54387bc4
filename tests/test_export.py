"""tools/export_onnx.py: every variant exported from its checkpoint and run by ONNX Runtime, against
the PyTorch model on images of sizes it was not traced with; flags that contradict the checkpoint
and exports without weights refused; the metadata the file records and tools/infer.py --onnx reads;
a static graph padding smaller images; the post-processing in the graph; the TensorRT-plugin form."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.transforms import make_coco_transforms
from models import build_model
from tools import export_onnx
from util.flags import ARCHITECTURE_FLAGS, VARIANTS, get_args_parser
from util.misc import NestedTensor, nested_tensor_from_tensor_list

from helpers import MULTI_SCALE, NUM_CLASSES, SMALL_MODEL, TWO_STAGE, VARIANT_FLAGS, needs_extension

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # the export's functions (ops/onnx.py)
ort = pytest.importorskip("onnxruntime")
pytestmark = needs_extension

# SMALL_MODEL without the run flags, on a ResNet of one block per stage: the export's time goes
# into tracing and optimising the graph, and the backbone is the part of it whose depth adds
# nothing to what is checked.
MODEL = [{"resnet18": "resnet10"}.get(f, f) for f in SMALL_MODEL if f not in ("--device", "cpu", "--num_workers", "0")]
DC5 = "r50_deformable_detr_single_scale_dc5"
# Evaluation sizes of the checkpoints below: a 96x128 image keeps its size.
SIZES = ["--val_scale", "96", "--max_size", "128"]
NAMES = {str(label): f"class {label}" for label in range(NUM_CLASSES)}


def tiny_flags(variant: str, *extra: str) -> list[str]:
    flags = MODEL + VARIANT_FLAGS[variant] + list(extra)
    return flags + ["--backbone", "resnet50"] if "--dilation" in flags else flags  # DC5 needs a bottleneck ResNet


def tiny_checkpoint(folder: Path, variant: str, *extra: str):
    """(checkpoint, the PyTorch model, its post-processing) of a tiny model of ``variant`` with
    weights away from the symmetric initialisation, saved as main.py saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    args = get_args_parser().parse_args(tiny_flags(variant, *extra))
    torch.manual_seed(0)
    model, _, postprocessors = build_model(args)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    torch.save({"model": model.state_dict(), "args": args}, folder / "checkpoint.pth")
    return folder / "checkpoint.pth", model.eval(), postprocessors["bbox"]


def exported(folder: Path, variant: str, *flags: str, checkpoint_flags: tuple[str, ...] = ()):
    """(ONNX file, the PyTorch model with the same weights, its post-processing): a tiny checkpoint
    of ``variant`` exported through the command line from the checkpoint alone, plus ``flags``."""
    checkpoint, model, postprocess = tiny_checkpoint(folder, variant, *checkpoint_flags)
    assert export_onnx.main(["--resume", str(checkpoint), "--out", str(folder / "model.onnx"), *flags]) == 0
    return folder / "model.onnx", model, postprocess


def metadata_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def images(*sizes):
    g = torch.Generator().manual_seed(sum(h * w for h, w in sizes))
    return nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=g) for h, w in sizes])


def assert_same_detections(got, want, score_tol: float = 1e-5, box_tol: float = 1e-2) -> None:
    """The same (label, score, box) triples in both directions, allowing near-equal scores to come
    in either order: every detection of ``got`` matches one of ``want`` and none is left over."""
    scores, labels, boxes = got
    assert len(scores) == len(want["scores"]), (len(scores), len(want["scores"]))
    unmatched = list(range(len(want["scores"])))
    for score, label, box in zip(scores, labels, boxes):
        match = next((j for j in unmatched if want["labels"][j] == label
                      and abs(want["scores"][j] - score) < score_tol
                      and np.abs(np.asarray(want["boxes"][j]) - np.asarray(box)).max() < box_tol), None)
        assert match is not None, (score, label, box)
        unmatched.remove(match)
    assert not unmatched


def save_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
    return path


def infer_lines(argv: list[str], capsys) -> list[str]:
    from tools import infer

    assert infer.main(argv) == 0
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def printed_detections(lines: list[str], names: dict[str, str]):
    """(scores, labels, boxes) of tools/infer.py's detection lines, the names mapped back to labels."""
    labels = {"_".join(name.split()): int(label) for label, name in names.items()}
    fields = [line.split() for line in lines]
    return ([float(f[1]) for f in fields], [labels[f[0]] for f in fields],
            [np.array([float(v) for v in f[2:]]) for f in fields])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_runtime_matches_pytorch_on_untraced_sizes(variant, tmp_path):
    path, model, _ = exported(tmp_path, variant, "--dynamic", "--image_size", "128", "160")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert metadata_of(path)["dynamic"] == "true"
    session = ort.InferenceSession(str(path))
    # two single images of sizes other than the traced one, and a padded batch of two
    for samples in (images((97, 131)), images((161, 223)), images((150, 200), (161, 223))):
        logits, boxes = session.run(None, {"images": samples.tensors.numpy(), "mask": samples.mask.numpy()})
        with torch.no_grad():
            want = model(samples)
        np.testing.assert_allclose(logits, want["pred_logits"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(boxes, want["pred_boxes"].numpy(), rtol=0, atol=1e-4)


def test_dc5_checkpoint_exports_as_trained_without_its_dilation_flag(tmp_path):
    """A DC5 checkpoint exported with --num_feature_levels 1 alone: the model is the trained one,
    dilation included, not the stride-32 model those flags alone describe."""
    path, model, _ = exported(tmp_path, DC5, "--num_feature_levels", "1", "--image_size", "64", "96")
    assert json.loads(metadata_of(path)["model_args"])["dilation"] is True
    samples = images((64, 96))
    logits, boxes = ort.InferenceSession(str(path)).run(None, {"images": samples.tensors.numpy(),
                                                                "mask": samples.mask.numpy()})
    undilated_args = get_args_parser().parse_args(tiny_flags(DC5))
    undilated_args.dilation = False
    undilated, _, _ = build_model(undilated_args)
    undilated.load_state_dict(model.state_dict())  # dilation changes no weight's shape
    with torch.no_grad():
        want, wrong = model(samples), undilated.eval()(samples)
    np.testing.assert_allclose(logits, want["pred_logits"].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(boxes, want["pred_boxes"].numpy(), rtol=0, atol=1e-4)
    # the comparison tells the two models apart
    assert np.abs(logits - wrong["pred_logits"].numpy()).max() > 1e-2


def test_export_refuses_flags_against_the_checkpoint_and_missing_weights(tmp_path, capsys):
    """Each case: one error line naming the problem, status 2, and nothing written. The checks come
    before the weights are read, so the checkpoints hold none."""
    dc5 = tmp_path / "dc5.pth"
    torch.save({"model": {}, "args": get_args_parser().parse_args(tiny_flags(DC5))}, dc5)
    two_stage = tmp_path / "two_stage.pth"
    torch.save({"model": {}, "args": get_args_parser().parse_args(tiny_flags(TWO_STAGE))}, two_stage)
    out = tmp_path / "out" / "model.onnx"
    cases = [
        # 4 is main.py's default: a flag given explicitly is compared, whatever its value
        (["--resume", str(dc5), "--num_feature_levels", "4"],
         f"error: {dc5} was trained with other architecture flags than these: --num_feature_levels (checkpoint: 1, "
         f"here: 4). It fits configs/{DC5}.sh with "),
        (["--resume", str(two_stage), "--num_queries", "300"],
         f"error: {two_stage} was trained with other architecture flags than these: --num_queries (checkpoint: 10, "
         f"here: 300). It fits configs/"),
        (MODEL, "error: no weights to export: pass --resume CHECKPOINT, or --random_weights to export the flags' "
                "model with random weights"),
        (["--resume", str(dc5), "--random_weights"], f"error: --resume {dc5} and --random_weights: pass one"),
        (["--resume", str(tmp_path / "none.pth")], f"error: checkpoint {tmp_path / 'none.pth'} does not exist"),
        (MODEL + ["--random_weights", "--class_names", "cats.json"],
         "error: --class_names 'cats.json' is neither a file nor valid JSON"),
    ]
    for argv, message in cases:
        assert export_onnx.main(["--out", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    # a folder for --out: refused before the export, and the folder left as it was
    (tmp_path / "out").mkdir()
    assert export_onnx.main(MODEL + ["--random_weights", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'out'} is a folder; name the .onnx file to write\n"
    assert not any((tmp_path / "out").iterdir())


def test_a_failed_write_leaves_the_previous_file_or_none(tmp_path):
    class FullDisk:
        """Writes part of the file, then fails as a full disk does."""

        def save(self, destination: str, external_data: bool) -> None:
            Path(destination).write_bytes(b"part of a model")
            raise OSError(28, "No space left on device")

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    with pytest.raises(ValueError, match=f"^cannot write --out {out}: No space left on device$"):
        export_onnx.save(FullDisk(), out)
    assert out.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize("flags, message", [
    (["--opset", "17"], "--opset 17: the exporter writes opsets 18 to "),
    (["--opset", "999"], "--opset 999: the exporter writes opsets 18 to "),
    (["--hidden_dim", "-4"], "--hidden_dim -4 must be at least 1"),
    (["--dropout", "nan"], "--dropout nan must be finite and at least 0 and below 1"),
    (["--num_feature_levels", "2"], "--num_feature_levels must be 1 (the last backbone stage) or at least 3"),
    (["--backbone", "resnet18", "--dilation"], "--dilation (DC5) needs a bottleneck ResNet"),
    (["--image_size", "0", "0"], "--image_size 0 0 must be positive"),
    (["--dynamic", "--image_size", "64", "96"], "--dynamic --image_size 64 96: trace at more than 64 pixels a side"),
])
def test_export_refuses_bad_flags_in_one_line(tmp_path, capsys, flags, message):
    """main.py's checks of the model's flags, and the export's own, before anything is written."""
    assert export_onnx.main(MODEL + ["--random_weights", "--out", str(tmp_path / "m.onnx"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def static_graph(tmp_path_factory):
    """A tiny multi-scale checkpoint trained at evaluation sizes 96 / 128, with class names beside
    it, exported from it alone for 96x128 images (no --dynamic)."""
    folder = tmp_path_factory.mktemp("static")
    (folder / "checkpoint.names.json").write_text(json.dumps(NAMES))
    path, model, postprocess = exported(folder, MULTI_SCALE, "--image_size", "96", "128", checkpoint_flags=SIZES)
    return argparse.Namespace(path=path, checkpoint=folder / "checkpoint.pth", model=model, postprocess=postprocess)


def test_metadata_records_what_inference_needs_and_infer_uses_it(static_graph, tmp_path, capsys):
    saved = torch.load(static_graph.checkpoint, weights_only=False)["args"]
    assert metadata_of(static_graph.path) == {
        "model_args": json.dumps({flag: getattr(saved, flag) for flag in ARCHITECTURE_FLAGS}),
        "val_scale": "96", "max_size": "128", "class_names": json.dumps(NAMES), "opset": "18", "dynamic": "false",
        "image_size": "[96, 128]", "weights": "checkpoint.pth"}
    # infer takes the sizes and the names from the file: no --val_scale, --max_size or --class_names
    # (with 800 / 1333 the image would become 800x1066, too large for the graph)
    image = save_image(tmp_path / "image.png", 96, 128)
    common = [str(image), "--threshold", "0", "--top_k", "8", "--out_dir", str(tmp_path / "out")]
    capsys.readouterr()
    with_onnx = infer_lines(["--onnx", str(static_graph.path), *common], capsys)
    with_checkpoint = infer_lines(["--resume", str(static_graph.checkpoint), *common], capsys)
    assert len(with_onnx) == 8 and with_onnx == with_checkpoint
    assert all(line.split()[0] in {"_".join(n.split()) for n in NAMES.values()} for line in with_onnx)


def test_static_graph_pads_a_smaller_image_and_refuses_a_larger_one(static_graph, tmp_path, capsys):
    # at 96 / 128, 60x100 becomes 77x128 (max_size decides: padded below) and 80x100 becomes 96x120
    # (val_scale decides: padded on the right)
    for seed, (height, width), resized_shape in ((1, (60, 100), (77, 128)), (3, (80, 100), (96, 120))):
        small = save_image(tmp_path / f"small{seed}.png", height, width, seed=seed)
        capsys.readouterr()
        lines = infer_lines(["--onnx", str(static_graph.path), str(small), "--threshold", "0", "--top_k", "8",
                             "--out_dir", str(tmp_path / "out")], capsys)
        # the reference: the PyTorch model on the resized image padded as in a batch with a 96x128 one
        resized, _ = make_coco_transforms("val", max_size=128, val_size=96)(Image.open(small).convert("RGB"), None)
        assert resized.shape[1:] == resized_shape
        padded, mask = torch.zeros(1, 3, 96, 128), torch.ones(1, 96, 128, dtype=torch.bool)
        padded[0, :, :resized_shape[0], :resized_shape[1]] = resized
        mask[0, :resized_shape[0], :resized_shape[1]] = False
        with torch.no_grad():
            outputs = static_graph.model(NestedTensor(padded, mask))
            want = static_graph.postprocess(outputs, torch.tensor([[height, width]]))[0]
        # printed to 3 decimals (scores) and 1 decimal (pixels)
        assert_same_detections(printed_detections(lines, NAMES), {k: v[:8] for k, v in want.items()},
                               score_tol=1e-3, box_tol=0.1)

    # 100x60 becomes 128x77: taller than the graph. Refused before anything is drawn, the fitting
    # image given first included.
    tall = save_image(tmp_path / "tall.png", 100, 60, seed=2)
    from tools import infer

    assert infer.main(["--onnx", str(static_graph.path), str(small), str(tall), "--out_dir",
                       str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"error: --onnx {static_graph.path} is a graph for images of at most 96x128 (exported without --dynamic), "
        f"but {tall} is 128x77 after resizing to --val_scale 96 / --max_size 128; export with --dynamic or a "
        f"larger --image_size\n")
    assert not (tmp_path / "x").exists()
    # --val_scale given here replaces the file's
    assert infer.main(["--onnx", str(static_graph.path), str(tmp_path / "small1.png"), "--val_scale", "200",
                       "--max_size", "400", "--out_dir", str(tmp_path / "x")]) == 2
    assert "is 200x333 after resizing to --val_scale 200 / --max_size 400" in capsys.readouterr().err


def test_benchmark_times_the_exported_graph_of_its_own_flags_only(static_graph, capsys):
    from tools import benchmark

    flags = MODEL + VARIANT_FLAGS[MULTI_SCALE] + ["--device", "cpu", "--image_size", "96", "128", "--batch_sizes", "1",
                                                  "--num_iters", "1", "--warmup", "0", "--onnx", str(static_graph.path)]
    assert benchmark.main(flags) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("batch 1:")]
    assert [r[11] for r in rows] == ["auto", "onnxruntime"] and float(rows[1][2]) > 0
    assert benchmark.main(flags + ["--num_queries", "20", "--with_box_refine"]) == 2
    assert capsys.readouterr().err == (
        f"error: --onnx {static_graph.path} was exported from another model than these flags build: "
        f"--with_box_refine (file: False, here: True), --num_queries (file: 10, here: 20)\n")


def test_postprocessing_static_graph_and_tensorrt_plugin_form(tmp_path, capsys):
    """A graph for one size, ending in the post-processing; the plugin form's nodes."""
    path, model, postprocess = exported(tmp_path, TWO_STAGE, "--with_postprocess", "--image_size", "96", "128",
                                        checkpoint_flags=SIZES)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images", "mask", "orig_sizes"]
    assert [o.name for o in graph.output] == ["scores", "labels", "boxes"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 96, 128]
    assert any(node.op_type == "GridSample" for node in graph.node)
    samples, sizes = images((96, 128)), torch.tensor([[480, 640]])
    got = ort.InferenceSession(str(path)).run(None, {"images": samples.tensors.numpy(), "mask": samples.mask.numpy(),
                                                     "orig_sizes": sizes.numpy()})
    with torch.no_grad():
        want = postprocess(model(samples), sizes)[0]
    assert_same_detections([g[0] for g in got], want)
    # tools/infer.py on that graph prints what it prints with the checkpoint
    image = save_image(tmp_path / "image.png", 96, 128, seed=1)
    common = [str(image), "--threshold", "0", "--top_k", "6", "--out_dir", str(tmp_path / "out")]
    capsys.readouterr()
    with_onnx = infer_lines(["--onnx", str(path), *common], capsys)
    with_checkpoint = infer_lines(["--resume", str(tmp_path / "checkpoint.pth"), *common], capsys)
    assert len(with_onnx) == 6 and with_onnx == with_checkpoint

    plugin = tmp_path / "trt.onnx"
    assert export_onnx.main(MODEL + VARIANT_FLAGS[MULTI_SCALE] + ["--random_weights", "--out", str(plugin),
                                                                  "--image_size", "96", "128", "--custom_op"]) == 0
    assert metadata_of(plugin)["weights"] == "random"
    nodes = [n for n in onnx.load(str(plugin)).graph.node if n.op_type == "MultiscaleDeformableAttnPlugin_TRT"]
    # one per encoder layer and per decoder layer (SMALL_MODEL: 1 + 2), and no GridSample left
    assert len(nodes) == 3 and all(n.domain == "trt.plugins" and len(n.input) == 5 for n in nodes)
    assert not any(n.op_type == "GridSample" for n in onnx.load(str(plugin)).graph.node)


def test_infer_reports_a_failure_of_onnx_runtime_in_one_line(tmp_path, capsys):
    """A graph that ONNX Runtime loads but cannot run on an image (here one that reshapes its input
    to a fixed size) ends in one error line naming the file and the image's size."""
    from onnx import TensorProto, helper

    from tools import infer

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 3, 4096])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["images", "shape"], ["pred_logits"]),
         helper.make_node("Identity", ["pred_logits"], ["pred_boxes"])], "fixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "h", "w"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, "h", "w"])],
        [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, None)], [shape])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    image = tmp_path / "image.png"
    Image.new("RGB", (48, 32)).save(image)
    assert infer.main(["--onnx", str(path), str(image), "--val_scale", "32", "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --onnx {path} failed on an image of 32x48: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("tool, flags, message", [
    ("benchmark", ["--num_queries", "0"], "--num_queries 0 must be at least 1"),
    ("benchmark", ["--image_size", "0", "96"], "--image_size 0 96 must be positive"),
    ("benchmark_train", ["--dropout", "2"], "--dropout 2.0 must be at least 0 and below 1"),
    ("benchmark_train", ["--hidden_dim", "48"], "--hidden_dim 48 must be a multiple of 32"),
])
def test_the_benchmarks_check_main_py_flags_as_main_py_does(capsys, tool, flags, message):
    import importlib

    module = importlib.import_module(f"tools.{tool}")
    size = ["--image_size", "64", "96"] if "--image_size" not in flags else []
    assert module.main(MODEL + ["--device", "cpu", *size, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
