"""Attention maps of a backbone, and the masks and boxes they become: the one place both the figures
(:mod:`simpool.visualize`) and the scores (:mod:`simpool.evaluation.attention_metrics`) take them from.

Which map (``model.attention_map``, on the patch grid (h, w) = (H / p, W / p)): SimPool models give SimPool's
own attention ``a`` (softmax over the patches of ``K q``), one map per SimPool head; official-mode ViTs the last
block's [CLS]-to-patch self-attention, one map per head.

* :func:`prepare_image` / :func:`model_stride`: a photo resized to whole patches and normalised for the model;
* :func:`attention_maps`: the (B, heads, h, w) maps of a batch;
* :func:`mass_threshold_mask` / :func:`mass_mask_at_size`: DINO's mask (facebookresearch/dino
  ``visualize_attention.py``): the smallest set of highest-attention patches holding ``keep`` (60%) of the mass;
* :func:`upsample_map`: patch grid -> image size (nearest by default: one flat block per patch);
* :func:`largest_component_box`: the box of a mask's largest connected component.

Example::

    >>> image, rgb = prepare_image(Image.open("cat.jpg"), 224, model_stride(model))
    >>> maps = attention_maps(model, image)[0]              # (heads, 14, 14) for a ViT-S/16
    >>> mask = mass_mask_at_size(maps, rgb.shape[:2])       # (heads, 224, 224) bool, whole patches
    >>> boxes = largest_component_box(mask)                 # (heads, 4) x0, y0, x1, y1
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # (0.485, 0.456, 0.406)
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD  # (0.229, 0.224, 0.225)
from torch import nn

from simpool.data.masks import mask_to_box

__all__ = [
    "UpsampleMode",
    "as_map",
    "as_tensor",
    "attention_maps",
    "fit_to_stride",
    "largest_component_box",
    "mass_mask_at_size",
    "mass_threshold_mask",
    "model_stride",
    "prepare_image",
    "upsample_map",
]

UpsampleMode = Literal["nearest", "bilinear"]


def as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A tensor as is, a numpy array as a tensor (copied only when not contiguous); anything else: ValueError."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def as_map(attn: torch.Tensor | np.ndarray, name: str = "attn") -> torch.Tensor:
    """Map(s) (h, w) or (..., h, w) as a floating tensor (integer maps become float32)."""
    attn = as_tensor(attn, name)
    if attn.dim() < 2:
        raise ValueError(f"{name} must have shape (h, w) or (..., h, w), got {tuple(attn.shape)}")
    if not attn.is_floating_point():
        attn = attn.float()
    return attn


# ----------------------------------------------------------------------------------------------------------
# maps of a model
# ----------------------------------------------------------------------------------------------------------
def model_stride(model: nn.Module) -> int:
    """Input pixels per attention-map cell: the ViT patch size, or the convnet's total downsampling."""
    patch_size = getattr(model, "patch_size", None)
    if isinstance(patch_size, int):
        return patch_size
    inner = getattr(model, "model", model)  # TimmBackbone wraps the timm model
    patch_embed = getattr(inner, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "patch_size"):
        return int(patch_embed.patch_size[0])
    feature_info = getattr(inner, "feature_info", None)
    if feature_info:
        return int(feature_info[-1]["reduction"])
    return 32


def fit_to_stride(height: int, width: int, image_size: int | None, stride: int) -> tuple[int, int]:
    """(H, W): shorter side scaled to ``image_size`` (None: kept), each side rounded to a stride multiple.

    A resize, not a crop: nothing is cut off and the aspect ratio moves by at most half a patch.

    Example::

        >>> fit_to_stride(375, 500, 224, 16)              # 500 * 224 / 375 = 298.7 -> 19 patches of 16
        (224, 304)
    """
    if image_size is not None and image_size < stride:
        raise ValueError(
            f"--image_size {image_size} is smaller than the model's stride {stride}: use a larger one"
        )
    scale = 1.0 if image_size is None else image_size / min(height, width)

    def snap(side: int) -> int:
        return max(stride, round(side * scale / stride) * stride)

    return snap(height), snap(width)


def prepare_image(image: Image.Image, image_size: int | None, stride: int) -> tuple[torch.Tensor, np.ndarray]:
    """A PIL image -> (normalised (1, 3, H, W) float tensor, the resized RGB image as (H, W, 3) uint8)."""
    image = image.convert("RGB")
    size = fit_to_stride(image.height, image.width, image_size, stride)
    resized = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    tensor = TF.normalize(TF.to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD)
    return tensor.unsqueeze(0), np.asarray(resized, dtype=np.uint8).copy()


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) float32 maps on the CPU of a normalised batch (B, 3, H, W), run on the model's device.

    SimPool's maps are softmaxes over the patches (they sum to 1); a ViT's [CLS] row leaves out the [CLS]
    token's attention to itself, so its maps sum to a little less.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    device = next(model.parameters()).device
    return model.attention_map(images.to(device)).float().cpu()


# ----------------------------------------------------------------------------------------------------------
# masks and boxes from maps
# ----------------------------------------------------------------------------------------------------------
def mass_threshold_mask(attn: torch.Tensor | np.ndarray, keep: float = 0.6) -> torch.Tensor:
    """Smallest set of highest-valued pixels whose attention mass reaches ``keep`` of the total.

    For one map with values a_1 ≥ a_2 ≥ … ≥ a_n (sorted, descending) the mask keeps the first k
    pixels, k = min{k : sum_{i≤k} a_i ≥ keep · sum_i a_i}. So the kept mass is ≥ keep and dropping
    any kept pixel would bring it below keep. This is DINO's ``visualize_attention.py`` mask
    (``cumsum`` of the ascending sort ``> 1 - keep``), written from the top down.

    Ties: values equal to the one at the cut are ordered by raster position (stable sort), so the
    cut may split a plateau — the earlier pixels (row-major) are kept. The mask is defined by mass,
    not by a value threshold, which is why it can split ties. Zero-valued pixels are never kept, and
    an all-zero map (no mass) gives an empty mask.

    Args:
        attn: non-negative map(s), shape (h, w) or (..., h, w), any float dtype, any device.
            Cumulative sums run in float64 so fp16/bf16 maps are cut at the right place.
        keep: fraction of the mass to keep, in (0, 1]. DINO uses 0.6.

    Returns:
        bool tensor of the same shape and device as ``attn``.

    Example::

        >>> mass_threshold_mask(torch.tensor([[0.5, 0.3], [0.2, 0.0]]), keep=0.6)
        tensor([[ True,  True],
                [False, False]])
    """
    attn = as_map(attn)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a mass fraction in (0, 1], got {keep}")
    flat = attn.detach().flatten(-2).to(torch.float64)
    if flat.numel() and bool((flat < 0).any()):
        raise ValueError("attn has negative values: the mass threshold needs a non-negative map "
                         "(pass softmax attention, or shift/clip the map first)")
    values, order = torch.sort(flat, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(values, dim=-1) - values  # mass of strictly higher-ranked pixels
    total = values.sum(dim=-1, keepdim=True)
    kept_sorted = mass_before < keep * total
    kept_sorted &= values > 0
    kept = torch.empty_like(kept_sorted).scatter_(-1, order, kept_sorted)
    return kept.view(attn.shape)


def upsample_map(
    attn: torch.Tensor | np.ndarray,
    size: int | tuple[int, int],
    mode: UpsampleMode = "nearest",
) -> torch.Tensor:
    """Resize patch-grid map(s) (h, w), (B, h, w) or (B, C, h, w) to the image size (H, W).

    ``nearest`` (default) gives every pixel the attention of the patch it belongs to, which is what
    the map means: one value per patch. With H = p·h (patch size p) it is exactly DINO's
    ``interpolate(scale_factor=p, mode="nearest")``. Value thresholds commute with it, but the mass
    mask does not: on the upsampled map the cut may split a patch's p² equal pixels, so DINO (and
    :func:`mass_mask_at_size`) cuts on the patch grid and upsamples the *mask*. ``bilinear``
    (align_corners=False) gives smoother object boundaries — sometimes a higher Jaccard for round
    objects — but invents values between patch centres; use it for display or as a sensitivity
    check, and say which one you report. Bilinear weights are non-negative, so a non-negative map
    stays non-negative.

    Returns a float tensor (float32 for integer input) on the input's device.
    """
    attn = as_map(attn)
    if attn.dim() > 4:
        raise ValueError(f"attn must have shape (h, w), (B, h, w) or (B, C, h, w), got {tuple(attn.shape)}")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    if len(out_size) != 2 or min(out_size) < 1:
        raise ValueError(f"size must be an int or (H, W) with positive entries, got {size}")
    lead = attn.shape[:-2]
    grid = attn.reshape(1, -1, *attn.shape[-2:])  # interpolate wants (N, C, h, w)
    if mode == "nearest":
        resized = F.interpolate(grid, size=out_size, mode="nearest")
    else:
        # bilinear is not implemented for half precision on every device: run it in float32.
        resized = F.interpolate(grid.float(), size=out_size, mode="bilinear", align_corners=False)
        resized = resized.to(attn.dtype)
    return resized.reshape(*lead, *out_size)


def mass_mask_at_size(
    attn: torch.Tensor | np.ndarray,
    size: int | tuple[int, int],
    keep: float = 0.6,
    upsample_mode: UpsampleMode = "nearest",
) -> torch.Tensor:
    """DINO's ``keep``-mass mask of patch-grid map(s) (..., h, w), at image size (..., H, W).

    ``nearest``: the mask is cut on the patch grid, then upsampled — whole patches in or out, as in
    DINO's ``visualize_attention.py``. ``bilinear``: the map is upsampled first and cut per pixel.
    A map already at (H, W) is cut directly.
    """
    attn = as_map(attn)
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(attn.shape[-2:]) == out_size:
        return mass_threshold_mask(attn, keep)
    if upsample_mode == "nearest":
        return upsample_map(mass_threshold_mask(attn, keep).float(), out_size, "nearest").bool()
    return mass_threshold_mask(upsample_map(attn, out_size, upsample_mode), keep)


def largest_component_box(mask: torch.Tensor | np.ndarray, connectivity: Literal[4, 8] = 8) -> torch.Tensor:
    """Box (x0, y0, x1, y1), inclusive-exclusive, of the largest connected component of each mask.

    Components are found with ``scipy.ndimage.label`` (torch and torchvision have no connected-component
    labelling) using 8-connectivity by default: upsampled patch masks often touch only at patch corners, and an
    object split at a corner is still one object. Pass 4 for edge-only neighbours. The largest component is
    the one with most pixels; on a tie, the first in raster order. The box is
    :func:`simpool.data.masks.mask_to_box` of that component; an empty mask gives (0, 0, 0, 0).
    Shape (H, W) -> (4,), (..., H, W) -> (..., 4); int64, on CPU.

    Example::

        >>> m = torch.zeros(6, 8, dtype=torch.bool); m[0:2, 0:2] = True; m[3:6, 4:8] = True
        >>> largest_component_box(m)
        tensor([4, 3, 8, 6])
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask_t = as_tensor(mask, "mask")
    if mask_t.dim() < 2:
        raise ValueError(f"mask must have shape (H, W) or (..., H, W), got {tuple(mask_t.shape)}")
    try:
        from scipy import ndimage  # optional dependency (comes with scikit-image / scikit-learn)
    except ImportError as error:
        raise ImportError("largest_component_box needs scipy: pip install scipy") from error
    structure = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    masks = mask_t.detach().bool().cpu().numpy()
    flat = masks.reshape(-1, *masks.shape[-2:])
    largest = np.zeros_like(flat)
    for i, single in enumerate(flat):
        labels, count = ndimage.label(single, structure=structure)
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            largest[i] = labels == int(np.argmax(sizes)) + 1
    return mask_to_box(torch.from_numpy(largest)).view(*masks.shape[:-2], 4)
