"""Attention maps while training (``train_dino.py --attention_every N``): the grid, its files, W&B, bad flags."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import wandb
from PIL import Image

from simpool.attention_maps import prepare_image
from simpool.dino.attention_log import MAX_IMAGES, TITLE_HEIGHT, AttentionLog, attention_grid
from simpool.dino.config import ConfigError, parse_args
from simpool.dino.run_train import main
from simpool.models import build_backbone
from simpool.visualize import attention_mask, overlay
from tests.helpers import FASHION_TINY, TINY_RESNET, TINY_VIT, needs_fashion


def photos(count: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (64, 96)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 2], 3), dtype=np.uint8)) for i in range(count)]


def test_grid_rows_are_image_map_and_mass_mask():
    model = build_backbone("vit_tiny", mode="simpool", **TINY_VIT).train()
    grid = attention_grid(model, photos(), image_size=64)
    assert model.training  # put back as it was
    # 64 px images are shown at 128 (x2, nearest); the 64 x 96 one makes the widest row: 3 x 192
    assert grid.shape == (TITLE_HEIGHT + 2 * (128 + 2), 3 * 192, 3)
    row = grid[TITLE_HEIGHT:TITLE_HEIGHT + 128, :3 * 128]
    image, shown_map, masked = row[:, :128], row[:, 128:256], row[:, 256:]
    x, rgb = prepare_image(photos()[0], 64, 16)
    assert np.array_equal(image, np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1))
    with torch.no_grad():
        attn = model.eval().attention_map(x)[0].mean(dim=0)
    assert np.array_equal(shown_map, overlay(image, attn))
    mask = attention_mask(attn, (128, 128))
    assert 0 < mask.mean() < 1
    assert np.array_equal(masked, (image * (0.25 + 0.75 * mask[..., None])).astype(np.uint8))


def test_convnet_teacher_is_drawn_in_eval_mode():
    model = build_backbone("resnet18", mode="simpool", **TINY_RESNET).train()
    before = model.bn1.running_mean.clone()
    attention_grid(model, photos(1), image_size=64)
    assert torch.equal(model.bn1.running_mean, before) and model.training  # BN statistics untouched


class RecordingRun:
    """Stands in for a W&B run: records what the trainer logs."""

    def __init__(self) -> None:
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((data, step))


def test_images_folder_and_wandb(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, image in enumerate(photos(MAX_IMAGES + 2)):
        image.save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "00_broken.png").write_text("not a PNG either")  # sorted first, skipped with a warning
    args = argparse.Namespace(attention_every=2, attention_images=str(folder), global_crops_size=64, epochs=5)
    run = RecordingRun()
    attention_log = AttentionLog.from_args(args, dataset=None, is_main=True, output_dir=tmp_path, wandb_run=run)
    assert len(attention_log.images) == MAX_IMAGES
    assert [e for e in range(5) if attention_log.due(e)] == [0, 2, 4]
    path = attention_log.write(4, build_backbone("vit_tiny", mode="official", **TINY_VIT), step=40)
    assert path == tmp_path / "attention" / "epoch0004.png" and path.is_file()
    [(data, step)] = run.logged
    assert step == 40 and isinstance(data["attention"], wandb.Image)
    model_without_map = build_backbone("efficientnet_b0", mode="official")  # averages: no attention map
    assert attention_log.write(5, model_without_map) is None and not attention_log.due(6)  # off, with a warning
    off_rank = AttentionLog.from_args(args, dataset=None, is_main=False, output_dir=tmp_path)
    assert not any(off_rank.due(e) for e in range(5))


def test_bad_attention_flags_stop_before_training(tmp_path):
    base = ["--data_path", "fashion-mnist", "--output_dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="official mode pools by averaging"):
        parse_args([*base, "--arch", "resnet18", "--mode", "official", "--attention_every", "1"])
    with pytest.raises(ConfigError, match="not a folder holding images"):
        parse_args([*base, "--arch", "vit_tiny", "--attention_every", "1", "--attention_images", str(tmp_path)])
    with pytest.raises(ConfigError, match=">= 0"):
        parse_args([*base, "--attention_every", "-1"])


@needs_fashion
def test_training_writes_a_grid_per_logged_epoch(tmp_path):
    out = tmp_path / "run"
    assert main([*FASHION_TINY, "--epochs", "2", "--output_dir", str(out), "--attention_every", "1"]) == 0
    grids = sorted((out / "attention").iterdir())
    assert [p.name for p in grids] == ["epoch0000.png", "epoch0001.png"]
    with Image.open(grids[0]) as first, Image.open(grids[1]) as second:
        # the first 8 Fashion-MNIST training images (16 px crops shown at 128 px), one row each
        assert first.size == (3 * 128, TITLE_HEIGHT + MAX_IMAGES * (128 + 2))
        assert not np.array_equal(np.asarray(first), np.asarray(second))  # the teacher moved between epochs
