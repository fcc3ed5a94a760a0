"""Draw a backbone's attention maps over images as PNGs (the ``simpool-visualize`` script, from a checkout).

    python utils/visualize_attention.py --pretrained_weights exports/vits --image_path cat.jpg --output_dir v

The flags and the files written are described in simpool/cli/run_visualize.py (``--help``).
"""

import sys

from simpool.cli.run_visualize import main

if __name__ == "__main__":
    sys.exit(main())
