"""Fault injection, output folders: a path below a regular file, under ``/proc``, an immutable folder
(``chattr +i``), a read-only bind mount or a disk too small for one checkpoint ends in one ``error:`` line and exit 2
in every driver, before a model is built or a feature extracted, with nothing created.

Root ignores permission bits, so unwritable folders are made the ways that stop root too; each is skipped where
this machine does not allow it (no ``chattr``, no mounts in the container).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY, mounted_tmpfs, needs_fashion, photo_folder

MODEL = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "4", "--model_overrides",
         "depth=1", "embed_dim=32", "num_heads=2"]


@pytest.fixture
def no_work(monkeypatch):
    """Records any model build or feature extraction of the drivers (there must be none)."""
    import simpool.dino.build as dino_build
    from simpool.evaluation import run_knn, run_linear, run_segmentation
    from simpool.finetune import trainer

    done = []
    monkeypatch.setattr(dino_build, "build_student_teacher", lambda *a, **k: done.append("dino model"))
    monkeypatch.setattr(trainer, "build_finetune_model", lambda *a, **k: done.append("finetune model"))
    for module in (run_knn, run_linear, run_segmentation):
        monkeypatch.setattr(module, "build_model", lambda *a, **k: done.append("evaluated model"))
    monkeypatch.setattr(run_knn, "extract_features", lambda *a, **k: done.append("features"))
    return done


def _drivers(data: Path, out: Path) -> dict:
    from simpool.dino.run_train import main as train
    from simpool.evaluation.run_knn import main as knn
    from simpool.evaluation.run_linear import main as linear
    from simpool.evaluation.run_segmentation import main as segmentation
    from simpool.finetune.run_finetune import main as finetune

    return {
        "train_dino.py": (train, [*TINY, "--data_path", str(data), "--output_dir", str(out)]),
        "finetune.py": (finetune, [*MODEL, "--data_path", str(data), "--input_size", "16", "--output_dir", str(out)]),
        "eval_linear.py": (linear, [*MODEL, "--data_path", str(data), "--output_dir", str(out)]),
        "eval_knn.py": (knn, [*MODEL, "--data_path", str(data), "--output_dir", str(out)]),
        "simpool-segmentation": (segmentation, [*MODEL, "--data_path", "fashion-on-photos:2", "--image_size", "32",
                                                "--output_dir", str(out)]),
    }


DRIVERS = ["train_dino.py", "finetune.py", "eval_linear.py", "eval_knn.py", "simpool-segmentation"]


def _refused(driver: str, data: Path, out: Path, capsys, message: str) -> str:
    main, argv = _drivers(data, out)[driver]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("driver", DRIVERS)
def test_an_output_folder_below_a_file_is_refused_before_any_work(driver, tmp_path, capsys, no_work):
    data = photo_folder(tmp_path / "photos", per_class=2, val_per_class=1)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    err = _refused(driver, data, tmp_path / "notes.txt" / "run", capsys,
                   "is below " + str(tmp_path / "notes.txt") + ", which is a file, not a folder")
    assert "--output_dir" in err and not no_work
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def test_an_output_folder_under_proc_is_refused(tmp_path, capsys, no_work):
    data = photo_folder(tmp_path / "photos", per_class=2, val_per_class=1)
    _refused("train_dino.py", data, Path("/proc/simpool-run"), capsys, "--output_dir /proc/simpool-run: cannot write")
    assert not no_work


@pytest.fixture
def immutable_folder(tmp_path):
    folder = tmp_path / "frozen"
    folder.mkdir()
    (folder / "old.txt").write_text("kept")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=False)


@pytest.mark.parametrize("driver", ["train_dino.py", "eval_knn.py"])
def test_an_immutable_output_folder_is_refused_before_any_work(driver, immutable_folder, tmp_path, capsys, no_work):
    data = photo_folder(tmp_path / "photos", per_class=2, val_per_class=1)
    _refused(driver, data, immutable_folder, capsys, f"--output_dir {immutable_folder}: cannot write in "
             f"{immutable_folder}: Operation not permitted")
    assert not no_work and sorted(p.name for p in immutable_folder.iterdir()) == ["old.txt"]


@pytest.fixture
def read_only_mount(tmp_path):
    source, target = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    target.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    done = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True)
    if done.returncode:
        subprocess.run(["umount", str(target)], check=False)
        pytest.skip(f"cannot remount read-only here: {done.stderr.decode().strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=False)


@pytest.mark.parametrize("driver", ["eval_linear.py", "finetune.py"])
def test_a_read_only_mount_is_refused_before_any_work(driver, read_only_mount, tmp_path, capsys, no_work):
    data = photo_folder(tmp_path / "photos", per_class=2, val_per_class=1)
    out = read_only_mount / "run"
    _refused(driver, data, out, capsys, f"--output_dir {out}: cannot write in {read_only_mount} (the nearest "
             "existing folder of")
    assert not no_work


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs; skipped where mounting is not allowed."""
    yield from mounted_tmpfs(tmp_path / "disk", "1m")


@needs_fashion
def test_a_disk_too_small_for_one_checkpoint_is_refused_before_any_work(small_disk, capsys, no_work):
    from simpool.dino.run_train import main

    out = small_disk / "run"
    # a 4096-prototype head: student + teacher + AdamW's two moments are ~2 MiB, the disk holds 1
    assert main([*TINY, "--out_dim", "4096", "--data_path", "fashion-mnist", "--subset", "2", "--output_dir",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--output_dir {out}: 1.0 MiB free on its file system, and what this run writes there needs about" in err
    assert len(err.splitlines()) == 1 and not no_work and not out.exists()


def test_knn_results_beside_weights_in_an_immutable_folder_are_refused_before_extraction(tmp_path, capsys, no_work):
    import torch

    from simpool.evaluation.run_knn import main
    from simpool.models import build_backbone

    folder = tmp_path / "weights"
    folder.mkdir()
    model = build_backbone("vit_tiny", mode="simpool", patch_size=4, depth=1, embed_dim=32, num_heads=2)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": "simpool", "patch_size": 4,
                         "model_overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2}}}, folder / "ckpt.pth")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()}")
    try:
        data = photo_folder(tmp_path / "photos", per_class=2, val_per_class=1)
        code = main(["--pretrained_weights", str(folder / "ckpt.pth"), "--data_path", str(data)])
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"knn.json goes beside the weights, in {folder}: cannot write" in err, err
    assert "pass --output_dir" in err and len(err.splitlines()) == 1 and not no_work
