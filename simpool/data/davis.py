"""DAVIS 2017 (semi-supervised video object segmentation) as distributed.

Layout (``--data_path``)::

    JPEGImages/480p/<video>/00000.jpg ...       the frames, in name order
    Annotations/480p/<video>/00000.png ...      indexed PNGs: 0 background, 1..K the objects, 255 void;
                                                the first frame's is the input, the others the ground truth
    ImageSets/2017/val.txt                      the videos of the split, one a line

Example:
    >>> videos = read_davis("/data/DAVIS", split="val")
    >>> videos[0].name, len(videos[0].frames), read_annotation(videos[0].annotations[0]).max()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simpool.data.every_item import reading_image
from simpool.data.paths import DataError

__all__ = ["Video", "read_annotation", "read_davis"]


@dataclass(frozen=True)
class Video:
    name: str
    frames: list[Path]  # JPEGs sorted by name
    annotations: list[Path | None]  # the PNG of each frame, None where the frame has none

    @property
    def fully_annotated(self) -> bool:
        """Every frame has its annotation (train and val): J and F can be computed."""
        return all(path is not None for path in self.annotations)


def read_annotation(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 object ids of an indexed (or greyscale) DAVIS PNG."""
    with reading_image(path) as image:
        if image.mode not in ("P", "L"):
            raise DataError(f"{path} is a {image.mode} image: DAVIS annotations are indexed PNGs of object ids")
        return np.array(image)


def read_davis(root: str | os.PathLike, split: str = "val", resolution: str = "480p",
               videos: list[str] | None = None) -> list[Video]:
    """The videos of ``ImageSets/2017/<split>.txt`` (or those named in ``videos``), checked: frames present and
    the first frame annotated."""
    root = Path(root)
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    frames_root, annotations_root = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    for folder in (frames_root, annotations_root):
        if not folder.is_dir():
            raise DataError(f"--data_path {root} has no {folder.relative_to(root)}/: pass the DAVIS folder holding "
                            f"JPEGImages/{resolution}/, Annotations/{resolution}/ and ImageSets/2017/")
    if videos is None:
        if not listing.is_file():
            raise DataError(f"{listing} is missing: DAVIS lists the videos of a split there")
        videos = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not videos:
        raise DataError(f"no videos to segment in {listing}")
    out = []
    for name in videos:
        frames = sorted((frames_root / name).glob("*.jpg"))
        if not frames:
            raise DataError(f"video {name}: no frames in {frames_root / name}")
        annotations = [annotations_root / name / f"{frame.stem}.png" for frame in frames]
        if not annotations[0].is_file():
            raise DataError(f"video {name}: the first frame's annotation {annotations[0]} is missing (the "
                            "semi-supervised task starts from it)")
        out.append(Video(name, frames, [path if path.is_file() else None for path in annotations]))
    return out
