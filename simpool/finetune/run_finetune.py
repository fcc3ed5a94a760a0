"""``finetune.py`` / ``simpool-finetune``: supervised fine-tuning of a pretrained backbone with a linear head.

Flags: :mod:`simpool.finetune.config`; the run: :mod:`simpool.finetune.trainer`. Exit codes: 0 when it finished
or stopped cleanly (preemption signal, ``--exit_after_iterations``; relaunch the same command to resume), 130 after
Ctrl-C (saved the same way; a second Ctrl-C quits at once), 1 when a checkpoint cannot be written or the weights
stopped being finite, 2 for bad input (found before anything is written; another run holding ``--output_dir``
included).

Usage::

    python finetune.py --config configs/finetune_vit.yaml --pretrained_weights runs/vits/checkpoint.pth \\
        --data_path /data/mydataset --output_dir runs/ft
    torchrun --nproc_per_node=8 finetune.py --config configs/finetune_resnet.yaml --random_init \\
        --arch resnet50 --mode simpool --data_path /imagenet --output_dir runs/rsb
"""

from __future__ import annotations

import sys

from simpool.checkpoint import CheckpointWriteError
from simpool.finetune.config import parse_finetune_args
from simpool.finetune.trainer import FineTuneRun, TrainingStopped
from simpool.run.config import bad_input
from simpool.run.process import driver, end_process
from simpool.run.stop import exit_code


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point of finetune.py; returns the exit code (2: bad input, reported before anything is written)."""
    try:
        args = parse_finetune_args(argv)
        run = FineTuneRun(args)
    except ValueError as err:  # ConfigError, DataError, CheckpointError
        return bad_input(err)
    try:
        end = run.fit()
    except (CheckpointWriteError, TrainingStopped) as err:
        return bad_input(err, code=1)
    end_process()
    return exit_code(end, run.dist.rank)


if __name__ == "__main__":
    sys.exit(main())
