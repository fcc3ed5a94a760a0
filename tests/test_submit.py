"""launch/submit.py through submitit's LocalExecutor: a preempted job requeues itself and resumes exactly.

The cluster side is simulated the way submitit's local Controller does it at a job's time limit: the
preemption signal (USR2) goes to the task process. ``LocalJob._interrupt()`` is not used: in submitit 1.5 it
signals the Controller, which has no handler for USR2 and dies, leaving the task running unsupervised.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import (
    FASHION_TINY,
    LAUNCHER_VARIABLES,
    REPO,
    TINY,
    assert_same_weights,
    free_port,
    load_submit_module,
    needs_fashion,
    teacher,
)

submitit = pytest.importorskip("submitit")
from submitit.local.local import LocalJobEnvironment  # noqa: E402 - only once submitit is known to exist

EPOCHS = ["--epochs", "3"]  # 15 steps: the signal lands mid-run, well before the last step
DEADLINE_S = 240  # whole-test guard on a loaded machine; the test normally takes ~30 s
def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc): the task processes of a local submitit Controller."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in children.read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def wait_for(condition, what: str, deadline: float, poll_s: float = 0.02) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def read_text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""




def kill_job(job) -> None:
    """SIGKILL a local job that is still running: its Controller (stopped first, so that it cannot start
    another task) and the Controller's tasks. Only processes this test started."""
    controller = job._process
    if controller is None or controller.poll() is not None:
        return
    controller.send_signal(signal.SIGSTOP)
    for pid in child_pids(controller.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    controller.kill()
    controller.wait(timeout=30)


@needs_fashion
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the job's task through Linux /proc")
def test_preempted_local_job_requeues_and_matches_uninterrupted_run(tmp_path, monkeypatch):
    submit = load_submit_module()
    deadline = time.monotonic() + DEADLINE_S
    for name in LAUNCHER_VARIABLES:  # the test's own launcher must not leak into the job
        monkeypatch.delenv(name, raising=False)
    # One thread in every process: CPU results are then bitwise reproducible. The LocalExecutor passes this
    # environment on to the job; submit_job prepends the checkout to PYTHONPATH (restored by monkeypatch).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    # The job joins a one-process gloo group; a free port, not the one submit.py derives from the job id.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    train_flags = [*FASHION_TINY, *EPOCHS]
    full, preempted = tmp_path / "full", tmp_path / "preempted"
    args = submit.get_args_parser().parse_args(
        ["--local", "--ngpus", "0", "--cpus_per_task", "1", "--timeout", "30", "--max_requeues", "2",
         "--output_dir", str(preempted), "--", *train_flags]
    )

    # The uninterrupted reference runs at the same time as the job (each is single-threaded).
    with (tmp_path / "full.log").open("w") as reference_log:
        reference = subprocess.Popen(
            [sys.executable, str(REPO / "train_dino.py"), *train_flags, "--output_dir", str(full)],
            env=dict(os.environ), stdout=reference_log, stderr=subprocess.STDOUT,
        )
    try:
        job = submit.submit_job(args)
        try:
            stdout = job.paths.stdout
            # Preempt after a few steps, as the cluster would: the signal goes to the task process.
            wait_for(lambda: "epoch 0 [2/5]" in read_text(stdout) or job.done(), "the job's 2nd step", deadline)
            assert not job.done(), f"job ended before it was preempted:\n{read_text(stdout)}{job.stderr()}"
            tasks = child_pids(job._process.pid)
            assert len(tasks) == 1, tasks
            os.kill(tasks[0], LocalJobEnvironment._usr_sig())
            wait_for(job.done, "the requeued job to finish", deadline, poll_s=0.2)
        finally:
            kill_job(job)
        output = job.stdout() or ""
        assert job.result() == 0, output + (job.stderr() or "")
        reference.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    assert reference.returncode == 0, (tmp_path / "full.log").read_text()[-3000:]
    # First run: saved at the preemption and handed the signal to submitit, which requeued the job.
    assert re.search(r"preempted \(SIG\w+\): saved", output), output
    assert "Requeued job" in output, output  # submitit's INFO log goes to the job's stdout
    assert output.count("Starting with JobEnvironment") == 2, output
    # Second run: resumed mid-training from the checkpoint the first one wrote, and trained to the end.
    resumed = re.search(r"resumed from \S+ at epoch \d+, iteration (\d+)", output)
    assert resumed, output
    assert 2 <= int(resumed.group(1)) < 15, resumed.group(0)
    state = torch.load(preempted / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 15 and state["epoch"] == 3
    assert_same_weights(teacher(full / "checkpoint.pth"), state["teacher"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--local", "--nodes", "2", "--", "--epochs", "1"], "--nodes 1"),
        (["--local", "--", "--epochs", "1", "--output_dir", "elsewhere"], "--output_dir"),
    ],
)
def test_bad_flags_are_refused_before_submitting(tmp_path, flags, message, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    submit = load_submit_module()
    out = tmp_path / "run"
    assert submit.main(["--output_dir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was submitted


def test_train_argv_and_distributed_env():
    submit = load_submit_module()
    args = submit.get_args_parser().parse_args(["--output_dir", "runs/x", "--", "--arch", "vit_small"])
    assert submit.train_argv(args) == ["--arch", "vit_small", "--output_dir", str(Path("runs/x").resolve())]
    two_nodes = SimpleNamespace(num_nodes=2, hostnames=["node07", "node08"], global_rank=9, num_tasks=16,
                                local_rank=1, job_id="1234_5")
    env = submit.distributed_env(two_nodes)
    assert env["RANK"] == "9" and env["WORLD_SIZE"] == "16" and env["LOCAL_RANK"] == "1"
    if "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ:
        assert env["MASTER_ADDR"] == "node07"
        assert env["MASTER_PORT"] == str(submit.master_port("1234_5"))
    assert 20000 <= submit.master_port("1234_5") < 40000
    assert submit.master_port("1234_5") != submit.master_port("1234_6")


def test_submit_local_wait_returns_the_jobs_exit_code(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    submit = load_submit_module()
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    code = submit.main(["--local", "--wait", "--ngpus", "0", "--cpus_per_task", "1", "--timeout", "5",
                        "--output_dir", str(tmp_path / "job"), "--", *TINY, "--data_path", "/nonexistent/data"])
    out = capsys.readouterr().out
    assert code == 2, out
    assert "returned 2" in out
