"""Data of a fine-tuning run: timm's transforms, the labelled splits, loaders, and timm's Mixup.

* training: ``timm.data.create_transform(is_training=True)``: RandomResizedCrop(``--scale``), flip, RandAugment
  (``--aa``), normalisation, random erasing (``--reprob``);
* evaluation: timm's resize to ``input_size / crop_pct`` and centre crop;
* ``timm.data.Mixup``: mixup / cutmix on the batch with label smoothing folded into the soft targets.

Checks that stop the run (exit 2) before any model is built: ``val/`` classes unlike ``train/`` (from
:func:`simpool.data.build_labelled_splits`), fewer training images than one global batch, mixup with one class.

Example:
    >>> train, val, classes = labelled_splits(args)
    >>> loader, sampler = train_loader(train, args, dist_info)
    >>> mixup = build_mixup(args, len(classes))
"""

from __future__ import annotations

import argparse

import torch
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, Subset

from simpool.data import ResumableDistributedSampler, build_labelled_splits, collate_skip_bad, seed_worker
from simpool.distributed import DistInfo
from simpool.finetune.config import mixup_active
from simpool.run.config import ConfigError
from simpool.run.flags import data_source_options

__all__ = ["build_mixup", "labelled_splits", "train_loader", "val_loader"]


def _transforms(args: argparse.Namespace):
    common = {"input_size": args.input_size, "mean": tuple(args.mean), "std": tuple(args.std),
              "interpolation": args.interpolation}
    train = create_transform(is_training=True, scale=tuple(args.scale), hflip=args.hflip,
                             color_jitter=args.color_jitter,
                             auto_augment=None if str(args.aa).lower() == "none" else args.aa,
                             re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, **common)
    val = create_transform(is_training=False, crop_pct=args.crop_pct, **common)
    return train, val


def class_names(dataset: Dataset) -> list[str]:
    classes = getattr(dataset, "classes", None)
    if classes:
        return list(classes)
    return [str(i) for i in sorted(set(getattr(dataset, "targets", [])))]


def labelled_splits(args: argparse.Namespace, world_size: int = 1) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names) with timm's transforms; a ``ValueError`` names what to change."""
    train_tf, val_tf = _transforms(args)
    train, val = build_labelled_splits(args.data_path, transform=train_tf, val_transform=val_tf,
                                       subset=args.subset if args.subset > 0 else None,
                                       val_subset=args.val_subset if args.val_subset > 0 else None,
                                       options=data_source_options(args, listing_dir=args.output_dir))
    classes = class_names(train)
    global_batch = args.batch_size_per_gpu * world_size
    if len(train) < global_batch:
        raise ConfigError(f"{args.data_path} has {len(train)} training images, fewer than one global batch "
                                 f"({args.batch_size_per_gpu} x {world_size}): lower --batch_size_per_gpu")
    if len(classes) < 2 and mixup_active(args):
        raise ConfigError(f"{args.data_path} has {len(classes)} class: mixup / cutmix blend labels of "
                                 "two classes; pass --mixup 0 --cutmix 0 (or add classes)")
    return train, val, classes


def train_loader(dataset: Dataset, args: argparse.Namespace, dist_info: DistInfo
                 ) -> tuple[DataLoader, ResumableDistributedSampler]:
    """Shuffled, sharded, resumable (``sampler.set_epoch(epoch, start_batch)``); full batches only (Mixup)."""
    sampler = ResumableDistributedSampler(dataset, batch_size=args.batch_size_per_gpu,
                                          num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=dist_info.device.type == "cuda", drop_last=True, collate_fn=collate_skip_bad,
                        worker_init_fn=seed_worker, generator=torch.Generator())
    return loader, sampler


def val_loader(dataset: Dataset, args: argparse.Namespace, dist_info: DistInfo) -> DataLoader:
    """This rank's share of ``val/`` (every image exactly once over all ranks: counts are summed)."""
    shard = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(shard, batch_size=args.batch_size_per_gpu, shuffle=False, num_workers=args.num_workers,
                      pin_memory=dist_info.device.type == "cuda", collate_fn=collate_skip_bad)


def build_mixup(args: argparse.Namespace, num_classes: int) -> Mixup | None:
    """timm's Mixup (label smoothing inside its soft targets), or None when mixup and cutmix are off."""
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                 switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                 num_classes=num_classes)
