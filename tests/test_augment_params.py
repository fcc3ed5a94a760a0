"""The random decisions of the multi-crop: crop boxes against torchvision's RandomResizedCrop, probabilities
and ranges of every op, and reproducible draws."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T

from simpool.dino.augment import MultiCropSampler, ViewRecipe, dino_view_recipes, sample_views
from tests.augment_helpers import GLOBAL_SCALE, LOCAL_SCALE

DRAWS = 4000


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def crop_boxes(height: int, width: int, scale, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 4) boxes of n crops of one recipe with this scale, through the public sampler."""
    recipe = ViewRecipe(224, scale, blur_p=0.0)
    params = sample_views([recipe], [n], torch.tensor([height]), torch.tensor([width]), generator)[0]
    return params.boxes


def torchvision_boxes(height: int, width: int, scale, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


@pytest.mark.parametrize(
    "height,width,scale", [(375, 500, GLOBAL_SCALE), (375, 500, LOCAL_SCALE), (120, 600, GLOBAL_SCALE)]
)
def test_crop_boxes_match_torchvision_get_params(height, width, scale):
    n = 2000
    ours = crop_boxes(height, width, scale, n, torch.Generator().manual_seed(0))
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
    ours = crop_boxes(60, 900, GLOBAL_SCALE, 50)
    theirs = torchvision_boxes(60, 900, GLOBAL_SCALE, 1)[0]
    assert (ours == theirs).all(dim=1).all()


def test_apply_probabilities_and_ranges():
    recipes = dino_view_recipes(GLOBAL_SCALE, LOCAL_SCALE)
    params = sample_views(
        recipes,
        [DRAWS] * 3,
        torch.tensor([375]),
        torch.tensor([500]),
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


def test_draws_follow_the_global_rng_or_the_given_generator():
    """Loader workers seed torch's global RNG (DataLoader does, per worker): equal seeds, equal crops."""
    sampler = MultiCropSampler(GLOBAL_SCALE, LOCAL_SCALE, 4)
    sizes = torch.tensor([100, 90]), torch.tensor([120, 300])
    torch.manual_seed(5)
    a = sampler.sample_params(*sizes)
    torch.manual_seed(5)
    b = sampler.sample_params(*sizes)
    torch.manual_seed(6)
    c = sampler.sample_params(*sizes)
    assert [len(p) for p in a] == [2, 2, 8]
    assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(a, b))
    assert not all(torch.equal(x.boxes, y.boxes) for x, y in zip(a, c))
    # view major: row k of every view is cut from image k mod 2
    assert (a[2].boxes[1::2, 3] <= 300).all() and (a[2].boxes[0::2, 3] <= 120).all()
    seeded = MultiCropSampler(GLOBAL_SCALE, LOCAL_SCALE, 4, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(seeded.sample_params(*sizes), a))
    override = sampler.sample_params(*sizes, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(override, a))


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropSampler(GLOBAL_SCALE, LOCAL_SCALE, -1)
    with pytest.raises(ValueError, match="scale"):
        MultiCropSampler((0.5, 0.2), LOCAL_SCALE, 2)
    with pytest.raises(ValueError, match="pair"):
        dino_view_recipes((0.25,), LOCAL_SCALE)
    with pytest.raises(ValueError, match="one height and one width per image"):
        sample_views(dino_view_recipes(GLOBAL_SCALE, LOCAL_SCALE), [1, 1, 2], torch.full((3,), 5), torch.full((2,), 5))
