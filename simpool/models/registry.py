"""The named architectures: ``ARCHS[name]`` is an ``ArchSpec`` (class, default gamma, architecture keywords).

Example:
    >>> ARCHS["vit_small"].default_gamma, ARCHS["vit_small"].family
    (1.25, 'vit')
    >>> build_backbone("vit_small", depth=2)(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 384])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import timm

from simpool.models.base import AUTO_GAMMA, PooledBackbone, check_mode
from simpool.models.cnn import SimPoolConvNeXt, SimPoolResNet
from simpool.models.timm_any import TimmBackbone
from simpool.models.vit import SimPoolViT


@dataclass(frozen=True)
class ArchSpec:
    """One named architecture: ``cls(**kwargs)`` builds it; ``default_gamma`` is the paper's exponent for it."""

    name: str
    cls: type[PooledBackbone]
    default_gamma: float
    kwargs: Mapping[str, Any]

    @property
    def family(self) -> str:
        return self.cls.family


def _spec(name: str, cls: type[PooledBackbone], default_gamma: float, **kwargs: Any) -> tuple[str, ArchSpec]:
    return name, ArchSpec(name, cls, default_gamma, MappingProxyType(kwargs))


# gamma 1.25 for transformers, 2.0 for convnets (the paper's defaults)
ARCHS: dict[str, ArchSpec] = dict([
    _spec("vit_tiny", SimPoolViT, 1.25, embed_dim=192, depth=12, num_heads=3),
    _spec("vit_small", SimPoolViT, 1.25, embed_dim=384, depth=12, num_heads=6),
    _spec("vit_base", SimPoolViT, 1.25, embed_dim=768, depth=12, num_heads=12),
    _spec("resnet18", SimPoolResNet, 2.0, block="basic", layers=(2, 2, 2, 2)),
    _spec("resnet34", SimPoolResNet, 2.0, block="basic", layers=(3, 4, 6, 3)),
    _spec("resnet50", SimPoolResNet, 2.0, block="bottleneck", layers=(3, 4, 6, 3)),
    _spec("resnet101", SimPoolResNet, 2.0, block="bottleneck", layers=(3, 4, 23, 3)),
    _spec("convnext_tiny", SimPoolConvNeXt, 2.0, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    _spec("convnext_small", SimPoolConvNeXt, 2.0, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    _spec("convnext_base", SimPoolConvNeXt, 2.0, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
])


def is_known_arch(arch: str) -> bool:
    return arch in ARCHS or timm.is_model(arch)


def _unknown_arch(arch: str) -> ValueError:
    return ValueError(f"unknown arch {arch!r}. Known: {', '.join(ARCHS)}; or any timm model name "
                      "(see timm.list_models())")


def arch_family(arch: str) -> str:
    """The family of a known arch before any model is built: ``"vit"``, ``"resnet"``, ``"convnext"`` or ``"timm"``
    (any other timm model; build it and read ``model.family`` / ``model.is_convnet`` for more)."""
    if arch in ARCHS:
        return ARCHS[arch].family
    if timm.is_model(arch):
        return "timm"
    raise _unknown_arch(arch)


def accepted_keywords(arch: str) -> set[str] | None:
    """Keywords the backbone class of ``arch`` and its timm base classes take (``depth``, ``embed_dim``, ...,
    ``patch_size``, ``drop_path_rate``), or None for other timm models (timm checks those when it builds them)."""
    if arch not in ARCHS:
        return None
    names: set[str] = set()
    for cls in ARCHS[arch].cls.__mro__:
        if "__init__" not in vars(cls) or cls.__module__.startswith("torch."):
            continue
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name != "self":
                names.add(param.name)
    return names - {"mode", "gamma", "arch"}


def default_gamma(arch: str) -> float | None:
    """1.25 for transformers, 2.0 for convnets; ``None`` for other timm models, decided when the model is built."""
    return ARCHS[arch].default_gamma if arch in ARCHS else None


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
    check_mode(mode)
    if arch not in ARCHS:
        if not timm.is_model(arch):
            raise _unknown_arch(arch)
        return TimmBackbone(arch, mode=mode, gamma=gamma, drop_path_rate=drop_path_rate, **overrides)
    spec = ARCHS[arch]
    kwargs = {**spec.kwargs, **overrides}
    if spec.cls is SimPoolViT:
        kwargs["patch_size"] = patch_size
    return spec.cls(mode=mode, gamma=spec.default_gamma if gamma == AUTO_GAMMA else gamma, arch=arch,
                    drop_path_rate=drop_path_rate, **kwargs)
