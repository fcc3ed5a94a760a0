"""Multi-crop augmentation: output contract of both paths, the random decisions' distributions, the pixel ops
against torchvision/PIL, and the batched path's reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

from simpool.dino.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SATURATION,
    DataAugmentationDINO,
    ViewParams,
    ViewRecipe,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_crop_decisions,
    dino_view_recipes,
    gaussian_blur,
    sample_crop_boxes,
    sample_view_params,
    sample_views,
    solarize,
)
from simpool.dino.gpu_augment import (
    DecodeOnlyDataset,
    GPUMultiCrop,
    _edge_replicated_float,
    collate_padded,
    pad_images,
    render_crops,
)

GLOBAL_SCALE, LOCAL_SCALE = (0.25, 1.0), (0.05, 0.25)
DRAWS = 4000


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


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
        "boxes": torch.tensor(boxes, dtype=torch.int64),
        "flip": torch.zeros(n, dtype=torch.bool),
        "jitter": torch.zeros(n, dtype=torch.bool),
        "jitter_factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n),
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


# ---------------------------------------------------------------------------------------------------------
# output contract
# ---------------------------------------------------------------------------------------------------------


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


def test_normalisation_of_a_plain_crop():
    value = torch.tensor([200.0, 100.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8).clone()
    out = apply_crop_decisions(value, no_op_params([[0, 0, 8, 8]]))
    expected = (torch.tensor([200.0, 100.0, 30.0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 3, 3], expected)


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


def test_gpu_path_shapes_and_list_equals_padded_input():
    images = [
        torch.from_numpy(smooth_photo(h, w, seed=h)).permute(2, 0, 1).contiguous() for h, w in [(40, 60), (70, 30)]
    ]
    multicrop = GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, 2, global_crops_size=32, local_crops_size=16, seed=3)
    from_list = multicrop(images, generator=torch.Generator().manual_seed(1))
    padded, sizes = pad_images(images)
    from_padded = multicrop(padded, sizes, generator=torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in from_list] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    assert all(c.dtype == torch.float32 for c in from_list)
    for a, b in zip(from_list, from_padded):
        torch.testing.assert_close(a, b)


def test_gpu_path_seed_reproducibility():
    images = [torch.from_numpy(smooth_photo(50, 50 + 10 * i, seed=i)).permute(2, 0, 1) for i in range(3)]
    make = lambda seed: GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, seed=seed)  # noqa: E731
    first, again, other = make(7)(images), make(7)(images), make(8)(images)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.allclose(a, b) for a, b in zip(first, other))


def test_gpu_path_bad_input():
    multicrop = GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, 1, 16, 8)
    with pytest.raises(ValueError, match="uint8"):
        multicrop(torch.rand(2, 3, 10, 10))
    with pytest.raises(ValueError, match="sizes"):
        multicrop(torch.zeros(2, 3, 10, 10, dtype=torch.uint8), torch.tensor([[11, 5], [4, 4]]))
    with pytest.raises(ValueError, match="scale"):
        GPUMultiCrop((0.5, 0.2), LOCAL_SCALE, 1)


def test_roi_align_crop_matches_the_box():
    """The batched resampler cuts the same region as the CPU path (bilinear vs bicubic aside)."""
    photo = torch.from_numpy(smooth_photo(60, 90)).permute(2, 0, 1).contiguous()
    box = [5, 30, 40, 50]  # top, left, height, width: asymmetric, so a swapped x/y would show
    padded, sizes = pad_images([photo, torch.zeros(3, 70, 100, dtype=torch.uint8)])
    batched = render_crops(_edge_replicated_float(padded, sizes), 24, no_op_params([box]))
    cpu = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 0, global_crops_size=24)
    single = cpu.render(photo, [no_op_params([box]), no_op_params([]), no_op_params([])])[0]
    assert (denormalize(batched[0]) - denormalize(single)).abs().mean() < 2.0


def test_edge_replication_fills_padding_with_each_images_border():
    padded, sizes = pad_images(
        [torch.full((3, 2, 3), 7, dtype=torch.uint8), torch.full((3, 4, 4), 9, dtype=torch.uint8)]
    )
    source = _edge_replicated_float(padded, sizes)
    assert source.shape == (2, 3, 5, 5)
    assert (source[0] == 7).all() and (source[1] == 9).all()


def test_decode_only_dataset_and_collate(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(30, 40), (50, 20)]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(smooth_photo(h, w)).save(paths[-1], quality=95)
    dataset = DecodeOnlyDataset([(p, i) for i, p in enumerate(paths)])
    pixels, label = dataset[1]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 50, 20) and label == 1
    assert (pixels.float() - torch.from_numpy(smooth_photo(50, 20)).permute(2, 0, 1)).abs().mean() < 4
    images, sizes, labels = collate_padded([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 50, 40) and sizes.tolist() == [[30, 40], [50, 20]]
    assert labels.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# distributions of the random decisions
# ---------------------------------------------------------------------------------------------------------


def torchvision_boxes(height: int, width: int, scale, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


@pytest.mark.parametrize(
    "height,width,scale", [(375, 500, GLOBAL_SCALE), (375, 500, LOCAL_SCALE), (120, 600, GLOBAL_SCALE)]
)
def test_crop_boxes_match_torchvision_get_params(height, width, scale):
    n = 2000
    ours = sample_crop_boxes(
        torch.full((n,), height), torch.full((n,), width), scale, generator=torch.Generator().manual_seed(0)
    )
    theirs = torchvision_boxes(height, width, scale, n)
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = (h * w).double() / (height * width)
    theirs_area = (theirs[:, 2] * theirs[:, 3]).double() / (height * width)
    # sampling error of a difference of two means of 2000 draws with std <= 0.25: ~0.008
    assert abs(area.mean() - theirs_area.mean()) < 0.03
    assert abs(area.std() - theirs_area.std()) < 0.03
    fallback = (h == height) | (w == round(height * 4 / 3))
    inside = area[~fallback]
    # integer rounding of w and h moves the area and ratio slightly past the sampled range
    assert inside.min() >= scale[0] - 0.02 and inside.max() <= scale[1] + 0.02
    log_ratio = torch.log(w.double() / h.double())
    assert log_ratio.min() >= math.log(3 / 4) - 0.05 and log_ratio.max() <= math.log(4 / 3) + 0.05
    assert abs(log_ratio.mean() - torch.log(theirs[:, 3].double() / theirs[:, 2]).mean()) < 0.02


def test_crop_fallback_is_torchvision_central_crop():
    # a 60 x 900 strip: no crop of area >= 0.25 with ratio <= 4/3 fits, so every draw falls back
    ours = sample_crop_boxes(torch.full((50,), 60), torch.full((50,), 900), GLOBAL_SCALE)
    theirs = torchvision_boxes(60, 900, GLOBAL_SCALE, 1)[0]
    assert (ours == theirs).all(dim=1).all()


def test_apply_probabilities_and_ranges():
    recipes = dino_view_recipes(GLOBAL_SCALE, LOCAL_SCALE)
    params = sample_views(
        recipes,
        [DRAWS] * 3,
        torch.full((3 * DRAWS,), 375),
        torch.full((3 * DRAWS,), 500),
        torch.Generator().manual_seed(0),
    )
    for recipe, p in zip(recipes, params):
        for flags, prob in [
            (p.flip, 0.5),
            (p.jitter, 0.8),
            (p.grayscale, 0.2),
            (p.blur, recipe.blur_p),
            (p.solarize, recipe.solarize_p),
        ]:
            assert binomial_ok(int(flags.sum()), DRAWS, prob), (recipe, prob, int(flags.sum()))
        assert p.blur_sigma.min() >= 0.1 and p.blur_sigma.max() <= 2.0
        assert abs(p.blur_sigma.mean() - 1.05) < 0.03
        low = torch.tensor([0.6, 0.6, 0.8, -0.1])
        high = torch.tensor([1.4, 1.4, 1.2, 0.1])
        assert (p.jitter_factors >= low).all() and (p.jitter_factors <= high).all()
        assert (p.jitter_factors.mean(0) - (low + high) / 2).abs().max() < 0.02
        assert (p.jitter_order.sort(dim=1).values == torch.arange(4)).all()  # permutations
        for op in range(4):
            assert binomial_ok(int((p.jitter_order[:, 0] == op).sum()), DRAWS, 0.25)


def test_single_recipe_sampler_and_default_rng_worker_seeding():
    recipe = ViewRecipe(96, LOCAL_SCALE, blur_p=0.5)
    torch.manual_seed(5)
    a = sample_view_params(recipe, 100, 120, count=8)
    torch.manual_seed(5)
    b = sample_view_params(recipe, 100, 120, count=8)
    assert torch.equal(a.boxes, b.boxes) and len(a) == 8
    with pytest.raises(ValueError, match="count"):
        sample_view_params(recipe, 100, 120)


# ---------------------------------------------------------------------------------------------------------
# pixel ops
# ---------------------------------------------------------------------------------------------------------


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
