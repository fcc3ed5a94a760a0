"""One entry point from ``--data_path`` to a data set, for pretraining and for evaluation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from simpool.data import hf, shards
from simpool.data.fashion_mnist import FashionMNIST
from simpool.data.file_index import listed_image_folder
from simpool.data.images import FileListDataset, ImageFolderDataset
from simpool.data.paths import SPLITS, DataError, class_folder_names, resolve_split

FASHION_MNIST_SOURCE = "fashion-mnist"


@dataclass(frozen=True)
class SourceOptions:
    """How to read ``--data_path`` beyond the path itself.

    ``listing_dir``: an ImageFolder is listed once into this folder (the run's ``--output_dir``) and read from
    there by every rank and relaunch (:mod:`simpool.data.file_index`); None walks the tree in each process.
    ``rescan``: list the folder anew even if its list is up to date. ``image_column`` / ``label_column``:
    the columns of a Hugging Face dataset (auto-detected when None). ``log``: where the listing says what it did.
    """

    listing_dir: str | os.PathLike | None = None
    rescan: bool = False
    image_column: str | None = None
    label_column: str | None = None
    log: Callable[[str], None] | None = None


def _image_folder(folder: Path, transform: Callable | None, subset: int | None,
                  options: SourceOptions) -> ImageFolderDataset:
    if options.listing_dir is None:
        return ImageFolderDataset(folder, transform=transform, subset=subset)
    return listed_image_folder(folder, options.listing_dir, rescan=options.rescan, transform=transform,
                               subset=subset, log=options.log)


def _other_source(data_path: str | os.PathLike, split: str, transform: Callable | None, subset: int | None,
                  options: SourceOptions) -> Dataset | None:
    """A shard index, a brace pattern of shards or a Hugging Face dataset; None for any other path."""
    if shards.is_shard_index(data_path):
        return shards.ShardDataset.from_index(data_path, split, transform=transform, subset=subset)
    if shards.is_shard_pattern(data_path):
        return shards.ShardDataset.from_pattern(str(data_path), split, transform=transform, subset=subset)
    if hf.is_hf_source(data_path):
        return hf.HFImageDataset.from_path(data_path, split, transform=transform, subset=subset,
                                           image_column=options.image_column, label_column=options.label_column)
    return None


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
    options: SourceOptions | None = None,
) -> Dataset:
    """The data set ``data_path`` names, for ``split`` 'train' or 'val'.

    ``data_path`` is recognised as:

    * ``fashion-mnist`` or ``fashion-mnist:/some/folder``: :class:`FashionMNIST` from the Debian
      package's folder (or the given one); 'val' is its 10k test split. (To use a *folder* named
      ``fashion-mnist``, write ``./fashion-mnist``.)
    * a path ending in ``.txt``: :class:`FileListDataset`, one image path per line, unlabelled
      (label -1); only split 'train' and no ``subset`` (there are no classes to take a subset of).
    * a path ending in ``.json``: a shard index written by ``simpool-pack``
      (:class:`~simpool.data.shards.ShardDataset`; its 'train' and 'val' splits).
    * a path ending in ``.tar``, brace patterns allowed (``/data/train-{000000..000099}.tar``): WebDataset
      shards without an index, 'train' only (their headers are read at start-up).
    * a ``.parquet`` file, a folder of parquet files or a ``save_to_disk`` folder: a Hugging Face dataset
      (:class:`~simpool.data.hf.HFImageDataset`, the optional [hf] extra).
    * a folder: :class:`ImageFolderDataset` of ``resolve_split(data_path, split)``, i.e. either the
      root holding ``train/`` and ``val/`` (SimPool fork) or the training ImageFolder itself (DINO);
      listed once into ``options.listing_dir`` when given (:mod:`simpool.data.file_index`).

    ``subset`` keeps the first N images of every class. Errors are :class:`DataError` naming the path
    and the fix, raised here, before any model is built.

    Example::

        >>> train = build_dataset("/datasets/imagenet", "train", transform=augment, subset=260)
        >>> demo = build_dataset("fashion-mnist", "train", transform=augment)
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {SPLITS}")
    options = options or SourceOptions()
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
    other = _other_source(data_path, split, transform, subset, options)
    if other is not None:
        return other
    return _image_folder(resolve_split(data_path, split), transform, subset, options)


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
    options: SourceOptions | None = None,
) -> tuple[Dataset, Dataset]:
    """(train, val) labelled data sets for k-NN / linear evaluation, with the same label space.

    * ImageFolder root: ``train/`` and ``val/`` side by side (see :func:`resolve_split`); a
      :class:`DataError` names both folders and the differing classes when their classes differ.
    * ``fashion-mnist[:folder]``: its train (60k) and test (10k) splits.
    * a shard index (``index.json``) or a Hugging Face dataset holding both splits; the index's classes are
      shared by its splits, a Hugging Face dataset's val labels must lie among train's classes.

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
    options = options or SourceOptions()
    train = _other_source(data_path, "train", transform, subset, options)
    if train is not None:
        val = _other_source(data_path, "val", val_transform, val_subset, options)
        if train.classes and val.classes and list(train.classes) != list(val.classes):
            raise DataError(f"{data_path}: its train and val splits have different classes, so their labels "
                            "would not match: give both splits the same class names")
        if not train.classes:
            raise DataError(f"{data_path} is unlabelled: evaluation needs class labels")
        return train, val
    train_dir = resolve_split(data_path, "train")
    val_dir = resolve_split(data_path, "val")
    # Compare class folders before listing every file of both splits (minutes on ImageNet).
    _check_same_classes(train_dir, val_dir)
    train = _image_folder(train_dir, transform, subset, options)
    val = _image_folder(val_dir, val_transform, val_subset, options)
    return train, val


def dataset_fingerprint(dataset: Dataset) -> str:
    """A short hash of which samples ``dataset`` holds, in which order, independent of where it is stored.

    ImageFolder: the file paths relative to the root and their labels; a file list: the listed file names;
    anything else with ``targets`` (Fashion-MNIST, a Hugging Face dataset): its length and labels. A moved copy
    of the same data set (another --data_path on another node) has the same fingerprint; added, removed or
    renamed files change it. Shards packed by ``simpool-pack`` hash as the data set they were packed from (their
    index keeps each sample's name in its source), so a run may move from a folder to its shards and back;
    shards read without an index hash as "WebDataset" with their keys as names.

    Example:
        >>> fingerprint = dataset_fingerprint
        >>> fingerprint(build_dataset("/scratch/imagenet")) == fingerprint(build_dataset("/nfs/imagenet"))
        True
        >>> fingerprint(build_dataset("/imagenet")) == fingerprint(build_dataset("/shards/index.json"))
        True
    """
    kind = getattr(dataset, "source", type(dataset).__name__)  # packed data sets hash as what they hold
    digest = hashlib.sha1(f"{kind}:{len(dataset)}\n".encode())
    names = getattr(dataset, "names", None)
    if names is not None and kind in ("ImageFolderDataset", "WebDataset"):
        digest.update("\n".join(f"{name}\t{label}" for name, label in zip(names, dataset.targets)).encode())
    elif names is not None and kind == "FileListDataset":
        for name in names:
            digest.update(f"{os.path.basename(name)}\n".encode())
    elif hasattr(dataset, "samples") and hasattr(dataset, "root"):
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
