"""Fashion-on-photos written as an ImageFolder (torchvision's / DINO's layout): ``<split>/<class>/<id>.jpg``.

The layout ``train_dino.py``, ``eval_knn.py``, ``eval_linear.py`` and ``finetune.py`` read as ``--data_path``: one
folder per split, one sub-folder per class. Samples of :mod:`simpool.data.fashion_on_photos` go to the folder of their
Fashion-MNIST class (``Trouser`` -> ``1_trouser``); the first ``num_classes`` classes are kept. The ``train`` split
renders the train region of the photos and the Fashion-MNIST train set, ``val`` the disjoint test ones.

Images can be non-square, as photos are: a sample rendered at ``max(height, width)`` is centre-cropped to
``height x width``.

Example::

    >>> write_image_folder("/tmp/fop_folder", per_class=4, num_classes=2, size=(224, 256))
    {'train': 8, 'val': 8}
    >>> sorted(p.name for p in Path("/tmp/fop_folder/train").iterdir())
    ['0_t-shirt-top', '1_trouser']
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from simpool.data.fashion_mnist import FASHION_MNIST_CLASSES
from simpool.data.fashion_on_photos import render_fashion_on_photo

__all__ = ["image_folder_class_names", "write_image_folder"]

# ImageFolder split -> fashion-on-photos split (photo region and Fashion-MNIST set).
_RENDER_SPLIT = {"train": "train", "val": "test"}
# Rendering stops after this many samples per wanted image (a class has ~1/10 of the samples): a bound, not a guess.
_MAX_DRAWS_PER_IMAGE = 200


def image_folder_class_names(num_classes: int) -> list[str]:
    """Folder names of the first ``num_classes`` Fashion-MNIST classes: ``<label>_<name>``, sortable, no slash."""
    if not 1 <= num_classes <= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(FASHION_MNIST_CLASSES)}], got {num_classes}")
    return [f"{label}_{re.sub(r'[^a-z0-9]+', '-', name.lower())}"
            for label, name in enumerate(FASHION_MNIST_CLASSES[:num_classes])]


def write_image_folder(
    root: str | Path,
    per_class: int,
    num_classes: int = 2,
    size: int | tuple[int, int] = 224,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
    fashion_root: str | Path | None = None,
) -> dict[str, int]:
    """Write ``per_class`` JPEGs of each of the first ``num_classes`` classes into ``root/<split>/<class>/``.

    ``size`` is the side, or (height, width). Deterministic in ``seed``. Returns the number of images per split.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    unknown = sorted(set(splits) - set(_RENDER_SPLIT))
    if unknown:
        raise ValueError(f"splits must be among {sorted(_RENDER_SPLIT)}, got {unknown}")
    names = image_folder_class_names(num_classes)
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    written = {}
    for split in splits:
        counts = [0] * num_classes
        for folder in names:
            (Path(root) / split / folder).mkdir(parents=True, exist_ok=True)
        for index in range(_MAX_DRAWS_PER_IMAGE * per_class * num_classes):
            sample = render_fashion_on_photo(index, side, seed, _RENDER_SPLIT[split], fashion_root)
            if sample.label >= num_classes or counts[sample.label] == per_class:
                continue
            image = Image.fromarray(sample.image[top : top + height, left : left + width])
            image.save(Path(root) / split / names[sample.label] / f"{index:06d}.jpg", quality=90)
            counts[sample.label] += 1
            if min(counts) == per_class:
                break
        else:
            raise RuntimeError(f"found only {counts} images of classes {names} in {split}")
        written[split] = sum(counts)
    return written
