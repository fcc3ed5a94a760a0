"""Weakly-supervised localisation data as clovaai/wsolevaluation distributes it (CUB-200-2011, ImageNet val).

A split's metadata folder (``metadata/<DS>/<split>/`` of wsolevaluation) holds four text files, one line per
image (``localization.txt``: one line per box) and image paths relative to the image root:

* ``image_ids.txt``: ``<path>``
* ``class_labels.txt``: ``<path>,<class>``
* ``image_sizes.txt``: ``<path>,<width>,<height>``
* ``localization.txt``: ``<path>,<x0>,<y0>,<x1>,<y1>`` (pixels; one line per box, several per image)

The images live under a root (``CUB_200_2011/images/`` for CUB's ``001.Black_footed_Albatross/...jpg`` ids;
the ImageNet folder holding ``val/`` for ``val/ILSVRC2012_val_00000001.JPEG`` ids).

Example::

    >>> data = read_wsol("/data/CUB_200_2011/images", "wsolevaluation/metadata/CUB/test")
    >>> image_id, image, boxes = data[0]          # PIL image, (k, 4) int64 boxes at the image's own size
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simpool.data.every_item import open_rgb
from simpool.data.paths import DataError

__all__ = ["WSOL_FILES", "WsolData", "read_wsol"]

WSOL_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")


def _rows(path: Path, fields: int) -> list[list[str]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != fields:
            raise DataError(f"{path}:{number}: expected {fields} comma-separated fields, got {line!r}; "
                            "use wsolevaluation's metadata files as they are distributed")
        rows.append(parts)
    return rows


def _ints(values: list[str], path: Path) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise DataError(f"{path}: {values} are not integers; use wsolevaluation's metadata files") from None


@dataclass
class WsolData:
    """One split: image ids (in ``image_ids.txt`` order), class labels, sizes (W, H) and boxes per id."""

    image_root: Path
    metadata: Path
    image_ids: list[str]
    labels: dict[str, int]
    sizes: dict[str, tuple[int, int]]
    boxes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[str, Image.Image, np.ndarray]:
        image_id = self.image_ids[index]
        path = self.image_root / image_id
        if not path.is_file():
            raise DataError(f"{path} (image {image_id!r} of {self.metadata / 'image_ids.txt'}) does not exist: "
                            "pass as --data_path the folder the ids are relative to")
        return image_id, open_rgb(path), self.boxes[image_id]


def read_wsol(image_root: str | Path, metadata: str | Path) -> WsolData:
    """Read and check one split's metadata (a ``DataError`` names the file and the fix); images load lazily."""
    image_root, metadata = Path(image_root), Path(metadata)
    if not image_root.is_dir():
        raise DataError(f"--data_path {image_root} is not a folder: pass the image root the metadata ids are "
                        "relative to (CUB: CUB_200_2011/images; ImageNet: the folder holding val/)")
    missing = [name for name in WSOL_FILES if not (metadata / name).is_file()]
    if missing:
        raise DataError(f"--metadata {metadata} lacks {', '.join(missing)}: pass a split folder of "
                        "wsolevaluation's metadata, e.g. metadata/CUB/test")
    ids = [line.strip() for line in (metadata / "image_ids.txt").read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{metadata / 'image_ids.txt'} lists no image")
    labels = {row[0]: _ints(row[1:], metadata / "class_labels.txt")[0]
              for row in _rows(metadata / "class_labels.txt", 2)}
    sizes = {row[0]: tuple(_ints(row[1:], metadata / "image_sizes.txt"))
             for row in _rows(metadata / "image_sizes.txt", 3)}
    boxes: dict[str, list[list[int]]] = {}
    for row in _rows(metadata / "localization.txt", 5):
        box = _ints(row[1:], metadata / "localization.txt")
        if box[2] < box[0] or box[3] < box[1] or min(box) < 0:
            raise DataError(f"{metadata / 'localization.txt'}: box {box} of {row[0]!r} is not x0,y0,x1,y1 with "
                            "x1 >= x0, y1 >= y0 >= 0")
        boxes.setdefault(row[0], []).append(box)
    for name, table in (("image_sizes.txt", sizes), ("localization.txt", boxes)):
        lacking = [i for i in ids if i not in table]
        if lacking:
            raise DataError(f"{metadata / name} has no line for {len(lacking)} of the {len(ids)} images of "
                            f"image_ids.txt (first: {lacking[0]!r}); the four files must describe the same images")
    return WsolData(image_root, metadata, ids, labels, sizes,
                    {i: np.asarray(boxes[i], dtype=np.int64) for i in ids})
