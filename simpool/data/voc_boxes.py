"""PASCAL VOC detection boxes (``Annotations/*.xml`` + ``ImageSets/Main/<split>.txt``), as LOST reads VOC07/VOC12.

Layout (VOCdevkit as distributed): ``<root>/JPEGImages/<id>.jpg``, ``<root>/Annotations/<id>.xml``,
``<root>/ImageSets/Main/trainval.txt``; ``--data_path`` may be that folder (``VOCdevkit/VOC2007``), the
``VOCdevkit`` folder above it (with ``--year``), or the folder holding ``VOCdevkit`` (torchvision's and LOST's
``datasets/VOC2007``).

Boxes as LOST's ``extract_gt_VOC``: VOC's 1-based inclusive ``xmin, ymin, xmax, ymax`` become
``(xmin - 1, ymin - 1, xmax, ymax)``, pixel edges, inclusive-exclusive. Every object counts, ``difficult`` and
``truncated`` included (LOST's default); ``no_hard=True`` drops those objects and the images left without one
(LOST's ``--no_hard``).

Example::

    >>> voc = read_voc_boxes("/data/VOCdevkit/VOC2007", "trainval")       # 5,011 images
    >>> name, image, boxes = voc[0]                                       # PIL image, (k, 4) float64 boxes
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simpool.data.every_item import open_rgb
from simpool.data.paths import DataError

__all__ = ["VocBoxes", "find_voc_root", "parse_voc_xml", "read_voc_boxes"]


def find_voc_root(path: str | Path, year: str | None = None) -> Path:
    """The folder holding ``Annotations/`` and ``ImageSets/Main/``: ``path`` itself, ``path/VOC<year>`` or
    ``path/VOCdevkit/VOC<year>`` (the only ``VOC*`` folder there when ``year`` is None)."""
    path = Path(path)
    candidates = [path]
    for base in (path, path / "VOCdevkit"):
        if year is not None:
            candidates.append(base / f"VOC{year}")
        elif base.is_dir():
            candidates += sorted(p for p in base.glob("VOC*") if p.is_dir() and p.name != "VOCdevkit")
    found = [c for c in candidates if (c / "Annotations").is_dir() and (c / "ImageSets" / "Main").is_dir()]
    if len(found) != 1 or not found:
        what = "several VOC folders (pass --year)" if found else "no VOC folder"
        raise DataError(f"--data_path {path}: {what}; expected VOCdevkit/VOC<year>/ with Annotations/, "
                        "ImageSets/Main/ and JPEGImages/ (PASCAL VOC as distributed)")
    return found[0]


def parse_voc_xml(path: Path) -> tuple[list[list[float]], list[bool], list[str]]:
    """(boxes in LOST's convention, hard flags (difficult or truncated), class names) of one annotation file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path} is not a VOC annotation ({err}); restore it from the VOC archive") from None
    boxes, hard, names = [], [], []
    for obj in root.iter("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{path}: an <object> has no <bndbox>; restore the file from the VOC archive")
        try:  # int(float()): a few VOC files write "273.0"
            xmin, ymin, xmax, ymax = (int(float(bndbox.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise DataError(f"{path}: a <bndbox> lacks a numeric xmin/ymin/xmax/ymax") from None
        boxes.append([xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)])
        hard.append(obj.findtext("difficult", "0").strip() == "1" or obj.findtext("truncated", "0").strip() == "1")
        names.append((obj.findtext("name") or "").strip())
    return boxes, hard, names


@dataclass
class VocBoxes:
    """The images of one ``ImageSets/Main`` list, with their boxes (read lazily, image by image)."""

    root: Path
    split: str
    names: list[str]
    no_hard: bool = False

    def __len__(self) -> int:
        return len(self.names)

    def boxes(self, index: int) -> np.ndarray:
        boxes, hard, _ = parse_voc_xml(self.root / "Annotations" / f"{self.names[index]}.xml")
        if self.no_hard:
            boxes = [b for b, h in zip(boxes, hard, strict=True) if not h]
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)

    def __getitem__(self, index: int) -> tuple[str, Image.Image, np.ndarray]:
        name = self.names[index]
        path = self.root / "JPEGImages" / f"{name}.jpg"
        if not path.is_file():
            raise DataError(f"{path} (listed in ImageSets/Main/{self.split}.txt) does not exist; restore JPEGImages/")
        return name, open_rgb(path), self.boxes(index)


def read_voc_boxes(path: str | Path, split: str = "trainval", year: str | None = None,
                   no_hard: bool = False) -> VocBoxes:
    """Open a VOC split (``ImageSets/Main/<split>.txt``) for object discovery; see the module docstring."""
    root = find_voc_root(path, year)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing} does not exist: pass --split with a list of ImageSets/Main/ "
                        f"({', '.join(sorted(p.stem for p in listing.parent.glob('*.txt') if '_' not in p.stem))})")
    names = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{listing} lists no image")
    missing = [n for n in names if not (root / "Annotations" / f"{n}.xml").is_file()]
    if missing:
        raise DataError(f"{root / 'Annotations'} lacks {len(missing)} files of {listing.name} (first: {missing[0]}.xml)"
                        "; restore Annotations/ from the VOC archive")
    data = VocBoxes(root, split, names, no_hard)
    if no_hard:  # LOST's --no_hard: images whose objects are all difficult or truncated are left out
        data.names = [n for i, n in enumerate(names) if len(data.boxes(i))]
    return data
