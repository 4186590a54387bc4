"""Convert Deformable DETR weights between Hugging Face ``transformers`` and this project.

    python tools/convert_checkpoint.py --from_hf DIR_OR_FILE --out converted.pth
    python tools/convert_checkpoint.py --to_hf checkpoint.pth --out DIR

``--from_hf`` reads a ``transformers`` folder (``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``; or one of those files, with ``config.json`` beside it), such as the released
``SenseTime/deformable-detr*`` checkpoints, works out the variant from ``config.json``, and writes a
checkpoint of this project (``{'model', 'args'}``) that ``--resume`` / ``--eval`` and ``--finetune``
load with every key checked; it prints the ``configs/`` script and flags that build that model.
``--to_hf`` writes ``config.json`` and ``model.safetensors`` that
``DeformableDetrForObjectDetection.from_pretrained`` loads.

Both the key names of the published checkpoints (written by ``transformers`` 4.x, e.g.
``model.backbone.conv_encoder.model.*``, ``layers.N.fc1``, ``self_attn.out_proj``) and those of
``transformers`` 5 (``model.backbone.model.*``, ``layers.N.mlp.fc1``, ``self_attn.o_proj``) are read;
the published names are written. Class indices stay as they are (91 COCO slots). Nothing here
imports ``transformers``: the files are read and written directly.
"""
import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from util.checkpoint import load_checkpoint, load_weights, save_on_main  # noqa: E402
from util.errors import InputError, InputFileNotFoundError, InputValueError  # noqa: E402
from util.flags import closest_config, describe_flags, get_args_parser  # noqa: E402

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
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.layers\.(\d+)\.mlp\.fc([12])\.", r".layers.\1.fc\2."),
]
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

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputValueError(f"{path} is not a readable JSON file: {err}") from None


def args_from_hf_config(config: Mapping, num_classes: int, source: str) -> argparse.Namespace:
    """main.py's flags for the model a ``transformers`` ``config.json`` describes; what this
    project cannot build is an error naming the field."""
    def refuse(field: str, why: str) -> InputValueError:
        return InputValueError(f"{source}: {field}={config.get(field)!r} {why}")

    if config.get("model_type") != "deformable_detr":
        raise refuse("model_type", "is not 'deformable_detr'")
    backbone_config = config.get("backbone_config") or {}
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
    for shared, (encoder, decoder) in {"nheads": ("encoder_attention_heads", "decoder_attention_heads"),
                                       "dim_feedforward": ("encoder_ffn_dim", "decoder_ffn_dim")}.items():
        if config.get(encoder, 8 if shared == "nheads" else 1024) != config.get(decoder, 8 if shared == "nheads"
                                                                               else 1024):
            raise InputValueError(f"{source}: {encoder}={config.get(encoder)} and {decoder}={config.get(decoder)} "
                                  f"differ; this project has one --{shared} for both")
    two_stage = bool(config.get("two_stage", False))
    with_box_refine = bool(config.get("with_box_refine", False))
    if two_stage and not with_box_refine:
        raise refuse("two_stage", "needs with_box_refine")
    args = get_args_parser().parse_args([])
    values = {
        "backbone": backbone, "dilation": dilation, "backbone_weights": "none",
        "num_feature_levels": config.get("num_feature_levels", 4), "with_box_refine": with_box_refine,
        "two_stage": two_stage, "hidden_dim": config.get("d_model", 256),
        "enc_layers": config.get("encoder_layers", 6), "dec_layers": config.get("decoder_layers", 6),
        "nheads": config.get("encoder_attention_heads", 8), "dim_feedforward": config.get("encoder_ffn_dim", 1024),
        "enc_n_points": config.get("encoder_n_points", 4), "dec_n_points": config.get("decoder_n_points", 4),
        # two-stage keeps two_stage_num_proposals queries; this project's --num_queries is that number
        "num_queries": config.get("two_stage_num_proposals", 300) if two_stage else config.get("num_queries", 300),
        "position_embedding": config.get("position_embedding_type", "sine"), "num_classes": num_classes,
    }
    if values["position_embedding"] not in ("sine", "learned"):
        raise refuse("position_embedding_type", "is not 'sine' or 'learned'")
    vars(args).update(values)
    return args


def hf_config_from_args(args: argparse.Namespace) -> dict:
    """A ``config.json`` for ``transformers`` describing this project's model of ``args``."""
    labels = {str(i): f"LABEL_{i}" for i in range(args.num_classes)}
    return {
        "architectures": ["DeformableDetrForObjectDetection"], "model_type": "deformable_detr",
        "use_timm_backbone": True, "backbone": args.backbone, "use_pretrained_backbone": False,
        "dilation": args.dilation, "num_channels": 3, "num_feature_levels": args.num_feature_levels,
        "d_model": args.hidden_dim, "encoder_layers": args.enc_layers, "decoder_layers": args.dec_layers,
        "encoder_attention_heads": args.nheads, "decoder_attention_heads": args.nheads,
        "encoder_ffn_dim": args.dim_feedforward, "decoder_ffn_dim": args.dim_feedforward,
        "encoder_n_points": args.enc_n_points, "decoder_n_points": args.dec_n_points,
        "num_queries": args.num_queries, "two_stage_num_proposals": args.num_queries, "two_stage": args.two_stage,
        "with_box_refine": args.with_box_refine, "position_embedding_type": args.position_embedding,
        "activation_function": "relu", "dropout": args.dropout, "focal_alpha": args.focal_alpha,
        "id2label": labels, "label2id": {name: int(i) for i, name in labels.items()},
        # distinct per-layer heads with box refinement; transformers would otherwise tie them
        "tie_word_embeddings": not args.with_box_refine,
    }


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputValueError(f"{path} is not a readable weights file (read with weights_only=True): "
                              f"{str(err).splitlines()[0]}") from None


def _fill_heads(state: dict[str, Tensor], prefix: str, count: int) -> None:
    """Fill in the per-layer heads ``prefix.{1..count-1}.*`` that a file leaves out because
    transformers tied them to ``prefix.0.*`` (its default, ``tie_word_embeddings``)."""
    first = {k[len(prefix) + 3:]: v for k, v in state.items() if k.startswith(f"{prefix}.0.")}
    for layer in range(1, count):
        for name, value in first.items():
            state.setdefault(f"{prefix}.{layer}.{name}", value)


def _fill_and_check_aliases(state: dict[str, Tensor], own: Mapping[str, Tensor], source: str) -> None:
    """This project's model lists some tensors under several keys (the original's shared heads:
    one class and box head for all decoder layers without box refinement, and the box heads also
    as ``transformer.decoder.bbox_embed`` with it). Fill in the keys the file lacks from their
    aliases, and refuse values that differ between aliases: such heads cannot be represented."""
    groups: dict[tuple[int, int], list[str]] = {}
    for key, tensor in own.items():
        groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(key)
    for keys in groups.values():
        present = [k for k in keys if k in state]
        if len(keys) < 2 or not present:
            continue
        for key in keys:
            if key not in state:
                state[key] = state[present[0]]
            elif not torch.equal(state[key], state[present[0]]):
                raise InputValueError(f"{source}: {key} differs from {present[0]}, which this variant shares with "
                                      f"it (as the original does): distinct per-layer heads need box refinement")


def hf_to_ours(hf_state: Mapping[str, Tensor], own: Mapping[str, Tensor], args: argparse.Namespace,
               source: str) -> dict[str, Tensor]:
    """This project's ``state_dict`` (``own`` is the target model's) of the model ``args``
    describes, from ``transformers`` weights."""
    state, unknown = {}, []
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
        else:
            state[ours] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise InputValueError(f"{source}: decoder layer {layer}'s self-attention lacks "
                                  f"{sorted({'q', 'k', 'v'} - set(parts))}_proj.{kind}")
        state[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    if unknown:
        raise InputValueError(f"{source}: keys this converter does not know: {unknown[:10]}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    heads = args.dec_layers + (1 if args.two_stage else 0)
    for prefix in ("class_embed", "bbox_embed"):
        _fill_heads(state, prefix, heads)
    _fill_and_check_aliases(state, own, source)
    return state


def ours_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``transformers`` weights, under the published key names, of this project's ``state_dict``."""
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


def class_names(config: Mapping) -> dict[str, str]:
    """``config.json``'s ``id2label``, unless it holds only transformers' placeholders (``LABEL_3``)."""
    names = {str(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    return {} if all(v == f"LABEL_{k}" for k, v in names.items()) else names


def from_hf(source: Path) -> tuple[dict, list[str]]:
    """This project's checkpoint ``{'model', 'args'}`` of a transformers checkpoint, and the
    main.py flags that build its model (checked by loading the weights into that model)."""
    config_path, weights_path = _hf_files(source)
    config = _read_json(config_path)
    hf_state = _read_hf_weights(weights_path)
    head = hf_state.get("class_embed.0.weight")
    if head is None:
        raise InputValueError(f"{weights_path} has no class_embed.0.weight: not a DeformableDetrForObjectDetection")
    args = args_from_hf_config(config, num_classes=head.shape[0], source=str(config_path))
    model, _, _ = build_model(args)
    state = hf_to_ours(hf_state, model.state_dict(), args, str(weights_path))
    load_weights(model, state, str(weights_path))
    config_name, extra = closest_config(args)
    flags = [f"configs/{config_name}.sh"] + ([describe_flags({k: v[0] for k, v in extra.items()})] if extra else [])
    return {"model": model.state_dict(), "args": args}, flags


def to_hf(checkpoint_path: Path) -> tuple[dict, dict[str, Tensor]]:
    """``(config.json contents, weights)`` for transformers of one of this project's checkpoints."""
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
    load_weights(model, checkpoint["model"], str(checkpoint_path))
    return hf_config_from_args(args), ours_to_hf(model.state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from_hf", type=Path, help="transformers folder (or weights file beside its config.json)")
    direction.add_argument("--to_hf", type=Path, help="checkpoint of this project")
    parser.add_argument("--out", type=Path, required=True,
                        help="the checkpoint to write (--from_hf), or the folder to write (--to_hf)")
    args = parser.parse_args(argv)
    try:
        if args.from_hf:
            checkpoint, flags = from_hf(args.from_hf)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_on_main(checkpoint, args.out)
            command = " ".join([f"./{flags[0]}", *flags[1:], "--resume", str(args.out), "--eval", "--coco_path",
                                "./data/coco"])
            print(f"wrote {args.out}; its model is built by {' '.join(flags)}, e.g.\n  {command}")
            names = class_names(_read_json(_hf_files(args.from_hf)[0]))
            if names:
                names_path = args.out.with_suffix(".names.json")
                names_path.write_text(json.dumps(names, indent=1) + "\n")
                print(f"wrote its class names to {names_path}: tools/infer.py --class_names {names_path}")
        else:
            from safetensors.torch import save_file

            config, weights = to_hf(args.to_hf)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
            print(f"wrote {args.out / 'config.json'} and {args.out / 'model.safetensors'}")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
