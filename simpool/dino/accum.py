"""Gradient accumulation on the loader side: N loader batches form the micro-batches of one optimizer step.

``DINOStep`` does the maths (one centre, one update; see ``simpool.dino.step``); this module only groups the
loader's batches, so that ``train.py`` counts "iterations" in optimizer steps.

Example:
    >>> for micro_batches, num_bad in group_micro_batches(loader, accum_steps=4):  # 4 lists of crop batches
    ...     stats = step([m for m in micro_batches if m is not None], schedule)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def group_micro_batches(loader: Iterable, accum_steps: int) -> Iterator[tuple[list[Any], int]]:
    """Yield ``(micro_batches, num_bad)`` per optimizer step from a loader of ``(crops, labels, num_bad)``.

    ``micro_batches`` lists the crops of ``accum_steps`` consecutive loader batches in order, ``None`` where a
    batch had no readable image (the trainer drops those on every rank alike); ``num_bad`` sums their
    unreadable images. A tail shorter than ``accum_steps`` batches is dropped, as ``drop_last`` drops a short
    batch.
    """
    group: list[Any] = []
    bad = 0
    for crops, _, num_bad in loader:
        group.append(crops)
        bad += int(num_bad)
        if len(group) == accum_steps:
            yield group, bad
            group, bad = [], 0
