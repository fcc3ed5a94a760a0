"""Collapse alarms: tiny runs driven into each collapse mode on purpose raise the right warning; a healthy one
none; --stop_on_collapse ends a run with a checkpoint, exit code 1 and the warning as its last line."""

from __future__ import annotations

import math

import pytest
import torch

from simpool.dino.collapse import CollapseMonitor, collapse_mode
from simpool.dino.config import ConfigError, parse_args
from simpool.dino.run_train import main
from simpool.dino.running_stats import RunningSums
from simpool.dino.step import StepSchedule
from tests.helpers import FASHION_TINY, REPO, needs_fashion, tiny_dino_step

K = 64


def monitored_run(teacher_temp: float, center_momentum: float, steps: int = 40, log_every: int = 5):
    """A tiny DINO run on noisy views of random images, its running sums fed to the monitor every log step as
    Trainer.report does; returns the readings and the warnings."""
    torch.manual_seed(0)
    step, _, _ = tiny_dino_step(out_dim=K, center_momentum=center_momentum)
    monitor = CollapseMonitor(K)
    g = torch.Generator().manual_seed(0)
    sums = RunningSums()
    readings, warnings = [], []
    for i in range(steps):
        images = torch.randn(16, 3, 16, 16, generator=g)
        small = torch.nn.functional.avg_pool2d(images, 2)
        crops = [images + 0.3 * torch.randn(images.shape, generator=g) for _ in range(2)]
        crops += [small + 0.3 * torch.randn(small.shape, generator=g) for _ in range(2)]
        stats = step(crops, StepSchedule(lr=1e-2, weight_decay=0.04, momentum=0.99, teacher_temp=teacher_temp))
        sums.add(stats)
        if (i + 1) % log_every == 0:
            reading, warning = monitor.observe(sums)
            readings.append(reading)
            if warning:
                warnings.append(warning)
    return readings, warnings


def test_uniform_collapse_from_a_flat_teacher_is_named():
    readings, warnings = monitored_run(teacher_temp=100.0, center_momentum=0.9)  # no sharpening at all
    assert readings[-1].entropy_fraction > 0.99 and readings[-1].kl < readings[0].kl
    assert len(warnings) == 1  # once, not at every log point
    assert warnings[0].startswith("collapse alarm: uniform collapse")
    assert "--teacher_temp" in warnings[0] and "--center_momentum" in warnings[0]


def test_one_prototype_collapse_without_centring_is_named():
    readings, warnings = monitored_run(teacher_temp=0.001, center_momentum=1.0)  # over-sharpened, no centre
    assert readings[-1].prototypes_in_use <= 2.0 and readings[-1].entropy_fraction < 0.05
    assert len(warnings) == 1 and warnings[0].startswith("collapse alarm: one prototype collapse")


def test_healthy_run_raises_no_alarm():
    readings, warnings = monitored_run(teacher_temp=0.04, center_momentum=0.9)
    assert warnings == []
    assert all(r.mode is None for r in readings)
    assert min(r.prototypes_in_use for r in readings) > 4 and max(r.entropy_fraction for r in readings) < 0.95


@pytest.mark.parametrize(("entropy", "kl", "prototypes", "mode"), [
    (0.99 * math.log(K), 0.01, 60.0, "uniform"),
    (0.99 * math.log(K), 2.0, 60.0, None),  # flat teacher the student does not follow (yet): no alarm
    (0.01, 0.5, 1.2, "one_prototype"),
    (0.01, 0.5, 30.0, None),  # sharp teacher over many prototypes: healthy DINO
])
def test_regions(entropy, kl, prototypes, mode):
    assert collapse_mode(entropy, kl, prototypes, K) == mode


def sums_of(loss: float, entropy: float, kl: float, prototypes_in_use: float, finite_steps: float) -> RunningSums:
    return RunningSums(values=torch.tensor([loss, entropy, kl, prototypes_in_use, finite_steps]))


def test_window_restarts_with_the_epoch_sums():
    monitor = CollapseMonitor(K, patience=2)
    collapsed = sums_of(4.0, 0.0, 4.0, prototypes_in_use=4.0, finite_steps=4.0)  # 4 steps: 1 prototype in use
    assert monitor.observe(collapsed)[1] is None
    healthy_after = sums_of(8.0, 0.0, 8.0, prototypes_in_use=84.0, finite_steps=8.0)  # next 4 steps: 20 in use
    reading, warning = monitor.observe(healthy_after)
    assert reading.prototypes_in_use == 20.0 and warning is None
    new_epoch = sums_of(1.0, 0.0, 1.0, 1.0, 1.0)  # sums restart at 0: the window is the new sums
    assert monitor.observe(new_epoch)[0].prototypes_in_use == 1.0
    assert monitor.observe(sums_of(2.0, 0.0, 2.0, 2.0, 2.0))[1].startswith("collapse alarm: one prototype")


def test_running_sums_skip_non_finite_steps_and_are_read_by_name():
    from simpool.dino.step import StepStats

    sums = RunningSums()
    for loss in (2.0, float("nan"), 4.0):
        value = torch.tensor(loss)
        sums.add(StepStats(loss=value, teacher_entropy=value * 0 + 1.0, kl=value * 0 + 0.5,
                           loss_is_finite=torch.isfinite(value), prototypes_in_use=torch.tensor(7.0)))
    assert float(sums.finite_steps) == 2.0 and float(sums["loss"]) == 6.0
    assert sums.means() == {"loss": 3.0, "entropy": 1.0, "kl": 0.5, "prototypes_in_use": 7.0}


@needs_fashion
def test_stop_on_collapse_saves_and_exits_1_with_the_warning_last(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*FASHION_TINY, "--epochs", "4", "--output_dir", str(out), "--stop_on_collapse", "True",
                 "--lr", "2", "--teacher_temp", "100", "--warmup_teacher_temp", "100"])  # a flat teacher
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1, lines[-5:]
    assert lines[-1].startswith("collapse alarm: uniform collapse"), lines[-5:]
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 3 <= state["iteration"] < 20  # stopped early (4 epochs of 5 steps), on the log step of the alarm
    assert (out / "progress.jsonl").read_text().count("prototypes") == state["iteration"]


def test_local_crops_not_divisible_by_the_patch_stop_before_training():
    """Found by the sweep: --patch_size 4 with the demo's 14 px local crops failed after the k-NN baselines."""
    with pytest.raises(ConfigError, match="--local_crops_size 14 is not a multiple of --patch_size 4"):
        parse_args(["--config", str(REPO / "configs" / "demo.yaml"), "--patch_size", "4"])
