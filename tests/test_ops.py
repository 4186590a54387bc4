"""Tests of the multi-scale deformable attention op (``ops``): the compiled kernels against
independent references, autograd, torch.compile / torch.export, the dispatch rules and input
validation. CUDA tests are marked ``cuda`` and skip without a GPU."""
import contextlib
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ops
from ops import _extension, core

from helpers import needs_cuda, needs_extension, needs_two_gpus, no_cuda_build_reason, ops_setup

OPS_DIR = Path(ops.__file__).resolve().parent

Inputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def make_inputs(batch: int, queries: int, heads: int, channels: int, shapes: Sequence[tuple[int, int]],
                points: int, dtype: torch.dtype = torch.float64, device: str = "cpu",
                seed: int = 0, spread: float = 0.2, contiguous: bool = True) -> Inputs:
    """Random inputs; locations fall in ``[-spread, 1 + spread]``, so some lie outside.

    With ``contiguous=False`` value, locations and weights are strided views."""
    generator = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).view(levels, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = sizes.cumsum(0) - sizes
    num_tokens = int(sizes.sum())

    value = torch.randn(batch, num_tokens, heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator,
                           dtype=torch.float64) * (1 + 2 * spread) - spread
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=torch.float64)
    value, locations, weights = (t.to(device, dtype) for t in (value, locations, weights))
    if not contiguous:
        value, locations, weights = (torch.stack([torch.zeros_like(t), t], -1)[..., 1]
                                     for t in (value, locations, weights))
    return value, spatial_shapes.to(device), level_start_index.to(device), locations, weights


def naive_reference(value: Tensor, spatial_shapes: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    """Explicit loops over samples and bilinear corners (no grid_sample); tiny inputs only."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = value.new_zeros(batch, queries, heads, channels)
    start = 0
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        grid = value[:, start:start + height * width].view(batch, height, width, heads, channels)
        start += height * width
        for b, q, h, p in itertools.product(range(batch), range(queries), range(heads), range(points)):
            x = locations[b, q, h, level, p, 0].item() * width - 0.5
            y = locations[b, q, h, level, p, 1].item() * height - 0.5
            x0, y0 = math.floor(x), math.floor(y)
            for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                if 0 <= xi < width and 0 <= yi < height:
                    corner_weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
                    out[b, q, h] += weights[b, q, h, level, p] * corner_weight * grid[b, yi, xi, h]
    return out.flatten(2)


def reference(inputs: Inputs) -> Tensor:
    """The pure-PyTorch core in float64 on the CPU."""
    value, spatial_shapes, _, locations, weights = (t.detach().cpu() for t in inputs)
    return ops.ms_deform_attn_pytorch(value.double(), spatial_shapes, locations.double(), weights.double())


def forward_and_grads(fn, inputs: Inputs, grad_output: Tensor) -> list[Tensor]:
    value, spatial_shapes, level_start_index, locations, weights = (t.detach() for t in inputs)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    out = fn(value, spatial_shapes, level_start_index, locations, weights)
    grads = torch.autograd.grad(out, leaves, grad_output.to(out.device, out.dtype))
    return [out.detach(), *grads]


def reference_forward_and_grads(inputs: Inputs, grad_output: Tensor) -> list[Tensor]:
    def fn(value, spatial_shapes, level_start_index, locations, weights):
        return ops.ms_deform_attn_pytorch(value, spatial_shapes, locations, weights)

    cpu64 = tuple(t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in inputs)
    return forward_and_grads(fn, cpu64, grad_output.cpu().double())


def compiled_op(value, spatial_shapes, level_start_index, locations, weights):
    return torch.ops.deformable_detr.ms_deform_attn(value, spatial_shapes, level_start_index,
                                                    locations, weights)


# (batch, queries, heads, channels, level shapes, points)
CASES = {
    "basic": (2, 7, 3, 5, [(6, 8), (3, 4), (1, 1), (2, 3)], 2),
    "one_level_1x1": (1, 4, 2, 4, [(1, 1)], 3),
    "zero_queries": (2, 0, 2, 4, [(4, 5), (2, 2)], 2),
    "batch_65": (65, 2, 1, 2, [(3, 2), (1, 1)], 1),
    "batch_130": (130, 2, 1, 3, [(2, 3)], 1),
    "wide_channels": (1, 3, 1, 67, [(5, 3), (2, 2)], 2),
    "many_points": (1, 5, 2, 8, [(7, 9), (4, 5), (2, 3)], 9),
}


def assert_matches_reference(inputs: Inputs, dtype: torch.dtype, rtol: float, atol: float) -> None:
    generator = torch.Generator().manual_seed(1)
    batch, _, heads, channels = inputs[0].shape
    grad_output = torch.randn(batch, inputs[3].shape[1], heads * channels, generator=generator,
                              dtype=torch.float64)
    expected = reference_forward_and_grads(inputs, grad_output)
    actual = forward_and_grads(compiled_op, inputs, grad_output)
    for name, got, want in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert got.dtype == dtype, name
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=atol, msg=name)


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def misaligned(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` whose data starts one element past an aligned address."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    shifted = buffer[1:].view(t.shape)
    shifted.copy_(t)
    return shifted


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype``'s numbers at ``|x|`` (the subnormals' below the smallest normal
    number), elementwise, in float64 on the CPU."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.detach().cpu().double().abs().clamp_min(info.tiny))
    return info.eps * torch.exp2(exponent.double() - 1)


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) with u = 2**-24: relative to the sum of the absolute
    values of its products, the error of a float32 sum of products whose every product meets at
    most n roundings on its way to the result, summed in any order."""
    u = 2.0 ** -24
    return n * u / (1 - n * u)


def assert_reduced_precision_matches_float32(low: Inputs, grad_output: Tensor, got: Sequence[Tensor],
                                             want: Sequence[Tensor]) -> None:
    """``got``, the kernel's output, grad_value, grad_locations and grad_weights for the float16 /
    bfloat16 inputs ``low`` (locations and weights in that dtype or in float32) and
    ``grad_output`` (B, Lq, heads * C) in that dtype, against ``want``, the float32 kernel's for
    the same inputs converted (exactly) to float32.

    Both compute in float32, so, elementwise:

    * output: within one ulp of the reduced dtype of ``want`` rounded to it. The two add the same
      float32 products in the same order and should agree exactly; the ulp allows for a compiler
      contracting them into fused multiply-adds differently.
    * gradients: ``|got - want| <= ulp(want) + 2 gamma_n M``, the ulp in got's dtype (float32
      for locations and weights given in float32). ulp(want) bounds the rounding of got's float32
      sum to its dtype: half an ulp of that sum, which lies at most one power of two above want.
      ``gamma_n M`` bounds each kernel's float32 error against the exact sum of the same products
      (the two may sum in different orders: atomics, and channels per thread differ by dtype),
      M being the sum of the products' absolute values and n the roundings on a product's way:
      grad_value: M is the float64 grad_value for ``|grad_output|`` (attention and bilinear
      weights are non-negative), n = Lq * points, the products added into one element.
      grad_weights: M <= ||grad_output row||_1 * max|value| (the four bilinear weights sum to at
      most 1). grad_locations: M <= 2 * attention weight * level size (W for x, H for y) *
      ||grad_output row||_1 * max|value| (the bilinear weights' derivatives by the pixel
      coordinate sum to 2 in absolute value). For both, n = 4 C + 4: 4 C products summed in any
      tree, each multiplied at most five times.
    """
    value, spatial_shapes, _, locations, weights = (t.detach().cpu() for t in low)
    batch, queries, heads, _, points, _ = locations.shape
    channels = value.shape[3]
    dtype = value.dtype
    got = [t.detach().cpu() for t in got]
    want = [t.detach().cpu().double() for t in want]
    for name, result, source in zip(("output", "grad_value", "grad_locations", "grad_weights"), got,
                                    (value, value, locations, weights)):
        assert result.dtype == source.dtype, name

    def check(name: str, result: Tensor, expected: Tensor, allowed: Tensor) -> None:
        excess = (result.double() - expected).abs() - allowed
        assert bool((excess <= 0).all()), f"{name}: off by up to {excess.max().item():.3g} beyond the bound"

    rounded = want[0].to(dtype)
    check("output", got[0], rounded.double(), ulp(rounded, dtype))
    grad64 = grad_output.detach().cpu().double()
    sum_of_products = reference_forward_and_grads(low, grad64.abs())[1]
    check("grad_value", got[1], want[1], ulp(want[1], dtype) + 2 * gamma(queries * points) * sum_of_products)
    # (B, Lq, heads, 1, 1): ||grad_output row||_1 * max|value|, the same for every level and point.
    row_norms = grad64.view(batch, queries, heads, channels).abs().sum(-1)
    row_scale = (row_norms * value.double().abs().max())[..., None, None]
    per_path = 2 * gamma(4 * channels + 4)
    check("grad_weights", got[3], want[3], ulp(want[3], got[3].dtype) + per_path * row_scale)
    sizes = spatial_shapes.flip(-1).double()[:, None, :]  # (levels, 1, 2): (W, H) for (x, y)
    location_scale = 2 * weights.double().abs()[..., None] * sizes * row_scale[..., None]
    check("grad_locations", got[2], want[2], ulp(want[2], got[2].dtype) + per_path * location_scale)


def assert_misaligned_matches_reference(device: str, dtype: torch.dtype) -> None:
    """value and grad_output one element off alignment: no vector load may assume alignment.
    float32 against the float64 reference; float16 against the float32 kernel on aligned inputs
    (assert_reduced_precision_matches_float32)."""
    inputs = make_inputs(2, 5, 2, 8, [(6, 5), (3, 3)], 2, dtype=dtype, device=device)
    grad_output = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    value = misaligned(inputs[0])
    grad = misaligned(grad_output.to(device))
    assert value.is_contiguous() and value.data_ptr() % (2 * value.element_size()) != 0
    output = compiled_op(value, *inputs[1:])
    got = [output, *torch.ops.deformable_detr.ms_deform_attn_backward(grad, value, *inputs[1:])]
    if dtype == torch.float32:
        expected = reference_forward_and_grads(inputs, grad_output)
        for name, result, want in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, expected):
            torch.testing.assert_close(result.cpu().double(), want, rtol=1e-4, atol=1e-4, msg=name)
    else:
        as_float = tuple(t.float() if t.is_floating_point() else t for t in inputs)
        want = forward_and_grads(compiled_op, as_float, grad_output.float())
        assert_reduced_precision_matches_float32(inputs, grad_output, got, want)


class TestPureReference:
    def test_matches_naive_loops(self):
        inputs = make_inputs(2, 3, 2, 3, [(4, 5), (1, 1), (2, 3)], 2, spread=0.4)
        value, spatial_shapes, _, locations, weights = inputs
        expected = naive_reference(value, spatial_shapes, locations, weights)
        torch.testing.assert_close(ops.ms_deform_attn_pytorch(value, spatial_shapes, locations, weights),
                                   expected)

    @pytest.mark.parametrize("index_dtype", [torch.int32, torch.int16])
    def test_narrower_integer_shapes(self, index_dtype):
        value, spatial_shapes, _, locations, weights = make_inputs(2, 3, 2, 3, [(4, 5), (1, 1), (2, 3)], 2)
        assert torch.equal(ops.ms_deform_attn_pytorch(value, spatial_shapes.to(index_dtype), locations, weights),
                           ops.ms_deform_attn_pytorch(value, spatial_shapes, locations, weights))

    def test_token_count_mismatch(self):
        value, spatial_shapes, _, locations, weights = make_inputs(1, 2, 1, 2, [(2, 2)], 1)
        with pytest.raises(ValueError, match="tokens"):
            ops.ms_deform_attn_pytorch(value[:, :3], spatial_shapes, locations, weights)


def kernel_device(device: str) -> str:
    """``device`` after checking that the compiled kernel runs there (skip, or fail when a GPU is
    visible but the CUDA kernel was not built)."""
    reason = _extension.unavailable_reason(device)
    if reason is not None:
        if device == "cuda":
            pytest.fail(f"a GPU is visible but {reason}")
        pytest.skip(reason)
    return device


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


@pytest.mark.parametrize("device", DEVICES)
class TestKernel:
    """The compiled kernel on each device against the float64 pure-PyTorch core and naive loops."""

    @pytest.fixture(autouse=True)
    def _kernel(self, device):
        kernel_device(device)

    def test_matches_naive_loops(self, device):
        inputs = make_inputs(1, 4, 2, 3, [(3, 4), (1, 1)], 3, spread=0.5, device=device)
        value, spatial_shapes, _, locations, weights = (t.cpu() for t in inputs)
        expected = naive_reference(value, spatial_shapes, locations, weights)
        torch.testing.assert_close(compiled_op(*inputs).cpu(), expected)

    @pytest.mark.parametrize("case", CASES.keys())
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_matches_reference(self, device, case, dtype):
        inputs = make_inputs(*CASES[case], dtype=dtype, device=device, seed=len(case))
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert_matches_reference(inputs, dtype, rtol=tol, atol=tol)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_model_shape(self, device, dtype):
        # 8 heads of 32 channels: the vector-load widths the model runs with.
        inputs = make_inputs(2, 40, 8, 32, [(12, 15), (6, 8), (3, 4), (2, 2)], 4, dtype=dtype, device=device)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert_matches_reference(inputs, dtype, rtol=tol, atol=tol)

    def test_channel_groups_wider_than_a_warp(self, device):
        inputs = make_inputs(1, 6, 1, 256, [(5, 7), (2, 3)], 3, device=device)
        assert_matches_reference(inputs, torch.float64, rtol=1e-10, atol=1e-10)

    def test_non_contiguous_inputs(self, device):
        inputs = make_inputs(*CASES["basic"], device=device, contiguous=False)
        assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
        assert_matches_reference(inputs, torch.float64, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_misaligned_inputs(self, device, dtype):
        assert_misaligned_matches_reference(device, dtype)

    def test_shapes_on_cpu(self, device):
        inputs = make_inputs(*CASES["basic"], device=device)
        mixed = (inputs[0], inputs[1].cpu(), inputs[2].cpu(), inputs[3], inputs[4])
        torch.testing.assert_close(compiled_op(*mixed).cpu(), reference(inputs))

    @pytest.mark.parametrize("index_dtype", [torch.int32, torch.int16])
    @pytest.mark.parametrize("metadata_on", ["value's device", "cpu"])
    def test_narrower_integer_metadata(self, device, index_dtype, metadata_on):
        """spatial_shapes and level_start_index of any integer dtype: output and gradients are
        those of int64 metadata, bit for bit, and match the float64 reference."""
        inputs = make_inputs(*CASES["basic"], device=device)
        narrow = (inputs[0], *(t.to("cpu" if metadata_on == "cpu" else device, index_dtype) for t in inputs[1:3]),
                  inputs[3], inputs[4])
        grad_output = torch.randn(2, 7, 15, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        got = forward_and_grads(compiled_op, narrow, grad_output)
        for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got,
                              forward_and_grads(compiled_op, inputs, grad_output)):
            assert torch.equal(a, b), name
        torch.testing.assert_close(got[0].cpu(), reference(inputs))

    def test_far_outside_and_nan_locations_sample_zero(self, device):
        value, spatial_shapes, level_start_index, locations, weights = make_inputs(1, 4, 1, 3, [(3, 3)], 1,
                                                                                   device=device)
        locations[0, 0] = -5.0
        locations[0, 1] = 7.0
        locations[0, 2] = float("nan")
        out = compiled_op(value, spatial_shapes, level_start_index, locations, weights)
        assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
        assert out[0, 3].abs().sum() > 0

    def test_gradcheck(self, device):
        inputs = make_inputs(1, 3, 2, 3, [(3, 4), (1, 1), (2, 2)], 2, spread=0.3, device=device)
        value, spatial_shapes, level_start_index, locations, weights = (
            t.requires_grad_() if t.is_floating_point() else t for t in inputs)
        # CUDA adds into grad_value atomically, so the order of the sums may vary.
        assert torch.autograd.gradcheck(
            lambda v, loc, w: compiled_op(v, spatial_shapes, level_start_index, loc, w),
            (value, locations, weights), eps=1e-6, atol=1e-5, nondet_tol=1e-12 if device == "cuda" else 0.0)

    @pytest.mark.parametrize("float32_locations", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_reduced_precision_close_to_float32(self, device, dtype, float32_locations):
        """float16 / bfloat16 computed in float32: the output within one ulp of the float32
        kernel's rounded, the gradients within the bound that
        assert_reduced_precision_matches_float32 derives. The float32 run sees the same (already
        rounded) inputs, so a sample never lands on the other side of a pixel boundary."""
        low = make_inputs(*CASES["many_points"], dtype=dtype, device=device)
        if float32_locations:  # as MSDeformAttn passes them under autocast
            low = (*low[:3], low[3].float(), low[4].float())
        as_float = tuple(t.float() if t.is_floating_point() else t for t in low)
        batch, _, heads, channels = low[0].shape
        grad_output = torch.randn(batch, low[3].shape[1], heads * channels,
                                  generator=torch.Generator().manual_seed(2)).to(dtype)
        want = forward_and_grads(compiled_op, as_float, grad_output.float())
        got = forward_and_grads(compiled_op, low, grad_output)
        assert_reduced_precision_matches_float32(low, grad_output, got, want)

    def test_opcheck(self, device):
        inputs = make_inputs(2, 3, 2, 4, [(3, 4), (1, 1)], 2, device=device)
        value, spatial_shapes, level_start_index, locations, weights = inputs
        args = (value.requires_grad_(), spatial_shapes, level_start_index,
                locations.requires_grad_(), weights.requires_grad_())
        # CUDA's atomic adds make the backward's sums order-dependent, which opcheck's exact
        # comparison of repeated runs would report.
        tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn.default, args, test_utils=tests)

    def test_torch_compile_fullgraph(self, device):
        inputs = make_inputs(2, 5, 2, 4, [(4, 6), (2, 3)], 2, dtype=torch.float32, device=device)
        grad_output = torch.randn(2, 5, 8)

        def fn(value, spatial_shapes, level_start_index, locations, weights):
            return ops.ms_deform_attn(value * 2, spatial_shapes, level_start_index, locations,
                                      weights.softmax(-1)).relu()

        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
        for got, want in zip(forward_and_grads(compiled, inputs, grad_output),
                             forward_and_grads(fn, inputs, grad_output)):
            torch.testing.assert_close(got, want)

    def test_torch_export(self, device):
        inputs = make_inputs(1, 3, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float32, device=device)

        class Core(torch.nn.Module):
            def forward(self, value, spatial_shapes, level_start_index, locations, weights):
                return ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)

        exported = torch.export.export(Core(), inputs)
        assert "deformable_detr.ms_deform_attn" in str(exported.graph)
        torch.testing.assert_close(exported.module()(*inputs), compiled_op(*inputs))

    def test_msdeformattn_compiles_fullgraph(self, device):
        from models.ms_deform_attn import MSDeformAttn

        torch.manual_seed(0)
        module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).to(device)
        shapes = torch.tensor([[4, 6], [2, 3]], device=device)
        sizes = shapes.prod(1)
        starts = sizes.cumsum(0) - sizes
        query = torch.randn(2, 5, 16, device=device)
        reference_points = torch.rand(2, 5, 2, 2, device=device)
        values = torch.randn(2, int(sizes.sum()), 16, device=device)
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        got = compiled(query, reference_points, values, shapes, starts)
        want = module(query, reference_points, values, shapes, starts)
        torch.testing.assert_close(got, want)
        got.sum().backward()
        assert module.sampling_offsets.weight.grad is not None

    @pytest.mark.parametrize("queries, heads, channels, dtype", [
        (7, 8, 32, torch.float32),
        # On CUDA about 1.1 GB of float64 corner contributions: the deterministic backward runs in
        # chunks. (In float32 a few of its million sampling points would lie within rounding of a
        # pixel centre, where the location gradient jumps, and differ from the float64 reference.)
        (8000, 8, 32, torch.float64),
        # Channel groups of 5 and 128 threads: several runs of lanes per group on CUDA.
        (7, 2, 5, torch.float64),
        (7, 1, 256, torch.float64),
        # Groups of 33 threads straddle warps: their partial sums are stored, over two chunks of
        # queries on CUDA.
        (3000, 8, 33, torch.float64),
    ])
    def test_deterministic_mode(self, device, queries, heads, channels, dtype):
        """Under torch.use_deterministic_algorithms (the CPU kernel always is), repeated runs are
        bit-identical and match the reference."""
        inputs = make_inputs(1, queries, heads, channels, [(12, 15), (6, 8), (3, 4), (2, 2)], 4,
                             dtype=dtype, device=device)
        grad_output = torch.randn(1, queries, heads * channels,
                                  generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        with deterministic_algorithms():
            first = forward_and_grads(compiled_op, inputs, grad_output)
            second = forward_and_grads(compiled_op, inputs, grad_output)
        names = ("output", "grad_value", "grad_locations", "grad_weights")
        for name, a, b in zip(names, first, second):
            assert torch.equal(a, b), name
        expected = reference_forward_and_grads(inputs, grad_output)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for name, got, want in zip(names, first, expected):
            torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol, msg=name)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_deterministic_mode_reduced_precision(self, device, dtype):
        """Deterministic mode in half precision: bit-identical repeats, and float32 on the same
        rounded inputs within the bound of assert_reduced_precision_matches_float32."""
        low = make_inputs(2, 30, 8, 32, [(12, 15), (6, 8), (3, 4), (2, 2)], 4, dtype=dtype, device=device)
        as_float = tuple(t.float() if t.is_floating_point() else t for t in low)
        grad_output = torch.randn(2, 30, 256, generator=torch.Generator().manual_seed(5)).to(dtype)
        with deterministic_algorithms():
            first = forward_and_grads(compiled_op, low, grad_output)
            second = forward_and_grads(compiled_op, low, grad_output)
            want = forward_and_grads(compiled_op, as_float, grad_output.float())
        for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), first, second):
            assert torch.equal(a, b), name
        assert_reduced_precision_matches_float32(low, grad_output, first, want)

    @pytest.mark.parametrize("deterministic", [False, True])
    @pytest.mark.parametrize("batch, shapes", [(0, [(4, 5), (2, 2)]), (2, [])], ids=["batch_0", "no_tokens"])
    def test_empty_inputs(self, device, deterministic, batch, shapes):
        """Batch 0, or S = 0 (no levels): an empty sum, so zeros of the right shapes."""
        inputs = make_inputs(batch, 3, 2, 4, shapes, 2, device=device)
        grad_output = torch.randn(batch, 3, 8, dtype=torch.float64)
        context = deterministic_algorithms() if deterministic else contextlib.nullcontext()
        with context:
            results = forward_and_grads(compiled_op, inputs, grad_output)
        for name, got, like in zip(("output", "grad_value", "grad_locations", "grad_weights"), results,
                                   (grad_output, *inputs[0:1], *inputs[3:5])):
            assert got.shape == like.shape, name
            assert torch.equal(got.cpu(), torch.zeros_like(like)), name

    def test_absurd_level_shapes_are_refused(self, device):
        """A level of 2**40 x 2**40 tokens: H * W would overflow int64, and must not pass."""
        value, spatial_shapes, level_start_index, locations, weights = make_inputs(1, 2, 1, 2, [(2, 2)], 1,
                                                                                   device=device)
        huge = torch.tensor([[2 ** 40, 2 ** 40]])
        with pytest.raises(ValueError, match="does not fit"):
            compiled_op(value, huge, level_start_index.cpu(), locations, weights)


def run_with_gpu_metadata(shapes: list[list[int]], starts: list[int], tokens: int) -> str:
    """Runs the CUDA forward in a child process (a device-side assertion is fatal to the
    process's CUDA context) with spatial_shapes and level_start_index on the GPU and a value of
    ``tokens`` tokens; returns its stdout and stderr after checking that it failed."""
    levels = len(shapes)
    script = (
        "import torch, ops\n"
        f"shapes = torch.tensor({shapes}, device='cuda')\n"
        f"starts = torch.tensor({starts}, device='cuda')\n"
        f"value = torch.randn(1, {tokens}, 2, 4, device='cuda')\n"
        f"locations = torch.rand(1, 3, 2, {levels}, 2, 2, device='cuda')\n"
        f"weights = torch.rand(1, 3, 2, {levels}, 2, device='cuda')\n"
        "torch.ops.deformable_detr.ms_deform_attn(value, shapes, starts, locations, weights)\n"
        "torch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=OPS_DIR.parent)
    assert result.returncode != 0
    return result.stdout + result.stderr


@pytest.mark.cuda
@needs_cuda
def test_cuda_metadata_on_the_gpu_is_checked_on_the_gpu():
    """Inconsistent level metadata on the GPU stops the kernel with a device-side assertion that
    says what is wrong, in the words of the host check's ValueError."""
    kernel_device("cuda")
    output = run_with_gpu_metadata([[4, 5], [2, 2]], [0, 21], 24)
    assert "level_start_index[1] is 21 but the levels before it hold 20 tokens" in output


@pytest.mark.cuda
@needs_cuda
def test_cuda_token_count_on_the_gpu_names_no_level():
    """Levels that fit but leave a token of value over: the device check gives the totals and
    names no level (there is no level 2 of two)."""
    kernel_device("cuda")
    output = run_with_gpu_metadata([[4, 5], [2, 2]], [0, 20], 25)
    assert "value has S = 25 tokens but spatial_shapes sums to 24" in output
    assert "level 2" not in output


def launched_kernels(fn: Callable[[], object]) -> list[str]:
    """The names of the CUDA kernels that ``fn()`` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@needs_cuda
def test_cuda_metadata_on_the_gpu_costs_no_launch_of_its_own():
    """With the level metadata on the GPU, forward and backward each launch one kernel of the op,
    the sampling kernel, which checks the metadata itself."""
    kernel_device("cuda")
    inputs = make_inputs(*CASES["basic"], dtype=torch.float32, device="cuda")
    grad_output = torch.randn(2, 7, 15, device="cuda")
    backward = torch.ops.deformable_detr.ms_deform_attn_backward
    # Warm-up: the first calls load the kernels and fill the allocators' caches.
    compiled_op(*inputs)
    backward(grad_output, *inputs)
    ours = [name for name in launched_kernels(lambda: compiled_op(*inputs)) if "deformable_detr" in name]
    assert len(ours) == 1 and "forward_kernel" in ours[0], ours
    ours = [name for name in launched_kernels(lambda: backward(grad_output, *inputs)) if "deformable_detr" in name]
    assert len(ours) == 1 and "backward_kernel" in ours[0], ours


@pytest.mark.cuda
@needs_cuda
def test_cuda_metadata_on_the_cpu_costs_no_synchronisation():
    """Level metadata on the CPU is checked on the host and copied from pinned memory: forward and
    backward never make the host wait for the GPU (a copy from pageable memory would)."""
    kernel_device("cuda")
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(*CASES["basic"], dtype=torch.float32,
                                                                               device="cuda")
    inputs = (value, spatial_shapes.cpu(), level_start_index.cpu(), locations, weights)
    grad_output = torch.randn(2, 7, 15, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = compiled_op(*inputs)
        grads = torch.ops.deformable_detr.ms_deform_attn_backward(grad_output, *inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = reference_forward_and_grads(inputs, grad_output)
    for name, got, want in zip(("output", "grad_value", "grad_locations", "grad_weights"), (output, *grads), expected):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4, msg=name)


@needs_extension
def test_cpu_backward_is_deterministic_by_default():
    inputs = make_inputs(2, 50, 2, 8, [(4, 4), (2, 2)], 4, dtype=torch.float32)
    grad_output = torch.randn(2, 50, 16)
    first = forward_and_grads(compiled_op, inputs, grad_output)
    second = forward_and_grads(compiled_op, inputs, grad_output)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_kernel_for_32_channels_is_the_general_loop_bit_for_bit(dtype):
    """32 channels per head (the model's) run a forward loop instantiated for that count; forward
    and backward give what the general loops give for 33 channels whose last one is zero in value
    and grad_output."""
    value, *metadata, locations, weights = make_inputs(2, 60, 3, 32, [(9, 7), (5, 4), (2, 3)], 4, dtype=dtype,
                                                       spread=0.05)
    grad_output = torch.randn(2, 60, 3, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    fixed = ops.ms_deform_attn(value, *metadata, locations, weights)
    general = ops.ms_deform_attn(F.pad(value, (0, 1)), *metadata, locations, weights)
    assert torch.equal(fixed.unflatten(-1, (3, 32)), general.unflatten(-1, (3, 33))[..., :32])
    backward = torch.ops.deformable_detr.ms_deform_attn_backward
    fixed = backward(grad_output.flatten(2), value, *metadata, locations, weights)
    general = backward(F.pad(grad_output, (0, 1)).flatten(2), F.pad(value, (0, 1)), *metadata, locations, weights)
    assert torch.equal(fixed[0], general[0][..., :32])  # grad_value
    assert torch.equal(fixed[1], general[1]) and torch.equal(fixed[2], general[2])  # locations, weights


@needs_extension
@pytest.mark.parametrize("float32_locations", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_reduced_precision_computes_in_float32(dtype, float32_locations):
    """The CPU kernel reads a half-precision value in place but computes exactly as the float32
    kernel on the widened inputs: the same results, rounded once."""
    inputs = make_inputs(*CASES["basic"], dtype=dtype)
    if float32_locations:  # as MSDeformAttn passes them under autocast
        inputs = (*inputs[:3], inputs[3].float(), inputs[4].float())
    else:
        assert_matches_reference(inputs, dtype, rtol=2e-2, atol=2e-2)
    as_float = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    assert torch.equal(ops.ms_deform_attn(*inputs), compiled_op(*as_float).to(dtype))
    grad_output = torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                              generator=torch.Generator().manual_seed(4)).to(dtype)
    got = torch.ops.deformable_detr.ms_deform_attn_backward(grad_output, *inputs)
    want = torch.ops.deformable_detr.ms_deform_attn_backward(grad_output.float(), *as_float)
    for name, a, b, source in zip(("grad_value", "grad_locations", "grad_weights"), got, want,
                                  (inputs[0], inputs[3], inputs[4])):
        assert a.dtype == source.dtype, name
        assert torch.equal(a, b.to(source.dtype)), name


@pytest.mark.cuda
@needs_cuda
@needs_two_gpus
def test_cuda_second_device():
    kernel_device("cuda")
    inputs = make_inputs(*CASES["basic"], device="cuda:1")
    torch.cuda.set_device(0)
    assert_matches_reference(inputs, torch.float64, rtol=1e-10, atol=1e-10)
    assert compiled_op(*inputs).device == torch.device("cuda:1")


class TestDispatch:
    @pytest.fixture(autouse=True)
    def _fresh_warnings(self, monkeypatch):
        monkeypatch.setattr(core, "_warned_reasons", set())
        monkeypatch.delenv(core.BACKEND_ENV, raising=False)

    def test_missing_extension_falls_back_with_one_warning(self, monkeypatch):
        monkeypatch.setattr(_extension, "_C", None)
        inputs = make_inputs(*CASES["basic"])
        with pytest.warns(UserWarning, match="not built"):
            out = ops.ms_deform_attn(*inputs)
        torch.testing.assert_close(out, reference(inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.ms_deform_attn(*inputs)

    def test_forced_pytorch(self, monkeypatch):
        calls = []
        monkeypatch.setattr(core, "ms_deform_attn_pytorch",
                            lambda *args: calls.append(1) or ops.ms_deform_attn_pytorch(*args))
        monkeypatch.setenv(core.BACKEND_ENV, "pytorch")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.ms_deform_attn(*make_inputs(*CASES["basic"]))
        assert calls == [1]

    @needs_extension
    def test_forced_compiled(self, monkeypatch):
        calls = []
        monkeypatch.setattr(core, "ms_deform_attn_pytorch", lambda *args: calls.append(1))
        monkeypatch.setenv(core.BACKEND_ENV, "compiled")
        inputs = make_inputs(*CASES["basic"])
        torch.testing.assert_close(ops.ms_deform_attn(*inputs), reference(inputs))
        assert calls == []

    def test_forced_compiled_without_extension_raises(self, monkeypatch):
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setenv(core.BACKEND_ENV, "compiled")
        with pytest.raises(RuntimeError, match="not built"):
            ops.ms_deform_attn(*make_inputs(*CASES["basic"]))

    def test_unknown_backend(self, monkeypatch):
        monkeypatch.setenv(core.BACKEND_ENV, "fast")
        with pytest.raises(ValueError, match=core.BACKEND_ENV):
            ops.ms_deform_attn(*make_inputs(*CASES["basic"]))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_pytorch_path_reduced_precision(self, monkeypatch, dtype):
        monkeypatch.setenv(core.BACKEND_ENV, "pytorch")
        inputs = make_inputs(*CASES["basic"], dtype=dtype)
        out = ops.ms_deform_attn(*inputs)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), reference(inputs), rtol=2e-2, atol=2e-2)

    def test_sampling_backend_is_scoped(self, monkeypatch):
        calls = []
        monkeypatch.setattr(core, "ms_deform_attn_pytorch",
                            lambda *args: calls.append(1) or ops.ms_deform_attn_pytorch(*args))
        monkeypatch.setenv(core.BACKEND_ENV, "compiled")
        with ops.sampling_backend("pytorch"):
            ops.ms_deform_attn(*make_inputs(*CASES["basic"]))
        assert calls == [1] and core.os.environ[core.BACKEND_ENV] == "compiled"
        monkeypatch.delenv(core.BACKEND_ENV)
        with ops.sampling_backend("pytorch"):
            pass
        assert core.BACKEND_ENV not in core.os.environ

    def test_unsupported_device_reason(self):
        assert "meta" in _extension.unavailable_reason("meta")

    def test_fallback_warning_is_an_error_in_the_tests(self, monkeypatch):
        """pytest.ini makes the fallback warning an error, so that a test that meant to run the
        compiled kernel fails where it silently would not; and every fallback raises, not only
        the first of the process."""
        monkeypatch.setattr(_extension, "_C", None)
        inputs = make_inputs(*CASES["basic"])
        for _ in range(2):
            with pytest.raises(UserWarning, match="falls back to the slower pure-PyTorch path"):
                ops.ms_deform_attn(*inputs)


@pytest.fixture()
def benchmark_msda(monkeypatch):
    """tools/benchmark_msda.py at the shapes of a 64x80 image rather than 800x1066, with the
    thread count and deterministic mode it sets restored afterwards."""
    from tools import benchmark_msda as bench

    shapes = [(8, 10), (4, 5)]
    monkeypatch.setattr(bench, "SPATIAL_SHAPES", shapes)
    monkeypatch.setattr(bench, "NUM_TOKENS", sum(h * w for h, w in shapes))
    monkeypatch.setattr(bench, "CASES", {"encoder": sum(h * w for h, w in shapes), "decoder": 30})
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield bench
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def run_benchmark_msda(bench, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmark_msda.py", *argv])
    bench.main()


def within_rounding(printed_ratio: str, slow: str, fast: str) -> bool:
    """Whether a ratio printed to 0.1 is one of two times printed to 0.01 ms, given their rounding."""
    slow_ms, fast_ms = float(slow), float(fast)
    low, high = (slow_ms - 0.005) / (fast_ms + 0.005), (slow_ms + 0.005) / max(fast_ms - 0.005, 1e-9)
    return low - 0.05 <= float(printed_ratio.removesuffix("x")) <= high + 0.05


@needs_extension
def test_benchmark_msda_command_line_on_the_cpu(benchmark_msda, monkeypatch, capsys):
    """The op benchmark make gpu-check runs, on the CPU: every case, batch, implementation and dtype
    timed, and each speed-up line the ratio of the times printed above it (forward, backward, total,
    best); --deterministic runs too."""
    run_benchmark_msda(benchmark_msda, monkeypatch, "--device", "cpu", "--threads", "1", "--dtypes", "float32",
                       "bfloat16", "--warmup", "0", "--repeat", "2", "--batches", "1", "2", "--no-memory")
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:4]): line.split()[4:] for line in lines[2:] if " speed-up " not in line}
    assert sorted(rows) == sorted((case, batch, impl, dtype) for case in ("encoder", "decoder") for batch in "12"
                                  for impl in ("compiled", "pytorch") for dtype in ("float32", "bfloat16"))
    assert all(len(times) == 5 and times[-1] == "n/a" and float(times[2]) > 0 for times in rows.values())
    speedups = [line.split() for line in lines[2:] if " speed-up " in line]
    assert len(speedups) == 2 * 2 * 3
    for case, batch, _, dtype, *ratios_and_what in speedups:
        ratios, what = ratios_and_what[:4], " ".join(ratios_and_what[4:])
        compared = {"(pytorch / compiled)": (("pytorch", dtype), ("compiled", dtype)),
                    "(compiled float32 / compiled bfloat16)": (("compiled", "float32"), ("compiled", "bfloat16"))}
        slow, fast = compared[what]
        for ratio, a, b in zip(ratios, rows[(case, batch, *slow)], rows[(case, batch, *fast)]):
            assert within_rounding(ratio, a, b), (case, batch, what, ratio, a, b)

    run_benchmark_msda(benchmark_msda, monkeypatch, "--device", "cpu", "--deterministic", "--repeat", "1",
                       "--warmup", "0", "--batches", "1", "--no-memory")
    assert "deterministic algorithms" in capsys.readouterr().out.splitlines()[0]


def test_benchmark_msda_without_a_gpu_says_so(benchmark_msda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^no CUDA device is visible$"):
        run_benchmark_msda(benchmark_msda, monkeypatch, "--device", "cuda")


def _bad_inputs():
    """(description, mutate(inputs) -> inputs, message) for inconsistent inputs."""
    def replace(index, fn):
        return lambda inputs: tuple(fn(t) if i == index else t for i, t in enumerate(inputs))

    def float8(inputs):  # value, locations and weights: one (floating point) dtype, but no kernel
        return tuple(t.to(torch.float8_e4m3fn) if t.is_floating_point() else t for t in inputs)

    return [
        ("value_rank", replace(0, lambda t: t[0]), "value must be"),
        ("shapes_cols", replace(1, lambda t: t[:, :1]), "spatial_shapes must be"),
        ("starts_len", replace(2, lambda t: t[:1]), "level_start_index must be"),
        ("loc_last", replace(3, lambda t: t[..., :1]), "sampling_locations must be"),
        ("loc_heads", replace(3, lambda t: t[:, :, :1]), "does not match"),
        ("weights_shape", replace(4, lambda t: t[..., :1]), "attention_weights must be"),
        ("dtype_mix", replace(4, lambda t: t.float()), "share a dtype"),
        ("int_value", replace(0, lambda t: t.long()), "float64, float32, float16 or bfloat16; .* is not supported"),
        # torch.float8_e4m3fn from Python, Float8_e4m3fn from C++
        ("float8", float8, "(?i)float8_e4m3fn is not supported"),
        ("float_shapes", replace(1, lambda t: t.double()), "integer"),
    ]


def _bad_values():
    """Inputs whose metadata is consistent in shape but not in value."""
    def set_starts(inputs):
        starts = inputs[2].clone()
        starts[1] += 1
        return inputs[:2] + (starts,) + inputs[3:]

    def drop_token(inputs):
        return (inputs[0][:, :-1],) + inputs[1:]

    return [("starts", set_starts, "level_start_index"), ("token_count", drop_token, "tokens")]


class TestValidation:
    @pytest.mark.parametrize("backend", ["pytorch", pytest.param("compiled", marks=needs_extension)])
    @pytest.mark.parametrize("name,mutate,message", _bad_inputs() + _bad_values(),
                             ids=[c[0] for c in _bad_inputs() + _bad_values()])
    def test_dispatcher_raises_value_error(self, monkeypatch, backend, name, mutate, message):
        monkeypatch.setenv(core.BACKEND_ENV, backend)
        inputs = mutate(make_inputs(*CASES["basic"]))
        with pytest.raises(ValueError, match=message):
            ops.ms_deform_attn(*inputs)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("name,mutate,message", _bad_inputs() + _bad_values(),
                             ids=[c[0] for c in _bad_inputs() + _bad_values()])
    def test_op_raises_value_error(self, device, name, mutate, message):
        """On CUDA the level metadata stays on the CPU, where it is checked on the host."""
        kernel_device(device)
        value, spatial_shapes, level_start_index, locations, weights = mutate(make_inputs(*CASES["basic"]))
        inputs = (value.to(device), spatial_shapes, level_start_index, locations.to(device), weights.to(device))
        with pytest.raises(ValueError, match=message):
            compiled_op(*inputs)

    @needs_extension
    @pytest.mark.parametrize("name,mutate,message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
    def test_fake_kernel_raises_value_error(self, name, mutate, message):
        """Tracing (torch.compile, torch.export) meets the same checks, on fake tensors."""
        real = make_inputs(*CASES["basic"])
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            inputs = mutate(tuple(mode.from_tensor(t) for t in real))
            with pytest.raises(ValueError, match=message):
                compiled_op(*inputs)

    @pytest.mark.parametrize("device", DEVICES)
    def test_token_count_message_names_no_level(self, device):
        """One token too many in value: every level fits, so the message gives the totals and names
        no level (in particular not level 4 of levels 0-3)."""
        kernel_device(device)
        value, spatial_shapes, level_start_index, locations, weights = make_inputs(*CASES["basic"], device=device)
        tokens = value.shape[1]
        value = torch.cat([value, value[:, :1]], dim=1)
        with pytest.raises(ValueError, match=rf"S = {tokens + 1} tokens but spatial_shapes sums to {tokens}") as info:
            compiled_op(value, spatial_shapes.cpu(), level_start_index.cpu(), locations, weights)
        assert re.search(r"level \d", str(info.value)) is None, str(info.value)

    @needs_extension
    def test_backward_op_checks_grad_output(self):
        inputs = make_inputs(*CASES["basic"])
        grad_output = torch.zeros(2, 7, 14, dtype=torch.float64)
        with pytest.raises(ValueError, match="grad_output"):
            torch.ops.deformable_detr.ms_deform_attn_backward(grad_output, *inputs)


class TestBuildArchitectures:
    def test_default_list_without_a_gpu(self, monkeypatch):
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # setup.py's view of a machine without one
        setup = ops_setup()
        assert setup.cuda_arch_list() == setup.DEFAULT_ARCH_LIST
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
        assert setup.cuda_arch_list() == "8.6"

    @pytest.mark.cuda
    @needs_cuda
    def test_visible_gpus_only(self, monkeypatch):
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        major, minor = torch.cuda.get_device_capability(0)
        assert f"{major}.{minor}" in ops_setup().cuda_arch_list().split(";")

    def test_default_list_is_offered_by_nvcc(self):
        """Every architecture of the default list, and its PTX, is one the CUDA toolkit compiles for."""
        setup = ops_setup()
        if setup.CUDA_HOME is None:
            pytest.skip(no_cuda_build_reason())
        listed = subprocess.run([str(Path(setup.CUDA_HOME) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True,
                                text=True, check=True).stdout.split()
        for arch in setup.DEFAULT_ARCH_LIST.split(";"):
            assert "compute_" + arch.removesuffix("+PTX").replace(".", "") in listed, arch

    def test_an_existing_build_is_kept_only_when_it_has_what_is_asked_for(self):
        covers = ops_setup().build_covers
        cuda = {"cuda_arch_list": "7.5;9.0"}
        cpu_only = {"cuda_arch_list": None}
        # What an earlier setup.py recorded after a failed CUDA build that fell back to the CPU
        # kernel: a CPU-only build, which must not stand in for the CUDA build asked for again.
        fell_back = {"cuda_arch_list": None, "cuda_failed_for": "7.5;9.0"}
        assert covers(cuda, None) and covers(cpu_only, None) and covers(fell_back, None)
        assert covers(cuda, "7.5;9.0") and covers(cuda, "9.0")
        assert not covers(cuda, "8.0") and not covers(cuda, "9.0;12.0+PTX")
        assert not covers(cpu_only, "7.5;9.0")  # `make demo`'s CPU-only build does not do for `make test`
        assert not covers(fell_back, "7.5;9.0")
        assert not covers(None, None)  # unrecorded: rebuilt

    def test_extension_has_the_cuda_kernel_where_nvcc_is(self):
        """Where setup.py builds the CUDA kernel (a CUDA toolkit found, PyTorch with CUDA, and
        MSDA_WITH_CUDA not 0), the ops._C the tests run has it: no GPU is needed to build it, so a
        CPU-only extension there is a CUDA build that failed or never ran."""
        reason = no_cuda_build_reason()
        if reason is not None:
            pytest.skip(reason)
        assert _extension._C is not None, _extension.unavailable_reason("cpu")
        assert _extension._C.with_cuda, ("ops._C was built without its CUDA kernel where nvcc is; "
                                         f"rebuild it with `{_extension.BUILD_COMMAND}` (or make build)")

    @pytest.mark.slow
    def test_a_failed_cuda_build_fails(self, tmp_path):
        """A CUDA source that does not compile fails the build: non-zero exit, the compiler's error
        in the output, and no extension or build record left behind (a copy of ops/ builds in
        tmp_path, for one architecture)."""
        reason = no_cuda_build_reason()
        if reason is not None:
            pytest.skip(reason)
        ops_copy = Path(shutil.copytree(OPS_DIR, tmp_path / "ops",
                                        ignore=shutil.ignore_patterns("_C*", "__pycache__")))
        source = ops_copy / "csrc" / "cuda" / "ms_deform_attn_cuda.cu"
        source.write_text('#error "a deliberately broken CUDA source"\n' + source.read_text())
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"}
        result = subprocess.run([sys.executable, str(ops_copy / "setup.py"), "build_ext", "--inplace"],
                                capture_output=True, text=True, env=env, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-2000:]
        assert "a deliberately broken CUDA source" in output
        assert "MSDA_WITH_CUDA=0 builds the CPU kernel alone" in result.stderr.strip().splitlines()[-1]
        assert not list(ops_copy.glob("_C*")), "a failed build left an extension or a build record"

    @pytest.mark.slow
    def test_make_sh_builds_an_extension_that_computes_the_op(self, tmp_path):
        """ops/make.sh in a copy of ops/, for the CPU kernel alone (the CUDA build is make build's,
        checked above): it exits 0, and a fresh process importing the copy gets a compiled kernel
        that computes what the pure-PyTorch core computes."""
        ops_copy = Path(shutil.copytree(OPS_DIR, tmp_path / "ops",
                                        ignore=shutil.ignore_patterns("_C*", "__pycache__")))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run(["bash", str(ops_copy / "make.sh")], capture_output=True, text=True, timeout=600,
                                env={**env, "MSDA_WITH_CUDA": "0", "PYTHON": sys.executable})
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert len(list(ops_copy.glob("_C*.so"))) == 1
        check = ("import torch, ops\n"
                 "from ops import _extension\n"
                 f"assert _extension._C is not None and not _extension._C.with_cuda and ops.__file__ == "
                 f"{str(ops_copy / '__init__.py')!r}, ops.__file__\n"
                 "g = torch.Generator().manual_seed(0)\n"
                 "value = torch.randn(2, 23, 2, 4, generator=g, dtype=torch.float64)\n"
                 "shapes, starts = torch.tensor([[4, 5], [1, 3]]), torch.tensor([0, 20])\n"
                 "locations = torch.rand(2, 6, 2, 2, 3, 2, generator=g, dtype=torch.float64)\n"
                 "weights = torch.rand(2, 6, 2, 2, 3, generator=g, dtype=torch.float64)\n"
                 "torch.testing.assert_close(torch.ops.deformable_detr.ms_deform_attn(value, shapes, starts, locations,"
                 " weights), ops.ms_deform_attn_pytorch(value, shapes, locations, weights))\n")
        result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    @staticmethod
    def _file_dated(path: Path, seconds_after_newest_source: int) -> Path:
        # Files only, as setup.py compares (a directory's mtime moves when a file in it is replaced).
        sources = [f for f in (OPS_DIR / "csrc").rglob("*") if f.is_file()] + [OPS_DIR / "setup.py"]
        newest = max(f.stat().st_mtime_ns for f in sources)
        path.write_bytes(b"")
        os.utime(path, ns=(newest + seconds_after_newest_source * 10**9,) * 2)
        return path

    def test_an_extension_older_than_a_source_is_rebuilt(self, tmp_path):
        setup = ops_setup()
        assert not setup.newer_than_sources(tmp_path / "_C.so")  # not built at all
        assert not setup.newer_than_sources(self._file_dated(tmp_path / "_C.so", -1))
        assert setup.newer_than_sources(self._file_dated(tmp_path / "_C.so", 1))

    def test_an_extension_of_another_torch_is_rebuilt(self, tmp_path):
        setup = ops_setup()
        built = self._file_dated(tmp_path / "_C.so", 1)
        record = {"torch": torch.__version__, "cuda_arch_list": "9.0"}
        assert setup.can_keep(record, None, [built]) and setup.can_keep(record, "9.0", [built])
        assert not setup.can_keep({**record, "torch": "2.0.0"}, None, [built])
        assert not setup.can_keep({"cuda_arch_list": "9.0"}, None, [built])  # a record from before torch was noted
