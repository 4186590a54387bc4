#!/usr/bin/env bash
# A small two-stage Deformable DETR (box refinement, 4 levels) trained from scratch on CPU, for the
# synthetic shapes data of tools/make_synthetic_coco.py: `make demo` runs it. Extra arguments
# go to main.py (e.g. --coco_path, --epochs, --amp); PYTHON picks the interpreter (default: python).

set -x

EXP_DIR=exps/demo_cpu
PY_ARGS=("$@")

exec "${PYTHON:-python}" -u main.py \
    --output_dir "${EXP_DIR}" \
    --device cpu \
    --num_classes 13 \
    --backbone resnet10 --backbone_width 32 --backbone_norm batch --train_backbone_stem \
    --backbone_weights none \
    --hidden_dim 64 --nheads 4 --dim_feedforward 256 --enc_layers 3 --dec_layers 3 \
    --num_queries 30 --with_box_refine --two_stage --dropout 0 --channels_last --fused_optimizer \
    --lr 1e-3 --lr_backbone 1e-3 --lr_linear_proj_mult 1 \
    --batch_size 16 --epochs 11 --lr_drop 10 \
    --train_scales 128 --crop_resize_scales 128 --crop_size 128 128 --val_scale 128 --max_size 128 \
    --num_workers 0 \
    "${PY_ARGS[@]}"
