"""Gradient accumulation on the loader side: N loader batches form the micro-batches of one optimizer step.

``DINOStep`` does the maths (one centre, one update; see ``simpool.dino.step``); this module only groups the
loader's batches and counts in optimizer steps, so that ``train.py`` can keep counting "iterations" = steps.

Example:
    >>> for crops, _, num_bad in group_micro_batches(loader, accum_steps=4):   # crops: 4 lists of crop batches
    ...     stats = step(crops, schedule)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def group_micro_batches(loader: Iterable, accum_steps: int) -> Iterator[tuple[list[Any] | None, None, int]]:
    """Yield ``(micro_batches, None, num_bad)`` per optimizer step from a loader of ``(crops, labels, num_bad)``.

    ``micro_batches`` lists the crops of ``accum_steps`` consecutive loader batches, leaving out those with no
    readable image (``crops`` None; then fewer micro-batches make the step), and is None when none was
    readable; ``num_bad`` sums their unreadable images. A tail shorter than ``accum_steps`` batches is dropped,
    as ``drop_last`` drops a short batch.
    """
    group: list[Any] = []
    bad = 0
    for crops, _, num_bad in loader:
        group.append(crops)
        bad += int(num_bad)
        if len(group) == accum_steps:
            readable = [c for c in group if c is not None]
            yield (readable or None), None, bad
            group, bad = [], 0


def steps_per_epoch(samples_per_rank: int, batch_size_per_gpu: int, accum_steps: int) -> int:
    """Optimizer steps per epoch: whole groups of ``accum_steps`` batches of ``batch_size_per_gpu`` images."""
    return samples_per_rank // (batch_size_per_gpu * accum_steps)
