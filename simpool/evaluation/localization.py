"""MaxBoxAccV2 (Choe et al., CVPR 2020, clovaai/wsolevaluation): how well one score map per image localises objects.

The protocol, as wsolevaluation's ``evaluation.py`` / ``inference.py`` run it (``--box_v2_metric True``):

1. the image is resized to S x S (224, ignoring its aspect ratio); the ground-truth boxes (x0, y0, x1, y1) are
   scaled to it, each coordinate truncated to an int: ``int(x * S / W)``;
2. the map is resized to S x S with bicubic interpolation (cv2 ``INTER_CUBIC``; here ``F.interpolate(bicubic,
   align_corners=False)``, the same kernel: equal to float64 round-off at integer scales, <= 1.5e-6 otherwise),
   then min-max normalised: ``m = (m - min) / (max - min)`` (a constant map becomes all zeros);
3. for each threshold t in ``arange(0, 1, 0.01)``: the 8-bit map ``q = uint8(255 m)`` is cut at ``q > int(t max q)``
   and a box is drawn around **every** contour of the cut (``cv2.findContours(RETR_TREE)``: the outer border of
   each 8-connected component *and* the border of each hole in it); the box of a contour whose pixels span
   columns x..x' and rows y..y' is ``(x, y, min(x' + 1, S - 1), min(y' + 1, S - 1))`` (cv2 ``boundingRect`` plus
   width, then clipped to S - 1); a cut with no contour gives the box (0, 0, 0, 0);
4. IoU counts pixels inclusively, ``area = (x1 - x0 + 1)(y1 - y0 + 1)``; an image is correct at (t, delta) when
   some box of the cut and some ground-truth box have IoU >= delta;
5. ``BoxAcc(t, delta)`` = share of correct images; ``MaxBoxAcc(delta) = max_t BoxAcc(t, delta)`` (the best
   threshold per delta, over the whole data set); **MaxBoxAccV2** = mean of MaxBoxAcc over delta in {30, 50, 70}%.

opencv is not a dependency: the contour boxes come from ``scipy.ndimage`` (foreground components with
8-connectivity; holes = 4-connected background components that do not touch the image border, whose border pixels
span the hole's box grown by one pixel), equal to cv2's on the hand cases and random masks of
tests/test_localization.py (and to cv2 itself where it is installed).

Example::

    >>> q = quantize_scoremap(normalize_scoremap(resize_scoremap(attn_14x14, (224, 224))))
    >>> correct = correct_at_thresholds(q, gt_boxes_224, cam_thresholds(0.01), (30, 50, 70))   # (3, 100) bool
    >>> max_box_acc(torch.stack([correct, ...]))["max_box_acc_v2"]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "IOU_THRESHOLDS",
    "cam_thresholds",
    "contour_boxes",
    "correct_at_thresholds",
    "max_box_acc",
    "normalize_scoremap",
    "quantize_scoremap",
    "resize_boxes",
    "resize_scoremap",
    "wsol_box_iou",
]

IOU_THRESHOLDS = (30, 50, 70)  # percent, wsolevaluation's default --iou_threshold_list
_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def cam_thresholds(interval: float = 0.01) -> np.ndarray:
    """The score-map thresholds ``numpy.arange(0, 1, interval)`` (wsolevaluation's ``cam_curve_interval``)."""
    if not 0.0 < interval < 1.0:
        raise ValueError(f"the threshold interval must be in (0, 1), got {interval}")
    return np.arange(0, 1, interval)


def resize_scoremap(scoremap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map resized to (H, W) bicubically (cv2 INTER_CUBIC's kernel), as float64 numpy."""
    grid = torch.as_tensor(np.asarray(scoremap, dtype=np.float64))
    if grid.dim() != 2:
        raise ValueError(f"a score map must be (h, w), got {tuple(grid.shape)}")
    resized = F.interpolate(grid[None, None], size=tuple(size), mode="bicubic", align_corners=False)
    return resized[0, 0].numpy()


def normalize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """``(m - min) / (max - min)``; a constant map (or one holding NaN) becomes zeros, as wsolevaluation does."""
    scoremap = np.asarray(scoremap, dtype=np.float64)
    if np.isnan(scoremap).any() or scoremap.min() == scoremap.max():
        return np.zeros_like(scoremap)
    shifted = scoremap - scoremap.min()
    return shifted / shifted.max()


def quantize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """``uint8(255 m)`` of a map in [0, 1] (truncation, as numpy's ``astype`` does)."""
    if scoremap.min() < 0 or scoremap.max() > 1:
        raise ValueError("the score map must lie in [0, 1]: normalise it first")
    return (scoremap * 255).astype(np.uint8)


def _boxes_of(slices: list, grow: int, offset: tuple[int, int], height: int, width: int) -> list[list[int]]:
    boxes = []
    for rows, cols in slices:
        x0, y0 = cols.start - grow + offset[1], rows.start - grow + offset[0]
        x1, y1 = cols.stop - 1 + grow + offset[1], rows.stop - 1 + grow + offset[0]  # last pixel of the contour
        # boundingRect's x + w is one past the last pixel; wsolevaluation clips it to width - 1.
        boxes.append([x0, y0, min(x1 + 1, width - 1), min(y1 + 1, height - 1)])
    return boxes


def contour_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes (k, 4) of every contour of a binary mask, as wsolevaluation gets them from cv2, in its convention.

    Contours (``cv2.findContours(RETR_TREE)``): the outer border of each 8-connected foreground component and the
    border of each hole (a 4-connected background component enclosed by foreground, i.e. not reaching the image
    border). A hole's border is the foreground pixels around it, whose extent is the hole's box grown by one pixel.
    Each box is ``(x, y, min(x_last + 1, W - 1), min(y_last + 1, H - 1))``. No contour: ``[[0, 0, 0, 0]]``.

    Example::

        >>> ring = np.ones((5, 5), bool); ring[2, 2] = False
        >>> contour_boxes(ring)             # the outer border; the hole's border (1..3) + 1, clipped to W - 1
        array([[0, 0, 4, 4],
               [1, 1, 4, 4]])
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    height, width = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return np.zeros((1, 4), dtype=np.int64)
    # Label only the foreground's box grown by one pixel: background outside it reaches the image border, so a
    # background component touching this crop's border is no hole (the crop is what makes high thresholds cheap).
    top, left = max(rows[0] - 1, 0), max(cols[0] - 1, 0)
    crop = mask[top:rows[-1] + 2, left:cols[-1] + 2]
    labels, _ = ndimage.label(crop, structure=_EIGHT)
    boxes = _boxes_of(ndimage.find_objects(labels), 0, (top, left), height, width)
    background, holes = ndimage.label(~crop, structure=_FOUR)
    if holes:
        touching = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
        enclosed = [s for label, s in enumerate(ndimage.find_objects(background), start=1)
                    if s is not None and label not in touching]
        boxes += _boxes_of(enclosed, 1, (top, left), height, width)
    return np.asarray(boxes, dtype=np.int64)


def wsol_box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU (n, m) of (n, 4) and (m, 4) boxes with wsolevaluation's inclusive pixels: area = (x1-x0+1)(y1-y0+1).

    A degenerate pair (union <= 0) gets 0. Example: ``wsol_box_iou([[0, 0, 1, 1]], [[1, 1, 2, 2]])`` = 1/7.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    inter_w = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def resize_boxes(boxes: np.ndarray, image_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Ground-truth boxes of an image (W, H) = ``image_size`` scaled to ``size`` (W', H'), truncated to ints."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([size[0] / image_size[0], size[1] / image_size[1]] * 2)
    return (boxes * scale).astype(np.int64)


def correct_at_thresholds(
    quantized: np.ndarray,
    gt_boxes: np.ndarray,
    thresholds: Sequence[float] | np.ndarray,
    iou_thresholds: Sequence[int] = IOU_THRESHOLDS,
) -> np.ndarray:
    """(len(iou_thresholds), T) bool: is the image correct at each (IoU threshold, score threshold)?

    ``quantized`` is the uint8 map (:func:`quantize_scoremap`) at the size of ``gt_boxes``'s coordinates. The cut
    ``q > int(t * max q)`` is the same for every t with the same integer level, so each level is boxed once.
    """
    quantized = np.asarray(quantized)
    if quantized.dtype != np.uint8:
        raise ValueError("correct_at_thresholds takes the uint8 map of quantize_scoremap")
    peak = int(quantized.max())
    best_iou = np.zeros(len(thresholds))
    by_level: dict[int, float] = {}
    for i, t in enumerate(thresholds):
        level = int(t * peak)
        if level not in by_level:
            by_level[level] = float(wsol_box_iou(contour_boxes(quantized > level), gt_boxes).max())
        best_iou[i] = by_level[level]
    deltas = np.asarray(iou_thresholds, dtype=np.float64)[:, None] / 100
    return best_iou[None, :] >= deltas


def max_box_acc(correct: np.ndarray | torch.Tensor, iou_thresholds: Sequence[int] = IOU_THRESHOLDS) -> dict:
    """From per-image correctness (N, len(iou_thresholds), T): MaxBoxAcc per IoU threshold (percent), the best
    score threshold index of each, and their mean MaxBoxAccV2.

    Example::

        >>> correct = np.zeros((2, 1, 3), bool); correct[0, 0, 1] = correct[1, 0, 1] = correct[1, 0, 2] = True
        >>> max_box_acc(correct, (50,))["max_box_acc"]
        {'50': 100.0}
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 3 or correct.shape[1] != len(iou_thresholds) or correct.shape[0] == 0:
        raise ValueError(f"expected (images > 0, {len(iou_thresholds)}, thresholds) correctness, got {correct.shape}")
    accuracy = correct.mean(axis=0) * 100  # (deltas, T): BoxAcc(t, delta)
    best = accuracy.argmax(axis=1)  # the first best threshold, as numpy's max picks the value
    per_delta = {str(d): float(accuracy[i, best[i]]) for i, d in enumerate(iou_thresholds)}
    return {
        "max_box_acc_v2": float(np.mean(list(per_delta.values()))),
        "max_box_acc": per_delta,
        "best_threshold_index": {str(d): int(best[i]) for i, d in enumerate(iou_thresholds)},
        "num_images": int(correct.shape[0]),
    }
