"""INRIA Copydays as distributed (and as DINO's ``eval_copy_detection.py`` reads it), with its ground truth.

Layout (``--data_path``)::

    original/<id>.jpg            157 photos, the database (ids like 200000; 4-digit prefix = the photo's group)
    strong/<id>.jpg              229 strong attacks (print-scan, blur, paint, crops...); their originals share
                                 the first 4 characters of the name
    jpegqual/<q>/<id>.jpg        JPEG at quality q in {3, 5, 8, 10, 15, 20, 30, 50, 75}, same names as original/
    crops/<c>/<id>.jpg           c% of the surface cropped away, c in {10, 15, 20, 30, 40, 50, 60, 70, 80}

Every block present is a query block, ``original`` included (as in DINO); ``original/`` and ``strong/`` must be
there, other blocks may be left out. Positives of a query: in ``strong``, the originals whose names share its first
4 characters (DINO's rule); elsewhere, the original of the same name (DINO pairs by position in the sorted lists,
which is the same pairing when a block is complete, and a wrong one when it is not).

Example:
    >>> days = read_copydays("/data/copydays")
    >>> days.blocks["strong"][:2], days.positives("strong")[:2]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from simpool.data.paths import DataError, is_image_file

__all__ = ["BLOCK_NAMES", "Copydays", "list_images", "read_copydays"]

BLOCK_NAMES = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
               + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])
GROUP_PREFIX = 4  # characters of a file name that name its photo group (Holidays / Copydays convention)


def list_images(folder: str | os.PathLike, flag: str = "--data_path") -> list[Path]:
    """Image files directly in ``folder``, sorted by name; a DataError names the flag when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))
    if not files:
        raise DataError(f"{flag} {folder} holds no images")
    return files


@dataclass(frozen=True)
class Copydays:
    root: Path
    blocks: dict[str, list[Path]]  # block name -> its .jpg files sorted by name (original first)

    def positives(self, block: str) -> list[list[int]]:
        """Per query of ``block``, the indices in ``blocks['original']`` of its originals."""
        originals = [p.name for p in self.blocks["original"]]
        if block == "strong":
            return [[j for j, name in enumerate(originals) if name[:GROUP_PREFIX] == query.name[:GROUP_PREFIX]]
                    for query in self.blocks[block]]
        index = {name: j for j, name in enumerate(originals)}
        return [[index[query.name]] for query in self.blocks[block]]


def read_copydays(root: str | os.PathLike) -> Copydays:
    """The blocks of a Copydays folder, checked: original/ and strong/ present, every query has an original."""
    root = Path(root)
    if not (root / "original").is_dir():
        raise DataError(f"--data_path {root} has no original/ folder: pass the Copydays folder holding original/, "
                        "strong/, jpegqual/<q>/ and crops/<c>/")
    blocks = {}
    for name in BLOCK_NAMES:
        folder = root / name
        if folder.is_dir():
            blocks[name] = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".jpg")
    if not blocks["original"]:
        raise DataError(f"{root / 'original'} holds no .jpg images")
    if not blocks.get("strong"):
        raise DataError(f"--data_path {root} has no strong/ images: the headline block of Copydays is missing")
    days = Copydays(root, blocks)
    originals = {p.name for p in blocks["original"]}
    for name, files in blocks.items():
        if name == "strong":
            lonely = [p.name for p, pos in zip(files, days.positives("strong"), strict=True) if not pos]
        else:
            lonely = [p.name for p in files if p.name not in originals]
        if lonely:
            raise DataError(f"{root / name} has {len(lonely)} images without an original in {root / 'original'}, "
                            f"e.g. {lonely[0]}")
    return days
