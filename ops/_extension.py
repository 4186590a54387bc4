"""The compiled kernels ``ops._C`` and their ``torch.library`` registrations.

Importing ``ops._C`` defines the operators ``deformable_detr::ms_deform_attn`` and
``deformable_detr::ms_deform_attn_backward`` with CPU (and, when built with CUDA, CUDA)
kernels. This module adds what ``torch.compile`` and ``torch.export`` need on top: fake
(meta) implementations of both and the autograd formula of the forward.
"""
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

try:
    from . import _C
except ImportError as exc:
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

BUILD_COMMAND = "python ops/setup.py build_ext --inplace"


def unavailable_reason(device_type: str) -> Optional[str]:
    """Why the compiled kernel cannot run on ``device_type``; ``None`` when it can."""
    if _C is None:
        return (f"the compiled extension ops._C is not built ({_IMPORT_ERROR}); "
                f"build it with `{BUILD_COMMAND}`")
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if _C.with_cuda:
            return None
        return "ops._C was built without its CUDA kernel (nvcc was not found or failed)"
    return f"ops._C has no kernel for device type {device_type!r}"


def _register() -> None:
    @torch.library.register_fake("deformable_detr::ms_deform_attn")
    def _forward_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        batch, _, heads, channels = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * channels))

    @torch.library.register_fake("deformable_detr::ms_deform_attn_backward")
    def _backward_fake(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                       level_start_index: Tensor, sampling_locations: Tensor,
                       attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
                attention_weights.new_empty(attention_weights.shape))

    def _setup_context(ctx: Any, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    def _backward(ctx: Any, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors)
        grad_value, grad_locations, grad_weights = torch.ops.deformable_detr.ms_deform_attn_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights)
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd("deformable_detr::ms_deform_attn", _backward,
                                    setup_context=_setup_context)


if _C is not None:
    _register()
