"""Argument types shared by every command-line tool (train_dino.py, the evaluators, utils/).

They accept the reference's spellings, so its commands and its ``args.yaml`` files parse as they are.

Example:
    >>> parser.add_argument("--use_bn_in_head", type=bool_flag, default=True)      # True/False, 1/0, yes/no
    >>> parser.add_argument("--gamma", type=float_or_none, default=AUTO_GAMMA)     # 1.25, None or auto
    >>> parser.add_argument("--model_overrides", type=key_value, nargs="*")        # depth=4 embed_dim=96
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from simpool.models.base import AUTO_GAMMA

__all__ = ["AUTO_GAMMA", "bool_flag", "float_or_none", "key_value"]


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
