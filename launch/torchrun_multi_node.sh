#!/usr/bin/env bash
# Several machines, one process per GPU: run this same command on every node.
#
#   MASTER_ADDR=node01 MASTER_PORT=29500 NNODES=2 launch/torchrun_multi_node.sh --arch vit_small ...
#   RDZV_ENDPOINT=node01:29500 NNODES=4 SCRIPT=eval_linear.py launch/torchrun_multi_node.sh ...
#
# Environment:
#   NNODES           number of nodes (required)
#   RDZV_ENDPOINT    host:port of the rendezvous, reachable from every node; default MASTER_ADDR:MASTER_PORT
#   MASTER_ADDR      used when RDZV_ENDPOINT is unset (e.g. the first node's hostname); MASTER_PORT default 29500
#   RDZV_ID          the same on every node of one run, different between runs (default: simpool_<NNODES>)
#   NGPUS            processes per node (default: every visible GPU)
#   SCRIPT           train_dino.py (default), eval_knn.py or eval_linear.py; PYTHON (default: python)
# torchrun's c10d rendezvous assigns node ranks itself, so no NODE_RANK is needed. launch/torchrun.py is torchrun
# except that SIGTERM/SIGUSR1 ending in a clean checkpoint save exit 0 (requeue), not 1.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SCRIPT=${SCRIPT:-train_dino.py}
: "${NNODES:?set NNODES to the number of nodes}"
if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    : "${MASTER_ADDR:?set MASTER_ADDR (the first node) or RDZV_ENDPOINT=host:port}"
    RDZV_ENDPOINT="${MASTER_ADDR}:${MASTER_PORT:-29500}"
fi
if [[ -z "${NGPUS:-}" ]]; then
    NGPUS=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

exec "$PYTHON" launch/torchrun.py \
    --nnodes="$NNODES" \
    --nproc_per_node="$NGPUS" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_ENDPOINT" \
    --rdzv_id="${RDZV_ID:-simpool_${NNODES}}" \
    "$SCRIPT" "$@"
