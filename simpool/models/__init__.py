"""Backbones: ``build_backbone(arch, mode, gamma, ...)`` returns a model mapping images to (B, embed_dim).

* vit_tiny, vit_small, vit_base (patch 8 or 16), timm ViT, gamma 1.25 with a learnable beta:
  no [CLS] token; SimPool on the last block's tokens, then the final LayerNorm ``norm``.
* resnet18, resnet34, resnet50, resnet101, timm ResNet, gamma 2.0: SimPool on layer4 replaces the average pool.
* convnext_tiny, convnext_small, convnext_base, timm ConvNeXt, gamma 2.0: SimPool on the last stage, then the
  final LayerNorm.
* any other timm name, gamma 1.25 for token models and 2.0 for feature maps: SimPool on ``forward_features``.

``mode="official"`` is DINO's: [CLS] token for ViTs, global average pooling for convnets.
"""

from simpool.models.base import AUTO_GAMMA, MODES, PooledBackbone
from simpool.models.cnn import SimPoolConvNeXt, SimPoolResNet
from simpool.models.registry import (
    ARCHS,
    ArchSpec,
    accepted_keywords,
    arch_family,
    build_backbone,
    default_gamma,
    is_known_arch,
)
from simpool.models.timm_any import TimmBackbone
from simpool.models.vit import SimPoolViT

__all__ = ["ARCHS", "AUTO_GAMMA", "MODES", "ArchSpec", "PooledBackbone", "SimPoolConvNeXt", "SimPoolResNet",
           "SimPoolViT", "TimmBackbone", "accepted_keywords", "arch_family", "build_backbone", "default_gamma",
           "is_known_arch"]
