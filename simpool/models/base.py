"""What every simpool backbone offers, whatever its family (ViT, ResNet, ConvNeXt, any timm model)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from simpool.pooling import SimPool

MODES = ("simpool", "official")
# gamma=AUTO_GAMMA: the arch's paper default (1.25 transformers, 2.0 convnets); gamma=None: no gamma (the plain
# attention-weighted mean). The one spelling everywhere: flags, YAML, build_backbone, recorded args.
AUTO_GAMMA = "auto"


class PooledBackbone(nn.Module):
    """Mixin for backbones that map images (B, 3, H, W) to one feature vector (B, embed_dim).

    Subclasses set ``arch``, ``mode``, ``gamma``, ``embed_dim`` and ``family`` and implement ``forward`` and
    ``attention_map``. ``config()`` is what export writes so that ``build_backbone(**config)`` rebuilds the model.
    """

    arch: str
    mode: str
    gamma: float | None
    embed_dim: int
    family: str
    build_kwargs: dict[str, Any]

    @property
    def is_convnet(self) -> bool:
        """True when the trunk is convolutional (ResNet, ConvNeXt, a timm convnet): such models run faster in
        ``torch.channels_last`` on CUDA, transformers do not."""
        return self.family in ("resnet", "convnext")

    def _init_pooling(self, arch: str, mode: str, gamma: float | None, embed_dim: int, build_kwargs: dict[str, Any],
                      use_beta: bool = False) -> None:
        """Set the attributes every family shares and, in simpool mode, the ``simpool`` head (after the trunk, so
        that the trunk's initialisation draws the same random numbers whatever the mode)."""
        self.arch, self.mode = arch, mode
        self.gamma = gamma if mode == "simpool" else None
        self.embed_dim = embed_dim
        self.build_kwargs = build_kwargs
        self.simpool = SimPool(embed_dim, gamma=gamma, use_beta=use_beta) if mode == "simpool" else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the trunk (timm's ``set_grad_checkpointing``, which the ViT, ResNet and
        ConvNeXt classes inherit ahead of this one); a family without it raises ``ValueError``."""
        if enable:
            raise ValueError(f"{self.arch} does not support gradient checkpointing")

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every family overrides
        raise NotImplementedError

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every family overrides
        """Dense features (B, embed_dim, h, w) on the grid of ``attention_map``: a ViT's last-block patch
        tokens, a convnet's last feature map (the inputs of the pooling, for segmentation probes and PCA)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Everything ``simpool.build_backbone(**config)`` needs to rebuild this exact architecture."""
        return {"arch": self.arch, "mode": self.mode, "gamma": self.gamma, **self.build_kwargs}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode
