"""Command-line plumbing shared by the evaluators (k-NN, linear probe, segmentation probe, attention scores...).

What the evaluators do before the first image is embedded, besides the run layer's flags and process set-up
(:mod:`simpool.run.flags`: ``add_model_flags``, ``require_weights``, ``add_distributed_flags``;
:mod:`simpool.run.process`: ``start_process``):

* :func:`add_data_flags` / :func:`parse_flags`: ``--data_path``, ``--image_size``, batch size, workers, checked;
* :func:`labelled_splits`: ``train/`` and ``val/`` with the same label space, checked before any model exists;
* :func:`build_model`: :func:`simpool.loading.load_model` on the flags, frozen on the device;
* :func:`results_folder` / :func:`write_json`: where result files go, written whole.

Bad input found while setting up is a ``ValueError`` (``ConfigError``, ``DataError``, ``CheckpointError``): each
driver's ``main`` prints it as ``error: ...`` on stderr and returns exit code 2, as ``train_dino.py`` does.

Example (the skeleton of every evaluator)::

    >>> args = parse_flags(parser, argv)
    >>> require_weights(args)
    >>> dist_info = start_process(args.dist_url)
    >>> train, val, num_classes = labelled_splits(args, eval_transform(args.image_size))
    >>> model, source = build_model(args, dist_info.device)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from simpool.checkpoint import atomic_write_text
from simpool.data import build_labelled_splits
from simpool.distributed import is_main_process
from simpool.evaluation.features import num_classes_of
from simpool.loading import ModelSource, load_model
from simpool.models import PooledBackbone
from simpool.run.config import AT_LEAST_ONE, IMAGE_SIDE, WORKERS, ConfigError, check_ranges
from simpool.run.flags import add_data_source_flags, backbone_flags, backbone_parameters, data_source_options
from simpool.run.output import OutputFolder

__all__ = ["add_data_flags", "build_model", "checked_frozen_model", "labelled_splits", "parse_flags",
           "require_data_path", "results_folder", "write_json"]


def add_data_flags(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None, type=str,
                       help="root holding train/ and val/ class folders (ImageFolder), fashion-mnist, a shard "
                       "index.json (simpool-pack) or a Hugging Face dataset (parquet / save_to_disk)")
    add_data_source_flags(group)  # --rescan, --image_column, --label_column
    group.add_argument("--image_size", default=224, type=int,
                       help="evaluation crop side; the resize before it is 256/224 of it (DINO: 256 -> 224)")
    group.add_argument("--batch_size_per_gpu", default=batch_size, type=int, help="images per process")
    group.add_argument("--num_workers", default=10, type=int, help="data loading workers per process")


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` plus the checks every evaluator needs before it touches data or weights."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_ranges(args, {"image_size": IMAGE_SIDE, "batch_size_per_gpu": AT_LEAST_ONE, "num_workers": WORKERS})
    return args


def require_data_path(args: argparse.Namespace) -> None:
    if not args.data_path:
        raise ConfigError("--data_path is required: a root holding train/ and val/ class folders, or fashion-mnist")


def labelled_splits(
    args: argparse.Namespace,
    transform: Callable,
    val_transform: Callable | None = None,
    subset: int | None = None,
) -> tuple[Dataset, Dataset, int]:
    """(train, val, number of classes) from ``--data_path``; a ``DataError`` names the folders at fault."""
    require_data_path(args)
    train, val = build_labelled_splits(args.data_path, transform=transform, val_transform=val_transform,
                                       subset=subset,
                                       options=data_source_options(args, getattr(args, "output_dir", None)))
    return train, val, num_classes_of(train)


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[PooledBackbone, ModelSource]:
    """The frozen backbone to evaluate, in eval mode on ``device``, and where its weights came from.

    ``load_model`` on ``--pretrained_weights`` / ``--checkpoint_key`` / ``--random_init`` and the backbone flags:
    flags given win over a checkpoint's recorded args, an export folder refuses them, ``--random_init`` builds
    ``vit_small`` in ``simpool`` mode unless they say otherwise.
    """
    model, source = load_model(args.pretrained_weights or None, args.checkpoint_key, random_init=args.random_init,
                               seed=getattr(args, "seed", 0), **backbone_flags(args))
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, source


def checked_frozen_model(args: argparse.Namespace, device: torch.device, cache_dir: str | None = None
                         ) -> tuple[PooledBackbone, ModelSource, OutputFolder]:
    """What an evaluator with an output folder checks before its work, cheapest first: the folder (writable, room,
    locked if it exists: one run per folder; a shared feature ``cache_dir`` is checked but not locked), the model's
    values on the meta device before any weight is read, then the frozen model on ``device`` (:func:`build_model`).
    Call :meth:`OutputFolder.claim` on the returned folder before the first write."""
    output = OutputFolder(args.output_dir).check()
    if cache_dir:  # runs of other weights may share one cache: checked, not locked
        OutputFolder(cache_dir, flag="--cache_dir").check(lock=False)
    backbone_parameters(args)
    model, source = build_model(args, device)
    return model, source, output


def results_folder(weights: str | os.PathLike) -> Path:
    """Where result files go beside the weights: the export folder itself, or the checkpoint's folder."""
    path = Path(weights)
    return path if path.is_dir() else path.parent


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Main process only; written whole (a temporary file, then a rename) so readers never see half a file."""
    if is_main_process():
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
