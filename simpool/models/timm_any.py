"""Any other timm model, by its timm name, pooled by SimPool or by its own head's pooling."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from simpool.models.base import AUTO_GAMMA, PooledBackbone, check_mode
from simpool.pooling import pooled_attention_grid


def looks_like_transformer(model: nn.Module) -> bool:
    """Token models (ViT, DeiT, EVA, ...) embed patches; their features are (B, N, d) rather than a map."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


class TimmBackbone(PooledBackbone):
    """``timm.create_model(name)`` with SimPool on ``forward_features`` (simpool) or timm's pooling (official).

    In simpool mode the prefix tokens ([CLS], registers) of a token model are dropped before pooling, and
    channels-last maps (``output_fmt == "NHWC"``, e.g. Swin) are transposed first.

    Example:
        >>> net = TimmBackbone("efficientnet_b0", mode="simpool")
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1280])
    """

    family = "timm"

    def __init__(self, arch: str, mode: str = "simpool", gamma: float | str | None = AUTO_GAMMA, **timm_kwargs: Any):
        super().__init__()
        check_mode(mode)
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs)
        self.is_transformer = looks_like_transformer(self.model)
        if gamma == AUTO_GAMMA:
            gamma = 1.25 if self.is_transformer else 2.0
        self._init_pooling(arch, mode, gamma, self.model.num_features, dict(timm_kwargs))

    @property
    def is_convnet(self) -> bool:
        return not self.is_transformer

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch on the wrapped model; models that lack it (timm asserts) raise ``ValueError``."""
        try:
            self.model.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError, AttributeError):
            if enable:
                raise ValueError(f"timm's {self.arch} does not support gradient checkpointing; "
                                 "drop --grad_checkpointing or pick another arch") from None

    def _features_for_pooling(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.ndim == 3:
            return features[:, getattr(self.model, "num_prefix_tokens", 0):]
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.simpool is None:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.simpool(self._features_for_pooling(x))

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w): the feature map, or a token model's patch tokens (prefix tokens dropped) on its grid."""
        features = self._features_for_pooling(x)
        if features.ndim == 4:
            return features
        patch_h, patch_w = self.model.patch_embed.patch_size
        return features.transpose(1, 2).reshape(features.shape[0], -1, x.shape[-2] // patch_h, x.shape[-1] // patch_w)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.simpool is None:
            raise ValueError(f"{self.arch} in official mode has no pooling attention; use mode='simpool'")
        features = self._features_for_pooling(x)
        _, attn = self.simpool(features, return_attention=True)
        if features.ndim == 4:
            return pooled_attention_grid(attn, *features.shape[-2:])
        patch_h, patch_w = self.model.patch_embed.patch_size
        return pooled_attention_grid(attn, x.shape[-2] // patch_h, x.shape[-1] // patch_w)
