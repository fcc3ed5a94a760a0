"""The rows of a benchmark table: one per weights (anything :func:`simpool.loading.load_model` reads), plus the same
networks at random initialisation.

A :class:`Row` carries the words every driver's command line gets for it (``--pretrained_weights W
--checkpoint_key teacher`` and the model flags given, or ``--random_init --arch ... --mode ... --gamma ...
--patch_size ... --model_overrides ...``) and its *identity*: the weights file's path, size and modification time
(an export folder's ``config.json`` and weights), or the random network's flags. Nothing here builds a model: the
network of a random-init twin is read from the export's ``config.json`` or the checkpoint's recorded ``args``.

Example:
    >>> rows = build_rows(["runs/demo/checkpoint.pth"], random_init=True)
    >>> [(row.name, row.words[:2]) for row in rows]
    [('demo', ('--pretrained_weights', 'runs/demo/checkpoint.pth')),
     ('demo (random init)', ('--random_init', '--arch'))]
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simpool.checkpoint import CheckpointError, args_as_dict, safe_load
from simpool.loading import FROM_CHECKPOINT, is_export_dir, read_export_config
from simpool.run.config import ConfigError

__all__ = ["Row", "build_rows", "model_words", "network_of"]

CHECKPOINT_STEMS = re.compile(r"^(checkpoint(\d+|_best)?|teacher|model)$")


@dataclass(frozen=True)
class Row:
    name: str
    weights: str | None  # None: random initialisation
    words: tuple[str, ...]  # what every driver's command line gets for this row
    identity: dict[str, Any]  # what the row's results depend on

    @property
    def folder_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.name).strip("_") or "row"


def model_words(arch: str | None = None, mode: str | None = None, gamma: Any = FROM_CHECKPOINT,
                patch_size: int | None = None, overrides: dict[str, Any] | None = None) -> list[str]:
    """The model flags of :func:`simpool.run.flags.add_backbone_flags` as words (unset ones left out)."""
    words = [*(["--arch", arch] if arch else []), *(["--mode", mode] if mode else [])]
    if gamma is not FROM_CHECKPOINT:
        words += ["--gamma", str(gamma)]  # None -> "None" (no gamma), "auto", or the number
    words += ["--patch_size", str(patch_size)] if patch_size else []
    if overrides:  # JSON is YAML: key_value reads the values back as they were
        words += ["--model_overrides", *[f"{k}={json.dumps(v)}" for k, v in overrides.items()]]
    return words


def _recorded_args(path: Path) -> dict[str, Any]:
    """The checkpoint's recorded training args ({} for a backbone-only file); only the small ``args`` entry is
    read from a memory-mapped file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mapped; safe_load explains unreadable ones
        checkpoint = safe_load(path)
    return args_as_dict(checkpoint.get("args")) if isinstance(checkpoint, dict) else {}


def network_of(weights: str | Path) -> dict[str, Any]:
    """The network ``weights`` hold, as :func:`model_words` keywords, without building it: an export folder's
    ``config.json`` or a checkpoint's recorded args ({} when it records none)."""
    path = Path(weights)
    if path.is_dir():
        config = read_export_config(path)
        build = dict(config.get("build_kwargs") or {})
        patch_size = build.pop("patch_size", None)
        build.pop("drop_path_rate", None)  # an inference copy
        return {"arch": config["arch"], "mode": config["mode"], "gamma": config["gamma"], "patch_size": patch_size,
                "overrides": build}
    recorded = _recorded_args(path)
    if not recorded.get("arch"):
        return {}
    return {"arch": recorded["arch"], "mode": recorded.get("mode", "official"),  # DINO's own args have no mode
            "gamma": recorded.get("gamma", "auto"), "patch_size": recorded.get("patch_size") or 16,
            "overrides": dict(recorded.get("model_overrides") or {})}


def _stamp(path: Path) -> dict[str, Any]:
    """Path, size and modification time of the weights' files: a retrained or replaced file is another row."""
    if is_export_dir(path):
        files = [path / "config.json", path / read_export_config(path).get("weights", "model.safetensors")]
    else:
        files = [path]
    stamp = {}
    for file in files:
        if not file.is_file():
            raise ConfigError(f"--weights {path}: {file} is missing")
        stat = file.stat()
        stamp[file.name] = [stat.st_size, stat.st_mtime_ns]
    return {"weights": str(path.resolve()), "files": stamp}


def _default_name(path: Path) -> str:
    """An export folder's name; a checkpoint's folder (``runs/demo/checkpoint.pth`` -> ``demo``) or stem."""
    if path.is_dir() or not CHECKPOINT_STEMS.match(path.stem):
        return path.name if path.is_dir() else path.stem
    parent = path.resolve().parent.name
    return parent if path.stem == "checkpoint" else f"{parent}/{path.stem}"


def build_rows(weights: Sequence[str], names: Sequence[str] | None = None, random_init: bool = False,
               checkpoint_key: str = "teacher", model: dict[str, Any] | None = None) -> list[Row]:
    """A row per weights (``names`` or a name from the path) and, with ``random_init``, each one's network at random
    initialisation right after it (or one random row from ``model`` alone when no weights are given).

    ``model`` (:func:`model_words` keywords) goes to every row, as ``--arch`` etc. go to each driver (backbone-only
    files need arch and mode); an export folder fixes its model, so it refuses them.
    """
    model = {k: v for k, v in (model or {}).items() if v not in (None, FROM_CHECKPOINT, {}, [])}
    if names and len(names) != len(weights):
        raise ConfigError(f"--names gives {len(names)} names for {len(weights)} --weights: give one per weights")
    if not weights and not random_init:
        raise ConfigError("no --weights given: pass checkpoints or export folders, and/or --random_init")
    rows = []
    for index, item in enumerate(weights):
        path = Path(item)
        if not path.exists():
            raise ConfigError(f"--weights {item} does not exist: pass a checkpoint file or an export folder")
        if path.is_dir() and model:
            raise ConfigError(f"--weights {item} is an export folder, whose config.json fixes the model: drop "
                              f"{', '.join('--' + k if k != 'overrides' else '--model_overrides' for k in model)}")
        name = names[index] if names else _default_name(path)
        words = ("--pretrained_weights", str(item), "--checkpoint_key", checkpoint_key, *model_words(**model))
        rows.append(Row(name, str(item), words, {**_stamp(path), "checkpoint_key": checkpoint_key, "model": model}))
        if random_init:
            try:
                network = {**network_of(path), **model}
            except (CheckpointError, ValueError) as err:
                raise ConfigError(f"--weights {item}: {err}") from None
            if not network.get("arch") or not network.get("mode"):
                raise ConfigError(f"--weights {item} records no network (a backbone-only file): pass --arch and "
                                  "--mode for its random-init row")
            rows.append(_random_row(f"{name} (random init)", network))
    if not weights:
        rows.append(_random_row("random init", model))
    seen: dict[str, str] = {}
    for row in rows:
        if row.folder_name in seen:
            raise ConfigError(f"rows {seen[row.folder_name]!r} and {row.name!r} share the folder name "
                              f"{row.folder_name!r}: pass --names")
        seen[row.folder_name] = row.name
    return rows


def _random_row(name: str, network: dict[str, Any]) -> Row:
    words = ("--random_init", *model_words(**network))
    return Row(name, None, words, {"weights": None, "random_init": list(words[1:])})
