"""Pixel operations of DINO's multi-crop on float image tensors, one crop or a batch, on any device.

Images are float (..., 3, H, W) on the 0..255 scale; a ``factor`` is a float, or a (K,) tensor for a
(K, 3, H, W) batch. On that scale solarize keeps PIL's ``x >= 128 → 255 - x`` rule on integer values and the
1/255 of ``ToTensor`` folds into the normalisation (:func:`normalization_affine`).

* colour: :func:`blend` (f x + (1 - f) target, clamped) gives :func:`adjust_brightness` (target black),
  :func:`adjust_contrast` (mean luma) and :func:`adjust_saturation` (luma image); :func:`adjust_hue` rotates
  the HSV hue in closed form. All equal torchvision's tensor ops up to float rounding.
* :func:`gaussian_blur`: separable, a sum of shifted views per axis with half-sample-symmetric borders (the
  rule PIL's box-blur approximation is closest to); taps are a sampled Gaussian whose discrete variance is
  exactly sigma^2 (:func:`gaussian_taps`), so sigma is PIL's ``GaussianBlur`` radius.
* :func:`apply_crop_decisions` runs flip → jitter (each crop's own order) → grayscale → blur → solarize →
  normalise on resized crops, each per its :class:`~.params.ViewParams` row; the CPU and the batched path
  both render with it.

Why not torchvision's ops: on one CPU core fresh image-sized buffers, bool masks and non-float dtypes cost
more than the arithmetic, so these are written in place and in float (see ``benchmarks/data_pipeline.py``).

Example::

    crops = torch.rand(4, 3, 96, 96) * 255
    blurred = gaussian_blur(crops, torch.tensor([0.0, 0.5, 1.0, 2.0]))   # per-crop sigma, 0 = identity
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # (0.485, 0.456, 0.406)
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD  # (0.229, 0.224, 0.225)
from torch import Tensor

from simpool.dino.augment.params import BRIGHTNESS, CONTRAST, HUE, SATURATION, ViewParams

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale (PIL's "L" uses 0.299/0.587/0.114 in integers).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)


def _per_sample(factor: Tensor | float, like: Tensor) -> Tensor | float:
    if isinstance(factor, Tensor):
        return factor.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return factor


# Masks are float tensors written by comparison ops with a float `out=`: on a CPU core, bool tensors,
# bool x float products and torch.where run several times slower than float arithmetic.
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


