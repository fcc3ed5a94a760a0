"""Fault injection, Ctrl-C: the first SIGINT saves like SIGTERM and exits 130 (trainer, fine-tuning, probes), a second
one ends the process at once without a traceback and without a half-written checkpoint; drivers without a loop of
steps (k-NN, export) exit 130 in one line and leave no partial file.

Real processes where a process boundary matters (a process group with loader workers, the second SIGINT);
in-process runs with ``signal.raise_signal`` otherwise (the same handlers, 2 s to start instead of 10).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    FASHION_TINY,
    REPO,
    children,
    finish,
    needs_fashion,
    needs_proc,
    photo_folder,
    read_until,
    release,
    start,
    state_of,
)

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


@needs_fashion
@needs_proc
def test_ctrl_c_to_the_process_group_with_loader_workers_saves_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start([*FASHION_TINY, "--subset", "200", "--num_workers", "2", "--epochs", "200", "--output_dir", str(out)])
    try:
        seen = read_until(proc, "epoch 0 [2/500]")
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:  # a terminal's Ctrl-C reaches every process of the foreground group
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert all(Path(f"/proc/{pid}").exists() for pid in workers), "a loader worker died of SIGINT"
        os.killpg(proc.pid, signal.SIGINT)
        output = finish(proc, seen)
    finally:
        release(proc)
    assert proc.returncode == INTERRUPTED, output[-3000:]
    assert "interrupted (SIGINT): saved" in output and "Traceback" not in output, output[-3000:]
    assert "press Ctrl-C again to quit at once" in output
    state = state_of(out / "checkpoint.pth")
    assert state["iteration"] >= 2 and state["epoch_sample"] == 4 * (state["iteration"] % 500)


SLOW_SAVE = """
import os, runpy, signal, sys, time
real_fsync = os.fsync
def fsync_after_ctrl_c(fd):  # once Ctrl-C was pressed (SIGINT back to its default), a save takes a minute
    real_fsync(fd)
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        print("SAVING", flush=True)
        time.sleep(60)
os.fsync = fsync_after_ctrl_c
sys.argv = ["train_dino.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


@needs_fashion
def test_a_second_ctrl_c_during_a_long_save_ends_at_once_and_the_checkpoint_stays_whole(tmp_path):
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(SLOW_SAVE.format(script=str(REPO / "train_dino.py")))
    out = tmp_path / "run"
    flags = [*FASHION_TINY, "--epochs", "200", "--output_dir", str(out)]
    proc = start(flags, script=str(wrapper))
    try:
        seen = read_until(proc, "epoch 1 [1/5]")  # epoch 0's checkpoint is written (at normal speed)
        os.killpg(proc.pid, signal.SIGINT)
        seen = read_until(proc, "SAVING")  # the save of the stop, now slow
        pressed = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        elapsed = time.monotonic() - pressed
    finally:
        release(proc)
    assert proc.returncode == -signal.SIGINT, seen + rest  # SIGINT's default action: the process ends
    assert elapsed < 5 and "Traceback" not in seen + rest
    state = state_of(out / "checkpoint.pth")  # the previous checkpoint, whole
    assert (state["epoch"], state["epoch_sample"]) == (1, 0)
    # the abandoned save's temporary file, never renamed (the next run removes it: test_faults_resume)
    assert list(out.glob(".checkpoint.pth.*.tmp"))


@needs_fashion
def test_ctrl_c_in_fine_tuning_saves_mid_epoch_exits_130_and_restores_the_handler(tmp_path, monkeypatch, capsys):
    from simpool.finetune.engine import FineTuneStep
    from simpool.finetune.run_finetune import main

    calls = []
    real_step = FineTuneStep.__call__

    def step_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        loss = real_step(self, *args, **kwargs)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(FineTuneStep, "__call__", step_then_ctrl_c)
    out = tmp_path / "ft"
    flags = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "7", "--model_overrides",
             "depth=1", "embed_dim=32", "num_heads=2", "img_size=28", "--input_size", "28", "--batch_size_per_gpu",
             "4", "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "0", "--precision", "fp32",
             "--data_path", "fashion-mnist", "--subset", "4", "--val_subset", "1", "--output_dir", str(out)]
    assert main(flags) == INTERRUPTED
    printed = capsys.readouterr()
    assert "interrupted (SIGINT): saved" in printed.out, printed.out[-2000:]
    # the ranks agree before each step: the one after the signal is made with it, then the run saves and stops
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the driver put Python's back


def _probe_flags(data: Path, out: Path) -> list[str]:
    return ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "4", "--model_overrides",
            "depth=1", "embed_dim=32", "num_heads=2", "--data_path", str(data), "--image_size", "16",
            "--num_workers", "0", "--batch_size_per_gpu", "4", "--epochs", "3", "--cached_features", "True",
            "--lrs", "0.1", "1.0", "--output_dir", str(out)]


def test_ctrl_c_in_the_linear_probe_keeps_the_last_epoch_and_the_relaunch_ends_on_the_same_bits(
        tmp_path, monkeypatch, capsys):
    from simpool.evaluation import run_linear
    from simpool.evaluation.linear import MultiLRLinear

    data = photo_folder(tmp_path / "photos", per_class=4, val_per_class=2)  # 8 train: 2 batches an epoch
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_linear.main(_probe_flags(data, straight)) == 0
    forward = MultiLRLinear.forward
    calls = []

    def forward_then_ctrl_c(self, x):  # calls: epoch 0 train, train, val; epoch 1 train (4th): Ctrl-C
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)
        return forward(self, x)

    monkeypatch.setattr(MultiLRLinear, "forward", forward_then_ctrl_c)
    capsys.readouterr()
    assert run_linear.main(_probe_flags(data, stopped)) == INTERRUPTED
    out = capsys.readouterr().out
    assert "interrupted (SIGINT) during epoch 1: that epoch is dropped" in out, out[-2000:]
    assert torch.load(stopped / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(MultiLRLinear, "forward", forward)
    assert run_linear.main(_probe_flags(data, stopped)) == 0
    a, b = (torch.load(d / "checkpoint.pth.tar", weights_only=True)["heads"] for d in (straight, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_in_the_knn_exits_130_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from simpool.evaluation import run_knn

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the features are extracted

    monkeypatch.setattr(run_knn, "extract_features", interrupted)
    data = photo_folder(tmp_path / "photos", per_class=2, val_per_class=1)
    out = tmp_path / "knn"
    code = run_knn.main(["--random_init", "--arch", "vit_tiny", "--patch_size", "4", "--model_overrides", "depth=1",
                         "embed_dim=32", "num_heads=2", "--data_path", str(data), "--image_size", "16",
                         "--num_workers", "0", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == INTERRUPTED and err.startswith("interrupted (Ctrl-C)") and len(err.splitlines()) == 1, err
    assert not (out / "knn.json").exists()


def test_ctrl_c_in_an_export_leaves_the_previous_export_whole(tmp_path, monkeypatch, capsys):
    import simpool.export as export
    from simpool.cli.run_export import main
    from simpool.models import build_backbone

    model = build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=32, num_heads=2)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "export"
    flags = [str(weights), str(out), "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8",
             "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2"]
    assert main(flags) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = export._save

    def save_then_ctrl_c(tensors, path):
        real_save(tensors, path)  # the new weights are on disk (in the folder being written)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_save", save_then_ctrl_c)
    assert main([*flags[:2], "--gamma", "2.0", *flags[2:]]) == INTERRUPTED
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == [".export.simpool.lock", "export"]


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signals_keep_exit_0_and_their_handler_until_the_end(first):
    from simpool.run.stop import StopControl, restore_signal_handlers

    control = StopControl()
    try:
        signal.raise_signal(first)
        assert control.agree(1).stop.value == "preempted" and not control.signals.interrupted
        signal.raise_signal(signal.SIGINT)
        assert control.agree(2).stop.value == "interrupted"  # Ctrl-C wins: every rank exits 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second Ctrl-C ends the process
    finally:
        restore_signal_handlers()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
