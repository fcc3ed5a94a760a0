"""Seeds and random-number-generator states, saved in checkpoints so that a resumed run continues the same streams.

``rng_state()`` holds every RNG a run draws from (Python, numpy, torch CPU, each CUDA device) as tensors and
plain values, so a checkpoint holding it loads with ``torch.load(weights_only=True)``; ``restore_rng_state``
puts rank 0's saved streams back on every rank, then gives the other ranks distinct but reproducible ones.

Example:
    >>> set_seeds(args.seed + rank)
    >>> state = {"model": model.state_dict(), "rng": rng_state()}
    >>> restore_rng_state(safe_load(path)["rng"], seed=args.seed, rank=rank, iteration=state["iteration"])
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["restore_rng_state", "rng_state", "set_rng_state", "set_seeds"]


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


def restore_rng_state(state: dict[str, Any], seed: int, rank: int, iteration: int) -> None:
    """Rank 0's saved streams on every rank (a checkpoint holds rank 0's); the other ranks then reseed torch
    with ``seed + rank + iteration``: distinct streams per rank, the same ones on every relaunch."""
    set_rng_state(state)
    if rank:
        torch.manual_seed(seed + rank + iteration)
