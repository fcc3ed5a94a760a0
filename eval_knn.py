"""Weighted k-NN evaluation of a frozen backbone (flags of facebookresearch/dino's eval_knn.py).

    torchrun --nproc_per_node=4 eval_knn.py --arch vit_small --mode simpool --gamma 1.25 \
        --pretrained_weights runs/vits/checkpoint.pth --checkpoint_key teacher --data_path /imagenet

The driver is simpool/evaluation/run_knn.py (installed as ``simpool-eval-knn``); the k-NN itself is
simpool/evaluation/knn.py.
"""

import sys

from simpool.evaluation.run_knn import main

if __name__ == "__main__":
    sys.exit(main())
