"""Fault injection: what a cluster does to a run (signals to process groups, torchrun, requeues on another
number of processes or batch size, unreadable batches, bad configs, disk full, corrupt checkpoints).

Real processes throughout: ``setsid`` process groups (``start_new_session``), real signals, 2 gloo processes
through torchrun, a real tiny tmpfs for the disk-full case (skipped where it cannot be mounted). In-process
``main()`` runs are used where no process boundary is involved, because they start in 2 s instead of 10.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.dino.run_train import main
from tests.conftest import REPO
from tests.test_train import FASHION_TINY, TINY, _free_port, needs_fashion, run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def state_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def start(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    """train_dino.py (or a launcher running it) as the leader of a new process group, like a SLURM step."""
    command = [*(launcher or [sys.executable]), str(REPO / "train_dino.py"), *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_until(proc: subprocess.Popen, marker: str) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} never printed:\n{''.join(seen)[-3000:]}")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def finish(proc: subprocess.Popen, seen: str) -> str:
    try:
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return seen + rest


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds child processes in /proc")


# ---------------------------------------------------------------------------------------------------------
# 1. preemption that always saves
# ---------------------------------------------------------------------------------------------------------
@needs_fashion
@needs_proc
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_zero(tmp_path):
    """Workers get the signal first (the order that broke the save), then the whole group gets it."""
    out = tmp_path / "run"
    # 2,000 images, 500 steps per epoch: the epoch (and its workers, which each epoch starts anew) outlives the
    # test's signals; with 50 steps an idle machine finished the epoch within the 0.5 s below
    proc = start([*FASHION_TINY, "--subset", "200", "--num_workers", "2", "--epochs", "200", "--output_dir", str(out)])
    seen = read_until(proc, "epoch 0 [2/500]")
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(Path(f"/proc/{pid}").exists() for pid in workers), "a loader worker died of SIGTERM"
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM and `docker stop` do
    output = finish(proc, seen)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted (SIGTERM): saved" in output and "Traceback" not in output, output[-3000:]
    state = state_of(out / "checkpoint.pth")
    assert state["iteration"] >= 2 and state["epoch_sample"] == 4 * (state["iteration"] % 500)


@needs_fashion
def test_torchrun_under_sigterm_exits_zero_and_one_process_continues_at_the_same_sample(tmp_path):
    """torchrun on 2 processes gets SIGTERM; the requeued job runs on 1 process (2 -> 1)."""
    out = tmp_path / "ddp"
    launcher = [sys.executable, str(REPO / "launch" / "torchrun.py"), "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    flags = [*FASHION_TINY, "--subset", "4", "--output_dir", str(out)]  # 40 images: 5 steps of 2 x 4
    proc = start([*flags, "--epochs", "200"], launcher)
    seen = read_until(proc, "epoch 0 [2/5]")
    proc.send_signal(signal.SIGTERM)  # torchrun alone: it forwards the signal to its workers
    output = finish(proc, seen)
    assert proc.returncode == 0, output[-3000:]
    assert "all 2 local worker(s) saved a checkpoint" in output, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-3000:]
    state = state_of(out / "checkpoint.pth")
    epoch, sample = state["epoch"], state["epoch_sample"]
    assert state["iteration"] >= 2 and sample == 8 * (state["iteration"] % 5)

    one = run_cli([*flags, "--epochs", str(epoch + 1)])
    assert one.returncode == 0, one.stderr[-3000:]
    assert "elastic resume: processes 2 -> 1" in one.stdout, one.stdout
    assert f"epoch {epoch} continues at sample {sample}" in one.stdout
    assert [line["epoch"] for line in log_lines(out)] == list(range(epoch + 1))  # none skipped or repeated
    final = state_of(out / "checkpoint.pth")
    assert (final["epoch"], final["epoch_sample"]) == (epoch + 1, 0)
    assert final["iteration"] == state["iteration"] + (40 - sample) // 4


@needs_fashion
@needs_proc
def test_sigterm_to_one_rank_only_stops_both_ranks_after_one_save(tmp_path):
    """Ranks may get the signal at different times, or only some of them: they agree at the next batch."""
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    proc = start([*FASHION_TINY, "--subset", "4", "--epochs", "200", "--output_dir", str(out)], launcher)
    seen = read_until(proc, "epoch 0 [2/5]")
    ranks = {}
    for pid in children(proc.pid):
        environ = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        ranks[environ[b"RANK"]] = pid
    os.kill(ranks[b"1"], signal.SIGTERM)  # rank 1 only; rank 0 logs
    output = finish(proc, seen)
    assert proc.returncode == 0, output[-3000:]  # both workers returned 0: plain torchrun is content
    assert "preempted (a signal to another rank): saved" in output and "Traceback" not in output, output[-3000:]
    assert state_of(out / "checkpoint.pth")["iteration"] >= 2


# ---------------------------------------------------------------------------------------------------------
# 2. elastic resume
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
                "--master_port", str(_free_port())]
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
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    capsys.readouterr()
    changed = [*FASHION_TINY, "--epochs", "2", "--output_dir", str(out), "--mode", "official", "--out_dim", "128",
               "--arch", "vit_small"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "--arch vit_tiny -> vit_small" in err and "--mode simpool -> official" in err, err
    assert "--out_dim 64 -> 128" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert after == before  # args.yaml included
    assert main([*FASHION_TINY, "--epochs", "2", "--output_dir", str(out), "--subset", "3"]) == 2
    err = capsys.readouterr().err
    assert "another data set (20 images then, 30 now" in err and "--subset 2 -> 3" in err, err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_a_moved_copy_of_the_data_set_resumes(tmp_path, capsys):
    import shutil

    data = _photos(tmp_path / "photos")
    out = tmp_path / "run"
    flags = [*TINY, "--epochs", "1", "--output_dir", str(out)]
    assert main([*flags, "--data_path", str(data), "--exit_after_iterations", "1"]) == 0
    moved = shutil.copytree(data, tmp_path / "scratch" / "photos")
    assert main([*flags, "--data_path", str(moved)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert state_of(out / "checkpoint.pth")["iteration"] == 3


# ---------------------------------------------------------------------------------------------------------
# 3. nothing lost at boundaries
# ---------------------------------------------------------------------------------------------------------
def _photos(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _corrupt_batch(root: Path, world: int, batch: int, rank: int) -> list[str]:
    """Overwrite the files of ``rank``'s first batch of epoch 0 (as the training sampler deals them)."""
    from simpool.data import ImageFolderDataset, ResumableDistributedSampler

    dataset = ImageFolderDataset(root / "train")
    sampler = ResumableDistributedSampler(dataset, batch_size=batch, num_replicas=world, rank=rank, seed=0,
                                          drop_last=True)
    sampler.set_epoch(0)
    paths = [dataset.samples[i][0] for i in list(sampler)[:batch]]
    for path in paths:
        Path(path).write_bytes(b"not an image")
    return paths


def test_an_all_unreadable_batch_keeps_the_counter_exact(tmp_path):
    data = _photos(tmp_path / "photos")
    _corrupt_batch(data, world=1, batch=4, rank=0)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="unreadable"):
        assert main([*TINY, "--data_path", str(data), "--epochs", "2", "--output_dir", str(out)]) == 0
    lines = log_lines(out)
    assert lines[0]["train_skipped_batches"] == 1 and lines[0]["train_unreadable_images"] >= 4
    state = state_of(out / "checkpoint.pth")
    assert (state["epoch"], state["epoch_sample"], state["iteration"]) == (2, 0, 6)  # 12 images / 4, x 2


@pytest.mark.parametrize("accum_steps, steps", [(1, 3), (2, 1)])  # 12 images / (2 x 2 x accum_steps)
def test_an_all_unreadable_batch_on_one_of_two_ranks_skips_on_both(tmp_path, accum_steps, steps):
    """With --accum_steps 2 the unreadable batch is one micro-batch of a step: both ranks drop it and make the
    step from the other one (the same number of backward passes, else DDP would hang)."""
    data = _photos(tmp_path / "photos")
    _corrupt_batch(data, world=2, batch=2, rank=1)
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    flags = [*TINY, "--data_path", str(data), "--batch_size_per_gpu", "2", "--epochs", "1", "--output_dir", str(out),
             "--accum_steps", str(accum_steps)]
    result = run_cli(flags, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    line = log_lines(out)[-1]
    assert line["train_skipped_batches"] == 1 and line["teacher_rank_max_diff"] == 0.0
    assert line["train_skipped_steps"] == 0  # the step itself was made
    assert state_of(out / "checkpoint.pth")["iteration"] == steps


BOUNDARY = [*FASHION_TINY, "--epochs", "2", "--saveckp_freq", "1", "--eval_every", "1"]


@needs_fashion
def test_exit_after_one_epoch_finishes_the_epoch_and_the_relaunch_says_how_to_continue(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*BOUNDARY, "--output_dir", str(out), "--exit_after_iterations", "5"]
    assert main(flags) == 0
    assert "to continue, relaunch with --exit_after_iterations above 5, or without it" in capsys.readouterr().out
    assert [line["epoch"] for line in log_lines(out)] == [0] and "knn" in log_lines(out)[0]
    assert (out / "checkpoint0000.pth").is_file()
    assert main(flags) == 0  # the same command again: no step, the same advice
    assert "already at iteration 5 >= --exit_after_iterations 5: nothing to do" in capsys.readouterr().out
    assert state_of(out / "checkpoint.pth")["iteration"] == 5


@needs_fashion
def test_sigterm_during_the_last_batch_finishes_that_epoch_before_exiting(tmp_path, monkeypatch):
    from simpool.dino.step import DINOStep

    calls = []
    original = DINOStep.__call__

    def step_then_signal(self, crops, schedule):
        calls.append(1)
        stats = original(self, crops, schedule)
        if len(calls) == 5:  # the epoch's last batch
            signal.raise_signal(signal.SIGTERM)
        return stats

    monkeypatch.setattr(DINOStep, "__call__", step_then_signal)
    out = tmp_path / "run"
    assert main([*BOUNDARY, "--output_dir", str(out)]) == 0
    assert [line["epoch"] for line in log_lines(out)] == [0] and "knn" in log_lines(out)[0]
    assert (out / "checkpoint0000.pth").is_file()
    assert state_of(out / "checkpoint.pth")["epoch"] == 1


@needs_fashion
def test_a_kill_during_the_final_knn_is_redone_by_the_relaunch(tmp_path, monkeypatch):
    from simpool.dino.train import Trainer

    out = tmp_path / "run"
    flags = [*FASHION_TINY, "--epochs", "1", "--output_dir", str(out)]

    def killed(self):
        raise KeyboardInterrupt  # the process dies here, after the epoch's checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "online_knn", killed)
        with pytest.raises(KeyboardInterrupt):
            main(flags)
    assert not (out / "log.txt").exists() or not (out / "log.txt").read_text()
    assert state_of(out / "checkpoint.pth")["pending_epoch_end"]["epoch"] == 0
    assert main(flags) == 0
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0] and "knn" in lines[0] and "train_loss" in lines[0]


# ---------------------------------------------------------------------------------------------------------
# 4. checkpoint hygiene
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
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


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


# ---------------------------------------------------------------------------------------------------------
# 5. flag validation: the same for the command line and YAML, before a model is built
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("yaml_line", "flags", "message"), [
    ("epochs: ten", [], "epochs: 'ten' is not a valid value"),
    ("batch_size_per_gpu: 8.5", [], "batch_size_per_gpu: 8.5 is not a valid value"),
    ("precision: fp8", [], "invalid choice: 'fp8'"),
    ("use_bn_in_head: maybe", [], "expected True or False"),
    ("data_path: {a: 1}", [], "expected a single value, got a mapping"),
    ("global_crops_scale: 0.4", [], "--global_crops_scale must be two numbers"),
    ("epochs: [1, 2", [], "is not valid YAML at line"),
    ("", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("", ["--teacher_temp", "0"], "--teacher_temp must be a finite number > 0"),
    ("", ["--local_crops_size", "10"], "--local_crops_size 10 is not a multiple of --patch_size 4"),
    ("", ["--model_overrides", "depht=1"], "does not accept depht (did you mean depth?)"),
    ("warmup_teacher_temp: .nan", [], "--warmup_teacher_temp must be a finite number > 0, got nan"),
])
def test_bad_values_from_yaml_or_command_line_exit_2_in_one_line_before_any_model(
        tmp_path, monkeypatch, capsys, yaml_line, flags, message):
    import simpool.dino.build as build

    built = []
    monkeypatch.setattr(build, "build_student_teacher", lambda *a, **k: built.append(1))
    config = tmp_path / "c.yaml"
    config.write_text(f"{yaml_line}\n")
    base = [*TINY, "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    assert main([*base, "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not built and not (tmp_path / "out").exists()


def test_yaml_scalars_for_list_flags_read_like_the_command_line(tmp_path):
    from simpool.dino.config import parse_args

    config = tmp_path / "c.yaml"
    config.write_text("data_path: fashion-mnist\narch: vit_tiny\nnb_knn: 5\nmodel_overrides: depth=2\n")
    args = parse_args(["--config", str(config)])
    assert args.nb_knn == [5] and args.model_overrides == {"depth": 2}


# ---------------------------------------------------------------------------------------------------------
# 6. the smaller items
# ---------------------------------------------------------------------------------------------------------
def test_16_bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    from simpool.data.images import load_rgb_image

    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb_image(str(path)))
    assert pixels[..., 0].tolist() == [[0, 128], [255, 4]] and (pixels[..., 0] == pixels[..., 2]).all()


def test_linear_probe_refuses_to_resume_onto_other_weights_or_key(tmp_path, capsys):
    import shutil

    import simpool.evaluation.run_linear as run_linear

    data = _photos(tmp_path / "photos", per_class=3)
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
    assert "checkpoint_key teacher (now student)" in capsys.readouterr().err
    assert run_linear.main(["--pretrained_weights", str(other), *common]) == 2
    err = capsys.readouterr().err
    assert "heads trained on other features: weights" in err and "other.pth" in err
    assert run_linear.main(["--pretrained_weights", str(weights), *common]) == 0  # the same ones: fine


def test_visualiser_skips_and_counts_unreadable_images_and_keeps_same_stems_apart(tmp_path, capsys):
    from simpool.cli.visualize_attention import main as visualize
    from simpool.models import build_backbone

    model = build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=48, num_heads=2)
    weights = tmp_path / "model.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": "simpool", "patch_size": 8,
                         "model_overrides": {"depth": 1, "embed_dim": 48, "num_heads": 2}}}, weights)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / "photo.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "viz"
    code = visualize(["--pretrained_weights", str(weights), "--image_path", str(images), "--output_dir", str(out),
                      "--image_size", "32", "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert sorted(p.name for p in out.iterdir()) == ["photo_jpg", "photo_png"]
    assert "1 of 3 images skipped as unreadable: broken.jpg" in printed.out


def test_load_backbone_and_export_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    from simpool.export import export_backbone
    from simpool.loading import WEIGHTS_FILE, load_backbone
    from simpool.models import build_backbone

    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    model = build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=48, num_heads=2)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": "simpool", "patch_size": 8,
                         "model_overrides": {"depth": 1, "embed_dim": 48, "num_heads": 2}}}, checkpoint)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile is a file, not a folder"):
        export_backbone(checkpoint, tmp_path / "afile" / "export")
    out = export_backbone(checkpoint, tmp_path / "export")
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="cannot be read .*damaged or incomplete"):
        load_backbone(out)
    save_file({"x": torch.zeros(1)}, str(out / WEIGHTS_FILE))  # readable again: the usual key check applies
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone(out)


def test_submit_local_wait_returns_the_jobs_exit_code(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    from tests.test_submit import LAUNCHER_VARIABLES, load_submit_module

    submit = load_submit_module()
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    code = submit.main(["--local", "--wait", "--ngpus", "0", "--cpus_per_task", "1", "--timeout", "5",
                        "--output_dir", str(tmp_path / "job"), "--", *TINY, "--data_path", "/nonexistent/data"])
    out = capsys.readouterr().out
    assert code == 2, out
    assert "returned 2" in out


# ---------------------------------------------------------------------------------------------------------
# soak (make test-slow): random SIGKILLs, mid-save included, end on the uninterrupted run's weights
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_fashion
def test_random_sigkills_even_mid_save_end_on_the_uninterrupted_weights(tmp_path):
    from tests.test_train import assert_same_weights, teacher

    flags = [*FASHION_TINY, "--subset", "4", "--epochs", "3", "--save_every_steps", "1"]  # 30 steps
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli([*flags, "--output_dir", str(full)]).returncode == 0
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(9):  # 8 kills at random moments after the first step, then a run to the end
        proc = start([*flags, "--output_dir", str(killed)])
        try:
            if attempt == 8:
                proc.communicate(timeout=300)
                assert proc.returncode == 0
                break
            for line in proc.stdout:  # wait for this attempt's first step
                if "  loss " in line:
                    break
            time.sleep(float(rng.uniform(0.0, 0.8)))  # a step and its save take ~0.1-0.5 s here
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert kills >= 4
    assert_same_weights(teacher(full / "checkpoint.pth"), teacher(killed / "checkpoint.pth"))
    assert not list(killed.glob(".*.tmp"))
    epochs = []
    for line in (killed / "log.txt").read_text().splitlines():
        try:
            epochs.append(json.loads(line)["epoch"])
        except json.JSONDecodeError:  # a line cut by a kill; its epoch was logged again
            continue
    assert sorted(set(epochs)) == [0, 1, 2]
