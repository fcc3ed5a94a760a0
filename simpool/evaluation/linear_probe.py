"""The linear-probe run behind ``eval_linear.py``: features of a frozen backbone, its data, checkpoint and log.

:class:`ProbeState` is what one run trains and saves: the heads (:class:`~simpool.evaluation.linear.
MultiLRLinear`), ``torch.optim.SGD`` with one param group per learning rate and its ``CosineAnnealingLR``
(their state dicts go into the checkpoint, as dinov2's ``eval/linear.py`` does), the generator of the
cached-feature order and the global RNG of the image augmentations, so that a resumed run continues exactly
where it stopped. :func:`train_probe` runs :func:`~simpool.evaluation.linear.fit` over either feature source
and writes, per epoch, one JSON line to ``log.txt`` and ``checkpoint.pth.tar`` (a
:class:`~simpool.run.state.RunCheckpoint` in the ``LINEAR_PROBE_CHECKPOINT`` format).

Example (the state a checkpoint holds)::

    >>> state = ProbeState.new(32, 4, scaled_lrs([0.001, 0.01], 256), epochs=10, seed=0, device=torch.device("cpu"))
    >>> [group["lr"] for group in state.optimizer.param_groups], sorted(state.state_dict())
    ([0.001, 0.01], ['best_top1', 'epoch', 'generator', 'heads', 'last', 'optimizer', 'rng', 'scheduler'])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

from simpool.data import collate_skip_bad
from simpool.distributed import DistInfo, is_main_process
from simpool.evaluation.features import IMAGENET_MEAN, IMAGENET_STD, extract_features, feature_fn
from simpool.evaluation.linear import Batches, Embedded, MultiLRLinear, feature_batches, fit, probe_optimizer
from simpool.run.config import ConfigError
from simpool.run.log import append_json_line
from simpool.run.schedules import scaled_lr
from simpool.run.state import CheckpointFormat, RunCheckpoint
from simpool.run.stop import StopControl, StopReason

CHECKPOINT_FILE = "checkpoint.pth.tar"
LOG_FILE = "log.txt"
# 2: torch.optim / scheduler state (1 held hand-made momentum)
LINEAR_PROBE_CHECKPOINT = CheckpointFormat("format", "simpool-linear-probe-2", "a linear-probe checkpoint")

log = logging.getLogger(__name__)


def train_transform(image_size: int) -> transforms.Compose:
    """The reference's training augmentation: RandomResizedCrop + horizontal flip (crop side scaled)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def probe_features(model: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool) -> tuple[Callable, int]:
    """(images -> features, their dim): DINO's multi-block [CLS] features for official ViTs, else output."""
    official_vit = getattr(model, "mode", None) == "official" and hasattr(model, "last_block_outputs")
    blocks = n_last_blocks if official_vit else 1  # SimPool and convnet models use their pooled feature
    if official_vit and blocks > len(model.blocks):
        raise ConfigError(f"--n_last_blocks {blocks} exceeds the model's {len(model.blocks)} blocks")
    features = feature_fn(model, blocks, avgpool_patchtokens)  # raises for avgpool on non-official models
    return features, model.embed_dim * (blocks + int(avgpool_patchtokens))


def resolve_num_labels(requested: int | None, num_classes: int) -> int:
    if requested is None:
        return num_classes
    if requested < num_classes:
        raise ConfigError(
            f"--num_labels {requested} is below the {num_classes} classes of the data: raise it "
            "or leave it out (it defaults to the number of classes)"
        )
    return requested


def scaled_lrs(lrs: Sequence[float], global_batch: int) -> list[float]:
    """The reference's linear scaling rule for every head: ``lr * global_batch / 256``."""
    return [scaled_lr(lr, global_batch) for lr in lrs]


# ----------------------------------------------------------------------------------------------------------
# the two feature sources, as (train batches, val batches) for fit()
# ----------------------------------------------------------------------------------------------------------
def _rank_shard(dataset: Dataset, dist_info: DistInfo) -> Subset:
    return Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))


def image_batches(
    dataset: Dataset, features: Callable, batch_size: int, num_workers: int, dist_info: DistInfo,
    seed: int | None = None,
) -> Embedded:
    """Features of ``dataset``'s images: shuffled by a ``DistributedSampler(seed)`` (``seed`` given, training),
    else this rank's every world_size-th image in order (evaluation)."""
    sampler = None
    if seed is not None:
        sampler = DistributedSampler(dataset, dist_info.world_size, dist_info.rank, shuffle=True, seed=seed)
    loader = DataLoader(
        dataset if sampler else _rank_shard(dataset, dist_info),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=dist_info.device.type == "cuda",
        collate_fn=collate_skip_bad,
    )
    return Embedded(loader, features, dist_info.device)


def cached_batches(
    train: Dataset, val: Dataset, features: Callable, batch_size: int, num_workers: int, dist_info: DistInfo,
    generator: torch.Generator,
) -> tuple[Batches, Batches]:
    """Embed train/ and val/ once (raw features, as the image protocol feeds the probe); every rank trains
    on all train features in global batches of ``batch_size * world_size`` drawn by ``generator``."""
    embedded = [
        extract_features(features, dataset, batch_size, num_workers, dist_info.device, normalize=False)
        for dataset in (train, val)
    ]
    (train_x, train_y), (val_x, val_y) = [(x.to(dist_info.device), y.to(dist_info.device)) for x, y in embedded]
    rank, world = dist_info.rank, dist_info.world_size
    return (feature_batches(train_x, train_y, batch_size * world, generator),
            feature_batches(val_x[rank::world], val_y[rank::world], batch_size * world))


# ----------------------------------------------------------------------------------------------------------
# state and checkpoint
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ProbeState:
    """The heads, their optimiser and schedule, the data-order RNGs, and the results so far."""

    heads: MultiLRLinear
    optimizer: torch.optim.SGD
    scheduler: CosineAnnealingLR
    generator: torch.Generator  # head initialisation, then each epoch's order of the cached features
    epoch: int = 0
    best_top1: list[float] = field(default_factory=list)
    last: list[dict[str, float]] | None = None

    @classmethod
    def new(cls, dim: int, num_labels: int, lrs: Sequence[float], epochs: int, seed: int,
            device: torch.device) -> ProbeState:
        generator = torch.Generator().manual_seed(seed)
        heads = MultiLRLinear(dim, num_labels, len(lrs), generator=generator).to(device)
        optimizer, scheduler = probe_optimizer(heads, lrs, epochs)
        return cls(heads, optimizer, scheduler, generator, best_top1=[0.0] * len(lrs))

    def state_dict(self) -> dict[str, Any]:
        return {
            "heads": self.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": torch.get_rng_state(),  # the augmentations' (rank 0's: every rank resumes from it)
            "epoch": self.epoch,
            "best_top1": self.best_top1,
            "last": self.last,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.heads.load_state_dict(saved["heads"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"])
        self.epoch, self.best_top1, self.last = int(saved["epoch"]), list(saved["best_top1"]), saved["last"]


# ----------------------------------------------------------------------------------------------------------
# training and reporting
# ----------------------------------------------------------------------------------------------------------
def train_probe(
    state: ProbeState,
    trained: nn.Module,
    batches: tuple[Batches, Batches],
    epochs: int,
    val_freq: int,
    lrs: Sequence[float],
    num_val: int,
    checkpoint: RunCheckpoint,
    checkpoint_meta: dict[str, Any],
    log_extra: dict[str, Any] | None = None,
    control: StopControl | None = None,
) -> StopReason | None:
    """Epochs ``state.epoch .. epochs-1`` of :func:`fit` (``trained``: the heads or their DDP wrapper);
    after each, the checkpoint and one line of ``log.txt`` beside it (the reference's keys). ``lrs`` label the
    heads in the log, ``num_val`` (the val images) the printed results.

    With ``control``, the ranks agree before every step whether a signal asked them to stop: the epoch in
    progress is then abandoned (the checkpoint keeps the last finished one, which a relaunch continues from
    exactly) and the reason is returned; None when every epoch was trained."""
    train, val = batches
    stop = control.asked_to_stop if control is not None else None
    for epoch, losses, epoch_lrs, results in fit(trained, state.optimizer, state.scheduler, train, val,
                                                  epochs, state.epoch, val_freq, stop):
        stats: dict[str, Any] = {"epoch": epoch, "train_loss": losses.tolist(), "train_lr": epoch_lrs,
                                 **(log_extra or {})}
        if results is not None:
            state.best_top1 = [max(b, r["top1"]) for b, r in zip(state.best_top1, results, strict=True)]
            state.last = results
            stats.update(result_fields(lrs, results))
            log_results(f"epoch {epoch}", lrs, results, num_val)
        state.epoch = epoch + 1
        checkpoint.write({**checkpoint_meta, **state.state_dict()})
        if is_main_process():
            append_json_line(checkpoint.folder / LOG_FILE, stats)
    return control.stopped if control is not None else None


def stopped_line(reason: StopReason, control: StopControl, epoch: int, path: Any) -> str:
    """The last line of a probe stopped by a signal: which epoch was abandoned, which checkpoint stays."""
    kept = f"{path} (after epoch {epoch - 1})" if epoch else "no checkpoint yet (no epoch was finished)"
    who = control.signals.signal_name or "a signal to another rank"
    return (f"{reason.value} ({who}) during epoch {epoch}: that epoch is dropped, {kept} is kept; relaunch the "
            "same command to continue from it")


def result_fields(lrs: Sequence[float], results: list[dict[str, float]]) -> dict[str, Any]:
    """Log fields: the reference's test_acc1/test_acc5/test_loss (of the best head), and every head's."""
    best = max(range(len(lrs)), key=lambda h: (results[h]["top1"], -results[h]["loss"]))
    stats = {
        "test_acc1": results[best]["top1"],
        "test_acc5": results[best]["top5"],
        "test_loss": results[best]["loss"],
    }
    if len(lrs) > 1:
        stats["best_lr"] = lrs[best]
        stats["per_lr"] = {str(lr): r for lr, r in zip(lrs, results, strict=True)}
    return stats


def log_results(when: str, lrs: Sequence[float], results: list[dict[str, float]], num_images: int) -> None:
    for lr, r in zip(lrs, results, strict=True):
        log.info("%s: lr %g: top-1 %.2f%%  top-5 %.2f%%  loss %.4f on %d val images",
                 when, lr, r["top1"], r["top5"], r["loss"], num_images)


def log_summary(lrs: Sequence[float], best_top1: list[float]) -> None:
    best = max(range(len(lrs)), key=lambda h: best_top1[h])
    log.info("linear probe done: best top-1 %.2f%% (lr %g)", best_top1[best], lrs[best])
