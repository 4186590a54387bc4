#!/usr/bin/env bash
# Run a training command as a GPUS-process job, one process per GPU, on top of torchrun.
#
#   tools/run_dist_launch.sh GPUS CMD [ARGS...]
#   e.g. GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr.sh
#
# CMD is executed as given (torchrun --no-python) once per local process, with RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment; main.py reads them.
# So CMD may be a config script (which then runs `python -u main.py ...`) or `python main.py ...`.
# Environment: GPUS_PER_NODE (default: GPUS, at most 8), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500), NODE_RANK (0); for several nodes run this on each with its NODE_RANK.
# MAX_RESTARTS (0): how many times torchrun starts the whole group again after a process fails;
# with main.py's --auto_resume each restart continues from the last checkpoint.
# SIGTERM or SIGUSR1 to torchrun is passed on to the processes (which save and stop), and torchrun
# waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) for them before it kills them.
# PYTHON names the interpreter that runs torchrun (default: python).
set -euo pipefail
set -x

if [ $# -lt 2 ]; then
    echo "usage: $0 GPUS CMD [ARGS...]" >&2
    exit 2
fi
GPUS=$1
shift
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
MASTER_PORT=${MASTER_PORT:-"29500"}
NODE_RANK=${NODE_RANK:-0}
if [ $((GPUS % GPUS_PER_NODE)) -ne 0 ]; then
    echo "GPUS=$GPUS is not a multiple of GPUS_PER_NODE=$GPUS_PER_NODE" >&2
    exit 2
fi
NNODES=$((GPUS / GPUS_PER_NODE))

exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes "${NNODES}" \
    --node_rank "${NODE_RANK}" \
    --master_addr "${MASTER_ADDR}" \
    --master_port "${MASTER_PORT}" \
    --nproc_per_node "${GPUS_PER_NODE}" \
    --max_restarts "${MAX_RESTARTS:-0}" \
    --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --no-python \
    "$@"
