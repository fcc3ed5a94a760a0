"""Per-item results (simpool.run.items) and the resume checks they use (simpool.run.resume_checks)."""

from __future__ import annotations

import json

import pytest

from simpool.checkpoint import CheckpointError
from simpool.run import ItemResults, changes, refuse_changes, shard, weights_identity


def test_a_rerun_skips_finished_items_and_ignores_a_line_cut_by_a_kill(tmp_path):
    identity = {"weights": "/w.pth", "thresholds": [0.5, 0.7]}
    first = ItemResults(tmp_path, "loc", identity).open()
    assert first.todo(["a", "b", "c"]) == ["a", "b", "c"]
    first.add("a", {"iou": 0.5})
    first.add("b", {"iou": 0.25})
    first.close()
    with (tmp_path / "loc.rank0.jsonl").open("a") as f:
        f.write('{"id": "c", "iou": 0.')  # the kill came mid-line
    again = ItemResults(tmp_path, "loc", {"weights": "/w.pth", "thresholds": (0.5, 0.7)}).open()  # tuple == list
    assert again.todo(["a", "b", "c"]) == ["c"]
    assert again.done["b"] == {"id": "b", "iou": 0.25}
    again.add("c", {"iou": 1.0})
    assert again.gather()["c"] == {"id": "c", "iou": 1.0}  # not swallowed by the cut line
    assert sorted(again.done) == ["a", "b", "c"]


def test_items_of_every_rank_file_count_whatever_the_process_count_now(tmp_path):
    ItemResults(tmp_path, "x", {}).open()
    (tmp_path / "x.rank1.jsonl").write_text(json.dumps({"id": 3, "v": 1}) + "\n")
    (tmp_path / "x.rank0.jsonl").write_text(json.dumps({"id": 3, "v": 2}) + "\n")  # redone later by rank 0
    items = ItemResults(tmp_path, "x", {}).open()
    assert items.todo([1, 2, 3]) == [1, 2]
    assert items.done["3"]["v"] == 1  # files are read in name order: rank1 after rank0


def test_other_weights_or_flags_are_refused_before_anything_is_written(tmp_path):
    ItemResults(tmp_path, "loc", {"weights": "/a.pth", "iou": [30, 50]}).open()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match=r"iou \[30, 50\] -> \[50\], weights /a.pth -> /b.pth"):
        ItemResults(tmp_path, "loc", {"weights": "/b.pth", "iou": [50]}).open()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "loc.identity.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        ItemResults(tmp_path, "loc", {}).check()


def test_changes_compares_recorded_names_only_and_refuse_names_the_fix():
    assert changes({"a": 1, "b": (1, 2)}, {"a": 1, "b": [1, 2], "c": 5}) == []
    assert changes({"a": 1, "b": 2}, {"a": 2, "b": 2}, prefix="--") == ["--a 1 -> 2"]
    assert changes({"a": 1}, {"a": 2}, names=["b"]) == []
    refuse_changes("x", "y", [])
    with pytest.raises(CheckpointError, match="^f holds a run: --a 1 -> 2. Start over$"):
        refuse_changes("f", "a run", ["--a 1 -> 2"], fix="start over")


def test_weights_identity_makes_the_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ident = weights_identity({"weights": "w.pth", "arch": "vit_small", "mode": "simpool", "gamma": 1.25,
                              "checkpoint_key": "teacher", "epoch": 3})
    assert ident["weights"] == str(tmp_path / "w.pth") and ident["epoch"] == 3
    assert weights_identity({"weights": None})["weights"] is None


def test_shard_splits_round_robin():
    assert shard(list(range(7)), rank=1, world_size=3) == [1, 4]
    assert shard([1, 2]) == [1, 2]
