"""``train_dino.py`` / ``simpool-train``: DINO + SimPool pretraining from the command line.

Flags: :mod:`simpool.dino.config` (every flag of the SimPool fork's ``main_dino.py``, and ours); the loop:
:mod:`simpool.dino.train`. Exit codes: 0 when training finished or stopped cleanly (preemption signal,
``--exit_after_iterations``; relaunch the same command to resume), 130 after Ctrl-C (saved the same way; a second
Ctrl-C quits at once), 1 when it had to stop (non-finite losses or weights, a checkpoint that cannot be written,
``--stop_on_collapse``), 2 for bad input (found before anything is written; another run holding ``--output_dir``
included).

Usage::

    python train_dino.py --config configs/vit_small_simpool.yaml --data_path /imagenet --output_dir runs/vits
    torchrun --nproc_per_node=8 train_dino.py --arch vit_small --mode simpool ... --output_dir runs/vits
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from simpool.checkpoint import CheckpointError, CheckpointWriteError
from simpool.data import DataError
from simpool.dino.config import parse_args
from simpool.dino.train import CollapseStopped, Trainer, TrainingStopped
from simpool.run.config import ConfigError, bad_input
from simpool.run.process import driver, end_process
from simpool.run.stop import exit_code

log = logging.getLogger("simpool.dino.run_train")  # not __name__: "__main__" under python -m


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point of train_dino.py; returns the process exit code (0 also after a preemption save)."""
    try:
        args = parse_args(argv)
        trainer = Trainer(args)
    except (ConfigError, DataError, CheckpointError) as err:
        return bad_input(err)
    try:
        end = trainer.fit()
    except (TrainingStopped, CheckpointWriteError) as err:
        return bad_input(err, code=1)
    except CollapseStopped as err:
        trainer.log.finish()
        trainer.log.warning(str(err))  # the alarm is the run's last line
        return 1
    end_process()  # every rank is here (stops are agreed on): they leave the process group together
    if end.stopped is not None:
        return exit_code(end, trainer.dist.rank)
    if trainer.dist.is_main and "knn" in end.stats and "knn_baselines" in end.stats:
        print_demo_summary(end.stats)
    return 0


def print_demo_summary(stats: dict[str, Any]) -> None:
    """The demo's table (rank 0 only): k-NN top-1 of the trained teacher against the two baselines."""
    baselines, trained = stats["knn_baselines"], stats["knn"]
    lines = ["", "weighted k-NN top-1 (%) on the validation split",
             f"{'k':>5} {'DINO+SimPool':>13} {'random init':>12} {'raw pixels':>11}"]
    for k in trained:
        lines.append(f"{k:>5} {trained[k][0]:>13.2f} {baselines['random_init'][k][0]:>12.2f} "
                     f"{baselines['raw_pixels'][k][0]:>11.2f}")
    log.info("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
