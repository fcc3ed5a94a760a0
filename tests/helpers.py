"""What several test modules share: tiny model and run settings, data guards, a free port, command-line runners,
real-process helpers, small checkpoints. Test modules import from here, never from one another.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
# Checkpoints written by the reference code and the features it computes (../shared beside the repository).
FIXTURE_DIRS = [
    Path(os.environ.get("SIMPOOL_FIXTURES", REPO / "tests" / "fixtures" / "reference")),
    REPO.parent / "shared" / "fixtures" / "reference",
]
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist is not installed")
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds child processes in /proc")

# ----------------------------------------------------------------------------------------------------------
# tiny settings
# ----------------------------------------------------------------------------------------------------------
TINY_VIT = {"depth": 2, "embed_dim": 192, "num_heads": 3}
TINY_RESNET = {"layers": (1, 1, 1, 1)}
TINY_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (32, 64, 128, 256)}

# train_dino.py on a 1-block ViT at 16 px: a step in milliseconds, single-threaded and bitwise reproducible.
TINY = [
    "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "4",
    "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2",
    "--global_crops_size", "16", "--local_crops_size", "8", "--local_crops_number", "2",
    "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--use_bn_in_head", "False",
    "--batch_size_per_gpu", "4", "--num_workers", "0", "--precision", "fp32", "--optimizer", "adamw",
    "--lr", "0.001", "--min_lr", "1e-5", "--warmup_epochs", "0", "--warmup_teacher_temp_epochs", "0",
    "--eval_every", "0", "--nb_knn", "1", "--knn_max_images", "20", "--log_every", "1",
    "--drop_path_rate", "0.1", "--freeze_last_layer", "1",
]
FASHION_TINY = [*TINY, "--data_path", "fashion-mnist", "--subset", "2"]  # 20 images: 5 steps per epoch


def tiny_dino_step(out_dim: int = 64, center_momentum: float = 0.9, clip_grad: float = 3.0, precision: str = "fp32",
                   optimizer: str = "adamw", use_bn: bool = False, img_size: int = 16):
    """A DINOStep on a 1-block ViT (patch 4, width 32) with a small head: (step, student, teacher)."""
    import copy

    from simpool.dino import DINOHead, DINOLoss, DINOStep, MultiCropWrapper, build_optimizer, get_params_groups

    backbone = build_backbone("vit_tiny", patch_size=4, depth=1, embed_dim=32, num_heads=2, img_size=img_size)
    student = MultiCropWrapper(backbone, DINOHead(32, out_dim, hidden_dim=32, bottleneck_dim=16, use_bn=use_bn,
                                                  norm_last_layer=False))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    step = DINOStep(student, teacher, DINOLoss(out_dim, 4, center_momentum=center_momentum),
                    build_optimizer(optimizer, get_params_groups(student)), precision=precision, clip_grad=clip_grad)
    return step, student, teacher


# ----------------------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID",
                      "SLURM_NTASKS", "SLURM_JOB_ID", "SUBMITIT_LOG_LEVEL")


def load_submit_module() -> ModuleType:
    """launch/submit.py as a module (launch/ is not a package). Left out of sys.modules, so cloudpickle
    pickles DINOJob by value, as it does when submit.py runs as ``__main__``."""
    spec = importlib.util.spec_from_file_location("simpool_launch_submit", REPO / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Killed(BaseException):
    """Raised where a test's process "dies" (a kill, a time limit): no handler of the code under test catches it
    (KeyboardInterrupt is Ctrl-C, which the drivers turn into exit 130)."""


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The launcher prefix of ``nproc`` local processes (gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())]


def run_cli(args: list[str], env_extra: dict | None = None, launcher: list[str] | None = None,
            script: str = "train_dino.py", timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a script of the checkout (train_dino.py by default) in a subprocess, single-threaded so that CPU
    results are bitwise reproducible."""
    env = {**ENV, **(env_extra or {})}
    command = [*(launcher or [sys.executable]), str(REPO / script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def run_module(module: str, *args: str, launcher: list[str] | None = None, timeout: int = 300,
               env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` (or ``launcher -m module args``, e.g. :func:`torchrun`) in a subprocess."""
    command = [*(launcher or [sys.executable]), "-m", module, *args]
    return subprocess.run(command, env={**ENV, **(env_extra or {})}, capture_output=True, text=True,
                          timeout=timeout)


def start(args: list[str], launcher: list[str] | None = None, script: str = "train_dino.py") -> subprocess.Popen:
    """A script (or a launcher running it) as the leader of a new process group, like a SLURM step."""
    command = [*(launcher or [sys.executable]), str(REPO / script), *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_until(proc: subprocess.Popen, marker: str) -> str:
    """The output of ``proc`` up to the first line holding ``marker``."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} never printed:\n{''.join(seen)[-3000:]}")


def hold_lock(*locks: Path | tuple[Path, str]) -> subprocess.Popen:
    """Another process holding the locks of these folders (``(folder, lock file name)`` for a lock beside an export
    folder), as a run there would, until the test kills it (:func:`release`)."""
    pairs = [(str(lock), ".simpool.lock") if isinstance(lock, Path) else (str(lock[0]), lock[1]) for lock in locks]
    code = ("import sys, time; from simpool.run.lock import lock_folder\n"
            f"for folder, name in {pairs!r}: lock_folder(folder, name=name)\n"
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, "holder-run"], env=ENV, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def release(proc: subprocess.Popen) -> None:
    """Kill a process started by :func:`start` / :func:`hold_lock` (its group) and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def finish(proc: subprocess.Popen, seen: str) -> str:
    """Wait for ``proc`` (killing its group after 3 minutes); everything it printed."""
    try:
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return seen + rest


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------
def state_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def teacher(path: Path) -> dict[str, torch.Tensor]:
    return state_of(path)["teacher"]


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def folder_state(folder: Path) -> dict[str, tuple[int, bytes]]:
    """What a run wrote into ``folder``: file name -> (mtime, bytes); the lock file (who holds the folder now,
    rewritten by every run that takes it) is left out."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.name != ".simpool.lock"}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def photo_folder(root: Path, per_class: int = 6, val_per_class: int = 2, size: tuple[int, int] = (20, 24)) -> Path:
    """``root/{train,val}/{a,b}/<i>.png`` of random pixels."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def randomised(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every float parameter and buffer, so that a misplaced LayerNorm/beta/statistic shows."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():  # the state dict shares the model's storage
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn_like(tensor))
                if name.endswith("running_var"):
                    tensor.abs_()
    return model.eval()


def write_training_checkpoint(path: Path, arch: str, mode: str, overrides: dict, gamma="auto_free") -> tuple:
    """A checkpoint shaped like train_dino.py's; returns (teacher backbone, student backbone)."""
    recorded_gamma = {"vit_tiny": 1.25, "resnet18": 2.0}[arch] if gamma == "auto_free" else gamma
    teacher_net = randomised(build_backbone(arch, mode=mode, gamma=recorded_gamma, **overrides))
    student_net = randomised(build_backbone(arch, mode=mode, gamma=recorded_gamma, **overrides))
    head = {"head.mlp.0.weight": torch.ones(16, teacher_net.embed_dim), "head.last_layer.weight_v": torch.ones(8)}
    torch.save(
        {
            "simpool_format": 1,
            "teacher": {**{f"backbone.{k}": v for k, v in teacher_net.state_dict().items()}, **head},
            "student": {**{f"backbone.{k}": v for k, v in student_net.state_dict().items()}, **head},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 3,
            "iteration": 30,
            "args": {
                "arch": arch, "mode": mode, "gamma": recorded_gamma, "patch_size": 16,
                "model_overrides": overrides,
                "epochs": 100, "out_dim": 4096, "lr": 0.0005, "batch_size_per_gpu": 64,
                "data_path": "/data/imagenet", "global_crops_scale": [0.25, 1.0], "dist_url": "env://",
            },
        },
        path,
    )
    return teacher_net, student_net


def save_teacher_checkpoint(path: Path, arch: str, mode: str, overrides: dict) -> torch.nn.Module:
    """A training checkpoint holding only a (fresh) teacher backbone and the args that rebuild it."""
    model = build_backbone(arch, mode=mode, **overrides).eval()
    torch.save(
        {
            "simpool_format": 1,
            "teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
            "args": {"arch": arch, "mode": mode, "gamma": model.gamma, "patch_size": 16,
                     "model_overrides": overrides},
        },
        path,
    )
    return model


# ----------------------------------------------------------------------------------------------------------
# attention scores
# ----------------------------------------------------------------------------------------------------------
TINY_ATTENTION_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}
METRIC_NAMES = {"jaccard_mass", "jaccard_best_threshold", "corloc"}


def tiny_checkpoint(folder: Path, mode: str) -> Path:
    """A backbone-only state dict of a random tiny ViT (patch 8): what export_backbone accepts with flags."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", mode=mode, patch_size=8, **TINY_ATTENTION_VIT)
    path = folder / f"{mode}.pth"
    torch.save(model.state_dict(), path)
    return path


def read_scores(path: Path) -> dict:
    result = json.loads(path.read_text())
    for row in result["rows"].values():
        assert set(row) == METRIC_NAMES
        assert all(0.0 <= value <= 1.0 for value in row.values()), row
    return result


def onnx_error(model: torch.nn.Module, path: Path, shapes: list[tuple[int, ...]]) -> float:
    """Largest max|onnx - torch| / max|torch| over random images of ``shapes``; the graph's axes must be dynamic.
    Needs onnxruntime (the calling module skips without it)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    worst = 0.0
    for shape in shapes:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert got.shape == expected.shape == (shape[0], model.embed_dim)
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
    return worst


def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's ``size=`` option) at ``mount`` for the duration of a fixture; skips the test
    where mounting is not allowed."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)
