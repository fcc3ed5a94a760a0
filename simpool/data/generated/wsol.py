"""Fashion-on-photos written in clovaai/wsolevaluation's layout: an image root and the four metadata files of a
split (``metadata/<DS>/<split>/{image_ids,class_labels,image_sizes,localization}.txt``).

Image ids are ``<class folder>/<name>.jpg`` as CUB's are; every fourth image gets a second box (a wider one
around the item, as ImageNet's several boxes per image), so that the best of several ground-truth boxes is used.

Example::

    >>> images, metadata = write_wsol("/tmp/wsol", 40)          # /tmp/wsol/images, /tmp/wsol/metadata/FOP/test
    >>> simpool.data.wsol.read_wsol(images, metadata)
"""

from __future__ import annotations

from pathlib import Path

from simpool.data.fashion_mnist import FASHION_MNIST_CLASSES
from simpool.data.generated.rendered import stretched_sample

__all__ = ["write_wsol"]


def write_wsol(folder: str | Path, n: int, image_size: int = 96, aspect: float = 1.25, seed: int = 0,
               dataset: str = "FOP", split: str = "test") -> tuple[Path, Path]:
    """Write n images; returns (image root, metadata split folder)."""
    root = Path(folder)
    image_root, metadata = root / "images", root / "metadata" / dataset / split
    metadata.mkdir(parents=True, exist_ok=True)
    ids, labels, sizes, boxes = [], [], [], []
    for i in range(n):
        image, box, label = stretched_sample(i, image_size, aspect, seed)
        image_id = f"{label:03d}.{FASHION_MNIST_CLASSES[label].replace('/', '_').replace(' ', '_')}/item_{i:05d}.jpg"
        (image_root / image_id).parent.mkdir(parents=True, exist_ok=True)
        image.save(image_root / image_id, quality=95)
        ids.append(image_id)
        labels.append(f"{image_id},{label}")
        sizes.append(f"{image_id},{image.width},{image.height}")
        x0, y0, x1, y1 = (int(v) for v in box)
        boxes.append(f"{image_id},{x0},{y0},{x1},{y1}")
        if i % 4 == 3:
            boxes.append(f"{image_id},{max(0, x0 - 8)},{max(0, y0 - 8)},{min(image.width, x1 + 8)},"
                         f"{min(image.height, y1 + 8)}")
    for name, lines in (("image_ids", ids), ("class_labels", labels), ("image_sizes", sizes),
                        ("localization", boxes)):
        (metadata / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
    return image_root, metadata
