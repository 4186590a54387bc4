"""The compiled kernels ``ops._C`` and their ``torch.library`` registrations.

Importing ``ops._C`` defines the operators ``deformable_detr::ms_deform_attn`` and
``deformable_detr::ms_deform_attn_backward`` with CPU (and, when built with CUDA, CUDA)
kernels. This module adds what ``torch.compile`` and ``torch.export`` need on top: fake
(meta) implementations of both and the autograd formula of the forward.
"""
from typing import Any

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

# The dtypes of value the kernels are compiled for (float8 types are floating point, but not among
# them).
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device_type: str) -> str | None:
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


def dtypes_fit(value: torch.dtype, sampling_locations: torch.dtype, attention_weights: torch.dtype) -> bool:
    """The op's dtype rule: one dtype for all three, or float32 locations and weights beside a
    float16 / bfloat16 value (what :class:`~models.ms_deform_attn.MSDeformAttn` passes under
    autocast, so that sampling positions keep float32 precision)."""
    if sampling_locations != attention_weights:
        return False
    reduced = value in (torch.float16, torch.bfloat16)
    return sampling_locations == value or (reduced and sampling_locations == torch.float32)


def _check_shapes(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> None:
    """The kernels' shape and dtype checks (ValueError, as theirs), in a form that tracing with
    symbolic sizes can record."""
    torch._check_value(value.dim() == 4, lambda: f"value must be (B, S, heads, C), got shape {tuple(value.shape)}")
    torch._check_value(spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2,
                       lambda: f"spatial_shapes must be (levels, 2), got shape {tuple(spatial_shapes.shape)}")
    levels = spatial_shapes.shape[0]
    torch._check_value(level_start_index.dim() == 1 and level_start_index.shape[0] == levels,
                       lambda: f"level_start_index must be (levels,), got shape {tuple(level_start_index.shape)}")
    torch._check_value(sampling_locations.dim() == 6 and sampling_locations.shape[5] == 2,
                       lambda: "sampling_locations must be (B, Lq, heads, levels, points, 2), got shape "
                               f"{tuple(sampling_locations.shape)}")
    batch, _, heads, _ = value.shape
    torch._check_value(sampling_locations.shape[0] == batch and sampling_locations.shape[2] == heads
                       and sampling_locations.shape[3] == levels,
                       lambda: f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
                               f"{tuple(value.shape)} and {levels} levels")
    torch._check_value(attention_weights.shape == sampling_locations.shape[:5],
                       lambda: "attention_weights must be (B, Lq, heads, levels, points), got shape "
                               f"{tuple(attention_weights.shape)}")
    torch._check_value(value.dtype in SUPPORTED_DTYPES,
                       lambda: "value's dtype must be float64, float32, float16 or bfloat16; "
                               f"{value.dtype} is not supported")
    torch._check_value(dtypes_fit(value.dtype, sampling_locations.dtype, attention_weights.dtype),
                       lambda: "value, sampling_locations and attention_weights must share a dtype (or "
                               "float32 locations and weights beside a float16 / bfloat16 value)")
    torch._check_value(not (spatial_shapes.is_floating_point() or level_start_index.is_floating_point()),
                       lambda: "spatial_shapes and level_start_index must be integer tensors")


def _register() -> None:
    @torch.library.register_fake("deformable_detr::ms_deform_attn")
    def _forward_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        batch, _, heads, channels = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * channels))

    @torch.library.register_fake("deformable_detr::ms_deform_attn_backward")
    def _backward_fake(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                       level_start_index: Tensor, sampling_locations: Tensor,
                       attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        batch, _, heads, channels = value.shape
        torch._check_value(grad_output.shape == (batch, sampling_locations.shape[1], heads * channels),
                           lambda: f"grad_output must be (B, Lq, heads * C), got shape {tuple(grad_output.shape)}")
        return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
                attention_weights.new_empty(attention_weights.shape))

    def _setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    def _backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
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
