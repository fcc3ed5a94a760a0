"""Fault injection, one run per output folder: a second run on a folder in use exits 2 in one line naming the holder
(host, pid, since, command) before it writes anything, and the first run goes on undisturbed; every driver that
writes an output folder takes the lock; the kernel releases it with its process (no stale lock to clean up).

Real processes hold the locks (``flock`` locks of one process never conflict with each other).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch

from simpool.models import build_backbone
from simpool.run.lock import FolderInUse, held_folders, lock_folder, release_folders
from tests.helpers import (
    FASHION_TINY,
    TINY,
    finish,
    folder_state,
    hold_lock,
    log_lines,
    needs_fashion,
    photo_folder,
    read_until,
    release,
    run_cli,
    start,
    torchrun,
)

IN_USE = "is in use by another run (host"


def test_the_lock_names_its_holder_and_dies_with_its_process(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(FolderInUse, match=rf"--output_dir {tmp_path} is in use by another run \(host "
                                              rf"{socket.gethostname()}, pid {holder.pid}, since 20\d\d-.*holder-run"):
            lock_folder(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a run killed by anything: the kernel releases its lock
        release(holder)
    lock_folder(tmp_path)  # no stale lock to clean up
    lock_folder(tmp_path)  # held by this process already: a no-op, not a conflict with itself
    assert held_folders() == [os.path.realpath(tmp_path / ".simpool.lock")]
    release_folders()
    assert held_folders() == []


@needs_fashion
def test_a_second_trainer_on_a_folder_in_use_exits_2_naming_it_and_the_first_goes_on(tmp_path):
    out = tmp_path / "run"
    flags = [*FASHION_TINY, "--subset", "20", "--epochs", "200", "--output_dir", str(out)]  # 50 steps per epoch
    first = start(flags)
    try:
        seen = read_until(first, "epoch 1 [1/50]")  # epoch 0 written: log.txt, checkpoints, progress
        before = folder_state(out)
        second = run_cli(flags)
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip()
        assert f"--output_dir {out} {IN_USE} {socket.gethostname()}, pid {first.pid}, since " in err, err
        assert "train_dino.py" in err and len(err.splitlines()) == 1 and "Traceback" not in err
        assert first.poll() is None  # undisturbed
        after = folder_state(out)
        assert all(after[name] == before[name] for name in ("args.yaml", "checkpoint0000.pth") if name in before)
        os.killpg(first.pid, signal.SIGTERM)
        output = finish(first, seen)
    finally:
        release(first)
    assert first.returncode == 0 and "preempted (SIGTERM): saved" in output, output[-3000:]
    epochs = [line["epoch"] for line in log_lines(out)]
    assert epochs == list(range(len(epochs))) and epochs  # each epoch logged once, in order
    iterations = [int(line.split('"iteration": ')[1].split(",")[0])
                  for line in (out / "progress.jsonl").read_text().splitlines()]
    assert iterations == sorted(set(iterations))  # one run's progress, not two interleaved


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A folder (and an export name beside it) whose locks another process holds, and the inputs of the drivers."""
    root = tmp_path_factory.mktemp("locked")
    folder = root / "busy"
    folder.mkdir()
    data = photo_folder(root / "photos", per_class=2, val_per_class=1)
    model = build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=32, num_heads=2)
    weights = root / "weights.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": "simpool", "patch_size": 8,
                         "model_overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2}}}, weights)
    from simpool.data.generated.voc_detection import write_voc_detection
    from simpool.data.generated.wsol import write_wsol

    wsol, voc = write_wsol(root / "wsol", 2), write_voc_detection(root / "voc", 2)
    holder = hold_lock(folder, (root, ".export.simpool.lock"))
    yield {"root": root, "busy": folder, "data": data, "weights": weights, "wsol": wsol, "voc": voc}
    release(holder)


def _driver_calls(inputs: dict) -> dict:
    busy, data, weights = str(inputs["busy"]), str(inputs["data"]), str(inputs["weights"])
    model = ["--pretrained_weights", weights]
    from simpool.cli import run_export, run_pack, run_visualize
    from simpool.dino import run_train
    from simpool.evaluation import (
        run_knn,
        run_linear,
        run_localization,
        run_object_discovery,
        run_segmentation,
    )
    from simpool.finetune import run_finetune

    wsol = inputs["wsol"]
    return {
        "train_dino.py": (run_train.main, [*TINY, "--data_path", data, "--output_dir", busy]),
        "finetune.py": (run_finetune.main, [*model, "--data_path", data, "--input_size", "16", "--output_dir", busy]),
        "eval_linear.py": (run_linear.main, [*model, "--data_path", data, "--output_dir", busy]),
        "eval_knn.py": (run_knn.main, [*model, "--data_path", data, "--output_dir", busy]),
        "simpool-segmentation": (run_segmentation.main, [*model, "--data_path", "fashion-on-photos:2",
                                                         "--image_size", "32", "--output_dir", busy]),
        "simpool-localization": (run_localization.main, [*model, "--data_path", str(wsol[0]), "--metadata",
                                                         str(wsol[1]), "--output_dir", busy]),
        "simpool-object-discovery": (run_object_discovery.main, [*model, "--data_path", str(inputs["voc"]),
                                                                 "--output_dir", busy]),
        "simpool-visualize": (run_visualize.main, [*model, "--image_path", data, "--output_dir", busy]),
        "simpool-pack": (run_pack.main, [data, busy]),
        "simpool-export": (run_export.main, [weights, str(inputs["root"] / "export")]),
    }


DRIVERS = ["train_dino.py", "finetune.py", "eval_linear.py", "eval_knn.py", "simpool-segmentation",
           "simpool-localization", "simpool-object-discovery", "simpool-visualize", "simpool-pack", "simpool-export"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_driver_that_writes_a_folder_refuses_one_in_use(driver, locked, capsys):
    main, argv = _driver_calls(locked)[driver]
    before = sorted(p.name for p in locked["busy"].iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert IN_USE in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in locked["busy"].iterdir()) == before  # nothing written
    assert not (locked["root"] / "export").exists()
    assert held_folders() == []  # the refused driver holds nothing afterwards


def test_the_lock_file_records_this_process_and_stays_for_the_next_run(tmp_path):
    lock_folder(tmp_path)
    try:
        record = (tmp_path / ".simpool.lock").read_text()
        assert f'"pid": {os.getpid()}' in record and os.path.basename(sys.argv[0]) in record
    finally:
        release_folders()
    assert (tmp_path / ".simpool.lock").is_file()  # removing it could let two runs lock two different files
    assert Path(tmp_path / ".simpool.lock").stat().st_size > 0


def test_every_rank_of_a_distributed_run_learns_rank_0s_refusal_and_exits_2(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    data = photo_folder(tmp_path / "photos")
    holder = hold_lock(busy)
    try:
        result = run_cli([*TINY, "--data_path", str(data), "--batch_size_per_gpu", "2", "--output_dir", str(busy)],
                         launcher=torchrun(2), timeout=180)
    finally:
        release(holder)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all(IN_USE in line for line in lines), result.stderr[-3000:]  # both ranks, no hang
    assert "exitcode  : 2" in result.stderr and not (busy / "args.yaml").exists()
