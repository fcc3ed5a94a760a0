"""A run's checkpoint: the file a relaunch resumes from, with its format marker, its fallbacks and its writes.

Every driver that can be stopped and relaunched (DINO pretraining, fine-tuning, the linear and segmentation
probes) keeps its whole state in one file in its output folder, through :class:`RunCheckpoint`:

* **format**: the state carries a marker (:class:`CheckpointFormat`: a key and a version); a file without the
  right one -- another tool's, another version's -- is refused with one line, never half-loaded;
* **reading** (:meth:`RunCheckpoint.read`): ``output_dir/<name>``, or ``--resume_from`` while that is missing or
  unreadable; an unreadable file stops the run naming the newest readable kept copy (``checkpointNNNN.pth``)
  and the ``--resume_from`` that continues from it. Nothing is written while reading;
* **writing** (:meth:`RunCheckpoint.write`): on rank 0, atomically (a kill mid-save leaves the previous file;
  :func:`simpool.checkpoint.atomic_save`), optionally also as a kept copy; the ranks meet afterwards.

What a resume must share with the run that wrote the file (weights, flags, data) is compared with
:mod:`simpool.run.resume_checks`.

Example:
    >>> run = RunCheckpoint("runs/ft", FINETUNE_FORMAT, resume_from=args.resume_from)
    >>> source, state = run.read()                  # (None, None) for a new run
    >>> run.write({"model": model.state_dict(), "epoch": 3}, keep_as="checkpoint_best.pth")
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simpool.checkpoint import CheckpointError, atomic_save, remove_stale_temp_files, safe_load
from simpool.distributed import barrier, is_main_process
from simpool.run.output import OutputFolder

__all__ = ["CheckpointFormat", "RunCheckpoint", "newest_readable_checkpoint", "unreadable_checkpoint_error"]

log = logging.getLogger(__name__)

_KEPT = re.compile(r"^checkpoint(\d{4,})\.pth$")


@dataclass(frozen=True)
class CheckpointFormat:
    """The marker ``{key: version}`` a tool's run checkpoints carry, and what to call them in messages."""

    key: str
    version: Any
    what: str  # e.g. "a DINO training checkpoint"

    def mark(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the marker first."""
        return {self.key: self.version, **state}

    def check(self, state: Any, path: str | os.PathLike) -> dict[str, Any]:
        """``state`` itself when it carries this marker; else a :class:`CheckpointError` naming what was found."""
        found = state.get(self.key) if isinstance(state, dict) else None
        if found != self.version:
            written = f"format {found}" if found is not None else "no format marker of this tool"
            raise CheckpointError(
                f"{path} is not {self.what} of this version ({written}; this version reads {self.version}): "
                "finish that run with the version that started it, or use another --output_dir"
            )
        return state


def newest_readable_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The kept ``checkpointNNNN.pth`` of ``folder`` with the highest NNNN that loads, and its content."""
    kept = sorted((p for p in folder.glob("checkpoint*.pth") if _KEPT.match(p.name)),
                  key=lambda p: int(_KEPT.match(p.name).group(1)), reverse=True)
    for path in kept:
        try:
            return path, safe_load(path)
        except CheckpointError:
            continue
    return None


def unreadable_checkpoint_error(path: Path, err: Exception) -> CheckpointError:
    """The error for a checkpoint that does not load: why, and which kept checkpoint to resume from."""
    size = path.stat().st_size if path.exists() else 0
    why = "it is empty (0 bytes)" if size == 0 else f"{err}".split("\n")[0][:300]
    found = newest_readable_checkpoint(path.parent)
    if found is None:
        fix = f"no readable checkpointNNNN.pth is kept in {path.parent}: move {path.name} away to start afresh"
    else:
        kept, state = found
        fix = (f"the newest readable kept checkpoint is {kept} (epoch {state.get('epoch', '?')}): relaunch with "
               f"--resume_from {kept}, or move {path.name} away to start afresh")
    return CheckpointError(f"cannot resume from {path}: {why}; {fix}")


class RunCheckpoint:
    """``output_dir/name``: the state a relaunch of the run resumes from."""

    def __init__(self, output_dir: str | os.PathLike, fmt: CheckpointFormat, name: str = "checkpoint.pth",
                 resume_from: str | os.PathLike | None = None) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / name
        self.format = fmt
        self.resume_from = Path(resume_from) if resume_from else None
        self.last_written: Path | None = None  # the last good checkpoint of this process's run

    def read(self) -> tuple[Path | None, dict[str, Any] | None]:
        """(source, state) to resume from: ``path``, or ``resume_from`` while ``path`` is missing or unreadable;
        (None, None) for a new run. The state's format marker is checked; nothing is written."""
        if self.resume_from is not None and not self.resume_from.is_file():
            raise CheckpointError(f"--resume_from {self.resume_from}: no such file")
        if self.path.is_file():
            try:
                state = safe_load(self.path)
            except CheckpointError as err:
                if self.resume_from is None:
                    raise unreadable_checkpoint_error(self.path, err) from None
                log.warning("%s is unreadable (%s): resuming from --resume_from %s", self.path,
                            str(err).split("\n")[0][:200], self.resume_from)
            else:
                if self.resume_from is not None:
                    log.warning("--resume_from %s ignored: %s is readable and newer in this run", self.resume_from,
                                self.path)
                return self._checked(self.path, state)
        if self.resume_from is None:
            return None, None
        try:
            state = safe_load(self.resume_from)
        except CheckpointError as err:
            raise unreadable_checkpoint_error(self.resume_from, err) from None
        return self._checked(self.resume_from, state)

    def _checked(self, source: Path, state: Any) -> tuple[Path, dict[str, Any]]:
        self.last_written = source
        return source, self.format.check(state, source)

    def prepare_folder(self) -> None:
        """Collective, before the run's first write: rank 0 creates the folder and takes its lock
        (:meth:`simpool.run.output.OutputFolder.claim`; a ConfigError when another run holds it), then removes the
        temporary files of saves a kill interrupted (safe now: no other run writes there)."""
        OutputFolder(self.folder).claim()
        if not is_main_process():
            return
        stale = remove_stale_temp_files(self.folder)
        if stale:
            log.info("removed %d temporary file(s) of interrupted saves: %s", len(stale),
                     ", ".join(p.name for p in stale))

    def write(self, state: dict[str, Any], keep_as: str | None = None) -> None:
        """Rank 0 writes the marked ``state`` atomically (and a kept copy ``keep_as`` beside it); every rank
        then meets at a barrier. A full disk or a missing permission raises ``CheckpointWriteError`` with the
        previous file unchanged."""
        if is_main_process():
            marked = self.format.mark(state)
            atomic_save(marked, self.path)
            if keep_as:
                atomic_save(marked, self.folder / keep_as)
        self.last_written = self.path
        barrier()
