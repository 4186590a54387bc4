"""The detector: checkpoint layout, initialisation, shapes, invariances, gradients."""
import argparse
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from engine import train_step
from models import build_model
from models.backbone import Backbone
from models.deformable_transformer import DeformableTransformer, DeformableTransformerEncoder
from models.ms_deform_attn import MSDeformAttn
from util.checkpoint import load_checkpoint, load_weights
from util.errors import ParameterError
from util.flags import VARIANTS
from util.misc import nested_tensor_from_tensor_list

from helpers import SMALL_MODEL, VARIANT_FLAGS, needs_cuda, parse

# The original's state_dict manifests (key, shape, dtype, kind), copied from shared/reference.
REFERENCE = Path(__file__).resolve().parent / "data" / "state_dicts"

SMALL = ["--backbone", "resnet18", "--hidden_dim", "64", "--nheads", "4", "--dim_feedforward", "128",
         "--enc_layers", "2", "--dec_layers", "3", "--num_queries", "20", "--num_classes", "7", "--dropout", "0"]


def build(flags, seed=0):
    torch.manual_seed(seed)
    return build_model(parse([*flags, "--backbone_weights", "none", "--device", "cpu"]))


def build_on_meta(flags):
    """The model of ``flags`` with shapes and no storage: building a ResNet-50 model so is ten
    times faster than initialising its weights."""
    with torch.device("meta"):
        return build(flags)


def read_manifest(name):
    lines = (REFERENCE / f"{name}.tsv").read_text().splitlines()
    count = int(lines[1].split(":")[1])
    rows = [line.split("\t") for line in lines if not line.startswith("#")]
    return count, rows


def state_dict_kinds(model):
    """key -> 'param' (first name of a trainable parameter), 'frozen_param' or 'buffer'
    (registered buffers and every later name of a shared parameter)."""
    first_names = {}
    for name, p in model.named_parameters():
        first_names[name] = "param" if p.requires_grad else "frozen_param"
    return {k: first_names.get(k, "buffer") for k in model.state_dict()}


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_matches_released_manifest(name):
    count, rows = read_manifest(name)
    model, _, _ = build_on_meta(VARIANT_FLAGS[name])
    state = model.state_dict()
    kinds = state_dict_kinds(model)
    assert [r[0] for r in rows] == list(state), "keys or their order differ"
    for key, shape, dtype, kind in rows:
        assert "x".join(map(str, state[key].shape)) == shape, key
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key
        assert kinds[key] == kind, key
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def first_name_of(key: str, kinds: dict[str, str]) -> str:
    """The manifest's first name of the tensor ``key`` names: a 'buffer' row is either a real
    buffer or a later name of a parameter the original shares, its heads (one class and one box
    head for every decoder layer without box refinement, and with it the decoder holding the
    model's own heads, also the class heads in two-stage)."""
    if kinds[key] != "buffer":
        return key
    names = [key.removeprefix("transformer.decoder."), "transformer.decoder." + key]
    names += [re.sub(r"^((?:transformer\.decoder\.)?(?:class|bbox)_embed)\.\d+\.", r"\1.0.", n) for n in names]
    return next((n for n in names if kinds.get(n) == "param"), key)


@pytest.mark.parametrize("name", VARIANTS)
def test_released_checkpoint_layout_loads_strictly(tmp_path, name):
    """A checkpoint made from the original's manifest alone, in the released layout (args an
    argparse.Namespace, optimizer and schedule beside the weights; random values, equal where the
    original shares a tensor), loads through load_checkpoint and load_weights with every key, and
    each tensor lands under its name."""
    _, rows = read_manifest(name)
    kinds = {key: kind for key, _, _, kind in rows}
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, shape, dtype, _ in rows:
        source = first_name_of(key, kinds)
        state[key] = state[source] if source in state else torch.rand(
            [int(n) for n in shape.split("x")], generator=generator, dtype=getattr(torch, dtype))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 50},
                "epoch": 49, "args": argparse.Namespace(lr=2e-4, lr_drop=40)}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["args"].lr_drop == 40 and checkpoint["epoch"] == 49
    # materialised without initialising: every value comes from the checkpoint
    model = build_on_meta(VARIANT_FLAGS[name])[0].to_empty(device="cpu")
    assert load_weights(model, checkpoint["model"], str(path)) == []
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_initialisation():
    model, _, _ = build(["--with_box_refine"])
    attn = model.transformer.encoder.layers[0].self_attn
    bias = attn.sampling_offsets.bias.detach().view(attn.n_heads, attn.n_levels, attn.n_points, 2)
    for h in range(attn.n_heads):
        theta = 2 * math.pi * h / attn.n_heads
        direction = torch.tensor([math.cos(theta), math.sin(theta)])
        direction = direction / direction.abs().max()
        for p in range(attn.n_points):
            for lvl in range(attn.n_levels):
                torch.testing.assert_close(bias[h, lvl, p], direction * (p + 1))
    # head 0 points right, head 2 of 8 points down, both on the unit square
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0

    prior = -math.log((1 - 0.01) / 0.01)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias.detach(), torch.full_like(head.bias, prior))
    for i, head in enumerate(model.bbox_embed):
        last = head.layers[-1]
        assert torch.count_nonzero(last.weight) == 0
        expected = torch.tensor([0.0, 0.0, -2.0, -2.0]) if i == 0 else torch.zeros(4)
        torch.testing.assert_close(last.bias.detach(), expected)
    # refinement heads are independent copies, not aliases
    assert model.bbox_embed[0] is not model.bbox_embed[1]
    assert model.transformer.decoder.bbox_embed is model.bbox_embed

    level_embed = model.transformer.level_embed.detach()
    assert level_embed.shape == (4, 256)
    assert 0.8 < level_embed.std().item() < 1.2  # standard normal, not Xavier
    for proj in model.input_proj:
        assert torch.count_nonzero(proj[0].bias) == 0
    ref = model.transformer.reference_points
    assert torch.count_nonzero(ref.bias) == 0


def test_initialisation_shared_heads_and_two_stage():
    model, _, _ = build([])
    assert all(head is model.class_embed[0] for head in model.class_embed)
    torch.testing.assert_close(model.bbox_embed[0].layers[-1].bias.detach(), torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert model.transformer.decoder.bbox_embed is None

    model, _, _ = build(["--with_box_refine", "--two_stage"])
    assert len(model.class_embed) == 7 and model.transformer.decoder.class_embed is model.class_embed
    for head in model.bbox_embed:
        assert torch.count_nonzero(head.layers[-1].bias) == 0


def test_two_stage_without_refinement_is_rejected():
    with pytest.raises(ParameterError, match="two_stage=True needs with_box_refine"):
        build(["--two_stage"])


@pytest.mark.parametrize("flags", [[], ["--num_feature_levels", "1"], ["--with_box_refine"],
                                   ["--with_box_refine", "--two_stage"]])
def test_output_shapes(flags):
    model, _, _ = build(SMALL + flags)
    model.eval()
    with torch.no_grad():
        out = model([torch.randn(3, 64, 96), torch.randn(3, 80, 72)])
    assert out["pred_logits"].shape == (2, 20, 7)
    assert out["pred_boxes"].shape == (2, 20, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 20, 7) and aux["pred_boxes"].shape == (2, 20, 4)
    if "--two_stage" in flags:
        # one proposal per encoder token over every level; 80x96 padded image
        levels = [(10, 12), (5, 6), (3, 3)] + [(2, 2)]
        tokens = sum(h * w for h, w in levels)
        assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, 7)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, tokens, 4)
    else:
        assert "enc_outputs" not in out


@pytest.mark.parametrize("flags", [[], ["--with_box_refine", "--two_stage"]])
def test_batch_matches_single_images(flags):
    """Same-size images in a batch get the outputs each gets alone."""
    model, _, _ = build(SMALL + flags)
    model.eval()
    images = [torch.randn(3, 64, 80) for _ in range(3)]
    with torch.no_grad():
        batched = model(images)
        for i, img in enumerate(images):
            alone = model([img])
            torch.testing.assert_close(batched["pred_logits"][i], alone["pred_logits"][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched["pred_boxes"][i], alone["pred_boxes"][0], atol=1e-5, rtol=1e-5)


# Not two-stage: there, as in the original, every padded token is a proposal candidate whose
# memory is zeroed, so all share one score, and they can win the top-k (they do for this model).
@pytest.mark.parametrize("flags", [[], ["--with_box_refine"]])
def test_padding_does_not_change_detections_given_the_same_features(flags):
    """An image padded below and on the right in a batch gets the detections it gets alone, when
    the transformer is given its features alone on the valid area and noise on the padding: the
    transformer masks the padding out and measures positions relative to the valid area (valid
    ratios, normalised position encoding). (The backbone's convolutions and the input projections'
    GroupNorm do see the padding, so the full model's outputs depend on it: docs/export.md.)"""
    model, _, _ = build(SMALL + flags)
    perturb_zero_weights(model, std=0.05)  # offsets and weights away from their symmetric start
    with torch.no_grad():  # and some sampling points past the image
        for attn in (m for m in model.modules() if isinstance(m, MSDeformAttn)):
            attn.sampling_offsets.bias.mul_(3)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    image, other = torch.randn(3, 64, 64, generator=generator), torch.randn(3, 128, 128, generator=generator)
    alone_features = []
    hooks = [proj.register_forward_hook(lambda module, inputs, output: alone_features.append(output))
             for proj in model.input_proj]
    with torch.no_grad():
        alone = model([image])
    for hook in hooks:
        hook.remove()

    def valid_features_and_noise(level):
        def replace(module, inputs, output):
            output = output.clone()
            height, width = alone_features[level].shape[-2:]
            output[0] = torch.randn(output.shape[1:], generator=generator) * 10
            output[0, :, :height, :width] = alone_features[level][0]
            return output
        return replace

    for level, proj in enumerate(model.input_proj):
        proj.register_forward_hook(valid_features_and_noise(level))
    samples = nested_tensor_from_tensor_list([image, other])
    assert samples.mask[0, 64:].all() and samples.mask[0, :, 64:].all() and not samples.mask[0, :64, :64].any()
    with torch.no_grad():
        batched = model(samples)
    for got, want in zip([batched, *batched["aux_outputs"]], [alone, *alone["aux_outputs"]]):
        torch.testing.assert_close(got["pred_logits"][0], want["pred_logits"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["pred_boxes"][0], want["pred_boxes"][0], rtol=1e-4, atol=1e-5)
    ratios = DeformableTransformer.get_valid_ratio(samples.mask)
    torch.testing.assert_close(ratios, torch.tensor([[0.5, 0.5], [1.0, 1.0]]))


def test_masks_and_valid_ratios_per_level():
    model, _, _ = build(SMALL)
    sizes = [(64, 96), (40, 50), (33, 17)]
    samples = nested_tensor_from_tensor_list([torch.randn(3, h, w) for h, w in sizes])
    captured = {}

    def grab(module, inputs, output):
        captured["masks"] = inputs[1]

    handle = model.transformer.register_forward_hook(grab)
    model.eval()
    with torch.no_grad():
        model(samples)
    handle.remove()
    masks = captured["masks"]
    assert len(masks) == 4
    for mask in masks:
        h_l, w_l = mask.shape[-2:]
        ratios = DeformableTransformer.get_valid_ratio(mask)
        for i, (h, w) in enumerate(sizes):
            # nearest-neighbour downsampling of the image mask: valid rows are those whose
            # source pixel floor(r * H / h_l) lies inside the image
            valid_h = sum(1 for r in range(h_l) if math.floor(r * 64 / h_l) < h)
            valid_w = sum(1 for c in range(w_l) if math.floor(c * 96 / w_l) < w)
            assert (~mask[i]).sum().item() == valid_h * valid_w
            assert not mask[i, :valid_h, :valid_w].any()
            torch.testing.assert_close(ratios[i], torch.tensor([valid_w / w_l, valid_h / h_l]))


@pytest.mark.parametrize("reference_grad", [False, True], ids=["constant_references", "learned_references"])
def test_sampling_locations_are_the_originals_formula_bit_for_bit(reference_grad):
    """Pixel offsets over (W_l, H_l) plus the reference point, computed as the original writes it
    (a broadcast over heads, levels, points and (x, y), dividing by the int64 shapes): the same
    locations and the same gradients, to the bit."""
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.5)
    shapes = torch.tensor([[6, 9], [3, 5], [2, 3]])
    query = torch.randn(2, 11, 32, requires_grad=True)
    reference_points = torch.rand(2, 11, 3, 2, requires_grad=reference_grad)
    grad = torch.randn(2, 11, 4, 3, 3, 2)

    locations, _ = module.sampling_locations_and_weights(query, reference_points, shapes)
    got = torch.autograd.grad(locations, [query] + [reference_points] * reference_grad, grad)
    offsets = module.sampling_offsets(query).view(2, 11, 4, 3, 3, 2)
    normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
    want_locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    want = torch.autograd.grad(want_locations, [query] + [reference_points] * reference_grad, grad)
    assert torch.equal(locations, want_locations)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_encoder_reference_points_are_pixel_centres():
    valid = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 0.75]]])
    ref = DeformableTransformerEncoder.get_reference_points([(4, 4), (2, 2)], valid, torch.device("cpu"))
    assert ref.shape == (2, 20, 2, 2)
    # first token of level 0: centre of pixel (0, 0) of a 4x4 map
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.125, 0.125]))
    # second image: level 0 valid area is 2 wide, 3 high -> centre (0.5/2, 0.5/3) of the valid
    # area, rescaled to the padded map by the ratios
    torch.testing.assert_close(ref[1, 0, 0], torch.tensor([0.25 * 0.5, 0.5 / 3 * 0.75]))
    # a level-1 token is mapped onto level 0 through the same normalised position
    torch.testing.assert_close(ref[0, 16, 0], torch.tensor([0.25, 0.25]))


def test_gradients_reach_trainable_and_skip_frozen():
    model, criterion, _ = build(SMALL + ["--with_box_refine", "--two_stage"])
    perturb_zero_weights(model)
    model.train()
    out = model([torch.randn(3, 64, 64), torch.randn(3, 48, 80)])
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])},
               {"labels": torch.tensor([6]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])}]
    losses = criterion(out, targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.0.body.") for n in frozen)
    assert all(("layer1" in n) or n.startswith("backbone.0.body.conv1") for n in frozen)


def perturb_zero_weights(model, std: float = 0.01) -> None:
    """At initialisation some projections are zero (sampling offsets, attention weights, the box
    heads' last layers), which blocks gradients to what feeds them: perturb them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, std)


def test_learned_position_embedding():
    """--position_embedding learned: the original's 50 row and 50 column embeddings under
    backbone.1, the column's at each pixel's x in the first half of the channels and the row's at
    its y in the second, on each of the backbone's levels; trained through the encoder, only the
    rows and columns the feature maps reach."""
    model, criterion, _ = build(SMALL + ["--position_embedding", "learned"])
    half = 64 // 2
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("backbone.1.")}
    assert shapes == {"backbone.1.row_embed.weight": (50, half), "backbone.1.col_embed.weight": (50, half)}
    rows, cols = model.backbone[1].row_embed.weight, model.backbone[1].col_embed.weight
    samples = nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 80, 72)])
    features, positions = model.backbone(samples)
    assert len(positions) == 3
    for feature, pos in zip(features, positions):
        batch, _, height, width = feature.tensors.shape
        assert pos.shape == (batch, 2 * half, height, width)
        for b, y, x in itertools.product(range(batch), range(height), range(width)):
            assert torch.equal(pos[b, :half, y, x], cols[x]) and torch.equal(pos[b, half:, y, x], rows[y])

    perturb_zero_weights(model)
    outputs = model(samples)  # levels up to 10x12 (stride 8 of 80x96)
    losses = criterion(outputs, [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    for embedding, reached in ((rows, 10), (cols, 12)):
        assert (embedding.grad[:reached] != 0).all(1).all() and not embedding.grad[reached:].any()


@pytest.mark.parametrize("flags", [[], ["--with_box_refine", "--two_stage"]])
def test_no_aux_loss_trains_on_the_last_decoder_layer_alone(flags):
    """--no_aux_loss: the same parameters and final outputs, no intermediate layers' outputs, and a
    training loss of the last layer's three weighted losses alone (as in the original, that also
    leaves out two-stage's encoder loss, which is weighted with the auxiliary ones)."""
    with_aux, criterion, _ = build(SMALL + flags)
    without, criterion_without, _ = build(SMALL + flags + ["--no_aux_loss"])
    state, state_without = with_aux.state_dict(), without.state_dict()
    assert list(state) == list(state_without) and all(torch.equal(state[k], state_without[k]) for k in state)
    coefficients = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
    assert criterion_without.weight_dict == coefficients
    assert criterion.weight_dict == {k + suffix: v for suffix in ("", "_0", "_1", "_enc")
                                     for k, v in coefficients.items()}

    samples = nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 80, 72)])
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])},
               {"labels": torch.tensor([6]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])}]
    with torch.no_grad():
        outputs, outputs_without = with_aux(samples), without(samples)
    assert "aux_outputs" in outputs and "aux_outputs" not in outputs_without
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs_without[key], outputs[key], rtol=0, atol=0)
    last_layer = criterion({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets)
    values = train_step(without, criterion_without, samples, targets, torch.optim.SGD(without.parameters(), lr=0), 0.1)
    assert values["loss"] == pytest.approx(sum(float(last_layer[k]) * w for k, w in coefficients.items()), rel=1e-6)
    assert not any(k.startswith(("loss_ce_", "loss_bbox_", "loss_giou_")) and not k.endswith("unscaled")
                   for k in values)


def test_lr_backbone_zero_freezes_whole_backbone():
    model, _, _ = build(SMALL + ["--lr_backbone", "0"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.0"))
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.0"))


@pytest.mark.parametrize("name,channels", [("resnet18", [128, 256, 512]), ("resnet34", [128, 256, 512]),
                                           ("resnet50", [512, 1024, 2048]), ("resnet101", [512, 1024, 2048])])
def test_backbone_channels_and_strides(name, channels):
    backbone = Backbone(name, train_backbone=True, return_interm_layers=True, dilation=False)
    assert backbone.num_channels == channels and backbone.strides == [8, 16, 32]
    out = backbone(nested_tensor_from_tensor_list([torch.randn(3, 64, 96)]))
    for (key, feat), c, s in zip(sorted(out.items()), channels, [8, 16, 32]):
        assert feat.tensors.shape == (1, c, 64 // s, 96 // s)
        assert feat.mask.shape == (1, 64 // s, 96 // s)
    if name in ("resnet18", "resnet34"):
        with pytest.raises(ParameterError, match=r"dilation=True \(DC5\) needs a bottleneck ResNet"):
            Backbone(name, train_backbone=True, return_interm_layers=False, dilation=True)
        return
    dc5 = Backbone(name, train_backbone=True, return_interm_layers=False, dilation=True)
    assert dc5.strides == [16] and dc5.num_channels == channels[-1:]
    feat = dc5(nested_tensor_from_tensor_list([torch.randn(3, 64, 96)]))["0"]
    assert feat.tensors.shape == (1, channels[-1], 4, 6)


def test_backbone_rejects_unknown_name():
    with pytest.raises(ValueError, match="resnet152"):
        Backbone("resnet152", True, False, False)


def test_backbone_weights_from_file(tmp_path):
    import torchvision
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone("resnet18", True, True, False, weights=str(path))
    loaded = backbone.body.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, reference.state_dict()[key], msg=key)


def test_backbone_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="weights=.*missing.pth' is no file"):
        Backbone("resnet18", True, False, False, weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        Backbone("resnet18", True, False, False, weights=str(wrong))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ParameterError) as err:
        Backbone("resnet50", True, False, False, weights="imagenet")
    assert err.value.as_flag().startswith("--weights imagenet cannot be fetched")
    assert "use 'none'" in str(err.value) and "network is unreachable" in str(err.value)


def test_basic_block_resnet_matches_torchvision_layout():
    """At width 64 our basic-block builder has torchvision's keys and shapes (so its weights fit)."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    from models.backbone import basic_block_resnet
    ours = basic_block_resnet([2, 2, 2, 2], 64, FrozenBatchNorm2d).state_dict()
    theirs = {k: v for k, v in torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).state_dict().items()
              if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_channels_last_backbone_computes_the_same_model(norm):
    """--channels_last changes the memory format of the backbone's activations only: the same
    parameters and checkpoint keys, outputs and gradients equal up to float32 rounding."""
    flags = SMALL_MODEL + ["--backbone_norm", norm, "--train_backbone_stem", "--lr_backbone", "1e-5"]
    generator = torch.Generator().manual_seed(0)
    samples = nested_tensor_from_tensor_list([torch.randn(3, 64, 96, generator=generator),
                                              torch.randn(3, 80, 72, generator=generator)])
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model, _, _ = build_model(parse(flags + (["--channels_last"] if channels_last else [])))
        model.train()
        features, _ = model.backbone(samples)
        assert features[-1].tensors.is_contiguous(memory_format=torch.channels_last) == channels_last
        outputs = model(samples)
        (outputs["pred_logits"].sum() + outputs["pred_boxes"].sum()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((model.state_dict(), outputs, grads))
    (state, outputs, grads), (state_cl, outputs_cl, grads_cl) = results
    assert list(state) == list(state_cl)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs_cl[key], outputs[key], rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_cl.keys() and any(n.startswith("backbone") for n in grads)
    for name, grad in grads.items():
        # relative to the tensor's largest entry: a gradient summed over a batch cancels in places
        assert (grads_cl[name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name


def test_frozen_batch_norm_is_torchvisions_in_float32_and_keeps_half_precision():
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

    from models.backbone import FrozenBatchNorm2d
    generator = torch.Generator().manual_seed(0)
    ours, theirs = FrozenBatchNorm2d(16), TorchvisionFrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean"):
        getattr(ours, name).copy_(torch.randn(16, generator=generator))
    ours.running_var.copy_(torch.rand(16, generator=generator) + 0.1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 9, 7, generator=generator)
    assert torch.equal(ours(x), theirs(x))
    for dtype in (torch.bfloat16, torch.float16):
        low = ours(x.to(dtype))
        # torchvision's would return float32; ours stays in the input's dtype, within its rounding
        assert theirs(x.to(dtype)).dtype == torch.float32 and low.dtype == dtype
        torch.testing.assert_close(low.float(), theirs(x.to(dtype)), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        assert ours(conv(x)).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(2, 8, 17, 23), (4, 32, 64, 64)])
def test_channels_last_max_pool_is_the_plain_pooling_bit_for_bit(shape):
    """Values and gradients equal nn.MaxPool2d's in NCHW, ties included: the inputs hold few
    distinct values, half of them zeros as after the stem's ReLU."""
    from models.backbone import ChannelsLastMaxPool2d
    torch.manual_seed(0)
    x = (torch.randint(-3, 4, shape).float() / 2).relu().requires_grad_()
    y = x.detach().clone().requires_grad_()
    ours, plain = ChannelsLastMaxPool2d(3, 2, 1)(x), torch.nn.MaxPool2d(3, 2, 1)(y)
    grad = torch.randn_like(plain)
    ours.backward(grad)
    plain.backward(grad)
    assert ours.is_contiguous()
    assert torch.equal(ours, plain) and torch.equal(x.grad, y.grad)
    backbone = Backbone("resnet10", True, True, False, norm="batch", base_width=8)
    assert type(backbone.body.maxpool) is ChannelsLastMaxPool2d


def test_small_trainable_backbone():
    backbone = Backbone("resnet10", train_backbone=True, return_interm_layers=True, dilation=False,
                        norm="batch", train_stem=True, base_width=32)
    assert backbone.num_channels == [64, 128, 256]
    assert all(p.requires_grad for p in backbone.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    out = backbone(nested_tensor_from_tensor_list([torch.randn(3, 64, 64)]))
    assert [tuple(f.tensors.shape) for _, f in sorted(out.items())] == [(1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
    # the original's freezing: without train_stem the stem and layer1 stay frozen
    frozen_stem = Backbone("resnet10", True, True, False, norm="batch", base_width=32)
    frozen = {n for n, p in frozen_stem.body.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1.")) for n in frozen)
    with pytest.raises(ValueError, match="ImageNet"):
        Backbone("resnet10", True, True, False, weights="imagenet")
    with pytest.raises(ValueError, match="basic-block"):
        Backbone("resnet50", True, True, False, base_width=32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", [[], ["--with_box_refine", "--two_stage"]])
def test_model_on_cuda_matches_cpu(flags, dtype):
    """Same weights and padded inputs: outputs and losses on CUDA (the CUDA kernel) equal those
    on the CPU to 1e-4 relative, and so do gradients in float64 (in float32 a sampling point
    within rounding of a pixel centre can flip a gradient entry, see docs/faithfulness.md)."""
    import copy
    model, criterion, _ = build(SMALL + flags)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.01)
    images = [torch.randn(3, 96, 128, dtype=dtype), torch.randn(3, 80, 112, dtype=dtype)]
    targets = [{"labels": torch.tensor([1, 4]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]], dtype=dtype)},
               {"labels": torch.tensor([6]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]], dtype=dtype)}]
    results = []
    for device in ("cpu", "cuda"):
        mdl = copy.deepcopy(model).to(device=device, dtype=dtype).train()
        out = mdl([img.to(device) for img in images])
        losses = criterion(out, [{k: v.to(device) for k, v in t.items()} for t in targets])
        sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
        results.append((out, losses, {n: p.grad.cpu() for n, p in mdl.named_parameters() if p.grad is not None}))
    (out_cpu, losses_cpu, grads_cpu), (out_gpu, losses_gpu, grads_gpu) = results

    def close(a, b, name):
        scale = b.abs().max().clamp(min=1e-12)
        assert ((a.detach().cpu() - b.detach()).abs().max() / scale).item() < 1e-4, name

    for key in ("pred_logits", "pred_boxes"):
        close(out_gpu[key], out_cpu[key], key)
    for key in losses_cpu:
        close(losses_gpu[key], losses_cpu[key], key)
    assert grads_gpu.keys() == grads_cpu.keys()
    if dtype == torch.float64:
        for key in grads_cpu:
            close(grads_gpu[key], grads_cpu[key], key)
