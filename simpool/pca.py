"""PCA of patch features as an RGB picture (dinov2's figure): background removed by the first component, then the
first three components of the foreground patches as red, green and blue.

For the patch features X (N patches, d) of each image:

1. first component: ``p1 = (X - mean) v1`` (``torch.linalg.svd`` of the centred X). Its sign is arbitrary; it is
   chosen so that the border patches score lower on average than the others, since objects are rarely on the
   border (dinov2's demo keeps the patches above a threshold of the first component);
2. foreground: ``p1 > threshold * std(p1)`` (default threshold 0: above the mean). Always per image: over a folder
   of unlike photos the first joint component separates the photos, not objects from their background;
3. on the foreground patches alone -- of this image, or of every image together ("joint", as dinov2's figure: one
   basis, so the same part gets the same colour in every image) -- a second PCA: the first three components, each
   min-max scaled to [0, 1] over those patches, are R, G, B; background patches are black;
4. each patch grid is upsampled to its image with nearest neighbours (one flat block per patch, as the attention
   maps are drawn).

Example::

    >>> feats = model.patch_features(image)[0]              # (d, h, w), see simpool.models
    >>> [(rgb, foreground)] = pca_rgb([feats])              # (h, w, 3) in [0, 1], (h, w) bool
    >>> picture = pca_image(rgb, (224, 224))                 # (224, 224, 3) uint8
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from simpool.attention_maps import upsample_map

__all__ = ["first_component", "pca_image", "pca_rgb", "principal_components"]


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), components (d, k)) of the rows of ``x`` (N, d): the top right-singular vectors of x - mean,
    in float64 so that near-equal variances still sort correctly. Signs are those of the SVD."""
    x = x.double()
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    components = vh[:k].T
    if components.shape[1] < k:  # fewer patches (or dims) than components: pad with zero directions
        components = torch.cat([components, components.new_zeros(x.shape[1], k - components.shape[1])], dim=1)
    return mean, components


def first_component(grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per grid (d, h, w), its patches' scores (h, w) on the first component of all the grids' patches, signed so
    that the border patches average below the rest (a grid without an interior keeps the SVD's sign)."""
    patches = torch.cat([g.flatten(1).T for g in grids])
    mean, components = principal_components(patches, 1)
    scores = [((g.flatten(1).T.double() - mean) @ components[:, 0]).view(g.shape[1:]) for g in grids]
    border, inner = [], []
    for score in scores:
        edge = torch.ones_like(score, dtype=torch.bool)
        edge[1:-1, 1:-1] = False
        border.append(score[edge])
        inner.append(score[~edge])
    inner_values = torch.cat(inner)
    if inner_values.numel() and torch.cat(border).mean() > inner_values.mean():
        scores = [-score for score in scores]
    return scores


def pca_rgb(grids: Sequence[torch.Tensor], threshold: float = 0.0,
            remove_background: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rgb (h, w, 3) float in [0, 1], foreground (h, w) bool) per patch grid (d, h, w): background cut per grid,
    one colour PCA over the foreground patches of all of them (pass one grid for a per-image picture).

    ``threshold`` is in standard deviations of the first component; ``remove_background=False`` colours every
    patch (the second PCA then runs on all patches and ``foreground`` is all True).
    """
    grids = [g.detach().float().cpu() for g in grids]
    if not grids:
        return []
    if remove_background:
        scores = [first_component([g])[0] for g in grids]
        masks = [s > threshold * s.std().clamp_min(1e-12) for s in scores]
    else:
        masks = [torch.ones(g.shape[1:], dtype=torch.bool) for g in grids]
    kept = [g.flatten(1).T[m.flatten()] for g, m in zip(grids, masks)]
    foreground = torch.cat(kept)
    out = []
    if foreground.shape[0] == 0:
        return [(np.zeros((*m.shape, 3)), m.numpy()) for m in masks]
    mean, components = principal_components(foreground, 3)
    projected = (foreground.double() - mean) @ components
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scale = (high - low).clamp_min(1e-12)
    for grid, mask in zip(grids, masks):
        rgb = torch.zeros(*mask.shape, 3, dtype=torch.float64)
        values = (grid.flatten(1).T[mask.flatten()].double() - mean) @ components
        rgb[mask] = ((values - low) / scale).clamp(0, 1)
        out.append((rgb.numpy(), mask.numpy()))
    return out


def pca_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid colour image (h, w, 3) in [0, 1] as (H, W, 3) uint8, nearest-upsampled."""
    grid = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
    picture = upsample_map(grid, tuple(size), mode="nearest").permute(1, 2, 0)
    return (picture.numpy() * 255).round().clip(0, 255).astype(np.uint8)
