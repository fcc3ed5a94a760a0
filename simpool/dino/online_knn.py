"""The k-NN a DINO run computes while it trains (the reference's online evaluation), and its baselines.

Every ``--eval_every`` epochs and after the last, the teacher's backbone embeds the labelled ``train/`` and
``val/`` splits of ``--data_path`` (at most ``--knn_max_images`` each, evenly spaced) with the evaluation
transform, and ``val/`` is classified by weighted k-NN (:func:`simpool.evaluation.knn.knn_on_features`, the same
entry point as ``eval_knn.py``). ``--knn_baselines`` also scores the untrained network and raw pixels once, before
training, for comparison. A data set without labelled splits skips the k-NN with a note.

Example:
    >>> knn = OnlineKNN(args, device, run_log)
    >>> knn.baselines(teacher_backbone)      # {"random_init": {k: [top1, top5]}, "raw_pixels": {...}}
    >>> knn.evaluate(teacher_backbone)       # {"10": [top1, top5], "20": [...]}
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from simpool.data import DataError, build_labelled_splits
from simpool.evaluation.features import eval_transform, evenly_spaced_subset, extract_features
from simpool.evaluation.knn import knn_on_features
from simpool.run.flags import data_source_options
from simpool.run.log import RunLogger

__all__ = ["OnlineKNN"]


class OnlineKNN:
    """Weighted k-NN of a run's teacher on its data set's labelled splits (listed once per run)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, run_log: RunLogger) -> None:
        self.args, self.device, self.log = args, device, run_log
        self._splits: tuple | None = None
        self._listed = False

    def due(self, epoch: int) -> bool:
        every = self.args.eval_every
        return epoch == self.args.epochs - 1 or (every > 0 and epoch % every == 0)

    def splits(self):
        """The labelled (train, val) k-NN splits, or None; listed once per run (listing ImageNet takes minutes)."""
        if not self._listed:
            self._listed = True
            try:
                train, val = build_labelled_splits(self.args.data_path,
                                                   transform=eval_transform(self.args.global_crops_size),
                                                   options=data_source_options(self.args, self.args.output_dir))
                limit = self.args.knn_max_images
                self._splits = evenly_spaced_subset(train, limit), evenly_spaced_subset(val, limit)
            except DataError as err:
                self.log.print(f"online k-NN skipped: {err}")
        return self._splits

    def table(self, embed: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, list[float]]:
        """{k: [top1, top5]} (JSON-ready) of weighted k-NN on the features ``embed`` gives."""
        train, val = self.splits()
        batch = max(self.args.batch_size_per_gpu, 64)
        train_features = extract_features(embed, train, batch, self.args.num_workers, self.device)
        val_features = extract_features(embed, val, batch, self.args.num_workers, self.device)
        results = knn_on_features(train_features, val_features, self.args.nb_knn, self.args.temperature)
        return {str(k): [round(top1, 2), round(top5, 2)] for k, (top1, top5) in results.items()}

    def evaluate(self, backbone: torch.nn.Module) -> dict[str, Any]:
        """The teacher backbone's table, printed; {} without labelled splits."""
        if self.splits() is None:
            return {}
        table = self.table(backbone)
        self.log.print("k-NN (teacher): " + "  ".join(f"{k}-NN top1 {v[0]:.2f}" for k, v in table.items()))
        return table

    def baselines(self, backbone: torch.nn.Module) -> dict[str, Any]:
        """The untrained ``backbone``'s and raw pixels' tables, logged as epoch -1 and printed."""
        if self.splits() is None:
            return {}
        out = {"random_init": self.table(backbone), "raw_pixels": self.table(lambda images: images.flatten(1))}
        self.log.log_epoch({"knn_baselines": out, "epoch": -1})
        self.log.print("k-NN before training: " + "  ".join(
            f"{k}-NN random init {out['random_init'][k][0]:.2f} / raw pixels {out['raw_pixels'][k][0]:.2f}"
            for k in out["random_init"]))
        return out
