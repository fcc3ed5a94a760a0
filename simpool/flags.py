"""Argument types and flag groups shared by every command-line tool (train_dino.py, the evaluators, utils/).

The types accept the reference's spellings, so its commands and its ``args.yaml`` files parse as they are.
``add_backbone_flags`` / ``backbone_flags`` are the model flags of every tool that loads weights: they turn
into the keywords of :func:`simpool.loading.load_model`.

Example:
    >>> parser.add_argument("--use_bn_in_head", type=bool_flag, default=True)      # True/False, 1/0, yes/no
    >>> parser.add_argument("--gamma", type=float_or_none, default=AUTO_GAMMA)     # 1.25, None or auto
    >>> parser.add_argument("--model_overrides", type=key_value, nargs="*")        # depth=4 embed_dim=96
    >>> add_backbone_flags(parser)                  # --arch --mode --gamma --patch_size --model_overrides
    >>> model, source = load_model(args.pretrained_weights, **backbone_flags(parser.parse_args()))
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from simpool.data.build import SourceOptions
from simpool.loading import FROM_CHECKPOINT
from simpool.models.base import AUTO_GAMMA, MODES

__all__ = [
    "AUTO_GAMMA", "DATA_SOURCE_FLAGS", "add_backbone_flags", "backbone_flags", "bad_input", "bool_flag",
    "data_source_options", "float_or_none", "key_value",
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


# How --data_path is read, beyond the path (simpool.data.build.SourceOptions); every tool taking --data_path adds
# them: `for names, kwargs in DATA_SOURCE_FLAGS: group.add_argument(*names, **kwargs)`.
DATA_SOURCE_FLAGS = [
    (("--rescan",), {"action": "store_true", "help": "list the ImageFolder anew, even if the run's file list "
                     "(file_list-*.json beside the run) matches its folders' times"}),
    (("--image_column",), {"default": None, "type": str, "help": "Hugging Face dataset: the image column "
                           "(default: its one Image column)"}),
    (("--label_column",), {"default": None, "type": str, "help": "Hugging Face dataset: the label column "
                           "(default: its ClassLabel column, else 'label')"}),
]


def data_source_options(args: argparse.Namespace, listing_dir: str | None = None, log=None) -> SourceOptions:
    """``SourceOptions`` from the DATA_SOURCE_FLAGS (absent flags: defaults); ``listing_dir``: where an
    ImageFolder's file list is kept (the run's output folder; None: each process walks the folder)."""
    return SourceOptions(listing_dir=listing_dir, rescan=bool(getattr(args, "rescan", False)),
                         image_column=getattr(args, "image_column", None),
                         label_column=getattr(args, "label_column", None), log=log)


def bad_input(err: Exception, code: int = 2) -> int:
    """Report a user's mistake as one line, ``error: ...`` on stderr, and return the exit code (2 by default).

    Every entry point catches the ValueErrors its set-up raises (bad flags, data or weights) and returns this,
    instead of a traceback.
    """
    print(f"error: {err}", file=sys.stderr)
    return code
