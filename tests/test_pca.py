"""PCA pictures of patch features (``visualize_attention.py --pca``): the maths against scikit-learn, the
background cut, joint colours over a folder, and the PNGs for a ViT and a convnet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from simpool.cli.run_visualize import main as visualize_main
from simpool.pca import first_component, pca_image, pca_rgb, principal_components
from tests.helpers import TINY_RESNET, TINY_VIT, save_teacher_checkpoint


def object_grid(generator: torch.Generator, d: int = 16, h: int = 6, w: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (d, h, w): background patches around direction a, a 2x3 object in the middle around b
    (half of it shifted along c, so the object has inner structure for the RGB components)."""
    a, b, c = torch.eye(d)[:3] * torch.tensor([4.0, 6.0, 3.0])[:, None]
    grid = a[:, None, None] + 0.1 * torch.randn(d, h, w, generator=generator)
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[2:4, 2:5] = True
    grid[:, obj] += (b - a)[:, None]
    grid[:, 2, 2:5] += c[:, None]
    return grid, obj


def test_components_match_scikit_learn():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)) * torch.arange(1.0, 9.0)
    mean, components = principal_components(x, 3)
    reference = PCA(n_components=3, svd_solver="full").fit(x.double().numpy())  # float64, as ours
    np.testing.assert_allclose(mean.numpy(), reference.mean_, rtol=1e-6)
    # same directions up to sign
    np.testing.assert_allclose(np.abs(components.numpy().T @ reference.components_.T), np.eye(3), atol=1e-6)


def test_background_is_cut_by_the_first_component_and_the_object_is_coloured():
    grid, obj = object_grid(torch.Generator().manual_seed(0))
    [score] = first_component([grid])
    assert score[obj].min() > score[~obj].max()  # signed so that the (border) background scores low
    [(rgb, foreground)] = pca_rgb([grid])
    assert np.array_equal(foreground, obj.numpy())
    assert (rgb[~foreground] == 0).all() and rgb.min() >= 0 and rgb.max() <= 1
    # inside the object the shifted half and the rest get different colours (the first foreground component)
    assert abs(rgb[2, 2:5, 0].mean() - rgb[3, 2:5, 0].mean()) > 0.9
    assert pca_rgb([grid], remove_background=False)[0][1].all()
    picture = pca_image(rgb, (60, 70))
    assert picture.shape == (60, 70, 3) and picture.dtype == np.uint8
    assert (picture[:10, :10] == np.round(rgb[0, 0] * 255)).all()  # nearest: one flat block per patch


def test_joint_pca_gives_the_same_patches_the_same_colours():
    generator = torch.Generator().manual_seed(2)
    first, _ = object_grid(generator)
    second, _ = object_grid(generator)
    second[:, :, :] = second.flip(-1)  # another image: the object moved
    joint = pca_rgb([first, second])
    alone = pca_rgb([first])
    assert joint[0][0].shape == alone[0][0].shape == (6, 7, 3)
    # one basis: the structured (first, red) component gives patch (2, 2) of the first image and its mirror
    # (2, 4) in the second the same value; the other two components are noise here
    red_first, red_second = joint[0][0][..., 0], joint[1][0][..., 0]
    assert abs(red_first[2, 2] - red_second[2, 4]) < 0.1
    assert abs(red_first[2, 2:5].mean() - red_first[3, 2:5].mean()) > 0.9
    assert abs(red_second[2, 2:5].mean() - red_second[3, 2:5].mean()) > 0.9


@pytest.mark.parametrize("arch,overrides", [("vit_tiny", TINY_VIT), ("resnet18", TINY_RESNET)])
def test_cli_writes_pca_png_beside_the_attention_maps(arch, overrides, tmp_path):
    weights = tmp_path / "checkpoint.pth"
    save_teacher_checkpoint(weights, arch, "simpool", overrides)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (80, 64)), ("b", (64, 96))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(photos / f"{name}.png")
    out = tmp_path / "viz"
    assert visualize_main(["--pretrained_weights", str(weights), "--image_path", str(photos), "--output_dir",
                           str(out), "--image_size", "64", "--device", "cpu", "--pca", "joint"]) == 0
    for name in ("a", "b"):
        with Image.open(out / name / "pca.png") as png, Image.open(out / name / "attention.png") as attention:
            assert png.mode == "RGB" and png.size == attention.size  # same processed size as the maps
