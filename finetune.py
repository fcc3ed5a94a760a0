"""Supervised fine-tuning of a pretrained backbone with a linear head on its pooled feature.

    python finetune.py --config configs/finetune_vit.yaml --pretrained_weights runs/vits/checkpoint.pth \
        --data_path /data/mydataset --output_dir runs/ft
    torchrun --nproc_per_node=8 finetune.py --config configs/finetune_resnet.yaml --random_init \
        --arch resnet50 --mode simpool --data_path /imagenet --output_dir runs/rsb

The command is simpool/finetune/run_finetune.py, the run simpool/finetune/trainer.py, the flags
simpool/finetune/config.py.
"""

import sys

from simpool.finetune.run_finetune import main

if __name__ == "__main__":
    sys.exit(main())
