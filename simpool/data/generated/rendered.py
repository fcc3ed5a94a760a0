"""Fashion-on-photos samples at any aspect ratio, the one source of the generated box and class layouts.

Example::

    >>> image, box, label = stretched_sample(0, 96, aspect=1.25)     # PIL 120 x 96, box (x0, y0, x1, y1), class
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from simpool.data.fashion_on_photos import Split, render_fashion_on_photo

__all__ = ["stretched_sample"]


def stretched_sample(index: int, image_size: int = 96, aspect: float = 1.0, seed: int = 0,
                     split: Split = "test") -> tuple[Image.Image, np.ndarray, int]:
    """Sample ``index`` rendered at ``image_size`` and stretched to width ``round(aspect * image_size)``: the
    (W, H) PIL image, the item's box scaled with it (x0, y0, x1, y1; pixel edges, inclusive-exclusive, whole
    pixels covering the item) and its Fashion-MNIST class."""
    sample = render_fashion_on_photo(index, image_size, seed, split)
    width = max(1, round(aspect * image_size))
    image = Image.fromarray(sample.image)
    if width != image_size:
        image = image.resize((width, image_size), Image.BICUBIC)
    x0, y0, x1, y1 = sample.box.tolist()
    scale = width / image_size
    box = np.array([int(np.floor(x0 * scale)), y0, int(np.ceil(x1 * scale)), y1], dtype=np.int64)
    return image, box, sample.label
