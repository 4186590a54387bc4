#!/usr/bin/env bash
# `make demo`: generate the synthetic shapes data set, train and evaluate configs/demo_cpu.sh on
# the CPU with main.py (COCO AP after every epoch), then plot the curves, draw detections with
# their sampling points, and print the final COCO numbers. Extra arguments go to main.py.
# DEMO_DATA (default data/shapes) and DEMO_OUT (default exps/demo_cpu) move the data and outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${DEMO_DATA:-data/shapes}
OUT=${DEMO_OUT:-exps/demo_cpu}
start=$(date +%s)

if [ ! -f "$DATA/annotations/instances_val2017.json" ]; then
    "$PYTHON" tools/make_synthetic_coco.py --out "$DATA" --seed 0
fi
# bfloat16 autocast where the CPU computes bfloat16 itself (AVX-512 BF16 or AMX), float32 elsewhere,
# where bfloat16 runs many times slower (docs/performance.md). An --amp among the extra arguments wins.
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then
    AMP=bf16
    echo "Training in bfloat16 (--amp bf16: this CPU has AVX-512 BF16 or AMX)"
else
    AMP=none
    echo "Training in float32 (--amp none: this CPU has no AVX-512 BF16 or AMX)"
fi
# a fresh run every time: an old log.txt would mix into the curves
rm -rf "$OUT"
PYTHON="$PYTHON" ./configs/demo_cpu.sh --coco_path "$DATA" --output_dir "$OUT" --amp "$AMP" "$@"

"$PYTHON" tools/plot_logs.py "$OUT" --out "$OUT/curves.png"
val_images=("$DATA"/val2017/*.jpg)
"$PYTHON" tools/infer.py --resume "$OUT/checkpoint.pth" --coco_path "$DATA" --threshold 0.5 \
    --show_sampling_points --num_sampling_dets 2 --draw_scale 3 --out_dir "$OUT/detections" \
    "${val_images[@]:0:4}"

"$PYTHON" - "$OUT/log.txt" "$(( $(date +%s) - start ))" <<'PY'
import json
import sys

NAMES = ["AP @[IoU=0.50:0.95]", "AP @[IoU=0.50]", "AP @[IoU=0.75]", "AP small", "AP medium", "AP large",
         "AR @1", "AR @10", "AR @100", "AR small", "AR medium", "AR large"]
last = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print(f"\nDemo finished in {int(sys.argv[2]) // 60} min {int(sys.argv[2]) % 60} s; COCO box numbers on "
      f"the synthetic val set after epoch {last['epoch']}:")
for name, value in zip(NAMES, last["test_coco_eval_bbox"]):
    print(f"  {name:20s} {value:.3f}")
PY
echo "Outputs in $OUT: log.txt, checkpoint.pth, curves.png, detections/*_det.png"
