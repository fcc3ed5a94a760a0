"""Per-item results of an evaluation run, kept as they are made so that a rerun skips the finished items.

An evaluator that scores images (or videos, or variants) one by one appends each item's record to its own
rank's file as soon as it is scored; a rerun -- after a kill, a preemption or on another number of processes --
reads every rank's file, and only the items not yet done are shared out again. What the results depend on
(the weights, the protocol's flags, the data) is written once as the run's *identity*; a rerun with another one
stops with one line naming the differences, instead of mixing two runs' items.

Files in ``folder``:

* ``<name>.identity.json``: the identity (written by rank 0, atomically, before any item);
* ``<name>.rank<R>.jsonl``: one JSON object per finished item, ``{"id": ..., **record}``, appended and flushed
  item by item. A line cut by a kill is ignored when read (that item is simply done again); when an id appears
  twice (a rerun redid it) the later line wins.

Example:
    >>> items = ItemResults("runs/loc", "localization", identity={"weights": "/w.pth", "thresholds": 100}).open()
    >>> for image_id in shard(items.todo(all_ids)):          # this rank's share of what is left
    ...     items.add(image_id, {"iou": 0.7})
    >>> records = items.gather()                              # every rank's records, by id (after a barrier)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from simpool.checkpoint import atomic_write_text
from simpool.distributed import barrier, get_rank, get_world_size, is_main_process
from simpool.run.resume_checks import changes, refuse_changes

__all__ = ["ItemResults", "shard"]


def shard(items: Sequence[Any], rank: int | None = None, world_size: int | None = None) -> Sequence[Any]:
    """This rank's share of ``items``: every ``world_size``-th item from position ``rank`` (all of them alone)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return items[rank::world_size]


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class ItemResults:
    """The finished items of one evaluation (``name``) in ``folder``, checked against its ``identity``.

    Call :meth:`open` on every rank (collective: it meets at a barrier); then :meth:`todo`, :meth:`add` and,
    after the last item, :meth:`gather` (collective too).
    """

    def __init__(self, folder: str | os.PathLike, name: str, identity: Mapping[str, Any]) -> None:
        self.folder, self.name = Path(folder), name
        self.identity = json.loads(json.dumps(dict(identity)))  # as it reads back: tuples become lists
        self.identity_path = self.folder / f"{name}.identity.json"
        self._file = None
        self._done: dict[str, dict[str, Any]] = {}

    # -- set-up -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse an identity other than the one recorded (no file is written; call it before building a model)."""
        if not self.identity_path.is_file():
            return
        try:
            saved = json.loads(self.identity_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.identity_path} is unreadable ({err}): move it away to start these results "
                             "afresh, or use another --output_dir") from None
        refuse_changes(self.folder, f"{self.name} results of another run",
                       changes(saved, self.identity, names=sorted(set(saved) | set(self.identity))))

    def open(self) -> ItemResults:
        """Check the identity, record it (rank 0) and read the items done so far (every rank)."""
        self.check()
        if is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self.identity_path.is_file():
                atomic_write_text(self.identity_path, json.dumps(self.identity, indent=2, sort_keys=True) + "\n")
        barrier()
        self._done = self._read_all()
        return self

    def _read_all(self) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        for path in sorted(self.folder.glob(f"{self.name}.rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed run
                    continue
                if isinstance(record, dict) and "id" in record:
                    done[str(record["id"])] = record
        return done

    # -- items --------------------------------------------------------------------------------------------
    @property
    def done(self) -> dict[str, dict[str, Any]]:
        """The records read by :meth:`open` plus this rank's since, by id."""
        return self._done

    def todo(self, ids: Iterable[Any]) -> list[Any]:
        """The ids (in their order) that no rank has finished yet: the same list on every rank."""
        return [i for i in ids if str(i) not in self._done]

    def add(self, item_id: Any, record: Mapping[str, Any]) -> None:
        """Record one finished item (appended and flushed at once: a kill loses at most this line)."""
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{self.name}.rank{get_rank()}.jsonl"
            self._file = path.open("a")
            if path.stat().st_size and not _ends_with_newline(path):
                self._file.write("\n")  # end a line cut by a kill, so that it does not swallow the next one
        entry = {"id": item_id, **record}
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self._done[str(item_id)] = json.loads(json.dumps(entry))

    def gather(self) -> dict[str, dict[str, Any]]:
        """Every rank's records by id, once all ranks are done (collective: a barrier, then the files)."""
        self.close()
        barrier()
        self._done = self._read_all()
        return self._done

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
