"""Placeholder for ``make demo``: one forward pass of a randomly initialised Deformable DETR.

No weights are downloaded: the backbone starts from random values, so the detections printed
are meaningless; this only shows the model running end to end on this machine.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main as detr_main  # noqa: E402
from models import build_model  # noqa: E402


def run(flags: list) -> None:
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    args = parser.parse_args(["--backbone_weights", "none", "--device", "cpu"] + flags)
    torch.manual_seed(args.seed)
    model, _, postprocessors = build_model(args)
    model.eval()
    image = torch.rand(3, 480, 640)
    start = time.perf_counter()
    with torch.no_grad():
        outputs = model([image])
    seconds = time.perf_counter() - start
    detections = postprocessors["bbox"](outputs, torch.tensor([[480, 640]]))[0]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("Deformable DETR, random weights (placeholder demo: no training, detections are noise)")
    print(f"trainable parameters: {params:,}")
    print(f"forward pass of one 480x640 image on CPU: {seconds:.2f} s")
    print(f"pred_logits {tuple(outputs['pred_logits'].shape)}, pred_boxes {tuple(outputs['pred_boxes'].shape)}, "
          f"{len(outputs['aux_outputs'])} auxiliary outputs")
    best = detections["scores"].argmax()
    print(f"top detection: class {detections['labels'][best].item()}, score {detections['scores'][best].item():.3f}, "
          f"box {[round(v, 1) for v in detections['boxes'][best].tolist()]}")


if __name__ == "__main__":
    run(sys.argv[1:])
