"""Tests of the multi-scale deformable attention op (``ops``): the compiled kernels against
independent references, autograd, torch.compile / torch.export, the dispatch rules and input
validation. CUDA tests are marked ``cuda`` and skip without a GPU."""
import contextlib
import importlib.util
import itertools
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ops
from ops import _extension, core

OPS_DIR = Path(ops.__file__).resolve().parent
EXTENSION_BUILT = any(OPS_DIR.glob("_C*.so")) or any(OPS_DIR.glob("_C*.pyd"))
needs_extension = pytest.mark.skipif(not EXTENSION_BUILT,
                                     reason=f"ops._C is not built ({_extension.BUILD_COMMAND})")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

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


def assert_misaligned_matches_reference(device: str, dtype: torch.dtype, tol: float) -> None:
    """value and grad_output one element off alignment: no vector load may assume alignment."""
    inputs = make_inputs(2, 5, 2, 8, [(6, 5), (3, 3)], 2, dtype=dtype, device=device)
    grad_output = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3),
                              dtype=torch.float64)
    expected = reference_forward_and_grads(inputs, grad_output)
    value = misaligned(inputs[0])
    grad = misaligned(grad_output.to(device, dtype))
    assert value.is_contiguous() and value.data_ptr() % (2 * value.element_size()) != 0
    output = compiled_op(value, *inputs[1:])
    grads = torch.ops.deformable_detr.ms_deform_attn_backward(grad, value, *inputs[1:])
    for name, got, want in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                               (output, *grads), expected):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol, msg=name)


class TestPureReference:
    def test_matches_naive_loops(self):
        inputs = make_inputs(2, 3, 2, 3, [(4, 5), (1, 1), (2, 3)], 2, spread=0.4)
        value, spatial_shapes, _, locations, weights = inputs
        expected = naive_reference(value, spatial_shapes, locations, weights)
        torch.testing.assert_close(ops.ms_deform_attn_pytorch(value, spatial_shapes, locations, weights),
                                   expected)

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
        assert_misaligned_matches_reference(device, dtype, tol=1e-4 if dtype == torch.float32 else 3e-2)

    def test_shapes_on_cpu(self, device):
        inputs = make_inputs(*CASES["basic"], device=device)
        mixed = (inputs[0], inputs[1].cpu(), inputs[2].cpu(), inputs[3], inputs[4])
        torch.testing.assert_close(compiled_op(*mixed).cpu(), reference(inputs))

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

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_reduced_precision_close_to_float32(self, device, dtype):
        low = make_inputs(*CASES["many_points"], dtype=dtype, device=device)
        # The float32 run sees the same (already rounded) inputs, so a sample never lands on the
        # other side of a pixel boundary; only the float32 arithmetic and the rounding of the
        # results differ.
        as_float = tuple(t.float() if t.is_floating_point() else t for t in low)
        batch, _, heads, channels = low[0].shape
        grad_output = torch.randn(batch, low[3].shape[1], heads * channels,
                                  generator=torch.Generator().manual_seed(2)).to(dtype).float()
        want = forward_and_grads(compiled_op, as_float, grad_output)
        got = forward_and_grads(compiled_op, low, grad_output)
        for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, want):
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2, msg=name)

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
        """Deterministic mode in half precision: bit-identical repeats, close to float32 on the
        same rounded inputs."""
        low = make_inputs(2, 30, 8, 32, [(12, 15), (6, 8), (3, 4), (2, 2)], 4, dtype=dtype, device=device)
        as_float = tuple(t.float() if t.is_floating_point() else t for t in low)
        grad_output = torch.randn(2, 30, 256, generator=torch.Generator().manual_seed(5)).to(dtype).float()
        with deterministic_algorithms():
            first = forward_and_grads(compiled_op, low, grad_output)
            second = forward_and_grads(compiled_op, low, grad_output)
            want = forward_and_grads(compiled_op, as_float, grad_output)
        for name, a, b, c in zip(("output", "grad_value", "grad_locations", "grad_weights"), first, second, want):
            assert torch.equal(a, b), name
            torch.testing.assert_close(a.float(), c, rtol=2e-2, atol=2e-2, msg=name)

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


@pytest.mark.cuda
@needs_cuda
def test_cuda_metadata_on_the_gpu_is_checked_on_the_gpu():
    """Inconsistent level metadata on the GPU stops the kernel with a device-side assertion that
    names the problem (a CUDA error is fatal to the process, so the call runs in a child)."""
    kernel_device("cuda")
    script = (
        "import torch, ops\n"
        "shapes = torch.tensor([[4, 5], [2, 2]], device='cuda')\n"
        "starts = torch.tensor([0, 21], device='cuda')\n"
        "value = torch.randn(1, 24, 2, 4, device='cuda')\n"
        "locations = torch.rand(1, 3, 2, 2, 2, 2, device='cuda')\n"
        "weights = torch.rand(1, 3, 2, 2, 2, device='cuda')\n"
        "torch.ops.deformable_detr.ms_deform_attn(value, shapes, starts, locations, weights)\n"
        "torch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=OPS_DIR.parent)
    assert result.returncode != 0
    assert "inconsistent level metadata at level 1" in result.stdout + result.stderr


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
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
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


def _bad_inputs():
    """(description, mutate(inputs) -> inputs, message) for inconsistent inputs."""
    def replace(index, fn):
        return lambda inputs: tuple(fn(t) if i == index else t for i, t in enumerate(inputs))

    return [
        ("value_rank", replace(0, lambda t: t[0]), "value must be"),
        ("shapes_cols", replace(1, lambda t: t[:, :1]), "spatial_shapes must be"),
        ("starts_len", replace(2, lambda t: t[:1]), "level_start_index must be"),
        ("loc_last", replace(3, lambda t: t[..., :1]), "sampling_locations must be"),
        ("loc_heads", replace(3, lambda t: t[:, :, :1]), "does not match"),
        ("weights_shape", replace(4, lambda t: t[..., :1]), "attention_weights must be"),
        ("dtype_mix", replace(4, lambda t: t.float()), "share a dtype"),
        ("int_value", replace(0, lambda t: t.long()), "floating point"),
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

    @needs_extension
    def test_backward_op_checks_grad_output(self):
        inputs = make_inputs(*CASES["basic"])
        grad_output = torch.zeros(2, 7, 14, dtype=torch.float64)
        with pytest.raises(ValueError, match="grad_output"):
            torch.ops.deformable_detr.ms_deform_attn_backward(grad_output, *inputs)


def _setup_module():
    spec = importlib.util.spec_from_file_location("ops_setup", OPS_DIR / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestBuildArchitectures:
    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice made without a GPU")
    def test_default_list_without_a_gpu(self, monkeypatch):
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        setup = _setup_module()
        assert setup.cuda_arch_list() == setup.DEFAULT_ARCH_LIST
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
        assert setup.cuda_arch_list() == "8.6"

    @pytest.mark.cuda
    @needs_cuda
    def test_visible_gpus_only(self, monkeypatch):
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        major, minor = torch.cuda.get_device_capability(0)
        assert f"{major}.{minor}" in _setup_module().cuda_arch_list().split(";")

    def test_default_list_is_offered_by_nvcc(self):
        """Every architecture of the default list, and its PTX, is one the CUDA toolkit compiles for."""
        setup = _setup_module()
        if setup.CUDA_HOME is None:
            pytest.skip("no CUDA toolkit")
        listed = subprocess.run([str(Path(setup.CUDA_HOME) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True,
                                text=True, check=True).stdout.split()
        for arch in setup.DEFAULT_ARCH_LIST.split(";"):
            assert "compute_" + arch.removesuffix("+PTX").replace(".", "") in listed, arch

    def test_an_existing_build_is_kept_only_when_it_has_what_is_asked_for(self):
        covers = _setup_module().build_covers
        cuda = {"cuda_arch_list": "7.5;9.0"}
        cpu_only = {"cuda_arch_list": None}
        failed = {"cuda_arch_list": None, "cuda_failed_for": "7.5;9.0"}
        assert covers(cuda, None) and covers(cpu_only, None) and covers(failed, None)
        assert covers(cuda, "7.5;9.0") and covers(cuda, "9.0")
        assert not covers(cuda, "8.0") and not covers(cuda, "9.0;12.0+PTX")
        assert not covers(cpu_only, "7.5;9.0")  # `make demo`'s CPU-only build does not do for `make test`
        assert covers(failed, "7.5;9.0") and not covers(failed, "9.0")  # a failed CUDA build is retried for others
        assert not covers(None, None)  # unrecorded: rebuilt

    @staticmethod
    def _file_dated(path: Path, seconds_after_newest_source: int) -> Path:
        newest = max(f.stat().st_mtime_ns for f in [*(OPS_DIR / "csrc").rglob("*"), OPS_DIR / "setup.py"])
        path.write_bytes(b"")
        os.utime(path, ns=(newest + seconds_after_newest_source * 10**9,) * 2)
        return path

    def test_an_extension_older_than_a_source_is_rebuilt(self, tmp_path):
        setup = _setup_module()
        assert not setup.newer_than_sources(tmp_path / "_C.so")  # not built at all
        assert not setup.newer_than_sources(self._file_dated(tmp_path / "_C.so", -1))
        assert setup.newer_than_sources(self._file_dated(tmp_path / "_C.so", 1))

    def test_an_extension_of_another_torch_is_rebuilt(self, tmp_path):
        setup = _setup_module()
        built = self._file_dated(tmp_path / "_C.so", 1)
        record = {"torch": torch.__version__, "cuda_arch_list": "9.0"}
        assert setup.can_keep(record, None, [built]) and setup.can_keep(record, "9.0", [built])
        assert not setup.can_keep({**record, "torch": "2.0.0"}, None, [built])
        assert not setup.can_keep({"cuda_arch_list": "9.0"}, None, [built])  # a record from before torch was noted
