"""Reading for evaluations that score every item of a data set: an unreadable file stops the run with one line.

Pretraining and the k-NN / linear benchmarks skip an image that cannot be decoded and count it
(:func:`simpool.data.images.collate_skip_bad`). The other protocols cannot: revisited Oxford's mAP ranks a fixed
database, CorLoc and MaxBoxAccV2 divide by the number of images their ground truth lists, a DAVIS video needs
every frame. There a bad file is the user's to fix, and the evaluator says which in one :class:`DataError` line
(what it had saved stays on disk: feature caches and per-image results are reused by the rerun).

A data set's error raised in a ``DataLoader`` worker reaches the main process as the worker's whole traceback
(torch re-raises its type with the formatted traceback as the message). :func:`every_item` therefore has the
worker hand the error back as a value, and raises it again, one line, in the main process.

Example:
    >>> image = open_rgb("roxford5k/jpg/all_souls_000013.jpg")        # a PIL RGB image, or UnreadableImageError
    >>> for images, indices in every_item(dataset, batch_size=32, num_workers=8):
    ...     ...                                                        # a DataError of the data set: one line
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from simpool.data.images import DECODE_ERRORS, BadSample, load_rgb_image
from simpool.data.paths import DataError

__all__ = ["UnreadableImageError", "every_item", "open_rgb", "reading_image"]


class UnreadableImageError(DataError):
    """An image an evaluation needs cannot be decoded; the message names the file and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        message = str(path) if reason is None else (  # one argument: raised again from its message
            f"{path} cannot be read as an image ({reason}): this evaluation scores every image of the data set, so "
            "replace the file with a readable copy and rerun")
        super().__init__(message)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` fully decoded, in RGB (:func:`~simpool.data.images.load_rgb_image`), or
    :class:`UnreadableImageError` naming it."""
    image = load_rgb_image(str(path))
    if isinstance(image, BadSample):
        raise UnreadableImageError(image.path, image.reason)
    return image


@contextmanager
def reading_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open(path)`` for files read in their own mode (label PNGs): what PIL fails to decode in the block
    is an :class:`UnreadableImageError` naming the file; the block's own ``DataError`` passes unchanged."""
    try:
        with Image.open(path) as image:
            yield image
    except DataError:
        raise
    except DECODE_ERRORS as err:
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from None


@dataclass(frozen=True)
class _Failed:
    """A data set's ``DataError``, carried from a loader worker to the main process as a value."""

    kind: type
    message: str


class _Reporting(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DataError as err:
            return _Failed(type(err), str(err))


class _CollateUnlessFailed:
    """``collate_fn(items)``, or the first failure among them (a class, not a closure: workers may pickle it)."""

    def __init__(self, collate_fn: Callable[[list], Any]):
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> Any:
        return next((item for item in items if isinstance(item, _Failed)), None) or self.collate_fn(items)


def every_item(dataset: Dataset, *, collate_fn: Callable[[list], Any] = default_collate,
               **loader_kwargs: Any) -> Iterator[Any]:
    """The batches of ``DataLoader(dataset, collate_fn=collate_fn, **loader_kwargs)``; a ``DataError`` that
    ``dataset[i]`` raises (in any worker) is raised here, in the caller's process, with its own one-line message."""
    loader = DataLoader(_Reporting(dataset), collate_fn=_CollateUnlessFailed(collate_fn), **loader_kwargs)
    for batch in loader:
        if isinstance(batch, _Failed):
            raise batch.kind(batch.message)
        yield batch
