"""tools/export_onnx.py: every variant exported to ONNX and run by ONNX Runtime, against the
PyTorch model on images of sizes it was not traced with; the post-processing in the graph; the
TensorRT-plugin form; tools/infer.py --onnx."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model
from ops import _extension
from tools import export_onnx
from util.flags import VARIANTS
from util.misc import nested_tensor_from_tensor_list

from helpers import MULTI_SCALE, SMALL_MODEL, TWO_STAGE, VARIANT_FLAGS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(_extension.unavailable_reason("cpu") is not None, reason="ops._C is not built")

# SMALL_MODEL without the run flags, on a ResNet of one block per stage: the export's time goes
# into tracing and optimising the graph, and the backbone is the part of it whose depth adds
# nothing to what is checked.
MODEL = [{"resnet18": "resnet10"}.get(f, f) for f in SMALL_MODEL if f not in ("--device", "cpu", "--num_workers", "0")]


def exported(tmp_path, variant: str, *extra: str):
    """(ONNX file, the PyTorch model with the same weights) of a tiny model of ``variant``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    flags = MODEL + VARIANT_FLAGS[variant] + ["--out", str(tmp_path / "model.onnx"), *extra]
    if "--dilation" in flags:  # DC5 needs a bottleneck ResNet
        flags += ["--backbone", "resnet50"]
    args = export_onnx.get_parser().parse_args(flags)
    torch.manual_seed(0)
    model, _, postprocessors = build_model(args)
    with torch.no_grad():
        for parameter in model.parameters():  # away from the symmetric initialisation
            parameter.add_(torch.randn_like(parameter) * 0.02)
    saved = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "out"})  # main.py's flags
    torch.save({"model": model.state_dict(), "args": saved}, tmp_path / "weights.pth")
    args.resume = str(tmp_path / "weights.pth")
    export_onnx.export(args).save(str(tmp_path / "model.onnx"))
    return tmp_path / "model.onnx", model.eval(), postprocessors["bbox"]


def images(*sizes):
    g = torch.Generator().manual_seed(sum(h * w for h, w in sizes))
    return nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=g) for h, w in sizes])


def assert_same_detections(got, want) -> None:
    """The same (label, score, box) triples, allowing near-equal scores to come in either order."""
    scores, labels, boxes = got
    unmatched = list(range(len(want["scores"])))
    for score, label, box in zip(scores, labels, boxes):
        match = next((j for j in unmatched if want["labels"][j] == label and abs(want["scores"][j] - score) < 1e-5
                      and np.abs(want["boxes"][j].numpy() - box).max() < 1e-2), None)
        assert match is not None, (score, label, box)
        unmatched.remove(match)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_runtime_matches_pytorch_on_untraced_sizes(variant, tmp_path):
    path, model, _ = exported(tmp_path, variant, "--dynamic", "--image_size", "128", "160")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path))
    # two single images of sizes other than the traced one, and a padded batch of two
    for samples in (images((97, 131)), images((161, 223)), images((150, 200), (161, 223))):
        logits, boxes = session.run(None, {"images": samples.tensors.numpy(), "mask": samples.mask.numpy()})
        with torch.no_grad():
            want = model(samples)
        np.testing.assert_allclose(logits, want["pred_logits"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(boxes, want["pred_boxes"].numpy(), rtol=0, atol=1e-4)


def test_postprocessing_static_graph_and_tensorrt_plugin_form(tmp_path, capsys):
    """A graph for one size, ending in the post-processing; the same with the plugin node."""
    path, model, postprocess = exported(tmp_path, TWO_STAGE, "--with_postprocess", "--image_size", "96", "128",
                                        "--val_scale", "96", "--max_size", "128")
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
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)).save(
        tmp_path / "image.png")
    common = [str(tmp_path / "image.png"), "--threshold", "0", "--top_k", "6", "--out_dir", str(tmp_path / "out")]
    capsys.readouterr()
    with_onnx = infer_lines(["--onnx", str(path), "--val_scale", "96", "--max_size", "128", *common], capsys)
    with_checkpoint = infer_lines(["--resume", str(tmp_path / "weights.pth"), *common], capsys)
    assert len(with_onnx) == 6 and with_onnx == with_checkpoint

    plugin_path, _, _ = exported(tmp_path / "trt", MULTI_SCALE, "--image_size", "96", "128", "--custom_op")
    plugin = onnx.load(str(plugin_path))
    nodes = [n for n in plugin.graph.node if n.op_type == "MultiscaleDeformableAttnPlugin_TRT"]
    # one per encoder layer and per decoder layer (SMALL_MODEL: 1 + 2), and no GridSample left
    assert len(nodes) == 3 and all(n.domain == "trt.plugins" and len(n.input) == 5 for n in nodes)
    assert not any(n.op_type == "GridSample" for n in plugin.graph.node)


def infer_lines(argv: list[str], capsys) -> list[str]:
    from tools import infer

    assert infer.main(argv) == 0
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def test_infer_runs_an_exported_graph_as_the_checkpoint(tmp_path, capsys):
    path, _, _ = exported(tmp_path, MULTI_SCALE, "--image_size", "96", "128", "--val_scale", "96", "--max_size", "128")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    common = [str(tmp_path / "image.png"), "--threshold", "0", "--top_k", "8", "--out_dir", str(tmp_path / "out")]
    capsys.readouterr()
    with_onnx = infer_lines(["--onnx", str(path), "--val_scale", "96", "--max_size", "128", *common], capsys)
    with_checkpoint = infer_lines(["--resume", str(tmp_path / "weights.pth"), *common], capsys)
    assert len(with_onnx) == 8 and with_onnx == with_checkpoint
    # the benchmark times ONNX Runtime beside PyTorch
    from tools import benchmark, infer

    flags = MODEL + VARIANT_FLAGS[MULTI_SCALE] + ["--device", "cpu", "--image_size", "96", "128", "--batch_sizes", "1",
                                                  "--num_iters", "1", "--warmup", "0", "--onnx", str(path)]
    assert benchmark.main(flags) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("batch 1:")]
    assert [r[11] for r in rows] == ["auto", "onnxruntime"] and float(rows[1][2]) > 0
    # a graph for one size refuses an image of another, naming both

    assert infer.main(["--onnx", str(path), *common]) == 2
    assert ("is a graph for 96x128 images, but this one is 800x1066 after resizing; export with --dynamic"
            in capsys.readouterr().err)


def test_export_refuses_a_bad_opset(tmp_path, capsys):
    assert export_onnx.main(MODEL + ["--out", str(tmp_path / "m.onnx"), "--opset", "13"]) == 2
    assert capsys.readouterr().err == "error: --opset 13: GridSample needs opset 16 or later\n"
    assert not (tmp_path / "m.onnx").exists()
