"""Semantic segmentation data for the linear segmentation probe: ``(image (3, S, S), labels (S, S) int64)`` pairs.

Two sources, named by ``--data_path``:

* a VOC-style folder: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs: the palette
  *index* is the class, 255 is void / ignored), ``ImageSets/Segmentation/{train,val}.txt`` (the ids of each
  split). Class names come from ``classes.txt`` (one a line) when the folder has it, PASCAL VOC's 21 names
  when it has 21 classes, else ``class<i>``. The number of classes is ``classes.txt``'s length, else the
  largest label found in the masks + 1 (read once, before any model is built).
* ``fashion-on-photos:N``: N training images (the train half of the photos, Fashion-MNIST train items) and N
  validation images (the other half, test items) rendered on the fly, 11 classes: background + the 10
  Fashion-MNIST classes (:func:`simpool.data.fashion_on_photos.class_mask`). ``fashion-on-photos`` alone is 200.

Images are resized to S x S (``image_size``; bicubic, antialiased; the aspect ratio is not kept, so the
patch grid is the same for every image and features cache as one tensor) and normalised with the ImageNet
mean and std; masks are resized with nearest neighbours, so IoUs are measured at S x S.

Example::

    >>> train, val, classes = build_segmentation_splits("fashion-on-photos:64", image_size=96)
    >>> image, labels = train[0]; image.shape, labels.shape, classes[:2]
    (torch.Size([3, 96, 96]), torch.Size([96, 96]), ['background', 'T-shirt/top'])
    >>> train, val, classes = build_segmentation_splits("/data/VOCdevkit/VOC2012", image_size=448)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from simpool.data.every_item import open_rgb, reading_image
from simpool.data.fashion_on_photos import SEGMENTATION_CLASSES, class_mask, render_fashion_on_photo
from simpool.data.paths import DataError

__all__ = ["FASHION_ON_PHOTOS", "IGNORE_INDEX", "VOC_CLASSES", "FashionOnPhotosSegmentation",
           "SegmentationFolder", "build_segmentation_splits", "fashion_on_photos_count"]

IGNORE_INDEX = 255  # VOC's void label: left out of the loss and of the IoUs
FASHION_ON_PHOTOS = "fashion-on-photos"
DEFAULT_FASHION_COUNT = 200
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    if image.size != (size, size):
        image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.to_tensor(image), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def fashion_on_photos_count(data_path: str | os.PathLike) -> int | None:
    """``fashion-on-photos[:N]`` -> N (default 200); any other path -> None."""
    text = str(data_path)
    if text == FASHION_ON_PHOTOS:
        return DEFAULT_FASHION_COUNT
    if not text.startswith(FASHION_ON_PHOTOS + ":"):
        return None
    count = text[len(FASHION_ON_PHOTOS) + 1:]
    if not count.isdigit() or int(count) < 1:
        raise DataError(f"--data_path {text!r}: write fashion-on-photos:N with N a positive number of images")
    return int(count)


class FashionOnPhotosSegmentation(Dataset):
    """Samples 0 .. n-1 of the fashion-on-photos (seed, split) set with their per-class labels (11 classes)."""

    classes = list(SEGMENTATION_CLASSES)

    def __init__(self, n: int, image_size: int, split: str = "train", seed: int = 0) -> None:
        self.n, self.image_size, self.split, self.seed = n, image_size, split, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = render_fashion_on_photo(index, self.image_size, self.seed, self.split)
        return _to_tensor(Image.fromarray(sample.image), self.image_size), torch.from_numpy(class_mask(sample)).long()


def _read_labels(path: Path) -> np.ndarray:
    """The class index of every pixel of a label PNG (palette indices, or grey values)."""
    with reading_image(path) as mask:
        if mask.mode not in ("P", "L", "I", "I;16"):
            raise DataError(f"{path}: mask mode {mask.mode} is not a label image; save SegmentationClass masks as "
                            "palette (VOC) or greyscale PNGs whose values are the class indices")
        return np.asarray(mask).astype(np.int64)


class SegmentationFolder(Dataset):
    """One split of a VOC-style folder (see the module docstring), every image resized to ``image_size``."""

    def __init__(self, root: str | os.PathLike, split: str, image_size: int) -> None:
        self.root, self.split, self.image_size = Path(root), split, image_size
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        mask_dir = self.root / "SegmentationClass"
        if not list_file.is_file() or not mask_dir.is_dir() or not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{self.root} is not a VOC-style segmentation folder: expected JPEGImages/, "
                            f"SegmentationClass/ (palette PNGs) and {list_file.relative_to(self.root)} listing the "
                            f"{split} ids")
        self.ids = list_file.read_text().split()
        if not self.ids:
            raise DataError(f"{list_file} lists no ids")
        self.mask_paths = [mask_dir / f"{name}.png" for name in self.ids]
        missing = [str(path) for path in self.mask_paths if not path.is_file()]
        if missing:
            raise DataError(f"{len(missing)} ids of {list_file} have no mask, e.g. {missing[0]}")
        self.image_paths = [self._image_path(name) for name in self.ids]

    def _image_path(self, name: str) -> Path:
        for suffix in _IMAGE_SUFFIXES:
            if (path := self.root / "JPEGImages" / f"{name}{suffix}").is_file():
                return path
        raise DataError(f"id {name} has no image {self.root / 'JPEGImages' / name}.jpg (or .jpeg/.png)")

    def __len__(self) -> int:
        return len(self.ids)

    def max_label(self) -> int:
        """The largest class index in this split's masks, void (255) left out; reads every mask."""
        largest = 0
        for path in self.mask_paths:
            labels = _read_labels(path)
            valid = labels[labels != IGNORE_INDEX]
            largest = max(largest, int(valid.max()) if valid.size else 0)
        return largest

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = open_rgb(self.image_paths[index])
        labels = _read_labels(self.mask_paths[index])
        if labels.shape != (image.height, image.width):
            raise DataError(f"{self.mask_paths[index]}: mask {labels.shape} and image {(image.height, image.width)} "
                            "differ in size")
        mask = torch.from_numpy(labels)[None, None].float()
        mask = torch.nn.functional.interpolate(mask, size=(self.image_size, self.image_size), mode="nearest")
        return _to_tensor(image, self.image_size), mask[0, 0].long()


def _folder_classes(root: Path, splits: tuple[SegmentationFolder, ...]) -> list[str]:
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        largest = max(split.max_label() for split in splits)
        if largest >= len(names):
            raise DataError(f"masks of {root} hold label {largest} but {names_file} names {len(names)} classes: "
                            "add the missing names")
        return names
    count = max(split.max_label() for split in splits) + 1
    if count == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [f"class{i}" for i in range(count)]


def build_segmentation_splits(data_path: str | os.PathLike, image_size: int,
                              seed: int = 0) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names) of ``data_path`` (see the module docstring); a DataError names what is wrong."""
    if not data_path:
        raise DataError("--data_path is required: a VOC-style folder (JPEGImages/, SegmentationClass/, "
                        "ImageSets/Segmentation/{train,val}.txt) or fashion-on-photos:N")
    count = fashion_on_photos_count(data_path)
    if count is not None:
        if image_size < 16:
            raise DataError(f"--image_size {image_size}: fashion-on-photos renders images of 16 pixels or more")
        return (FashionOnPhotosSegmentation(count, image_size, "train", seed),
                FashionOnPhotosSegmentation(count, image_size, "test", seed), list(SEGMENTATION_CLASSES))
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"--data_path {str(root)!r} does not exist: pass a VOC-style folder or fashion-on-photos:N")
    train, val = SegmentationFolder(root, "train", image_size), SegmentationFolder(root, "val", image_size)
    return train, val, _folder_classes(root, (train, val))
