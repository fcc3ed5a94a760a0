"""Image files on disk: a labelled ImageFolder, an unlabelled file list, and bad-file handling.

A week-long pretraining run must not die on image 1,000,001 because one JPEG is truncated. Both data
sets here decode each file fully (``Image.load()``), and a file that fails to decode comes back as a
:class:`BadSample` marker instead of ``(image, label)``. :func:`collate_skip_bad` drops the markers
and counts them **inside the batch** (``CollatedBatch.num_skipped``, an int64 tensor), so the count
reaches the training loop through the DataLoader's normal result queue for any ``num_workers``:
sum it over the epoch and log it. Each bad file is named in one :class:`UnreadableImageWarning` per
process (workers are processes; ``persistent_workers=True`` keeps that to once per run).

PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone on purpose: setting it would silently
train on grey-padded half images instead of reporting them.

Example::

    >>> from torch.utils.data import DataLoader
    >>> dataset = ImageFolderDataset("/imagenet/train", transform=augment, subset=260)
    >>> loader = DataLoader(dataset, batch_size=64, num_workers=8, collate_fn=collate_skip_bad)
    >>> skipped = 0
    >>> for batch in loader:
    ...     skipped += int(batch.num_skipped)
    ...     if batch.images is None:      # every file in this batch was unreadable
    ...         continue
    ...     train_step(batch.images, batch.labels)
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import ImageFolder

from simpool.data.paths import DataError, check_image_folder, class_folder_names, image_folders

# What a failed decode raises in PIL: OSError (truncated data, unidentified format, missing file),
# SyntaxError (broken PNG chunks), ValueError/EOFError (bad headers), DecompressionBombError (absurd
# sizes). Anything else (e.g. a bug in the transform) is not a bad file and must surface.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and its sample was skipped."""


@dataclass(frozen=True)
class BadSample:
    """Marker a data set returns in place of ``(image, label)`` for a file that cannot be decoded."""

    path: str
    reason: str


class CollatedBatch(NamedTuple):
    """What :func:`collate_skip_bad` returns; unpacks as ``images, labels, num_skipped``.

    ``images`` is a tensor (B, C, H, W), or a list of such tensors when the transform returns a list
    of crops (multi-crop); ``images`` and ``labels`` are None when every sample of the batch was bad.
    """

    images: Any
    labels: torch.Tensor | None
    num_skipped: torch.Tensor


_warned_paths: set[str] = set()  # per process: each unreadable file is reported once


def _warn_once(bad: BadSample) -> None:
    if bad.path not in _warned_paths:
        _warned_paths.add(bad.path)
        warnings.warn(
            f"skipping unreadable image {bad.path}: {bad.reason}", UnreadableImageWarning, stacklevel=2
        )


# 16/32-bit integer grey modes: PIL's convert("RGB") clips them to 255 (an all-white image).
_WIDE_GREY_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a decoded PIL image; 16-bit grey (PNG) scaled to 8 bits (v * 255 / 65535), not clipped.

    Example:
        >>> to_rgb(Image.open("depth16.png")).getpixel((0, 0))   # 32768 -> (128, 128, 128)
    """
    if image.mode in _WIDE_GREY_MODES:
        # Hand-written because PIL has no 16 -> 8 bit scaling of its own (``convert`` clips).
        values = np.asarray(image, dtype=np.float64)
        top = _WIDE_GREY_MODES[image.mode]
        grey = np.clip(np.rint(values * 255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 (H, W): mode L
    return image.convert("RGB")


def load_rgb_image(source: str | BinaryIO, name: str | None = None) -> Image.Image | BadSample:
    """Decode ``source`` (a path, or a binary file object such as a tar member's bytes) completely into an RGB
    PIL image, or return a :class:`BadSample` named ``name`` (default: the path).

    ``Image.open`` only reads the header; ``load()`` decodes all pixel data and raises on a truncated
    file (as long as ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False, PIL's default). 16-bit grey PNGs are
    scaled to 8 bits (``to_rgb``).
    """
    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except DECODE_ERRORS as error:
        return BadSample(path=str(name if name is not None else source), reason=f"{type(error).__name__}: {error}")


def load_sample(
    source: str | BinaryIO,
    target: Any,
    transform: Callable | None,
    target_transform: Callable | None,
    name: str | None = None,
) -> tuple[Any, Any] | BadSample:
    """``(transform(rgb image), target_transform(target))`` of one stored image, or a warned :class:`BadSample`
    (the one sample path of every image data set: folders, lists, shards, Hugging Face datasets)."""
    image = load_rgb_image(source, name)
    if isinstance(image, BadSample):
        _warn_once(image)
        return image
    if transform is not None:
        image = transform(image)
    if target_transform is not None:
        target = target_transform(target)
    return image, target


def collate_skip_bad(
    samples: Sequence[tuple[Any, Any] | BadSample],
    collate: Callable[[list], tuple[Any, Any]] = default_collate,
) -> CollatedBatch:
    """Collate ``(image, label)`` samples with ``collate`` (``default_collate``) after dropping :class:`BadSample`.

    Runs inside the loader worker, so the number dropped travels with the batch as a 0-d int64
    tensor: ``sum(batch.num_skipped)`` over an epoch is the epoch's count of unreadable files for
    this process, whatever ``num_workers`` is. ``collate`` maps the good samples to ``(images, labels)``;
    a batched augmentation passes its own (e.g. padding images of different sizes into one tensor).
    """
    good = [s for s in samples if not isinstance(s, BadSample)]
    num_skipped = torch.tensor(len(samples) - len(good), dtype=torch.int64)
    if not good:
        return CollatedBatch(None, None, num_skipped)
    images, labels = collate(good)
    return CollatedBatch(images, labels, num_skipped)


def first_n_per_class(targets: Sequence[int], n: int) -> list[int]:
    """Indices of the first ``n`` samples of every class, in data set order (all of a smaller class).

    On an ImageFolder the order is sorted file names, so the choice is deterministic and equals the
    SimPool fork's ``--subset`` (which asserts every class has at least ``n`` images instead).
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise DataError(f"subset must be a positive number of images per class, got {n!r}")
    kept_per_class: dict[int, int] = {}
    keep = []
    for index, target in enumerate(targets):
        if kept_per_class.get(target, 0) < n:
            kept_per_class[target] = kept_per_class.get(target, 0) + 1
            keep.append(index)
    return keep


class ImageFolderDataset(ImageFolder):
    """torchvision ``ImageFolder`` (same class discovery and sample order) that survives bad files.

    Classes are the sorted non-hidden subfolders of ``root``; label i is the i-th class. A sample is
    ``(transform(rgb_image), label)``, or a :class:`BadSample` for a file that cannot be decoded (use
    :func:`collate_skip_bad`).

    Args:
        root: the ImageFolder of one split (see :func:`simpool.data.paths.resolve_split`).
        transform: applied to the RGB PIL image (e.g. DINO's multi-crop augmentation).
        target_transform: applied to the integer label.
        subset: keep only the first ``subset`` images of every class (sorted order); None or a
            value <= 0 keeps all, like the fork's default ``--subset -1``.
        listing: (classes, for each class the image paths relative to its folder, in the order a walk of
            ``root`` finds them; :mod:`simpool.data.file_index` keeps one per run): used instead of walking.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        subset: int | None = None,
        listing: tuple[list[str], list[list[str]]] | None = None,
    ) -> None:
        root = check_image_folder(root)
        self._listing = listing  # read by find_classes / make_dataset, which torchvision's __init__ calls
        try:
            super().__init__(str(root), transform=transform, target_transform=target_transform)
        except FileNotFoundError as error:  # e.g. a class folder without images
            raise DataError(f"cannot use {root} as an ImageFolder: {error}") from error
        self._listing = None  # now in self.samples; not carried twice to loader workers
        if subset is not None and subset > 0:
            keep = first_n_per_class(self.targets, subset)
            self.samples = [self.samples[i] for i in keep]
            self.targets = [self.targets[i] for i in keep]
            self.imgs = self.samples

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        listing = getattr(self, "_listing", None)
        classes = list(listing[0]) if listing is not None else class_folder_names(Path(directory))
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory: str, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        if self._listing is None:
            return self._walk(directory)
        classes, files = self._listing
        # concatenation, not os.path.join: the same strings (root has no trailing separator), 5x faster on 1M files
        return [(f"{directory}{os.sep}{name}{os.sep}{relative}", label)
                for label, (name, names) in enumerate(zip(classes, files)) for relative in names]

    @staticmethod
    def _walk(directory: str) -> list[tuple[str, int]]:
        """torchvision's samples (same paths, same order) through :func:`~simpool.data.paths.image_folders`: links
        followed once, loops refused, hidden files left out."""
        samples, empty = [], []
        for label, name in enumerate(class_folder_names(Path(directory))):
            found = [(os.path.join(folder, file), label)
                     for folder, _, files in image_folders(os.path.join(directory, name)) for file in files]
            if not found:
                empty.append(name)
            samples += found
        if empty:
            raise DataError(f"cannot use {directory} as an ImageFolder: the class folders {', '.join(empty[:10])} "
                            "hold no image: remove them or add images")
        return samples

    def __getitem__(self, index: int) -> tuple[Any, Any] | BadSample:
        path, target = self.samples[index]
        return load_sample(path, target, self.transform, self.target_transform)


def read_file_list(list_file: str | os.PathLike) -> list[str]:
    """Image paths listed in a text file: one per line, '#' comments and blank lines ignored,
    relative paths taken relative to the list file's folder."""
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise DataError(f"image list {list_file} does not exist: check --data_path")
    base = list_file.parent
    paths = []
    for line in list_file.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            paths.append(str(base / Path(entry).expanduser()))  # an absolute entry replaces base
    if not paths:
        raise DataError(f"image list {list_file} lists no images: write one image path per line")
    return paths


# A file list is checked entry by entry up to this many entries (one stat each, ~0.2 s on a local disk); a longer
# one through an even sample of that many (a stat per entry of a million-image list on a cluster file system is
# the metadata storm simpool.data.file_index exists to avoid).
LIST_CHECK_ENTRIES = 100_000


class MostlyUnreadableListWarning(UserWarning):
    """Most entries of a file list name no file: the run would skip (and count) most of its images."""


def check_file_list(list_file: str | os.PathLike, paths: Sequence[str]) -> None:
    """A :class:`DataError` when ``paths`` (read from ``list_file``) name a folder; a
    :class:`MostlyUnreadableListWarning` when most of them name no file (every entry up to
    :data:`LIST_CHECK_ENTRIES`, an even sample beyond)."""
    step = max(1, -(-len(paths) // LIST_CHECK_ENTRIES))
    checked = paths[::step]
    missing = []
    for path in checked:
        if os.path.isdir(path):
            raise DataError(f"{list_file} lists {path}, which is a folder: list image files, one per line (or pass "
                            "the folder itself as --data_path to read it as an ImageFolder)")
        if not os.path.isfile(path):
            missing.append(path)
    if len(missing) * 2 > len(checked):
        sample = f"of {len(checked)} checked entries" if step > 1 else f"of its {len(checked)} entries"
        warnings.warn(f"most of {list_file} is unreadable: {len(missing)} {sample} name no file, e.g. {missing[0]} "
                      f"(relative paths are taken relative to {Path(list_file).parent}); those images will be skipped",
                      MostlyUnreadableListWarning, stacklevel=2)


class FileListDataset(Dataset):
    """Unlabelled images named in a text file (one path per line); every label is -1.

    For pretraining on images that are not arranged in class folders. Up front, a listed folder is an error
    naming it, a missing first file too (a wrong base folder shows there), and a list most of whose entries name no
    file a warning (:func:`check_file_list`); a missing file later is a skipped :class:`BadSample` like any
    unreadable one.

    Example::

        >>> dataset = FileListDataset("/data/crawl/images.txt", transform=augment)
        >>> image, label = dataset[0]   # label == -1
    """

    def __init__(self, list_file: str | os.PathLike, transform: Callable | None = None) -> None:
        self.list_file = Path(list_file).expanduser()
        self.paths = read_file_list(self.list_file)
        self.transform = transform
        check_file_list(self.list_file, self.paths)
        if not os.path.isfile(self.paths[0]):
            raise DataError(
                f"{self.list_file} lists {self.paths[0]}, which does not exist: relative paths are "
                f"taken relative to {self.list_file.parent}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int] | BadSample:
        return load_sample(self.paths[index], -1, self.transform, None)
