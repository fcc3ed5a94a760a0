"""The documented ``python -m simpool.evaluation.attention``: an alias of
:mod:`simpool.evaluation.run_attention` (the command line) kept so that earlier commands work as typed."""

import sys

from simpool.evaluation.run_attention import main

if __name__ == "__main__":
    sys.exit(main())
