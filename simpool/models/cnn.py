"""Convolutional backbones (timm ResNet and ConvNeXt) pooled by SimPool or by global average pooling.

* ResNet: SimPool (gamma 2.0, no beta) on layer4's map replaces the average pool. timm's ResNet has
  torchvision's parameter names, so the reference's ResNet checkpoints load as they are.
* ConvNeXt: SimPool on the last stage's map, then the final LayerNorm (timm's ``head.norm``). The reference uses
  facebookresearch's ConvNeXt layout; ``simpool.checkpoint`` converts it with timm's own converter.

In official mode both pool by averaging, exactly as timm's classification head does before its classifier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from simpool.models.base import PooledBackbone, check_mode
from simpool.pooling import SimPool, pooled_attention_grid

RESNET_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class _MapPooling:
    """Shared by the convnets: pool a (B, C, H, W) map with SimPool, and expose SimPool's attention."""

    simpool: SimPool | None
    arch: str

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w): SimPool's attention over the last feature map (simpool mode only)."""
        if self.simpool is None:
            raise ValueError(
                f"{self.arch} in official mode pools by averaging and has no attention map; "
                "build it with mode='simpool'"
            )
        feature_map = self.forward_features(x)  # the timm class's method
        _, attn = self.simpool(feature_map, return_attention=True)
        return pooled_attention_grid(attn, *feature_map.shape[-2:])

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w): the last feature map, what SimPool (or the average pool) pools, in either mode."""
        return self.forward_features(x)


class SimPoolResNet(_MapPooling, ResNet, PooledBackbone):
    """timm ``ResNet`` whose ``forward`` returns the pooled layer4 feature (B, 512 * expansion).

    Example:
        >>> net = SimPoolResNet(mode="simpool", block="basic", layers=(1, 1, 1, 1))
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 512])
    """

    family = "resnet"

    def __init__(
        self,
        mode: str = "simpool",
        gamma: float | None = 2.0,
        block: str = "bottleneck",
        layers: tuple[int, ...] = (3, 4, 6, 3),
        arch: str = "resnet",
        **timm_kwargs: Any,
    ) -> None:
        check_mode(mode)
        if block not in RESNET_BLOCKS:
            raise ValueError(f"unknown ResNet block {block!r}: choose one of {', '.join(RESNET_BLOCKS)}")
        super().__init__(block=RESNET_BLOCKS[block], layers=tuple(layers), num_classes=0, **timm_kwargs)
        self._init_pooling(arch, mode, gamma, self.num_features,
                           {"block": block, "layers": list(layers), **timm_kwargs})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.forward_features(x)
        if self.simpool is not None:
            return self.simpool(feature_map)
        return self.forward_head(feature_map, pre_logits=True)


class SimPoolConvNeXt(_MapPooling, ConvNeXt, PooledBackbone):
    """timm ``ConvNeXt`` whose ``forward`` returns the pooled, normalised last-stage feature (B, dims[-1]).

    Example:
        >>> net = SimPoolConvNeXt(mode="simpool", depths=(1, 1, 1, 1), dims=(32, 64, 128, 256))
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 256])
    """

    family = "convnext"

    def __init__(
        self,
        mode: str = "simpool",
        gamma: float | None = 2.0,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        arch: str = "convnext",
        **timm_kwargs: Any,
    ) -> None:
        check_mode(mode)
        super().__init__(depths=tuple(depths), dims=tuple(dims), num_classes=0, **timm_kwargs)
        self._init_pooling(arch, mode, gamma, self.num_features,
                           {"depths": list(depths), "dims": list(dims), **timm_kwargs})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.forward_features(x)
        if self.simpool is None:
            return self.forward_head(feature_map, pre_logits=True)
        pooled = self.simpool(feature_map)
        norm = self.head.norm  # timm's LayerNorm2d, here applied to the pooled vector
        return F.layer_norm(pooled, (self.embed_dim,), norm.weight, norm.bias, norm.eps)
