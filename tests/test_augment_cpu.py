"""The per-image CPU multi-crop: output contract, inputs it accepts, and its resize against torchvision's PIL
bicubic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from simpool.dino.augment import DataAugmentationDINO
from tests.augment_helpers import GLOBAL_SCALE, LOCAL_SCALE, denormalize, no_op_params, smooth_photo


def test_cpu_path_returns_two_global_then_local_crops():
    aug = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 3, global_crops_size=48, local_crops_size=24)
    crops = aug(Image.fromarray(smooth_photo()))
    assert [tuple(c.shape) for c in crops] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    pixels = torch.stack([denormalize(c).flatten() for c in crops[:2]])
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3  # normalised 0..255 content


def test_cpu_path_accepts_uint8_tensor_and_grayscale_pil():
    aug = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 1, global_crops_size=32, local_crops_size=16)
    assert len(aug(torch.from_numpy(smooth_photo()).permute(2, 0, 1))) == 3
    assert len(aug(Image.fromarray(smooth_photo()[..., 0], mode="L"))) == 3
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 20, 20))


def test_cpu_resize_matches_torchvision_pil_bicubic():
    photo = Image.fromarray(smooth_photo(90, 120))
    aug = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 0, global_crops_size=40)
    box = [10, 25, 60, 70]  # top, left, height, width
    params = [no_op_params([box]), no_op_params([box]), no_op_params([])]
    ours = aug.render(torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1), params)[0]
    reference = T.functional.resized_crop(photo, *box, [40, 40], T.InterpolationMode.BICUBIC)
    reference = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.functional.to_tensor(reference))
    # same crop, same antialiased bicubic (a = -0.5): differences are uint8 rounding only
    assert (denormalize(ours) - denormalize(reference)).abs().max() <= 2.0
