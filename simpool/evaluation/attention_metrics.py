"""How well do attention maps delineate objects? Jaccard, boxes and CorLoc, per head and over a data set.

The masks and boxes come from :mod:`simpool.attention_maps` (DINO's ``keep``-mass mask, the largest component's
box); this module scores them against ground truth:

* :func:`jaccard` — intersection over union of two masks, optionally ignoring "void" pixels.
* :func:`threshold_jaccard_curve` / :func:`best_of_curve` — Jaccard of the map thresholded
  at several levels, and the best of them.
* :func:`box_iou`, :func:`corloc` — box overlap and the correct-localisation rate used in unsupervised
  object discovery (IoU ≥ 0.5 with any gt box).
* :func:`evaluate_maps` — all of the above, averaged over a dataset, per head.

Everything is plain torch; no model code. Inputs may live on any device; the masks are small, so the
dataset-level helpers work on CPU.

Example::

    >>> attn = torch.rand(4, 6, 14, 14)                   # (images, heads, h, w) from a ViT-S/16
    >>> masks = torch.zeros(4, 224, 224, dtype=torch.bool); masks[:, 50:150, 60:170] = True
    >>> report = evaluate_maps(attn, masks)               # maps are upsampled to 224 x 224
    >>> report["best_head"]["jaccard_mass"], report["mean_over_heads"]["corloc"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torchvision

from simpool.attention_maps import (
    UpsampleMode,
    as_map,
    as_tensor,
    largest_component_box,
    mass_mask_at_size,
    upsample_map,
)
from simpool.data.masks import mask_to_box

__all__ = [
    "DEFAULT_VALUE_THRESHOLDS",
    "DEFAULT_MASS_THRESHOLDS",
    "jaccard",
    "threshold_jaccard_curve",
    "best_of_curve",
    "box_iou",
    "corloc",
    "evaluate_maps",
]

# Thresholds on the min-max normalised map (criterion="value") and kept-mass fractions
# (criterion="mass") tried by the best-threshold Jaccard.
DEFAULT_VALUE_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
DEFAULT_MASS_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 20))

Criterion = Literal["value", "mass"]
CORLOC_IOU = 0.5  # a box "localises" the object when IoU >= 0.5 (LOST, TokenCut, DINO-seg papers)


# ----------------------------------------------------------------------------- Jaccard


def jaccard(
    pred_mask: torch.Tensor | np.ndarray,
    gt_mask: torch.Tensor | np.ndarray,
    ignore: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Jaccard index (IoU) |P ∩ G| / |P ∪ G| of boolean masks over the last two dims.

    Shapes broadcast: (H, W) vs (H, W) gives a 0-d tensor, (B, heads, H, W) vs (B, 1, H, W) gives
    (B, heads). ``ignore`` (e.g. VOC's void band, value 255) marks pixels that count for neither
    set. If P ∪ G is empty (nothing predicted, nothing there) the masks agree: Jaccard 1.

    Example::

        >>> jaccard(torch.tensor([[1, 1], [0, 0]]).bool(), torch.tensor([[1, 0], [0, 0]]).bool())
        tensor(0.5000, dtype=torch.float64)
    """
    pred = as_tensor(pred_mask, "pred_mask").bool()
    gt = as_tensor(gt_mask, "gt_mask").bool().to(pred.device)
    if pred.dim() < 2 or gt.dim() < 2 or pred.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"pred_mask {tuple(pred.shape)} and gt_mask {tuple(gt.shape)} must end in the same "
                         "(H, W); upsample the prediction to the mask size first (upsample_map)")
    if ignore is not None:
        valid = ~as_tensor(ignore, "ignore").bool().to(pred.device)
        pred, gt = pred & valid, gt & valid
    inter = (pred & gt).sum(dim=(-2, -1)).to(torch.float64)  # int count: faster than a float sum
    union = (pred | gt).sum(dim=(-2, -1)).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _normalise_min_max(attn: torch.Tensor) -> torch.Tensor:
    """Per map, (a - min) / (max - min); a constant map becomes all zeros."""
    flat = attn.flatten(-2).to(torch.float64)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    return ((flat - low) / span.clamp_min(torch.finfo(torch.float64).tiny)).view(attn.shape)


def threshold_jaccard_curve(
    attn: torch.Tensor | np.ndarray,
    gt_mask: torch.Tensor | np.ndarray,
    thresholds: Sequence[float] | None = None,
    criterion: Criterion = "value",
    ignore: torch.Tensor | np.ndarray | None = None,
    upsample_mode: UpsampleMode = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jaccard of the map thresholded at each of T levels: returns (jaccards (..., T), thresholds (T,)).

    ``criterion="value"``: mask = (a - min a) / (max a - min a) > t, thresholds on the min-max
    normalised map (default 0.05, 0.10, …, 0.95). ``criterion="mass"``: mask =
    :func:`mass_mask_at_size` (a, keep=t), t a kept-mass fraction (default 0.10, …, 0.95).
    ``attn`` may be on the patch grid (h, w): it is brought to the mask's (H, W) with
    ``upsample_mode`` (mass masks cut on the grid first under ``nearest``, as DINO does).
    """
    attn = as_map(attn)
    gt = as_tensor(gt_mask, "gt_mask").bool().to(attn.device)
    if criterion not in ("value", "mass"):
        raise ValueError(f"criterion must be 'value' (normalised attention) or 'mass' (kept mass), "
                         f"got {criterion!r}")
    if gt.dim() < 2:
        raise ValueError(f"gt_mask must have shape (H, W) or (..., H, W), got {tuple(gt.shape)}")
    if thresholds is None:
        thresholds = DEFAULT_VALUE_THRESHOLDS if criterion == "value" else DEFAULT_MASS_THRESHOLDS
    levels = torch.as_tensor(list(thresholds), dtype=torch.float64)
    if levels.dim() != 1 or levels.numel() == 0:
        raise ValueError(f"thresholds must be a non-empty sequence of floats, got {thresholds}")
    ignore_t = None if ignore is None else as_tensor(ignore, "ignore").bool().to(attn.device)
    size = tuple(gt.shape[-2:])
    if criterion == "value":
        if tuple(attn.shape[-2:]) != size:
            attn = upsample_map(attn, size, upsample_mode)  # value thresholds commute with nearest
        curve = _value_threshold_jaccard(_normalise_min_max(attn), gt, levels.to(attn.device), ignore_t)
        return curve, levels
    masks = torch.stack([mass_mask_at_size(attn, size, float(t), upsample_mode) for t in levels], dim=-3)
    ignore_t = None if ignore_t is None else ignore_t.unsqueeze(-3)
    return jaccard(masks, gt.unsqueeze(-3), ignore_t), levels


def best_of_curve(curve: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best Jaccard on threshold curve(s) (..., T) and the threshold reaching it: returns ((...), (...)).

    With the curve of :func:`threshold_jaccard_curve` this is the best-threshold Jaccard
    max_t J((a - min)/(max - min) > t, G) for t in 0.05 … 0.95 (``criterion="value"``; kept-mass
    fractions with ``criterion="mass"``). Choosing t per map uses the ground truth, so this is an
    *oracle upper bound* on what one threshold can do — report it next to the fixed 60%-mass
    Jaccard, not instead of it. On a dataset-mean curve it picks the one threshold for all images.
    On ties the lowest t wins.

    Example::

        >>> best, t = best_of_curve(*threshold_jaccard_curve(attn, gt_mask))
    """
    index = curve.argmax(dim=-1)  # argmax returns the first maximum: the lowest threshold
    best = curve.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return best, levels.to(index.device)[index]


def _value_threshold_jaccard(
    normalised: torch.Tensor, gt: torch.Tensor, levels: torch.Tensor, ignore: torch.Tensor | None
) -> torch.Tensor:
    """J(normalised > t, gt) for all t at once from sorted values instead of T full masks.

    |P_t| = #{v > t} and |P_t ∩ G| = #{v > t, v in G} are counts above t in sorted lists
    (``searchsorted``); |P_t ∪ G| = |P_t| + |G| - |P_t ∩ G|. Same numbers as thresholding, T times
    less memory traffic.
    """
    shape = torch.broadcast_shapes(normalised.shape, gt.shape)
    values = normalised.expand(shape).flatten(-2)
    in_gt = gt.expand(shape).flatten(-2)
    if ignore is not None:  # void pixels are neither predicted nor ground truth
        valid = ~ignore.expand(shape).flatten(-2)
        in_gt = in_gt & valid
        values = values.masked_fill(~valid, float("-inf"))
    queries = levels.expand(*values.shape[:-1], -1).contiguous()
    num_pixels = values.shape[-1]

    def count_above(sorted_values: torch.Tensor) -> torch.Tensor:
        return num_pixels - torch.searchsorted(sorted_values, queries, right=True)

    predicted = count_above(values.sort(dim=-1).values)
    inter = count_above(values.masked_fill(~in_gt, float("-inf")).sort(dim=-1).values)
    union = predicted + in_gt.sum(dim=-1, keepdim=True) - inter
    inter, union = inter.to(torch.float64), union.to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


# ----------------------------------------------------------------------------- boxes

def box_iou(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """IoU of boxes (x0, y0, x1, y1): (N, 4) × (M, 4) → (N, M); two single (4,) boxes → 0-d.

    Area = (x1 - x0)(y1 - y0), which counts pixels for the inclusive-exclusive boxes of this module.
    Wraps ``torchvision.ops.box_iou`` in float64; two zero-area boxes (0/0) get IoU 0.
    """
    a_t = as_tensor(a, "a").to(torch.float64)
    b_t = as_tensor(b, "b").to(torch.float64).to(a_t.device)
    single = a_t.dim() == 1 and b_t.dim() == 1
    if a_t.shape[-1:] != (4,) or b_t.shape[-1:] != (4,) or a_t.dim() > 2 or b_t.dim() > 2:
        raise ValueError(f"boxes must be (4,) or (N, 4), got {tuple(a_t.shape)} and {tuple(b_t.shape)}")
    a_t, b_t = a_t.reshape(-1, 4), b_t.reshape(-1, 4)
    for name, boxes in (("a", a_t), ("b", b_t)):
        if bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
            raise ValueError(f"boxes in {name} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    iou = torchvision.ops.box_iou(a_t, b_t).nan_to_num(0.0)
    return iou.view(()) if single else iou


def corloc(
    pred_boxes: torch.Tensor | np.ndarray,
    gt_boxes_per_image: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray,
    thr: float = 0.5,
) -> float:
    """Correct localisation: share of images whose predicted box has IoU ≥ ``thr`` with any gt box.

    CorLoc = (1/N) Σ_i 1[max_j IoU(p_i, g_ij) ≥ thr] (the unsupervised object-discovery metric of
    LOST/TokenCut, thr = 0.5). ``pred_boxes`` is (N, 4), one box per image; ``gt_boxes_per_image``
    is a list of (k_i, 4) (or (4,)) boxes, or a tensor (N, 4) / (N, k, 4).

    Example::

        >>> corloc(torch.tensor([[0, 0, 10, 10], [0, 0, 2, 2]]), [torch.tensor([[0, 0, 10, 9]]),
        ...                                                       torch.tensor([[5, 5, 9, 9]])])
        0.5
    """
    pred = as_tensor(pred_boxes, "pred_boxes")
    if pred.dim() != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred_boxes must have shape (N, 4), got {tuple(pred.shape)}")
    if len(gt_boxes_per_image) != pred.shape[0]:
        raise ValueError(f"got {pred.shape[0]} predicted boxes but gt boxes for {len(gt_boxes_per_image)} "
                         "images; pass one entry of gt boxes per image")
    if pred.shape[0] == 0:
        raise ValueError("corloc of zero images is undefined: pass at least one image")
    hits = 0
    for i, gt in enumerate(gt_boxes_per_image):
        gt_t = as_tensor(gt, "gt boxes").reshape(-1, 4)
        if gt_t.shape[0] == 0:
            raise ValueError(f"image {i} has no gt box: CorLoc is only defined for images with an object; "
                             "drop such images")
        hits += bool((box_iou(pred[i : i + 1], gt_t).max() >= thr).item())
    return hits / pred.shape[0]


# ----------------------------------------------------------------------------- dataset report


def _image_maps(map_: torch.Tensor | np.ndarray, index: int) -> torch.Tensor:
    map_t = as_map(map_, f"maps[{index}]")
    if map_t.dim() == 2:
        map_t = map_t.unsqueeze(0)
    if map_t.dim() != 3:
        raise ValueError(f"maps[{index}] must be (heads, h, w) or (h, w), got {tuple(map_t.shape)}")
    return map_t.detach().cpu()


def _score_heads(
    heads: torch.Tensor,
    gt: torch.Tensor,
    gt_boxes: torch.Tensor,
    ignore: torch.Tensor | None,
    keep: float,
    thresholds: Sequence[float] | None,
    criterion: Criterion,
    upsample_mode: UpsampleMode,
    connectivity: Literal[4, 8],
) -> dict[str, torch.Tensor]:
    """Per-head metrics of one image: heads (C, h, w) on the patch grid, gt (H, W) → (C,) tensors (and the
    (C, T) threshold curve with its (T,) levels)."""
    size = tuple(gt.shape)
    mass_masks = mass_mask_at_size(heads, size, keep, upsample_mode)
    pred_boxes = largest_component_box(mass_masks, connectivity)  # (C, 4)
    curve, levels = threshold_jaccard_curve(heads, gt, thresholds, criterion, ignore, upsample_mode)
    return {
        "jaccard_mass": jaccard(mass_masks, gt, ignore),
        "jaccard_best_threshold": best_of_curve(curve, levels)[0],
        "jaccard_curve": curve,  # (C, T): kept to pick one dataset-wide threshold later
        "levels": levels,
        "corloc": (box_iou(pred_boxes, gt_boxes).amax(dim=-1) >= CORLOC_IOU).to(torch.float64),
    }


def evaluate_maps(
    maps: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    gt_masks: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    gt_boxes: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | None = None,
    *,
    keep: float = 0.6,
    thresholds: Sequence[float] | None = None,
    criterion: Criterion = "value",
    upsample_mode: UpsampleMode = "nearest",
    connectivity: Literal[4, 8] = 8,
    ignore_masks: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | None = None,
) -> dict:
    """Mean attention-map quality over a dataset, per head, as a JSON-ready dict.

    For every image i and head c, with the patch-grid map brought to the mask size by
    ``upsample_mode`` (``nearest``: DINO's order, cut on the grid, upsample the mask):
      * ``jaccard_mass``: J(mass_mask_at_size(a, keep), G)                (DINO's 60%-mass mask)
      * ``jaccard_best_threshold``: max_t J(a > t, G), t chosen per image (oracle, see
        :func:`best_of_curve`; ``criterion`` picks value or mass thresholds)
      * ``jaccard_dataset_threshold``: mean_i J(a_i > t*, G_i) at the single t* that maximises the
        dataset mean (a fair, non-oracle counterpart); ``dataset_threshold`` gives t*
      * ``corloc``: box of the largest component of the mass mask has IoU ≥ 0.5 with a gt box
        (gt boxes: ``gt_boxes`` if given, else the tight box of each gt mask)
    and average over images. The report holds these means ``per_head`` (lists over heads), their
    ``mean_over_heads``, the ``best_head`` (highest mean ``jaccard_mass``; first on ties) with its
    metrics, and ``head_average_map``: the metrics of the map averaged over heads.

    Reading the numbers: ``jaccard_mass`` rewards *peaked* maps. A map that is flat on the object
    and zero elsewhere keeps only 60% of the object's area, so it scores ≈ 0.6, not 1 (on 200
    fashion-on-photos test images the patch-averaged true mask scores 0.60 here and 0.77 on
    ``jaccard_best_threshold``). Compare models on the same metric, and look at both.

    Args:
        maps: (N, heads, h, w) or (N, h, w), or a list of per-image (heads, h, w) / (h, w) maps
            (lists allow images of different sizes). Every image needs the same number of heads.
        gt_masks: (N, H, W) bool, or a list of (H_i, W_i) masks.
        gt_boxes: optional list of (k_i, 4) boxes (x0, y0, x1, y1), inclusive-exclusive.
        ignore_masks: optional (N, H, W) / list of void masks (pixels ignored by Jaccard).

    Example::

        >>> report = evaluate_maps(attn_maps, gt_masks)      # attn (N, 6, 14, 14), masks (N, 224, 224)
        >>> print(report["best_head"], report["mean_over_heads"]["jaccard_mass"])
    """
    if len(maps) != len(gt_masks):
        raise ValueError(f"got maps for {len(maps)} images but {len(gt_masks)} gt masks; "
                         "pass one of each per image")
    if len(maps) == 0:
        raise ValueError("evaluate_maps needs at least one image")
    if gt_boxes is not None and len(gt_boxes) != len(maps):
        raise ValueError(f"gt_boxes has {len(gt_boxes)} entries for {len(maps)} images")
    if ignore_masks is not None and len(ignore_masks) != len(maps):
        raise ValueError(f"ignore_masks has {len(ignore_masks)} entries for {len(maps)} images")

    per_image: list[dict[str, torch.Tensor]] = []
    num_heads = None
    for i in range(len(maps)):
        heads = _image_maps(maps[i], i)
        if num_heads is None:
            num_heads = heads.shape[0]
        elif heads.shape[0] != num_heads:
            raise ValueError(f"maps[{i}] has {heads.shape[0]} heads, maps[0] has {num_heads}; "
                             "all images need the same heads")
        gt = as_tensor(gt_masks[i], f"gt_masks[{i}]").detach().cpu().bool()
        if gt.dim() != 2:
            raise ValueError(f"gt_masks[{i}] must be (H, W), got {tuple(gt.shape)}")
        ignore = None if ignore_masks is None else as_tensor(ignore_masks[i], "ignore").cpu().bool()
        if gt_boxes is None:
            boxes = mask_to_box(gt).view(1, 4)
        else:
            boxes = as_tensor(gt_boxes[i], f"gt_boxes[{i}]").reshape(-1, 4)
        if boxes.shape[0] == 0 or (gt_boxes is None and not bool(gt.any())):
            raise ValueError(f"image {i} has an empty gt mask / no gt box; drop images without objects")
        # Heads first, then the head-averaged map as one extra "head" so it is scored identically.
        candidates = torch.cat([heads, heads.mean(dim=0, keepdim=True)], dim=0)
        scores = _score_heads(candidates, gt, boxes, ignore, keep, thresholds, criterion, upsample_mode,
                              connectivity)
        per_image.append(scores)

    def mean_over_images(key: str) -> torch.Tensor:
        return torch.stack([scores[key] for scores in per_image]).mean(dim=0)

    jaccard_mass = mean_over_images("jaccard_mass")  # (C + 1,)
    curves = mean_over_images("jaccard_curve")  # (C + 1, T): dataset-mean Jaccard per threshold
    dataset_jaccard, dataset_threshold = best_of_curve(curves, per_image[0]["levels"])
    columns = {
        "jaccard_mass": jaccard_mass,
        "jaccard_best_threshold": mean_over_images("jaccard_best_threshold"),
        "jaccard_dataset_threshold": dataset_jaccard,
        "dataset_threshold": dataset_threshold,
        "corloc": mean_over_images("corloc"),
    }

    def row(index: int) -> dict[str, float]:
        return {name: float(values[index]) for name, values in columns.items()}

    best = int(torch.argmax(jaccard_mass[:num_heads]))
    return {
        "num_images": len(maps),
        "num_heads": num_heads,
        "keep": keep,
        "criterion": criterion,
        "upsample_mode": upsample_mode,
        "per_head": {name: [float(v) for v in values[:num_heads]] for name, values in columns.items()},
        "mean_over_heads": {name: float(values[:num_heads].mean()) for name, values in columns.items()},
        "best_head": {"head": best, **row(best)},
        "head_average_map": row(num_heads),
    }
