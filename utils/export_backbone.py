"""Export the backbone of a DINO checkpoint to OUT_DIR/model.safetensors + OUT_DIR/config.json (``simpool-export``).

    python utils/export_backbone.py runs/vits/checkpoint.pth exports/vits            # teacher, as trained
    python utils/export_backbone.py runs/vits/checkpoint.pth exports/vits_student --which student
    python utils/export_backbone.py dino_deitsmall16_pretrain.pth exports/dino_vits \
        --arch vit_small --mode official

The command is simpool/cli/run_export.py; the export format is simpool/export.py.
"""

import sys

from simpool.cli.run_export import main

if __name__ == "__main__":
    sys.exit(main())
