"""Write a data set into WebDataset tar shards and the index that makes them map-style (``simpool-pack``).

Sources: an ImageFolder (a root holding ``train/`` and ``val/``, or a training folder itself), a ``.txt`` file
list (unlabelled), or ``fashion-mnist[:folder]`` (train + test as 'val'). Sample ``i`` of split ``s`` becomes
``<i:09d>.<ext>`` (the file's bytes as stored, ``ext`` from its name: ``jpg``, ``png``, ...; Fashion-MNIST is
PNG-encoded) and ``<i:09d>.cls`` (decimal label) in ``OUT/<s>-<n:06d>.tar``, in the source's order, so an
index built from a folder has the folder's sample order, labels, classes and fingerprint.

A shard is closed before it would pass ``shard_bytes`` (or holds ``shard_samples``), written under a
temporary name, read back (every member's name, offset and bytes checked against what was written), hashed
(sha256) and only then renamed into place and recorded in ``OUT/.pack-state.json``. A rerun of the same
command verifies the recorded shards (sha256 and members) and continues after the last good one, so an
interrupted pack loses at most the shard in progress. ``OUT/index.json`` is written last.

Tar headers are deterministic (mtime 0, uid/gid 0, mode 0644): packing the same source twice gives the same
bytes. A source file that cannot be read is packed as an empty member (a counted, skipped sample at training,
as the unreadable file would be in the folder).

Example::

    >>> result = pack("/data/imagenet", "/scratch/imagenet-shards", shard_bytes=1 << 30)
    >>> result.index_path
    PosixPath('/scratch/imagenet-shards/index.json')
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from simpool.data.build import _check_same_classes, _fashion_mnist_root, _is_file_list
from simpool.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays
from simpool.data.images import ImageFolderDataset, read_file_list
from simpool.data.paths import DataError, class_folder_names, resolve_split
from simpool.data.shard_index import (
    ShardFile,
    ShardIndex,
    SplitIndex,
    read_index,
    tar_members,
    write_index,
)

STATE_NAME = ".pack-state.json"
_TAR_BLOCK = 512


@dataclass
class SourceSplit:
    """What to pack for one split: names, labels, and how to get sample i's bytes and extension."""

    names: list[str]
    labels: list[int]
    read: Callable[[int], bytes]
    extension: Callable[[int], str]


@dataclass
class Source:
    kind: str
    classes: list[str] | None
    splits: dict[str, SourceSplit]

    def identity(self) -> str:
        """A hash of every split's names and labels: a rerun must pack the same samples to keep its shards."""
        digest = hashlib.sha1(self.kind.encode())
        for name, split in self.splits.items():
            digest.update(f"\n{name}:{len(split.names)}\n".encode())
            digest.update("\n".join(f"{n}\t{label}" for n, label in zip(split.names, split.labels)).encode())
        return digest.hexdigest()


@dataclass
class PackResult:
    index_path: Path
    shards_written: int
    shards_kept: int
    samples: dict[str, int]
    unreadable: list[str] = field(default_factory=list)


def image_extension(file_name: str) -> str:
    """``photo.JPEG`` -> ``jpg``; other image extensions lowercased (WebDataset's decoders key on them)."""
    ext = os.path.splitext(file_name)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else (ext or "jpg")


def _file_reader(paths: list[str], unreadable: list[str]) -> Callable[[int], bytes]:
    def read(i: int) -> bytes:
        try:
            with open(paths[i], "rb") as f:
                return f.read()
        except OSError as error:
            unreadable.append(f"{paths[i]}: {error}")
            return b""
    return read


def _folder_split(folder: Path, unreadable: list[str]) -> SourceSplit:
    dataset = ImageFolderDataset(folder)
    prefix = str(dataset.root).rstrip(os.sep) + os.sep
    paths = [path for path, _ in dataset.samples]
    return SourceSplit(names=[p[len(prefix):] for p in paths], labels=list(dataset.targets),
                       read=_file_reader(paths, unreadable), extension=lambda i: image_extension(paths[i]))


def _png_reader(images: np.ndarray) -> Callable[[int], bytes]:
    def read(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(images[i]).save(buffer, format="PNG")  # lossless: the reader gets the same pixels
        return buffer.getvalue()
    return read


def open_source(src: str, unreadable: list[str]) -> Source:
    """The splits ``src`` holds, as ``build_dataset`` / ``build_labelled_splits`` would read them."""
    is_fashion, fashion_root = _fashion_mnist_root(src)
    if is_fashion:
        splits = {}
        for name, part in (("train", "train"), ("val", "test")):
            images, labels = load_fashion_mnist_arrays(fashion_root, part)
            splits[name] = SourceSplit(names=[str(i) for i in range(len(labels))], labels=labels.tolist(),
                                       read=_png_reader(images), extension=lambda i: "png")
        return Source("FashionMNIST", list(FASHION_MNIST_CLASSES), splits)
    if _is_file_list(src):
        paths = read_file_list(src)
        base = os.path.dirname(os.path.abspath(src))
        split = SourceSplit(names=[os.path.relpath(p, base) for p in paths], labels=[-1] * len(paths),
                            read=_file_reader(paths, unreadable), extension=lambda i: image_extension(paths[i]))
        return Source("FileListDataset", None, {"train": split})
    train_dir = resolve_split(src, "train")
    splits = {"train": _folder_split(train_dir, unreadable)}
    if (Path(src).expanduser() / "val").is_dir():
        val_dir = resolve_split(src, "val")
        _check_same_classes(train_dir, val_dir)
        splits["val"] = _folder_split(val_dir, unreadable)
    return Source("ImageFolderDataset", class_folder_names(train_dir), splits)


# ---------------------------------------------------------------------------------------------------------
# one shard
# ---------------------------------------------------------------------------------------------------------
def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _expected_members(split: SourceSplit, first: int, count: int) -> list[str]:
    names = []
    for i in range(first, first + count):
        names.append(f"{i:09d}.{split.extension(i)}")
        if split.labels[i] >= 0:
            names.append(f"{i:09d}.cls")
    return names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_back(path: Path, split: SourceSplit, first: int, count: int,
              digests: list[bytes] | None = None) -> list[tuple[int, int]]:
    """(offset, size) of each sample's image in a written shard, after checking its members are exactly the
    expected ones (and, with ``digests``, that each image's bytes hash as written). Raises DataError."""
    members = tar_members(path)
    expected = _expected_members(split, first, count)
    if [m[0] for m in members] != expected:
        raise DataError(f"{path} does not hold samples {first}..{first + count - 1} as packed")
    images = [(offset, size) for name, offset, size in members if not name.endswith(".cls")]
    if digests is not None:
        with open(path, "rb") as f:
            for (offset, size), digest in zip(images, digests):
                if hashlib.sha1(os.pread(f.fileno(), size, offset)).digest() != digest:
                    raise DataError(f"{path}: a member's bytes differ from what was written (disk error?)")
    return images


def write_shard(path: Path, split: SourceSplit, first: int, count: int,
                payloads: list[bytes]) -> tuple[ShardFile, list[tuple[int, int]]]:
    """Write samples ``first..first+count-1`` to ``path`` (temporary name, read back, hash, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, data in zip(range(first, first + count), payloads):
            tar.addfile(_tar_info(f"{i:09d}.{split.extension(i)}", len(data)), io.BytesIO(data))
            if split.labels[i] >= 0:
                label = str(split.labels[i]).encode()
                tar.addfile(_tar_info(f"{i:09d}.cls", len(label)), io.BytesIO(label))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    images = read_back(tmp, split, first, count, [hashlib.sha1(d).digest() for d in payloads])
    sha256 = _sha256(tmp)
    os.replace(tmp, path)
    stat = path.stat()
    return ShardFile(file=path.name, bytes=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=sha256,
                     samples=count), images


# ---------------------------------------------------------------------------------------------------------
# the whole pack, resumable
# ---------------------------------------------------------------------------------------------------------
def _read_state(out: Path, identity: dict) -> dict:
    path = out / STATE_NAME
    if not path.is_file():
        if (out / "index.json").exists():
            raise DataError(f"{out} holds an index.json but no {STATE_NAME}: it was not packed here by "
                            "simpool-pack; choose another OUT")
        return {"identity": identity, "splits": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path} ({error}): remove {out} and pack again") from None
    if state.get("identity") != identity:
        changed = [k for k in identity if state.get("identity", {}).get(k) != identity[k]]
        raise DataError(f"{out} holds a pack of another source or shard size (differs in: {', '.join(changed)}): "
                        "rerun with the same SRC and flags to continue it, or choose another OUT")
    return state


def _write_state(out: Path, state: dict) -> None:
    tmp = out / f"{STATE_NAME}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out / STATE_NAME)


def _verified_shards(out: Path, split: SourceSplit, recorded: list[dict]):
    """The recorded shards that still hash as packed, in order, up to the first that does not."""
    kept = []
    for entry in recorded:
        path = out / entry["file"]
        try:
            if not path.is_file() or _sha256(path) != entry["sha256"]:
                break
            images = read_back(path, split, entry["first"], entry["samples"])
        except DataError:
            break
        stat = path.stat()
        shard = ShardFile(file=entry["file"], bytes=stat.st_size, mtime_ns=stat.st_mtime_ns,
                          sha256=entry["sha256"], samples=entry["samples"])
        kept.append((entry, shard, images))
    return kept


def _pack_split(out: Path, split_name: str, split: SourceSplit, state: dict, limits: tuple[int, int],
                result: PackResult, bar: tqdm) -> SplitIndex:
    """Keep the verified shards of ``split`` already in ``out``, write the rest, return the split's columns."""
    shard_bytes, shard_samples = limits
    kept = _verified_shards(out, split, state["splits"].get(split_name, []))
    recorded = state["splits"][split_name] = [entry for entry, _, _ in kept]
    shards = [shard for _, shard, _ in kept]
    images = [image for _, _, shard_images in kept for image in shard_images]
    first = sum(shard.samples for shard in shards)
    result.shards_kept += len(shards)
    bar.update(first)
    _write_state(out, state)
    pending: list[bytes] = []
    used = 0
    for i in range(first, len(split.names) + 1):
        data = split.read(i) if i < len(split.names) else None
        need = 0 if data is None else _member_bytes(len(data)) + (_member_bytes(20) if split.labels[i] >= 0 else 0)
        # close the shard before it would pass a limit (the tar's 10 KiB end record comes on top), and at the end
        if pending and (data is None or used + need > shard_bytes or len(pending) >= shard_samples):
            shard, shard_images = write_shard(out / f"{split_name}-{len(shards):06d}.tar", split, first,
                                              len(pending), pending)
            shards.append(shard)
            images.extend(shard_images)
            recorded.append({"file": shard.file, "first": first, "samples": shard.samples, "sha256": shard.sha256})
            _write_state(out, state)
            result.shards_written += 1
            first, pending, used = first + len(pending), [], 0
        if data is not None:
            pending.append(data)
            used += need
            bar.update(1)
    return SplitIndex(shards=shards, names=list(split.names), labels=np.asarray(split.labels, dtype=np.int64),
                      shard=np.repeat(np.arange(len(shards), dtype=np.int32), [s.samples for s in shards]),
                      offset=np.asarray([o for o, _ in images], dtype=np.int64),
                      size=np.asarray([s for _, s in images], dtype=np.int64))


def pack(src: str, out: str | os.PathLike, shard_bytes: int = 1 << 30, shard_samples: int = 100_000,
         progress: bool | None = None, claim: Callable[[Path], Any] | None = None) -> PackResult:
    """Pack ``src`` into ``out`` (created if missing); resumable; returns where the index is and what was done.

    ``progress``: a tqdm bar on stderr (None: only on a terminal). ``claim``: called with ``out`` once the source
    is read, before anything is written (the command line takes the folder's lock there). Raises ``DataError``
    for a bad source or an ``out`` that holds another pack.
    """
    if shard_bytes < 4 * _TAR_BLOCK or shard_samples < 1:
        raise DataError(f"--shard_size must be at least 2 KiB and --shard_samples at least 1 "
                        f"(got {shard_bytes} bytes, {shard_samples} samples)")
    unreadable: list[str] = []
    source = open_source(src, unreadable)
    out = Path(out).expanduser()
    if claim is not None:
        claim(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"source": source.identity(), "shard_bytes": shard_bytes, "shard_samples": shard_samples}
    state = _read_state(out, identity)
    index = ShardIndex(folder=out, source=source.kind, classes=source.classes)
    result = PackResult(index_path=out / "index.json", shards_written=0, shards_kept=0, samples={})
    total = sum(len(s.names) for s in source.splits.values())
    disable = None if progress is None else not progress
    with tqdm(total=total, unit="img", desc=f"packing into {out}", disable=disable) as bar:
        for split_name, split in source.splits.items():
            index.splits[split_name] = _pack_split(out, split_name, split, state, (shard_bytes, shard_samples),
                                                   result, bar)
            result.samples[split_name] = len(split.names)
    write_index(out / "index.json", index)
    result.unreadable = unreadable
    return result


def verify_index(index_path: str | os.PathLike) -> tuple[int, int]:
    """Check every shard of an index against its recorded sha256 and sample layout; record the shards' current
    sizes and times (after a copy that did not keep them). Returns (shards checked, samples). Raises DataError."""
    index = read_index(index_path)
    shards = samples = 0
    for split_name, split in index.splits.items():
        for shard_id, shard in enumerate(split.shards):
            path = index.shard_path(shard)
            if not path.is_file():
                raise DataError(f"shard {path} listed in {index_path} is missing: copy it back or repack")
            if shard.sha256 is not None and _sha256(path) != shard.sha256:
                raise DataError(f"shard {path} does not hash as packed (sha256 differs): it was changed; repack")
            mine = np.flatnonzero(split.shard == shard_id)
            members = {offset: size for _, offset, size in tar_members(path)}
            if any(members.get(int(o)) != int(s) for o, s in zip(split.offset[mine], split.size[mine])):
                raise DataError(f"shard {path} does not hold its samples where {index_path} says: repack")
            stat = path.stat()
            shard.bytes, shard.mtime_ns = stat.st_size, stat.st_mtime_ns
            shards, samples = shards + 1, samples + len(mine)
        index.splits[split_name] = split
    write_index(index.path, index)
    return shards, samples
