"""Where the images are: turn a user's ``--data_path`` into the folder of one split, or fail early.

Two layouts are in use and both are accepted:

* the SimPool fork's: ``--data_path /imagenet`` with ``/imagenet/train/<class>/*.JPEG`` and
  ``/imagenet/val/<class>/*.JPEG`` side by side;
* facebookresearch/dino's: ``--data_path /imagenet/train``, the training ImageFolder itself
  (there is no validation split to find then).

Every problem is reported as :class:`DataError` (a ``ValueError``) naming the path and the fix, before
any model is built, so a typo in a path costs seconds rather than a model build and a crash.

Example::

    >>> train_dir = resolve_split("/datasets/imagenet", "train")      # -> /datasets/imagenet/train
    >>> train_dir = resolve_split("/datasets/imagenet/train", "train")  # DINO layout -> same folder
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

SPLITS = ("train", "val")

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data source that cannot be used as given; the message names the path and the fix."""


def is_image_file(name: str) -> bool:
    """True for the file names torchvision's ImageFolder would load (case-insensitive extension)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def _walk(folder: str) -> Iterator[tuple[str, int, list[str]]]:
    """(folder, its mtime in ns, its sorted image file names) for ``folder`` and every folder below it, depth
    first; see :func:`image_folders`."""
    stack: list[tuple[str, tuple[tuple[tuple[int, int], str, bool], ...]]] = [(folder, ())]
    visited: set[tuple[int, int]] = set()
    repeated: list[str] = []
    while stack:
        path, chain = stack.pop()
        try:
            st = os.stat(path)
        except OSError as err:  # a dangling link, a folder removed meanwhile: os.walk skips those silently
            log.warning("skipping %s: %s", path, err.strerror)
            continue
        key = (st.st_dev, st.st_ino)
        ancestors = [k for k, _, _ in chain]
        if key in ancestors:
            cycle = chain[ancestors.index(key) + 1:] + ((key, path, os.path.islink(path)),)
            link = next((p for _, p, is_link in cycle if is_link), path)
            target = os.readlink(link) if os.path.islink(link) else os.path.realpath(link)
            raise DataError(f"{link} -> {target} leads back to a folder above it (a link loop: its images would be "
                            f"listed again and again, under the wrong class): remove that link")
        if key in visited:  # a second link to a folder listed already: its images once only
            repeated.append(path)
            continue
        visited.add(key)
        names, below = [], []
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.name.startswith("."):  # hidden: .ipynb_checkpoints, ._IMG.jpg (macOS), .cache ...
                        continue
                    try:
                        if entry.is_dir():
                            below.append((entry.is_symlink(), entry.path))
                        elif entry.is_file() and is_image_file(entry.name):
                            names.append(entry.name)
                    except OSError:
                        continue
        except OSError as err:
            log.warning("skipping %s: %s", path, err.strerror)
            continue
        yield path, st.st_mtime_ns, sorted(names)
        link_flag = os.path.islink(path)
        # popped in order, real folders before links: of two ways into a folder, its own path is the one listed
        stack.extend((p, (*chain, (key, path, link_flag))) for _, p in sorted(below, reverse=True))
    if repeated:
        log.warning("%s: %d linked folder(s) reached a second time were listed once only, e.g. %s", folder,
                    len(repeated), repeated[0])


def image_folders(folder: str | os.PathLike) -> list[tuple[str, int, list[str]]]:
    """Every folder at or below ``folder`` with its mtime (ns) and its sorted image file names, sorted by path.

    What ``sorted(os.walk(folder, followlinks=True))`` with torchvision's image filter gives, for the trees it
    handles (same path strings, same order), with the file system's traps closed: a linked folder is listed
    once (folders are told apart by device and inode, so a second way into one is skipped with a warning; of a
    folder and a link to it side by side, the folder's own path is kept), a link
    to a folder above it (a loop, e.g. ``train/tshirt/loop -> ..``, which os.walk follows ~40 levels deep, listing
    every image dozens of times under one class) is a :class:`DataError` naming the link, and hidden files and
    folders (``.ipynb_checkpoints``, macOS's ``._x.jpg``) are not images. Loops are refused rather than skipped:
    a tree with one is a mistake whose fix is the user's (remove the link); skipping it would train on a tree
    nobody meant.
    """
    return sorted(_walk(str(folder)))


def class_folder_names(folder: Path) -> list[str]:
    """Sorted names of the class subfolders of an ImageFolder, hidden folders excluded.

    Hidden folders (``.ipynb_checkpoints``, ``.cache``) are not classes: torchvision counts them and
    then fails on them or shifts every label after them.
    """
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _first_image_under(folder: Path) -> str | None:
    """Path of some image below ``folder`` (stops at the first one: cheap even on ImageNet)."""
    for dirpath, _mtime, names in _walk(str(folder)):
        if names:
            return os.path.join(dirpath, names[0])
    return None


def check_image_folder(folder: str | os.PathLike) -> Path:
    """Validate that ``folder`` is an ImageFolder (one subfolder per class, images inside); return it.

    Only the existence of one image is checked, so the cost does not grow with the data set.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist: check --data_path")
    if not folder.is_dir():
        raise DataError(
            f"{folder} is a file, not an image folder: pass a folder of class subfolders, "
            "or a .txt file listing one image path per line"
        )
    classes = class_folder_names(folder)
    if not classes:
        with os.scandir(folder) as entries:
            loose_images = any(e.is_file() and is_image_file(e.name) for e in entries)
        if loose_images:
            raise DataError(
                f"{folder} holds images directly, but an ImageFolder needs one subfolder per class: "
                f"move them into a subfolder (e.g. {folder / 'images'}) or list them in a .txt file"
            )
        raise DataError(f"{folder} holds no class subfolders and no images: check --data_path")
    if _first_image_under(folder) is None:
        raise DataError(
            f"{folder} has {len(classes)} class folder(s) but no image files "
            f"(looked for {', '.join(IMG_EXTENSIONS)}): check --data_path"
        )
    return folder


def resolve_split(data_path: str | os.PathLike, split: str) -> Path:
    """Folder holding ``split`` ('train' or 'val') of the ImageFolder data set at ``data_path``.

    Rule: if ``data_path/train/`` exists, ``data_path`` is the data set root (SimPool fork layout)
    and the split is ``data_path/<split>``; otherwise ``data_path`` is the training ImageFolder itself
    (DINO layout), which has no 'val' split. The chosen folder is checked with
    :func:`check_image_folder`.

    Raises:
        DataError: the path does not exist, is not a folder, has no images, or has no such split.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {SPLITS}")
    root = Path(data_path).expanduser()
    if not root.exists():
        raise DataError(
            f"--data_path {root} does not exist: pass the data set root holding train/ (and val/), "
            "or the training ImageFolder itself"
        )
    if not root.is_dir():
        raise DataError(
            f"--data_path {root} is a file: pass a folder, or a .txt file listing one image path per line"
        )
    if (root / "train").is_dir():
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(
                f"{root} holds train/ but no {split}/ folder: add {split_dir} (one subfolder per class, "
                "the same classes as train/)"
            )
        return check_image_folder(split_dir)
    if split == "train":
        return check_image_folder(root)
    hint = f"; its parent {root.parent} looks like one" if (root.parent / "val").is_dir() else ""
    raise DataError(
        f"--data_path {root} is a training ImageFolder (DINO layout) with no 'val' split: pass the "
        f"data set root that holds train/ and val/ side by side{hint}"
    )
