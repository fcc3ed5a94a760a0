"""The fine-tuned network: a pretrained backbone and a linear head on its pooled feature.

    logits = W f(x) + b,     f(x) = the backbone's pooled feature (SimPool, or [CLS] / average pool)

``build_finetune_model`` takes the backbone from :func:`simpool.loading.load_model` (training checkpoint,
backbone-only file, export folder, timm state dict, or ``random_init``), rebuilt with stochastic depth when
asked. ``FineTuneModel.group_matcher`` exposes the backbone's timm layer grouping under its ``backbone.``
prefix, so timm's ``param_groups_layer_decay`` assigns layer-wise lr decay (the head and SimPool, unmatched,
sit in the top layer and keep the full lr).

An export folder of a fine-tuned checkpoint (``utils/export_backbone.py``) also holds the head
(``classifier.safetensors``); :func:`load_finetuned` rebuilds the whole classifier from it.

Example:
    >>> model, source = build_finetune_model(args, num_classes=10)
    >>> model(torch.randn(2, 3, 224, 224)).shape
    torch.Size([2, 10])
    >>> classifier = load_finetuned("exports/fashion_vit")      # after utils/export_backbone.py
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import trunc_normal_
from torch import nn

from simpool.export import CLASSIFIER_FILE
from simpool.loading import ModelSource, load_backbone, load_model, read_export_config
from simpool.models import PooledBackbone, build_backbone
from simpool.run.flags import backbone_flags

__all__ = ["FineTuneModel", "build_finetune_model", "load_finetuned", "model_record"]


def _prefixed(pattern: Any, prefix: str) -> Any:
    """A timm group-matcher pattern (regex, or list of (regex, suffix)) that matches under ``prefix``."""
    if isinstance(pattern, str):
        return rf"^{re.escape(prefix)}(?:{pattern.lstrip('^')})"
    return [(_prefixed(regex, prefix), suffix) for regex, suffix in pattern]


class FineTuneModel(nn.Module):
    """``backbone`` + ``head = nn.Linear(embed_dim, num_classes)`` (timm's init: truncated normal 0.02, bias 0)."""

    def __init__(self, backbone: PooledBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _timm_module(self) -> tuple[nn.Module, str]:
        """The timm model that defines the grouping, and its prefix here (``backbone.model.`` for TimmBackbone)."""
        inner = getattr(self.backbone, "model", None)
        if isinstance(inner, nn.Module) and hasattr(inner, "group_matcher"):
            return inner, "backbone.model."
        return self.backbone, "backbone."

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's timm ``group_matcher`` with its prefix here; parameters it misses go to the top layer."""
        module, prefix = self._timm_module()
        if not hasattr(module, "group_matcher"):
            return {}
        return {name: _prefixed(pattern, prefix) for name, pattern in module.group_matcher(coarse).items()}

    def no_weight_decay(self) -> set[str]:
        module, prefix = self._timm_module()
        names = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
        return {prefix + name for name in names}


def with_drop_path(backbone: PooledBackbone, rate: float) -> PooledBackbone:
    """The same backbone and weights, rebuilt with stochastic depth ``rate`` (load_model builds inference copies)."""
    if rate == 0:
        return backbone
    config = backbone.config()
    patch = config.pop("patch_size", 16)
    rebuilt = build_backbone(config.pop("arch"), mode=config.pop("mode"), gamma=config.pop("gamma"),
                             patch_size=patch, **{**config, "drop_path_rate": rate})
    rebuilt.load_state_dict(backbone.state_dict(), strict=True)
    if hasattr(backbone, "pos_embed_resampling"):
        rebuilt.pos_embed_resampling = backbone.pos_embed_resampling
    return rebuilt


def build_finetune_model(args: argparse.Namespace, num_classes: int) -> tuple[FineTuneModel, ModelSource]:
    """The backbone ``--pretrained_weights`` / ``--random_init`` and the backbone flags describe, plus a fresh head.

    Raises ``ValueError`` (``CheckpointError``) when the weights do not fit the flags, naming the flag.
    """
    backbone, source = load_model(args.pretrained_weights or None, args.checkpoint_key,
                                  random_init=args.random_init, seed=args.seed, **backbone_flags(args))
    model = FineTuneModel(with_drop_path(backbone, args.drop_path), num_classes)
    return model.train(), source


def model_record(model: FineTuneModel) -> dict[str, Any]:
    """What ``load_model`` reads from a checkpoint's ``args`` to rebuild the backbone (export, evaluators)."""
    backbone = model.backbone
    overrides = {k: v for k, v in backbone.build_kwargs.items() if k not in ("patch_size", "drop_path_rate")}
    return {"arch": backbone.arch, "mode": backbone.mode, "gamma": backbone.gamma,
            "patch_size": getattr(backbone, "patch_size", None), "model_overrides": overrides,
            "pos_embed_resampling": getattr(backbone, "pos_embed_resampling", None)}


def rebuild_from_record(record: dict[str, Any], num_classes: int, drop_path: float) -> FineTuneModel:
    """An untrained FineTuneModel of the architecture ``model_record`` describes (resume builds this)."""
    backbone = build_backbone(record["arch"], mode=record["mode"], gamma=record["gamma"],
                              patch_size=record.get("patch_size") or 16, drop_path_rate=drop_path,
                              **record["model_overrides"])
    if record.get("pos_embed_resampling"):
        backbone.pos_embed_resampling = record["pos_embed_resampling"]
    return FineTuneModel(backbone, num_classes)


def load_finetuned(out_dir: str | os.PathLike, device: str | torch.device | None = None) -> FineTuneModel:
    """The classifier exported from a fine-tuning checkpoint (backbone + head), eval mode.

    Example:
        >>> model = load_finetuned("exports/fashion_vit")
        >>> model(images).argmax(-1)       # class indices; read_export_config(...)["classifier"]["classes"]
    """
    config = read_export_config(out_dir)
    entry = config.get("classifier")
    if not entry:
        raise ValueError(f"{str(out_dir)!r} holds a backbone without a classifier: export a finetune.py checkpoint")
    head = load_file(str(Path(out_dir) / entry.get("file", CLASSIFIER_FILE)), device="cpu")
    model = FineTuneModel(load_backbone(out_dir), head["weight"].shape[0])
    model.head.load_state_dict(head, strict=True)
    model.eval()
    return model.to(device) if device is not None else model
