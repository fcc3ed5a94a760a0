"""Features on disk by image id, so that an evaluator embeds each image once: reruns, other scales of the same
images, and a run killed half-way go on from what is there.

A cache lives in ``root/<name>-<key>/``, ``key`` a hash of its *identity* (the weights and everything else the
features depend on: image size, scale, crop); another identity is another folder, so runs with other flags keep
their own features side by side and never mix. The folder holds ``identity.json`` (checked on open: a cache whose
recorded identity differs is refused, naming the differences) and ``part-*.pt`` files, each ``{"ids": [...],
"features": (n, D) float32}``, written atomically every ``flush_rows`` rows by whichever rank made them and read
with ``torch.load(weights_only=True)``. A part cut by a kill is never seen (temporary name, then ``os.replace``).

Example:
    >>> cache = FeatureCache("runs/ret/features", "roxford5k-db-s1", {"weights": ..., "imsize": 224}).open()
    >>> todo = cache.missing(all_ids)                       # the same list on every rank
    >>> for ids, feats in my_batches(shard(todo)):
    ...     cache.add(ids, feats)
    >>> cache.gather()                                      # collective: every rank's parts, read back
    >>> features = cache.features(all_ids)                  # (N, D) in the order asked
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from simpool.checkpoint import atomic_save
from simpool.data.every_item import every_item
from simpool.distributed import barrier, get_rank, is_main_process
from simpool.run import changes, refuse_changes, shard, weights_identity
from simpool.run.process import data_errors_agreed

__all__ = ["FeatureCache", "fill_caches", "identity_key", "model_identity", "same_key_batches"]


def model_identity(model: torch.nn.Module, source: Mapping[str, Any], seed: int | None = None) -> dict[str, Any]:
    """What a model's features depend on: :func:`simpool.run.weights_identity` of its ``ModelSource.as_dict()``,
    the size and modification time of the weights file (a checkpoint retrained in place is another model), the
    architecture as built (``model.config()``) and, for random weights, their seed."""
    identity = {**weights_identity(source), "config": model.config() if hasattr(model, "config") else None}
    weights = source.get("weights")
    if weights:
        path = Path(weights)
        path = path / "model.safetensors" if path.is_dir() else path
        if path.is_file():
            stat = path.stat()
            identity.update(weights_bytes=stat.st_size, weights_mtime_ns=stat.st_mtime_ns)
    else:
        identity["seed"] = seed
    return identity


def identity_key(identity: Mapping[str, Any]) -> str:
    """12 hex digits naming an identity (JSON with sorted keys, SHA-1)."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


class FeatureCache:
    """Features of ``name`` (one split at one setting) under ``root``; see the module docstring."""

    def __init__(self, root: str | os.PathLike, name: str, identity: Mapping[str, Any], flush_rows: int = 4096):
        self.identity = json.loads(json.dumps(dict(identity), default=str))  # as it reads back
        self.folder = Path(root) / f"{name}-{identity_key(self.identity)}"
        self.flush_rows = flush_rows
        self._rows: dict[str, torch.Tensor] = {}
        self._pending_ids: list[str] = []
        self._pending: list[torch.Tensor] = []

    def open(self) -> FeatureCache:
        """Check the identity, record it (rank 0), read what is cached (every rank; collective)."""
        identity_path = self.folder / "identity.json"
        if identity_path.is_file():
            saved = json.loads(identity_path.read_text())
            refuse_changes(self.folder, "features of another setting",
                           changes(saved, self.identity, names=sorted(set(saved) | set(self.identity))),
                           fix="delete that folder to recompute them")
        elif is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = identity_path.with_name(f".identity.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.identity, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, identity_path)
        barrier()
        self._read_parts()
        return self

    def _read_parts(self) -> None:
        for path in sorted(self.folder.glob("part-*.pt")):
            part = torch.load(path, map_location="cpu", weights_only=True)
            for image_id, row in zip(part["ids"], part["features"], strict=True):
                self._rows[str(image_id)] = row

    def __len__(self) -> int:
        return len(self._rows)

    def missing(self, ids: Iterable[Any]) -> list[str]:
        """The ids (in their order) without cached features."""
        return [str(i) for i in ids if str(i) not in self._rows]

    def add(self, ids: Sequence[Any], features: torch.Tensor) -> None:
        """Keep rows for ``ids``; written to disk every ``flush_rows`` rows and by :meth:`flush`."""
        if len(ids) != features.shape[0]:
            raise ValueError(f"{len(ids)} ids for {features.shape[0]} feature rows")
        features = features.detach().float().cpu()
        for image_id, row in zip(ids, features, strict=True):
            self._rows[str(image_id)] = row
        self._pending_ids += [str(i) for i in ids]
        self._pending.append(features)
        if len(self._pending_ids) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending_ids:
            return
        path = self.folder / f"part-{get_rank()}-{uuid.uuid4().hex[:12]}.pt"
        atomic_save({"ids": self._pending_ids, "features": torch.cat(self._pending)}, path)
        self._pending_ids, self._pending = [], []

    def gather(self) -> FeatureCache:
        """Flush, wait for every rank, read every rank's parts (collective)."""
        self.flush()
        barrier()
        self._read_parts()
        return self

    def features(self, ids: Sequence[Any]) -> torch.Tensor:
        """(len(ids), D) float32 rows in the order of ``ids``; a KeyError names the first id not cached."""
        if not ids:
            return torch.zeros(0, 0)
        missing = self.missing(ids)
        if missing:
            raise KeyError(f"{len(missing)} ids have no features in {self.folder}, e.g. {missing[0]}")
        return torch.stack([self._rows[str(i)] for i in ids])


def same_key_batches(indices: Sequence[int], key: Callable[[int], Hashable], batch_size: int) -> list[list[int]]:
    """``indices`` cut into batches of at most ``batch_size`` whose items share ``key`` (e.g. the image size after
    resizing), in first-seen order of the keys, so that images of different sizes are never stacked together."""
    groups: dict[Hashable, list[int]] = {}
    for index in indices:
        groups.setdefault(key(index), []).append(index)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


@torch.no_grad()
def fill_caches(
    caches: Sequence[FeatureCache],
    dataset: Dataset,
    ids: Sequence[str],
    embed: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    device: torch.device,
    batch_size: int = 1,
    num_workers: int = 0,
    size_key: Callable[[int], Hashable] | None = None,
    desc: str = "features",
) -> None:
    """Embed the items of ``dataset`` (``dataset[i]`` is an image tensor, ``ids[i]`` its id) that some cache lacks,
    this rank's share of them, and put ``embed(images)[c]`` into ``caches[c]`` where it lacks them; then gather
    (collective). Pass only the caches that miss something, so that ``embed`` computes nothing already cached.

    Batches hold items of equal ``size_key`` (None: all items stack, e.g. a fixed square size).
    """
    missing = [set(cache.missing(ids)) for cache in caches]
    todo = [i for i, image_id in enumerate(ids) if any(image_id in m for m in missing)]
    mine = list(shard(todo))
    with data_errors_agreed():  # an unreadable image on one rank (sizes read too) stops every rank before the gather
        batches = same_key_batches(mine, size_key or (lambda _: 0), batch_size)
        loader = every_item(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda")
        with tqdm(total=len(mine), desc=desc, disable=not is_main_process() or not mine, leave=False) as bar:
            for batch, images in zip(batches, loader, strict=True):
                outputs = embed(images.to(device, non_blocking=True))
                for cache, wanted, features in zip(caches, missing, outputs, strict=True):
                    rows = [k for k, i in enumerate(batch) if ids[i] in wanted]
                    if rows:
                        cache.add([ids[batch[k]] for k in rows], features[rows])
                bar.update(len(batch))
    for cache in caches:
        cache.gather()
