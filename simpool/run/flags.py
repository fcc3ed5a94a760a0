"""Argument types and flag groups shared by every command-line tool (train_dino.py, finetune.py, the evaluators).

The types accept the reference's spellings, so its commands and its ``args.yaml`` files parse as they are.
``add_backbone_flags`` / ``backbone_flags`` are the model flags of every tool that loads weights: they turn
into the keywords of :func:`simpool.loading.load_model`; ``add_model_flags`` adds the weights themselves
(``--pretrained_weights``, ``--checkpoint_key``, ``--random_init``) and ``require_weights`` refuses to evaluate
random weights by accident; ``add_distributed_flags`` takes what the launchers pass.

Example:
    >>> parser.add_argument("--use_bn_in_head", type=bool_flag, default=True)      # True/False, 1/0, yes/no
    >>> parser.add_argument("--gamma", type=float_or_none, default=AUTO_GAMMA)     # 1.25, None or auto
    >>> parser.add_argument("--model_overrides", type=key_value, nargs="*")        # depth=4 embed_dim=96
    >>> add_backbone_flags(parser)                  # --arch --mode --gamma --patch_size --model_overrides
    >>> model, source = load_model(args.pretrained_weights, **backbone_flags(parser.parse_args()))
    >>> add_model_flags(parser); require_weights(parser.parse_args(["--random_init"]))
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import yaml

from simpool.data.build import SourceOptions
from simpool.loading import FROM_CHECKPOINT, model_builder
from simpool.models.base import AUTO_GAMMA, MODES
from simpool.run.config import ConfigError
from simpool.run.model_check import checked_build, parameter_count

__all__ = [
    "AUTO_GAMMA", "add_backbone_flags", "add_data_source_flags", "add_distributed_flags", "add_model_flags",
    "backbone_flags", "backbone_parameters", "bool_flag", "check_gamma", "data_source_options", "float_or_none",
    "key_value", "require_weights",
]


def bool_flag(value: str | bool) -> bool:
    """The reference's boolean parser: ``True/False``, ``1/0``, ``yes/no``, ``on/off`` (any case)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in {"true", "1", "yes", "on"}:
        return True
    if lowered in {"false", "0", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def float_or_none(value: str | float | None) -> float | str | None:
    """``None``/``null`` -> None (SimPool without gamma); ``auto`` -> ``AUTO_GAMMA`` (the arch's default); else
    a float."""
    if value is None or str(value).lower() in {"none", "null"}:
        return None
    if str(value).lower() == AUTO_GAMMA:
        return AUTO_GAMMA
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, None or {AUTO_GAMMA}, got {value!r}") from None


def key_value(value: str | dict) -> dict[str, Any]:
    """``depth=4`` -> {"depth": 4}; values are parsed as YAML scalars/lists (``layers=[1,1,1,1]``)."""
    if isinstance(value, dict):
        return value
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected key=value, got {value!r}")
    key, raw = value.split("=", 1)
    return {key: yaml.safe_load(raw)}


def add_backbone_flags(parser: argparse.ArgumentParser, prefix: str = "", what: str = "the checkpoint") -> None:
    """--{prefix}arch/mode/gamma/patch_size/model_overrides; unset flags come from the checkpoint's args."""
    group = parser.add_argument_group(f"model of {what} (default: as recorded in its training args)")
    group.add_argument(f"--{prefix}arch", default=None, help="e.g. vit_small, resnet50, convnext_small")
    group.add_argument(f"--{prefix}mode", default=None, choices=MODES, help="simpool or official")
    group.add_argument(f"--{prefix}gamma", default=FROM_CHECKPOINT, type=float_or_none,
                       help="SimPool exponent: a number, 'None' (no gamma) or 'auto' (the arch's default)")
    group.add_argument(f"--{prefix}patch_size", default=None, type=int, help="ViT patch size")
    group.add_argument(f"--{prefix}model_overrides", default=[], type=key_value, nargs="*",
                       help="timm keywords, e.g. depth=2 embed_dim=192 num_heads=3")


def backbone_flags(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The model keywords of ``load_model`` / ``export_backbone`` from flags parsed by ``add_backbone_flags``."""
    overrides = {k: v for item in getattr(args, f"{prefix}model_overrides") for k, v in item.items()}
    return {
        "arch": getattr(args, f"{prefix}arch"),
        "mode": getattr(args, f"{prefix}mode"),
        "gamma": getattr(args, f"{prefix}gamma"),
        "patch_size": getattr(args, f"{prefix}patch_size"),
        **overrides,
    }


def check_gamma(args: argparse.Namespace, prefix: str = "") -> None:
    """``--gamma``: a finite number > 0, ``None``, ``auto`` or not given (a NaN exponent makes NaN features)."""
    gamma = getattr(args, f"{prefix}gamma")
    if isinstance(gamma, float) and not (math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"--{prefix}gamma must be a finite number > 0, 'None' or 'auto', got {gamma}")


def backbone_parameters(args: argparse.Namespace, prefix: str = "") -> int:
    """Parameters of the backbone the weights flags (:func:`add_model_flags`) describe, built on the meta device
    before any weight is read (only an export folder's ``config.json`` or a checkpoint's recorded args are): the
    model flags' values are checked (``--model_overrides depth=-1`` is one ConfigError) and the count sizes what
    the run writes (:class:`simpool.run.output.OutputFolder`)."""
    check_gamma(args, prefix)
    flags = backbone_flags(args, prefix)
    build = model_builder(getattr(args, "pretrained_weights", None) or None, getattr(args, "checkpoint_key", "teacher"),
                          random_init=bool(getattr(args, "random_init", False)), **flags)
    given = " ".join(f"{k}={v}" for item in getattr(args, f"{prefix}model_overrides") for k, v in item.items())
    what = f"the model of {getattr(args, 'pretrained_weights', None) or 'random initialisation'}"
    return parameter_count(checked_build(build, what + (f" with --{prefix}model_overrides {given}" if given else "")))


def add_data_source_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """How ``--data_path`` is read beyond the path (:class:`simpool.data.build.SourceOptions`): every tool taking
    ``--data_path`` adds them."""
    group.add_argument("--rescan", action="store_true",
                       help="list the ImageFolder anew, even if the run's file list (file_list-*.json beside the run) "
                       "matches its folders' times")
    group.add_argument("--image_column", default=None, type=str,
                       help="Hugging Face dataset: the image column (default: its one Image column)")
    group.add_argument("--label_column", default=None, type=str,
                       help="Hugging Face dataset: the label column (default: its ClassLabel column, else 'label')")


def data_source_options(args: argparse.Namespace, listing_dir: str | None = None, log=None) -> SourceOptions:
    """``SourceOptions`` from the flags of :func:`add_data_source_flags` (absent flags: defaults); ``listing_dir``:
    where an ImageFolder's file list is kept (the run's output folder; None: each process walks the folder)."""
    return SourceOptions(listing_dir=listing_dir, rescan=bool(getattr(args, "rescan", False)),
                         image_column=getattr(args, "image_column", None),
                         label_column=getattr(args, "label_column", None), log=log)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--pretrained_weights, --checkpoint_key, --random_init, and --arch/--mode/--gamma/--patch_size/...

    Model flags left out are read from the checkpoint's recorded training args (flags given win).
    """
    group = parser.add_argument_group("weights")
    group.add_argument("--pretrained_weights", default="", type=str,
                       help="training checkpoint (ours or DINO's / the SimPool fork's), backbone-only file, or a "
                       "folder written by utils/export_backbone.py")
    group.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                       help="which network of a training checkpoint to use")
    group.add_argument("--random_init", action="store_true",
                       help="use randomly initialised weights on purpose (a baseline); without it, a missing "
                       "--pretrained_weights is an error")
    add_backbone_flags(parser, what="the weights")


def require_weights(args: argparse.Namespace) -> None:
    """The reference silently evaluated random weights when ``--pretrained_weights`` was missing."""
    if args.random_init and args.pretrained_weights:
        raise ConfigError("--random_init and --pretrained_weights exclude each other: drop one")
    if not args.random_init and not args.pretrained_weights:
        raise ConfigError(
            "no --pretrained_weights given: pass a checkpoint or export folder, or --random_init to use "
            "randomly initialised weights on purpose"
        )


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """What torchrun / SLURM launchers pass (the process group itself is read from the environment)."""
    group = parser.add_argument_group("distributed")
    group.add_argument("--dist_url", default="env://", type=str, help="process-group init method (torchrun: env://)")
    group.add_argument("--local_rank", "--local-rank", default=0, type=int, help="set by the launcher; ignore")
