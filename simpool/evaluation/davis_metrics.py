"""J (region similarity) and F (boundary accuracy) of DAVIS 2017, semi-supervised, as davis2017-evaluation defines
them (``davis2017/metrics.py``, ``utils.db_statistics``, ``evaluation.py``).

* ``J = |S ∩ G| / |S ∪ G|`` per object and frame (1 when both are empty), void pixels left out where given.
* ``F = 2 P R / (P + R)``: boundaries of S and G (``seg2bmap``: a pixel whose right, lower or lower-right
  neighbour differs), each matched to the other dilated by a disk of radius ``ceil(0.008 * image diagonal)``;
  ``P`` = fraction of S's boundary pixels near G's boundary, ``R`` the converse; (P, R) = (1, 0) when S has no
  boundary and G has one, (0, 1) the other way round, (1, 1) when neither has one.
* Per object over the frames between the first and the last (both excluded, the semi-supervised rule): the mean
  (M), the recall (fraction of frames above 0.5, R) and the decay (mean of the first quarter minus the last, D).
* J&F-Mean = (mean over objects of J-M + mean over objects of F-M) / 2; void (255) in the ground truth counts as
  background, as davis2017-evaluation does in this task.

The disk dilation is a convolution with the disk (torch has no morphology and scipy/skimage are not runtime
dependencies); the tests check it against ``skimage.morphology.disk`` + ``scipy.ndimage.binary_dilation``.

Example:
    >>> scores = evaluate_video(ground_truth, prediction)   # (T, H, W) object ids each
    >>> summarize({"bike": scores})["J&F-Mean"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["boundary_f_measure", "db_statistics", "disk", "evaluate_video", "region_similarity", "seg2bmap",
           "summarize"]

BOUND_TH = 0.008
VOID = 255


def region_similarity(annotation: np.ndarray, segmentation: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """J of binary masks (..., H, W) -> (...): intersection over union, 1 where the union is empty."""
    annotation, segmentation = annotation.astype(bool), segmentation.astype(bool)
    keep = np.ones_like(annotation) if void is None else ~void.astype(bool)
    inter = ((annotation & segmentation) & keep).sum(axis=(-2, -1))
    union = ((annotation | segmentation) & keep).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Binary boundary map (H, W) of a mask: pixels whose east, south or south-east neighbour differs (Martin's
    ``seg2bmap``, the boundary shifted half a pixel towards the origin); last row/column compare east/south only."""
    seg = seg.astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool: x^2 + y^2 <= r^2 (``skimage.morphology.disk``)."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    kernel = torch.from_numpy(disk(radius).astype(np.float32))[None, None]
    image = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.conv2d(image, kernel, padding=radius)[0, 0] > 0.5).numpy()


def boundary_f_measure(segmentation: np.ndarray, annotation: np.ndarray, void: np.ndarray | None = None,
                       bound_th: float = BOUND_TH) -> float:
    """F of one frame's binary masks (H, W); ``bound_th`` < 1 is a fraction of the image diagonal."""
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*segmentation.shape))
    keep = np.ones(segmentation.shape, bool) if void is None else ~void.astype(bool)
    seg_boundary = seg2bmap(segmentation.astype(bool) & keep)
    gt_boundary = seg2bmap(annotation.astype(bool) & keep)
    n_seg, n_gt = int(seg_boundary.sum()), int(gt_boundary.sum())
    if n_seg == 0 and n_gt == 0:
        return 1.0
    if n_seg == 0 or n_gt == 0:
        return 0.0  # (P, R) = (1, 0) or (0, 1): F = 0
    radius = int(bound_pix)
    # only the boundaries' bounding box (plus the radius) can change the counts: dilate that crop
    ys, xs = np.nonzero(seg_boundary | gt_boundary)
    y0, y1 = max(0, ys.min() - radius), ys.max() + radius + 1
    x0, x1 = max(0, xs.min() - radius), xs.max() + radius + 1
    seg_boundary, gt_boundary = seg_boundary[y0:y1, x0:x1], gt_boundary[y0:y1, x0:x1]
    precision = (seg_boundary & _dilate(gt_boundary, radius)).sum() / n_seg
    recall = (gt_boundary & _dilate(seg_boundary, radius)).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def db_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall = share of frames > 0.5, decay = mean of the first of 4 bins - mean of the last), NaNs
    skipped in the means (davis2017's ``db_statistics``; its bin edges cast to uint8, here to int)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(all="ignore"):
        mean = float(np.nanmean(values)) if values.size else float("nan")
        recall = float(np.nanmean(values > 0.5)) if values.size else float("nan")
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
        bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
        first, last = bins[0][~np.isnan(bins[0])], bins[3][~np.isnan(bins[3])]
        decay = float(first.mean() - last.mean()) if first.size and last.size else float("nan")
    return mean, recall, decay


def evaluate_video(ground_truth: np.ndarray, prediction: np.ndarray, bound_th: float = BOUND_TH) -> dict[str, Any]:
    """Per object J and F over frames 1 .. T-2 of a video: ``ground_truth`` and ``prediction`` (T, H, W) object
    ids, all frames (the first and last are dropped here). Objects are 1 .. max id of the first true frame; a
    prediction with a larger id is refused (ValueError), a missing object scores 0."""
    if ground_truth.shape != prediction.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in shape")
    truth = np.where(ground_truth == VOID, 0, ground_truth)
    num_objects = int(truth[0].max())
    if int(prediction.max(initial=0)) > num_objects:
        raise ValueError(f"the prediction holds object id {int(prediction.max())}, the video has {num_objects}")
    truth, prediction = truth[1:-1], prediction[1:-1]
    j_scores, f_scores = [], []
    for obj in range(1, num_objects + 1):
        gt_mask, pred_mask = truth == obj, prediction == obj
        j_scores.append(region_similarity(gt_mask, pred_mask).tolist())
        f_scores.append([boundary_f_measure(p, g, bound_th=bound_th) for p, g in zip(pred_mask, gt_mask, strict=True)])
    return {"J": j_scores, "F": f_scores}


def summarize(per_video: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """davis2017-evaluation's global table from :func:`evaluate_video` results by video name: J&F-Mean, J-Mean,
    J-Recall, J-Decay, F-Mean, F-Recall, F-Decay (means over all objects of all videos), and per object
    (``<video>_<k>``) its J-Mean and F-Mean."""
    stats: dict[str, list[tuple[float, float, float]]] = {"J": [], "F": []}
    per_object = {}
    for name, scores in per_video.items():
        for k, (j_values, f_values) in enumerate(zip(scores["J"], scores["F"], strict=True), start=1):
            j_stats, f_stats = db_statistics(np.array(j_values)), db_statistics(np.array(f_values))
            stats["J"].append(j_stats)
            stats["F"].append(f_stats)
            per_object[f"{name}_{k}"] = {"J-Mean": j_stats[0], "F-Mean": f_stats[0]}
    out: dict[str, Any] = {}
    for metric in ("J", "F"):
        table = np.array(stats[metric]).reshape(-1, 3)
        for column, label in enumerate(("Mean", "Recall", "Decay")):
            out[f"{metric}-{label}"] = float(table[:, column].mean()) if table.size else float("nan")
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    out["per_object"] = per_object
    return {"J&F-Mean": out.pop("J&F-Mean"), **out}
