"""Backbones: ``build_backbone(arch, mode, gamma, ...)`` returns a model mapping images to (B, embed_dim).

* vit_tiny, vit_small, vit_base (patch 8 or 16), timm ViT, gamma 1.25 with a learnable beta:
  no [CLS] token; SimPool on the last block's tokens, then the final LayerNorm ``norm``.
* resnet18, resnet34, resnet50, resnet101, timm ResNet, gamma 2.0: SimPool on layer4 replaces the average pool.
* convnext_tiny, convnext_small, convnext_base, timm ConvNeXt, gamma 2.0: SimPool on the last stage, then the
  final LayerNorm.
* any other timm name, gamma 1.25 for token models and 2.0 for feature maps: SimPool on ``forward_features``.

``mode="official"`` is DINO's: [CLS] token for ViTs, global average pooling for convnets.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from simpool.models.base import AUTO_GAMMA, MODES, PooledBackbone
from simpool.models.cnn import SimPoolConvNeXt, SimPoolResNet
from simpool.models.timm_any import TimmBackbone
from simpool.models.vit import SimPoolViT

# name -> (class, default gamma, architecture keywords)
ARCHS: dict[str, tuple[type[nn.Module], float, dict[str, Any]]] = {
    "vit_tiny": (SimPoolViT, 1.25, {"embed_dim": 192, "depth": 12, "num_heads": 3}),
    "vit_small": (SimPoolViT, 1.25, {"embed_dim": 384, "depth": 12, "num_heads": 6}),
    "vit_base": (SimPoolViT, 1.25, {"embed_dim": 768, "depth": 12, "num_heads": 12}),
    "resnet18": (SimPoolResNet, 2.0, {"block": "basic", "layers": (2, 2, 2, 2)}),
    "resnet34": (SimPoolResNet, 2.0, {"block": "basic", "layers": (3, 4, 6, 3)}),
    "resnet50": (SimPoolResNet, 2.0, {"block": "bottleneck", "layers": (3, 4, 6, 3)}),
    "resnet101": (SimPoolResNet, 2.0, {"block": "bottleneck", "layers": (3, 4, 23, 3)}),
    "convnext_tiny": (SimPoolConvNeXt, 2.0, {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)}),
    "convnext_small": (SimPoolConvNeXt, 2.0, {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)}),
    "convnext_base": (SimPoolConvNeXt, 2.0, {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)}),
}



def is_known_arch(arch: str) -> bool:
    return arch in ARCHS or timm.is_model(arch)


def arch_family(arch: str) -> str:
    """The family of a known arch before any model is built: ``"vit"``, ``"resnet"``, ``"convnext"`` or ``"timm"``
    (any other timm model; build it and read ``model.family`` / ``model.is_convnet`` for more)."""
    if arch in ARCHS:
        return ARCHS[arch][0].family
    if timm.is_model(arch):
        return "timm"
    raise ValueError(f"unknown arch {arch!r}. Known: {', '.join(ARCHS)}; or any timm model name")


def default_gamma(arch: str) -> float | None:
    """1.25 for transformers, 2.0 for convnets; for other timm models decided when the model is built."""
    if arch in ARCHS:
        return ARCHS[arch][1]
    return None


def build_backbone(
    arch: str,
    mode: str = "simpool",
    gamma: float | str | None = AUTO_GAMMA,
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> PooledBackbone:
    """Build a backbone whose ``forward(x)`` returns (B, embed_dim) and that has ``attention_map(x)``.

    Args:
        arch: a name from ``ARCHS`` or any timm model name.
        mode: ``"simpool"`` or ``"official"`` (DINO's [CLS] token / average pooling).
        gamma: SimPool's generalised-mean exponent; ``"auto"`` = the family's default (1.25 transformers, 2.0
            convnets), ``None`` = the plain attention-weighted mean.
        patch_size: ViT patch size (8 or 16); ignored by convnets.
        drop_path_rate: stochastic depth.
        **overrides: passed to timm, e.g. ``depth=2, embed_dim=192`` or ``layers=(1, 1, 1, 1)``.

    Example:
        >>> model = build_backbone("vit_small", mode="simpool", depth=2)
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 384])
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if arch not in ARCHS and not timm.is_model(arch):
        raise ValueError(
            f"unknown arch {arch!r}. Known: {', '.join(ARCHS)}; or any timm model name "
            "(see timm.list_models())"
        )
    if arch not in ARCHS:
        return TimmBackbone(arch, mode=mode, gamma=gamma,
                            drop_path_rate=drop_path_rate, **overrides)
    cls, arch_gamma, arch_kwargs = ARCHS[arch]
    kwargs = {**arch_kwargs, **overrides}
    if cls is SimPoolViT:
        kwargs["patch_size"] = patch_size
    return cls(mode=mode, gamma=arch_gamma if gamma == AUTO_GAMMA else gamma, arch=arch,
               drop_path_rate=drop_path_rate, **kwargs)


__all__ = ["ARCHS", "AUTO_GAMMA", "MODES", "PooledBackbone", "SimPoolConvNeXt", "SimPoolResNet", "SimPoolViT",
           "TimmBackbone", "arch_family", "build_backbone", "default_gamma", "is_known_arch"]
