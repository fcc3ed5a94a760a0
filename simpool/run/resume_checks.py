"""What a resumed run must share with the run that wrote its state: the same weights, flags and data.

Every driver that resumes (the DINO trainer, fine-tuning, the probes, the evaluators' per-item results) records
what its results depend on and, on a relaunch, compares: a difference would silently mix two runs in one
output folder, so it stops with one line naming each difference ``name old -> new`` and the two ways out.

Example:
    >>> refuse_changes("runs/lin/checkpoint.pth.tar", "a probe of other features",
    ...                changes({"weights": "/a.pth", "lrs": [0.1]}, {"weights": "/b.pth", "lrs": [0.1]}))
    Traceback (most recent call last):
    simpool.checkpoint.CheckpointError: runs/lin/checkpoint.pth.tar holds a probe of other features: weights
    /a.pth -> /b.pth. Use another --output_dir, or the same flags and weights to resume it
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from simpool.checkpoint import CheckpointError

__all__ = ["changes", "check_same_run", "refuse_changes", "weights_identity"]


def _plain(value: Any) -> Any:
    """Tuples and lists compare alike (YAML and checkpoints turn one into the other)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def changes(saved: Mapping[str, Any], now: Mapping[str, Any], names: Iterable[str] | None = None,
            prefix: str = "") -> list[str]:
    """``"<prefix>name old -> new"`` for each of ``names`` (default: every key of ``now``) that ``saved`` records
    with another value. Names ``saved`` does not record are not compared (files written before they were)."""
    out = []
    for name in (names if names is not None else now):
        if name not in saved or name not in now:
            continue
        old, new = _plain(saved[name]), _plain(now[name])
        if old != new:
            out.append(f"{prefix}{name} {old} -> {new}")
    return out


def refuse_changes(where: str | os.PathLike, what: str, found: list[str],
                   fix: str = "use another --output_dir, or the same flags and weights to resume it") -> None:
    """Raise :class:`CheckpointError` ``"<where> holds <what>: <changes>. <Fix>"`` when ``found`` is not empty."""
    if found:
        raise CheckpointError(f"{where} holds {what}: {', '.join(found)}. {fix[:1].upper()}{fix[1:]}")


def weights_identity(source: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a model's features (``ModelSource.as_dict()``): its weights file as an absolute path,
    the checkpoint key, arch, mode, gamma and the training epoch the file holds."""
    weights = source.get("weights")
    return {"weights": str(Path(weights).resolve()) if weights else None,
            **{k: source.get(k) for k in ("checkpoint_key", "arch", "mode", "gamma", "epoch")}}


def check_same_run(saved: Mapping[str, Any], identity: Mapping[str, Any], source: Mapping[str, Any] | None,
                   where: str | os.PathLike, what: str) -> None:
    """Refuse to resume ``saved`` (a run's recorded state) when its ``identity`` (protocol flags, data) or, with
    ``source`` (``ModelSource.as_dict()``), the weights it was computed from differ from this launch's."""
    found = changes(saved, identity)
    if source is not None and isinstance(saved.get("source"), Mapping):
        found += changes(weights_identity(saved["source"]), weights_identity(source))
    refuse_changes(where, what, found)
