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

import random
import signal
from typing import Any

import numpy as np
import torch

__all__ = ["PreemptionFlag", "rng_state", "set_rng_state", "set_seeds"]


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
    """Set by SIGTERM/SIGUSR1; the loop saves a checkpoint and exits 0 at the next safe point."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.raised = True
