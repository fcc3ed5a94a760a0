"""Pieces the generated layouts share: a crop of a real photo at any size, and a coloured Fashion-MNIST item pasted
on it with its exact mask (the recipe of :mod:`simpool.data.fashion_on_photos`, with the item, colour, size and place
chosen by the caller instead of drawn per index).

Example:
    >>> rng = np.random.default_rng(0)
    >>> background = photo_crop(rng, 96, 128)
    >>> image, mask = paste_item(background, fashion_item(7), random_colour(rng), side=48, top=10, left=20)
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from simpool.data.fashion_on_photos import MASK_THRESHOLD, load_background_photos, load_fashion_mnist

__all__ = ["fashion_item", "paste_item", "photo_crop", "random_colour"]

ALPHA_RAMP = 0.3  # item intensity at which it becomes opaque (fashion_on_photos' value)


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


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour in [0, 1]^3 (HSV s in [0.5, 1], v in [0.6, 1])."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)))


def paste_item(background: np.ndarray, item: np.ndarray, colour: np.ndarray, side: int, top: int,
               left: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask): ``item`` resized to side x side at (top, left), shaded ``colour * (0.4 + 0.6 v)`` and
    alpha-blended (opaque above v = 0.3); mask = v > ``MASK_THRESHOLD``. The part outside the image is cut off."""
    height, width = background.shape[:2]
    intensity = np.zeros((height, width))
    resized = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR)) / 255.0
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, height), min(left + side, width)
    if y1 > y0 and x1 > x0:
        intensity[y0:y1, x0:x1] = resized[y0 - top:y1 - top, x0 - left:x1 - left]
    mask = intensity > MASK_THRESHOLD
    alpha = np.where(mask, np.minimum(1.0, intensity / ALPHA_RAMP), 0.0)[:, :, None]
    item_rgb = 255.0 * colour * (0.4 + 0.6 * intensity[:, :, None])
    blended = np.rint(alpha * item_rgb + (1.0 - alpha) * background).clip(0, 255).astype(np.uint8)
    return np.where(mask[:, :, None], blended, background), mask
