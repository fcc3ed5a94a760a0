"""One model-agnostic view of a backbone for the retrieval, copy-detection and video evaluators: a global feature
and the patch tokens it was pooled from, from one forward pass.

=====================  ==========================================  =============================================
family / mode          global feature (B, D)                       patch tokens (B, D, h, w)
=====================  ==========================================  =============================================
ViT, ``simpool``       ``norm(SimPool(tokens))`` (= ``model(x)``)  ``norm(tokens)``: every token (there is no
                                                                   [CLS] to drop)
ViT, ``official``      ``norm(tokens)[:, 0]``, the [CLS] token     ``norm(tokens)[:, 1:]``
ResNet / ConvNeXt      the pooled vector (= ``model(x)``)          the last feature map
any timm model         ``model(x)``                                its ``forward_features`` map or patch tokens
                                                                   (prefix tokens dropped)
=====================  ==========================================  =============================================

DINO's evaluators read the [CLS] token as token 0 and drop token 0 as if it were one; SimPool ViTs have none, so
that code would take a patch token for the global feature and lose one patch. Here each family says what it has.

A ViT input whose sides are not multiples of the patch is cut to the largest multiple (bottom and right rows):
a strided patch embedding -- DINO's ``Conv2d(kernel=stride=patch)`` -- never sees those pixels either.

Example:
    >>> view = global_and_patches(model, images)       # images (B, 3, H, W)
    >>> view.global_feature.shape, view.patches.shape  # (B, D), (B, D, H // p, W // p)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from simpool.attention_maps import model_stride
from simpool.models.cnn import SimPoolConvNeXt, SimPoolResNet
from simpool.models.timm_any import TimmBackbone
from simpool.models.vit import SimPoolViT

__all__ = ["GlobalAndPatches", "crop_to_stride", "global_and_patches", "model_stride"]


class GlobalAndPatches(NamedTuple):
    global_feature: torch.Tensor  # (B, D)
    patches: torch.Tensor  # (B, D, h, w)


def crop_to_stride(images: torch.Tensor, stride: int) -> torch.Tensor:
    """Cut the bottom/right remainder so both sides are multiples of ``stride`` (what a strided conv ignores)."""
    height, width = images.shape[-2] // stride * stride, images.shape[-1] // stride * stride
    if height == 0 or width == 0:
        raise ValueError(f"image of {tuple(images.shape[-2:])} px is smaller than the model's patch {stride}")
    return images[..., :height, :width]


def _tokens_to_grid(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)


def _vit(model: SimPoolViT, images: torch.Tensor) -> GlobalAndPatches:
    images = crop_to_stride(images, model.patch_size)
    grid_h, grid_w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    tokens = model.forward_tokens(images)
    normed = model.norm(tokens)
    pooled = model.norm(model.simpool(tokens)) if model.simpool is not None else normed[:, 0]
    return GlobalAndPatches(pooled, _tokens_to_grid(normed[:, model.num_prefix_tokens:], grid_h, grid_w))


def _resnet(model: SimPoolResNet, images: torch.Tensor) -> GlobalAndPatches:
    feature_map = model.forward_features(images)
    pooled = model.simpool(feature_map) if model.simpool is not None else model.forward_head(feature_map, True)
    return GlobalAndPatches(pooled, feature_map)


def _convnext(model: SimPoolConvNeXt, images: torch.Tensor) -> GlobalAndPatches:
    feature_map = model.forward_features(images)
    if model.simpool is None:
        return GlobalAndPatches(model.forward_head(feature_map, pre_logits=True), feature_map)
    norm = model.head.norm  # ConvNeXt's final LayerNorm, applied to the pooled vector as in its forward
    pooled = F.layer_norm(model.simpool(feature_map), (model.embed_dim,), norm.weight, norm.bias, norm.eps)
    return GlobalAndPatches(pooled, feature_map)


def _timm(model: TimmBackbone, images: torch.Tensor) -> GlobalAndPatches:
    if model.is_transformer:
        images = crop_to_stride(images, model_stride(model))
    features = model.model.forward_features(images)
    if model.simpool is None:
        pooled = model.model.forward_head(features, pre_logits=True)
    if features.ndim == 3:
        tokens = features[:, getattr(model.model, "num_prefix_tokens", 0):]
        patch_h, patch_w = model.model.patch_embed.patch_size
        patches = _tokens_to_grid(tokens, images.shape[-2] // patch_h, images.shape[-1] // patch_w)
        if model.simpool is not None:
            pooled = model.simpool(tokens)
        return GlobalAndPatches(pooled, patches)
    if getattr(model.model, "output_fmt", "NCHW") == "NHWC":
        features = features.permute(0, 3, 1, 2)
    if model.simpool is not None:
        pooled = model.simpool(features)
    return GlobalAndPatches(pooled, features)


def global_and_patches(model: nn.Module, images: torch.Tensor) -> GlobalAndPatches:
    """The global feature and the patch tokens of ``images`` (B, 3, H, W) in one forward pass (table above).

    A backbone of another kind is run twice: ``model(images)`` and ``model.patch_features(images)``.
    """
    for family, view in ((SimPoolViT, _vit), (SimPoolResNet, _resnet), (SimPoolConvNeXt, _convnext),
                         (TimmBackbone, _timm)):
        if isinstance(model, family):
            return view(model, images)
    return GlobalAndPatches(model(images), model.patch_features(images))
