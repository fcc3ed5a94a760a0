"""A driver's output folder: checked before the work, locked from the first write (what every driver calls).

:class:`OutputFolder` is the one way for a driver to own its ``--output_dir`` (or any folder it writes):

* :meth:`OutputFolder.check` -- after ``start_process``, before any model is built or feature extracted: the
  folder (or, when it does not exist yet, its nearest existing parent) is not a file nor below one, really
  accepts a file (one is created and removed there: permissions, read-only mounts, ``chattr +i``, ``/proc``),
  and has ``need_bytes`` free (one checkpoint: :func:`float32_bytes` of what it holds). A folder that exists
  is locked now (:mod:`simpool.run.lock`), before the driver writes anything into it (file lists included);
* :meth:`OutputFolder.claim` -- just before the run's first write: the folder is created (with its parents)
  and locked if it was not yet, so that a run refused for bad input leaves nothing behind.

Both are collective under torchrun: rank 0 checks and locks, every rank raises rank 0's error (a
:class:`~simpool.run.config.ConfigError`, exit 2), so the ranks leave together. The lock is held by rank 0's
process until it ends (:func:`simpool.run.lock.release_folders` at the end of the driver).

Example:
    >>> dist_info = start_process(args.dist_url)
    >>> output = OutputFolder(args.output_dir, need_bytes=float32_bytes(model_parameters * 4)).check()
    >>> ...                                      # read data, build the model: nothing written yet
    >>> output.claim()                           # creates and locks runs/x; then the checkpoints, logs...
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from simpool.distributed import broadcast_from_rank_0, is_main_process
from simpool.run.config import ConfigError
from simpool.run.lock import FolderInUse, lock_folder

__all__ = ["MIN_FREE_BYTES", "OutputFolder", "check_output_folder", "float32_bytes", "format_bytes"]

# What a folder of small result files (JSON, logs, figures) needs at least.
MIN_FREE_BYTES = 1 << 20


def float32_bytes(num_values: int) -> int:
    """Bytes of ``num_values`` float32 numbers plus 1 MiB for the rest of a file (keys, pickling, small state)."""
    return 4 * int(num_values) + MIN_FREE_BYTES


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def _nearest_existing(path: Path, flag: str, fix: str) -> Path:
    """``path`` or its nearest existing parent; a ConfigError when that is a file (the path is below a file)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is below {candidate}, which is a file"
                raise ConfigError(f"{flag} {path} {where}, not a folder: {fix}")
            return candidate
    return Path.cwd()


def check_output_folder(path: str | os.PathLike, need_bytes: int = MIN_FREE_BYTES, flag: str = "--output_dir",
                        fix: str | None = None) -> None:
    """Raise :class:`ConfigError` (one line naming ``flag`` and the fix) when ``path`` cannot take a run's output:
    a file or a path below one, a folder where no file can be created, or less than ``need_bytes`` free.
    ``fix`` says what to do instead (default: "use another <flag>").

    Local (no process group): :meth:`OutputFolder.check` calls it on rank 0.
    """
    fix = fix or f"use another {flag}"
    path = Path(path).expanduser()
    existing = _nearest_existing(path, flag, fix)
    # Permission bits do not tell (root, ACLs, read-only mounts, chattr +i, /proc): create a file and remove it.
    probe = existing / f".simpool-write-test.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == path else f" (the nearest existing folder of {path})"
        raise ConfigError(f"{flag} {path}: cannot write in {existing}{where}: {err.strerror}; make it writable or "
                          f"{fix}") from None
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if free < need_bytes:
        raise ConfigError(f"{flag} {path}: {format_bytes(free)} free on its file system, and what this run writes "
                          f"there needs about {format_bytes(need_bytes)}: free space there or {fix}")


class OutputFolder:
    """The folder a run writes: :meth:`check` before the work, :meth:`claim` at the first write (collective)."""

    def __init__(self, path: str | os.PathLike, need_bytes: int = MIN_FREE_BYTES, flag: str = "--output_dir",
                 fix: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.need_bytes = int(need_bytes)
        self.flag = flag
        self.fix = fix

    def _on_rank_0(self, action) -> None:
        """Run ``action`` on rank 0 and raise its ConfigError on every rank."""
        failure = None
        if is_main_process():
            try:
                action()
            except ConfigError as err:
                failure = (isinstance(err, FolderInUse), str(err))
        failure = broadcast_from_rank_0(failure)
        if failure is not None:
            in_use, message = failure
            raise (FolderInUse if in_use else ConfigError)(message)

    def check(self, lock: bool = True) -> OutputFolder:
        """Collective: the checks of :func:`check_output_folder`, and the lock of a folder that exists (unless
        ``lock`` is False: a folder the run only drops one file into, atomically, e.g. beside the weights)."""
        def action() -> None:
            check_output_folder(self.path, self.need_bytes, self.flag, self.fix)
            if lock and self.path.is_dir():
                lock_folder(self.path, self.flag)

        self._on_rank_0(action)
        return self

    def claim(self) -> Path:
        """Collective: rank 0 creates the folder (and its parents) and locks it; returns the folder."""
        def action() -> None:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"{self.flag} {self.path}: cannot create it ({err.strerror}): use another "
                                  f"{self.flag}") from None
            lock_folder(self.path, self.flag)

        self._on_rank_0(action)
        return self.path
