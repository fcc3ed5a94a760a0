"""Fashion-on-photos written as COCO20k is distributed: ``images/train2014/COCO_train2014_<id>.jpg``, an
``instances_train2014.json`` (``images``, ``annotations`` with ``bbox`` ``[x, y, w, h]`` and ``iscrowd``,
``categories``) and LOST's file list ``coco_20k_filenames.txt`` (``train2014/COCO_train2014_<id>.jpg`` lines).

The JSON holds more images than the list (every fourth is left out of it, as train2014 holds more than the 20k);
every sixth image gets a crowd annotation besides its item. Boxes are written with fractional coordinates, as COCO's
are.

Example::

    >>> paths = write_coco20k("/tmp/coco", 40)
    >>> simpool.data.coco20k.read_coco20k(paths["images"], paths["annotations"], paths["image_list"])
"""

from __future__ import annotations

import json
from pathlib import Path

from simpool.data.fashion_mnist import FASHION_MNIST_CLASSES
from simpool.data.generated.rendered import stretched_sample

__all__ = ["write_coco20k"]


def write_coco20k(folder: str | Path, n: int, image_size: int = 96, aspect: float = 1.25,
                  seed: int = 0) -> dict[str, Path]:
    """Write n images; returns the paths ``images`` (the train2014 folder), ``annotations`` and ``image_list``."""
    root = Path(folder)
    image_dir = root / "images" / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations, listed = [], [], []
    for i in range(n):
        image, box, label = stretched_sample(i, image_size, aspect, seed)
        image_id = 100_000 + 7 * i
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        image.save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        x0, y0, x1, y1 = (float(v) for v in box)
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                            "bbox": [x0 + 0.25, y0 + 0.5, x1 - x0 - 0.5, y1 - y0 - 0.75], "iscrowd": 0,
                            "area": (x1 - x0) * (y1 - y0)})
        if i % 6 == 5:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [0.0, 0.0, 10.0, 10.0], "iscrowd": 1, "area": 100.0})
        if i % 4 != 3:
            listed.append(f"train2014/{file_name}")
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(FASHION_MNIST_CLASSES)]
    annotation_file = root / "annotations" / "instances_train2014.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    image_list = root / "coco_20k_filenames.txt"
    image_list.write_text("".join(f"{line}\n" for line in listed))
    return {"images": image_dir, "annotations": annotation_file, "image_list": image_list}
