"""A run packed from a folder trains, is preempted, resumes on another process count and evaluates from the
shards with the folder's guarantees (real processes, as tests/test_faults.py does for folders), and an
ImageFolder run keeps its file list beside the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import simpool.evaluation.run_knn as run_knn
import simpool.evaluation.run_linear as run_linear
from simpool.data.pack import pack
from simpool.dino.run_train import main as train_main
from simpool.finetune.run_finetune import main as finetune_main
from tests.helpers import ENV, REPO, TINY, free_port, log_lines, photo_folder, run_cli, state_of

EVAL_MODEL = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "4", "--model_overrides",
              "depth=1", "embed_dim=32", "num_heads=2", "--image_size", "16", "--num_workers", "0",
              "--batch_size_per_gpu", "8"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, its index.json): 2 classes x 10 train + 2 x 4 val images, in shards of ~4 images."""
    root = tmp_path_factory.mktemp("shard_runs")
    folder = photo_folder(root / "photos", per_class=10, val_per_class=4)
    return folder, pack(str(folder), root / "shards", shard_bytes=8192, progress=False).index_path


# ---------------------------------------------------------------------------------------------------------
# preemption with loader workers reading shards
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds child processes in /proc")
def test_sigterm_to_the_process_group_with_two_workers_reading_shards_saves_and_exits_zero(tmp_path):
    # 2,000 images: 500 steps outlive the test
    folder = photo_folder(tmp_path / "photos", per_class=1000, val_per_class=0)
    index = pack(str(folder / "train"), tmp_path / "shards", shard_bytes=256 << 10, progress=False).index_path
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_dino.py"), *TINY, "--data_path", str(index),
                             "--num_workers", "2", "--epochs", "200", "--output_dir", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "epoch 0 [2/500]" in line:
                break
        else:
            raise AssertionError("".join(seen)[-3000:])
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2, workers
        for pid in workers:  # each worker opened the shards it read itself, after the fork
            opened = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.is_symlink()}
            assert any(path.endswith(".tar") for path in opened), opened
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(Path(f"/proc/{pid}").exists() for pid in workers), "a loader worker died of SIGTERM"
        os.killpg(proc.pid, signal.SIGTERM)  # what SLURM and `docker stop` do
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == 0 and "preempted (SIGTERM): saved" in output and "Traceback" not in output, output[-3000:]
    state = state_of(out / "checkpoint.pth")
    assert state["iteration"] >= 2 and state["epoch_sample"] == 4 * (state["iteration"] % 500)


# ---------------------------------------------------------------------------------------------------------
# elastic resume, and moving between the folder and its shards
# ---------------------------------------------------------------------------------------------------------
def test_relaunch_on_two_gloo_processes_continues_the_same_epoch_at_the_same_sample(small, tmp_path):
    _, index = small
    out = tmp_path / "run"
    flags = [*TINY, "--data_path", str(index), "--epochs", "2", "--output_dir", str(out)]
    assert train_main([*flags, "--exit_after_iterations", "3"]) == 0  # 1 process: 12 of 20 samples
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    two = run_cli(flags, launcher=torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "elastic resume: processes 1 -> 2" in two.stdout and "epoch 0 continues at sample 12" in two.stdout
    state = state_of(out / "checkpoint.pth")
    assert (state["epoch"], state["epoch_sample"], state["iteration"]) == (2, 0, 6)  # 1 step of 8, then 2
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]


def test_a_run_resumed_from_the_shards_of_its_folder_ends_on_the_bits_of_the_folder_run(small, tmp_path, capsys):
    folder, index = small
    flags = [*TINY, "--subset", "8", "--epochs", "1"]  # 16 images: 4 steps
    both = {}
    for name, second in (("folder", folder), ("shards", index)):
        out = tmp_path / name
        assert train_main([*flags, "--data_path", str(folder), "--output_dir", str(out),
                           "--exit_after_iterations", "2"]) == 0
        capsys.readouterr()
        assert train_main([*flags, "--data_path", str(second), "--output_dir", str(out)]) == 0
        assert "resumed from" in capsys.readouterr().out  # the fingerprints agree: same samples
        both[name] = state_of(out / "checkpoint.pth")
    assert both["shards"]["iteration"] == both["folder"]["iteration"] == 4
    teacher_a, teacher_b = both["folder"]["teacher"], both["shards"]["teacher"]
    assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
    assert train_main([*flags, "--subset", "9", "--data_path", str(index), "--output_dir", str(tmp_path / "shards"),
                       "--epochs", "2"]) == 2  # another subset: another data set, refused as from a folder
    assert "another data set (16 images then, 18 now" in capsys.readouterr().err


def test_an_unreadable_image_in_the_shards_is_skipped_and_counted_like_in_the_folder(tmp_path):
    folder = photo_folder(tmp_path / "photos", per_class=6, val_per_class=0)
    (folder / "train" / "b" / "0002.png").write_bytes(b"truncated")
    index = pack(str(folder / "train"), tmp_path / "shards", progress=False).index_path
    counts = {}
    for name, data in (("folder", folder / "train"), ("shards", index)):
        with pytest.warns(UserWarning, match="unreadable"):
            assert train_main([*TINY, "--data_path", str(data), "--epochs", "1",
                               "--output_dir", str(tmp_path / name)]) == 0
        counts[name] = log_lines(tmp_path / name)[0]["train_unreadable_images"]
    assert counts == {"folder": 1, "shards": 1}


# ---------------------------------------------------------------------------------------------------------
# evaluation from the shards: the folder's numbers
# ---------------------------------------------------------------------------------------------------------
def test_knn_linear_probe_and_fine_tuning_from_the_shards_give_the_folders_numbers(small, tmp_path):
    folder, index = small
    results = {}
    for name, data in (("folder", folder), ("shards", index)):
        knn_out, linear_out = tmp_path / f"knn_{name}", tmp_path / f"linear_{name}"
        assert run_knn.main([*EVAL_MODEL, "--data_path", str(data), "--nb_knn", "1", "3",
                             "--output_dir", str(knn_out)]) == 0
        torch.manual_seed(0)  # the probe's augmentations draw from the global RNG
        assert run_linear.main([*EVAL_MODEL, "--data_path", str(data), "--epochs", "2", "--lrs", "0.01", "0.1",
                                "--output_dir", str(linear_out)]) == 0
        finetune_out = tmp_path / f"finetune_{name}"
        assert finetune_main(["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "4",
                              "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2", "img_size=16",
                              "--input_size", "16", "--batch_size_per_gpu", "4", "--num_workers", "0", "--epochs", "1",
                              "--warmup_epochs", "0", "--precision", "fp32", "--data_path", str(data),
                              "--output_dir", str(finetune_out)]) == 0
        knn = json.loads((knn_out / "knn.json").read_text())
        results[name] = (knn["results"], knn["num_train"], knn["num_val"],
                         [(line.get("train_loss"), line.get("test_acc1", line.get("per_lr")))
                          for line in log_lines(linear_out)],
                         [{k: v for k, v in line.items() if k.startswith(("train_loss", "val_"))}
                          for line in log_lines(finetune_out)])
    assert results["shards"][1:3] == (20, 8)
    assert results["shards"] == results["folder"]


# ---------------------------------------------------------------------------------------------------------
# a folder listed once per run
# ---------------------------------------------------------------------------------------------------------
def test_a_folder_run_lists_its_folder_once_and_the_relaunch_reads_the_list(small, tmp_path, capsys):
    folder, _ = small
    out = tmp_path / "run"
    flags = [*TINY, "--data_path", str(folder), "--subset", "2", "--output_dir", str(out)]
    assert train_main([*flags, "--epochs", "1"]) == 0
    # a fresh run folder is not created before the run has checked its input: the list is kept from the k-NN on
    assert f"{out} does not exist yet; a relaunch keeps it" in capsys.readouterr().out
    # train/ and val/ of the final k-NN (the run folder exists by then), each listed once
    assert sorted(p.name.split("-")[1] for p in out.glob("file_list-*.json")) == ["train", "val"]
    assert train_main([*flags, "--epochs", "2"]) == 0
    assert f"read the file list {out}/file_list-train-" in capsys.readouterr().out
    assert train_main([*flags, "--epochs", "3", "--rescan"]) == 0
    assert "(--rescan)" in capsys.readouterr().out
    assert state_of(out / "checkpoint.pth")["epoch"] == 3
