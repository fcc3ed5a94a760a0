"""Fashion-MNIST from the four IDX files, offline (the demo data set: real images, no download).

The Debian package ``dataset-fashion-mnist`` installs the files to ``/usr/share/datasets/fashion-mnist``.
They are read with numpy, not torchvision's downloader, which would try the network.

IDX format (big-endian): bytes 0-1 zero, byte 2 the element type (0x08 = uint8), byte 3 the number
of dimensions D, then D uint32 sizes, then the elements in C order. Images are (N, 28, 28) uint8,
labels (N,) uint8 in 0..9.

Example::

    >>> train = FashionMNIST(split="train")            # 60,000 images, PIL RGB 28x28
    >>> image, label = train[0]                        # label 9: "Ankle boot"
    >>> small = FashionMNIST(split="train", subset=100)  # first 100 images of each class
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from simpool.data.images import first_n_per_class
from simpool.data.paths import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Array stored in IDX bytes (read-only; shares memory with ``data``)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{source} is truncated inside its IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(data) - header_size != expected_bytes:
        raise DataError(
            f"{source} holds {len(data) - header_size} data bytes but its header {shape} needs "
            f"{expected_bytes}: the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)


@functools.lru_cache(maxsize=4)  # train + test images and labels: each file is read once per process
def read_idx_file(path: str) -> np.ndarray:
    """Array stored in an IDX file, gzip-compressed (``.gz``) or not."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {error}") from error
    return parse_idx(data, source=path)


def _find_idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{folder} has no {stem}.gz: it needs train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
    )


def load_fashion_mnist_arrays(
    root: str | os.PathLike | None = None, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of one split, read from ``root``."""
    if split not in _FILE_PREFIX:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    folder = Path(root).expanduser() if root is not None else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {folder} does not exist: install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or pass fashion-mnist:/folder "
            "holding the four *-ubyte.gz files"
        )
    prefix = _FILE_PREFIX[split]
    images_path = _find_idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx_file(str(images_path))
    labels = read_idx_file(str(labels_path))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{images_path} {images.shape} and {labels_path} {labels.shape} do not pair up as "
            "(N, H, W) images with N labels"
        )
    return images, labels.astype(np.int64)


class FashionMNIST(Dataset):
    """Fashion-MNIST split as a map-style data set of ``(image, label)``.

    Args:
        root: folder with the four IDX files; default ``/usr/share/datasets/fashion-mnist``.
        split: 'train' (60,000 images) or 'test' (10,000).
        transform: applied to the image. Without ``as_tensor`` the image is a 28x28 PIL 'RGB' image,
            so DINO's colour augmentations apply unchanged; resizing up is the transform's job.
        subset: keep the first ``subset`` images of every class (file order).
        limit: then keep only the first ``limit`` images.
        as_tensor: give a uint8 tensor (1, 28, 28) instead of a PIL image.

    Attributes: ``classes`` (names), ``class_to_idx``, ``targets`` (list of int), ``images``
    (uint8 array, read-only, shared with the other data sets built from the same file).
    """

    classes = list(FASHION_MNIST_CLASSES)
    class_to_idx = {name: index for index, name in enumerate(FASHION_MNIST_CLASSES)}

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable | None = None,
        subset: int | None = None,
        limit: int | None = None,
        as_tensor: bool = False,
    ) -> None:
        images, labels = load_fashion_mnist_arrays(root, split)
        if subset is not None and subset > 0:
            keep = first_n_per_class(labels.tolist(), subset)
            images, labels = images[keep], labels[keep]
        if limit is not None:
            if limit < 1:
                raise DataError(f"limit must be a positive number of images, got {limit}")
            images, labels = images[:limit], labels[:limit]
        self.split = split
        self.images = images
        self.targets = labels.tolist()
        self.transform = transform
        self.as_tensor = as_tensor

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        pixels = self.images[index]
        if self.as_tensor:
            image = torch.from_numpy(pixels.copy()).unsqueeze(0)  # copy: the source array is read-only
        else:
            image = Image.fromarray(pixels).convert("RGB")  # 2-D uint8 is mode "L"
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
