"""ImageNet-9 and its background variants as MadryLab/backgrounds_challenge distributes them (Xiao et al., ICLR 2021).

Layout: ``<root>/<variant>/val/<class folder>/<images>`` for the variants ``original`` (IN-9), ``only_fg``,
``mixed_same``, ``mixed_rand``, ``mixed_next``, ``no_fg``, ``only_bg_b``, ``only_bg_t``; nine class folders per
variant, ``00_dog`` ... ``08_fish``, read in sorted order as torchvision's ``ImageFolder`` (the challenge's
loader) reads them. A folder maps to a super-class when its name without the leading ``NN_`` is the class's name
or WordNet id (``dog`` / ``n02084071``); anything else is an error naming the folder.

Example::

    >>> variants = find_variants("/data/bg_challenge")             # {"original": Path(...), "mixed_rand": ...}
    >>> data = in9_folder(variants["mixed_rand"], transform)       # ImageFolder, targets 0..8 in IN9_CLASSES order
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets import ImageFolder

from simpool.data.every_item import open_rgb
from simpool.data.paths import DataError

__all__ = ["IN9_CLASSES", "IN9_VARIANTS", "IN9_WNIDS", "find_variants", "in9_folder"]

# backgrounds_challenge's in9_classes.txt: the nine super-classes in label order, with their WordNet ids.
IN9_CLASSES = ("dog", "bird", "vehicle", "reptile", "carnivore", "insect", "instrument", "primate", "fish")
IN9_WNIDS = ("n02084071", "n01503061", "n04576211", "n01661091", "n02075296", "n02159955", "n03800933",
             "n02469914", "n02512053")
IN9_VARIANTS = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "no_fg", "only_bg_b", "only_bg_t")


def find_variants(root: str | Path, variants: tuple[str, ...] | list[str] | None = None) -> dict[str, Path]:
    """``{variant: <root>/<variant>/val}`` for the variants present (all of ``variants`` when given, else any)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data_path {root} is not a folder: pass the bg_challenge folder holding original/, "
                        "mixed_rand/, ... (each with val/<class>/)")
    unknown = [v for v in variants or () if v not in IN9_VARIANTS]
    if unknown:
        raise DataError(f"--variants {', '.join(unknown)}: not an IN-9 variant; choose from {', '.join(IN9_VARIANTS)}")
    found = {v: root / v / "val" for v in (variants or IN9_VARIANTS) if (root / v / "val").is_dir()}
    if variants:
        lacking = [v for v in variants if v not in found]
        if lacking:
            raise DataError(f"--data_path {root} lacks {', '.join(f'{v}/val/' for v in lacking)}; unpack those "
                            "variants of the backgrounds challenge there, or leave them out of --variants")
    if not found:
        raise DataError(f"--data_path {root} holds none of {', '.join(f'{v}/val/' for v in IN9_VARIANTS)}: pass the "
                        "folder where the backgrounds challenge's release was unpacked")
    return found


def _class_of(folder: str) -> int | None:
    name = re.sub(r"^\d+[_-]", "", folder).lower()
    if name in IN9_CLASSES:
        return IN9_CLASSES.index(name)
    if name in IN9_WNIDS:
        return IN9_WNIDS.index(name)
    return None


def in9_folder(path: str | Path, transform: Callable | None = None) -> ImageFolder:
    """One variant's ``val/`` folder as an ImageFolder whose targets are the IN-9 labels (0 dog ... 8 fish)."""
    path = Path(path)
    folders = sorted(p.name for p in path.iterdir() if p.is_dir())
    classes = [_class_of(f) for f in folders]
    bad = [f for f, c in zip(folders, classes, strict=True) if c is None]
    if bad:
        raise DataError(f"{path}/{bad[0]}: a class folder that is no IN-9 class; name the nine folders 00_dog, "
                        "01_bird, ..., 08_fish as the backgrounds challenge's release does")
    if not classes or len(set(classes)) != len(classes):
        raise DataError(f"{path} holds the class folders {folders}: expected the nine IN-9 classes, each once "
                        f"({', '.join(IN9_CLASSES)})")
    try:
        data = ImageFolder(str(path), transform=transform, loader=open_rgb)  # a bad file: one line
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{path}: {err}") from None
    # ImageFolder numbers the sorted folders; relabel by the class each folder names.
    relabel = {index: classes[folders.index(name)] for name, index in data.class_to_idx.items()}
    data.samples = [(file, relabel[target]) for file, target in data.samples]
    data.targets = [target for _, target in data.samples]
    data.imgs = data.samples
    data.classes = list(IN9_CLASSES)
    return data
