"""tools/convert_checkpoint.py against Hugging Face ``transformers``' own model: all five
variants built there with random weights (no download), converted in both directions, and
compared on a padded batch of two images of different sizes."""
import json
import re
import subprocess
import sys

import pytest
import torch

from models import build_model
from models.deformable_detr import PostProcess
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


# A transformers model small enough to build, convert and run in a fraction of a second; three
# decoder layers, so that a box head has a layer before the last, the last, and (two-stage) the
# proposals' head after it.
TINY_HF = {"backbone": "resnet18", "d_model": 64, "encoder_layers": 1, "decoder_layers": 3, "encoder_ffn_dim": 64,
           "decoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_n_points": 2,
           "decoder_n_points": 2, "num_queries": 10, "two_stage_num_proposals": 10, "num_labels": 5}
# The same model as main.py's flags.
TINY_OURS = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64", "--nheads", "2",
             "--enc_layers", "1", "--dec_layers", "3", "--dim_feedforward", "64", "--num_queries", "10",
             "--enc_n_points", "2", "--dec_n_points", "2", "--num_classes", "5"]


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 160, 224, generator=g), torch.randn(3, 128, 192, generator=g)]
    return nested_tensor_from_tensor_list(images)


def hf_model(variant: str, **extra):
    """transformers' model of a variant with random weights (see :func:`perturbed_hf_model`)."""
    return perturbed_hf_model(num_labels=91, **{**HF_VARIANTS[variant], **extra})


def perturbed_hf_model(**config):
    """transformers' model with random weights, perturbed so that no two heads are equal (unless
    tied); with box refinement its decoder's heads are the detector's, as in the original
    (transformers 5 builds them as separate copies when untied)."""
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(**config)
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
    sizes = torch.tensor([[480, 640], [400, 600]])
    for a, b in zip(PostProcess()(mine, sizes),
                    PostProcess()({"pred_logits": other.logits, "pred_boxes": other.pred_boxes}, sizes)):
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

    theirs = perturbed_hf_model(**{**TINY_HF, "id2label": {i: f"thing{i}" for i in range(5)}})
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
    # tiny models: the refusals depend on the configuration and the keys, not on the sizes
    theirs = perturbed_hf_model(**{**TINY_HF, "tie_word_embeddings": False})  # distinct heads, no refinement
    theirs.save_pretrained(tmp_path / "distinct")
    with pytest.raises(ValueError, match=r"class_embed\.\d\.weight differs from class_embed\.0\.weight.*need box "
                                         r"refinement"):
        convert_checkpoint.from_hf(tmp_path / "distinct")
    perturbed_hf_model(**TINY_HF).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["encoder_ffn_dim"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="encoder_ffn_dim=128 and decoder_ffn_dim=64 differ"):
        convert_checkpoint.from_hf(tmp_path / "hf")


def test_missing_and_unknown_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    perturbed_hf_model(**TINY_HF).save_pretrained(tmp_path / "hf")
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


def published_name(key: str) -> str:
    """The name transformers 4.x, which wrote the published checkpoints, gave a transformers 5
    key: its backbone module held the ResNet (conv_encoder) and the position embedding, its
    layers held fc1 and fc2 without an mlp module, and the decoder's self-attention named its
    output projection out_proj."""
    key = re.sub(r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model.", key)
    key = re.sub(r"^model\.position_embedding\.", "model.backbone.position_embedding.", key)
    key = re.sub(r"\.mlp\.(fc[12])\.", r".\1.", key)
    return key.replace(".self_attn.o_proj.", ".self_attn.out_proj.")


def tiny_checkpoint(path, *flags: str):
    """One of this project's checkpoints of the tiny model, perturbed from its initialisation."""
    args = parse(TINY_OURS + list(flags))
    torch.manual_seed(1)
    ours, _, _ = build_model(args)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    torch.save({"model": ours.state_dict(), "args": args}, path)
    return ours


def test_learned_position_embedding_reaches_both_generations(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ours = tiny_checkpoint(tmp_path / "ours.pth", "--position_embedding", "learned")
    convert(capsys, "--to_hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "hf"))
    theirs, info = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf",
                                                                                 output_loading_info=True)
    current = {"model.position_embedding.row_embeddings.weight", "model.position_embedding.column_embeddings.weight"}
    published = {published_name(k) for k in current}
    # transformers 5 reads its own names of the embedding and leaves the 4.x copy unused ...
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == published
    assert_same_detections(ours, theirs.eval(), batch())
    # ... and a 4.x model, whose keys are the published names of the same parameters, finds every one of its keys
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(written) == {published_name(k) for k in theirs.state_dict()} | current

    # read back, the two copies must agree
    checkpoint, _ = convert_checkpoint.from_hf(tmp_path / "hf")
    assert torch.equal(checkpoint["model"]["backbone.1.row_embed.weight"], ours.backbone[1].row_embed.weight)
    written["model.position_embedding.row_embeddings.weight"] += 1
    save_file(written, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.backbone\.position_embedding\.row_embeddings\.weight and "
                                         r"model\.position_embedding\.row_embeddings\.weight name the same tensor"):
        convert_checkpoint.from_hf(tmp_path / "hf")


def save_edited(model, folder, edit) -> None:
    """``model.save_pretrained(folder)``, then ``edit`` (a function of the state_dict) applied to the
    weights file."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def perturb(model, *prefixes: str) -> None:
    """Move the parameters under each prefix of ``model``'s state_dict away from their values."""
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.startswith(prefixes):
                tensor.add_(torch.randn_like(tensor) * 0.05)


def drop(*prefixes: str):
    """An edit for :func:`save_edited` that removes the keys under each prefix."""
    def edit(state: dict) -> None:
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]
    return edit


BOX_REFINE_HF = {**TINY_HF, "with_box_refine": True, "tie_word_embeddings": False}
TWO_STAGE_HF = {**BOX_REFINE_HF, "two_stage": True}


@pytest.mark.parametrize("case", ["equal", "absent", "decoder copies only after layer 0", "unused copies differ",
                                  "two-stage, tied"])
def test_decoder_head_copies_of_transformers_5(case, tmp_path):
    """transformers 5 keeps the decoder's box heads (and, two-stage, class heads) as a second copy
    of the detector's. Where the copies agree, are absent, or differ only where transformers never
    uses one of them, the converted model computes what transformers' does."""
    theirs = perturbed_hf_model(**{**TWO_STAGE_HF, "tie_word_embeddings": case == "two-stage, tied"})
    edit = {"absent": drop("model.decoder.bbox_embed.", "model.decoder.class_embed."),
            # transformers leaves these out when it ties the layers' heads to layer 0's
            "decoder copies only after layer 0": drop("bbox_embed.1.", "bbox_embed.2.", "bbox_embed.3.",
                                                      "class_embed.1.", "class_embed.2.", "class_embed.3.")}
    if case == "decoder copies only after layer 0":
        # the file's layers 1 and up are the decoder's copies, which now differ from layer 0
        perturb(theirs, "model.decoder.bbox_embed.1.", "model.decoder.bbox_embed.2.", "model.decoder.bbox_embed.3.",
                "model.decoder.class_embed.1.", "model.decoder.class_embed.2.", "model.decoder.class_embed.3.")
        for layer in (1, 2, 3):
            theirs.bbox_embed[layer].load_state_dict(theirs.model.decoder.bbox_embed[layer].state_dict())
            theirs.class_embed[layer].load_state_dict(theirs.model.decoder.class_embed[layer].state_dict())
    if case == "unused copies differ":
        # the decoder's class heads but the proposals', the detector's proposal heads, and the
        # decoder's box head of the last layer (it refines boxes no layer reads): unused by transformers
        perturb(theirs, "model.decoder.class_embed.0.", "model.decoder.class_embed.1.", "model.decoder.class_embed.2.",
                "class_embed.3.", "bbox_embed.3.", "model.decoder.bbox_embed.2.")
    save_edited(theirs, tmp_path / "hf", edit.get(case, lambda state: None))
    checkpoint, _ = convert_checkpoint.from_hf(tmp_path / "hf")
    ours, _, _ = build_model(checkpoint["args"])
    load_weights(ours, checkpoint["model"], "converted")
    assert_same_detections(ours, theirs, batch())


@pytest.mark.parametrize("variant_config", [BOX_REFINE_HF, TWO_STAGE_HF], ids=["box refinement", "two-stage"])
def test_decoder_box_heads_that_differ_need_a_choice(variant_config, tmp_path, capsys):
    """A box-refinement model fine-tuned in transformers 5 has decoder box heads (which refine the
    reference boxes) that differ from the detector's (which predict the boxes): one message names
    them; --box_heads decoder keeps transformers' detections, --box_heads output the detector's heads."""
    theirs = perturbed_hf_model(**variant_config)
    perturb(theirs, "model.decoder.bbox_embed.0.", "model.decoder.bbox_embed.1.")
    theirs.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"model\.decoder\.bbox_embed\.N differs from bbox_embed\.N for N = 0, 1\. "
                                         r"transformers 5 keeps two copies .* --box_heads decoder .* "
                                         r"--box_heads output"):
        convert_checkpoint.from_hf(tmp_path / "hf")
    capsys.readouterr()
    assert convert_checkpoint.main(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "distinct per-layer heads" not in err
    assert not (tmp_path / "x.pth").exists()

    convert(capsys, "--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "decoder.pth"), "--box_heads", "decoder")
    ours, _, _ = build_model(load_checkpoint(tmp_path / "decoder.pth")["args"])
    load_weights(ours, load_checkpoint(tmp_path / "decoder.pth")["model"], "decoder.pth")
    assert_same_detections(ours, theirs, batch())
    assert torch.equal(ours.bbox_embed[0].layers[0].weight, theirs.model.decoder.bbox_embed[0].layers[0].weight)

    convert(capsys, "--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "output.pth"), "--box_heads", "output")
    load_weights(ours, load_checkpoint(tmp_path / "output.pth")["model"], "output.pth")
    for layer in (0, 1):
        theirs.model.decoder.bbox_embed[layer].load_state_dict(theirs.bbox_embed[layer].state_dict())
    assert_same_detections(ours, theirs, batch())


def test_a_checkpoint_converted_over_another_does_not_keep_its_class_names(tmp_path, capsys):
    named = perturbed_hf_model(**{**TINY_HF, "id2label": {i: f"thing{i}" for i in range(5)}})
    named.save_pretrained(tmp_path / "named")
    perturbed_hf_model(**TINY_HF).save_pretrained(tmp_path / "unnamed")
    assert convert_checkpoint.main(["--from_hf", str(tmp_path / "named"), "--out", str(tmp_path / "c.pth")]) == 0
    assert (tmp_path / "c.names.json").is_file()
    capsys.readouterr()
    assert convert_checkpoint.main(["--from_hf", str(tmp_path / "unnamed"), "--out", str(tmp_path / "c.pth")]) == 0
    assert not (tmp_path / "c.names.json").exists()
    assert (f"removed {tmp_path / 'c.names.json'}, the class names of the checkpoint replaced: this one has none"
            in capsys.readouterr().out)


def test_training_settings_and_class_names_round_trip(tmp_path, capsys):
    recipe = ["--set_cost_class", "3", "--set_cost_bbox", "4.5", "--set_cost_giou", "1", "--bbox_loss_coef", "6",
              "--giou_loss_coef", "3", "--focal_alpha", "0.3", "--no_aux_loss", "--dropout", "0.2"]
    tiny_checkpoint(tmp_path / "ours.pth", *recipe)
    names = ["background", "cat", "dog", "bird", "fish"]
    (tmp_path / "ours.names.json").write_text(json.dumps(names))
    printed = convert(capsys, "--to_hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "hf"))
    assert f"with the class names of {tmp_path / 'ours.names.json'}" in printed
    # transformers 5 refuses a fraction there, and has no weight for the classification loss
    assert "note: transformers 5 takes only whole numbers for bbox_cost" in printed
    assert "--cls_loss_coef 2" in printed
    config = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf").config
    assert (config.class_cost, config.bbox_cost, config.giou_cost) == (3, 5, 1)
    assert (config.bbox_loss_coefficient, config.giou_loss_coefficient, config.focal_alpha) == (6, 3, 0.3)
    assert not config.auxiliary_loss
    assert config.dropout == config.attention_dropout == config.activation_dropout == 0.2
    assert config.id2label == dict(enumerate(names)) and config.label2id["dog"] == 2

    printed = convert(capsys, "--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pth"))
    args = load_checkpoint(tmp_path / "back.pth")["args"]
    assert (args.set_cost_class, args.set_cost_bbox, args.set_cost_giou) == (3, 5, 1)
    assert (args.bbox_loss_coef, args.giou_loss_coef, args.focal_alpha, args.aux_loss, args.dropout) == (6, 3, 0.3,
                                                                                                          False, 0.2)
    assert ("config.json's training settings differ from the script's; to train with them, add --set_cost_class 3 "
            "--set_cost_giou 1 --bbox_loss_coef 6 --giou_loss_coef 3 --focal_alpha 0.3 --dropout 0.2 --no_aux_loss\n"
            in printed)
    assert json.loads((tmp_path / "back.names.json").read_text()) == {str(i): n for i, n in enumerate(names)}

    (tmp_path / "ours.names.json").write_text(json.dumps({"7": "eel"}))
    capsys.readouterr()
    assert convert_checkpoint.main(["--to_hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "hf2")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'ours.names.json'}: label 7 is outside the model's 5 "
                                       f"classes\n")


def test_out_conflicts_are_one_line_errors(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ours.pth")
    (tmp_path / "taken").write_text("keep me")
    before = sorted(tmp_path.iterdir())

    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert convert_checkpoint.main(list(argv)) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and printed.err.startswith("error: ") and printed.err.count("\n") == 1
        assert sorted(tmp_path.iterdir()) == before and (tmp_path / "taken").read_text() == "keep me"
        return printed.err

    assert "is a file; --to_hf writes a folder" in refused("--to_hf", str(tmp_path / "ours.pth"), "--out",
                                                           str(tmp_path / "taken"))
    assert "cannot write" in refused("--to_hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "taken" / "hf"))
    assert "applies to --from_hf only" in refused("--to_hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "x"),
                                                  "--box_heads", "decoder")

    convert(capsys, "--to_hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "hf"))
    before = sorted(tmp_path.iterdir())
    weights = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert "is a folder; --from_hf writes a checkpoint file" in refused("--from_hf", str(tmp_path / "hf"), "--out",
                                                                         str(tmp_path / "hf"))
    assert "is a file that --from_hf" in refused("--from_hf", str(tmp_path / "hf"), "--out",
                                                 str(tmp_path / "hf" / "model.safetensors"))
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == weights
    assert "cannot write" in refused("--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "taken" / "c.pth"))
