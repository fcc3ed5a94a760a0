"""Exact resume of a training run: seeding, RNG states as checkpoint content, and the preemption flag.

A checkpoint written by ``simpool.dino.train`` holds, besides weights and optimizer state, ``rng_state()``:
every RNG (Python, numpy, torch CPU, each CUDA device) as tensors and plain values, so it loads with
``torch.load(weights_only=True)`` and ``set_rng_state`` continues the same random streams. ``PreemptionFlag``
turns SLURM's SIGTERM / SIGUSR1 into a flag the loop reads at its next safe point (save, exit 0).

Example:
    >>> set_seeds(args.seed + rank)
    >>> state = {"model": model.state_dict(), "rng": rng_state()}
    >>> set_rng_state(safe_load(path)["rng"])   # on resume
    >>> flag = PreemptionFlag()
    >>> if flag.raised: save_and_exit()
"""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simpool.checkpoint import CheckpointError, safe_load
from simpool.models import AUTO_GAMMA, default_gamma, is_known_arch

__all__ = ["INCOMPATIBLE_FLAGS", "PREEMPTION_DIR_VARIABLE", "PreemptionFlag", "incompatible_changes",
           "newest_readable_checkpoint", "rng_state", "set_rng_state", "set_seeds", "unreadable_checkpoint_error",
           "write_preemption_marker"]

# Set by launch/torchrun.py: a folder where each rank that exits after a clean preemption save leaves a file.
PREEMPTION_DIR_VARIABLE = "SIMPOOL_PREEMPTION_DIR"


def set_seeds(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (numpy takes the seed modulo 2**32)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain values, so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states ``rng_state`` returned (CUDA ones only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the loop saves a checkpoint and exits 0 at the next safe point.

    Install it first thing in the main process: a signal during set-up is then remembered rather than fatal.
    Loader workers ignore both signals (``simpool.data.sampler.ignore_preemption_signals``).
    """

    def __init__(self) -> None:
        self.raised = False
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.raised = True
        self.signal_name = signal.Signals(signum).name


# ----------------------------------------------------------------------------------------------------------
# what a resume can and cannot change
# ----------------------------------------------------------------------------------------------------------
# Flags whose change a resume cannot honour: they change the weights' shapes or meaning or the optimizer state.
# The data set is compared by content (``simpool.data.dataset_fingerprint``), so a moved copy may resume.
# Everything else (processes, nodes, batch size, lr, crops...) may change.
INCOMPATIBLE_FLAGS = ("arch", "mode", "gamma", "patch_size", "model_overrides", "out_dim", "head_hidden_dim",
                      "head_bottleneck_dim", "head_nlayers", "use_bn_in_head", "norm_last_layer", "optimizer")


def _comparable(name: str, value: Any, arch: Any) -> Any:
    if name == "gamma" and value == AUTO_GAMMA:
        return default_gamma(str(arch)) if is_known_arch(str(arch)) else value
    if isinstance(value, tuple):
        return list(value)
    return value


def incompatible_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--flag old -> new`` for each flag of ``INCOMPATIBLE_FLAGS`` that differs between a checkpoint's args
    and this launch's (flags the checkpoint does not record are not compared)."""
    changes = []
    for name in INCOMPATIBLE_FLAGS:
        if name not in saved or name not in now:
            continue
        old = _comparable(name, saved[name], saved.get("arch"))
        new = _comparable(name, now[name], now.get("arch"))
        if old != new:
            changes.append(f"--{name} {old} -> {new}")
    return changes


_KEPT = re.compile(r"^checkpoint(\d{4,})\.pth$")


def newest_readable_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The kept ``checkpointNNNN.pth`` of ``folder`` with the highest NNNN that loads, and its content."""
    kept = sorted((p for p in folder.glob("checkpoint*.pth") if _KEPT.match(p.name)),
                  key=lambda p: int(_KEPT.match(p.name).group(1)), reverse=True)
    for path in kept:
        try:
            return path, safe_load(path)
        except CheckpointError:
            continue
    return None


def unreadable_checkpoint_error(path: Path, err: Exception) -> CheckpointError:
    """The error for a checkpoint.pth that does not load: why, and which kept checkpoint to resume from."""
    size = path.stat().st_size if path.exists() else 0
    why = "it is empty (0 bytes)" if size == 0 else f"{err}".split("\n")[0][:300]
    found = newest_readable_checkpoint(path.parent)
    if found is None:
        fix = f"no readable checkpointNNNN.pth is kept in {path.parent}: move {path.name} away to start afresh"
    else:
        kept, state = found
        fix = (f"the newest readable kept checkpoint is {kept} (epoch {state.get('epoch', '?')}): relaunch with "
               f"--resume_from {kept}, or move {path.name} away to start afresh")
    return CheckpointError(f"cannot resume from {path}: {why}; {fix}")


def write_preemption_marker(rank: int) -> None:
    """Tell ``launch/torchrun.py`` (which sets ``SIMPOOL_PREEMPTION_DIR``) that this rank stopped cleanly after
    a preemption save, so the launcher exits 0 (requeue) rather than reporting the signal as a failure."""
    folder = os.environ.get(PREEMPTION_DIR_VARIABLE)
    if folder:
        Path(folder, f"rank{rank}").write_text("saved\n")
