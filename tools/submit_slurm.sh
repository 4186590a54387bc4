#!/usr/bin/env bash
# Submit a training command as a Slurm batch job that survives preemption and time limits: one
# task per GPU, as tools/run_dist_slurm.sh runs them, with main.py's --auto_resume added.
#
#   tools/submit_slurm.sh PARTITION JOB_NAME GPUS CMD [ARGS...]
#   e.g. GPUS_PER_NODE=8 ./tools/submit_slurm.sh my_partition deformable_detr 16 ./configs/r50_deformable_detr.sh
#
# Slurm sends SIGUSR1 to the tasks SIGNAL_SECONDS (default 120) before the time limit, and SIGTERM
# when it preempts the job. main.py then finishes its step, writes checkpoint.pth and exits with
# 128 + the signal's number (138, 143); the job then requeues itself (`scontrol requeue`), and the
# next run continues from the checkpoint. A preempted job is requeued by Slurm itself (--requeue).
# Environment: GPUS_PER_NODE (default: GPUS, at most 8), CPUS_PER_TASK (4), TIME (the time limit,
# sbatch's format, default the partition's), SIGNAL_SECONDS (120), SBATCH_ARGS (extra sbatch
# options, word-split), LOG (the job's output file, default JOB_NAME-%j.log, appended to by every
# run of the job).
set -euo pipefail

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
if [ $((GPUS % GPUS_PER_NODE)) -ne 0 ]; then
    echo "GPUS=$GPUS is not a multiple of GPUS_PER_NODE=$GPUS_PER_NODE" >&2
    exit 2
fi
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-120}
LOG=${LOG:-"${JOB_NAME}-%j.log"}
SBATCH_ARGS=${SBATCH_ARGS:-""}
TIME_OPTION=()
if [ -n "${TIME:-}" ]; then
    TIME_OPTION=(--time="${TIME}")
fi

# The batch script, with the command quoted word for word.
COMMAND=$(printf '%q ' "$@" --auto_resume)
# shellcheck disable=SC2086  # SBATCH_ARGS holds several options
sbatch --partition="${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --nodes=$((GPUS / GPUS_PER_NODE)) \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --requeue \
    --signal=USR1@"${SIGNAL_SECONDS}" \
    --open-mode=append \
    --output="${LOG}" \
    "${TIME_OPTION[@]}" \
    ${SBATCH_ARGS} <<SCRIPT
#!/usr/bin/env bash
# Slurm's SIGTERM is for the tasks, which save before they stop; this script waits for them.
trap '' TERM
srun --kill-on-bad-exit=1 ${COMMAND}
status=\$?
if [ "\$status" -eq 138 ] || [ "\$status" -eq 143 ]; then
    echo "the run stopped on a signal with a checkpoint (status \$status): requeueing job \$SLURM_JOB_ID"
    scontrol requeue "\$SLURM_JOB_ID"
fi
exit "\$status"
SCRIPT
