"""DINO multi-crop augmentation on uint8 tensors: the reference recipe, several times faster on a CPU core.

The reference (facebookresearch/dino ``DataAugmentationDINO``) turns one PIL image into

* global crop 1: RandomResizedCrop(224, scale=global, bicubic) → flip(0.5) → ColorJitter(0.4, 0.4, 0.2, 0.1)
  with p=0.8 → grayscale(0.2) → Gaussian blur (p=1.0) → normalise
* global crop 2: same, but blur p=0.1, then solarize (threshold 128) with p=0.2
* N local crops: RandomResizedCrop(96, scale=local, bicubic) → flip/jitter/grayscale → blur (p=0.5)
  → normalise

with the blur radius drawn from U(0.1, 2.0) (PIL's ``GaussianBlur`` radius is the Gaussian's standard
deviation). This module draws the same random decisions, but renders them differently:

* the image becomes a uint8 tensor once; each crop is cut as a view and resized in one antialiased bicubic
  ``interpolate`` call (torch's antialiased bicubic uses a = -0.5 and widens the kernel on downscaling,
  as PIL does), then converted to float once;
* colour ops run on the small resized crop in float, on the 0..255 scale, so solarize keeps PIL's
  ``x >= 128 → 255 - x`` rule on integer values and the 1/255 of ``ToTensor`` folds into the
  normalisation. Jitter ops equal torchvision's tensor ColorJitter ops up to float rounding, in each crop's
  own random order; the hue rotation uses the closed form of HSV → RGB (see :func:`adjust_hue`);
* the blur is separable: a sum of shifted views per axis with half-sample-symmetric borders (the rule
  PIL's box-blur approximation is closest to); the taps are a sampled Gaussian whose discrete variance is
  exactly sigma^2 (:func:`gaussian_taps`), so sigma is PIL's radius;
* everything is written to keep fresh image-sized buffers and non-float dtypes out of the hot loop: on one
  CPU core those cost more than the arithmetic.

Results differ from the PIL reference only by rounding (PIL rounds to uint8 after every op). Measured on
one core with JPEG decode included (``benchmarks/data_pipeline.py``): about 2.2x the reference's images/s
with PIL decoding, 2.5x with torchvision decoding.

All random decisions of an image are drawn in one vectorised call (:func:`sample_views`) and returned as
:class:`ViewParams` records, so they can be inspected and counted without looking at pixels. The batched
tensor path in :mod:`simpool.dino.gpu_augment` uses the same sampler and the same pixel ops
(:func:`apply_crop_decisions`).

Threads: the ops are meant to run one thread per loader worker. ``torch.utils.data.DataLoader`` already calls
``torch.set_num_threads(1)`` inside each worker process; when calling this transform in the main process,
call :func:`use_single_thread` (or ``torch.set_num_threads(1)``) yourself.

Example::

    aug = DataAugmentationDINO((0.25, 1.0), (0.05, 0.25), local_crops_number=6)
    crops = aug(Image.open("cat.jpg").convert("RGB"))   # 2 x (3, 224, 224) then 6 x (3, 96, 96), float32
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # (0.485, 0.456, 0.406)
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD  # (0.229, 0.224, 0.225)
from torch import Tensor

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale (PIL's "L" uses 0.299/0.587/0.114 in integers).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
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
    """The three crop distributions of DINO: (global crop 1, global crop 2, local crops)."""
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


def sample_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> Tensor:
    """RandomResizedCrop boxes for n images, vectorised; same distribution as torchvision's ``get_params``.

    Per image of area A = H W: up to ``tries`` draws of s ~ U(scale), log r ~ U(log ratio);
    w = round(sqrt(A s r)), h = round(sqrt(A s / r)); the first draw with 0 < w <= W and 0 < h <= H wins
    and its corner is uniform: top ~ U{0..H-h}, left ~ U{0..W-w}. If none fits, the central crop of the
    whole image clamped to the ratio range. All tries are drawn at once; taking the first valid one keeps
    the distribution.

    Returns (n, 4) int64 (top, left, height, width).
    """
    heights = torch.as_tensor(heights).reshape(-1).numpy()
    widths = torch.as_tensor(widths).reshape(-1).numpy()
    n = heights.size
    uniforms = torch.rand(n, 2 * tries + 2, dtype=torch.float64, generator=generator).numpy()
    bounds = np.array([[scale[0], scale[1], math.log(ratio[0]), math.log(ratio[1])]]).repeat(n, axis=0)
    return torch.from_numpy(_crop_boxes(heights, widths, bounds, uniforms, tries))


def _crop_boxes(heights: np.ndarray, widths: np.ndarray, bounds: np.ndarray, uniforms: np.ndarray, tries: int):
    """sample_crop_boxes from given U(0, 1) draws (n, 2 tries + 2) and per-row bounds (n, 4):
    (scale min, scale max, log ratio min, log ratio max). NumPy float64: a few dozen tiny array ops, several
    times cheaper per call than torch's on a loader core."""
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
    """The per-crop constants of a recipe, in the column order _sample_rows reads them."""
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
    heights: Tensor,
    widths: Tensor,
    generator: torch.Generator | None = None,
) -> list[ViewParams]:
    """Draw the decisions of ``counts[i]`` crops of ``recipes[i]`` for every i, in one vectorised pass.

    ``heights``/``widths`` (sum(counts),) give each crop's source image size, rows in recipe order. Each
    decision is independent per crop, as in the reference; the jitter order is a uniformly random
    permutation per crop, as torchvision's ``ColorJitter`` draws it.
    """
    total = sum(counts)
    if heights.numel() != total or widths.numel() != total:
        raise ValueError(f"need one height and width per crop ({total}), got {heights.numel()}, {widths.numel()}")
    rows = _recipe_rows(tuple(recipes), tuple(counts))
    tries = _CROP_TRIES
    uniforms = torch.rand(total, 2 * tries + 2 + 5 + 4 + 4 + 1, dtype=torch.float64, generator=generator)
    uniforms = uniforms.numpy()
    boxes = _crop_boxes(heights.reshape(-1).numpy(), widths.reshape(-1).numpy(), rows[:, 0:4], uniforms, tries)
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
    split = {name: torch.from_numpy(value).split(list(counts)) for name, value in decisions.items()}
    return [ViewParams(**{name: parts[i] for name, parts in split.items()}) for i in range(len(recipes))]


def sample_view_params(
    recipe: ViewRecipe,
    heights: Tensor | int,
    widths: Tensor | int,
    count: int | None = None,
    generator: torch.Generator | None = None,
) -> ViewParams:
    """Draw every random decision of one ``recipe`` for a batch of crops (see :func:`sample_views`).

    ``heights``/``widths`` give the source image size of each crop, as (n,) tensors, or as ints together with
    ``count`` (n crops from one image).
    """
    heights, widths = _size_tensors(heights, widths, count)
    return sample_views([recipe], [heights.numel()], heights, widths, generator)[0]


def _size_tensors(heights: Tensor | int, widths: Tensor | int, count: int | None) -> tuple[Tensor, Tensor]:
    if isinstance(heights, int) != isinstance(widths, int):
        raise ValueError("pass heights and widths both as ints (with count) or both as tensors")
    if isinstance(heights, int):
        if count is None:
            raise ValueError("count is required when heights and widths are ints")
        return torch.full((count,), heights), torch.full((count,), widths)
    return torch.as_tensor(heights).reshape(-1), torch.as_tensor(widths).reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# Pixel ops on float images (..., 3, H, W) in the 0..255 range. `factor` is a float or a (K,) tensor for a
# (K, 3, H, W) batch. Masks are float tensors written by comparison ops with a float `out=`: on a CPU core,
# bool tensors, bool x float products and torch.where run several times slower than float arithmetic.
# ----------------------------------------------------------------------------------------------------------


def _per_sample(factor: Tensor | float, like: Tensor) -> Tensor | float:
    if isinstance(factor, Tensor):
        return factor.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return factor


def _float_mask(compare, a: Tensor, b: Tensor) -> Tensor:
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype, device=a.device)
    return compare(a, b, out=out)


def grayscale(image: Tensor) -> Tensor:
    """Luma Y = 0.2989 R + 0.587 G + 0.114 B, shape (..., 1, H, W) (one small matrix product)."""
    weights = _luma_weights(image.device, image.dtype)
    return torch.matmul(weights, image.flatten(-2)).unflatten(-1, image.shape[-2:])


@functools.lru_cache(maxsize=8)
def _luma_weights(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor([LUMA_WEIGHTS], dtype=dtype, device=device)


def blend(image: Tensor, other: Tensor | float, factor: Tensor | float) -> Tensor:
    """clamp(f x + (1 - f) other, 0, 255): torchvision's/PIL's ImageEnhance blend."""
    f = _per_sample(factor, image)
    if isinstance(f, Tensor):
        out = torch.addcmul(f * image, 1.0 - f, other) if isinstance(other, Tensor) else f * image
    else:
        out = image * f
        if isinstance(other, Tensor):
            out.add_(other, alpha=1.0 - f)
    if not isinstance(other, Tensor) and other != 0.0:
        out = out + (1.0 - f) * other
    return out.clamp_(0.0, 255.0)


def adjust_brightness(image: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with black: clamp(f x)."""
    return blend(image, 0.0, factor)


def adjust_contrast(image: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the mean luma of each image (the luma of the mean colour: no luma image needed)."""
    return blend(image, _mean_luma(image), factor)


def _mean_luma(image: Tensor) -> Tensor:
    """(..., 1, 1, 1) mean of the luma image."""
    mean_colour = image.mean(dim=(-2, -1))
    return torch.matmul(mean_colour, _luma_weights(image.device, image.dtype).T)[..., None, None]


def adjust_saturation(image: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the luma image."""
    return blend(image, grayscale(image), factor)


# Hue (in sextants) at which each of R, G, B is at its minimum: cyan, magenta, yellow.
_HSV_OPPOSITE_HUE = (3.0, 5.0, 1.0)


def adjust_hue(image: Tensor, shift: Tensor | float) -> Tensor:
    """Rotate the HSV hue by ``shift`` turns, keeping saturation and value.

    With M = max(r, g, b), C = M - min(r, g, b) and the hue h in sextants, each channel of the rotated
    colour is  M - C w,  w = clamp(2 - d, 0, 1), where d is the circular distance (period 6) from
    h + 6 shift to the hue at which that channel is smallest (3, 5, 1 for R, G, B) — the closed form of
    HSV → RGB. With h in [-1, 5] and |x - c| <= 7, clamp(||x - c| - 3| - 1, 0, 1) equals clamp(2 - d, 0, 1)
    without computing d. Equal to torchvision's adjust_hue up to
    float rounding. In-place ops throughout: on a CPU core, fresh image-sized buffers cost more than the
    arithmetic.
    """
    r, g, b = image.unbind(-3)
    value = torch.maximum(r, g)
    torch.maximum(value, b, out=value)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(value, chroma, out=chroma)
    # the sector formula of the channel holding the maximum; ties go to r, then g (as torchvision):
    # h C = [r max] (g - b) + [g max] (b - r + 2C) + [b max] (r - g + 4C)
    max_is_r = _float_mask(torch.eq, r, value)
    max_is_g = _float_mask(torch.eq, g, value).mul_(1.0 - max_is_r)
    hue = torch.sub(r, g).add_(chroma, alpha=4.0).mul_(1.0 - max_is_r - max_is_g)
    hue.addcmul_(torch.sub(g, b), max_is_r).addcmul_(torch.sub(b, r).add_(chroma, alpha=2.0), max_is_g)
    # grey pixels (C = 0) get any hue: clamping C in place changes the result by at most 1e-12
    hue.div_(chroma.clamp_(min=1e-12)).add_(_per_sample(shift, hue) * 6.0)
    # h lies in [-1, 5]; with |6 shift| <= 1 every |h + 6 shift - c| <= 7, where the formula below still
    # holds. Larger shifts wrap h into [-1, 5) first: h - 6 floor((h + 1) / 6)
    if not _is_small_hue_shift(shift):
        hue.sub_(torch.add(hue, 1.0).mul_(1.0 / 6.0).floor_().mul_(6.0))
    # clamp(max(2 - a, a - 4), 0, 1) = clamp(|a - 3| - 1, 0, 1) for a in [0, 7]
    weight = torch.sub(hue.unsqueeze(-3), _opposite_hues(image.device, image.dtype)).abs_()
    weight.sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return torch.addcmul(value.unsqueeze(-3), chroma.unsqueeze(-3), weight, value=-1.0)


def _is_small_hue_shift(shift: Tensor | float) -> bool:
    """|shift| <= 1/6 turn, checked only where it costs no device sync."""
    if isinstance(shift, Tensor):
        return shift.device.type == "cpu" and bool(shift.abs().max() <= 1 / 6)
    return abs(shift) <= 1 / 6


@functools.lru_cache(maxsize=8)
def _opposite_hues(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(_HSV_OPPOSITE_HUE, dtype=dtype, device=device).view(3, 1, 1)


def solarize(image: Tensor) -> Tensor:
    """PIL's ImageOps.solarize at threshold 128: x → 255 - x where x >= 128, written min(x, 255 - x).

    Identical to the threshold rule on integer pixel values (it switches at 127.5, where both sides agree).
    """
    return torch.minimum(image, 255.0 - image)


def _sampled_gaussian_variance(width: np.ndarray) -> np.ndarray:
    """Variance of the normalised taps exp(-t^2 / (2 width^2)), |t| <= ceil(3 width), for each width."""
    offsets = np.arange(-12, 13, dtype=np.float64)
    radius = np.maximum(1, np.ceil(3.0 * width))[:, None]
    taps = np.exp(-0.5 * (offsets / width[:, None]) ** 2) * (np.abs(offsets) <= radius)
    return (taps * offsets**2).sum(1) / taps.sum(1)


# Sampling a Gaussian of width w at integer offsets gives a kernel of variance below w^2 once w < ~0.8
# (w = 0.5: std 0.46). PIL's GaussianBlur(radius) is built to have standard deviation exactly `radius`,
# so the taps use the width whose sampled variance is sigma^2, read from this table (width in 0.002 steps).
_TAP_WIDTHS = np.arange(0.05, 4.0, 0.002)
_TAP_VARIANCES = np.maximum.accumulate(_sampled_gaussian_variance(_TAP_WIDTHS))


def gaussian_taps(sigma: Tensor) -> Tensor:
    """Normalised taps (K, 2 radius + 1) whose variance is sigma^2, for per-sample std devs ``sigma`` (K,).

    Taps are a sampled Gaussian exp(-t^2 / (2 w^2)) with w >= sigma chosen so the discrete variance is
    exactly sigma^2 (w = sigma for sigma >~ 0.8); radius = ceil(3 max w). A sigma of 0 gives the identity.
    """
    sigma_cpu = sigma.detach().reshape(-1).double().cpu().numpy()
    width = np.where(sigma_cpu > 0, np.interp(sigma_cpu**2, _TAP_VARIANCES, _TAP_WIDTHS), 1e-6)
    radius = max(1, math.ceil(3.0 * float(width.max())))
    width = torch.from_numpy(width).to(sigma.device, torch.float32)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    taps = torch.exp(-0.5 * (offsets[None, :] / width[:, None]) ** 2)
    return taps / taps.sum(dim=1, keepdim=True)


def _gaussian_taps_list(sigma: float) -> list[float]:
    """gaussian_taps for one sigma, in plain Python: the per-crop CPU path needs no tensor for 15 numbers."""
    if sigma <= 0:
        return [1.0]
    width = float(np.interp(sigma * sigma, _TAP_VARIANCES, _TAP_WIDTHS))
    radius = max(1, math.ceil(3.0 * width))
    taps = [math.exp(-0.5 * (t / width) ** 2) for t in range(-radius, radius + 1)]
    total = sum(taps)
    return [tap / total for tap in taps]


def _reflect_pad(image: Tensor, radius: int, dim: int) -> Tensor:
    """Half-sample symmetric padding (x_{-1} = x_0), the border rule closest to PIL's blur."""
    size = image.shape[dim]
    if radius > size:
        raise ValueError(f"blur radius {radius} exceeds the image side {size}; use a smaller sigma")
    before = image.narrow(dim, 0, radius).flip(dim)
    after = image.narrow(dim, size - radius, radius).flip(dim)
    return torch.cat([before, image, after], dim=dim)


def _filter_1d(image: Tensor, taps: Tensor | list[float], dim: int) -> Tensor:
    """out_i = sum_t taps[t] x_{i + t - radius} along ``dim``: a sum of shifted views, no im2col."""
    num_taps = taps.shape[-1] if isinstance(taps, Tensor) else len(taps)
    radius = num_taps // 2
    size = image.shape[dim]
    padded = _reflect_pad(image, radius, dim)
    if isinstance(taps, list):
        out = padded.narrow(dim, 0, size) * taps[0]
        for t in range(1, num_taps):
            out.add_(padded.narrow(dim, t, size), alpha=taps[t])
        return out
    out = padded.narrow(dim, 0, size) * _per_sample(taps[:, 0], image)
    for t in range(1, num_taps):
        out.addcmul_(padded.narrow(dim, t, size), _per_sample(taps[:, t], image))
    return out


def gaussian_blur(image: Tensor, sigma: Tensor | float) -> Tensor:
    """Separable Gaussian blur with standard deviation ``sigma`` in pixels (PIL's GaussianBlur radius).

    ``image`` is (3, H, W) with a float sigma, or (K, 3, H, W) with a (K,) sigma tensor (0 = no blur).
    Taps reach 3 sigma; borders are reflected half-sample symmetrically.
    """
    if isinstance(sigma, Tensor):
        taps = gaussian_taps(sigma).to(image.device)  # sigma on the CPU: no device sync for the radius
    else:
        taps = _gaussian_taps_list(float(sigma))
    return _filter_1d(_filter_1d(image, taps, dim=-1), taps, dim=-2)


def apply_crop_decisions(crops: Tensor, params: ViewParams | list[dict]) -> Tensor:
    """Flip, colour jitter, grayscale, blur, solarize and normalise resized crops, each per its own decisions.

    ``crops`` (K, 3, s, s) float in 0..255 on any device (modified in place); ``params`` K rows on the CPU
    (a ViewParams, or its ``rows()``). Each op runs once, batched, on the rows that apply it (rows picked on
    the CPU, so no device sync). The jitter runs in four stages: at stage j every jittered crop applies its
    j-th op; brightness, contrast and saturation are all blends  f x + (1 - f) target  (target black, mean
    luma, luma image), so one batched blend serves them all, and the hue rotation runs on the rows whose
    j-th op is hue. Returns (K, 3, s, s) normalised with the ImageNet mean/std.
    """
    decisions = params.rows() if isinstance(params, ViewParams) else params
    if len(decisions) != crops.shape[0]:
        raise ValueError(f"got {crops.shape[0]} crops but decisions for {len(decisions)}")

    def rows_with(key: str) -> list[int]:
        return [i for i, decision in enumerate(decisions) if decision[key]]

    crops = _update_rows(crops, rows_with("flip"), torch.flip, [-1])
    jittered = rows_with("jitter")
    for stage in range(4):
        ops = {i: decisions[i]["jitter_order"][stage] for i in jittered}
        blend_rows = [i for i in jittered if ops[i] != HUE]
        blend_ops = [ops[i] for i in blend_rows]
        blend_factors = [decisions[i]["jitter_factors"][ops[i]] for i in blend_rows]
        crops = _update_rows(crops, blend_rows, _blend_stage, blend_ops, blend_factors)
        hue_rows = [i for i in jittered if ops[i] == HUE]
        shifts = _scalar_or_tensor([decisions[i]["jitter_factors"][HUE] for i in hue_rows], crops.device)
        crops = _update_rows(crops, hue_rows, adjust_hue, shifts)
    crops = _update_rows(crops, rows_with("grayscale"), _grayscale_rgb)
    blur_rows = rows_with("blur")
    # sigma stays on the CPU: the blur radius is read from it without waiting on the device
    sigmas = _scalar_or_tensor([decisions[i]["blur_sigma"] for i in blur_rows], torch.device("cpu"))
    crops = _update_rows(crops, blur_rows, gaussian_blur, sigmas)
    crops = _update_rows(crops, rows_with("solarize"), solarize)
    scale, shift = normalization_affine(crops.device)
    # mul + add_ rather than addcmul: the broadcasting addcmul is ~3x slower on a CPU core
    return (crops * scale).add_(shift)


def _true_rows(flags: list[bool]) -> list[int]:
    return [i for i, flag in enumerate(flags) if flag]


def _scalar_or_tensor(values: list[float], device: torch.device) -> Tensor | float:
    """One value: a Python float (cheapest for the ops); several: a per-row tensor on ``device``."""
    return values[0] if len(values) == 1 else torch.tensor(values, device=device)


def _grayscale_rgb(images: Tensor) -> Tensor:
    # contiguous: later ops may write into some rows of the result, which an expanded view forbids
    return grayscale(images).expand_as(images).contiguous()


def _update_rows(crops: Tensor, rows: list[int], op: Callable[..., Tensor], *args) -> Tensor:
    """crops[rows] = op(crops[rows], *args), skipping the gather/scatter when every row takes part."""
    if not rows:
        return crops
    if len(rows) == crops.shape[0]:
        return op(crops, *args)
    index = torch.tensor(rows, device=crops.device)
    crops[index] = op(crops[index], *args)
    return crops


def _blend_stage(images: Tensor, ops: list[int], factors: list[float]) -> Tensor:
    """Per-row blend toward black (BRIGHTNESS), mean luma (CONTRAST) or the luma image (SATURATION)."""
    if len(set(ops)) == 1:  # one kind of blend for every row: no per-row target to assemble
        adjust = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation}
        return adjust[ops[0]](images, _scalar_or_tensor(factors, images.device))
    kind = torch.tensor(ops, device=images.device).view(-1, 1, 1, 1)
    target = (kind == CONTRAST) * _mean_luma(images) + (kind == SATURATION) * grayscale(images)
    return blend(images, target, torch.tensor(factors, device=images.device))


@functools.lru_cache(maxsize=8)
def normalization_affine(device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(scale, shift) with scale x + shift = (x / 255 - mean) / std, each (3, 1, 1)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


# ----------------------------------------------------------------------------------------------------------
# The CPU transform
# ----------------------------------------------------------------------------------------------------------


def pil_to_uint8_chw(image: Image.Image | Tensor | np.ndarray) -> Tensor:
    """A (3, H, W) uint8 view of an RGB image, without copying the pixels of a PIL image."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = np.asarray(image)  # already a copy (PIL exports via tobytes), but read-only
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        with warnings.catch_warnings():
            # torch warns that the buffer is read-only; the pixels are only ever read
            warnings.simplefilter("ignore", UserWarning)
            image = torch.from_numpy(image).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a PIL image or a (3, H, W) uint8 tensor, got {image.dtype} {tuple(image.shape)}; "
            "decode with torchvision.io.decode_image(..., mode=ImageReadMode.RGB)"
        )
    return image


def use_single_thread() -> None:
    """One intra-op thread, as DataLoader workers have; call it when augmenting in the main process."""
    torch.set_num_threads(1)


class DataAugmentationDINO:
    """DINO multi-crop: 2 global crops then ``local_crops_number`` local crops, normalised float tensors.

    Same distributions as the reference (see the module docstring); colour ops in float rather than on
    uint8 PIL images, so results differ from PIL only by rounding.

    Args:
        global_crops_scale: (min, max) area fraction of the global crops, e.g. (0.25, 1.0).
        local_crops_scale: (min, max) area fraction of the local crops, e.g. (0.05, 0.25).
        local_crops_number: number of local crops N (0 allowed).
        global_crops_size, local_crops_size: output side in pixels.
        generator: optional torch.Generator for reproducible draws (default: torch's global RNG, which
            DataLoader seeds per worker).
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
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.recipes = dino_view_recipes(global_crops_scale, local_crops_scale, global_crops_size, local_crops_size)
        self.local_crops_number = int(local_crops_number)
        self.generator = generator

    def sample_params(self, height: int, width: int) -> list[ViewParams]:
        """Decisions for [global crop 1, global crop 2, local crops] of an image of this size."""
        counts = (1, 1, self.local_crops_number)
        total = sum(counts)
        heights, widths = torch.full((total,), height), torch.full((total,), width)
        return sample_views(self.recipes, counts, heights, widths, self.generator)

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor]:
        pixels = pil_to_uint8_chw(image)
        params = self.sample_params(pixels.shape[1], pixels.shape[2])
        return self.render(pixels, params)

    def render(self, pixels: Tensor, params: list[ViewParams]) -> list[Tensor]:
        """Apply sampled decisions to a (3, H, W) uint8 image; one crop per row of each ViewParams.

        One crop at a time: with a single row every op takes Python scalars and no rows are gathered or
        scattered, which on a CPU core beats batching the few crops of one image.
        """
        crops: list[Tensor] = []
        for recipe, view_params in zip(self.recipes, params):
            for box, decision in zip(view_params.boxes.tolist(), view_params.rows()):
                # the resize keeps the channels-last layout of the HWC source; the colour ops want each
                # channel contiguous (unbind(-3) then elementwise ops), so convert to planar float once
                resized = _resized_crop(pixels, box, recipe.size).unsqueeze(0)
                resized = resized.to(torch.float32, memory_format=torch.contiguous_format)
                crops.append(apply_crop_decisions(resized, [decision])[0])
        return crops


def _resized_crop(pixels: Tensor, box: list[int], size: int) -> Tensor:
    """Antialiased bicubic resize of a box of a uint8 (3, H, W) image, straight from a view (crop and resize
    in one pass, as PIL's ``resize(box=...)``); torch's antialiased bicubic uses a = -0.5, as PIL does."""
    top, left, height, width = box
    region = pixels[:, top : top + height, left : left + width].unsqueeze(0)
    return F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)[0]
