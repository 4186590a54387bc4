"""ResNet backbone with frozen BatchNorm, and its pairing with the positional encoding."""
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock
from torchvision.ops import misc as tv_misc

from util.errors import InputValueError, MissingPathError, ParameterError
from util.misc import NestedTensor, interpolate_mask

from .position_encoding import build_position_encoding

RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")
# blocks per stage of the basic-block ResNets; resnet10 is not in torchvision (no ImageNet weights)
BASIC_BLOCK_LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


class FrozenBatchNorm2d(tv_misc.FrozenBatchNorm2d):
    """torchvision's frozen BatchNorm (the original's, with the same buffers and formula), applied in
    the input's dtype.

    In float32 this is torchvision's computation, operation for operation. Under autocast the
    convolution before it returns bfloat16 or float16, and torchvision's float32 statistics would
    turn the whole residual stream to float32, to be cast back before every convolution; here the
    folded scale and shift are rounded to the input's dtype instead, so the stream stays in half
    precision (about a tenth of a ResNet-50 forward pass saved on a CPU with AVX-512 BF16).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` to the same shape and dtype."""
        # per channel, the statistics folded into one scale and one shift in float32 (torchvision's
        # operations, element for element), then rounded to the input's dtype
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]


NORM_LAYERS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}


def basic_block_resnet(layers: Sequence[int], base_width: int, norm_layer: type[nn.Module]) -> nn.Sequential:
    """A ResNet of torchvision's ``BasicBlock`` with stage widths ``base_width * (1, 2, 4, 8)``.

    The module names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...) are
    torchvision's, so state_dicts of torchvision's ResNet-18/34 fit when ``base_width`` is 64.
    """
    stem = [("conv1", nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)),
            ("bn1", norm_layer(base_width)), ("relu", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
    stages = []
    in_channels = base_width
    for i, num_blocks in enumerate(layers):
        width, stride = base_width * 2 ** i, 1 if i == 0 else 2
        blocks = []
        for b in range(num_blocks):
            downsample = None
            if b == 0 and (stride != 1 or in_channels != width):
                downsample = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=1, stride=stride, bias=False),
                                           norm_layer(width))
            blocks.append(BasicBlock(in_channels, width, stride if b == 0 else 1, downsample, norm_layer=norm_layer))
            in_channels = width
        stages.append((f"layer{i + 1}", nn.Sequential(*blocks)))
    net = nn.Sequential(OrderedDict(stem + stages))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools CPU tensors in the channels-last layout and returns the input's
    memory format.

    PyTorch's CPU kernel for NCHW pooling is about 10x slower than its channels-last one (13 against
    1.4 ms for the demo's ``(16, 32, 64, 64)`` stem output on 2 threads), enough to be a twentieth
    of the demo's training step. The maximum is exact in either layout and both kernels pass the
    gradient to the first maximum of each window in the same order, so values and gradients are
    the original's bit for bit (tested). Compiled and exported graphs keep the plain pooling.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` to ``(B, C, H_out, W_out)``."""
        if x.device.type != "cpu" or x.dim() != 4 or torch.compiler.is_compiling():
            return super().forward(x)
        pooled = super().forward(x.contiguous(memory_format=torch.channels_last))
        return pooled if x.is_contiguous(memory_format=torch.channels_last) else pooled.contiguous()


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
            raise ParameterError(
                "weights", weights,
                f"cannot be fetched for {name} from {url} ({err}): put that file in {cache}, or use 'none' "
                f"(random initialisation) or the path of a torchvision {name} state_dict") from err
        source = url
    else:
        if not os.path.isfile(weights):
            raise MissingPathError("weights", weights, f"is no file (expected 'imagenet', 'none' or the path of "
                                                     f"a torchvision {name} state_dict)")
        source = weights
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # foreign bytes fail in many ways (UnpicklingError, EOFError, ...)
            raise InputValueError(f"{source} is not a torchvision {name} state_dict saved by torch.save: "
                                  f"{err}") from err
    try:
        missing, unexpected = resnet.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise InputValueError(f"{source} is not a torchvision {name} state_dict: {err}") from err
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if missing or unexpected:
        raise InputValueError(f"{source} is not a torchvision {name} state_dict: missing keys {missing[:8]}, "
                              f"unexpected keys {unexpected[:8]}")


class Backbone(nn.Module):
    """A ResNet returning its last one or three stages, by default torchvision's with frozen BatchNorm.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (torchvision's), or
            ``resnet10`` (one basic block per stage).
        train_backbone: if False every parameter is frozen; if True ``layer2``-``layer4`` train,
            and the stem and ``layer1`` too when ``train_stem``.
        return_interm_layers: return ``layer2``-``layer4`` (strides 8/16/32) instead of ``layer4``.
        dilation: replace the stride of ``layer4`` by dilation (DC5), halving its stride.
        weights: see :func:`load_resnet_weights`.
        norm: ``frozen`` (the original: fixed BatchNorm statistics and affine parameters) or
            ``batch`` (ordinary trainable BatchNorm, for training from scratch).
        train_stem: also train the stem and ``layer1`` (the original freezes them).
        base_width: width of the first stage of a basic-block ResNet (64 in torchvision).
        channels_last: run the ResNet on a channels-last (NHWC) copy of the images, so that its
            feature maps are channels-last too (faster on the CPU; the original's NCHW rounds
            differently). The weights keep their layout, so checkpoints do not change.
    """

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 weights: str = "none", norm: str = "frozen", train_stem: bool = False, base_width: int = 64,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        # Errors name ``name`` "backbone", as the build function and the command line do.
        if name not in RESNETS:
            raise ParameterError("backbone", name, f"is not one of {', '.join(RESNETS)}")
        if norm not in NORM_LAYERS:
            raise ParameterError("norm", norm, f"is not one of {', '.join(NORM_LAYERS)}")
        custom = name == "resnet10" or base_width != 64
        if custom and name not in BASIC_BLOCK_LAYERS:
            raise ParameterError("base_width", base_width, f"needs a basic-block ResNet "
                                 f"({', '.join(BASIC_BLOCK_LAYERS)}), not {name}")
        if dilation and name in BASIC_BLOCK_LAYERS:
            raise ParameterError("dilation", dilation, f"(DC5) needs a bottleneck ResNet (resnet50, resnet101); "
                                 f"the basic blocks of {name} have no dilated form")
        if custom and weights == "imagenet":
            raise ParameterError("weights", weights, f"is not available for {name} of width {base_width} "
                                 f"(torchvision has ImageNet weights for its own ResNets only): use 'none' or "
                                 f"the path of a state_dict")
        norm_layer = NORM_LAYERS[norm]
        if custom:
            resnet = basic_block_resnet(BASIC_BLOCK_LAYERS[name], base_width, norm_layer)
        else:
            resnet = getattr(torchvision.models, name)(
                weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=norm_layer)
        load_resnet_weights(resnet, name, weights)
        pool = resnet.maxpool
        resnet.maxpool = ChannelsLastMaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                               ceil_mode=pool.ceil_mode)
        for param_name, parameter in resnet.named_parameters():
            later_stage = param_name.split(".")[0] in ("layer2", "layer3", "layer4")
            if not (train_backbone and (later_stage or train_stem)):
                parameter.requires_grad_(False)
        stages = ["layer2", "layer3", "layer4"] if return_interm_layers else ["layer4"]
        self.strides = [8, 16, 32] if return_interm_layers else [32]
        if dilation:
            self.strides[-1] //= 2
        self.num_channels = [_stage_out_channels(getattr(resnet, stage)) for stage in stages]
        self.body = IntermediateLayerGetter(resnet, return_layers={stage: str(i) for i, stage in enumerate(stages)})

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        """Feature maps ``(B, C_l, H_l, W_l)`` with their padding masks ``(B, H_l, W_l)``."""
        images = tensor_list.tensors
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.body(images)
        out: dict[str, NestedTensor] = {}
        for name, x in features.items():
            out[name] = NestedTensor(x, interpolate_mask(tensor_list.mask, x.shape[-2:]))
        return out


class Joiner(nn.Sequential):
    """``Sequential(backbone, position_embedding)``: the pairing fixes the ``backbone.0.*`` /
    ``backbone.1.*`` checkpoint keys of the original."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        features = self[0](tensor_list)
        out = [features[name] for name in sorted(features)]
        pos = [self[1](x).to(x.tensors.dtype) for x in out]
        return out, pos


def build_backbone(args) -> Joiner:
    position_embedding = build_position_encoding(args)
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0,
                        return_interm_layers=args.num_feature_levels > 1, dilation=args.dilation,
                        weights=args.backbone_weights, norm=args.backbone_norm,
                        train_stem=args.train_backbone_stem, base_width=args.backbone_width,
                        channels_last=args.channels_last)
    return Joiner(backbone, position_embedding)
