"""DINO self-supervised pretraining with SimPool (flags of facebookresearch/dino's main_dino.py).

    torchrun --nproc_per_node=8 train_dino.py --arch vit_small --mode simpool --data_path /imagenet/train ...
    python train_dino.py --config configs/demo.yaml --output_dir runs/demo

The training step is in simpool/dino/step.py, the loop in simpool/dino/train.py, the flags in
simpool/dino/config.py.
"""

import sys

from simpool.dino.run_train import main

if __name__ == "__main__":
    sys.exit(main())
