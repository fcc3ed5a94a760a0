"""Fashion-on-photos written in PASCAL VOC's detection layout (what LOST reads for VOC07 / VOC12).

``VOCdevkit/VOC<year>/JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` (VOC's 1-based inclusive ``bndbox``,
``difficult``, ``truncated``) and ``ImageSets/Main/<split>.txt``. Every image holds its item as a plain object;
every third image also a second object, a random box flagged ``difficult`` (so readers meet several boxes and the
hard flags), and every fifth image's item is flagged ``truncated``.

Example::

    >>> root = write_voc_detection("/tmp/voc", 40, year="2007")     # /tmp/voc/VOCdevkit/VOC2007
    >>> simpool.data.voc_boxes.read_voc_boxes("/tmp/voc", "trainval")
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from simpool.data.fashion_mnist import FASHION_MNIST_CLASSES
from simpool.data.generated.rendered import stretched_sample

__all__ = ["write_voc_detection"]


def _object_xml(name: str, box: np.ndarray, difficult: bool, truncated: bool) -> str:
    x0, y0, x1, y1 = (int(v) for v in box)
    return (f"  <object>\n    <name>{escape(name)}</name>\n    <pose>Unspecified</pose>\n"
            f"    <truncated>{int(truncated)}</truncated>\n    <difficult>{int(difficult)}</difficult>\n"
            f"    <bndbox>\n      <xmin>{x0 + 1}</xmin>\n      <ymin>{y0 + 1}</ymin>\n"
            f"      <xmax>{x1}</xmax>\n      <ymax>{y1}</ymax>\n    </bndbox>\n  </object>\n")


def write_voc_detection(folder: str | Path, n: int, image_size: int = 96, aspect: float = 4 / 3, year: str = "2007",
                        split: str = "trainval", seed: int = 0) -> Path:
    """Write n images under ``folder/VOCdevkit/VOC<year>``; returns that folder. Boxes (x0, y0, x1, y1) become
    ``xmin = x0 + 1, ymin = y0 + 1, xmax = x1, ymax = y1`` (VOC's 1-based inclusive pixels)."""
    root = Path(folder) / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    ids = []
    for i in range(n):
        image, box, label = stretched_sample(i, image_size, aspect, seed)
        image_id = f"{year}_{i:06d}"
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        objects = _object_xml(FASHION_MNIST_CLASSES[label], box, difficult=False, truncated=i % 5 == 4)
        if i % 3 == 2:
            w, h = image.size
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            extra = np.array([x0, y0, x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))])
            objects += _object_xml("clutter", extra, difficult=True, truncated=False)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>\n  <folder>VOC{year}</folder>\n  <filename>{image_id}.jpg</filename>\n"
            f"  <size>\n    <width>{image.width}</width>\n    <height>{image.height}</height>\n"
            f"    <depth>3</depth>\n  </size>\n  <segmented>0</segmented>\n{objects}</annotation>\n")
        ids.append(image_id)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root
