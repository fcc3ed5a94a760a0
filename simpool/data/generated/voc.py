"""Fashion-on-photos written in PASCAL VOC's segmentation layout, for the attention scores and the segmentation probe.

``write_voc_style`` renders samples of :mod:`simpool.data.fashion_on_photos` into the folders VOC distributes:
``JPEGImages/``, ``SegmentationObject/`` (0/255 object masks), ``SegmentationClass/`` (palette PNGs, 0 background,
1 + Fashion-MNIST class) and ``ImageSets/Segmentation/<split>.txt``.

Example::

    >>> write_voc_style("/tmp/fop", 100)
    >>> simpool.data.masks.read_mask_folder("/tmp/fop")      # the reader of real PASCAL VOC folders
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from simpool.data.fashion_on_photos import SEGMENTATION_CLASSES, Split, class_mask, render_fashion_on_photo, voc_palette

__all__ = ["write_voc_style"]


def write_voc_style(
    folder: str | Path,
    n: int,
    image_size: int = 96,
    seed: int = 0,
    split: Split = "test",
    fashion_root: str | Path | None = None,
    jpeg_quality: int = 95,
    list_name: str | None = None,
    id_prefix: str = "",
) -> list[str]:
    """Write n samples as ``folder/JPEGImages/<id>.jpg`` + ``folder/SegmentationObject/<id>.png``.

    Masks are greyscale PNGs, 0 = background, 255 = object (viewable as is; :func:`simpool.data.masks.read_mask_folder`
    reads such 0/255 masks as binary). ``SegmentationClass/<id>.png`` holds the per-class labels
    (:func:`class_mask`) as a VOC palette PNG, the layout :mod:`simpool.data.segmentation` reads. Also writes
    ``ImageSets/Segmentation/<split>.txt`` (the ids), ``classes.txt`` (the class names, one a line) and
    ``labels.txt`` (``<id> <class>`` lines) as VOC does for its lists. Returns the ids.

    ``id_prefix`` names the files ``<prefix><i:06d>``, so that two splits can share one folder::

        >>> write_voc_style("/tmp/seg", 200, split="train", list_name="train", id_prefix="train_")
        >>> write_voc_style("/tmp/seg", 50, split="test", list_name="val", id_prefix="val_")
    """
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    root = Path(folder)
    image_dir, mask_dir = root / "JPEGImages", root / "SegmentationObject"
    class_dir, list_dir = root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    for directory in (image_dir, mask_dir, class_dir, list_dir):
        directory.mkdir(parents=True, exist_ok=True)
    ids, label_lines = [], []
    palette = voc_palette()
    for i in range(n):
        sample = render_fashion_on_photo(i, image_size, seed, split, fashion_root)
        sample_id = f"{id_prefix}{i:06d}"
        Image.fromarray(sample.image).save(image_dir / f"{sample_id}.jpg", quality=jpeg_quality)
        Image.fromarray(sample.mask.astype(np.uint8) * 255, mode="L").save(mask_dir / f"{sample_id}.png")
        per_class = Image.fromarray(class_mask(sample), mode="P")
        per_class.putpalette(palette)
        per_class.save(class_dir / f"{sample_id}.png")
        ids.append(sample_id)
        label_lines.append(f"{sample_id} {sample.label}")
    (list_dir / f"{list_name or split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in SEGMENTATION_CLASSES))
    # Lines of other ids are kept: several splits may share the folder (a rewrite of the same ids replaces them).
    labels_path, written = root / "labels.txt", set(ids)
    kept = labels_path.read_text().splitlines() if labels_path.is_file() else []
    kept = [line for line in kept if line.split(" ", 1)[0] not in written]
    labels_path.write_text("".join(f"{line}\n" for line in kept + label_lines))
    return ids
