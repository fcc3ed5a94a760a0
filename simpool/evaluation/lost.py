"""LOST (Siméoni et al., BMVC 2021, valeoai/LOST) and DINO-seg: one object box per image from a frozen ViT.

**LOST** on the patch features F (N, d) of one image (the last block's attention keys, LOST's default):

1. similarity A = F F^T (N, N); the patch graph links i and j when A_ij > 0 (i != j);
2. degree deg_i = #{j != i : A_ij > 0}; patches sorted by increasing degree (ties: lower index first);
   the **seed** s is the patch of lowest degree (objects cover fewer patches than background);
3. expansion: of the ``k_patches`` (100) lowest-degree patches, keep those with A_s,j > 0 (the seed included);
   their summed similarity m_j = sum_{i kept} A_ij is a map on the patch grid;
4. box: the 4-connected component of {m > 0} holding the seed, its patch extent times the patch size, clipped to
   the image (x0, y0, x1, y1), inclusive-exclusive pixels.

**DINO-seg** (LOST's ``dino_seg``, after DINO's ``visualize_attention.py``): on the patch grid, keep the highest
patches holding 60% of a map's mass (:func:`simpool.attention_maps.mass_threshold_mask`), label its 4-connected
components, box one of them times the patch size. LOST's code picks the largest of components 1 .. n-1 (its
``range(max(labels))`` leaves out the last one) and, when the mask is a single component, boxes the *background*
(label 0). ``component="lost"`` repeats that, so that numbers compare with the ones published with it;
``component="largest"`` boxes the truly largest component (the first on ties).

Which features (``vit_patch_features``): ``source="block"``, the last block's self-attention keys (``q``/``v``
with ``which``) of the patch tokens -- LOST's definition, which a SimPool ViT (no [CLS]) has as well, so that
official and SimPool models are compared on the same kind of feature; ``source="simpool"``, SimPool's own keys
``W_K LN(x)`` (``which="k"``) or values ``LN(x)`` (``which="v"``) of the last block's tokens.

Example::

    >>> feats = vit_patch_features(model, image)[0]             # (N, d), image (1, 3, H, W) padded to whole patches
    >>> result = lost(feats, grid=(h, w), k_patches=100)
    >>> lost_box(result, patch_size=16, image_size=(375, 500))  # (x0, y0, x1, y1) in the unpadded image
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from simpool.attention_maps import mass_threshold_mask

__all__ = ["LostResult", "dinoseg_box", "lost", "lost_box", "patch_degrees", "vit_patch_features"]

FeatureSource = Literal["block", "simpool"]
Component = Literal["lost", "largest"]


def patch_degrees(similarity: torch.Tensor) -> torch.Tensor:
    """deg_i = #{j != i : A_ij > 0} of a similarity matrix (N, N), as int64 (N,)."""
    positive = similarity > 0
    positive.fill_diagonal_(False)
    return positive.sum(dim=1)


@dataclass(frozen=True)
class LostResult:
    """What LOST found on one image: the seed's index (row-major on the grid), the kept patches, the degrees,
    the expansion map (h, w) and the seed's component (h, w) bool, and its patch box (x0, y0, x1, y1)."""

    seed: int
    similar: torch.Tensor
    degrees: torch.Tensor
    expansion: torch.Tensor
    component: np.ndarray
    patch_box: tuple[int, int, int, int]


def lost(features: torch.Tensor, grid: tuple[int, int], k_patches: int = 100) -> LostResult:
    """LOST on one image's patch features (N, d), N = h * w row-major; see the module docstring."""
    height, width = grid
    if features.dim() != 2 or features.shape[0] != height * width:
        raise ValueError(f"features must be (h * w, d) = ({height * width}, d), got {tuple(features.shape)}")
    if k_patches < 1:
        raise ValueError(f"k_patches must be >= 1, got {k_patches}")
    features = features.float()
    similarity = features @ features.T
    degrees = patch_degrees(similarity)
    order = torch.argsort(degrees, stable=True)  # increasing degree; ties keep the lower index first
    seed = int(order[0])
    potentials = order[:k_patches]
    similar = potentials[similarity[seed, potentials] > 0]
    expansion = similarity[similar].sum(dim=0).reshape(height, width)
    labels, _ = ndimage.label(expansion.cpu().numpy() > 0)  # LOST: scipy's default, 4-connectivity
    label = labels[seed // width, seed % width]
    if label == 0:  # cannot happen: A_ss > 0 adds to m_s, and every kept i has A_is > 0
        raise RuntimeError("LOST's seed fell outside the positive expansion map")
    component = labels == label
    rows, cols = np.nonzero(component)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return LostResult(seed, similar, degrees, expansion, component, box)


def lost_box(result: LostResult, patch_size: int, image_size: tuple[int, int]) -> list[float]:
    """The patch box in pixels of the image (H, W) = ``image_size`` (before its padding): x1, y1 clipped to W, H."""
    x0, y0, x1, y1 = (v * patch_size for v in result.patch_box)
    return [float(x0), float(y0), float(min(x1, image_size[1])), float(min(y1, image_size[0]))]


def dinoseg_box(attention: torch.Tensor, patch_size: int, keep: float = 0.6,
                component: Component = "lost") -> list[float]:
    """DINO-seg's box (x0, y0, x1, y1) in pixels from one patch-grid map (h, w); see the module docstring.

    Example::

        >>> a = torch.zeros(4, 4); a[1:3, 1:3] = 1.0; a[0, 3] = 0.1
        >>> dinoseg_box(a, 16, component="largest")
        [16.0, 16.0, 48.0, 48.0]
    """
    if component not in ("lost", "largest"):
        raise ValueError(f"component must be 'lost' or 'largest', got {component!r}")
    mask = mass_threshold_mask(attention.detach().float().cpu(), keep).numpy()
    labels, count = ndimage.label(mask)  # 4-connectivity, as LOST
    if component == "largest":
        chosen = int(np.argmax(np.bincount(labels.ravel(), minlength=count + 1)[1:])) + 1 if count else 0
    else:
        sizes = [int((labels == c).sum()) for c in range(labels.max())]  # LOST's loop: labels 0 .. n-1
        chosen = int(np.argmax(sizes[1:])) + 1 if len(sizes) > 1 else 0
    rows, cols = np.nonzero(labels == chosen)
    box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    return [float(v * patch_size) for v in box]


@torch.no_grad()
def vit_patch_features(model: nn.Module, images: torch.Tensor, which: Literal["k", "q", "v"] = "k",
                       source: FeatureSource = "block") -> torch.Tensor:
    """(B, N, d) features of the patch tokens of a simpool ViT, the [CLS] token left out.

    ``source="block"``: the output of the last block's ``qkv`` projection split into q | k | v (heads
    concatenated, LOST's hook); ``source="simpool"``: SimPool's ``W_K LN(x)`` (``k``) or ``LN(x)`` (``v``) of
    the last block's tokens (SimPool has one query for the image, so ``q`` does not apply).
    """
    if not hasattr(model, "blocks") or not hasattr(model, "forward_tokens"):
        raise ValueError("LOST needs a ViT: the patch keys of its last block (convnets have none)")
    if which not in ("k", "q", "v"):
        raise ValueError(f"which must be 'k', 'q' or 'v', got {which!r}")
    prefix = model.num_prefix_tokens
    if source == "simpool":
        if model.simpool is None:
            raise ValueError("SimPool's keys need a SimPool model: use the block's keys for official mode")
        if which == "q":
            raise ValueError("SimPool has one query per image, not one per patch: use which='k' or 'v'")
        values = model.simpool.norm_patches(model.forward_tokens(images))
        return model.simpool.wk(values) if which == "k" else values
    if source != "block":
        raise ValueError(f"source must be 'block' or 'simpool', got {source!r}")
    captured: dict[str, torch.Tensor] = {}
    hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("qkv", out))
    try:
        model.forward_tokens(images)
    finally:
        hook.remove()
    dim = captured["qkv"].shape[-1] // 3
    part = {"q": 0, "k": 1, "v": 2}[which]
    return captured["qkv"][:, prefix:, part * dim:(part + 1) * dim]
