"""Fashion-on-photos written in INRIA Copydays' layout, for the copy-detection evaluator, with a distractor and a
whitening folder beside it.

Originals are an item on a photo crop, named ``2<ggg>00.jpg`` (group ggg). Blocks, as Copydays makes them:

* ``strong/2<ggg><kk>.jpg`` (kk = 01, 02): a 60-80% crop, rotated by up to 20 degrees, colours changed, blurred and
  saved at JPEG quality 50 -- the attacks of Copydays' "strong" set in miniature;
* ``jpegqual/<q>/``: the original saved at JPEG quality q;
* ``crops/<c>/``: the central part left after cropping away c% of the surface.

``distractors/`` and ``whitening/`` hold other fashion-on-photos images (other items, photos and seeds).

Example::

    >>> write_copydays_style("/tmp/copydays", num_originals=8)
    >>> simpool.data.copydays.read_copydays("/tmp/copydays/copydays")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from simpool.data.generated.compose import fashion_item, paste_item, photo_crop, random_colour

__all__ = ["write_copydays_style"]

JPEG_QUALITIES = (3, 5, 8, 10, 15, 20, 30, 50, 75)
CROPS = (10, 15, 20, 30, 40, 50, 60, 70, 80)


def _scene(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    side = int(rng.uniform(0.4, 0.7) * min(height, width))
    image, _ = paste_item(photo_crop(rng, height, width), fashion_item(int(rng.integers(10_000))),
                          random_colour(rng), side, int(rng.integers(0, height - side + 1)),
                          int(rng.integers(0, width - side + 1)))
    return Image.fromarray(image)


def _strong(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    width, height = image.size
    keep = rng.uniform(0.6, 0.8)
    w, h = int(width * keep), int(height * keep)
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    out = image.crop((x0, y0, x0 + w, y0 + h)).rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.3, 1.7)))
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.7, 1.3)))
    return out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))


def _central_crop(image: Image.Image, removed_percent: int) -> Image.Image:
    width, height = image.size
    factor = math.sqrt(1 - removed_percent / 100)
    w, h = max(1, round(width * factor)), max(1, round(height * factor))
    x0, y0 = (width - w) // 2, (height - h) // 2
    return image.crop((x0, y0, x0 + w, y0 + h))


def write_copydays_style(folder: str | Path, num_originals: int = 8, strong_per_original: int = 2,
                         distractors: int = 16, whitening: int = 24, size: tuple[int, int] = (96, 128),
                         jpeg_qualities: Sequence[int] = JPEG_QUALITIES, crops: Sequence[int] = CROPS,
                         seed: int = 0) -> Path:
    """Write ``folder/copydays/`` (the data set), ``folder/distractors/`` and ``folder/whitening/``; return
    ``folder/copydays``. ``size`` is (height, width) of the originals."""
    rng = np.random.default_rng([seed, 1997])
    root = Path(folder)
    days = root / "copydays"
    for sub in ["original", "strong", *(f"jpegqual/{q}" for q in jpeg_qualities), *(f"crops/{c}" for c in crops)]:
        (days / sub).mkdir(parents=True, exist_ok=True)
    for group in range(num_originals):
        original = _scene(rng, *size)
        name = f"2{group:03d}00.jpg"
        original.save(days / "original" / name, quality=95)
        for k in range(1, strong_per_original + 1):
            _strong(rng, original).save(days / "strong" / f"2{group:03d}{k:02d}.jpg", quality=50)
        for quality in jpeg_qualities:
            original.save(days / "jpegqual" / str(quality) / name, quality=quality)
        for removed in crops:
            _central_crop(original, removed).save(days / "crops" / str(removed) / name, quality=95)
    for sub, count in (("distractors", distractors), ("whitening", whitening)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _scene(rng, *size).save(root / sub / f"{sub}_{i:05d}.jpg", quality=95)
    return days
