"""COCO20k: the 19,817 train2014 images of LOST's object discovery (``datasets/coco_20k_filenames.txt``), with
their boxes from COCO's ``instances_train2014.json``.

Layout: ``--data_path`` is the folder the JSON's ``file_name`` entries are relative to (``COCO/images/train2014``),
``--annotations`` the instances JSON (the full ``instances_train2014.json`` or LOST's filtered
``instances_train2014_sel20k.json``), ``--image_list`` the file list (lines ``train2014/COCO_train2014_<id>.jpg``,
from valeoai/LOST; without it every image of the JSON is used).

Boxes as LOST's ``extract_gt_COCO``: ``[x, y, w, h]`` -> ``round(x), round(y), round(x + w), round(y + h)``
(Python's ``round``: halves to even), crowd annotations left out. An image without a non-crowd box stays in the
set and counts as a miss, as it does in LOST's CorLoc.

Example::

    >>> coco = read_coco20k("/data/COCO/images/train2014", "/data/COCO/annotations/instances_train2014.json",
    ...                     "coco_20k_filenames.txt")
    >>> name, image, boxes = coco[0]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simpool.data.every_item import open_rgb
from simpool.data.paths import DataError

__all__ = ["Coco20k", "coco_ids_of_list", "lost_coco_box", "read_coco20k"]


def lost_coco_box(bbox: list[float]) -> list[float]:
    """LOST's box of a COCO ``[x, y, w, h]``: ``[round(x), round(y), round(x + w), round(y + h)]``."""
    x, y, w, h = (float(v) for v in bbox)
    return [float(round(v)) for v in (x, y, x + w, y + h)]


def coco_ids_of_list(path: Path) -> list[int]:
    """Image ids of a file list: the number at the end of each name (``.../COCO_train2014_000000560992.jpg``)."""
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.append(int(Path(line.strip()).stem.split("_")[-1]))
        except ValueError:
            raise DataError(f"{path}:{number}: {line.strip()!r} is not a COCO file name (..._<image id>.jpg); "
                            "pass LOST's datasets/coco_20k_filenames.txt") from None
    if not ids:
        raise DataError(f"{path} lists no image")
    return ids


@dataclass
class Coco20k:
    """Images (id, file name) and their boxes in LOST's convention."""

    image_dir: Path
    names: list[str]
    files: list[str]
    boxes_by_name: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[str, Image.Image, np.ndarray]:
        name = self.names[index]
        path = self.image_dir / self.files[index]
        if not path.is_file():
            raise DataError(f"{path} (image id {name}) does not exist: pass as --data_path the folder the "
                            "JSON's file_name entries are relative to (COCO/images/train2014)")
        return name, open_rgb(path), self.boxes_by_name[name]


def read_coco20k(image_dir: str | Path, annotations: str | Path, image_list: str | Path | None = None) -> Coco20k:
    """Open COCO20k (or any COCO instances JSON); see the module docstring. Errors name the file and the fix."""
    image_dir, annotations = Path(image_dir), Path(annotations)
    if not image_dir.is_dir():
        raise DataError(f"--data_path {image_dir} is not a folder: pass COCO/images/train2014")
    if not annotations.is_file():
        raise DataError(f"--annotations {annotations} does not exist: pass COCO's instances_train2014.json")
    try:
        data = json.loads(annotations.read_text())
        images = {int(entry["id"]): str(entry["file_name"]) for entry in data["images"]}
        boxes: dict[int, list[list[float]]] = {i: [] for i in images}
        for entry in data["annotations"]:
            if not entry.get("iscrowd", 0):
                boxes.setdefault(int(entry["image_id"]), []).append(lost_coco_box(entry["bbox"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"--annotations {annotations} is not a COCO instances JSON ({err!r}): it needs 'images' "
                        "with id/file_name and 'annotations' with image_id/bbox") from None
    if image_list is not None:
        ids = coco_ids_of_list(Path(image_list))
        missing = [i for i in ids if i not in images]
        if missing:
            raise DataError(f"--image_list {image_list}: {len(missing)} ids are not in {annotations} (first: "
                            f"{missing[0]}); COCO20k's list goes with instances_train2014.json")
    else:
        ids = sorted(images)
    names = [str(i) for i in ids]
    return Coco20k(image_dir, names, [images[i] for i in ids],
                   {str(i): np.asarray(boxes.get(i, []), dtype=np.float64).reshape(-1, 4) for i in ids})
