"""Draw a backbone's attention maps over images: heat-map overlays and DINO's 60%-mass masks, as PNGs.

    python utils/visualize_attention.py --pretrained_weights exports/vits --image_path cat.jpg --output_dir v
    python utils/visualize_attention.py --pretrained_weights runs/vits/checkpoint.pth \
        --image_path photos/ --output_dir viz \
        --compare dino_deitsmall16_pretrain.pth --compare_arch vit_small --compare_mode official

--pretrained_weights is an export folder (utils/export_backbone.py) or a checkpoint: for a checkpoint the
architecture comes from its training args unless --arch/--mode/... are given (backbone-only files need them).
SimPool models show SimPool's attention; official ViTs their last block's [CLS] attention, per head and
averaged. The shorter side of each image is scaled to --image_size and both sides are rounded to multiples of
the patch size (a resize, no crop); every PNG has that size. For each image, OUTPUT_DIR/<image name>/ gets
image.png, then attention.png + mask.png (one map) or attention_head<i>.png, attention_mean.png and the
matching mask_*.png (several heads); with --compare also compare_*.png and the side-by-side compare.png.
"""

import sys

from simpool.cli.visualize_attention import main

if __name__ == "__main__":
    sys.exit(main())
