#!/usr/bin/env bash
# Deformable DETR variant 'r50_deformable_detr'; extra arguments go to main.py.
# Multi-GPU: GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr.sh
# PYTHON picks the interpreter (default: python); it replaces this shell (exec), so that signals
# reach main.py itself.

set -x

EXP_DIR=exps/r50_deformable_detr
PY_ARGS=("$@")

exec "${PYTHON:-python}" -u main.py \
    --output_dir "${EXP_DIR}" \
    "${PY_ARGS[@]}"
