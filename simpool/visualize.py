"""Attention maps of a backbone drawn over the image: heat-map overlays, DINO's 60%-mass masks, comparisons.

Which map:

* SimPool models: SimPool's own attention ``a`` (softmax over the patches of ``K q``), one map per SimPool
  head;
* official-mode ViTs: the last block's [CLS]-to-patch self-attention, one map per head;
* when there are several heads, their mean is added as one more map (named ``mean``).

Every map lives on the patch grid (h, w) = (H / p, W / p). For display it is upsampled to the image with
*nearest* neighbours, so each patch is one flat block (what DINO's ``visualize_attention.py`` does); the
mask is DINO's: the smallest set of patches holding ``keep`` (60%) of the attention mass
(:func:`simpool.attention_maps.mass_mask_at_size`), cut on the grid, then upsampled the same way.

Image size: the shorter side is scaled to ``image_size`` keeping the aspect ratio, then each side is rounded
to the nearest multiple of the model's stride (the patch size of a ViT, 32 for ResNet/ConvNeXt;
:func:`simpool.attention_maps.prepare_image`). That is a
resize, not a crop, so nothing is cut off and the aspect ratio moves by at most half a patch.
``image_size=None`` keeps the photo's size (rounded the same way). Every PNG written has that processed
size (H, W).

Example:
    >>> model = load_backbone("exports/vits")
    >>> image, rgb = prepare_image(Image.open("cat.jpg"), 224, model_stride(model))   # simpool.attention_maps
    >>> maps = image_maps(model, image)            # (heads + 1, h, w), or (1, h, w) for one head
    >>> save_overlay("cat_attention.png", rgb, maps[-1]); save_mask("cat_mask.png", maps[-1], rgb.shape[:2])
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from simpool.attention_maps import attention_maps, mass_mask_at_size, model_stride, prepare_image, upsample_map
from simpool.pca import pca_image, pca_rgb

DEFAULT_CMAP = "inferno"
PCA_FILE = "pca.png"

log = logging.getLogger(__name__)


def image_maps(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(M, h, w) float32 maps of one image (1, 3, H, W): each head, then their mean if there are several."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(image.shape)}")
    maps = attention_maps(model, image)[0]  # (heads, h, w)
    if maps.shape[0] > 1:
        maps = torch.cat([maps, maps.mean(dim=0, keepdim=True)])
    return maps


def map_names(num_maps: int) -> list[str]:
    """Tags of ``image_maps``' output: ``""`` for a single map, else ``head0``..``headN-1``, ``mean``."""
    if num_maps == 1:
        return [""]
    return [f"head{i}" for i in range(num_maps - 1)] + ["mean"]


def heat_map(attn: torch.Tensor, size: tuple[int, int], cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """A grid map (h, w) as an (H, W, 3) uint8 colour image, nearest-upsampled, min-max scaled to [0, 1].

    Min-max (as matplotlib's ``imshow`` in DINO's script) rather than division by the maximum: attention is
    often nearly flat, and the differences between patches are what the picture is for.
    """
    values = upsample_map(attn.float(), size, mode="nearest")
    low, high = values.min(), values.max()
    values = (values - low) / (high - low).clamp_min(torch.finfo(values.dtype).tiny)
    rgba = matplotlib.colormaps[cmap](values.numpy())
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(
    image: np.ndarray, attn: torch.Tensor, alpha: float = 0.6, cmap: str = DEFAULT_CMAP
) -> np.ndarray:
    """Blend the heat map of ``attn`` (h, w) over ``image`` (H, W, 3) uint8: (1 - alpha) image + alpha map."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = heat_map(attn, image.shape[:2], cmap).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return blended.round().clip(0, 255).astype(np.uint8)


def save_overlay(path: str | os.PathLike, image: np.ndarray, attn: torch.Tensor, **kwargs) -> Path:
    Image.fromarray(overlay(image, attn, **kwargs)).save(path)
    return Path(path)


def attention_mask(attn: torch.Tensor, size: tuple[int, int], keep: float = 0.6) -> np.ndarray:
    """DINO's mask at image size: fewest patches holding ``keep`` of the mass, cut on the grid, upsampled."""
    return mass_mask_at_size(attn, size, keep=keep, upsample_mode="nearest").numpy()


def save_mask(path: str | os.PathLike, attn: torch.Tensor, size: tuple[int, int], keep: float = 0.6) -> Path:
    """Write the ``keep``-mass mask as an 8-bit grayscale PNG (255 kept, 0 dropped) of size ``size``."""
    mask = attention_mask(attn, size, keep)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)  # 2-D uint8: mode "L"
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# figures and whole images
# ----------------------------------------------------------------------------------------------------------
def compare_figure(
    path: str | os.PathLike,
    image: np.ndarray,
    maps: Sequence[torch.Tensor],
    labels: Sequence[str],
    keep: float = 0.6,
) -> Path:
    """One figure: the image, then per model its attention overlay and its ``keep``-mass mask, side by side.

    ``maps`` holds one (h, w) map per model (models may have different grids: each is upsampled to the image).
    """
    if len(maps) != len(labels):
        raise ValueError(f"{len(maps)} maps but {len(labels)} labels")
    size = image.shape[:2]
    panels = [("image", image)]
    for attn, label in zip(maps, labels):
        mask = attention_mask(attn, size, keep)
        masked = (image * (0.25 + 0.75 * mask[..., None])).astype(np.uint8)  # dim what the mask drops
        panels += [(f"{label}\nattention", overlay(image, attn)), (f"{label}\n{keep:.0%} mass", masked)]
    height, width = size
    figure = Figure(figsize=(2.6 * len(panels), 2.6 * height / width + 0.6), dpi=100)
    FigureCanvasAgg(figure)  # attaches an Agg canvas: no GUI, no global backend switch
    axes = figure.subplots(1, len(panels))
    for ax, (title, picture) in zip(np.atleast_1d(axes), panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def visualize_image(
    models: Sequence[tuple[str, nn.Module]],
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int | None = 224,
    keep: float = 0.6,
) -> dict[str, Path]:
    """Write image.png, then per model and map ``<prefix>attention[_<name>].png`` and
    ``<prefix>mask[_<name>].png`` (names from ``map_names``; prefix ``""`` for the first model,
    ``"compare_"``, ``"compare2_"``... for the others) and, with two models or more, ``compare.png``
    (their head-mean maps, titled by the labels). Returns {file tag: path}.
    """
    if not models:
        raise ValueError("no model to visualise")
    stride = math.lcm(*(model_stride(model) for _, model in models))  # one size that suits every model
    with Image.open(image_path) as photo:
        image, rgb = prepare_image(photo, image_size, stride)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = rgb.shape[:2]
    written = {"image": out / "image.png"}
    Image.fromarray(rgb).save(written["image"])
    summary_maps = []
    for index, (_, model) in enumerate(models):
        prefix = "" if index == 0 else f"compare{index if index > 1 else ''}_"
        maps = image_maps(model, image)
        for name, attn in zip(map_names(len(maps)), maps):
            suffix = f"_{name}" if name else ""
            tag_attention, tag_mask = f"{prefix}attention{suffix}", f"{prefix}mask{suffix}"
            written[tag_attention] = save_overlay(out / f"{tag_attention}.png", rgb, attn)
            written[tag_mask] = save_mask(out / f"{tag_mask}.png", attn, size, keep)
        summary_maps.append(maps[-1])  # the mean over heads (or the only map)
    if len(models) > 1:
        labels = [label for label, _ in models]
        written["compare"] = compare_figure(out / "compare.png", rgb, summary_maps, labels, keep)
    return written


@torch.no_grad()
def visualize_pca(
    model: nn.Module,
    image_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    image_size: int | None = 224,
    joint: bool = False,
    threshold: float = 0.0,
) -> dict[str, Path]:
    """Write ``out_dir/<image stem>/pca.png`` per image: the PCA picture of its patch features
    (:mod:`simpool.pca`: background removed by the first component, three components as RGB, nearest-upsampled
    to the image as :func:`visualize_image` sizes it). ``joint``: one colour PCA over every image's foreground (the same
    colours mean the same directions in all of them), else one per image. Files PIL cannot read are skipped
    with a warning. Returns {image stem: path}.
    """
    device = next(model.parameters()).device
    stride = model_stride(model)
    grids, sizes, stems = [], [], []
    for image_path in image_paths:
        try:
            with Image.open(image_path) as photo:
                image, rgb = prepare_image(photo, image_size, stride)
        except OSError as err:  # PIL's UnidentifiedImageError is an OSError
            log.warning("%s: skipped, not a readable image (%s)", image_path, err)
            continue
        grids.append(model.patch_features(image.to(device))[0].float().cpu())
        sizes.append(rgb.shape[:2])
        stems.append(Path(image_path).stem)
    pictures = pca_rgb(grids, threshold) if joint else [pca_rgb([grid], threshold)[0] for grid in grids]
    written = {}
    for stem, size, (colours, _) in zip(stems, sizes, pictures):
        folder = Path(out_dir) / stem
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pca_image(colours, size)).save(folder / PCA_FILE)
        written[stem] = folder / PCA_FILE
    return written


__all__ = [
    "PCA_FILE",
    "visualize_pca",
    "attention_mask",
    "compare_figure",
    "heat_map",
    "image_maps",
    "map_names",
    "overlay",
    "save_mask",
    "save_overlay",
    "visualize_image",
]
