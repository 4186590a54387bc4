#!/usr/bin/env bash
# Deformable DETR variant 'r50_deformable_detr_single_scale'; extra arguments go to main.py.
# Multi-GPU: GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr_single_scale.sh
# PYTHON picks the interpreter (default: python); it replaces this shell (exec), so that signals
# reach main.py itself.

set -x

EXP_DIR=exps/r50_deformable_detr_single_scale
PY_ARGS=("$@")

exec "${PYTHON:-python}" -u main.py \
    --output_dir "${EXP_DIR}" \
    --num_feature_levels 1 \
    "${PY_ARGS[@]}"
