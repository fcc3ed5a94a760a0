"""An ImageFolder listed once: the list equals torchvision's walk, is reused while the folders' times match,
rebuilt when they change or on --rescan, and read (not walked) by the other rank of a 2-process gloo group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.datasets.folder as torchvision_folder
from PIL import Image
from torchvision.datasets import ImageFolder

import simpool.data.file_index as file_index
from simpool.data import ImageFolderDataset, build_dataset, build_labelled_splits, dataset_fingerprint
from simpool.data.build import SourceOptions
from simpool.data.file_index import list_path, listed_image_folder, scan_image_folder
from simpool.data.paths import DataError
from tests.helpers import free_port


def make_tree(root: Path) -> Path:
    """Classes with nested folders, upper-case extensions, non-images and a hidden folder (not a class)."""
    rng = np.random.default_rng(0)
    files = ["a/1.png", "a/0.JPG", "a/sub/z.png", "a/sub/deeper/y.jpeg", "a/notes.txt", "b/x.png", "b/b.png",
             "c.d/q.png", ".cache/h.png"]
    for relative in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path, format="PNG")
    return root


def forbid_walking(setattr_) -> None:
    """Make both full walks of a tree (ours and torchvision's) fail; the one-image check stays allowed."""
    def walked(*args, **kwargs):
        raise AssertionError("the tree was walked")

    setattr_(file_index, "scan_image_folder", walked)
    setattr_(torchvision_folder, "make_dataset", walked)


def test_the_scan_gives_torchvisions_samples_in_its_order(tmp_path):
    root = make_tree(tmp_path / "tree")
    payload = scan_image_folder(root)
    reference = ImageFolder(str(root), allow_empty=True)
    reference_classes = [c for c in reference.classes if not c.startswith(".")]
    assert payload["classes"] == reference_classes == ["a", "b", "c.d"]
    ours = [(os.path.join(str(root), payload["classes"][label], relative), label)
            for label, names in enumerate(payload["files"]) for relative in names]
    theirs = [(path, reference_classes.index(reference.classes[label])) for path, label in reference.samples
              if "/.cache/" not in path]
    assert ours == theirs
    assert set(payload["dirs"]) == {".", "a", "a/sub", "a/sub/deeper", "b", "c.d"}


def test_a_listed_folder_equals_the_walked_one_and_is_reused_until_a_folder_changes(tmp_path, monkeypatch):
    root, run = make_tree(tmp_path / "tree"), tmp_path / "run"
    said = []
    listed = listed_image_folder(root, run, log=said.append)  # a run folder not made yet is not made for the list
    assert not run.exists() and said[-1] == f"listed {root} (not kept: {run} does not exist yet; a relaunch keeps it)"
    run.mkdir()
    listed = listed_image_folder(root, run, log=said.append)
    walked = ImageFolderDataset(root)
    assert type(listed) is ImageFolderDataset and listed.samples == walked.samples
    assert listed.classes == walked.classes and dataset_fingerprint(listed) == dataset_fingerprint(walked)
    assert list_path(root, run).is_file() and said[-1].startswith(f"listed {root} into") and "no list yet" in said[-1]

    with monkeypatch.context() as patch:
        forbid_walking(patch.setattr)
        again = listed_image_folder(root, run, log=said.append, subset=1)
    assert said[-1] == f"read the file list {list_path(root, run)}"
    assert again.samples == ImageFolderDataset(root, subset=1).samples

    Image.new("RGB", (4, 4)).save(root / "a" / "sub" / "new.png")  # a change deep down: its folder's time moves
    grown = listed_image_folder(root, run, log=said.append)
    assert "1 folder(s) changed since it was written, e.g. a/sub" in said[-1]
    assert len(grown) == len(walked) + 1 and grown.samples == ImageFolderDataset(root).samples
    listed_image_folder(root, run, rescan=True, log=said.append)
    assert said[-1].endswith("(--rescan)")


def test_the_list_is_kept_per_folder_and_build_functions_use_it(tmp_path):
    root = tmp_path / "data"
    make_tree(root / "train")
    make_tree(root / "val")
    run = tmp_path / "run"
    run.mkdir()
    options = SourceOptions(listing_dir=run)
    train, val = build_labelled_splits(root, options=options)
    assert train.samples == ImageFolderDataset(root / "train").samples
    assert val.samples == ImageFolderDataset(root / "val").samples
    assert len(list(run.glob("file_list-*.json"))) == 2 and list_path(root / "val", run).name.startswith(
        "file_list-val-")
    assert build_dataset(root, options=options).samples == train.samples
    payload = json.loads(list_path(root / "train", run).read_text())
    assert payload["format"] == "simpool-file-list" and payload["version"] == 1


def test_a_stale_or_foreign_list_is_rebuilt_and_a_bad_folder_is_one_error(tmp_path):
    root, run = make_tree(tmp_path / "tree"), tmp_path / "run"
    run.mkdir()
    list_path(root, run).write_text('{"format": "something else"}')
    said = []
    assert len(listed_image_folder(root, run, log=said.append)) == 7 and "no list yet" in said[-1]
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="the class folders empty hold no image"):
        listed_image_folder(root, run)
    with pytest.raises(DataError, match="does not exist"):
        listed_image_folder(tmp_path / "nowhere", run)


# ---------------------------------------------------------------------------------------------------------
# two processes: rank 0 walks, rank 1 reads; rank 0's failure stops both
# ---------------------------------------------------------------------------------------------------------
def _rank(rank: int, port: int, root: str, run: str, results) -> None:
    """List three times: without a run folder, with one, then (after rank 0 adds an empty class) a bad tree."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            forbid_walking(lambda owner, name, value: setattr(owner, name, value))  # this child process only
        for attempt in range(3):
            if attempt == 1 and rank == 0:
                os.mkdir(run)  # 0: no run folder yet, the list travels in the process group; 1: through the file
            if attempt == 2 and rank == 0:
                os.mkdir(os.path.join(root, "empty"))  # rank 0 fails; rank 1 must not hang, nor read the old list
            dist.barrier()
            try:
                dataset = listed_image_folder(root, run)
                results.put((attempt, rank, "ok", [s[0] for s in dataset.samples]))
            except (DataError, AssertionError) as error:
                results.put((attempt, rank, type(error).__name__, str(error)))
    finally:
        dist.destroy_process_group()


def test_two_ranks_rank_0_walks_rank_1_reads_and_a_bad_folder_stops_both(tmp_path):
    root, run = make_tree(tmp_path / "tree"), tmp_path / "run"
    context = mp.get_context("fork")  # no re-import of torch in the children: seconds, not tens of seconds
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank, args=(r, port, str(root), str(run), results)) for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    outcome = {(attempt, rank): (kind, value) for attempt, rank, kind, value in
               (results.get(timeout=5) for _ in range(6))}
    listed = [str(root / relative) for relative in ("a/0.JPG", "a/1.png", "a/sub/z.png", "a/sub/deeper/y.jpeg",
                                                    "b/b.png", "b/x.png", "c.d/q.png")]
    assert outcome[0, 0] == outcome[0, 1] == outcome[1, 0] == outcome[1, 1] == ("ok", listed)
    assert list_path(root, run).is_file()  # written at the second attempt, when the run folder existed
    assert outcome[2, 0][0] == "DataError" and "hold no image" in outcome[2, 0][1]
    assert outcome[2, 1] == ("DataError", f"rank 0 could not list {root} (its error is in its log): fix --data_path")
