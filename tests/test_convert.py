"""tools/convert_checkpoint.py against Hugging Face ``transformers``' own model: all five
variants built there with random weights (no download), converted in both directions, and
compared on a padded batch of two images of different sizes."""
import json
import subprocess
import sys

import pytest
import torch

from models import build_model
from tools import convert_checkpoint
from util.checkpoint import load_checkpoint, load_weights
from util.flags import check_checkpoint_args
from util.misc import nested_tensor_from_tensor_list

from helpers import REPO, VARIANT_FLAGS, parse, subprocess_env

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")  # the backbone of transformers' Deformable DETR checkpoints

# Each variant as transformers configures it. Box refinement needs distinct per-layer heads, as the
# published checkpoints have, so those are built untied.
HF_VARIANTS = {
    "r50_deformable_detr": {},
    "r50_deformable_detr_single_scale": {"num_feature_levels": 1},
    "r50_deformable_detr_single_scale_dc5": {"num_feature_levels": 1, "dilation": True},
    "r50_deformable_detr_plus_iterative_bbox_refinement": {"with_box_refine": True, "tie_word_embeddings": False},
    "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage":
        {"with_box_refine": True, "two_stage": True, "tie_word_embeddings": False},
}


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 160, 224, generator=g), torch.randn(3, 128, 192, generator=g)]
    return nested_tensor_from_tensor_list(images)


def hf_model(variant: str, **extra):
    """transformers' model with random weights, perturbed so that no two heads are equal (unless
    tied); with box refinement its decoder's heads are the detector's, as in the original
    (transformers 5 builds them as separate copies when untied)."""
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(num_labels=91, **{**HF_VARIANTS[variant], **extra})
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
        if config.with_box_refine:
            model.model.decoder.bbox_embed.load_state_dict(model.bbox_embed.state_dict())
        if config.two_stage:
            model.model.decoder.class_embed.load_state_dict(model.class_embed.state_dict())
    return model


@torch.no_grad()
def assert_same_detections(ours, theirs, samples) -> None:
    ours.eval()
    mine = ours(samples)
    other = theirs(pixel_values=samples.tensors, pixel_mask=(~samples.mask).long())
    torch.testing.assert_close(mine["pred_logits"], other.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(mine["pred_boxes"], other.pred_boxes, rtol=0, atol=1e-4)
    _, _, postprocessors = build_model(parse(["--backbone_weights", "none"]))
    sizes = torch.tensor([[480, 640], [400, 600]])
    for a, b in zip(postprocessors["bbox"](mine, sizes),
                    postprocessors["bbox"]({"pred_logits": other.logits, "pred_boxes": other.pred_boxes}, sizes)):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-2)  # pixels


def convert(capsys, *argv: str) -> str:
    """The converter's main() in this process (a subprocess costs an import of torch and
    transformers per call); returns what it printed."""
    capsys.readouterr()
    status = convert_checkpoint.main(list(argv))
    printed = capsys.readouterr()
    assert status == 0, printed.err
    return printed.out


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert_checkpoint.py", *argv], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_from_transformers(variant, tmp_path, capsys):
    theirs = hf_model(variant)
    theirs.save_pretrained(tmp_path / "hf")
    printed = convert(capsys, "--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "converted.pth"))
    assert f"built by configs/{variant}.sh, e.g." in printed
    checkpoint = load_checkpoint(tmp_path / "converted.pth")
    args = parse(VARIANT_FLAGS[variant] + ["--backbone_weights", "none"])
    # what --resume/--eval and --finetune check: the saved flags, then every key both ways
    check_checkpoint_args(checkpoint, args, "converted.pth")
    check_checkpoint_args(checkpoint, args, "converted.pth", finetune=True)
    ours, _, _ = build_model(args)
    load_weights(ours, checkpoint["model"], "converted.pth")
    assert_same_detections(ours, theirs, batch())


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_to_transformers(variant, tmp_path, capsys):
    args = parse(VARIANT_FLAGS[variant] + ["--backbone_weights", "none"])
    torch.manual_seed(1)
    ours, _, _ = build_model(args)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    torch.save({"model": ours.state_dict(), "args": args, "epoch": 3}, tmp_path / "ours.pth")
    convert(capsys, "--to_hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "hf"))
    theirs = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.with_box_refine == args.with_box_refine and theirs.config.two_stage == args.two_stage
    assert_same_detections(ours, theirs, batch())


def test_current_key_names_are_read(tmp_path):
    """transformers 5's own names (model.backbone.model.*, mlp.fc1, o_proj), not the published ones."""
    from safetensors.torch import save_file

    variant = "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage"
    theirs = hf_model(variant)
    state = {k: v.contiguous().clone() for k, v in theirs.state_dict().items()}
    assert "model.decoder.layers.0.mlp.fc1.weight" in state and "model.backbone.model.conv1.weight" in state
    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(theirs.config.to_json_string())
    checkpoint, flags = convert_checkpoint.from_hf(tmp_path / "hf")
    assert flags == [f"configs/{variant}.sh"]
    ours, _, _ = build_model(checkpoint["args"])
    load_weights(ours, checkpoint["model"], "converted")
    assert_same_detections(ours, theirs, batch())


@pytest.mark.slow
def test_heads_a_file_leaves_out_are_rebuilt(tmp_path):
    """Box refinement built with transformers' default ties shares one class head across the
    layers, and save_pretrained lists it once: the converter rebuilds the other layers' heads."""
    variant = "r50_deformable_detr_plus_iterative_bbox_refinement"
    theirs = hf_model(variant, tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    assert "class_embed.1.weight" not in load_file(str(tmp_path / "hf" / "model.safetensors"))
    checkpoint, _ = convert_checkpoint.from_hf(tmp_path / "hf")
    ours, _, _ = build_model(checkpoint["args"])
    load_weights(ours, checkpoint["model"], "converted")
    assert_same_detections(ours, theirs, batch())


def test_infer_names_the_classes_of_a_converted_checkpoint(tmp_path, capsys):
    from PIL import Image

    from tools import infer

    theirs = hf_model("r50_deformable_detr", id2label={i: f"thing{i}" for i in range(91)})
    theirs.save_pretrained(tmp_path / "hf")
    assert convert_checkpoint.main(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "c.pth")]) == 0
    assert f"tools/infer.py --class_names {tmp_path / 'c.names.json'}" in capsys.readouterr().out
    Image.new("RGB", (96, 80), (120, 30, 200)).save(tmp_path / "image.png")
    assert infer.main(["--resume", str(tmp_path / "c.pth"), str(tmp_path / "image.png"), "--threshold", "0",
                       "--top_k", "5", "--class_names", str(tmp_path / "c.names.json"),
                       "--out_dir", str(tmp_path / "out")]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 5 and all(line[0].startswith("thing") for line in lines)


def test_what_cannot_be_represented_is_refused(tmp_path):
    theirs = hf_model("r50_deformable_detr", tie_word_embeddings=False)  # six distinct heads, no refinement
    theirs.save_pretrained(tmp_path / "distinct")
    with pytest.raises(ValueError, match=r"class_embed\.\d\.weight differs from class_embed\.0\.weight.*need box "
                                         r"refinement"):
        convert_checkpoint.from_hf(tmp_path / "distinct")
    hf_model("r50_deformable_detr").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["encoder_ffn_dim"] = 2048
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="encoder_ffn_dim=2048 and decoder_ffn_dim=1024 differ"):
        convert_checkpoint.from_hf(tmp_path / "hf")


def test_missing_and_unknown_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("r50_deformable_detr").save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    del state["model.level_embed"]
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"keys this converter does not know: \['model\.extra\.weight'\]"):
        convert_checkpoint.from_hf(tmp_path / "hf")
    del state["model.extra.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"keys missing from the checkpoint \['transformer\.level_embed'\]"):
        convert_checkpoint.from_hf(tmp_path / "hf")
    proc = run_tool("--from_hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pth"))
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / 'nowhere'} does not exist\n"


def test_training_and_evaluation_do_not_import_transformers():
    code = ("import sys, main, engine, models, datasets.coco, tools.infer; "
            "main.train_and_evaluate; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'timm', 'safetensors')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
