"""Figures of predicted and ground-truth boxes on a few images, for the localisation and object-discovery runs.

Example::

    >>> draw_boxes(image, {"gt": (gt_boxes, (0, 200, 0)), "LOST": ([box], (220, 30, 30))}, "figures/000001.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLOURS", "draw_boxes", "figure_name"]

COLOURS = {"gt": (0, 200, 0), "pred": (230, 30, 30), "second": (30, 90, 230)}


def figure_name(item_id: str) -> str:
    """A file name for an image id that may hold folders (``001.Albatross/x.jpg`` -> ``001.Albatross_x.png``)."""
    return Path(str(item_id).replace("/", "_").replace("\\", "_")).stem + ".png"


def draw_boxes(image: Image.Image, boxes: Mapping[str, tuple[Sequence | np.ndarray, tuple[int, int, int]]],
               path: str | os.PathLike, width: int = 2) -> Path:
    """Draw each named set of (x0, y0, x1, y1) boxes (inclusive-exclusive) in its colour, with the names in their
    colours as a legend at the top left, and write the PNG atomically. Returns the path."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    for _, (group, colour) in boxes.items():
        for box in np.asarray(group, dtype=np.float64).reshape(-1, 4):
            x0, y0, x1, y1 = box.tolist()
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
    x = 3
    for name, (_, colour) in boxes.items():  # the legend: each name in its boxes' colour, on a dark strip
        right = x + int(draw.textlength(name)) + 4
        draw.rectangle([x - 2, 1, right, 12], fill=(0, 0, 0))
        draw.text((x, 1), name, fill=colour)
        x = right + 4
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
