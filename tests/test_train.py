"""train_dino.py end to end on tiny settings: runs, resume, preemption, DDP on gloo, bad data, bad flags."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.dino.run_train import main
from tests.helpers import FASHION_TINY, REPO, TINY, assert_same_weights, free_port, needs_fashion, run_cli, teacher


@needs_fashion
def test_short_run_writes_checkpoint_log_and_args(tmp_path):
    out = tmp_path / "run"
    code = main([*FASHION_TINY, "--epochs", "1", "--output_dir", str(out), "--knn_baselines", "True"])
    assert code == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["iteration"] == 5 and state["epoch"] == 1
    assert {"student", "teacher", "optimizer", "dino_loss", "rng", "args", "step"} <= state.keys()
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert "knn_baselines" in lines[0]
    epoch_log = lines[-1]
    for key in ("train_loss", "train_entropy", "train_KL_div", "train_lr", "train_wd", "epoch", "knn"):
        assert key in epoch_log
    assert np.isfinite(epoch_log["train_loss"])
    assert (out / "args.yaml").read_text().count("arch: vit_tiny") == 1
    assert (out / "checkpoint0000.pth").is_file()


@needs_fashion
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_cli([*FASHION_TINY, "--epochs", "2", "--output_dir", str(full)]).returncode == 0
    for stop in (3, 5):  # mid-epoch, then exactly at the epoch boundary
        result = run_cli([*FASHION_TINY, "--epochs", "2", "--output_dir", str(resumed),
                          "--exit_after_iterations", str(stop)])
        assert result.returncode == 0, result.stderr
        assert f"stopped after iteration {stop} (--exit_after_iterations)" in result.stdout
        assert torch.load(resumed / "checkpoint.pth", weights_only=True)["iteration"] == stop
    result = run_cli([*FASHION_TINY, "--epochs", "2", "--output_dir", str(resumed)])
    assert result.returncode == 0 and "resumed from" in result.stdout
    assert_same_weights(teacher(full / "checkpoint.pth"), teacher(resumed / "checkpoint.pth"))


@needs_fashion
def test_checkpoint_of_another_format_version_is_refused_not_misloaded(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FASHION_TINY, "--epochs", "1", "--output_dir", str(out)]) == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    state["simpool_format"] = 1  # the two-group optimizer layout of earlier versions
    torch.save(state, out / "checkpoint.pth")
    capsys.readouterr()
    assert main([*FASHION_TINY, "--epochs", "2", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not a DINO training checkpoint of this version (format 1;" in err and "Traceback" not in err


@needs_fashion
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train_dino.py"), *FASHION_TINY, "--epochs", "200",
                             "--output_dir", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if line.startswith("epoch 0 [2/5]"):
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, output
    assert "preempted" in output
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 2 <= state["iteration"] < 1000
    result = run_cli([*FASHION_TINY, "--epochs", "1", "--output_dir", str(out)])
    assert result.returncode == 0 and "resumed from" in result.stdout


def _photo_folder(root: Path, corrupt: bool) -> Path:
    from skimage import data

    photos = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(), "astronaut": data.astronaut()}
    for split in ("train", "val"):
        for name, pixels in photos.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            image = Image.fromarray(pixels)
            for i in range(4 if split == "train" else 2):
                image.crop((i * 10, i * 5, i * 10 + 120, i * 5 + 100)).resize((48, 40)).save(folder / f"{i}.jpg")
    if corrupt:
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    data = _photo_folder(tmp_path / "photos", corrupt=True)
    out = tmp_path / "run"
    args = [*TINY, "--data_path", str(data), "--epochs", "1", "--output_dir", str(out), "--nb_knn", "1", "3"]
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(args) == 0
    epoch_log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert epoch_log["train_unreadable_images"] == 1
    assert set(epoch_log["knn"]) == {"1", "3"}  # train/ and val/ beside each other: online k-NN ran


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--arch", "vit_gigantic"], "--arch"),
        (["--epochs", "-1"], "--epochs"),
        (["--global_crops_scale", "0.4", "1.5"], "--global_crops_scale"),
        (["--local_crops_scale", "0"], "--local_crops_scale"),
        (["--data_path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    ],
)
def test_bad_flags_fail_before_any_model_is_built(tmp_path, flags, message, capsys, monkeypatch):
    import simpool.dino.build as build

    built = []
    monkeypatch.setattr(build, "build_student_teacher", lambda *a, **k: built.append(1))
    base = [*TINY, "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    assert main([*base, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not built


def test_missing_data_path_is_reported(capsys):
    assert main([*TINY]) == 2
    assert "--data_path" in capsys.readouterr().err


def test_config_file_and_explicit_flags(tmp_path):
    from simpool.dino.config import parse_args

    config = tmp_path / "args.yaml"  # the fork's args.yaml style, tuples included
    config.write_text("arch: convnext_small\nmode: simpool\ngamma: null\nglobal_crops_scale: !!python/tuple\n"
                      "- 0.14\n- 1.0\nuse_fp16: false\nepochs: 7\nwarmup_teacher_temp_epochs: 2\n"
                      "warmup_epochs: 1\n"
                      "data_path: fashion-mnist\nbackend: nccl\n")
    args = parse_args(["--config", str(config), "--epochs", "3"])
    assert args.arch == "convnext_small" and args.gamma is None and args.epochs == 3
    assert args.global_crops_scale == (0.14, 1.0) and args.use_fp16 is False
    assert args.warmup_teacher_temp_epochs == 2 and args.backend == "nccl"


@pytest.mark.parametrize(("line", "message"), [
    ("epochs: 7.5", "epochs: 7.5 is not a valid value"),          # int flag: like --epochs 7.5
    ("mode: fancy", "invalid choice: 'fancy'"),  # choices are checked
    ("use_bn_in_head: maybe", "expected True or False"),
    ("color: red\nsize: 3", "unknown flags ['color', 'size']"),
])
def test_config_file_values_get_the_command_line_validation(tmp_path, line, message):
    from simpool.dino.config import ConfigError, parse_args

    config = tmp_path / "bad.yaml"
    config.write_text(f"data_path: fashion-mnist\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--config", str(config)])


def test_config_file_values_are_converted_like_flags(tmp_path):
    from simpool.dino.config import parse_args

    config = tmp_path / "c.yaml"
    config.write_text("data_path: fashion-mnist\narch: vit_small\nlr: 1e-3\nmin_lr: 0\nnb_knn: [5, 7]\ngamma: auto\n"
                      "model_overrides: {depth: 2}\n")
    args = parse_args(["--config", str(config), "--nb_knn", "3"])
    assert args.lr == 1e-3 and isinstance(args.min_lr, float)  # PyYAML reads 1e-3 as a string; float() as a flag
    assert args.nb_knn == [3] and args.gamma == "auto" and args.model_overrides == {"depth": 2}


@needs_fashion
def test_two_gloo_processes_keep_identical_teachers(tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    result = run_cli([*FASHION_TINY, "--subset", "4", "--epochs", "1", "--output_dir", str(out)], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert epoch_log["teacher_rank_max_diff"] == 0.0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 5  # 40 images / (2 x 4)


@needs_fashion
def test_two_nodes_rendezvous_on_localhost(tmp_path):
    out = tmp_path / "nodes"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", port,
                   str(REPO / "train_dino.py"), *FASHION_TINY, "--subset", "4", "--epochs", "1",
                   "--output_dir", str(out)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(0.5)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    epoch_log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert epoch_log["teacher_rank_max_diff"] == 0.0


@pytest.mark.parametrize("config", sorted(p for p in (REPO / "configs").glob("*.yaml")
                                           if not p.name.startswith(("finetune_", "benchmark_"))), ids=lambda p: p.stem)
def test_shipped_configs_parse(config):
    from simpool.dino.config import parse_args

    args = parse_args(["--config", str(config), "--data_path", "fashion-mnist"])
    assert args.epochs > 0 and args.arch
    assert args.accum_steps >= 1 and 0 < args.center_momentum <= 1
    assert args.batch_size_per_gpu * args.accum_steps <= 1024 and args.out_dim > 0


@needs_fashion
def test_wandb_offline_logging(tmp_path):
    """--wandb_project logs through W&B; WANDB_MODE=offline keeps it on disk (no network)."""
    out = tmp_path / "run"
    result = run_cli([*FASHION_TINY, "--epochs", "1", "--output_dir", str(out), "--wandb_project", "simpool-test"],
                     env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
