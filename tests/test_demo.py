"""`make demo`'s script, shortened: a small synthetic set, one epoch, then curves and pictures."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tools.make_synthetic_coco import make_synthetic_coco
from util.checkpoint import load_checkpoint

from helpers import REPO, subprocess_env


@pytest.mark.slow
def test_shortened_demo_completes(tmp_path):
    data = make_synthetic_coco(tmp_path / "shapes", num_train=32, num_val=8, image_size=128, seed=1)
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", "tools/run_demo.sh", "--epochs", "1"], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(DEMO_DATA=str(data), DEMO_OUT=str(out), PYTHON=sys.executable),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "COCO box numbers on the synthetic val set after epoch 0" in proc.stdout
    assert proc.stdout.count("  AP") >= 6 and f"Outputs in {out}" in proc.stdout
    assert len((out / "log.txt").read_text().splitlines()) == 1
    with Image.open(out / "curves.png") as curves:
        assert curves.format == "PNG" and curves.width > 200
    pictures = sorted((out / "detections").glob("*_det.png"))
    assert len(pictures) == 4
    with Image.open(pictures[0]) as picture:
        assert picture.size == (3 * 128, 3 * 128)  # drawn at --draw_scale 3
    # bfloat16 exactly where the CPU computes it natively
    native_bf16 = re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text())
    assert load_checkpoint(out / "checkpoint.pth")["args"].amp == ("bf16" if native_bf16 else "none")
    assert ("Training in bfloat16" if native_bf16 else "Training in float32") in proc.stdout
