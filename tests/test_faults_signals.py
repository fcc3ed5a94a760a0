"""Fault injection, signals: what a cluster does to a running job (SIGTERM to process groups with loader
workers, to torchrun, to one rank only; stops on an epoch's last batch; kills during the bookkeeping and at
random moments, even mid-save; submitit's local requeue).

Real processes throughout: ``setsid`` process groups (``start_new_session``), real signals, 2 gloo processes through
torchrun. In-process ``main()`` runs are used where no process boundary is involved (2 s to start instead of 10).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simpool.dino.run_train import main
from tests.helpers import (
    FASHION_TINY,
    REPO,
    Killed,
    assert_same_weights,
    children,
    finish,
    free_port,
    log_lines,
    needs_fashion,
    needs_proc,
    read_until,
    run_cli,
    start,
    state_of,
    teacher,
)


# ---------------------------------------------------------------------------------------------------------
# preemption that always saves
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
                "--master_port", str(free_port())]
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
                "--master_port", str(free_port())]
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
    from simpool.dino.online_knn import OnlineKNN

    out = tmp_path / "run"
    flags = [*FASHION_TINY, "--epochs", "1", "--output_dir", str(out)]

    def killed(self, backbone):
        raise Killed  # the process dies here, after the epoch's checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(OnlineKNN, "evaluate", killed)
        with pytest.raises(Killed):
            main(flags)
    assert not (out / "log.txt").exists() or not (out / "log.txt").read_text()
    assert state_of(out / "checkpoint.pth")["pending_epoch_end"]["epoch"] == 0
    assert main(flags) == 0
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0] and "knn" in lines[0] and "train_loss" in lines[0]


# ---------------------------------------------------------------------------------------------------------
# soak (make test-slow): random SIGKILLs, mid-save included, end on the uninterrupted run's weights
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_fashion
def test_random_sigkills_even_mid_save_end_on_the_uninterrupted_weights(tmp_path):
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
