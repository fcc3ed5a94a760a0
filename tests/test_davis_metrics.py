"""DAVIS 2017 J and F: hand-computed cases and a naive port of davis2017-evaluation's definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import binary_dilation
from skimage.morphology import disk as skimage_disk

from simpool.evaluation.davis_metrics import (
    boundary_f_measure,
    db_statistics,
    disk,
    evaluate_video,
    region_similarity,
    seg2bmap,
    summarize,
)


# ---------------------------------------------------------------- naive versions (loops over pixels)
def naive_seg2bmap(seg):
    seg = seg.astype(bool)
    h, w = seg.shape
    out = np.zeros_like(seg)
    for y in range(h):
        for x in range(w):
            east = seg[y, x + 1] if x + 1 < w else False
            south = seg[y + 1, x] if y + 1 < h else False
            south_east = seg[y + 1, x + 1] if (x + 1 < w and y + 1 < h) else False
            if y == h - 1 and x == w - 1:
                out[y, x] = False
            elif y == h - 1:
                out[y, x] = seg[y, x] != east
            elif x == w - 1:
                out[y, x] = seg[y, x] != south
            else:
                out[y, x] = (seg[y, x] != east) or (seg[y, x] != south) or (seg[y, x] != south_east)
    return out


def naive_f(seg, gt, bound_th=0.008):
    """davis2017's f_measure with scipy's binary dilation by skimage's disk (what its cv2.dilate computes)."""
    bound_pix = math.ceil(bound_th * np.linalg.norm(seg.shape))
    fg, gb = naive_seg2bmap(seg), naive_seg2bmap(gt)
    fg_dil = binary_dilation(fg, skimage_disk(bound_pix))
    gt_dil = binary_dilation(gb, skimage_disk(bound_pix))
    n_fg, n_gt = fg.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = (fg & gt_dil).sum() / n_fg, (gb & fg_dil).sum() / n_gt
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def blobs(rng, shape, count=3):
    mask = np.zeros(shape, bool)
    for _ in range(count):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(2, max(3, min(shape) // 3))
        yy, xx = np.ogrid[:shape[0], :shape[1]]
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    return mask


# ---------------------------------------------------------------- J
def test_region_similarity_by_hand():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 pixels
    seg = np.zeros((4, 4), bool)
    seg[:2, :3] = True  # 6 pixels, 4 shared
    assert region_similarity(gt, seg) == pytest.approx(4 / 6)
    assert region_similarity(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # both empty
    assert region_similarity(gt, np.zeros((4, 4))) == 0.0
    void = np.zeros((4, 4), bool)
    void[:, 2] = True  # the two extra pixels are void
    assert region_similarity(gt, seg, void) == 1.0
    stacked = region_similarity(np.stack([gt, gt]), np.stack([seg, gt]))
    np.testing.assert_allclose(stacked, [4 / 6, 1.0])


# ---------------------------------------------------------------- F
def test_seg2bmap_of_a_square_by_hand_and_naive():
    seg = np.zeros((6, 6), bool)
    seg[2:4, 2:4] = True
    expected = np.zeros((6, 6), bool)
    # pixels whose east / south / south-east neighbour differs: the ring shifted half a pixel to the origin
    expected[1, 1:4] = expected[2:4, 1] = True
    expected[2, 3] = expected[3, 2] = expected[3, 3] = True
    assert (seg2bmap(seg) == expected).all()
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = blobs(rng, (17, 23))
        assert (seg2bmap(mask) == naive_seg2bmap(mask)).all()


def test_disk_is_skimages():
    for radius in (1, 2, 5, 8):
        assert (disk(radius) == skimage_disk(radius).astype(bool)).all()


def test_boundary_f_by_hand():
    gt = np.zeros((50, 50), bool)
    gt[10:30, 10:30] = True
    assert boundary_f_measure(gt, gt) == 1.0
    empty = np.zeros_like(gt)
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(empty, gt) == 0.0 and boundary_f_measure(gt, empty) == 0.0
    # bound_pix = ceil(0.008 * 70.7) = 1: a one-pixel shift matches, a far square does not
    shifted = np.roll(gt, 1, axis=1)
    assert boundary_f_measure(shifted, gt) == 1.0
    far = np.zeros_like(gt)
    far[35:45, 35:45] = True
    assert boundary_f_measure(far, gt) == 0.0


def test_boundary_f_matches_the_naive_definition_on_random_masks():
    rng = np.random.default_rng(1)
    for shape in ((40, 60), (97, 130), (240, 427)):  # bound_pix 1, 2, 4
        for _ in range(3):
            gt, seg = blobs(rng, shape), blobs(rng, shape)
            assert boundary_f_measure(seg, gt) == pytest.approx(naive_f(seg, gt), abs=1e-12)


# ---------------------------------------------------------------- statistics and per-video evaluation
def test_db_statistics_by_hand():
    values = np.array([1.0, 0.9, 0.8, 0.4, 0.3, 0.2, 0.1, 0.0])
    mean, recall, decay = db_statistics(values)
    assert mean == pytest.approx(values.mean())
    assert recall == pytest.approx(3 / 8)
    # linspace(1, 8, 5) = [1, 2.75, 4.5, 6.25, 8] rounds (half to even) to [1, 3, 4, 6, 8]; minus 1: bin edges
    # [0, 2, 3, 5, 7] -> first bin values[0:3], last bin values[5:8]
    assert decay == pytest.approx(np.mean([1.0, 0.9, 0.8]) - np.mean([0.2, 0.1, 0.0]))
    assert math.isnan(db_statistics(np.array([np.nan, np.nan]))[0])


def test_evaluate_video_drops_first_and_last_frames_and_scores_each_object():
    truth = np.zeros((4, 10, 10), np.uint8)
    truth[:, 0:5, 0:5] = 1
    truth[:, 5:10, 5:10] = 2
    truth[0, 0, 0] = 255  # void counts as background
    prediction = truth.copy()
    prediction[0] = 0  # first and last frames are not scored
    prediction[3] = 0
    prediction[prediction == 255] = 0
    prediction[2, 5:10, 5:10] = 0  # object 2 lost in frame 2
    scores = evaluate_video(truth, prediction)
    np.testing.assert_allclose(scores["J"], [[1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(scores["F"], [[1.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="object id 3"):
        evaluate_video(truth, np.full_like(truth, 3))


def test_summarize_averages_objects_then_j_and_f():
    per_video = {"a": {"J": [[1.0, 1.0], [0.0, 0.0]], "F": [[1.0, 0.5], [0.5, 0.5]]},
                 "b": {"J": [[0.5, 0.5]], "F": [[1.0, 1.0]]}}
    table = summarize(per_video)
    assert table["J-Mean"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert table["F-Mean"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert table["J&F-Mean"] == pytest.approx((table["J-Mean"] + table["F-Mean"]) / 2)
    assert table["J-Recall"] == pytest.approx((1 + 0 + 0) / 3)
    assert set(table["per_object"]) == {"a_1", "a_2", "b_1"}
