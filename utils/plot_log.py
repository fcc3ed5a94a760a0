"""Training curves of DINO runs as a PNG: loss, teacher entropy and KL with the collapse bands, prototypes in use,
lr / wd / momentum, k-NN per epoch (with random-init and raw-pixel lines), img/s and data wait.

    python utils/plot_log.py runs/demo                        # writes runs/demo/curves.png
    python utils/plot_log.py runs/a runs/b --out compare.png  # several runs overlaid

The command is simpool/cli/run_plot_log.py.
"""

import sys

from simpool.cli.run_plot_log import main

if __name__ == "__main__":
    sys.exit(main())
