"""Check this implementation against the original Deformable DETR code, variant by variant.

Needs a checkout of fundamentalvision/Deformable-DETR (it is not part of this project):

    python tools/compare_with_original.py --original /path/to/Deformable-DETR

For each of the five variants it builds both models (no pretrained weights), perturbs our
weights randomly, loads our ``state_dict`` into the original with ``strict=True``, and compares,
on a padded batch of two images with targets, float32 on CPU: the outputs (final, auxiliary,
encoder), every loss term, every parameter gradient and the post-processed detections. It prints
the largest relative difference of each group (max |ours - theirs| / max |theirs| per tensor)
and exits with status 1 if any exceeds ``--tolerance``.

What to expect (see docs/faithfulness.md): with ``--dtype float64`` the differences are
at rounding level (1e-14); in float32 with ``MSDA_BACKEND=pytorch`` the two are bit-identical;
in float32 with the compiled kernel, outputs and losses differ by rounding (1e-7 to 1e-6) and a
gradient can differ more where a sampling point lies within rounding distance of a pixel centre,
where bilinear interpolation's derivative jumps.

The original only runs its sampling core as a CUDA extension; here that extension is replaced
by the original's own pure-PyTorch core (``ms_deform_attn_core_pytorch``), and its torchvision
version check and ImageNet download are bypassed, all at run time without editing its files.
"""
import argparse
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from util.flags import VARIANTS, config_flags  # noqa: E402

PACKAGES = ("models", "util", "datasets", "engine", "ops")


def _forget_packages() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        del sys.modules[name]


def _fake_compiled_op(core) -> types.ModuleType:
    """Stand-in for the original's ``MultiScaleDeformableAttention`` extension, on its own core."""
    module = types.ModuleType("MultiScaleDeformableAttention")

    def forward(value, shapes, level_start_index, locations, weights, im2col_step):
        return core(value, shapes, locations, weights)

    def backward(value, shapes, level_start_index, locations, weights, grad_output, im2col_step):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
            out = core(inputs[0], shapes, inputs[1], inputs[2])
            return torch.autograd.grad(out, inputs, grad_output)

    module.ms_deform_attn_forward = forward
    module.ms_deform_attn_backward = backward
    return module


def load_original(path: Path):
    """The original's ``build`` function, imported from ``path`` with run-time shims."""
    import torchvision

    _forget_packages()
    sys.path.insert(0, str(path))
    real_version = torchvision.__version__
    torchvision.__version__ = "0.8.0"  # its util/misc.py parses the version as a float
    try:
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
        from models.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch
        sys.modules["MultiScaleDeformableAttention"] = _fake_compiled_op(ms_deform_attn_core_pytorch)
        import models.ops.functions.ms_deform_attn_func as func_module
        func_module.MSDA = sys.modules["MultiScaleDeformableAttention"]
        import models.backbone as backbone_module
        from models.deformable_detr import build
        backbone_module.is_main_process = lambda: False  # no ImageNet download
    finally:
        torchvision.__version__ = real_version
        sys.path.remove(str(path))
        _forget_packages()
    return build


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = theirs.detach().abs().max().clamp(min=1e-12)
    return ((ours.detach() - theirs.detach()).abs().max() / scale).item()


def compare_detections(ours: dict, theirs: dict) -> float:
    """Relative difference of two images' detections. Each of ours is paired with the closest
    unpaired box of theirs with the same label, so that near-equal scores listed in another order
    do not count as a difference; different label sets count as 1."""
    if sorted(ours["labels"].tolist()) != sorted(theirs["labels"].tolist()):
        return 1.0
    score_scale = theirs["scores"].abs().max().clamp(min=1e-12)
    box_scale = theirs["boxes"].abs().max().clamp(min=1e-12)
    unpaired = list(range(len(theirs["labels"])))
    worst = 0.0
    for label, score, box in zip(ours["labels"], ours["scores"], ours["boxes"]):
        candidates = [j for j in unpaired if theirs["labels"][j] == label]
        j = min(candidates, key=lambda k: (theirs["boxes"][k] - box).abs().max().item())
        unpaired.remove(j)
        worst = max(worst, ((theirs["scores"][j] - score).abs() / score_scale).item(),
                    ((theirs["boxes"][j] - box).abs().max() / box_scale).item())
    return worst


def run_variant(flags, build_original, build_ours, parse, seed: int, dtype: torch.dtype) -> dict:
    args = parse(flags + ["--dropout", "0", "--device", "cpu", "--backbone_weights", "none"])
    original_args = argparse.Namespace(**vars(args), masks=False, frozen_weights=None)
    model_o, criterion_o, post_o = build_original(original_args)
    model, criterion, post = build_ours(args)
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point and not key.endswith("running_var"):
                value.add_(torch.randn_like(value) * 0.02)
    model_o.load_state_dict(model.state_dict(), strict=True)
    model.to(dtype)
    model_o.to(dtype)

    images = [torch.randn(3, 128, 160, dtype=dtype), torch.randn(3, 112, 144, dtype=dtype)]
    targets = [{"labels": torch.tensor([3, 17, 1]),
                "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.3]], dtype=dtype)},
               {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.4, 0.6, 0.5, 0.5]], dtype=dtype)}]
    sizes = torch.tensor([[480, 640], [400, 560]])
    results = []
    for mdl, crit, pp in ((model, criterion, post), (model_o, criterion_o, post_o)):
        mdl.train()
        out = mdl(images)
        losses = crit(out, targets)
        sum(losses[k] * crit.weight_dict[k] for k in losses if k in crit.weight_dict).backward()
        grads = {n: p.grad for n, p in mdl.named_parameters() if p.grad is not None}
        results.append((out, losses, grads, pp["bbox"](out, sizes)))
    (out, losses, grads, dets), (out_o, losses_o, grads_o, dets_o) = results

    if set(losses) != set(losses_o) or set(grads) != set(grads_o):
        raise RuntimeError(f"loss or gradient names differ: {set(losses) ^ set(losses_o)} {set(grads) ^ set(grads_o)}")
    heads = [(out, out_o)] + list(zip(out["aux_outputs"], out_o["aux_outputs"]))
    if "enc_outputs" in out_o:
        heads.append((out["enc_outputs"], out_o["enc_outputs"]))
    return {
        "outputs": max(relative(a[k], b[k]) for a, b in heads for k in ("pred_logits", "pred_boxes")),
        "losses": max(relative(losses[k], losses_o[k]) for k in losses),
        "gradients": max(relative(grads[k], grads_o[k]) for k in grads),
        "detections": max(compare_detections(a, b) for a, b in zip(dets, dets_o)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, type=Path, help="checkout of fundamentalvision/Deformable-DETR")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    cli = parser.parse_args()
    if not (cli.original / "models" / "deformable_detr.py").is_file():
        parser.error(f"--original {cli.original}: no models/deformable_detr.py there")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    build_original = load_original(cli.original.resolve())
    from models import build_model
    from util.flags import get_args_parser

    worst = 0.0
    for name in cli.variants:
        errors = run_variant(config_flags(name), build_original, build_model, get_args_parser().parse_args,
                             cli.seed, getattr(torch, cli.dtype))
        worst = max(worst, *errors.values())
        print(f"{name:75s} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    print(f"largest relative difference {worst:.1e} (tolerance {cli.tolerance:.0e})")
    return 0 if worst <= cli.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
