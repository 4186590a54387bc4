"""Mixed precision (``--amp``): the op and MSDeformAttn under autocast, the model's forward and
training step in bfloat16 and float16 (with the loss scaler), the scaler's checkpoint state, and
``--amp none`` being the float32 computation itself."""
import copy
import math

import pytest
import torch

import ops
from engine import AMP_DTYPES, forward, train_step
from models import build_model
from models.ms_deform_attn import MSDeformAttn
from ops import core
from util.checkpoint import load_checkpoint, restore_training_state
from util.misc import nested_tensor_from_tensor_list

from helpers import SMALL_MODEL, needs_cuda, needs_extension, parse, run_main

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]
BACKENDS = [pytest.param("compiled", marks=needs_extension), "pytorch"]


def attention_inputs(device: str, seed: int = 0):
    """An MSDeformAttn of 2 levels and its inputs: (module, query, reference_points, values, shapes, starts)."""
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).to(device)
    with torch.no_grad():  # offsets and weights away from their symmetric initialisation
        module.sampling_offsets.weight.normal_(0, 0.05)
        module.attention_weights.weight.normal_(0, 0.2)
    shapes = torch.tensor([[6, 8], [3, 4]], device=device)
    sizes = shapes.prod(1)
    starts = sizes.cumsum(0) - sizes
    query = torch.randn(2, 7, 32, device=device)
    reference_points = torch.rand(2, 7, 2, 2, device=device)
    values = torch.randn(2, int(sizes.sum()), 32, device=device)
    return module, query, reference_points, values, shapes, starts


# ------------------------------------------------------------------------------------------
# The op and the module under autocast

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_takes_half_values_with_float32_locations(device, backend, dtype, monkeypatch):
    """value in half precision, locations and weights in float32: the output and grad_value in
    value's dtype, the other gradients in float32, all near float32 on the same rounded values."""
    monkeypatch.setenv(core.BACKEND_ENV, backend)
    g = torch.Generator().manual_seed(1)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    value = torch.randn(2, 60, 2, 8, generator=g).to(device, dtype)
    locations = torch.rand(2, 5, 2, 2, 3, 2, generator=g).to(device)
    weights = torch.rand(2, 5, 2, 2, 3, generator=g).to(device)
    grad_output = torch.randn(2, 5, 16, generator=g).to(device)

    def run(v):
        leaves = [t.detach().requires_grad_() for t in (v, locations, weights)]
        out = ops.ms_deform_attn(leaves[0], shapes.to(device), starts.to(device), leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_output.to(out.dtype))
        return [out, *grads]

    got = run(value)
    want = run(value.float())
    for name, a, b, expected_dtype in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, want,
                                          (dtype, dtype, torch.float32, torch.float32)):
        assert a.dtype == expected_dtype, name
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_msdeformattn_under_autocast(device, dtype):
    module, query, reference_points, values, shapes, starts = attention_inputs(device)
    want = module(query, reference_points, values, shapes, starts)
    with torch.autocast(device, dtype=dtype):
        got = module(query, reference_points, values, shapes, starts)
        locations, weights = module.sampling_locations_and_weights(query, reference_points, shapes)
    assert got.dtype == dtype
    assert locations.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    got.float().square().sum().backward()
    for name in ("value_proj.weight", "sampling_offsets.weight", "attention_weights.weight", "output_proj.weight"):
        grad = dict(module.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name  # value, locations and weights all get gradients


@needs_extension
def test_msdeformattn_compiles_under_autocast():
    module, query, reference_points, values, shapes, starts = attention_inputs("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = module(query, reference_points, values, shapes, starts)
        got = compiled(query, reference_points, values, shapes, starts)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------
# The model

def tiny_batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 80, generator=g), torch.randn(3, 56, 64, generator=g)]
    targets = [{"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return nested_tensor_from_tensor_list(images), targets


def float32_gradients(model, criterion, samples, targets) -> dict[str, torch.Tensor]:
    """The float32 gradients of the weighted loss, computed here without engine.py."""
    losses = criterion(model(samples), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", [[], ["--with_box_refine", "--two_stage"]])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_model_forward_and_training_step_in_mixed_precision(variant, amp):
    args = parse(SMALL_MODEL + variant + ["--dropout", "0", "--num_queries", "20"])
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    samples, targets = tiny_batch()
    want = forward(model, samples)
    got = forward(model, samples, AMP_DTYPES[amp])
    assert got["pred_logits"].dtype == got["pred_boxes"].dtype == torch.float32
    assert all(a["pred_logits"].dtype == torch.float32 for a in got["aux_outputs"])
    two_stage = "--two_stage" in variant
    # Within four roundings of the half type at the outputs' magnitude (2**-8 relative for
    # bfloat16, 2**-11 for float16). Two-stage ranks its proposals by half-precision logits, so
    # other proposals may win: there the encoder's proposals, before the ranking, are compared.
    rounding = 4 * {"bf16": 2.0**-8, "fp16": 2.0**-11}[amp]
    half, full = (got["enc_outputs"], want["enc_outputs"]) if two_stage else (got, want)
    torch.testing.assert_close(half["pred_boxes"], full["pred_boxes"], rtol=0, atol=rounding)
    torch.testing.assert_close(half["pred_logits"], full["pred_logits"], rtol=0,
                               atol=rounding * float(full["pred_logits"].detach().abs().max()))

    reference = float32_gradients(copy.deepcopy(model), criterion, samples, targets)
    before = copy.deepcopy(model.state_dict())
    # A scale that leaves the float16 gradients finite here (the default 2**16 overflows in the
    # backward pass, so the scaler would skip the step); 2**8 still keeps them far from underflow.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp == "fp16" else None
    values = train_step(model, criterion, samples, targets, torch.optim.AdamW(model.parameters(), lr=1e-4), 0.1,
                        AMP_DTYPES[amp], scaler)
    # the step was taken: its norm logged, the scale not backed off, every parameter with a gradient moved
    assert "grad_norm" in values
    assert scaler is None or scaler.get_scale() == 2.0**8
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(reference)
    # ...by the float32 gradients up to half-precision rounding: the same norm (logged before clipping)
    # and direction (after clipping, as left in .grad)
    norm = math.sqrt(sum(float(g.square().sum()) for g in reference.values()))
    assert values["grad_norm"] == pytest.approx(norm, rel=0.05 if two_stage else 0.005)
    grads = dict(model.named_parameters())
    got_grad = torch.cat([grads[n].grad.double().flatten() for n in reference])
    want_grad = torch.cat([g.flatten() for g in reference.values()])
    cosine = float(got_grad @ want_grad / (got_grad.norm() * want_grad.norm()))
    assert cosine > (0.9 if two_stage else 0.99)
    assert float(got_grad.norm()) == pytest.approx(min(norm, 0.1), rel=0.005)  # clipped to --clip_max_norm


def test_float16_overflow_is_skipped_not_an_error():
    args = parse(SMALL_MODEL + ["--dropout", "0"])
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    samples, targets = tiny_batch()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # every gradient overflows
    values = train_step(model, criterion, samples, targets, optimizer, 0.1, torch.float16, scaler)
    assert "grad_norm" not in values and math.isfinite(values["loss"])  # a finite loss, a skipped step
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scaler.get_scale() < 2.0**100  # the scale backed off


def test_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for _ in range(4):  # grow and back off the scale
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(4, 3)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
                "epoch": 0, "scaler": scaler.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    fresh = torch.amp.GradScaler("cpu")
    restore_training_state(checkpoint, optimizer, schedule, fresh)
    assert fresh.state_dict() == scaler.state_dict()


class AutocastProbe:
    """Forward hooks on every module of a model recording whether autocast was on and the dtype of
    each floating-point output: (module name, autocast enabled, dtype)."""

    def __init__(self, model: torch.nn.Module):
        self.seen: list[tuple[str, bool, torch.dtype]] = []
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in model.named_modules()]

    def _hook(self, name: str):
        def record(module, inputs, output):
            for t in (output if isinstance(output, tuple) else (output,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.seen.append((name, torch.is_autocast_enabled("cpu"), t.dtype))
        return record

    def __enter__(self) -> "AutocastProbe":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def test_amp_none_is_the_float32_computation():
    """--amp none (the default) runs the original's float32 computation: no module of the model
    runs under autocast or computes in another dtype, in forward() and in a training step; and
    MSDeformAttn's float32 arithmetic is the plain formula, bit for bit."""
    module, query, reference_points, values, shapes, starts = attention_inputs("cpu")
    locations, weights = module.sampling_locations_and_weights(query, reference_points, shapes)
    offsets = module.sampling_offsets(query).view(2, 7, 4, 2, 3, 2)
    normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1)
    assert torch.equal(locations, reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :,
                                                                                                     None, :])
    logits = module.attention_weights(query).view(2, 7, 4, 6)
    assert torch.equal(weights, torch.nn.functional.softmax(logits, -1).view(2, 7, 4, 2, 3))
    args = parse(SMALL_MODEL + ["--dropout", "0"])
    assert args.amp == "none"
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    samples, targets = tiny_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with AutocastProbe(model) as none:
        forward(model, samples, AMP_DTYPES[args.amp])
        train_step(model, criterion, samples, targets, optimizer, 0.1, AMP_DTYPES[args.amp])
    with AutocastProbe(model) as bf16:  # the probe sees autocast where there is one
        forward(model, samples, AMP_DTYPES["bf16"])
    # every matrix product and convolution ran (nn.MultiheadAttention uses its out_proj's weights only)
    products = {n for n, m in model.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not n.endswith("self_attn.out_proj")}
    assert products <= {name for name, _, _ in none.seen}
    assert {(autocast, dtype) for _, autocast, dtype in none.seen} == {(False, torch.float32)}
    assert {(autocast, dtype) for _, autocast, dtype in bf16.seen} == {(True, torch.float32), (True, torch.bfloat16)}


@pytest.mark.slow
def test_main_saves_the_scaler_with_fp16_only_and_resumes_it(tiny_coco_root, tmp_path):
    common = [*SMALL_MODEL, "--coco_path", str(tiny_coco_root), "--batch_size", "2"]
    for amp in ("fp16", "bf16"):
        proc = run_main([*common, "--epochs", "1", "--amp", amp, "--output_dir", str(tmp_path / amp)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    fp16 = load_checkpoint(tmp_path / "fp16" / "checkpoint.pth")
    assert fp16["args"].amp == "fp16" and fp16["scaler"]["scale"] > 0
    assert "scaler" not in load_checkpoint(tmp_path / "bf16" / "checkpoint.pth")
    # A saved scale of 2**8, 5 steps since it last changed: resumed for one epoch of two steps, the
    # scaler continues from there (a fresh one would start at 2**16 and back off on overflow).
    fp16["scaler"].update(scale=2.0**8, _growth_tracker=5)
    torch.save(fp16, tmp_path / "fp16" / "checkpoint.pth")
    proc = run_main([*common, "--epochs", "2", "--amp", "fp16", "--output_dir", str(tmp_path / "fp16"),
                     "--auto_resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_checkpoint(tmp_path / "fp16" / "checkpoint.pth")
    assert resumed["epoch"] == 1
    assert (resumed["scaler"]["scale"], resumed["scaler"]["_growth_tracker"]) == (2.0**8, 7)
