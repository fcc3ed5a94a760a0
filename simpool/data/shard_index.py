"""The shard index: where sample i of a split lies in its tar shards, read once at start-up instead of the tars.

Shards follow the WebDataset convention: sample ``k`` is the tar members ``<key>.<ext>`` (the image bytes as
stored: ``jpg``, ``png``, ...) and ``<key>.cls`` (its label as decimal text; absent when unlabelled). The index
(``index.json``, written by ``simpool-pack``) makes them map-style: one ``stat`` per shard and no tar header
read at start-up, one ``pread(offset, size)`` per sample afterwards.

Format (JSON, version 1)::

    {"format": "simpool-shards", "version": 1,
     "source": "ImageFolderDataset",           # what was packed: ImageFolderDataset | FileListDataset |
                                               # FashionMNIST | WebDataset (a fingerprint keeps its meaning)
     "classes": ["cat", "dog"],                # label i is classes[i]; null when unlabelled
     "splits": {"train": {
         "count": 2,
         "shards": [{"file": "train-000000.tar", "bytes": 10240, "mtime_ns": 1765..., "sha256": "...",
                     "samples": 2}],           # file relative to the index's folder
         "names": ["cat/1.jpg", "dog/7.png"],  # each sample's name in its source (fingerprint, messages)
         "labels": "<base64 int64>",           # little-endian arrays of `count` items each
         "shard": "<base64 int32>", "offset": "<base64 int64>", "size": "<base64 int64>"}}}

Base64 arrays keep the index of ImageNet-1k (1.28M samples) near 60 MB and parse in about a second; a JSON
list of numbers per sample would be three times the size and slower.

A shard whose size or modification time differs from the index was changed after packing: that is one
``DataError`` naming the shard and the fix (repack, or ``simpool-pack --verify INDEX`` after a copy that did
not keep times, which checks each shard's sha256 and records the new times).

Example::

    >>> index = read_index("/data/imagenet-shards/index.json")
    >>> split = index.splits["train"]
    >>> split.count, split.names[0], int(split.labels[0])
    (1281167, 'n01440764/n01440764_10026.JPEG', 0)
    >>> check_shards(index, "train")        # one stat per shard; DataError on a changed shard
"""

from __future__ import annotations

import base64
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simpool.data.paths import DataError

INDEX_FORMAT = "simpool-shards"
INDEX_VERSION = 1
SOURCE_KINDS = ("ImageFolderDataset", "FileListDataset", "FashionMNIST", "WebDataset")
# Extensions a WebDataset image member may have (what PIL decodes), in the order a sample's image is chosen.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
_ARRAYS = {"labels": "<i8", "shard": "<i4", "offset": "<i8", "size": "<i8"}


@dataclass
class ShardFile:
    """One tar shard as the index records it (``file`` relative to the index's folder)."""

    file: str
    bytes: int
    mtime_ns: int
    sha256: str | None
    samples: int


@dataclass
class SplitIndex:
    """Per-sample columns of one split: ``names[i]``, ``labels[i]``, and bytes ``[offset[i], offset[i] + size[i])``
    of shard ``shards[shard[i]]``."""

    shards: list[ShardFile]
    names: list[str]
    labels: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray

    @property
    def count(self) -> int:
        return len(self.names)


@dataclass
class ShardIndex:
    """A parsed index: where its shards live (``folder``), what was packed, the classes and the splits."""

    folder: Path
    source: str
    classes: list[str] | None
    splits: dict[str, SplitIndex] = field(default_factory=dict)
    path: Path | None = None  # the index file itself (None for shards read without one)

    def shard_path(self, shard: ShardFile) -> Path:
        return self.folder / shard.file


def encode_array(values, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def decode_array(text: str, dtype: str, count: int, where: str) -> np.ndarray:
    try:
        array = np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype)
    except (ValueError, TypeError) as error:
        raise DataError(f"{where} is not base64 of {dtype} numbers ({error}): the index is corrupt; repack") from None
    if len(array) != count:
        raise DataError(f"{where} holds {len(array)} numbers, not {count}: the index is corrupt; repack")
    return array


def index_to_json(index: ShardIndex) -> dict:
    splits = {}
    for name, split in index.splits.items():
        splits[name] = {
            "count": split.count,
            "shards": [vars(s) for s in split.shards],
            "names": list(split.names),
            **{column: encode_array(getattr(split, column), dtype) for column, dtype in _ARRAYS.items()},
        }
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "source": index.source, "classes": index.classes,
            "splits": splits}


def write_index(path: str | os.PathLike, index: ShardIndex) -> Path:
    """Write ``index`` to ``path`` atomically (a temporary name, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(index_to_json(index)) + "\n")
    os.replace(tmp, path)
    return path


def _split_from_json(entry: dict, where: str) -> SplitIndex:
    try:
        count = int(entry["count"])
        shards = [ShardFile(file=str(s["file"]), bytes=int(s["bytes"]), mtime_ns=int(s["mtime_ns"]),
                            sha256=s.get("sha256"), samples=int(s["samples"])) for s in entry["shards"]]
        names = [str(n) for n in entry["names"]]
        columns = {c: decode_array(entry[c], dtype, count, f"{where}.{c}") for c, dtype in _ARRAYS.items()}
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{where} lacks or mistypes {error}: the index is corrupt; repack") from None
    if len(names) != count or sum(s.samples for s in shards) != count:
        raise DataError(f"{where} counts {count} samples but lists {len(names)} names and "
                        f"{sum(s.samples for s in shards)} in its shards: the index is corrupt; repack")
    if count and not (0 <= columns["shard"].min() and columns["shard"].max() < len(shards)):
        raise DataError(f"{where} points at shards outside its list of {len(shards)}: the index is corrupt; repack")
    return SplitIndex(shards=shards, names=names, **columns)


def read_index(path: str | os.PathLike) -> ShardIndex:
    """Parse and check an index file written by ``simpool-pack``; a ``DataError`` names the file and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"shard index {path} does not exist: check --data_path (simpool-pack SRC OUT writes "
                        "OUT/index.json)")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read the shard index {path}: {error}; repack with simpool-pack") from None
    if not isinstance(payload, dict) or payload.get("format") != INDEX_FORMAT:
        raise DataError(f"{path} is not a simpool shard index (no \"format\": \"{INDEX_FORMAT}\"): pass the "
                        "index.json that simpool-pack wrote")
    if payload.get("version") != INDEX_VERSION:
        raise DataError(f"{path} is a version {payload.get('version')} shard index; this simpool reads version "
                        f"{INDEX_VERSION}: repack with this simpool's simpool-pack")
    source = payload.get("source")
    if source not in SOURCE_KINDS:
        raise DataError(f"{path} names an unknown source {source!r}: the index is corrupt; repack")
    classes = payload.get("classes")
    splits = {name: _split_from_json(entry, f"{path}: split {name!r}")
              for name, entry in (payload.get("splits") or {}).items()}
    if not splits:
        raise DataError(f"{path} holds no split: the index is corrupt; repack")
    return ShardIndex(folder=path.parent, source=source, classes=classes, splits=splits, path=path)


def check_shards(index: ShardIndex, split: str) -> None:
    """One ``stat`` per shard of ``split``: each must exist with the size and mtime the index recorded."""
    where = index.path or index.folder
    for shard in index.splits[split].shards:
        path = index.shard_path(shard)
        try:
            stat = path.stat()
        except OSError:
            raise DataError(f"shard {path} listed in {where} is missing: copy it back beside the index, "
                            "or repack with simpool-pack") from None
        if stat.st_size != shard.bytes:
            raise DataError(f"shard {path} has {stat.st_size} bytes but {where} recorded {shard.bytes}: it was "
                            "changed or truncated after packing; repack with simpool-pack SRC OUT")
        if stat.st_mtime_ns != shard.mtime_ns:
            raise DataError(f"shard {path} was modified after {where} was written (mtime differs): repack, or if "
                            f"you only copied the shards without their times, run simpool-pack --verify {where}")


# ---------------------------------------------------------------------------------------------------------
# tar members and brace patterns
# ---------------------------------------------------------------------------------------------------------
def tar_members(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in an uncompressed tar, in stored order."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError, EOFError) as error:
        raise DataError(f"{path} is not a readable uncompressed tar ({type(error).__name__}: {error}): "
                        "repack it with simpool-pack") from None


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..099}`` (zero-padded as written) and ``{a,b}`` like the shell and WebDataset do.

    Hand-written (a dozen lines) rather than a dependency for it.

    Example:
        >>> expand_braces("train-{00..02}.tar")
        ['train-00.tar', 'train-01.tar', 'train-02.tar']
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def index_from_tars(paths: list[str]) -> ShardIndex:
    """A 'train' split built by reading the tar headers and ``.cls`` members of ``paths`` (no index file).

    Costs one header read per member and one small read per label, in every process that calls it: what the
    index file exists to avoid. Samples are ordered as the shards list them; the names are the keys.
    """
    shards, names, labels, shard_ids, offsets, sizes = [], [], [], [], [], []
    for shard_id, path in enumerate(paths):
        stat = _stat_shard(path)
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in tar_members(path):
            key, ext = split_member_name(name)
            samples.setdefault(key, {})[ext] = (offset, size)
        with open(path, "rb") as f:
            for key, members in samples.items():
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if image_ext is None:
                    raise DataError(f"sample {key!r} of {path} has no image member (looked for "
                                    f".{', .'.join(IMAGE_EXTENSIONS)}): not an image shard")
                label = -1
                if "cls" in members:
                    offset, size = members["cls"]
                    label = _parse_label(os.pread(f.fileno(), size, offset), key, path)
                names.append(key)
                labels.append(label)
                shard_ids.append(shard_id)
                offsets.append(members[image_ext][0])
                sizes.append(members[image_ext][1])
        shards.append(ShardFile(file=os.path.abspath(path), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns,
                                sha256=None, samples=len(samples)))
    if not names:
        raise DataError(f"the shards {paths[0]} ... hold no samples: check --data_path")
    labelled = all(label >= 0 for label in labels)
    if not labelled and any(label >= 0 for label in labels):
        raise DataError(f"some samples of {paths[0]} ... have a .cls label and others none: label all or none")
    split = SplitIndex(shards=shards, names=names, labels=np.asarray(labels, dtype=np.int64),
                       shard=np.asarray(shard_ids, dtype=np.int32), offset=np.asarray(offsets, dtype=np.int64),
                       size=np.asarray(sizes, dtype=np.int64))
    classes = [str(i) for i in range(int(split.labels.max()) + 1)] if labelled else None
    return ShardIndex(folder=Path("/"), source="WebDataset", classes=classes, splits={"train": split})


def _stat_shard(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError:
        raise DataError(f"shard {path} does not exist: check the brace pattern in --data_path") from None


def _parse_label(raw: bytes, key: str, path: str) -> int:
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{key}.cls in {path} is not a decimal class number: {raw[:20]!r}") from None
    if label < 0:
        raise DataError(f"{key}.cls in {path} is negative ({label}): labels are 0, 1, ...")
    return label
