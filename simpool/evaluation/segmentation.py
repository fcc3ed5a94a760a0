"""The documented ``python -m simpool.evaluation.segmentation``: an alias of
:mod:`simpool.evaluation.run_segmentation` (the command line) kept so that earlier commands work as typed."""

import sys

from simpool.evaluation.run_segmentation import main

if __name__ == "__main__":
    sys.exit(main())
