"""LOST's seed, expansion and box and DINO-seg's box on fixed tensors, by hand and against naive loops of their
definitions (valeoai/LOST object_discovery.py); the patch features LOST reads from a ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simpool import build_backbone
from simpool.evaluation.lost import dinoseg_box, lost, lost_box, patch_degrees, vit_patch_features


def naive_lost(features: np.ndarray, grid: tuple[int, int], k_patches: int) -> tuple[int, tuple[int, int, int, int]]:
    """LOST written as loops: degrees, the lowest-degree seed (lowest index on ties), expansion, flood fill."""
    n = features.shape[0]
    sim = features @ features.T
    degree = [sum(1 for j in range(n) if j != i and sim[i, j] > 0) for i in range(n)]
    order = sorted(range(n), key=lambda i: (degree[i], i))
    seed = order[0]
    kept = [j for j in order[:k_patches] if sim[seed, j] > 0]
    expansion = [sum(sim[i, j] for i in kept) for j in range(n)]
    height, width = grid
    positive = {(j // width, j % width) for j in range(n) if expansion[j] > 0}
    component, stack = set(), [(seed // width, seed % width)]
    while stack:
        cell = stack.pop()
        if cell in component or cell not in positive:
            continue
        component.add(cell)
        y, x = cell
        stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    ys, xs = zip(*component, strict=True)
    return seed, (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


def naive_dinoseg(attention: np.ndarray, patch: int, keep: float = 0.6, lost_choice: bool = True) -> list[float]:
    """LOST's dino_seg as it reads: ascending sort, cumulative mass > 1 - keep, 4-connected labels, its loop."""
    from scipy import ndimage
    flat = attention.ravel()
    order = np.argsort(flat, kind="stable")
    cumulative = np.cumsum(flat[order] / flat.sum())
    mask = np.zeros(flat.shape, bool)
    mask[order] = cumulative > (1 - keep)
    labels, _ = ndimage.label(mask.reshape(attention.shape))
    if lost_choice:
        sizes = [np.sum(labels == c) for c in range(np.max(labels))]
        chosen = np.argmax(sizes[1:]) + 1 if len(sizes) > 1 else 0
    else:
        chosen = np.argmax([np.sum(labels == c) for c in range(1, labels.max() + 1)]) + 1
    ys, xs = np.nonzero(labels == chosen)
    return [float(v * patch) for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]


# ----------------------------------------------------------------------------------------------------------
# LOST
# ----------------------------------------------------------------------------------------------------------
def test_degrees_leave_out_the_diagonal_and_negative_links():
    sim = torch.tensor([[5.0, 1.0, -1.0], [1.0, 2.0, 0.0], [-1.0, 0.0, 3.0]])
    assert patch_degrees(sim).tolist() == [1, 1, 0]


def object_scene() -> tuple[torch.Tensor, tuple[int, int]]:
    """A 3 x 4 grid: background patches share one direction, a 2-patch object (row 1, columns 1-2) another,
    opposite enough that object-background similarities are negative."""
    grid = (3, 4)
    features = torch.tensor([1.0, 0.0]).repeat(12, 1)
    for index in (5, 6):
        features[index] = torch.tensor([-1.0, 1.0])
    return features, grid


def test_lost_seed_expansion_and_box_by_hand():
    features, grid = object_scene()
    result = lost(features, grid, k_patches=100)
    # degrees: background 9 (the other background patches), object 1 (the other object patch)
    assert result.degrees.tolist() == [9] * 5 + [1, 1] + [9] * 5
    assert result.seed == 5  # lowest degree, lower index on the tie
    assert sorted(result.similar.tolist()) == [5, 6]  # of all patches, those similar to the seed
    # expansion: A_5j + A_6j = 2 + 2 on the object, -1 - 1 on the background
    assert result.expansion.tolist() == [[-2, -2, -2, -2], [-2, 4, 4, -2], [-2, -2, -2, -2]]
    assert result.patch_box == (1, 1, 3, 2)
    assert lost_box(result, 16, (48, 64)) == [16.0, 16.0, 48.0, 32.0]
    assert lost_box(result, 16, (30, 40)) == [16.0, 16.0, 40.0, 30.0]  # clipped to the unpadded image


def test_lost_keeps_the_seeds_component_only():
    features = torch.tensor([1.0, 0.0]).repeat(12, 1)
    for index in (0, 1, 10, 11):  # two object blobs far apart: (0, 1) and (10, 11)
        features[index] = torch.tensor([-1.0, 1.0])
    result = lost(features, (3, 4), k_patches=100)
    assert result.seed == 0 and result.patch_box == (0, 0, 2, 1)
    assert result.component.sum() == 2  # the blob at (10, 11) is positive too, but not connected


def test_k_patches_limits_the_expansion():
    features, grid = object_scene()
    features[6] = torch.tensor([-1.0, 1.5])  # object patch 6 now differs a little
    one = lost(features, grid, k_patches=1)
    assert one.similar.tolist() == [5]  # only the seed: its similarities are the map
    np.testing.assert_allclose(one.expansion.flatten().numpy(), (features @ features[5]).numpy())


def test_lost_equals_naive_loops_on_random_features():
    rng = np.random.default_rng(0)
    for trial in range(40):
        height, width = (int(v) for v in rng.integers(2, 7, 2))
        dim = int(rng.integers(2, 9))
        features = rng.normal(size=(height * width, dim)).astype(np.float32)
        features[:, 0] += rng.uniform(0, 2)  # background-like common direction: sparse negative links
        k = int(rng.integers(1, height * width + 3))
        result = lost(torch.from_numpy(features), (height, width), k)
        seed, box = naive_lost(features.astype(np.float64), (height, width), k)
        assert (result.seed, result.patch_box) == (seed, box), trial


# ----------------------------------------------------------------------------------------------------------
# DINO-seg
# ----------------------------------------------------------------------------------------------------------
def test_dinoseg_box_by_hand():
    attention = torch.zeros(5, 6)
    attention[0:2, 0:2] = 1.0  # 4 patches: the largest component
    attention[3, 4] = 1.5  # 1 patch
    attention[4, 0] = 0.5  # small, outside the 60% mask
    # mass 6.0: kept from the top while the mass above is < 3.6: 1.5, then the four 1.0 -> two components
    assert dinoseg_box(attention, 8, component="largest") == [0.0, 0.0, 16.0, 16.0]
    # LOST's loop sees labels 0 .. n-1 = background and the first component (the 2 x 2 block): same box here
    assert dinoseg_box(attention, 8, component="lost") == [0.0, 0.0, 16.0, 16.0]
    attention[3, 4] = 0.0
    attention[3:5, 3:6] = 1.0  # a 6-patch component is now the last label: LOST's loop never sees it
    # keep 90% of 10.5: the ten 1.0 patches (mass above the last: 9 < 9.45), not the 0.5
    assert dinoseg_box(attention, 8, keep=0.9, component="largest") == [24.0, 24.0, 48.0, 40.0]
    assert dinoseg_box(attention, 8, keep=0.9, component="lost") == [0.0, 0.0, 16.0, 16.0]


def test_dinoseg_single_component_boxes_the_background_in_losts_code():
    attention = torch.full((4, 4), 0.01)
    attention[1:3, 1:3] = 1.0  # one component in the centre
    assert dinoseg_box(attention, 16, component="largest") == [16.0, 16.0, 48.0, 48.0]
    assert dinoseg_box(attention, 16, component="lost") == [0.0, 0.0, 64.0, 64.0]  # label 0: the ring around it


def test_dinoseg_equals_losts_code_as_written_on_random_maps():
    rng = np.random.default_rng(1)
    for _ in range(60):
        shape = tuple(int(v) for v in rng.integers(2, 9, 2))
        attention = rng.random(shape) ** 4
        attention /= attention.sum()
        for choice in (True, False):
            expected = naive_dinoseg(attention, 16, lost_choice=choice)
            assert dinoseg_box(torch.from_numpy(attention), 16, component="lost" if choice else "largest") == expected


# ----------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["official", "simpool"])
def test_block_keys_are_the_last_qkv_projection_of_the_patch_tokens(mode):
    model = build_backbone("vit_tiny", mode=mode, patch_size=8, depth=2, embed_dim=48, num_heads=3).eval()
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        before_last = model.blocks[0](model.prepare_tokens(images))
        qkv = model.blocks[1].attn.qkv(model.blocks[1].norm1(before_last))
    prefix = 1 if mode == "official" else 0
    for part, which in enumerate("qkv"):
        features = vit_patch_features(model, images, which)
        assert features.shape == (2, 4 * 5, 48)
        torch.testing.assert_close(features, qkv[:, prefix:, part * 48:(part + 1) * 48])


def test_simpool_keys_and_their_refusals():
    model = build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=2, embed_dim=48, num_heads=3).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        normed = model.simpool.norm_patches(model.forward_tokens(images))
        torch.testing.assert_close(vit_patch_features(model, images, "k", "simpool"), model.simpool.wk(normed))
        torch.testing.assert_close(vit_patch_features(model, images, "v", "simpool"), normed)
    with pytest.raises(ValueError, match="one query per image"):
        vit_patch_features(model, images, "q", "simpool")
    official = build_backbone("vit_tiny", mode="official", patch_size=8, depth=1, embed_dim=48, num_heads=3)
    with pytest.raises(ValueError, match="SimPool model"):
        vit_patch_features(official, images, "k", "simpool")
    with pytest.raises(ValueError, match="needs a ViT"):
        vit_patch_features(build_backbone("resnet18", mode="simpool", layers=(1, 1, 1, 1)), images)
