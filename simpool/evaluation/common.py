"""Command-line plumbing shared by the evaluators (``eval_knn.py``, ``eval_linear.py``, the attention scores).

One place for what they do before the first image is embedded:

* flags: the model (``--pretrained_weights``, ``--checkpoint_key``, ``--random_init`` and the backbone
  flags of :func:`simpool.flags.add_backbone_flags`), the data (``--data_path``, ``--image_size``, batch
  size, workers) and the launcher (``--dist_url``, ``--local_rank``);
* :func:`setup_distributed`: join the process group torchrun/SLURM describes and pick the device;
* :func:`labelled_splits`: ``train/`` and ``val/`` with the same label space, checked before any model exists;
* :func:`build_model`: :func:`simpool.loading.load_model` on the flags, frozen on the device.

Bad input found while setting up is a ``ValueError`` (``EvalSetupError``, ``DataError``, ``CheckpointError``):
each driver's ``main`` prints it as ``error: ...`` on stderr and returns exit code 2, as ``train_dino.py`` does.

Example (the skeleton of every evaluator)::

    >>> args = parse_flags(parser, argv)
    >>> require_weights(args)
    >>> dist_info = setup_distributed(args)
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

from simpool.data import build_labelled_splits
from simpool.distributed import DistInfo, init_distributed, is_main_process
from simpool.evaluation.features import num_classes_of
from simpool.flags import DATA_SOURCE_FLAGS, add_backbone_flags, backbone_flags, data_source_options
from simpool.loading import ModelSource, load_model
from simpool.logs import setup_logging
from simpool.models import PooledBackbone


class EvalSetupError(ValueError):
    """A flag combination the evaluators cannot run; the message says which flag to change."""


# ----------------------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------------------
def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--pretrained_weights, --checkpoint_key, --random_init, and --arch/--mode/--gamma/--patch_size/...

    Model flags left out are read from the checkpoint's recorded training args (flags given win).
    """
    group = parser.add_argument_group("weights")
    group.add_argument(
        "--pretrained_weights",
        default="",
        type=str,
        help="training checkpoint (ours or DINO's / the SimPool fork's), backbone-only "
        "file, or a folder written by utils/export_backbone.py",
    )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        choices=["teacher", "student"],
        help="which network of a training checkpoint to evaluate",
    )
    group.add_argument(
        "--random_init",
        action="store_true",
        help="evaluate randomly initialised weights on purpose (a baseline); without it, a "
        "missing --pretrained_weights is an error",
    )
    add_backbone_flags(parser, what="the weights")


def add_data_flags(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="root holding train/ and val/ class folders (ImageFolder), fashion-mnist, a shard index.json "
        "(simpool-pack) or a Hugging Face dataset (parquet / save_to_disk)",
    )
    for names, kwargs in DATA_SOURCE_FLAGS:  # --rescan, --image_column, --label_column
        group.add_argument(*names, **kwargs)
    group.add_argument(
        "--image_size",
        default=224,
        type=int,
        help="evaluation crop side; the resize before it is 256/224 of it (DINO: 256 -> 224)",
    )
    group.add_argument("--batch_size_per_gpu", default=batch_size, type=int, help="images per process")
    group.add_argument("--num_workers", default=10, type=int, help="data loading workers per process")


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument(
        "--dist_url", default="env://", type=str, help="process-group init method (torchrun: env://)"
    )
    group.add_argument(
        "--local_rank", "--local-rank", default=0, type=int, help="set by the launcher; ignore"
    )


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` plus the checks every evaluator needs before it touches data or weights."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("image_size", "batch_size_per_gpu"):
        if getattr(args, name) <= 0:
            raise EvalSetupError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise EvalSetupError(f"--num_workers must be >= 0, got {args.num_workers}")
    return args


def require_weights(args: argparse.Namespace) -> None:
    """The reference silently evaluated random weights when ``--pretrained_weights`` was missing."""
    if args.random_init and args.pretrained_weights:
        raise EvalSetupError("--random_init and --pretrained_weights exclude each other: drop one")
    if not args.random_init and not args.pretrained_weights:
        raise EvalSetupError(
            "no --pretrained_weights given: pass a checkpoint or export folder, or --random_init to evaluate "
            "randomly initialised weights on purpose"
        )


def require_data_path(args: argparse.Namespace) -> None:
    if not args.data_path:
        raise EvalSetupError(
            "--data_path is required: a root holding train/ and val/ class folders, or fashion-mnist"
        )


# ----------------------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------------------
def setup_distributed(args: argparse.Namespace) -> DistInfo:
    """Join the launcher's process group (or run alone), pick this process's device, route logging by rank."""
    dist_info = init_distributed(args.dist_url)
    setup_logging(dist_info.rank)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest kernels once
    return dist_info


def labelled_splits(
    args: argparse.Namespace,
    transform: Callable,
    val_transform: Callable | None = None,
    subset: int | None = None,
) -> tuple[Dataset, Dataset, int]:
    """(train, val, number of classes) from ``--data_path``; a ``DataError`` names the folders at fault."""
    require_data_path(args)
    train, val = build_labelled_splits(
        args.data_path, transform=transform, val_transform=val_transform, subset=subset,
        options=data_source_options(args, listing_dir=getattr(args, "output_dir", None)),
    )
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


def results_folder(weights: str | os.PathLike) -> Path:
    """Where result files go beside the weights: the export folder itself, or the checkpoint's folder."""
    path = Path(weights)
    return path if path.is_dir() else path.parent


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Main process only; written to a temporary name first so readers never see half a file."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
