"""Attention maps while training (``train_dino.py --attention_every N``): the teacher's map on a fixed set of
images, every N epochs, as ``output_dir/attention/epochNNNN.png`` and as a W&B image when W&B is on.

One grid per epoch, one row per image: the image, the teacher's attention over it (the mean over heads of
``model.attention_map``: SimPool's own attention, or an official ViT's last-block [CLS] attention; a convnet in
official mode pools by averaging and has none, which ``validate`` refuses before training), and DINO's 60%-mass
mask (the image dimmed where the mask drops it). Images are the first ``MAX_IMAGES`` readable files of
``--attention_images DIR`` (sorted) or, by default, the first images of the training set, resized as the teacher
sees its global crops (shorter side ``--global_crops_size``, sides rounded to the stride; no crop) and shown
upscaled to at least ``PANEL_SIDE`` pixels.

The grid is put together with numpy and PIL (no matplotlib figure: it would cost more than the maps) on rank 0
only, in eval mode and without gradients; the other ranks wait at the trainer's next collective. Cost: one
forward pass of the teacher over ``MAX_IMAGES`` images per logged epoch, see benchmarks/RESULTS.md.

Example (what the trainer does)::

    >>> attention_log = AttentionLog.from_args(args, dataset, is_main=True, output_dir=out, wandb_run=None)
    >>> if attention_log.due(epoch): attention_log.write(epoch, teacher_backbone, step=iteration)
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset

from simpool.attention_maps import model_stride, prepare_image
from simpool.data.images import BadSample
from simpool.models import arch_family
from simpool.visualize import attention_mask, overlay

__all__ = ["AttentionLog", "MAX_IMAGES", "attention_grid", "validate"]

log = logging.getLogger(__name__)

MAX_IMAGES = 8
PANEL_SIDE = 128
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TITLES = ("image", "teacher attention", "60% mass")
TITLE_HEIGHT = 14


def validate(args: argparse.Namespace) -> str | None:
    """The problem with the attention flags, as an ``error`` message naming the flag, or None."""
    every, folder = getattr(args, "attention_every", 0), getattr(args, "attention_images", None)
    if every < 0:
        return f"--attention_every must be >= 0 (0: off), got {every}"
    if every and args.mode == "official" and arch_family(args.arch) in ("resnet", "convnext"):
        return (f"--attention_every: {args.arch} in official mode pools by averaging and has no attention map; "
                "use --mode simpool or --attention_every 0")
    if every and folder and not _image_files(Path(folder)):
        return f"--attention_images {folder!r} is not a folder holding images ({', '.join(IMAGE_SUFFIXES)})"
    return None


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def first_training_images(dataset: Dataset, count: int = MAX_IMAGES) -> list[Image.Image]:
    """The first ``count`` readable images of the training set, untransformed (its ``transform`` is switched off
    while they are read, before any loader worker starts)."""
    saved = getattr(dataset, "transform", None)
    images = []
    try:
        if hasattr(dataset, "transform"):
            dataset.transform = None
        for index in range(min(len(dataset), 4 * count)):  # a few unreadable files are skipped
            item = dataset[index]
            if isinstance(item, BadSample):
                continue
            image = item[0]
            if isinstance(image, torch.Tensor):
                image = Image.fromarray(image.squeeze(0).numpy())
            images.append(image.convert("RGB"))
            if len(images) == count:
                break
    finally:
        if hasattr(dataset, "transform"):
            dataset.transform = saved
    return images


def _title_row(width: int, panel_widths: list[int]) -> np.ndarray:
    canvas = Image.new("RGB", (width, TITLE_HEIGHT), (255, 255, 255))
    draw, x = ImageDraw.Draw(canvas), 0
    for title, panel_width in zip(TITLES, panel_widths):
        draw.text((x + 2, 1), title, fill=(0, 0, 0))
        x += panel_width
    return np.asarray(canvas)


@torch.no_grad()
def attention_grid(model: nn.Module, images: list[Image.Image], image_size: int, keep: float = 0.6) -> np.ndarray:
    """(H, W, 3) uint8: a title row, then per image [image | attention overlay | ``keep``-mass mask].

    Rows of different widths (aspect ratios) are padded white on the right.
    """
    stride = model_stride(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # BatchNorm statistics of a convnet teacher must not move
    rows = []
    try:
        for photo in images:
            tensor, rgb = prepare_image(photo, image_size, stride)
            attn = model.attention_map(tensor.to(device)).float().cpu()[0].mean(dim=0)  # (h, w), mean over heads
            scale = max(1, math.ceil(PANEL_SIDE / min(rgb.shape[:2])))
            shown = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale),
                                                           Image.NEAREST))
            mask = attention_mask(attn, shown.shape[:2], keep)
            masked = (shown * (0.25 + 0.75 * mask[..., None])).astype(np.uint8)
            rows.append(np.concatenate([shown, overlay(shown, attn), masked], axis=1))
    finally:
        model.train(was_training)
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 2), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    panel = rows[0].shape[1] // 3
    return np.concatenate([_title_row(width, [panel] * 3), *padded], axis=0)


class AttentionLog:
    """Writes the grid every ``every`` epochs (and after the last); does nothing when ``every`` is 0 or off rank 0."""

    def __init__(self, every: int, images: list[Image.Image], image_size: int, epochs: int, output_dir: Path,
                 wandb_run: Any = None) -> None:
        self.every, self.images, self.image_size, self.epochs = every, images, image_size, epochs
        self.folder, self.wandb_run = Path(output_dir) / "attention", wandb_run

    @classmethod
    def from_args(cls, args: argparse.Namespace, dataset: Dataset, is_main: bool, output_dir: Path,
                  wandb_run: Any = None) -> AttentionLog:
        every = args.attention_every if is_main else 0
        images: list[Image.Image] = []
        if every:
            if args.attention_images:
                for path in _image_files(Path(args.attention_images)):
                    if len(images) == MAX_IMAGES:
                        break
                    try:
                        with Image.open(path) as image:
                            images.append(image.convert("RGB"))
                    except OSError as err:  # PIL's UnidentifiedImageError is an OSError
                        log.warning("--attention_images: %s skipped, not a readable image (%s)", path, err)
            else:
                images = first_training_images(dataset)
        return cls(every, images, args.global_crops_size, args.epochs, output_dir, wandb_run)

    def due(self, epoch: int) -> bool:
        return bool(self.every and self.images) and (epoch % self.every == 0 or epoch == self.epochs - 1)

    def write(self, epoch: int, teacher_backbone: nn.Module, step: int | None = None) -> Path | None:
        """Draw the grid with ``teacher_backbone`` and write ``attention/epochNNNN.png`` (and to W&B)."""
        start = time.perf_counter()
        try:
            grid = attention_grid(teacher_backbone, self.images, self.image_size)
        except ValueError as err:  # a timm model without an attention map (official mode): say so once, stop
            log.warning("--attention_every switched off: %s", err)
            self.every = 0
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch{epoch:04d}.png"
        Image.fromarray(grid).save(path)
        if self.wandb_run is not None:
            import wandb  # only when W&B is on (RunLogger imported it already)

            self.wandb_run.log({"attention": wandb.Image(grid, caption=f"teacher attention, epoch {epoch}")},
                               step=step)
        log.info("attention maps of %d images: %s (%.2f s)", len(self.images), path, time.perf_counter() - start)
        return path
