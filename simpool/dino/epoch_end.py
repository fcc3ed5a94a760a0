"""An epoch's bookkeeping once its last step is taken: the checkpoint first, then the rest, redone if killed.

Order, and why: the checkpoint (and the kept ``checkpointNNNN.pth`` every ``--saveckp_freq`` epochs) is written
first, recording the epoch as *pending*; then the teacher's attention grid (``--attention_every``), the online
k-NN when due, and the epoch's line in ``log.txt``. A kill anywhere in between leaves a checkpoint that says
"epoch e ended, its line is not written": the relaunch redoes the rest (:meth:`EpochEnd.redo`) instead of
losing the epoch's k-NN and log line or doing them twice.

Example:
    >>> epoch_end = EpochEnd(args, output_dir, run_log, attention_log, online_knn, world_size)
    >>> save(keep_as=epoch_end.kept_name(epoch))                # progress.pending_epoch_end = {...} inside
    >>> stats = epoch_end.log(epoch, train_stats, teacher, iteration)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from simpool.dino.attention_log import AttentionLog
from simpool.dino.online_knn import OnlineKNN
from simpool.distributed import max_difference_from_rank0
from simpool.run.log import RunLogger, logged_epochs

__all__ = ["EpochEnd"]


class EpochEnd:
    """What follows an epoch's checkpoint: attention grid, k-NN, ``log.txt`` line (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, output_dir: Path, run_log: RunLogger, attention_log: AttentionLog,
                 online_knn: OnlineKNN, world_size: int) -> None:
        self.args, self.output_dir, self.run_log = args, output_dir, run_log
        self.attention_log, self.online_knn, self.world_size = attention_log, online_knn, world_size

    def kept_name(self, epoch: int) -> str | None:
        """``checkpointNNNN.pth`` when epoch ``epoch`` is one to keep (every ``--saveckp_freq``), else None."""
        keep = self.args.saveckp_freq and epoch % self.args.saveckp_freq == 0
        return f"checkpoint{epoch:04}.pth" if keep else None

    def logged(self, epoch: int) -> bool:
        """Whether ``log.txt`` holds epoch ``epoch``'s line (every rank reads the same file)."""
        return epoch in logged_epochs(self.output_dir / "log.txt", "train_loss")

    def log(self, epoch: int, train_stats: dict[str, Any], teacher: nn.Module, iteration: int) -> dict[str, Any]:
        """The attention grid and k-NN when due, then the epoch's ``log.txt`` line; returns that line's stats.
        ``teacher`` is the unwrapped MultiCropWrapper."""
        stats: dict[str, Any] = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if self.world_size > 1:  # DDP keeps the teachers identical; this says so in every log line
            stats["teacher_rank_max_diff"] = max_difference_from_rank0(list(teacher.parameters()))
        if self.attention_log.due(epoch):
            self.attention_log.write(epoch, teacher.backbone, step=iteration)
        if self.online_knn.due(epoch):
            stats["knn"] = self.online_knn.evaluate(teacher.backbone)
        self.run_log.log_epoch(stats, step=iteration)
        return stats
