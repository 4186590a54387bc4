"""Multi-scale deformable attention sampling core: the dispatcher and the pure-PyTorch path.

:func:`ms_deform_attn_pytorch` is the reference: bilinear sampling with ``F.grid_sample``
(zero padding, ``align_corners=False``), which is what the original CUDA kernel computes.
:func:`ms_deform_attn` runs the compiled kernel of ``ops._C`` when it can, and this reference
otherwise.
"""
import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _extension

BACKEND_ENV = "MSDA_BACKEND"
_BACKENDS = ("auto", "compiled", "pytorch")
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)
_warned_reasons: set[str] = set()


def ms_deform_attn_pytorch(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                           attention_weights: Tensor) -> Tensor:
    """Sample ``value`` at ``sampling_locations`` and sum with ``attention_weights``.

    Args:
        value: ``(B, S, heads, C)`` with ``S = sum_l H_l * W_l``, levels flattened row-major.
        spatial_shapes: ``(levels, 2)`` integer ``(H_l, W_l)`` per level.
        sampling_locations: ``(B, Lq, heads, levels, points, 2)``, ``(x, y)`` normalised to
            ``[0, 1]`` over each level's full (padded) extent; points outside sample zeros.
        attention_weights: ``(B, Lq, heads, levels, points)``.

    Returns:
        ``(B, Lq, heads * C)``.
    """
    batch, _, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive, got {shapes}")
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(f"value has S = {value.shape[1]} tokens but spatial_shapes {shapes} "
                         f"sums to {sum(h * w for h, w in shapes)}")
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (B, H*W, heads, C) -> (B*heads, C, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, h, w)
        # (B, Lq, heads, points, 2) -> (B*heads, Lq, points, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # (B, Lq, heads, levels, points) -> (B*heads, 1, Lq, levels*points)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(batch, heads * channels, num_queries).transpose(1, 2).contiguous()


def _check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                  sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Checks ranks, sizes, dtypes and devices (metadata only: no device synchronisation)."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, heads, C), got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (levels, 2), got shape {tuple(spatial_shapes.shape)}")
    levels = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != levels:
        raise ValueError(f"level_start_index must be (levels,) = ({levels},), "
                         f"got shape {tuple(level_start_index.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[5] != 2:
        raise ValueError("sampling_locations must be (B, Lq, heads, levels, points, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    batch, _, heads, _ = value.shape
    if (sampling_locations.shape[0] != batch or sampling_locations.shape[2] != heads
            or sampling_locations.shape[3] != levels):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} does not match "
                         f"value (B, S, heads, C) = {tuple(value.shape)} and {levels} levels")
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError("attention_weights must be (B, Lq, heads, levels, points) = "
                         f"{tuple(sampling_locations.shape[:5])}, "
                         f"got shape {tuple(attention_weights.shape)}")
    if value.dtype not in _extension.SUPPORTED_DTYPES:
        raise ValueError("value's dtype must be float64, float32, float16 or bfloat16; "
                         f"{value.dtype} is not supported")
    if not _extension.dtypes_fit(value.dtype, sampling_locations.dtype, attention_weights.dtype):
        raise ValueError("value, sampling_locations and attention_weights must share a dtype (or, for a "
                         "float16 / bfloat16 value, sampling_locations and attention_weights may be "
                         f"float32), got {value.dtype}, {sampling_locations.dtype} and "
                         f"{attention_weights.dtype}")
    for name, index in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {index.dtype}")
        if index.device != value.device and index.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU or on {value.device}, got {index.device}")
    if sampling_locations.device != value.device or attention_weights.device != value.device:
        raise ValueError("value, sampling_locations and attention_weights must be on one device, "
                         f"got {value.device}, {sampling_locations.device} and "
                         f"{attention_weights.device}")


@contextlib.contextmanager
def sampling_backend(backend: str) -> Iterator[None]:
    """Within the block, ``MSDA_BACKEND`` is ``backend`` (``auto``, ``compiled`` or ``pytorch``);
    afterwards it is what it was. For running both paths side by side in one process (a traced
    ``torch.compile`` graph keeps the path it was traced with)."""
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if previous is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = previous


@torch.compiler.assume_constant_result
def _use_compiled_kernel(device_type: str) -> bool:
    """Whether :func:`ms_deform_attn` runs the compiled kernel on ``device_type``.

    ``MSDA_BACKEND`` forces a path; otherwise the compiled kernel is used where it is available
    and the pure-PyTorch path, with a one-time warning, where it is not. Under
    ``torch.compile`` this is evaluated once, when the graph is traced.
    """
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "pytorch":
        return False
    reason = _extension.unavailable_reason(device_type)
    if reason is None:
        return True
    if backend == "compiled":
        raise RuntimeError(f"{BACKEND_ENV}=compiled but the compiled kernel cannot run: {reason}")
    if reason not in _warned_reasons:
        warnings.warn(f"ms_deform_attn falls back to the slower pure-PyTorch path: {reason}",
                      stacklevel=3)
        # Noted only once the warning returns: where warnings are errors (the tests), every
        # fallback raises, not only the first.
        _warned_reasons.add(reason)
    return False


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention sampling, by the compiled kernel where available.

    Args:
        value: ``(B, S, heads, C)`` with ``S = sum_l H_l * W_l``, levels flattened row-major.
        spatial_shapes: ``(levels, 2)`` integer ``(H_l, W_l)`` per level.
        level_start_index: ``(levels,)`` integer offset of each level in ``S``.
        sampling_locations: ``(B, Lq, heads, levels, points, 2)``, ``(x, y)`` normalised to
            ``[0, 1]`` over each level; points outside sample zeros.
        attention_weights: ``(B, Lq, heads, levels, points)``.

    Returns:
        ``(B, Lq, heads * C)`` in the dtype of ``value``.

    The three float inputs share a dtype, or ``value`` is float16 / bfloat16 and the locations and
    weights are float32. The compiled kernel (``ops._C``) runs when it is built for the tensors'
    device; otherwise :func:`ms_deform_attn_pytorch` runs and a warning says why, once. The environment variable
    ``MSDA_BACKEND`` (``auto``, ``compiled`` or ``pytorch``) forces a path. On the CPU, float16
    and bfloat16 inputs are computed in float32, and so is the pure-PyTorch path beside float32
    locations. Inconsistent inputs raise ``ValueError``.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _use_compiled_kernel(value.device.type):
        return torch.ops.deformable_detr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    sizes = spatial_shapes.prod(1)
    starts = sizes.cumsum(0) - sizes
    if not torch.equal(level_start_index.to(starts.device, starts.dtype), starts):
        raise ValueError(f"level_start_index {level_start_index.tolist()} is not the running sum "
                         f"of H * W over spatial_shapes {spatial_shapes.tolist()}")
    if value.dtype in _REDUCED_FLOATS and (value.device.type == "cpu" or sampling_locations.dtype != value.dtype):
        return ms_deform_attn_pytorch(value.float(), spatial_shapes, sampling_locations.float(),
                                      attention_weights.float()).to(value.dtype)
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
