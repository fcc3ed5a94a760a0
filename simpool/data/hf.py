"""Hugging Face datasets on disk, map-style: a folder written by ``save_to_disk`` or parquet files (optional
extra: ``pip install 'simpool[hf]'``). Nothing is fetched from the hub: only local files are read.

``--data_path`` forms:

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds ``state.json`` or
  ``dataset_dict.json``);
* parquet: one ``.parquet`` file (the 'train' split), or a folder of them named by split as the hub lays
  them out (``train-00000-of-00004.parquet``, ``validation-...``, ``test-...``; also in a ``data/`` subfolder).

Split 'val' is the data set's ``val``, else ``validation``, else ``test``. The image column is the one whose
feature is ``Image`` (or ``--image_column``), the label column the ``ClassLabel`` one, else ``label``
(or ``--label_column``); class names come from the ``ClassLabel`` feature, else labels are 0..max.

Images are read as their stored bytes (``Image(decode=False)``) and decoded by simpool's one sample path, so
an undecodable image is a counted, skipped :class:`~simpool.data.images.BadSample` as in a folder.

Example::

    >>> train = HFImageDataset.from_path("/data/food101_saved", "train", transform=augment)
    >>> image, label = train[0]; train.classes[label]
    'apple_pie'
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from simpool.data.images import BadSample, _warn_once, first_n_per_class, load_sample
from simpool.data.paths import DataError

VAL_SPLIT_NAMES = ("val", "validation", "test")
PIP_LINE = "pip install 'simpool[hf]'"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading a Hugging Face dataset needs the [hf] extra: {PIP_LINE}") from None
    return datasets


def is_saved_to_disk(path: str | os.PathLike) -> bool:
    folder = Path(path)
    return folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file())


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The parquet files ``path`` names (itself, or those in it or in its ``data/``), sorted; [] if none."""
    path = Path(path)
    if path.suffix == ".parquet":
        return [path]
    if path.is_dir():
        found = sorted(path.glob("*.parquet")) or sorted((path / "data").glob("*.parquet"))
        return found
    return []


def is_hf_source(data_path: str | os.PathLike) -> bool:
    return str(data_path).endswith(".parquet") or is_saved_to_disk(data_path) or bool(parquet_files(data_path))


def _split_of(file_name: str) -> str | None:
    for name in ("train", *VAL_SPLIT_NAMES):
        if file_name == name or file_name.startswith((f"{name}-", f"{name}_", f"{name}.")):
            return name
    return None


def load_splits(data_path: str | os.PathLike) -> dict:
    """{split name: datasets.Dataset} of a save_to_disk folder or of parquet files."""
    datasets = _datasets()
    path = Path(data_path).expanduser()
    if is_saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files = parquet_files(path)
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"--data_path {path} holds no parquet file and no save_to_disk dataset: check the path")
    if len(files) == 1 and path.suffix == ".parquet":
        return {"train": datasets.Dataset.from_parquet(str(files[0]))}
    by_split: dict[str, list[str]] = {}
    for file in files:
        split = _split_of(file.name)
        if split is None:
            raise DataError(f"{file} is not named by split (train-*.parquet, validation-*.parquet, test-*.parquet): "
                            "rename it, or pass one .parquet file as --data_path")
        by_split.setdefault(split, []).append(str(file))
    return {name: datasets.Dataset.from_parquet(names) for name, names in by_split.items()}


def _pick_split(splits: dict, split: str, data_path: str | os.PathLike):
    names = ("train",) if split == "train" else VAL_SPLIT_NAMES
    for name in names:
        if name in splits:
            return splits[name]
    raise DataError(f"{data_path} has no {' / '.join(names)} split (it has {sorted(splits)}): "
                    "save one under that name")


def _columns(dataset, image_column: str | None, label_column: str | None, where: str) -> tuple[str, str | None]:
    datasets = _datasets()
    features = dataset.features
    if image_column is None:
        images = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        if len(images) != 1:
            raise DataError(f"{where} has {len(images)} Image columns ({images or list(features)}): name the "
                            "image column with --image_column")
        image_column = images[0]
    elif image_column not in features:
        raise DataError(f"--image_column {image_column}: {where} has no such column (it has {list(features)})")
    if label_column is None:
        labels = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
        label_column = labels[0] if len(labels) == 1 else ("label" if "label" in features else None)
    elif label_column not in features:
        raise DataError(f"--label_column {label_column}: {where} has no such column (it has {list(features)})")
    return image_column, label_column


class HFImageDataset(Dataset):
    """One split of a Hugging Face dataset as ``(transform(rgb image), label)``; label -1 without a label column.

    Attributes as :class:`~simpool.data.images.ImageFolderDataset`: ``classes``, ``class_to_idx``, ``targets``.
    """

    source = "HFImageDataset"

    def __init__(self, table, transform: Callable | None = None, subset: int | None = None,
                 image_column: str | None = None, label_column: str | None = None, where: str = "dataset") -> None:
        datasets = _datasets()
        image_column, label_column = _columns(table, image_column, label_column, where)
        feature = table.features.get(label_column) if label_column else None
        self.targets = [int(v) for v in table[label_column]] if label_column else [-1] * len(table)
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
        elif label_column and self.targets:
            self.classes = [str(i) for i in range(max(self.targets) + 1)]
        else:
            self.classes = []
        rows = list(range(len(table)))
        if subset is not None and subset > 0:
            if not label_column:
                raise DataError(f"--subset needs class labels, and {where} has no label column: use --label_column")
            rows = first_n_per_class(self.targets, subset)
            self.targets = [self.targets[i] for i in rows]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        # stored bytes, decoded by load_sample: an undecodable image is a BadSample, not a crash in a worker
        self.table = table.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.rows, self.image_column, self.transform, self.where = rows, image_column, transform, where

    @classmethod
    def from_path(cls, data_path: str | os.PathLike, split: str = "train", **kwargs: Any) -> HFImageDataset:
        table = _pick_split(load_splits(data_path), split, data_path)
        return cls(table, where=f"{data_path} ({split})", **kwargs)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int] | BadSample:
        row = self.rows[index]
        stored = self.table[row][self.image_column] or {}
        name = f"row {row} of {self.where}"
        if stored.get("bytes") is not None:
            source = io.BytesIO(stored["bytes"])
        elif stored.get("path"):
            source = stored["path"]
        else:
            bad = BadSample(path=name, reason="the image cell is empty")
            _warn_once(bad)
            return bad
        return load_sample(source, self.targets[index], self.transform, None, name=name)
