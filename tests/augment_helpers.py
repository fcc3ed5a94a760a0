"""Shared inputs of the augmentation tests: a smooth photo, no-op decisions, un-normalisation."""

from __future__ import annotations

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from simpool.dino.augment import ViewParams

GLOBAL_SCALE, LOCAL_SCALE = (0.25, 1.0), (0.05, 0.25)


def smooth_photo(height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth colourful (H, W, 3) uint8 image: gradients plus a few low-frequency waves."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (x * rng.uniform(0.5, 2) + y * rng.uniform(0.5, 2)) + c) for c in range(3)]
    return ((np.stack(channels, axis=-1) * 0.45 + 0.5) * 255).round().astype(np.uint8)


def no_op_params(boxes: list[list[int]], **overrides) -> ViewParams:
    """Decisions for len(boxes) crops that apply nothing (then ``overrides`` per field)."""
    n = len(boxes)
    fields = {
        "boxes": torch.tensor(boxes, dtype=torch.int64).reshape(n, 4),
        "flip": torch.zeros(n, dtype=torch.bool),
        "jitter": torch.zeros(n, dtype=torch.bool),
        "jitter_factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n).reshape(n, 4),
        "jitter_order": torch.arange(4).repeat(n, 1),
        "grayscale": torch.zeros(n, dtype=torch.bool),
        "blur": torch.zeros(n, dtype=torch.bool),
        "blur_sigma": torch.ones(n),
        "solarize": torch.zeros(n, dtype=torch.bool),
    }
    fields.update(overrides)
    return ViewParams(**fields)


def denormalize(crops: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (crops * std + mean) * 255
