"""An ImageFolder listed once per run: rank 0 walks the tree and writes the list beside the run, every other
rank (and every relaunch) reads it instead of walking the tree itself.

On a cluster file system a walk of ImageNet (1.28M files in 1,000 folders) is a metadata storm, and each rank
of each node doing it at start-up multiplies it. The list file (JSON, ``"format": "simpool-file-list"``,
version 1) holds the classes, for each class its images' paths relative to the class folder (one JSON list of
strings per class: parsed 15x faster than a [path, label] pair per image), in the order torchvision's
``ImageFolder`` gives them, and the modification time of every folder walked.

Is the list still right? A file added to, removed from or renamed in a folder changes that folder's mtime, so
rank 0 compares the recorded mtimes of the (few) folders with theirs, not the (many) files: one ``stat`` per
folder. ``rescan=True`` (``--rescan``) walks anew regardless. (A file system whose mtimes are coarser than
the time between a listing and a change, e.g. 1 s on ext3, can miss a change made in that second: rescan then.)

Rank 0 decides and writes; the others wait in a collective (a broadcast over the CPU control group) that also
carries rank 0's failure, so a bad folder stops every rank with rank 0's message instead of a hang. A run folder
that does not exist yet is not created for the list (nothing is written before a run has checked all its
input): rank 0 then sends the list itself to the others, and the next launch keeps it.

Example (what the trainer does, with ``listing_dir=args.output_dir``)::

    >>> dataset = listed_image_folder("/imagenet/train", "runs/vits", transform=augment)
    >>> # rank 0 wrote runs/vits/file_list-train-1a2b3c4d.json; every rank built the same samples from it
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from simpool.data.images import ImageFolderDataset
from simpool.data.paths import DataError, check_image_folder, class_folder_names, image_folders
from simpool.distributed import broadcast_from_rank_0, is_main_process

LIST_FORMAT = "simpool-file-list"
LIST_VERSION = 1


def list_path(folder: str | os.PathLike, listing_dir: str | os.PathLike) -> Path:
    """Where the list of ``folder`` lives in ``listing_dir`` (the folder's absolute path picks the name)."""
    folder = os.path.abspath(folder)
    digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
    return Path(listing_dir) / f"file_list-{os.path.basename(folder) or 'root'}-{digest}.json"


def scan_image_folder(folder: str | os.PathLike) -> dict:
    """Walk ``folder`` as torchvision's ``ImageFolder`` does (sorted classes, folders sorted by path, sorted file
    names, image extensions only) and return the list payload: classes, files, folder mtimes.

    The walk is :func:`simpool.data.paths.image_folders` (links followed once, loops refused, hidden files
    ignored), which also gives the folders' mtimes; the tests check it gives torchvision's samples.
    """
    root = str(check_image_folder(folder))
    classes = class_folder_names(Path(root))
    files, dirs = [], {".": os.stat(root).st_mtime_ns}
    for name in classes:
        class_dir, found = os.path.join(root, name), []
        for walked, mtime_ns, file_names in image_folders(class_dir):
            dirs[os.path.relpath(walked, root)] = mtime_ns
            inner = os.path.relpath(walked, class_dir)
            found.extend(f if inner == "." else os.path.join(inner, f) for f in file_names)
        files.append(found)
    empty = [name for name, found in zip(classes, files) if not found]
    if empty:
        raise DataError(f"cannot use {root} as an ImageFolder: the class folders {', '.join(empty[:10])} hold "
                        "no image: remove them or add images")
    return {"format": LIST_FORMAT, "version": LIST_VERSION, "folder": root, "classes": classes, "dirs": dirs,
            "files": files}


def read_list(path: Path, folder: str) -> dict | None:
    """The list at ``path`` if it is one of ours, for ``folder``; None otherwise (then it is rebuilt)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (not isinstance(payload, dict) or payload.get("format") != LIST_FORMAT
            or payload.get("version") != LIST_VERSION or payload.get("folder") != folder):
        return None
    return payload


def changed_folders(payload: dict) -> list[str]:
    """Folders (relative) whose mtime differs from the list's record, or that are gone: one stat each."""
    changed = []
    for relative, mtime_ns in payload["dirs"].items():
        try:
            if os.stat(os.path.join(payload["folder"], relative)).st_mtime_ns != mtime_ns:
                changed.append(relative)
        except OSError:
            changed.append(relative)
    return changed


def _refresh_list(folder: str, path: Path, rescan: bool) -> tuple[str, dict, bool]:
    """Rank 0: keep the list at ``path`` if still right, else walk (and write it if its folder exists).

    Returns (what it did, the list, whether the others can read it from ``path``). A run folder that does not
    exist yet is not created here: a run checks all its input before it writes anything (the list is then
    passed to the other ranks through the process group, and a relaunch keeps it).
    """
    payload = None if rescan else read_list(path, folder)
    if payload is not None:
        changed = changed_folders(payload)
        if not changed:
            return f"read the file list {path}", payload, True
        reason = f"{len(changed)} folder(s) changed since it was written, e.g. {changed[0]}"
    else:
        reason = "--rescan" if rescan else "no list yet"
    payload = scan_image_folder(folder)
    if not path.parent.is_dir():
        return f"listed {folder} (not kept: {path.parent} does not exist yet; a relaunch keeps it)", payload, False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
    return f"listed {folder} into {path} ({reason})", payload, True


def listed_image_folder(folder: str | os.PathLike, listing_dir: str | os.PathLike, rescan: bool = False,
                        transform: Callable | None = None, subset: int | None = None,
                        log: Callable[[str], None] | None = None) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` of ``folder`` whose samples come from the list in ``listing_dir``.

    Collective when a process group is up: every rank must call it. Rank 0 checks the list (one stat per
    folder), rewrites it when the tree changed or ``rescan``; then every rank reads it (or, in a run folder
    not yet created, gets it from rank 0 through the process group). The result equals
    ``ImageFolderDataset(folder, transform, subset=subset)``: same class, samples, order and fingerprint.
    """
    folder = str(check_image_folder(folder))
    path = list_path(folder, listing_dir)
    failure, message, payload, readable = None, None, None, False
    if is_main_process():
        try:
            message, payload, readable = _refresh_list(folder, path, rescan)
        except (DataError, OSError) as error:
            failure = error
    # the others wait here for rank 0: its failure, or where the list is (the file, or this message itself)
    status = broadcast_from_rank_0(("failed", None) if failure is not None else ("file", None) if readable
                          else ("sent", payload))
    if failure is not None:
        raise failure if isinstance(failure, DataError) else DataError(f"cannot list {folder}: {failure}")
    if status[0] == "failed":
        raise DataError(f"rank 0 could not list {folder} (its error is in its log): fix --data_path")
    if payload is None:
        payload = status[1] if status[0] == "sent" else read_list(path, folder)
    if payload is None:
        raise DataError(f"cannot read the file list {path} that rank 0 wrote: is {Path(listing_dir)} shared by "
                        "every node? Put --output_dir on a shared file system")
    if message and log is not None:
        log(message)
    return ImageFolderDataset(folder, transform=transform, subset=subset,
                              listing=(payload["classes"], payload["files"]))
