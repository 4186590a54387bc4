"""ONNX translations of ``deformable_detr::ms_deform_attn`` for ``torch.onnx.export(dynamo=True)``.

:data:`DECOMPOSED` writes the op as standard ONNX operators, the pure-PyTorch computation of
:func:`ops.ms_deform_attn_pytorch` (one ``GridSample`` per level, opset >= 16), with the level
sizes read from ``spatial_shapes`` inside the graph, so that the image size may vary at run time
and any ONNX runtime runs it. :data:`TENSORRT_PLUGIN` writes it as one node for TensorRT's
multi-scale deformable attention plugin instead (``MultiscaleDeformableAttnPlugin_TRT``, which
takes the same five inputs); that form is not run here.

Importing this module needs ``onnxscript`` (which ``torch.onnx`` itself needs); the model does not
import it.
"""
import onnx
import onnxscript
import torch
from onnxscript import opset18 as op
from onnxscript._internal.values import Op

_FLOAT = onnx.defs.OpSchema.FormalParameter
TENSORRT_PLUGIN_OP = Op(
    onnxscript.values.Opset("trt.plugins", 1), "MultiscaleDeformableAttnPlugin_TRT",
    onnx.defs.OpSchema(
        "MultiscaleDeformableAttnPlugin_TRT", "trt.plugins", 1,
        inputs=[_FLOAT("value", "T"), _FLOAT("spatial_shapes", "I"), _FLOAT("level_start_index", "I"),
                _FLOAT("sampling_locations", "T"), _FLOAT("attention_weights", "T")],
        outputs=[_FLOAT("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")]))


def _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Trace-only ONNX function: value ``(B, S, heads, C)``, locations ``(B, Lq, heads, levels,
    points, 2)``, weights ``(B, Lq, heads, levels, points)`` -> ``(B, Lq, heads * C)``. The level
    count, heads, points and channels must be static; batch, tokens and queries may be dynamic."""
    heads, channels = value.shape[2], value.shape[3]
    levels, points = attention_weights.shape[3], attention_weights.shape[4]
    queries = op.Shape(attention_weights, start=1, end=2)  # Lq, as a 1-element tensor
    grids = op.Sub(op.Mul(sampling_locations, op.CastLike(2.0, sampling_locations)),
                   op.CastLike(1.0, sampling_locations))
    # (B, S, heads, C) -> (B, heads, C, S)
    value_t = op.Transpose(value, perm=[0, 2, 3, 1])
    sampled = []
    for level in range(levels):
        index = op.Constant(value_ints=[level])
        height = op.Gather(op.Gather(spatial_shapes, index, axis=0), op.Constant(value_ints=[0]), axis=1)
        width = op.Gather(op.Gather(spatial_shapes, index, axis=0), op.Constant(value_ints=[1]), axis=1)
        start = op.Reshape(op.Gather(level_start_index, index, axis=0), op.Constant(value_ints=[1]))
        end = op.Add(start, op.Reshape(op.Mul(height, width), op.Constant(value_ints=[1])))
        level_value = op.Slice(value_t, start, end, op.Constant(value_ints=[3]))
        # (B, heads, C, H*W) -> (B*heads, C, H, W)
        shape = op.Concat(op.Constant(value_ints=[-1, channels]), op.Reshape(height, op.Constant(value_ints=[1])),
                          op.Reshape(width, op.Constant(value_ints=[1])), axis=0)
        level_value = op.Reshape(level_value, shape)
        # (B, Lq, heads, points, 2) -> (B*heads, Lq, points, 2)
        grid = op.Gather(grids, index, axis=3)
        grid = op.Transpose(op.Squeeze(grid, op.Constant(value_ints=[3])), perm=[0, 2, 1, 3, 4])
        grid = op.Reshape(grid, op.Concat(op.Constant(value_ints=[-1]), queries, op.Constant(value_ints=[points, 2]),
                                          axis=0))
        sampled.append(op.GridSample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=0))
    # (B*heads, C, Lq, levels * points)
    stacked = op.Concat(*sampled, axis=3)
    # (B, Lq, heads, levels, points) -> (B*heads, 1, Lq, levels * points)
    weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
    weights = op.Reshape(weights, op.Concat(op.Constant(value_ints=[-1, 1]), queries,
                                            op.Constant(value_ints=[levels * points]), axis=0))
    out = op.ReduceSum(op.Mul(stacked, weights), op.Constant(value_ints=[-1]), keepdims=0)
    # (B*heads, C, Lq) -> (B, heads * C, Lq) -> (B, Lq, heads * C)
    out = op.Reshape(out, op.Concat(op.Constant(value_ints=[-1, heads * channels]), queries, axis=0))
    return op.Transpose(out, perm=[0, 2, 1])


def _tensorrt_plugin(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """One ``MultiscaleDeformableAttnPlugin_TRT`` node, reshaped to ``(B, Lq, heads * C)``."""
    heads, channels = value.shape[2], value.shape[3]
    int32 = onnx.TensorProto.INT32
    out = TENSORRT_PLUGIN_OP(value, op.Cast(spatial_shapes, to=int32), op.Cast(level_start_index, to=int32),
                             sampling_locations, attention_weights)
    return op.Reshape(out, op.Constant(value_ints=[0, 0, heads * channels]), allowzero=0)


DECOMPOSED = {torch.ops.deformable_detr.ms_deform_attn.default: _ms_deform_attn}
TENSORRT_PLUGIN = {torch.ops.deformable_detr.ms_deform_attn.default: _tensorrt_plugin}
