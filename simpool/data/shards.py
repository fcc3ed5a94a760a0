"""Images in WebDataset tar shards, read map-style: sample i is one ``pread`` at the offset the index recorded.

Why map-style rather than streaming: the trainer's exact and elastic resume counts progress in samples of one
global permutation (``ResumableDistributedSampler``), and ``--subset``, bad-sample skipping, k-NN labels and
the data-set fingerprint all index samples. A streaming reader that only iterates would give that up.

Why our own tar offsets rather than the ``wids`` package: wids (0.1.11, last released 2025-02) finds a shard's
samples by scanning the tar in every process that opens it and keeps no per-sample index (names, labels,
offsets) that a start-up could check and subset without reading every shard.

Each process (loader worker) opens a shard on its first read of it, after the fork, and keeps at most
``max_open`` shards open (least recently used closed first). ``pread`` needs no seek, so nothing is shared.
A sample whose bytes do not decode, or that lies past the end of a shard truncated after packing, is a
:class:`~simpool.data.images.BadSample`, skipped and counted like an unreadable file of a folder.

Example::

    >>> train = ShardDataset.from_index("/data/imagenet-shards/index.json", "train", transform=augment)
    >>> image, label = train[0]
    >>> train.classes[label], train.names[0]
    ('n01440764', 'n01440764/n01440764_10026.JPEG')
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from simpool.data.images import BadSample, _warn_once, first_n_per_class, load_sample
from simpool.data.paths import DataError
from simpool.data.shard_index import ShardIndex, check_shards, expand_braces, index_from_tars, read_index


def is_shard_pattern(data_path: str | os.PathLike) -> bool:
    """``/data/train-{000000..000099}.tar`` or one ``.tar``: shards without an index."""
    return str(data_path).endswith(".tar")


def is_shard_index(data_path: str | os.PathLike) -> bool:
    """A ``.json`` file given as --data_path is a shard index (its format is checked when read)."""
    return str(data_path).endswith(".json")


class ShardDataset(Dataset):
    """One split of a shard index as a map-style data set of ``(transform(rgb image), label)``.

    Attributes match :class:`~simpool.data.images.ImageFolderDataset` where the meaning is the same:
    ``classes``, ``class_to_idx``, ``targets`` (labels, -1 when unlabelled), plus ``names`` (each sample's name
    in the packed source, e.g. its path relative to the ImageFolder) and ``source`` (what was packed).

    Args:
        index: a parsed index (:func:`simpool.data.shard_index.read_index`).
        split: 'train' or 'val'.
        transform: applied to the RGB PIL image.
        subset: keep the first ``subset`` samples of every class (index order, which is the source's order).
        max_open: shards kept open per process.
    """

    def __init__(self, index: ShardIndex, split: str = "train", transform: Callable | None = None,
                 subset: int | None = None, max_open: int = 64) -> None:
        if split not in index.splits:
            raise DataError(f"{index.path or 'the shards'} holds no {split!r} split (it has "
                            f"{sorted(index.splits)}): pack a root holding train/ and val/, or pass another index")
        check_shards(index, split)
        columns = index.splits[split]
        self.index, self.split, self.transform, self.max_open = index, split, transform, max_open
        self.source = index.source
        self.classes = list(index.classes) if index.classes is not None else []
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.shard_paths = [str(index.shard_path(s)) for s in columns.shards]
        keep = list(range(columns.count))
        if subset is not None and subset > 0:
            if index.classes is None:
                raise DataError(f"--subset needs class labels, and {index.path or 'these shards'} has none")
            keep = first_n_per_class(columns.labels.tolist(), subset)
        self.names = [columns.names[i] for i in keep]
        self.targets = columns.labels[keep].tolist()
        self._shard = columns.shard[keep]
        self._offset = columns.offset[keep]
        self._size = columns.size[keep]
        self._open: OrderedDict[int, int] = OrderedDict()  # shard id -> file descriptor, this process only
        self._pid = None

    @classmethod
    def from_index(cls, path: str | os.PathLike, split: str = "train", **kwargs: Any) -> ShardDataset:
        return cls(read_index(path), split, **kwargs)

    @classmethod
    def from_pattern(cls, pattern: str, split: str = "train", **kwargs: Any) -> ShardDataset:
        """Shards named by a brace pattern, without an index: their headers are read now (see ``index_from_tars``)."""
        if split != "train":
            raise DataError(f"{pattern} names shards without an index, which hold one split: for 'val' (k-NN, "
                            "linear probe, fine-tuning) pass the index.json simpool-pack writes")
        return cls(index_from_tars(expand_braces(pattern)), split, **kwargs)

    def __len__(self) -> int:
        return len(self.names)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker must not share its parent's descriptors' fate
            self._open, self._pid = OrderedDict(), os.getpid()
        fd = self._open.get(shard)
        if fd is None:
            fd = os.open(self.shard_paths[shard], os.O_RDONLY)
            self._open[shard] = fd
            if len(self._open) > self.max_open:
                os.close(self._open.popitem(last=False)[1])
        else:
            self._open.move_to_end(shard)
        return fd

    def read_bytes(self, index: int) -> bytes | BadSample:
        """The stored image bytes of sample ``index`` (a :class:`BadSample` when the shard cannot give them)."""
        shard, offset, size = int(self._shard[index]), int(self._offset[index]), int(self._size[index])
        name = f"{self.names[index]} in {self.shard_paths[shard]}"
        try:
            data = os.pread(self._fd(shard), size, offset)
        except OSError as error:
            return BadSample(path=name, reason=f"{type(error).__name__}: {error}")
        if len(data) != size:
            return BadSample(path=name, reason=f"the shard ends {size - len(data)} bytes early (truncated)")
        return data

    def __getitem__(self, index: int) -> tuple[Any, int] | BadSample:
        data = self.read_bytes(index)
        if isinstance(data, BadSample):
            _warn_once(data)
            return data
        name = f"{self.names[index]} in {self.shard_paths[int(self._shard[index])]}"
        return load_sample(io.BytesIO(data), self.targets[index], self.transform, None, name=name)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"], state["_pid"] = OrderedDict(), None  # descriptors do not travel to spawned workers
        return state

    def close(self) -> None:
        """Close the shards this process opened (also done when the data set is garbage-collected)."""
        if self._pid == os.getpid():
            for fd in self._open.values():
                os.close(fd)
        self._open = OrderedDict()

    def __del__(self, _getpid=os.getpid, _close=os.close) -> None:  # bound now: at exit the os module may be gone
        if getattr(self, "_pid", None) == _getpid():
            for fd in self._open.values():
                try:
                    _close(fd)
                except OSError:
                    pass
