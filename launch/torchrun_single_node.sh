#!/usr/bin/env bash
# One machine, one process per GPU, through torchrun (torch.distributed.run).
#
#   launch/torchrun_single_node.sh --arch vit_small --mode simpool --data_path /imagenet --output_dir runs/vits
#   NGPUS=4 SCRIPT=eval_knn.py launch/torchrun_single_node.sh --pretrained_weights runs/vits/checkpoint.pth ...
#
# Environment: NGPUS (default: every visible GPU, or 1), SCRIPT (train_dino.py, eval_knn.py, eval_linear.py;
# default train_dino.py), PYTHON (default: python). Everything else goes to SCRIPT. --standalone picks a free
# local rendezvous port, so several single-node runs can share a machine. launch/torchrun.py is torchrun with
# one difference: SIGTERM/SIGUSR1 that ended in a clean checkpoint save exit 0 (requeue), not 1.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SCRIPT=${SCRIPT:-train_dino.py}
if [[ -z "${NGPUS:-}" ]]; then
    NGPUS=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

exec "$PYTHON" launch/torchrun.py --standalone --nnodes=1 --nproc_per_node="$NGPUS" "$SCRIPT" "$@"
