"""Pieces the generated layouts share: a crop of a real photo at any size, and a coloured Fashion-MNIST item pasted
on it with its exact mask (the recipe of :mod:`simpool.data.fashion_on_photos`, with the item, colour, size and place
chosen by the caller instead of drawn per index: ``paste_item`` and ``random_colour`` are that module's).

Example:
    >>> rng = np.random.default_rng(0)
    >>> background = photo_crop(rng, 96, 128)
    >>> image, mask = paste_item(background, fashion_item(7), random_colour(rng), side=48, top=10, left=20)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from simpool.data.fashion_on_photos import load_background_photos, load_fashion_mnist, paste_item, random_colour

__all__ = ["fashion_item", "paste_item", "photo_crop", "random_colour"]


def photo_crop(rng: np.random.Generator, height: int, width: int, photo: int | None = None) -> np.ndarray:
    """(height, width, 3) uint8: a crop of one of the background photos (30-60% of its short side), resized."""
    photos = load_background_photos()
    _, pixels = photos[int(rng.integers(len(photos))) if photo is None else photo % len(photos)]
    ph, pw = pixels.shape[:2]
    scale = rng.uniform(0.3, 0.6) * min(ph / height, pw / width)
    crop_h, crop_w = max(1, int(height * scale)), max(1, int(width * scale))
    y0, x0 = int(rng.integers(0, ph - crop_h + 1)), int(rng.integers(0, pw - crop_w + 1))
    crop = pixels[y0:y0 + crop_h, x0:x0 + crop_w]
    return np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR))


def fashion_item(index: int, split: str = "test") -> np.ndarray:
    """(28, 28) uint8 Fashion-MNIST image ``index`` of ``split``."""
    items, _ = load_fashion_mnist(split)
    return items[index % len(items)]
