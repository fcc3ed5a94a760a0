"""Fault injection, resume: relaunches on another number of processes or batch size, changes a resume cannot
honour, a moved data set, corrupt or empty checkpoints, stale temporary files, a full disk (a real tiny tmpfs,
skipped where it cannot be mounted), probes relaunched onto other weights.
"""

from __future__ import annotations

import os
import re
import stat
import sys

import pytest

from simpool.dino.run_train import main
from tests.helpers import (
    FASHION_TINY,
    TINY,
    folder_state,
    free_port,
    log_lines,
    mounted_tmpfs,
    needs_fashion,
    photo_folder,
    run_cli,
    state_of,
)


# ---------------------------------------------------------------------------------------------------------
# elastic resume
# ---------------------------------------------------------------------------------------------------------
def test_sampler_positions_continue_across_world_sizes_and_batches():
    """3 steps on 1 process of 4, then 2 processes of 3: the epoch is the permutation, each sample once."""
    from torch.utils.data import DataLoader

    from simpool.data import ResumableDistributedSampler

    dataset = list(range(23))
    first = ResumableDistributedSampler(dataset, batch_size=4, num_replicas=1, rank=0, seed=3, drop_last=True)
    first.set_epoch(2)
    order = list(first)
    seen = [i for batch in list(DataLoader(dataset, batch_size=4, sampler=first, drop_last=True))[:3]
            for i in batch.tolist()]
    later = []
    for rank in range(2):
        sampler = ResumableDistributedSampler(dataset, batch_size=3, num_replicas=2, rank=rank, seed=3,
                                              drop_last=True)
        sampler.set_epoch(2, start_sample=12)
        later.append(list(sampler))
    assert seen == order[:12]
    resumed = [i for step in zip(later[0], later[1]) for i in step]  # global order, rank-interleaved
    assert resumed == order[12:18]  # (23 - 12) // 6 = 1 whole global step left: 6 samples
    assert len(set(seen + resumed)) == len(seen + resumed)


@needs_fashion
def test_relaunch_on_more_processes_continues_the_same_epoch_at_the_same_sample(tmp_path):
    out = tmp_path / "run"
    flags = [*FASHION_TINY, "--epochs", "2", "--output_dir", str(out)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    assert main([*flags, "--exit_after_iterations", "3"]) == 0  # 1 process: 12 of 20 samples
    two = run_cli(flags, launcher=torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "elastic resume: processes 1 -> 2" in two.stdout, two.stdout
    assert "epoch 0 continues at sample 12" in two.stdout
    assert "schedules rebuilt for 2 iterations per epoch (was 5)" in two.stdout
    state = state_of(out / "checkpoint.pth")
    # epoch 0: (20 - 12) // 8 = 1 step of 8; epoch 1: 2 steps of 8
    assert (state["epoch"], state["epoch_sample"], state["iteration"]) == (2, 0, 6)
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]  # no epoch skipped or repeated


@needs_fashion
def test_relaunch_with_another_batch_size_rebuilds_the_schedules_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*FASHION_TINY, "--epochs", "2", "--output_dir", str(out)]
    assert main([*flags, "--exit_after_iterations", "3"]) == 0  # 12 samples of epoch 0
    capsys.readouterr()
    assert main([*flags, "--batch_size_per_gpu", "2"]) == 0  # the last value of a flag wins
    text = capsys.readouterr().out
    assert "batch_size_per_gpu 4 -> 2" in text and "10 iterations per epoch (was 5)" in text, text
    assert "epoch 0 continues at sample 12" in text
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1]
    state = state_of(out / "checkpoint.pth")
    assert (state["epoch"], state["iteration"]) == (2, 3 + 4 + 10)  # (20 - 12) / 2 = 4 steps, then 10


@needs_fashion
def test_incompatible_relaunch_exits_2_naming_each_flag_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FASHION_TINY, "--epochs", "1", "--output_dir", str(out)]) == 0
    before = folder_state(out)
    capsys.readouterr()
    changed = [*FASHION_TINY, "--epochs", "2", "--output_dir", str(out), "--mode", "official", "--out_dim", "128",
               "--arch", "vit_small"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "--arch vit_tiny -> vit_small" in err and "--mode simpool -> official" in err, err
    assert "--out_dim 64 -> 128" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    after = folder_state(out)
    assert after == before  # args.yaml included
    assert main([*FASHION_TINY, "--epochs", "2", "--output_dir", str(out), "--subset", "3"]) == 2
    err = capsys.readouterr().err
    assert "another data set (20 images then, 30 now" in err and "--subset 2 -> 3" in err, err
    assert folder_state(out) == before


def test_a_moved_copy_of_the_data_set_resumes(tmp_path, capsys):
    import shutil

    data = photo_folder(tmp_path / "photos")
    out = tmp_path / "run"
    flags = [*TINY, "--epochs", "1", "--output_dir", str(out)]
    assert main([*flags, "--data_path", str(data), "--exit_after_iterations", "1"]) == 0
    moved = shutil.copytree(data, tmp_path / "scratch" / "photos")
    assert main([*flags, "--data_path", str(moved)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert state_of(out / "checkpoint.pth")["iteration"] == 3


# ---------------------------------------------------------------------------------------------------------
# checkpoint hygiene
# ---------------------------------------------------------------------------------------------------------
@needs_fashion
def test_corrupt_or_empty_checkpoint_names_the_kept_one_and_resume_from_uses_it(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*FASHION_TINY, "--epochs", "2", "--saveckp_freq", "1", "--output_dir", str(out)]
    assert main(flags) == 0
    (out / "checkpoint.pth").write_bytes(b"")
    capsys.readouterr()
    assert main([*flags[:-4], "--epochs", "3", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "empty (0 bytes)" in err and "checkpoint0001.pth" in err and "--resume_from" in err, err
    (out / "checkpoint0001.pth").write_bytes(b"PK garbage")
    assert main([*flags[:-4], "--epochs", "3", "--output_dir", str(out)]) == 2
    assert "checkpoint0000.pth" in capsys.readouterr().err
    kept = out / "checkpoint0000.pth"
    assert main([*flags, "--resume_from", str(kept)]) == 0
    assert f"resumed from {kept} at epoch 1" in capsys.readouterr().out
    state = state_of(out / "checkpoint.pth")
    assert (state["epoch"], state["iteration"]) == (2, 10)


@needs_fashion
def test_stale_temp_files_are_removed_and_checkpoints_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pth.4242-deadbeef.tmp", out / ".checkpoint0003.pth.a1b2_c3d.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    unrelated = out / ".notes.tmp"
    unrelated.write_text("mine")
    previous = os.umask(0o002)
    try:
        assert main([*FASHION_TINY, "--epochs", "1", "--output_dir", str(out)]) == 0
    finally:
        os.umask(previous)
    assert not any(p.exists() for p in stale) and unrelated.exists()
    assert stat.S_IMODE((out / "checkpoint.pth").stat().st_mode) == 0o664
    assert stat.S_IMODE((out / "checkpoint0000.pth").stat().st_mode) == 0o664


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB tmpfs (one tiny checkpoint fits, two do not); skipped where mounting is not allowed."""
    yield from mounted_tmpfs(tmp_path / "disk", "3m")


@needs_fashion
def test_disk_full_during_a_save_names_path_and_free_space_and_keeps_the_checkpoint(tiny_disk, capsys):
    out = tiny_disk / "run"
    code = main([*FASHION_TINY, "--epochs", "2", "--saveckp_freq", "0", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert re.search(r"cannot write \S+checkpoint\.pth \(the disk is full; [\d.]+ MiB free", err), err
    assert "checkpoint.pth is unchanged" in err and "Traceback" not in err
    assert state_of(out / "checkpoint.pth")["epoch"] == 1  # the epoch-0 checkpoint survived, readable
    assert not list(out.glob(".*.tmp"))


def test_linear_probe_refuses_to_resume_onto_other_weights_or_key(tmp_path, capsys):
    import shutil

    import simpool.evaluation.run_linear as run_linear

    data = photo_folder(tmp_path / "photos", per_class=3)
    dino = tmp_path / "dino"
    assert main([*TINY, "--data_path", str(data), "--epochs", "1", "--output_dir", str(dino)]) == 0
    weights = dino / "checkpoint.pth"
    other = tmp_path / "other.pth"
    shutil.copy(weights, other)
    probe = tmp_path / "probe"
    common = ["--data_path", str(data), "--image_size", "16", "--num_workers", "0", "--batch_size_per_gpu", "4",
              "--epochs", "1", "--output_dir", str(probe)]
    assert run_linear.main(["--pretrained_weights", str(weights), *common]) == 0
    capsys.readouterr()
    assert run_linear.main(["--pretrained_weights", str(weights), "--checkpoint_key", "student", *common]) == 2
    assert "checkpoint_key teacher -> student" in capsys.readouterr().err
    assert run_linear.main(["--pretrained_weights", str(other), *common]) == 2
    err = capsys.readouterr().err
    assert "holds a probe of other features or flags: weights" in err and "other.pth" in err
    assert run_linear.main(["--pretrained_weights", str(weights), *common]) == 0  # the same ones: fine
