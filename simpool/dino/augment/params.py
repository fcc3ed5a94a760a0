"""The random decisions of DINO's multi-crop: view recipes and their vectorised sampler.

A :class:`ViewRecipe` is the distribution of one kind of crop; :func:`dino_view_recipes` gives DINO's three
(global 1, global 2, local). :func:`sample_views` draws every decision of every crop of a batch in one pass and
returns them as :class:`ViewParams` records (tensors on the CPU), which the pixel ops in :mod:`.ops` apply;
:class:`MultiCropSampler` holds DINO's layout (1, 1, N crops of the three recipes per image) and draws for it.
Nothing here looks at pixels, so the decisions can be inspected and counted on their own.

Example::

    sampler = MultiCropSampler((0.25, 1.0), (0.05, 0.25), local_crops_number=6)
    params = sampler.sample_params(torch.tensor([375]), torch.tensor([500]))
    params[2].boxes   # (6, 4) int64 (top, left, height, width) of the six local crops
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

# Column order of ViewParams.jitter_factors and the op ids used in ViewParams.jitter_order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class ViewRecipe:
    """Distribution of one kind of crop (a global view or the local views).

    Defaults are DINO's: flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) applied with p 0.8, grayscale 0.2,
    blur radius (sigma) ~ U(0.1, 2.0), aspect ratio in (3/4, 4/3) sampled log-uniformly.
    """

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}; e.g. (0.25, 1.0)")
        if self.size <= 0:
            raise ValueError(f"crop size must be a positive number of pixels, got {self.size}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"aspect ratio range must satisfy 0 < min <= max, got {self.ratio}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue jitter must lie in [0, 0.5] turns (as torchvision's ColorJitter), got {self.hue}")


def dino_view_recipes(
    global_crops_scale: Sequence[float],
    local_crops_scale: Sequence[float],
    global_crops_size: int = 224,
    local_crops_size: int = 96,
) -> tuple[ViewRecipe, ViewRecipe, ViewRecipe]:
    """The three crop distributions of DINO: (global crop 1, global crop 2, local crops).

    Global 1 is always blurred; global 2 is blurred with p 0.1 and solarized with p 0.2; locals are blurred
    with p 0.5.
    """
    global_scale = _scale_pair(global_crops_scale, "global_crops_scale")
    local_scale = _scale_pair(local_crops_scale, "local_crops_scale")
    return (
        ViewRecipe(global_crops_size, global_scale, blur_p=1.0),
        ViewRecipe(global_crops_size, global_scale, blur_p=0.1, solarize_p=0.2),
        ViewRecipe(local_crops_size, local_scale, blur_p=0.5),
    )


def _scale_pair(scale: Sequence[float], name: str) -> tuple[float, float]:
    if len(scale) != 2:
        raise ValueError(f"{name} must be a (min, max) pair of area fractions, got {scale!r}")
    return float(scale[0]), float(scale[1])


@dataclass
class ViewParams:
    """Random decisions for n crops (one row each), all tensors on the CPU.

    boxes: (n, 4) int64 (top, left, height, width) of the crop in the source image;
    flip, jitter, grayscale, blur, solarize: (n,) bool, whether each op is applied;
    jitter_factors: (n, 4) float (brightness, contrast, saturation, hue) as drawn (used only where jitter);
    jitter_order: (n, 4) int64, a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE) per crop;
    blur_sigma: (n,) float, Gaussian standard deviation in output pixels (used only where blur).
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    jitter_factors: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @staticmethod
    def cat(parts: Sequence[ViewParams]) -> ViewParams:
        """The rows of several ViewParams, in order."""
        return ViewParams(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ViewParams)})

    def rows(self) -> list[dict]:
        """One dict of plain Python values per crop (what a per-crop loop wants: no tensor indexing)."""
        columns = {f.name: getattr(self, f.name).tolist() for f in fields(self)}
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _crop_boxes(heights: np.ndarray, widths: np.ndarray, bounds: np.ndarray, uniforms: np.ndarray, tries: int):
    """RandomResizedCrop boxes for n images, vectorised; same distribution as torchvision's ``get_params``.

    Per image of area A = H W: up to ``tries`` draws of s ~ U(scale), log r ~ U(log ratio);
    w = round(sqrt(A s r)), h = round(sqrt(A s / r)); the first draw with 0 < w <= W and 0 < h <= H wins
    and its corner is uniform: top ~ U{0..H-h}, left ~ U{0..W-w}. If none fits, the central crop of the
    whole image clamped to the ratio range. All tries are drawn at once; taking the first valid one keeps
    the distribution.

    ``uniforms`` are the U(0, 1) draws (n, 2 tries + 2); ``bounds`` (n, 4) the per-row (scale min, scale max,
    log ratio min, log ratio max). Returns (n, 4) int64 (top, left, height, width). NumPy float64: a few
    dozen tiny array ops, several times cheaper per call than torch's on a loader core.
    """
    heights = heights.astype(np.float64)
    widths = widths.astype(np.float64)
    scale_low, scale_high, log_ratio_low, log_ratio_high = bounds.T
    area = (heights * widths)[:, None]
    scale_draw = scale_low[:, None] + uniforms[:, :tries] * (scale_high - scale_low)[:, None]
    log_ratio = log_ratio_low[:, None] + uniforms[:, tries : 2 * tries] * (log_ratio_high - log_ratio_low)[:, None]
    aspect = np.exp(log_ratio)
    # np.round rounds half to even, as Python's round in torchvision does.
    w = np.round(np.sqrt(area * scale_draw * aspect))
    h = np.round(np.sqrt(area * scale_draw / aspect))
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = fits.argmax(axis=1)[:, None]
    found = fits.any(axis=1)
    w = np.take_along_axis(w, first, axis=1)[:, 0]
    h = np.take_along_axis(h, first, axis=1)[:, 0]
    top = np.floor(uniforms[:, 2 * tries] * (heights - h + 1))
    left = np.floor(uniforms[:, 2 * tries + 1] * (widths - w + 1))

    # torchvision's fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred
    ratio_low, ratio_high = np.exp(log_ratio_low), np.exp(log_ratio_high)
    in_ratio = widths / heights
    center_w = np.where(in_ratio > ratio_high, np.round(heights * ratio_high), widths)
    center_h = np.where(in_ratio < ratio_low, np.round(widths / ratio_low), heights)
    h = np.where(found, h, center_h)
    w = np.where(found, w, center_w)
    top = np.where(found, top, np.floor((heights - center_h) / 2))
    left = np.where(found, left, np.floor((widths - center_w) / 2))
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


_CROP_TRIES = 10


def _recipe_row(recipe: ViewRecipe) -> list[float]:
    """The per-crop constants of a recipe, in the column order sample_views reads them."""
    return [
        recipe.scale[0],
        recipe.scale[1],
        math.log(recipe.ratio[0]),
        math.log(recipe.ratio[1]),
        recipe.flip_p,
        recipe.jitter_p,
        recipe.grayscale_p,
        recipe.blur_p,
        recipe.solarize_p,
        # torchvision clamps the lower bound of the multiplicative jitter factors at 0
        max(0.0, 1 - recipe.brightness),
        1 + recipe.brightness,
        max(0.0, 1 - recipe.contrast),
        1 + recipe.contrast,
        max(0.0, 1 - recipe.saturation),
        1 + recipe.saturation,
        -recipe.hue,
        recipe.hue,
        recipe.blur_sigma[0],
        recipe.blur_sigma[1],
    ]


@functools.lru_cache(maxsize=32)
def _recipe_rows(recipes: tuple[ViewRecipe, ...], counts: tuple[int, ...]) -> np.ndarray:
    """(sum(counts), 19) per-crop constants; cached, as a loader asks for the same layout every image."""
    rows = np.array([_recipe_row(r) for r in recipes], dtype=np.float64).repeat(counts, axis=0)
    rows.flags.writeable = False
    return rows


def sample_views(
    recipes: Sequence[ViewRecipe],
    counts: Sequence[int],
    heights: Tensor | Sequence[int],
    widths: Tensor | Sequence[int],
    generator: torch.Generator | None = None,
) -> list[ViewParams]:
    """Draw the decisions of ``counts[i]`` crops of ``recipes[i]`` from each of B images, in one vectorised pass.

    ``heights``/``widths`` (B,) are the image sizes. Returns one ViewParams per recipe with counts[i] * B rows,
    view major (row k comes from image k mod B). Each decision is independent per crop, as in the reference:
    box as torchvision's ``RandomResizedCrop`` (see :func:`_crop_boxes`), each op applied when its coin
    u ~ U(0, 1) falls below its probability, jitter factors uniform in [max(0, 1 - j), 1 + j] (hue in [-j, j]),
    sigma ~ U(blur_sigma); the jitter order is a uniformly random permutation per crop, as torchvision's
    ``ColorJitter`` draws it. ``generator``: a CPU generator, or None for torch's global RNG (which DataLoader
    seeds per worker).
    """
    # NumPy, not torch: a handful of tiny array ops per image, each several times cheaper on a loader core
    heights, widths = np.asarray(heights, dtype=np.int64).reshape(-1), np.asarray(widths, dtype=np.int64).reshape(-1)
    if heights.size != widths.size or heights.size == 0:
        raise ValueError(f"need one height and one width per image, got {heights.size} and {widths.size}")
    per_image = sum(counts)
    counts = [count * heights.size for count in counts]
    total = sum(counts)
    heights, widths = np.tile(heights, per_image), np.tile(widths, per_image)
    rows = _recipe_rows(tuple(recipes), tuple(counts))
    tries = _CROP_TRIES
    uniforms = torch.rand(total, 2 * tries + 2 + 5 + 4 + 4 + 1, dtype=torch.float64, generator=generator)
    uniforms = uniforms.numpy()
    boxes = _crop_boxes(heights, widths, rows[:, 0:4], uniforms, tries)
    draws = uniforms[:, 2 * tries + 2 :]
    coins, factor_draws, order_keys, sigma_draw = draws[:, 0:5], draws[:, 5:9], draws[:, 9:13], draws[:, 13]
    factor_low, factor_high = rows[:, 9:17:2], rows[:, 10:17:2]
    sigma_low, sigma_high = rows[:, 17], rows[:, 18]
    decisions = {
        "boxes": boxes,
        "flip": coins[:, 0] < rows[:, 4],
        "jitter": coins[:, 1] < rows[:, 5],
        "jitter_factors": (factor_low + factor_draws * (factor_high - factor_low)).astype(np.float32),
        # argsort of i.i.d. uniforms is a uniformly random permutation (ties have probability 0)
        "jitter_order": order_keys.argsort(axis=1),
        "grayscale": coins[:, 2] < rows[:, 6],
        # the reference's GaussianBlur tests `random() <= p`, its Solarization `random() < p`
        "blur": coins[:, 3] <= rows[:, 7],
        "blur_sigma": (sigma_low + sigma_draw * (sigma_high - sigma_low)).astype(np.float32),
        "solarize": coins[:, 4] < rows[:, 8],
    }
    split = {name: torch.from_numpy(value).split(counts) for name, value in decisions.items()}
    return [ViewParams(**{name: parts[i] for name, parts in split.items()}) for i in range(len(recipes))]


class MultiCropSampler:
    """DINO's multi-crop layout (2 global + N local crops per image) and the draw of its decisions: the part the
    per-image CPU transform and the batched one share.

    Args:
        global_crops_scale, local_crops_scale: (min, max) crop area fractions, e.g. (0.25, 1.0), (0.05, 0.25).
        local_crops_number: N local crops per image (0 allowed).
        global_crops_size, local_crops_size: output sides in pixels.
        generator: a CPU torch.Generator for reproducible draws; None (the default) draws from torch's global
            RNG, which DataLoader seeds per worker (a generator given here would repeat in every worker).
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()  # cooperative: the batched transform is also an nn.Module
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.recipes = dino_view_recipes(global_crops_scale, local_crops_scale, global_crops_size, local_crops_size)
        self.counts = (1, 1, int(local_crops_number))
        self.generator = generator

    def sample_params(
        self, heights: Tensor | Sequence[int], widths: Tensor | Sequence[int], generator: torch.Generator | None = None
    ) -> list[ViewParams]:
        """Decisions for [global 1 (B rows), global 2 (B rows), locals (N B rows, local view major)] of B images
        of sizes ``heights``/``widths`` (B,); ``generator`` overrides the sampler's own for this draw."""
        generator = generator if generator is not None else self.generator
        return sample_views(self.recipes, self.counts, heights, widths, generator)
