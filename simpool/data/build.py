"""One entry point from ``--data_path`` to a data set, for pretraining and for evaluation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from simpool.data.fashion_mnist import FashionMNIST
from simpool.data.images import FileListDataset, ImageFolderDataset
from simpool.data.paths import SPLITS, DataError, class_folder_names, resolve_split

FASHION_MNIST_SOURCE = "fashion-mnist"


def _fashion_mnist_root(data_path: str | os.PathLike) -> tuple[bool, str | None]:
    """(is this the Fashion-MNIST source, its folder or None for the Debian default)."""
    text = str(data_path)
    if text == FASHION_MNIST_SOURCE:
        return True, None
    if text.startswith(FASHION_MNIST_SOURCE + ":"):
        return True, text[len(FASHION_MNIST_SOURCE) + 1 :] or None
    return False, None


def _is_file_list(data_path: str | os.PathLike) -> bool:
    return str(data_path).lower().endswith(".txt")


def build_dataset(
    data_path: str | os.PathLike,
    split: str = "train",
    transform: Callable | None = None,
    subset: int | None = None,
) -> Dataset:
    """The data set ``data_path`` names, for ``split`` 'train' or 'val'.

    ``data_path`` is recognised as:

    * ``fashion-mnist`` or ``fashion-mnist:/some/folder``: :class:`FashionMNIST` from the Debian
      package's folder (or the given one); 'val' is its 10k test split. (To use a *folder* named
      ``fashion-mnist``, write ``./fashion-mnist``.)
    * a path ending in ``.txt``: :class:`FileListDataset`, one image path per line, unlabelled
      (label -1); only split 'train' and no ``subset`` (there are no classes to take a subset of).
    * a folder: :class:`ImageFolderDataset` of ``resolve_split(data_path, split)``, i.e. either the
      root holding ``train/`` and ``val/`` (SimPool fork) or the training ImageFolder itself (DINO).

    ``subset`` keeps the first N images of every class. Errors are :class:`DataError` naming the path
    and the fix, raised here, before any model is built.

    Example::

        >>> train = build_dataset("/datasets/imagenet", "train", transform=augment, subset=260)
        >>> demo = build_dataset("fashion-mnist", "train", transform=augment)
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {SPLITS}")
    is_fashion_mnist, fashion_root = _fashion_mnist_root(data_path)
    if is_fashion_mnist:
        fashion_split = "train" if split == "train" else "test"
        return FashionMNIST(fashion_root, split=fashion_split, transform=transform, subset=subset)
    if _is_file_list(data_path):
        if split != "train":
            raise DataError(
                f"{data_path} is an unlabelled image list: it can only be the 'train' split; for "
                f"'{split}' pass an ImageFolder root holding train/ and val/"
            )
        if subset is not None and subset > 0:
            raise DataError(f"--subset needs class labels, and the image list {data_path} has none")
        return FileListDataset(data_path, transform=transform)
    folder = resolve_split(data_path, split)
    return ImageFolderDataset(folder, transform=transform, subset=subset)


def _check_same_classes(train_dir: Path, val_dir: Path) -> None:
    """Raise unless both split folders have the same class subfolders (labels would not match)."""
    train_classes, val_classes = class_folder_names(train_dir), class_folder_names(val_dir)
    if train_classes == val_classes:
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    raise DataError(
        f"{train_dir} and {val_dir} have different class folders, so their labels would not match "
        f"(only in {train_dir.name}/: {only_train[:10]}; only in {val_dir.name}/: {only_val[:10]}): "
        "give both splits the same class subfolders"
    )


def build_labelled_splits(
    data_path: str | os.PathLike,
    transform: Callable | None = None,
    val_transform: Callable | None = None,
    subset: int | None = None,
    val_subset: int | None = None,
) -> tuple[Dataset, Dataset]:
    """(train, val) labelled data sets for k-NN / linear evaluation, with the same label space.

    * ImageFolder root: ``train/`` and ``val/`` side by side (see :func:`resolve_split`); a
      :class:`DataError` names both folders and the differing classes when their classes differ.
    * ``fashion-mnist[:folder]``: its train (60k) and test (10k) splits.

    ``val_transform`` defaults to ``transform`` (k-NN uses one transform for both); ``subset`` and
    ``val_subset`` keep the first N images per class of each split.

    Example::

        >>> train, val = build_labelled_splits("/datasets/imagenet", transform=eval_transform)
    """
    if val_transform is None:
        val_transform = transform
    if _is_file_list(data_path):
        raise DataError(
            f"{data_path} is an unlabelled image list: evaluation needs labelled train/ and val/ "
            "class folders (an ImageFolder root) or fashion-mnist"
        )
    is_fashion_mnist, fashion_root = _fashion_mnist_root(data_path)
    if is_fashion_mnist:
        train = FashionMNIST(fashion_root, split="train", transform=transform, subset=subset)
        val = FashionMNIST(fashion_root, split="test", transform=val_transform, subset=val_subset)
        return train, val
    train_dir = resolve_split(data_path, "train")
    val_dir = resolve_split(data_path, "val")
    # Compare class folders before listing every file of both splits (minutes on ImageNet).
    _check_same_classes(train_dir, val_dir)
    train = ImageFolderDataset(train_dir, transform=transform, subset=subset)
    val = ImageFolderDataset(val_dir, transform=val_transform, subset=val_subset)
    return train, val


def dataset_fingerprint(dataset: Dataset) -> str:
    """A short hash of which samples ``dataset`` holds, in which order, independent of where it is stored.

    ImageFolder: the file paths relative to the root and their labels; a file list: the listed file names;
    anything else with ``targets`` (Fashion-MNIST): its length and labels. A moved copy of the same data set
    (another --data_path on another node) has the same fingerprint; added, removed or renamed files change it.

    Example:
        >>> fingerprint = dataset_fingerprint
        >>> fingerprint(build_dataset("/scratch/imagenet")) == fingerprint(build_dataset("/nfs/imagenet"))
        True
    """
    digest = hashlib.sha1(f"{type(dataset).__name__}:{len(dataset)}\n".encode())
    if hasattr(dataset, "samples") and hasattr(dataset, "root"):
        prefix = str(dataset.root).rstrip(os.sep) + os.sep
        lines = (f"{path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, prefix)}\t{label}"
                 for path, label in dataset.samples)  # slicing, not relpath: ImageNet has 1.28M files
        digest.update("\n".join(lines).encode())
    elif hasattr(dataset, "paths"):
        for path in dataset.paths:
            digest.update(f"{os.path.basename(path)}\n".encode())
    elif hasattr(dataset, "targets"):
        digest.update(",".join(map(str, dataset.targets)).encode())
    return digest.hexdigest()[:16]
