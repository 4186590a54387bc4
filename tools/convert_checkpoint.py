"""Convert Deformable DETR weights between Hugging Face ``transformers`` and this project.

    python tools/convert_checkpoint.py --from_hf DIR_OR_FILE --out converted.pth [--box_heads decoder|output]
    python tools/convert_checkpoint.py --to_hf checkpoint.pth --out DIR

``--from_hf`` reads a ``transformers`` folder (``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``; or one of those files, with ``config.json`` beside it), such as the released
``SenseTime/deformable-detr*`` checkpoints, works out the variant from ``config.json``, and writes a
checkpoint of this project (``{'model', 'args'}``) that ``--resume`` / ``--eval`` and ``--finetune``
load with every key checked; it prints the ``configs/`` script and flags that build that model.
The training settings ``config.json`` holds (matching costs, box-loss weights, focal alpha,
auxiliary losses, dropout) go into the checkpoint's ``args``, and its class names (``id2label``)
into ``converted.names.json``, for ``tools/infer.py --class_names``.

``--to_hf`` writes ``config.json`` and ``model.safetensors`` that
``DeformableDetrForObjectDetection.from_pretrained`` loads, with the checkpoint's training
settings where ``transformers`` has them and the class names of ``checkpoint.names.json`` when
that file exists.

Both the key names of the published checkpoints (written by ``transformers`` 4.x, e.g.
``model.backbone.conv_encoder.model.*``, ``layers.N.fc1``, ``self_attn.out_proj``) and those of
``transformers`` 5 (``model.backbone.model.*``, ``layers.N.mlp.fc1``, ``self_attn.o_proj``) are read;
the published names are written (a learned position embedding under both generations' names, as
``transformers`` 5 does not rename 4.x's). Class indices stay as they are (91 COCO slots). Nothing here
imports ``transformers``: the files are read and written directly.
"""
import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from util.checkpoint import checkpoint_weights, load_checkpoint, load_weights, save_on_main  # noqa: E402
from util.errors import InputError, InputFileNotFoundError, InputValueError  # noqa: E402
from util.flags import closest_config, config_flags, describe_flags, get_args_parser  # noqa: E402

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")

# transformers 4.x names (as published) -> transformers 5 names, which the mapping below reads.
LEGACY_TO_CURRENT = [
    (r"^model\.backbone\.conv_encoder\.model\.", "model.backbone.model."),
    (r"^model\.backbone\.position_embedding\.", "model.position_embedding."),
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
    (r"\.layers\.(\d+)\.fc([12])\.", r".layers.\1.mlp.fc\2."),
]
CURRENT_TO_LEGACY = [
    (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
    (r"^model\.position_embedding\.", "model.backbone.position_embedding."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.layers\.(\d+)\.mlp\.fc([12])\.", r".layers.\1.fc\2."),
]
# transformers 5 renames 4.x's backbone.conv_encoder but not backbone.position_embedding, so it would
# leave a learned position embedding stored under 4.x's name at random values: it is written twice.
CURRENT_TOO = re.compile(r"^model\.position_embedding\.")
# transformers 5 name prefixes and this project's (the original's), one-to-one; {i} is a layer.
PREFIXES = [
    ("model.backbone.model.", "backbone.0.body."),
    ("model.position_embedding.row_embeddings.", "backbone.1.row_embed."),
    ("model.position_embedding.column_embeddings.", "backbone.1.col_embed."),
    ("model.input_proj.", "input_proj."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.level_embed", "transformer.level_embed"),
    ("model.reference_points.", "transformer.reference_points."),
    ("model.enc_output.", "transformer.enc_output."),
    ("model.enc_output_norm.", "transformer.enc_output_norm."),
    ("model.pos_trans.", "transformer.pos_trans."),
    ("model.pos_trans_norm.", "transformer.pos_trans_norm."),
    ("model.encoder.layers.{i}.self_attn.", "transformer.encoder.layers.{i}.self_attn."),
    ("model.encoder.layers.{i}.self_attn_layer_norm.", "transformer.encoder.layers.{i}.norm1."),
    ("model.encoder.layers.{i}.mlp.fc1.", "transformer.encoder.layers.{i}.linear1."),
    ("model.encoder.layers.{i}.mlp.fc2.", "transformer.encoder.layers.{i}.linear2."),
    ("model.encoder.layers.{i}.final_layer_norm.", "transformer.encoder.layers.{i}.norm2."),
    ("model.decoder.layers.{i}.encoder_attn.", "transformer.decoder.layers.{i}.cross_attn."),
    ("model.decoder.layers.{i}.encoder_attn_layer_norm.", "transformer.decoder.layers.{i}.norm1."),
    ("model.decoder.layers.{i}.self_attn.o_proj.", "transformer.decoder.layers.{i}.self_attn.out_proj."),
    ("model.decoder.layers.{i}.self_attn_layer_norm.", "transformer.decoder.layers.{i}.norm2."),
    ("model.decoder.layers.{i}.mlp.fc1.", "transformer.decoder.layers.{i}.linear1."),
    ("model.decoder.layers.{i}.mlp.fc2.", "transformer.decoder.layers.{i}.linear2."),
    ("model.decoder.layers.{i}.final_layer_norm.", "transformer.decoder.layers.{i}.norm3."),
    ("model.decoder.bbox_embed.", "transformer.decoder.bbox_embed."),
    ("model.decoder.class_embed.", "transformer.decoder.class_embed."),
    ("class_embed.", "class_embed."),
    ("bbox_embed.", "bbox_embed."),
]
# The decoder's self-attention: separate q/k/v projections there, one packed in_proj here.
QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
IN_PROJ = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$")
# A head of this project's model: the detector's, or its alias in the decoder.
HEAD = re.compile(r"^(transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")

# Training settings config.json holds: (its field, main.py's flag dest, transformers' default).
TRAINING_SETTINGS = [
    ("class_cost", "set_cost_class", 1), ("bbox_cost", "set_cost_bbox", 5), ("giou_cost", "set_cost_giou", 2),
    ("bbox_loss_coefficient", "bbox_loss_coef", 5), ("giou_loss_coefficient", "giou_loss_coef", 2),
    ("focal_alpha", "focal_alpha", 0.25), ("dropout", "dropout", 0.1), ("auxiliary_loss", "aux_loss", False),
]
# transformers 5 declares these as integers and refuses a config.json with a fraction there.
WHOLE_NUMBERS = ("class_cost", "bbox_cost", "giou_cost", "bbox_loss_coefficient", "giou_loss_coefficient")


def _prefix_rule(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = "^" + re.escape(source).replace(re.escape("{i}"), r"(\d+)") + ("" if source.endswith(".") else "$")
    return re.compile(pattern), target.replace("{i}", r"\1")


TO_OURS = [_prefix_rule(hf, ours) for hf, ours in PREFIXES]
TO_HF = [_prefix_rule(ours, hf) for hf, ours in PREFIXES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, replacement in rules:
        renamed, count = pattern.subn(replacement, key, count=1)
        if count:
            return renamed
    return None


def _apply_all(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


# ------------------------------------------------------------------------------------------
# config.json <-> flags

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputValueError(f"{path} is not a readable JSON file: {err}") from None


def _field(config: Mapping, field: str, default: Any, kind: type, source: str) -> Any:
    """``config[field]`` (``default`` where absent), which must be a ``kind`` (a float may be
    written as an integer; a boolean is neither)."""
    value = config.get(field, default)
    allowed = (int, float) if kind is float else (kind,)
    if not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool)):
        raise InputValueError(f"{source}: {field}={value!r} is not {'a number' if kind is float else kind.__name__}")
    return value


def args_from_hf_config(config: Mapping, num_classes: int, source: str) -> argparse.Namespace:
    """main.py's flags for the model a ``transformers`` ``config.json`` describes, with its training
    settings; what this project cannot build is an error naming the field."""
    def refuse(field: str, why: str) -> InputValueError:
        return InputValueError(f"{source}: {field}={config.get(field)!r} {why}")

    def integer(field: str, default: int) -> int:
        return _field(config, field, default, int, source)

    if config.get("model_type") != "deformable_detr":
        raise refuse("model_type", "is not 'deformable_detr'")
    backbone_config = config.get("backbone_config") or {}
    if not isinstance(backbone_config, Mapping):
        raise refuse("backbone_config", "is not a JSON object")
    if backbone_config:
        if backbone_config.get("model_type") != "timm_backbone":
            raise InputValueError(f"{source}: backbone_config.model_type={backbone_config.get('model_type')!r}: only "
                                  f"timm ResNet backbones (as the released checkpoints have) can be converted")
        backbone = backbone_config.get("backbone")
        dilation = backbone_config.get("output_stride") == 16 or bool(config.get("dilation"))
    else:
        if config.get("use_timm_backbone", True) is False:
            raise refuse("use_timm_backbone", "(transformers' own ResNet): only timm ResNet backbones can be converted")
        backbone = config.get("backbone", "resnet50")
        dilation = bool(config.get("dilation"))
    if backbone not in RESNETS:
        raise InputValueError(f"{source}: backbone {backbone!r} is not one of {', '.join(RESNETS)}")
    for field, value in (("activation_function", "relu"), ("num_channels", 3)):
        if config.get(field, value) != value:
            raise refuse(field, f"is not {value!r}, the only value this project builds")
    for shared, encoder, decoder, default in (("nheads", "encoder_attention_heads", "decoder_attention_heads", 8),
                                              ("dim_feedforward", "encoder_ffn_dim", "decoder_ffn_dim", 1024)):
        if integer(encoder, default) != integer(decoder, default):
            raise InputValueError(f"{source}: {encoder}={config.get(encoder)} and {decoder}={config.get(decoder)} "
                                  f"differ; this project has one --{shared} for both")
    two_stage = _field(config, "two_stage", False, bool, source)
    with_box_refine = _field(config, "with_box_refine", False, bool, source)
    if two_stage and not with_box_refine:
        raise refuse("two_stage", "needs with_box_refine")
    if config.get("position_embedding_type", "sine") not in ("sine", "learned"):
        raise refuse("position_embedding_type", "is not 'sine' or 'learned'")
    args = get_args_parser().parse_args([])
    values = {
        "backbone": backbone, "dilation": dilation, "backbone_weights": "none",
        "num_feature_levels": integer("num_feature_levels", 4), "with_box_refine": with_box_refine,
        "two_stage": two_stage, "hidden_dim": integer("d_model", 256),
        "enc_layers": integer("encoder_layers", 6), "dec_layers": integer("decoder_layers", 6),
        "nheads": integer("encoder_attention_heads", 8), "dim_feedforward": integer("encoder_ffn_dim", 1024),
        "enc_n_points": integer("encoder_n_points", 4), "dec_n_points": integer("decoder_n_points", 4),
        # two-stage keeps two_stage_num_proposals queries; this project's --num_queries is that number
        "num_queries": integer("two_stage_num_proposals" if two_stage else "num_queries", 300),
        "position_embedding": config.get("position_embedding_type", "sine"), "num_classes": num_classes,
    }
    for field, dest, default in TRAINING_SETTINGS:
        values[dest] = _field(config, field, default, bool if isinstance(default, bool) else float, source)
    vars(args).update(values)
    return args


def hf_config_from_args(args: argparse.Namespace, names: Mapping[int, str]) -> tuple[dict, list[str]]:
    """A ``config.json`` for ``transformers`` describing this project's model of ``args``, its
    training settings and class ``names`` (label -> name; ``LABEL_i`` where none); and notes on
    the settings it cannot carry."""
    labels = {str(i): names.get(i, f"LABEL_{i}") for i in range(args.num_classes)}
    config = {
        "architectures": ["DeformableDetrForObjectDetection"], "model_type": "deformable_detr",
        "use_timm_backbone": True, "backbone": args.backbone, "use_pretrained_backbone": False,
        "dilation": args.dilation, "num_channels": 3, "num_feature_levels": args.num_feature_levels,
        "d_model": args.hidden_dim, "encoder_layers": args.enc_layers, "decoder_layers": args.dec_layers,
        "encoder_attention_heads": args.nheads, "decoder_attention_heads": args.nheads,
        "encoder_ffn_dim": args.dim_feedforward, "decoder_ffn_dim": args.dim_feedforward,
        "encoder_n_points": args.enc_n_points, "decoder_n_points": args.dec_n_points,
        "num_queries": args.num_queries, "two_stage_num_proposals": args.num_queries, "two_stage": args.two_stage,
        "with_box_refine": args.with_box_refine, "position_embedding_type": args.position_embedding,
        "activation_function": "relu",
        # the original's --dropout also drops the feed-forward activations and the decoder's
        # self-attention weights, which transformers sets apart (and leaves at 0 by default)
        "activation_dropout": args.dropout, "attention_dropout": args.dropout,
        "id2label": labels, "label2id": {name: int(i) for i, name in labels.items()},
        # distinct per-layer heads with box refinement; transformers would otherwise tie them
        "tie_word_embeddings": not args.with_box_refine,
    }
    notes = []
    for field, dest, default in TRAINING_SETTINGS:
        value = getattr(args, dest)
        if field in WHOLE_NUMBERS:
            if not float(value).is_integer():
                notes.append(f"transformers 5 takes only whole numbers for {field}: config.json leaves it out "
                             f"(transformers then uses {default}), not --{dest} {value}")
                continue
            value = int(value)
        config[field] = value
    if args.cls_loss_coef != 1:
        notes.append(f"transformers weighs the classification loss 1 and config.json has no setting for it; "
                     f"this checkpoint was trained with --cls_loss_coef {args.cls_loss_coef}")
    return config, notes


def training_flags(args: argparse.Namespace, script: str) -> list[str]:
    """The main.py flags that set ``args``' training settings where ``configs/<script>.sh`` sets
    others."""
    scripted = get_args_parser().parse_args(config_flags(script))
    words = []
    for _, dest, _ in TRAINING_SETTINGS:
        value = getattr(args, dest)
        if value != getattr(scripted, dest):
            # the scripts keep the auxiliary losses, so only switching them off can differ
            words.append("--no_aux_loss" if dest == "aux_loss" else f"--{dest} {value}")
    return words


def names_path(checkpoint: Path) -> Path:
    """Where the class names of a checkpoint of this project go: beside it, ``.names.json`` for
    its suffix."""
    return checkpoint.with_suffix(".names.json")


def class_names(config: Mapping, source: str) -> dict[str, str]:
    """``config.json``'s ``id2label``, unless it holds only transformers' placeholders (``LABEL_3``)."""
    id2label = config.get("id2label") or {}
    if not isinstance(id2label, Mapping):
        raise InputValueError(f"{source}: id2label is not a JSON object")
    names = {str(k): str(v) for k, v in id2label.items()}
    return {} if all(v == f"LABEL_{k}" for k, v in names.items()) else names


def read_class_names(path: Path, num_classes: int) -> dict[int, str]:
    """Label -> name from a names file (an ``{id: name}`` object, as ``--from_hf`` writes, or a
    list indexed by label)."""
    data = _read_json(path)
    if not isinstance(data, (dict, list)):
        raise InputValueError(f"{path}: expected an {{id: name}} object or a list of names, got {type(data).__name__}")
    names = {}
    for key, name in data.items() if isinstance(data, dict) else enumerate(data):
        try:
            label = int(key)
        except ValueError:
            raise InputValueError(f"{path}: {key!r} is not an integer label") from None
        if not 0 <= label < num_classes:
            raise InputValueError(f"{path}: label {label} is outside the model's {num_classes} classes")
        if not isinstance(name, str):
            raise InputValueError(f"{path}: the name of label {label} is not a string: {name!r}")
        names[label] = name
    return names


# ------------------------------------------------------------------------------------------
# state_dict <-> state_dict

def _read_hf_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types on foreign bytes
            raise InputValueError(f"{path} is not a readable safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputValueError(f"{path} is not a readable weights file (read with weights_only=True): "
                              f"{str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputValueError(f"{path} is not a state_dict: expected a dict of tensors")
    return state


def _used_copy(kind: str, layer: int, args: argparse.Namespace) -> str | None:
    """Which of transformers 5's two copies of a head its forward pass uses: ``output`` (the
    detector's ``class_embed`` / ``bbox_embed``), ``decoder`` (``model.decoder.*``), or None for
    both (a box head of a decoder layer but the last: the decoder's copy refines the reference
    boxes, the detector's predicts the layer's boxes)."""
    if args.two_stage and layer == args.dec_layers:
        return "decoder"  # the encoder's proposals
    if kind == "class_embed" or layer == args.dec_layers - 1:
        return "output"  # the decoder runs no class head, and nothing reads its last refinement
    return None


def _resolve_heads(state: dict[str, Tensor], own: Mapping[str, Tensor], args: argparse.Namespace, source: str,
                   box_heads: str | None) -> None:
    """Give each head key of the model (``class_embed.N.*``, ``bbox_embed.N.*``, and their aliases
    under ``transformer.decoder.``) the file's value. Where the file's two copies of a head differ
    (transformers 5 keeps the decoder's apart), the one its forward pass uses is taken; where it
    uses both, ``box_heads`` chooses. A layer the file leaves out gets layer 0's head, to which
    transformers ties the others by default (``tie_word_embeddings``), saving layer 0's alone."""
    heads = args.dec_layers + (1 if args.two_stage else 0)
    aliased = {kind for kind in ("class_embed", "bbox_embed") if any(k.startswith(f"transformer.decoder.{kind}.")
                                                                     for k in own)}
    copies: dict[tuple[str, int], dict[str, dict[str, Tensor]]] = {}
    for key, value in state.items():
        match = HEAD.match(key)
        # a decoder copy the model has no alias for is left to load_weights to report
        if match and int(match[3]) < heads and (not match[1] or match[2] in aliased):
            copy = copies.setdefault((match[2], int(match[3])), {"output": {}, "decoder": {}})
            copy["decoder" if match[1] else "output"][match[4]] = value
    chosen, conflicts = {}, []
    for (kind, layer), copy in copies.items():
        output, decoder = copy["output"], copy["decoder"]
        if all(torch.equal(output[name], decoder[name]) for name in output.keys() & decoder.keys()):
            chosen[kind, layer] = {**decoder, **output}
            continue
        used = _used_copy(kind, layer, args) or box_heads
        if used is None:
            conflicts.append(layer)
        else:
            chosen[kind, layer] = {**output, **decoder} if used == "decoder" else {**decoder, **output}
    if conflicts:
        layers = ", ".join(map(str, sorted(conflicts)))
        raise InputValueError(
            f"{source}: model.decoder.bbox_embed.N differs from bbox_embed.N for N = {layers}. transformers 5 keeps "
            f"two copies of these box heads: the decoder's refines the reference boxes from one decoder layer to the "
            f"next, the detector's predicts each layer's boxes, and fine-tuning there trains the detector's alone "
            f"(the refined boxes are detached). The original, and this project, have one head for both, so this "
            f"model cannot be represented as it is; --box_heads decoder takes the decoder's copies (the final "
            f"detections stay transformers'; the other layers' predictions, which only the auxiliary losses use, "
            f"change), --box_heads output the detector's (the refinement changes, and with it the detections)")
    for kind in ("class_embed", "bbox_embed"):
        for layer in range(1, heads):
            if (kind, 0) in chosen:
                chosen.setdefault((kind, layer), chosen[kind, 0])
    for key in own:
        match = HEAD.match(key)
        if match and match[4] in chosen.get((match[2], int(match[3])), {}):
            state[key] = chosen[match[2], int(match[3])][match[4]]


def _check_shared(state: Mapping[str, Tensor], own: Mapping[str, Tensor], source: str) -> None:
    """Without box refinement this project's model, as the original, has one class head and one
    box head for all decoder layers, listed under each layer's keys: the file's values for them
    must agree."""
    groups: dict[tuple[int, int], list[str]] = {}
    for key, tensor in own.items():
        groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(key)
    for keys in groups.values():
        present = [k for k in keys if k in state]
        for key in present[1:]:
            if not torch.equal(state[key], state[present[0]]):
                raise InputValueError(f"{source}: {key} differs from {present[0]}; without box refinement the original "
                                      f"(and this project) shares one head across the decoder layers: distinct "
                                      f"per-layer heads need box refinement")


def hf_to_ours(hf_state: Mapping[str, Tensor], own: Mapping[str, Tensor], args: argparse.Namespace,
               source: str, box_heads: str | None = None) -> dict[str, Tensor]:
    """This project's ``state_dict`` (``own`` is the target model's) of the model ``args``
    describes, from ``transformers`` weights; ``box_heads`` (``decoder`` or ``output``) settles
    box heads whose two transformers 5 copies differ."""
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        current = _apply_all(key, LEGACY_TO_CURRENT)
        if "num_batches_tracked" in current:
            continue
        match = QKV.match(current)
        if match:
            layer, projection, kind = match.groups()
            qkv.setdefault((layer, kind), {})[projection] = value
            continue
        ours = _rename(current, TO_OURS)
        if ours is None:
            unknown.append(key)
            continue
        if ours in state and not torch.equal(state[ours], value):
            raise InputValueError(f"{source}: {origin[ours]} and {key} name the same tensor (transformers 4.x's "
                                  f"and 5's names) but hold different values")
        state[ours], origin[ours] = value, key
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise InputValueError(f"{source}: decoder layer {layer}'s self-attention lacks "
                                  f"{sorted({'q', 'k', 'v'} - set(parts))}_proj.{kind}")
        shapes = {f"{p}_proj": tuple(parts[p].shape) for p in "qkv"}
        if len(set(shapes.values())) > 1:
            raise InputValueError(f"{source}: decoder layer {layer}'s self-attention projections' {kind} shapes "
                                  f"differ: {shapes}")
        state[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    if unknown:
        raise InputValueError(f"{source}: keys this converter does not know: {unknown[:10]}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    _resolve_heads(state, own, args, source, box_heads)
    _check_shared(state, own, source)
    return state


def ours_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``transformers`` weights, under the published key names (a learned position embedding also
    under transformers 5's), of this project's ``state_dict``."""
    hf: dict[str, Tensor] = {}
    for key, value in state.items():
        in_proj = IN_PROJ.match(key)
        if in_proj:
            layer, kind = in_proj.groups()
            for projection, part in zip("qkv", value.chunk(3)):
                hf[_apply_all(f"model.decoder.layers.{layer}.self_attn.{projection}_proj.{kind}",
                              CURRENT_TO_LEGACY)] = part.clone()
            continue
        current = _rename(key, TO_HF)
        if current is None:
            raise InputValueError(f"no transformers name for {key}")
        # a copy each: the heads this project shares across layers are stored once per layer there
        hf[_apply_all(current, CURRENT_TO_LEGACY)] = value.detach().clone().contiguous()
        if CURRENT_TOO.match(current):
            hf[current] = value.detach().clone().contiguous()
    return hf


# ------------------------------------------------------------------------------------------
# The two directions

def _hf_files(source: Path) -> tuple[Path, Path]:
    """``(config.json, weights file)`` of a transformers folder, or of a weights file with its
    ``config.json`` beside it."""
    if source.is_dir():
        weights = next((source / name for name in WEIGHT_FILES if (source / name).is_file()), None)
        if weights is None:
            raise InputFileNotFoundError(f"{source} holds neither {' nor '.join(WEIGHT_FILES)}")
        folder = source
    elif source.is_file():
        weights, folder = source, source.parent
    else:
        raise InputFileNotFoundError(f"{source} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        raise InputFileNotFoundError(f"{config} does not exist; it tells the variant")
    return config, weights


def _read_hf_config(path: Path) -> dict:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise InputValueError(f"{path} is not a JSON object")
    return config


def from_hf(source: Path, box_heads: str | None = None) -> tuple[dict, list[str]]:
    """This project's checkpoint ``{'model', 'args'}`` of a transformers checkpoint, and the
    main.py flags that build its model (checked by loading the weights into that model);
    ``box_heads`` as for :func:`hf_to_ours`."""
    config_path, weights_path = _hf_files(source)
    config = _read_hf_config(config_path)
    hf_state = _read_hf_weights(weights_path)
    # transformers 5, tying the detector's heads to the decoder's (two-stage), saves the decoder's alone
    head = next((hf_state[k] for k in ("class_embed.0.weight", "model.decoder.class_embed.0.weight")
                 if k in hf_state), None)
    if head is None or head.dim() != 2:
        raise InputValueError(f"{weights_path} has no class_embed.0.weight matrix: not a "
                              f"DeformableDetrForObjectDetection")
    args = args_from_hf_config(config, num_classes=head.shape[0], source=str(config_path))
    model, _, _ = build_model(args)
    state = hf_to_ours(hf_state, model.state_dict(), args, str(weights_path), box_heads)
    load_weights(model, state, str(weights_path))
    config_name, extra = closest_config(args)
    flags = [f"configs/{config_name}.sh"] + ([describe_flags({k: v[0] for k, v in extra.items()})] if extra else [])
    return {"model": model.state_dict(), "args": args}, flags


def to_hf(checkpoint_path: Path, names: Path | None = None,
          ema: bool = False) -> tuple[dict, dict[str, Tensor], list[str]]:
    """``(config.json contents, weights, notes)`` for transformers of one of this project's
    checkpoints (its averaged weights with ``ema``), with the class names of the ``names`` file if
    given; the notes name training settings ``config.json`` cannot carry."""
    checkpoint = load_checkpoint(checkpoint_path)
    saved = checkpoint.get("args")
    if not isinstance(saved, argparse.Namespace):
        raise InputValueError(f"{checkpoint_path} has no 'args' entry to tell its variant")
    args = get_args_parser().parse_args([])
    vars(args).update(vars(saved))
    if args.backbone not in RESNETS or args.backbone_width != 64 or args.backbone_norm != "frozen":
        raise InputValueError(f"{checkpoint_path}: backbone {args.backbone} (width {args.backbone_width}, "
                              f"{args.backbone_norm} BatchNorm) has no transformers counterpart; only torchvision's "
                              f"{', '.join(RESNETS)} with frozen BatchNorm do")
    args.backbone_weights = "none"
    model, _, _ = build_model(args)
    load_weights(model, checkpoint_weights(checkpoint, checkpoint_path, ema), str(checkpoint_path))
    config, notes = hf_config_from_args(args, read_class_names(names, args.num_classes) if names else {})
    return config, ours_to_hf(model.state_dict()), notes


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that the direction cannot write, before anything is converted."""
    out = args.out
    if args.from_hf:
        if out.is_dir():
            raise InputValueError(f"--out {out} is a folder; --from_hf writes a checkpoint file")
        if out.exists() and any(out.samefile(p) for p in _hf_files(args.from_hf)):
            raise InputValueError(f"--out {out} is a file that --from_hf {args.from_hf} reads")
    elif out.exists() and not out.is_dir():
        raise InputValueError(f"--out {out} is a file; --to_hf writes a folder (config.json and model.safetensors)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from_hf", type=Path, help="transformers folder (or weights file beside its config.json)")
    direction.add_argument("--to_hf", type=Path, help="checkpoint of this project")
    parser.add_argument("--out", type=Path, required=True,
                        help="the checkpoint to write (--from_hf), or the folder to write (--to_hf)")
    parser.add_argument("--ema", action="store_true",
                        help="with --to_hf, convert the checkpoint's averaged weights (of a run with main.py --ema)")
    parser.add_argument("--box_heads", choices=("decoder", "output"),
                        help="with --from_hf, for a box-refinement model whose transformers 5 copies of a box head "
                             "differ (model.decoder.bbox_embed.N, which refines the reference boxes, and bbox_embed.N, "
                             "which predicts the layer's boxes): take this copy for both roles. 'decoder' keeps "
                             "transformers' final detections")
    args = parser.parse_args(argv)
    try:
        if args.box_heads and not args.from_hf:
            raise InputValueError("--box_heads applies to --from_hf only")
        if args.ema and not args.to_hf:
            raise InputValueError("--ema applies to --to_hf only")
        _check_out(args)
        if args.from_hf:
            checkpoint, flags = from_hf(args.from_hf, args.box_heads)
            config_path = _hf_files(args.from_hf)[0]
            names = class_names(_read_hf_config(config_path), str(config_path))
            try:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                save_on_main(checkpoint, args.out)
                stale = not names and names_path(args.out).is_file()
                if names:
                    names_path(args.out).write_text(json.dumps(names, indent=1) + "\n")
                elif stale:  # the names of the checkpoint just replaced would be taken for this one's
                    names_path(args.out).unlink()
            except OSError as err:
                raise InputValueError(f"cannot write {err.filename or args.out}: {err.strerror or err}") from None
            command = " ".join([f"./{flags[0]}", *flags[1:], "--resume", str(args.out), "--eval", "--coco_path",
                                "./data/coco"])
            print(f"wrote {args.out}; its model is built by {' '.join(flags)}, e.g.\n  {command}")
            training = training_flags(checkpoint["args"], Path(flags[0]).stem)
            if training:
                print(f"config.json's training settings differ from the script's; to train with them, add "
                      f"{' '.join(training)}")
            if names:
                print(f"wrote its class names to {names_path(args.out)}: tools/infer.py --class_names "
                      f"{names_path(args.out)}")
            elif stale:
                print(f"removed {names_path(args.out)}, the class names of the checkpoint replaced: this one has none")
        else:
            from safetensors.torch import save_file

            # the names file --from_hf writes beside a checkpoint, where there is one
            names = names_path(args.to_hf) if args.to_hf.is_file() and names_path(args.to_hf).is_file() else None
            config, weights, notes = to_hf(args.to_hf, names, args.ema)
            try:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
            except OSError as err:
                raise InputValueError(f"cannot write {err.filename or args.out}: {err.strerror or err}") from None
            print(f"wrote {args.out / 'config.json'} and {args.out / 'model.safetensors'}"
                  + (f", with the class names of {names}" if names else ""))
            for note in notes:
                print(f"note: {note}")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
