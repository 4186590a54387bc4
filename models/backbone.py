"""ResNet backbone with frozen BatchNorm, and its pairing with the positional encoding."""
import os
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from util.misc import NestedTensor

from .position_encoding import build_position_encoding

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def _stage_out_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage: those of its last block's last convolution."""
    last_block = stage[-1]
    convs = [m for m in last_block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def load_resnet_weights(resnet: nn.Module, name: str, weights: str) -> None:
    """Load ``weights`` into a torchvision ResNet.

    ``weights`` is ``'imagenet'`` (torchvision's ImageNet V1 weights, taken from the torch hub
    cache or downloaded), ``'none'`` (keep the random initialisation) or the path of a
    torchvision ResNet ``state_dict``.
    """
    if weights == "none":
        return
    if weights == "imagenet":
        url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        try:
            state_dict = torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
        except (OSError, RuntimeError) as err:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise RuntimeError(
                f"cannot get torchvision's ImageNet weights for {name} from {url} ({err}). "
                f"Either put that file in {cache}, or pass --backbone_weights none (random "
                f"initialisation) or --backbone_weights /path/to/{name}.pth (a torchvision "
                f"{name} state_dict)") from err
        source = url
    else:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--backbone_weights {weights}: no such file (expected 'imagenet', "
                                    f"'none' or the path of a torchvision {name} state_dict)")
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        source = weights
    try:
        missing, unexpected = resnet.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{source} is not a torchvision {name} state_dict: {err}") from err
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{source} is not a torchvision {name} state_dict: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}")


class Backbone(nn.Module):
    """A torchvision ResNet with frozen BatchNorm returning the last one or three stages.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        train_backbone: if False every parameter is frozen; if True only ``layer2``-``layer4``
            train (the stem and ``layer1`` are always frozen).
        return_interm_layers: return ``layer2``-``layer4`` (strides 8/16/32) instead of ``layer4``.
        dilation: replace the stride of ``layer4`` by dilation (DC5), halving its stride.
        weights: see :func:`load_resnet_weights`.
    """

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 weights: str = "none"):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"--backbone must be one of {', '.join(RESNETS)}, got {name!r}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation (DC5) needs a bottleneck ResNet (resnet50, resnet101); "
                             f"torchvision's {name} has no dilated blocks")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d)
        load_resnet_weights(resnet, name, weights)
        for param_name, parameter in resnet.named_parameters():
            trainable_stage = any(stage in param_name for stage in ("layer2", "layer3", "layer4"))
            if not (train_backbone and trainable_stage):
                parameter.requires_grad_(False)
        stages = ["layer2", "layer3", "layer4"] if return_interm_layers else ["layer4"]
        self.strides = [8, 16, 32] if return_interm_layers else [32]
        if dilation:
            self.strides[-1] //= 2
        self.num_channels = [_stage_out_channels(getattr(resnet, stage)) for stage in stages]
        self.body = IntermediateLayerGetter(resnet, return_layers={stage: str(i) for i, stage in enumerate(stages)})

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        """Feature maps ``(B, C_l, H_l, W_l)`` with their padding masks ``(B, H_l, W_l)``."""
        features = self.body(tensor_list.tensors)
        out: Dict[str, NestedTensor] = {}
        for name, x in features.items():
            mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, mask)
        return out


class Joiner(nn.Sequential):
    """``Sequential(backbone, position_embedding)``: the pairing fixes the ``backbone.0.*`` /
    ``backbone.1.*`` checkpoint keys of the original."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[Tensor]]:
        features = self[0](tensor_list)
        out = [features[name] for name in sorted(features)]
        pos = [self[1](x).to(x.tensors.dtype) for x in out]
        return out, pos


def build_backbone(args) -> Joiner:
    position_embedding = build_position_encoding(args)
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0,
                        return_interm_layers=args.num_feature_levels > 1, dilation=args.dilation,
                        weights=args.backbone_weights)
    return Joiner(backbone, position_embedding)
