"""One run per output folder: an exclusive ``flock`` on ``<folder>/.simpool.lock``, held by the process that owns
the run (rank 0) for as long as it lives.

Two runs writing one folder mix their ``log.txt`` lines and resume from each other's checkpoints; a requeued job
overlapping its old allocation does exactly that. The lock is the kernel's: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
a file opened by the owner and never closed until the run ends, so a run killed by anything (SIGKILL, OOM, a node
reboot) releases it with its process: there is no stale lock to clean up, and no "is that pid still alive?"
guesswork. The file also records who holds it (host, pid, since, command) for the error a second run gets.

File systems: local file systems and tmpfs lock between processes of one machine. On NFS, Linux emulates
``flock`` with POSIX byte-range locks that the server arbitrates, so runs on different nodes exclude each other
too (unless the client mounts with ``nolock`` / ``local_lock=all``, which keeps locks local to each node). Lustre
needs its ``flock`` mount option (``localflock`` locks per node only; with neither, ``flock`` fails). Some FUSE and
object-store mounts (s3fs, gcsfuse, ...) do not implement ``flock``: the run then warns that it cannot lock the
folder and goes on unprotected.

The lock file is opened close-on-exec; forked children (DataLoader workers) share the open file and so hold the
lock until they exit with their parent.

Example:
    >>> lock_folder("runs/vits")          # FolderInUse (a ValueError) names the holder when another run has it
    >>> ...                               # the run
    >>> release_folders()                 # at the end of the driver (the kernel does it if the process dies)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from simpool.run.config import ConfigError

__all__ = ["LOCK_NAME", "FolderInUse", "Holder", "held_folders", "lock_folder", "read_holder", "release_folders"]

log = logging.getLogger(__name__)

LOCK_NAME = ".simpool.lock"


class FolderInUse(ConfigError):
    """Another process holds the folder's lock; the message names it (host, pid, since, command)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a folder's lock, as its lock file records it."""

    host: str = "?"
    pid: int | str = "?"
    since: str = "?"
    command: str = "?"

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}, command: {self.command}"


# Locks held by this process: real path of the lock file -> its open descriptor (kept open = lock held).
_held: dict[str, int] = {}


def _this_holder() -> Holder:
    command = " ".join(shlex.quote(word) for word in [os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])
    return Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), command[:300])


def read_holder(path: str | os.PathLike) -> Holder:
    """What the lock file at ``path`` (or ``path/.simpool.lock`` for a folder) says about its holder (fields "?"
    where it says nothing readable)."""
    path = Path(path)
    try:
        record = json.loads((path / LOCK_NAME if path.is_dir() else path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return Holder()
    if not isinstance(record, dict):
        return Holder()
    return Holder(**{k: record[k] for k in ("host", "pid", "since", "command") if k in record})


def lock_folder(folder: str | os.PathLike, flag: str = "--output_dir", name: str = LOCK_NAME,
                target: str | os.PathLike | None = None) -> None:
    """Take ``folder``'s lock for this process (the folder must exist); a no-op when this process holds it.

    ``name``: the lock file in ``folder`` (a folder replaced whole by its run, such as an export, is locked by a
    file beside it, in its parent; ``target`` then names it in messages). Raises :class:`FolderInUse` when another
    process holds it. A file system without ``flock`` gets a warning and no lock (see the module's notes).
    """
    target = target if target is not None else folder
    path = Path(folder) / name
    key = os.path.realpath(path)
    if key in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise ConfigError(f"{flag} {target}: cannot create its lock file {path} ({err.strerror}): make the folder "
                          f"writable or use another {flag}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = read_holder(path)
            raise FolderInUse(f"{flag} {target} is in use by another run ({holder.describe()}): wait for it to "
                              f"end, stop it, or use another {flag}") from None
        log.warning("cannot lock %s (%s): this file system does not support flock, so a second run in this folder "
                    "would not be stopped", path, os.strerror(err.errno or 0))
        return
    record = _this_holder()
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record.__dict__) + "\n").encode(), 0)
    _held[key] = fd


def held_folders() -> list[str]:
    """The lock files this process holds (real paths)."""
    return sorted(_held)


def release_folders() -> None:
    """Release every lock this process holds (the end of a driver; in-process runs such as tests need it, a
    process that ends releases them anyway). The lock files stay: removing one while another process waits on
    it would let two runs lock two different files."""
    for key in list(_held):
        fd = _held.pop(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
