"""finetune.py on tiny models: Fashion-MNIST runs, exact resume, DDP on gloo, export with the head, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.checkpoint import FORMAT_KEY, FORMAT_VERSION
from simpool.cli.run_export import main as export_main
from simpool.finetune.config import parse_finetune_args
from simpool.finetune.data import labelled_splits, val_loader
from simpool.finetune.engine import evaluate
from simpool.finetune.model import build_finetune_model, load_finetuned, rebuild_from_record
from simpool.finetune.run_finetune import main
from simpool.loading import load_model, read_export_config
from simpool.models import build_backbone
from tests.helpers import REPO, free_port, needs_fashion

MODEL = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "7",
         "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2", "img_size=28"]
RUN = ["--input_size", "28", "--batch_size_per_gpu", "8", "--num_workers", "0", "--epochs", "2",
       "--warmup_epochs", "1", "--layer_decay", "0.75", "--model_ema_decay", "0.9", "--drop_path", "0.1",
       "--log_every", "1", "--precision", "fp32", "--lr", "0.002"]
FASHION_TINY = [*MODEL, *RUN, "--data_path", "fashion-mnist", "--subset", "4", "--val_subset", "2"]  # 40 / 20 images
REF_VIT = ["--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "16", "--model_overrides", "depth=2"]


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def _folder(root: Path, train_classes: list[str], val_classes: list[str], per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@needs_fashion
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    """Mixup, RandAugment, random erasing, drop path, EMA, layer decay: resumed mid-epoch and at an epoch end."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main([*FASHION_TINY, "--output_dir", str(full)]) == 0
    for stop in (3, 5):  # 5 iterations per epoch
        assert main([*FASHION_TINY, "--output_dir", str(resumed), "--exit_after_iterations", str(stop)]) == 0
        assert torch.load(resumed / "checkpoint.pth", weights_only=True)["iteration"] == stop
    assert main([*FASHION_TINY, "--output_dir", str(resumed)]) == 0
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (full, resumed))
    for entry in ("model", "model_ema"):
        assert a[entry].keys() == b[entry].keys()
        assert all(torch.equal(a[entry][k], b[entry][k]) for k in a[entry]), entry
    assert a["iteration"] == b["iteration"] == 10 and a["best"] == b["best"]
    full_log, resumed_log = log_lines(full), log_lines(resumed)
    assert [line["epoch"] for line in full_log] == [0, 1] == [line["epoch"] for line in resumed_log]
    for x, y in zip(full_log, resumed_log, strict=True):
        assert {k: v for k, v in x.items() if k.startswith(("val_", "ema_val_"))} == \
               {k: v for k, v in y.items() if k.startswith(("val_", "ema_val_"))}
        assert 0 <= x["val_top1"] <= x["val_top5"] <= 100
    assert (full / "checkpoint_best.pth").is_file() and (full / "args.yaml").is_file()


@needs_fashion
def test_fine_tunes_a_dino_checkpoint_and_exports_backbone_and_head(reference_dir, tmp_path):
    weights = reference_dir / "vit_simpool_dino_checkpoint.pth"
    flags = [*REF_VIT, "--pretrained_weights", str(weights), "--data_path", "fashion-mnist", "--subset", "2",
             "--val_subset", "1", "--input_size", "32", "--batch_size_per_gpu", "4", "--num_workers", "0",
             "--epochs", "1", "--warmup_epochs", "0", "--precision", "fp32"]
    images = torch.load(reference_dir / "inputs.pt", weights_only=True)["images224"]
    reference, _ = load_model(weights, arch="vit_tiny", mode="simpool", patch_size=16, depth=2)
    start, _ = build_finetune_model(parse_finetune_args(flags), num_classes=10)
    with torch.no_grad():  # fine-tuning starts from the loaded backbone (reference pos-embed rule included)
        assert torch.equal(start.backbone.eval()(images), reference(images))
    out = tmp_path / "ft"
    assert main([*flags, "--output_dir", str(out)]) == 0
    checkpoint = torch.load(out / "checkpoint_best.pth", weights_only=True)
    trained = rebuild_from_record(checkpoint["args"], 10, drop_path=0.0)
    trained.load_state_dict(checkpoint["model"])
    assert not torch.equal(checkpoint["model"]["head.weight"], start.head.weight)  # it trained

    assert export_main([str(out / "checkpoint_best.pth"), str(tmp_path / "export")]) == 0
    config = read_export_config(tmp_path / "export")
    assert config["pos_embed_resampling"] == "reference" and config["classifier"]["num_classes"] == 10
    assert config["classifier"]["classes"][0] == "T-shirt/top"
    reloaded = load_finetuned(tmp_path / "export")
    backbone, _ = load_model(out / "checkpoint_best.pth")  # what the evaluators read
    with torch.no_grad():
        assert torch.equal(reloaded(images), trained.eval()(images))
        assert torch.equal(backbone(images), trained.backbone(images))




@needs_fashion
def test_two_gloo_processes_train_and_evaluate_every_val_image_once(tmp_path):
    out = tmp_path / "ddp"
    flags = [*MODEL, *RUN, "--data_path", "fashion-mnist", "--subset", "4", "--val_subset", "3",
             "--batch_size_per_gpu", "4", "--epochs", "1", "--warmup_epochs", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "finetune.py"), *flags, "--output_dir", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["iteration"] == 5  # 40 images / (2 ranks x 4)
    # The 30 val images were split over the ranks (15 each) and the counts summed: one process agrees.
    args = parse_finetune_args(flags)
    _, val, _ = labelled_splits(args)
    model = rebuild_from_record(checkpoint["args"], 10, drop_path=0.0)
    model.load_state_dict(checkpoint["model"])
    from simpool.distributed import DistInfo

    single = evaluate(model, val_loader(val, args, DistInfo(0, 1, 0, torch.device("cpu"))), torch.device("cpu"))
    logged = log_lines(out)[-1]
    assert logged["val_top1"] == pytest.approx(single["top1"]) and logged["val_top5"] == pytest.approx(single["top5"])


def _vit_run_checkpoint(path: Path) -> Path:
    """A train_dino.py-shaped checkpoint of a ViT whose run recorded ViT-only model_overrides (depth, img_size)."""
    overrides = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}
    backbone = {f"backbone.{k}": v for k, v in
                build_backbone("vit_tiny", mode="simpool", patch_size=16, **overrides).state_dict().items()}
    torch.save({FORMAT_KEY: FORMAT_VERSION, "teacher": backbone, "student": backbone, "epoch": 1,
                "args": {"arch": "vit_tiny", "mode": "simpool", "gamma": 1.25, "patch_size": 16,
                         "model_overrides": overrides}}, path)
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("wrong_arch", "weights do not fit"),
    # once a TypeError traceback (ResNet.__init__() got an unexpected keyword argument 'depth')
    ("arch_of_another_family", "are a vit_tiny (simpool mode, as their training args record); --arch resnet18 "
                               "does not fit them: drop --arch"),
    ("val_classes", "have different class folders"),
    ("big_batch", "fewer than one global batch"),
    ("one_class", "mixup / cutmix blend labels of two classes"),
    ("odd_batch", "need an even --batch_size_per_gpu"),
    ("bad_opt", "is not a timm optimizer"),
    ("no_weights", "no --pretrained_weights given"),
])
def test_bad_input_exits_2_before_anything_is_written(reference_dir, tmp_path, capsys, case, message):
    two = _folder(tmp_path / "two", ["a", "b"], ["a", "b"])
    data = {"val_classes": _folder(tmp_path / "other", ["a", "b"], ["a", "c"]),
            "one_class": _folder(tmp_path / "one", ["a"], ["a"])}.get(case, two)
    model = {"wrong_arch": [*REF_VIT, "--pretrained_weights", str(reference_dir / "resnet_simpool_teacher.pth")],
             "no_weights": REF_VIT,
             "arch_of_another_family": ["--pretrained_weights", str(_vit_run_checkpoint(tmp_path / "vit.pth")),
                                        "--arch", "resnet18"]}.get(case, MODEL)
    extra = {"big_batch": ["--batch_size_per_gpu", "8"], "odd_batch": ["--batch_size_per_gpu", "3"],
             "bad_opt": ["--opt", "adamv"]}.get(case, ["--batch_size_per_gpu", "2"])
    out = tmp_path / "run"
    code = main([*model, "--data_path", str(data), "--input_size", "16", "--num_workers", "0", *extra,
                 "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("family", ["vit", "convnext", "resnet"])
def test_shipped_finetune_configs_parse_and_name_their_source(family):
    path = REPO / "configs" / f"finetune_{family}.yaml"
    args = parse_finetune_args(["--config", str(path), "--random_init", "--data_path", "fashion-mnist"])
    assert args.epochs > 0 and args.lr > 0
    assert "Source:" in path.read_text()


def test_randaugment_posterize_at_magnitude_10_is_refused_early_and_mmax9_runs(capsys):
    """timm's increasing posterize keeps 0 bits at magnitude 10, which this Pillow refuses mid-epoch."""
    from timm.data import rand_augment_transform

    image = Image.fromarray(np.full((28, 28, 3), 128, dtype=np.uint8))
    crashing = rand_augment_transform("rand-m10-n3-inc1", {})
    clipped = rand_augment_transform("rand-m10-n3-inc1-mmax9", {})
    for _ in range(100):  # 3 of 15 ops per image: posterize is drawn many times
        clipped(image)
    from simpool.finetune.config import posterize_needs_mmax9

    if posterize_needs_mmax9("rand-m9-mstd0.5-inc1"):
        with pytest.raises(ValueError, match="bits must be"):
            for _ in range(100):
                crashing(image)
        assert main([*MODEL, "--data_path", "fashion-mnist", "--aa", "rand-m9-mstd0.5-inc1"]) == 2
        assert "append -mmax9" in capsys.readouterr().err


@needs_fashion
@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    import signal

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune.py"), *FASHION_TINY, "--epochs", "200",
                             "--output_dir", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if line.startswith("epoch 0 [2/5]"):
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, output
    assert "stopped after iteration" in output
    assert 2 <= torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] < 1000
    result = subprocess.run([sys.executable, str(REPO / "finetune.py"), *FASHION_TINY, "--epochs", "1",
                             "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-2000:]
