#!/usr/bin/env bash
# Run a training command as a GPUS-task Slurm job step, one task per GPU.
#
#   tools/run_dist_slurm.sh PARTITION JOB_NAME GPUS CMD [ARGS...]
#   e.g. GPUS_PER_NODE=8 ./tools/run_dist_slurm.sh my_partition deformable_detr 16 ./configs/r50_deformable_detr.sh
#
# Every task runs CMD; main.py takes its rank from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID and
# the master address from the first host of SLURM_NODELIST (MASTER_PORT, default 29500).
# Environment: GPUS_PER_NODE (default: GPUS, at most 8), CPUS_PER_TASK (4), SRUN_ARGS (extra
# srun options, word-split).
set -euo pipefail
set -x

if [ $# -lt 4 ]; then
    echo "usage: $0 PARTITION JOB_NAME GPUS CMD [ARGS...]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
GPUS=$3
shift 3
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
SRUN_ARGS=${SRUN_ARGS:-""}

# shellcheck disable=SC2086  # SRUN_ARGS holds several options
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$@"
