"""A whole benchmark data root of fashion-on-photos, each data set in its authors' layout at the place
``configs/benchmark_paper.yaml`` looks for it:

* ``imagenet/{train,val}/<NN_class>/``: an ImageFolder of the nine IN-9 classes (k-NN, linear probe; the probe is
  then a 9-way one, which the IN-9 evaluator reads as the challenge's ``--in9`` models);
* ``CUB_200_2011/images/`` and ``ILSVRC/`` with ``wsolevaluation/metadata/{CUB,ILSVRC}/test/`` (localisation);
* ``VOCdevkit/VOC2007``, ``VOCdevkit/VOC2012`` (detection layout; object discovery);
* ``COCO/images/train2014``, ``COCO/annotations/instances_train2014.json`` and LOST's
  ``LOST/datasets/coco_20k_filenames.txt`` (object discovery);
* ``bg_challenge/<variant>/val/<NN_class>/`` (background robustness);
* ``revisitop/{roxford5k,rparis6k}/`` (image retrieval), ``copydays/`` with ``yfcc/{whitening,distractors}/``
  (copy detection), ``DAVIS/`` (video object segmentation): DINO's other evaluators.

Each data set has its own images (another seed or split). ``datasets`` writes only some of them.

Example::

    >>> write_benchmark_root("runs/gen", n=100)       # then: simpool-benchmark --data_root runs/gen ...
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from simpool.data.bg_challenge import IN9_CLASSES
from simpool.data.fashion_on_photos import render_fashion_on_photo
from simpool.data.generated.bg_challenge import write_bg_challenge
from simpool.data.generated.coco20k import write_coco20k
from simpool.data.generated.copydays import write_copydays_style
from simpool.data.generated.davis import write_davis_style
from simpool.data.generated.revisitop import write_revisitop_style
from simpool.data.generated.voc_detection import write_voc_detection
from simpool.data.generated.wsol import write_wsol

__all__ = ["DATASETS", "write_benchmark_root", "write_in9_image_folder"]

DATASETS = ("imagenet", "cub", "ilsvrc", "voc07", "voc12", "coco20k", "bg_challenge", "roxford5k", "rparis6k",
            "copydays", "davis")


def write_in9_image_folder(folder: str | Path, n_train: int, n_val: int, image_size: int = 56,
                           seed: int = 0) -> Path:
    """``folder/{train,val}/<NN_class>/*.JPEG``: the first fashion-on-photos samples of classes 0..8 (IN-9's nine
    folder names), ``ceil(n / 9)`` per class (every class in both splits), from the train and test splits."""
    folder = Path(folder)
    for split, render_split, n in (("train", "train", n_train), ("val", "test", n_val)):
        quota, counts, index = -(-n // len(IN9_CLASSES)), [0] * len(IN9_CLASSES), 0
        while min(counts) < quota:
            sample = render_fashion_on_photo(index, image_size, seed, render_split)
            if sample.label < len(IN9_CLASSES) and counts[sample.label] < quota:
                class_dir = folder / split / f"{sample.label:02d}_{IN9_CLASSES[sample.label]}"
                class_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(sample.image).save(class_dir / f"{split}_{index:05d}.JPEG", quality=95)
                counts[sample.label] += 1
            index += 1
    return folder


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(source), str(target))


def write_benchmark_root(root: str | Path, n: int = 100, n_train: int = 450, image_size: int = 96,
                         in9_size: int = 56, datasets: Iterable[str] | None = None) -> Path:
    """Write ``n`` images per evaluation data set (``n_train`` + ``n`` for ``imagenet``; ``n`` per IN-9 variant),
    ``image_size`` px high (``in9_size`` square for ``imagenet`` and ``bg_challenge``); returns ``root``."""
    root = Path(root)
    chosen = set(DATASETS if datasets is None else datasets)
    unknown = sorted(chosen - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown data sets {unknown}; choose from {', '.join(DATASETS)}")
    metadata = root / "wsolevaluation" / "metadata"
    if "imagenet" in chosen:
        write_in9_image_folder(root / "imagenet", n_train, n, in9_size, seed=1)
    for name, dataset, folder, seed in (("cub", "CUB", "CUB_200_2011/images", 0), ("ilsvrc", "ILSVRC", "ILSVRC", 1)):
        if name in chosen:
            scratch = root / f".{name}.tmp"
            images, split = write_wsol(scratch, n, image_size=image_size, seed=seed, dataset=dataset)
            _move(images, root / folder)
            _move(split, metadata / dataset / "test")
            shutil.rmtree(scratch)
    for name, year, seed in (("voc07", "2007", 0), ("voc12", "2012", 1)):
        if name in chosen:
            write_voc_detection(root, n, image_size=image_size, year=year, seed=seed)
    if "coco20k" in chosen:
        paths = write_coco20k(root / "COCO", n, image_size=image_size, seed=2)
        _move(paths["image_list"], root / "LOST" / "datasets" / "coco_20k_filenames.txt")
    if "bg_challenge" in chosen:
        write_bg_challenge(root / "bg_challenge", n_val=n, image_size=in9_size, seed=0)
    for name, seed in (("roxford5k", 0), ("rparis6k", 1)):
        if name in chosen:
            write_revisitop_style(root / "revisitop", name=name, long_side=image_size, seed=seed)
    if "copydays" in chosen:
        scratch = root / ".copydays.tmp"
        write_copydays_style(scratch, size=(image_size, round(image_size * 4 / 3)), seed=3)
        _move(scratch / "copydays", root / "copydays")
        for extra in ("whitening", "distractors"):
            _move(scratch / extra, root / "yfcc" / extra)
        shutil.rmtree(scratch)
    if "davis" in chosen:
        write_davis_style(root / "DAVIS", size=(image_size, round(image_size * 5 / 3)), seed=4)
    return root
