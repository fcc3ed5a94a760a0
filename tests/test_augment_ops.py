"""Pixel ops of the multi-crop against torchvision / PIL ground truth, and apply_crop_decisions' row logic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from simpool.dino.augment import apply_crop_decisions
from simpool.dino.augment.ops import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    solarize,
)
from simpool.dino.augment.params import BRIGHTNESS, CONTRAST, HUE, SATURATION
from tests.augment_helpers import denormalize, no_op_params


def test_normalisation_of_a_plain_crop():
    value = torch.tensor([200.0, 100.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8).clone()
    out = apply_crop_decisions(value, no_op_params([[0, 0, 8, 8]]))
    expected = (torch.tensor([200.0, 100.0, 30.0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 3, 3], expected)


def test_colour_ops_match_torchvision():
    image = torch.rand(2, 3, 12, 16)
    for factor in (0.6, 1.3):
        torch.testing.assert_close(adjust_brightness(image * 255, factor) / 255, TF.adjust_brightness(image, factor))
        torch.testing.assert_close(adjust_contrast(image * 255, factor) / 255, TF.adjust_contrast(image, factor))
        torch.testing.assert_close(adjust_saturation(image * 255, factor) / 255, TF.adjust_saturation(image, factor))
    for shift in (-0.1, 0.04, 0.35, -0.5):
        torch.testing.assert_close(adjust_hue(image * 255, shift) / 255, TF.adjust_hue(image, shift), atol=1e-5, rtol=0)
    per_sample = adjust_hue(image * 255, torch.tensor([0.05, -0.08])) / 255
    expected = torch.stack([TF.adjust_hue(image[0], 0.05), TF.adjust_hue(image[1], -0.08)])
    torch.testing.assert_close(per_sample, expected, atol=1e-5, rtol=0)


def test_batched_jitter_follows_each_crops_own_order():
    """Three crops, three op orders, all in one batch: equal to applying each crop's ops one by one."""
    images = torch.rand(3, 3, 10, 10) * 255
    orders = torch.tensor(
        [
            [HUE, BRIGHTNESS, CONTRAST, SATURATION],
            [SATURATION, HUE, CONTRAST, BRIGHTNESS],
            [CONTRAST, SATURATION, BRIGHTNESS, HUE],
        ]
    )
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.08], [0.8, 1.35, 0.9, -0.06], [1.1, 0.65, 0.85, 0.1]])
    params = no_op_params(
        [[0, 0, 10, 10]] * 3, jitter=torch.ones(3, dtype=torch.bool), jitter_factors=factors, jitter_order=orders
    )
    batched = denormalize(apply_crop_decisions(images.clone(), params))
    ops = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}
    for i in range(3):
        expected = images[i]
        for op in orders[i].tolist():
            expected = ops[op](expected, float(factors[i, op]))
        torch.testing.assert_close(batched[i], expected, atol=1e-3, rtol=0)
    reordered = no_op_params(
        [[0, 0, 10, 10]] * 3,
        jitter=torch.ones(3, dtype=torch.bool),
        jitter_factors=factors,
        jitter_order=orders.flip(1),
    )
    assert not torch.allclose(denormalize(apply_crop_decisions(images.clone(), reordered)), batched, atol=1e-2)


def test_grayscale_gives_equal_channels_and_flip_mirrors():
    images = torch.rand(2, 3, 9, 9) * 255
    gray = no_op_params([[0, 0, 9, 9]] * 2, grayscale=torch.tensor([True, False]), flip=torch.tensor([False, True]))
    out = denormalize(apply_crop_decisions(images.clone(), gray))
    torch.testing.assert_close(out[0, 0], out[0, 1], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[0, 1], out[0, 2], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], images[1].flip(-1), atol=1e-3, rtol=0)


def test_solarize_inverts_pixels_at_or_above_128():
    pixels = torch.arange(256, dtype=torch.float32)
    expected = torch.where(pixels >= 128, 255 - pixels, pixels)
    assert torch.equal(solarize(pixels), expected)
    image = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).expand(1, 3, 16, 16).clone()
    params = no_op_params([[0, 0, 16, 16]], solarize=torch.tensor([True]))
    torch.testing.assert_close(
        denormalize(apply_crop_decisions(image, params))[0, 0].flatten(), expected, atol=1e-3, rtol=0
    )


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_sigma_is_pils_radius(sigma):
    """The impulse response's standard deviation is sigma, as for PIL's GaussianBlur(radius=sigma)."""
    line = np.zeros((24, 41), dtype=np.uint8)
    line[:, 20] = 255
    pil_profile = np.asarray(Image.fromarray(line).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)[12]
    ours = gaussian_blur(torch.from_numpy(line).float().expand(3, -1, -1), sigma)[0, 12].double().numpy()
    offsets = np.arange(41) - 20
    std = lambda p: math.sqrt((p * offsets**2).sum() / p.sum())  # noqa: E731
    assert abs(std(ours) - sigma) < 0.03 * sigma
    assert abs(std(ours) - std(pil_profile)) < 0.06 * sigma
    assert abs(ours.sum() - 255) < 1e-3  # mass preserved


def test_per_sample_blur_and_identity_for_sigma_zero():
    images = torch.rand(2, 3, 12, 12) * 255
    out = gaussian_blur(images, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(out[0], images[0])
    torch.testing.assert_close(out[1], gaussian_blur(images[1], 1.5), atol=1e-4, rtol=0)
    assert out[1].std() < images[1].std()
