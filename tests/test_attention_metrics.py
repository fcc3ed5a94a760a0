"""Attention-map metrics on hand-made maps, masks and boxes whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simpool.attention_maps import largest_component_box, mass_mask_at_size, mass_threshold_mask, upsample_map
from simpool.data.masks import mask_to_box
from simpool.evaluation.attention_metrics import (
    best_of_curve,
    box_iou,
    corloc,
    evaluate_maps,
    jaccard,
    threshold_jaccard_curve,
)


def dino_reference_mask(attn: torch.Tensor, keep: float) -> torch.Tensor:
    """DINO's visualize_attention.py rule, re-derived here: ascending sort, cumsum > 1 - keep."""
    flat = attn.flatten().double()
    values, order = torch.sort(flat)
    cumulative = torch.cumsum(values / values.sum(), dim=0)
    kept_sorted = cumulative > (1 - keep)
    return torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted).view(attn.shape)


# ----------------------------------------------------------------------------- mass mask


def test_mass_mask_on_hand_map():
    attn = torch.tensor([[4.0, 2.0], [1.0, 1.0]])  # total 8: every cut below is exact in binary
    assert mass_threshold_mask(attn, 0.5).tolist() == [[True, False], [False, False]]  # 4 reaches 4
    assert mass_threshold_mask(attn, 0.6).tolist() == [[True, True], [False, False]]
    assert mass_threshold_mask(attn, 0.75).tolist() == [[True, True], [False, False]]  # 6 reaches 6
    assert mass_threshold_mask(attn, 0.76).tolist() == [[True, True], [True, False]]  # tie: raster order
    assert mass_threshold_mask(attn, 1.0).all()
    assert mass_threshold_mask(torch.tensor([[1.0, 0.0]]), 1.0).tolist() == [[True, False]]  # zeros stay out


def test_mass_mask_keeps_at_least_keep_and_is_minimal():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 3, 7, 9, generator=generator) ** 3  # peaky, like attention
    for keep in (0.3, 0.6, 0.9):
        masks = mass_threshold_mask(maps, keep)
        assert masks.shape == maps.shape and masks.dtype == torch.bool
        for attn, mask in zip(maps.view(-1, 7, 9), masks.view(-1, 7, 9)):
            total, kept = attn.sum().double(), attn[mask].double()
            assert kept.sum() >= keep * total - 1e-12
            assert kept.sum() - kept.min() < keep * total  # dropping the weakest kept pixel falls short
            assert attn[mask].min() >= attn[~mask].max()  # the kept pixels are the highest ones
            assert torch.equal(mask, dino_reference_mask(attn, keep))


def test_mass_mask_ties_split_in_raster_order():
    flat_map = torch.ones(4, 4)
    mask = mass_threshold_mask(flat_map, 0.5)
    assert mask.sum() == 8
    assert mask.flatten()[:8].all() and not mask.flatten()[8:].any()


def test_mass_mask_low_precision_batched_and_edge_cases():
    attn = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        low = attn.to(dtype)
        assert torch.equal(mass_threshold_mask(low, 0.6), torch.stack([mass_threshold_mask(m, 0.6) for m in low]))
    assert not mass_threshold_mask(torch.zeros(3, 3)).any()
    assert torch.equal(mass_threshold_mask(attn.numpy()), mass_threshold_mask(attn))
    with pytest.raises(ValueError, match="negative"):
        mass_threshold_mask(torch.tensor([[1.0, -0.1]]))
    with pytest.raises(ValueError, match="keep"):
        mass_threshold_mask(attn, 1.5)
    with pytest.raises(ValueError, match="shape"):
        mass_threshold_mask(torch.ones(4))


# ----------------------------------------------------------------------------- upsampling


def test_nearest_upsampling_repeats_patches():
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    up = upsample_map(grid, 4)
    assert torch.equal(up, grid.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert upsample_map(torch.rand(2, 3, 4, 5), (8, 15)).shape == (2, 3, 8, 15)


def test_mass_mask_at_size_cuts_whole_patches_like_dino():
    maps = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    at_size = mass_mask_at_size(maps, 96, 0.6)
    assert torch.equal(at_size, upsample_map(mass_threshold_mask(maps, 0.6).float(), 96).bool())
    # One patch holding all the mass: DINO keeps the whole patch; a per-pixel cut on the upsampled
    # map would keep only 60% of its 16 equal pixels (rounded up to 10).
    single = torch.zeros(4, 4)
    single[1, 2] = 1.0
    assert mass_mask_at_size(single, 16).sum() == 16
    assert mass_threshold_mask(upsample_map(single, 16), 0.6).sum() == 10
    bilinear = mass_mask_at_size(single, 16, upsample_mode="bilinear")
    assert bilinear.shape == (16, 16) and bilinear.any()


def test_bilinear_upsampling_shape_range_and_errors():
    grid = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(3))
    up = upsample_map(grid, (8, 10), mode="bilinear")
    assert up.shape == (3, 8, 10)
    assert up.min() >= grid.min() - 1e-6 and up.max() <= grid.max() + 1e-6
    assert upsample_map(grid.half(), 8, mode="bilinear").dtype == torch.float16
    with pytest.raises(ValueError, match="mode"):
        upsample_map(grid, 8, mode="bicubic")


# ----------------------------------------------------------------------------- Jaccard


def square_mask(size: int = 16, y0: int = 4, x0: int = 8, side: int = 4) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def test_jaccard_hand_values_ignore_and_empty():
    pred = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert jaccard(pred, gt).item() == pytest.approx(1 / 3)
    ignore = torch.tensor([[0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert jaccard(pred, gt, ignore).item() == pytest.approx(1 / 2)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert jaccard(empty, empty).item() == 1.0
    assert jaccard(empty, gt).item() == 0.0
    assert jaccard(torch.stack([pred, gt]), gt).tolist() == pytest.approx([1 / 3, 1.0])
    with pytest.raises(ValueError, match="same"):
        jaccard(pred, gt.T)


def test_perfect_map_scores_one_and_inverted_map_zero():
    gt = square_mask()
    perfect = gt.float()
    inverted = 1.0 - perfect
    for criterion in ("value", "mass"):
        best, threshold = best_of_curve(*threshold_jaccard_curve(perfect, gt, criterion=criterion))
        assert best.item() == 1.0
        worst, _ = best_of_curve(*threshold_jaccard_curve(inverted, gt, criterion=criterion))
        assert worst.item() == 0.0
    assert jaccard(mass_threshold_mask(inverted), gt).item() == 0.0
    # A flat object carries all the mass, so the 60%-mass mask keeps exactly 60% of its 16 pixels
    # (10 pixels: 9 would hold only 56%): Jaccard 10 / 16.
    assert jaccard(mass_threshold_mask(perfect, 0.6), gt).item() == pytest.approx(10 / 16)


def test_value_threshold_curve_matches_brute_force():
    generator = torch.Generator().manual_seed(4)
    attn = torch.rand(3, 2, 12, 12, generator=generator)
    gt = torch.rand(3, 1, 12, 12, generator=generator) < 0.3
    ignore = torch.rand(3, 1, 12, 12, generator=generator) < 0.1
    thresholds = (0.1, 0.25, 0.5, 0.8)
    curve, levels = threshold_jaccard_curve(attn, gt, thresholds, ignore=ignore)
    assert curve.shape == (3, 2, 4)
    low = attn.flatten(-2).amin(-1)[..., None, None]
    high = attn.flatten(-2).amax(-1)[..., None, None]
    normalised = (attn - low) / (high - low)
    expected = torch.stack([jaccard(normalised > t, gt, ignore) for t in thresholds], dim=-1)
    assert torch.allclose(curve, expected)
    best, best_t = best_of_curve(curve, levels)
    assert torch.allclose(best, expected.amax(-1))
    assert torch.equal(best_t, levels[expected.argmax(-1)])


# ----------------------------------------------------------------------------- boxes


def test_boxes_are_inclusive_exclusive():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[2, 3] = True
    assert mask_to_box(mask).tolist() == [3, 2, 4, 3]
    assert mask_to_box(torch.zeros(3, 3, dtype=torch.bool)).tolist() == [0, 0, 0, 0]


def test_largest_component_box_two_blobs_and_connectivity():
    two_blobs = torch.zeros(6, 8, dtype=torch.bool)
    two_blobs[0:2, 0:2] = True  # 4 pixels
    two_blobs[3:6, 4:8] = True  # 12 pixels
    assert largest_component_box(two_blobs).tolist() == [4, 3, 8, 6]
    assert mask_to_box(two_blobs).tolist() == [0, 0, 8, 6]

    corner_touch = torch.zeros(8, 8, dtype=torch.bool)
    corner_touch[0:2, 0:2] = True
    corner_touch[2:4, 2:4] = True  # touches the first square only at a corner: 8 pixels if joined
    corner_touch[6, 0:5] = True  # a 5-pixel bar
    assert largest_component_box(corner_touch, connectivity=8).tolist() == [0, 0, 4, 4]
    assert largest_component_box(corner_touch, connectivity=4).tolist() == [0, 6, 5, 7]

    batch = torch.stack([two_blobs[:6, :6], torch.zeros(6, 6, dtype=torch.bool)])
    assert largest_component_box(batch).tolist() == [[4, 3, 6, 6], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="connectivity"):
        largest_component_box(two_blobs, connectivity=6)


def test_box_iou_hand_values():
    assert box_iou(torch.tensor([0, 0, 2, 2]), torch.tensor([1, 1, 3, 3])).item() == pytest.approx(1 / 7)
    assert box_iou(np.array([0, 0, 4, 4]), np.array([0, 0, 4, 2])).item() == pytest.approx(0.5)
    matrix = box_iou(torch.tensor([[0, 0, 2, 2], [0, 0, 0, 0]]),
                     torch.tensor([[0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 0, 0]]))
    assert matrix.shape == (2, 3)
    assert matrix.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # zero-area boxes never match
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_iou(torch.tensor([2, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))


def test_corloc_small_hand_case():
    predictions = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]])
    gt = [
        torch.tensor([[0, 0, 2, 1]]),  # IoU exactly 0.5: counts (>=)
        torch.tensor([[10, 10, 12, 12], [0, 0, 2, 2]]),  # the second gt box matches
        torch.tensor([0, 0, 1, 1]),  # IoU 0.25: a miss
    ]
    assert corloc(predictions, gt) == pytest.approx(2 / 3)
    assert corloc(predictions, gt, thr=0.2) == 1.0
    assert corloc(predictions, gt, thr=0.6) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="per image"):
        corloc(predictions, gt[:2])
    with pytest.raises(ValueError, match="no gt box"):
        corloc(predictions[:1], [torch.zeros(0, 4)])


# ----------------------------------------------------------------------------- dataset report


def patch_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """3 images of 16x16 px on a 4x4 grid of 4-px patches, each object one patch; 3 heads:
    head 0 puts all attention on the object's patch, head 1 everywhere else, head 2 on a corner."""
    objects = [(1, 2), (3, 0), (2, 2)]  # (row, col) of the object patch
    maps = torch.zeros(3, 3, 4, 4)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    for i, (row, col) in enumerate(objects):
        maps[i, 0, row, col] = 1.0
        maps[i, 1] = 1.0 / 15  # each head sums to 1, like softmax attention
        maps[i, 1, row, col] = 0.0
        maps[i, 2, 0, 0] = 1.0
        masks[i, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = True
    return maps, masks


def test_evaluate_maps_per_head_best_head_and_mean():
    maps, masks = patch_dataset()
    report = evaluate_maps(maps, masks)
    assert report["num_images"] == 3 and report["num_heads"] == 3
    per_head = report["per_head"]
    assert per_head["jaccard_mass"][0] == 1.0 and per_head["jaccard_mass"][1] == 0.0
    assert per_head["jaccard_best_threshold"][:2] == [1.0, 0.0]
    assert per_head["corloc"] == [1.0, 0.0, 0.0]
    assert per_head["jaccard_mass"][2] == 0.0  # the corner patch is never the object
    assert report["best_head"]["head"] == 0 and report["best_head"]["jaccard_mass"] == 1.0
    for name, values in per_head.items():
        assert report["mean_over_heads"][name] == pytest.approx(sum(values) / 3)
    # The head-average map: corner (1 + 1/15)/3 = 16/45, object 1/3, 1/45 elsewhere; 60% of the mass
    # needs exactly {corner, object}: Jaccard 16/32. Its largest component (first of two equal
    # patches in raster order) is the corner, so CorLoc is 0.
    assert report["head_average_map"]["jaccard_mass"] == pytest.approx(0.5)
    assert report["head_average_map"]["corloc"] == 0.0


def test_evaluate_maps_lists_boxes_ignore_and_errors():
    maps, masks = patch_dataset()
    as_lists = evaluate_maps(list(maps), list(masks))
    assert as_lists == evaluate_maps(maps, masks)
    # Given gt boxes that are far from every prediction, CorLoc drops to 0 for the perfect head.
    far = [torch.tensor([[0, 0, 1, 1]])] * 3
    assert evaluate_maps(maps, masks, gt_boxes=far)["per_head"]["corloc"][0] == 0.0
    # Ignoring the object pixels leaves nothing to find: both masks empty → Jaccard 1 for head 2.
    report = evaluate_maps(maps, masks, ignore_masks=masks | upsample_map(maps[:, 2], 16).bool())
    assert report["per_head"]["jaccard_mass"][2] == 1.0
    smooth = evaluate_maps(maps, masks, upsample_mode="bilinear")
    assert smooth["upsample_mode"] == "bilinear" and smooth["best_head"]["head"] == 0
    assert 0.0 < smooth["per_head"]["jaccard_mass"][0] < 1.0  # bilinear blurs the patch edges
    single_head = evaluate_maps(maps[:, 0], masks)  # (N, h, w) = one head
    assert single_head["num_heads"] == 1 and single_head["best_head"]["jaccard_mass"] == 1.0
    with pytest.raises(ValueError, match="heads"):
        evaluate_maps([maps[0], maps[1, :2]], list(masks[:2]))
    with pytest.raises(ValueError, match="empty gt"):
        evaluate_maps(maps[:1], torch.zeros(1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="one of each"):
        evaluate_maps(maps, masks[:2])
