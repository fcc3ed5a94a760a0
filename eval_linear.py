"""Linear probe on frozen features (flags of facebookresearch/dino's eval_linear.py).

    torchrun --nproc_per_node=4 eval_linear.py --arch vit_small --mode simpool --gamma 1.25 \
        --pretrained_weights runs/vits/checkpoint.pth --data_path /imagenet --output_dir runs/lin --epochs 100

The command line is simpool/evaluation/run_linear.py; the run (data, checkpoint, log) is
simpool/evaluation/linear_probe.py; the heads, their optimiser and the training loop are in
simpool/evaluation/linear.py.
"""

import sys

from simpool.evaluation.run_linear import main

if __name__ == "__main__":
    sys.exit(main())
