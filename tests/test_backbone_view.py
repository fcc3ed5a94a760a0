"""The global + patch-token view of every backbone family: one pass that agrees with ``model(x)`` and
``model.patch_features(x)``, no token 0 dropped from a SimPool ViT, sides cut to the patch like a strided conv."""

from __future__ import annotations

import pytest
import torch

from simpool.evaluation.backbone_view import crop_to_stride, global_and_patches
from simpool.models import build_backbone
from tests.helpers import TINY_CONVNEXT, TINY_RESNET

TINY_VIT8 = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize("arch, mode, kwargs, grid", [
    ("vit_tiny", "simpool", TINY_VIT8, (8, 6)),
    ("vit_tiny", "official", TINY_VIT8, (8, 6)),
    ("resnet18", "simpool", TINY_RESNET, (2, 2)),
    ("resnet18", "official", TINY_RESNET, (2, 2)),
    ("convnext_tiny", "simpool", TINY_CONVNEXT, (2, 1)),  # stem 4 + 3 downsamplings of 2, each flooring
    ("convnext_tiny", "official", TINY_CONVNEXT, (2, 1)),
    ("resnet10t", "simpool", {}, (2, 2)),
    ("vit_tiny_patch16_224", "official", {"depth": 1, "img_size": (64, 48)}, (4, 3)),
    ("vit_tiny_patch16_224", "simpool", {"depth": 1, "img_size": (64, 48)}, (4, 3)),
])
def test_one_pass_agrees_with_forward_and_patch_features(arch, mode, kwargs, grid):
    model = build_backbone(arch, mode=mode, **kwargs).eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        view = global_and_patches(model, images)
        torch.testing.assert_close(view.global_feature, model(images))
        torch.testing.assert_close(view.patches, model.patch_features(images))
    assert view.patches.shape[-2:] == grid


def test_simpool_vit_keeps_every_token_and_official_drops_only_cls():
    images = torch.randn(1, 3, 32, 32)
    for mode in ("simpool", "official"):
        model = build_backbone("vit_tiny", mode=mode, **TINY_VIT8).eval()
        with torch.no_grad():
            tokens = model.norm(model.forward_tokens(images))
            view = global_and_patches(model, images)
        assert tokens.shape[1] == 16 + (mode == "official")
        torch.testing.assert_close(view.patches.flatten(2).transpose(1, 2), tokens[:, model.num_prefix_tokens:])
        if mode == "official":
            torch.testing.assert_close(view.global_feature, tokens[:, 0])


def test_sides_are_cut_to_the_patch_as_a_strided_conv_does():
    model = build_backbone("vit_tiny", mode="simpool", **TINY_VIT8).eval()
    images = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        view = global_and_patches(model, images)
        torch.testing.assert_close(view.global_feature, model(images[..., :40, :56]))
        # the patch embedding of the uncut image sees the same pixels: a conv of stride 8 drops the rest
        embedded = torch.nn.functional.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                                              stride=8)
    assert embedded.shape[-2:] == view.patches.shape[-2:] == (5, 7)
    with pytest.raises(ValueError, match="smaller than the model's patch"):
        crop_to_stride(torch.zeros(1, 3, 4, 40), 8)
