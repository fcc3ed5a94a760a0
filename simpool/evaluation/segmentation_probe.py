"""Linear segmentation probe on frozen patch features (dinov2's "linear" segmentation protocol, several lrs at once).

The backbone's dense features ``F = model.patch_features(x)`` (B, d, h, w) -- a ViT's last-block patch tokens
after the final LayerNorm, a convnet's last feature map -- are computed once per image and cached
(:func:`cache_features`). On them, :class:`SegmentationHeads` holds ``H`` probes, one per learning rate:

    ``logits_h = W_h BN(F) + b_h``   per patch (a 1x1 convolution), upsampled bilinearly to the mask (S, S),

trained with cross-entropy over the pixels, void (255) ignored, mean over the valid pixels of the batch.
``BN`` is a ``BatchNorm2d`` without affine parameters, shared by the heads: its statistics are those of the
features alone, identical for every head, and the affine part would be absorbed by ``W_h``. The ``W_h`` are
a :class:`~simpool.evaluation.linear.MultiLRLinear` (one GEMM for all heads, same N(0, 0.01^2) start) in
``torch.optim.SGD`` with one param group per head and a per-epoch ``CosineAnnealingLR``
(:func:`~simpool.evaluation.linear.probe_optimizer`), as the linear probe does.

Scores (:func:`confusion_matrix`, :func:`iou_from_confusion`): with the confusion matrix ``M[g, p]`` (pixels of
true class g predicted p, void left out), ``IoU_c = M[c, c] / (sum_p M[c, p] + sum_g M[g, c] - M[c, c])``, and
``mIoU`` the mean over the classes whose union is not empty (a class absent from both the truth and the
predictions has no IoU: NaN, left out of the mean).

Example::

    >>> confusion = confusion_matrix(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 255]), num_classes=2)
    >>> confusion.tolist(), iou_from_confusion(confusion)["miou"]
    ([[1, 0], [1, 1]], 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import Dataset, Subset

from simpool.data.every_item import every_item
from simpool.data.fashion_on_photos import voc_palette
from simpool.data.segmentation import IGNORE_INDEX
from simpool.distributed import all_gather_varlen, all_reduce_sum, get_rank, get_world_size
from simpool.evaluation.linear import MultiLRLinear, feature_batches, probe_optimizer
from simpool.run.process import data_errors_agreed
from simpool.run.state import CheckpointFormat

__all__ = ["SEGMENTATION_PROBE_CHECKPOINT", "SegmentationHeads", "SegProbeState", "all_background_confusion",
           "cache_features", "confusion_matrix", "evaluate_heads", "format_table", "head_results",
           "iou_from_confusion", "save_predictions", "train_epoch"]

SEGMENTATION_PROBE_CHECKPOINT = CheckpointFormat("format", "simpool-segmentation-probe-1",
                                                 "a segmentation-probe checkpoint")


class SegmentationHeads(nn.Module):
    """``H`` linear per-patch classifiers on shared, affine-free BatchNorm'ed features.

    ``forward(features (B, d, h, w))`` -> logits (H, B, C, h, w); :meth:`upsampled` brings them to (S, S).

    >>> SegmentationHeads(32, num_classes=5, num_heads=3)(torch.randn(2, 32, 4, 4)).shape
    torch.Size([3, 2, 5, 4, 4])
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim, affine=False)
        self.linear = MultiLRLinear(dim, num_classes, num_heads, generator=generator)
        self.num_heads, self.num_classes = num_heads, num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm(features)
        batch, dim, height, width = x.shape
        logits = self.linear(x.permute(0, 2, 3, 1).reshape(-1, dim))  # (H, B*h*w, C): every patch is a sample
        return logits.view(self.num_heads, batch, height, width, self.num_classes).permute(0, 1, 4, 2, 3)

    def upsampled(self, features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(H, B, C, S, S): the logits, bilinearly upsampled (align_corners False) to the mask size."""
        logits = self(features)
        heads, batch = logits.shape[:2]
        up = F.interpolate(logits.flatten(0, 1), size=tuple(size), mode="bilinear", align_corners=False)
        return up.view(heads, batch, *up.shape[1:])


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each head's mean cross-entropy over the batch's non-void pixels, (H,); ``logits`` (H, B, C, S, S)."""
    heads = logits.shape[0]
    per_pixel = F.cross_entropy(logits.flatten(0, 1), masks.repeat(heads, 1, 1), ignore_index=IGNORE_INDEX,
                                reduction="none").view(heads, -1)
    valid = (masks != IGNORE_INDEX).sum().clamp(min=1)
    return per_pixel.sum(dim=1) / valid


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts ``M[g, p]`` of pixels of true class g predicted as p; void (255) target pixels
    are left out. ``pred`` and ``target`` are integer tensors of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != IGNORE_INDEX
    target, pred = target[valid].long(), pred[valid].long()
    for name, labels in (("target", target), ("pred", pred)):
        if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}) (target also {IGNORE_INDEX}), found "
                             f"[{int(labels.min())}, {int(labels.max())}]: pass the right number of classes")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def all_background_confusion(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The confusion matrix of the constant prediction "class 0 everywhere" (the baseline a probe must beat)."""
    return confusion_matrix(torch.zeros_like(masks), masks, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> dict[str, Any]:
    """``{"iou": [IoU per class, NaN without a union], "miou": mean over defined IoUs, "pixel_accuracy"}``,
    fractions in [0, 1] (see the module docstring)."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=1) + confusion.sum(dim=0) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))
    total = confusion.sum()
    return {"iou": iou.tolist(), "miou": float(iou.nanmean()) if (union > 0).any() else math.nan,
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else math.nan}


# ----------------------------------------------------------------------------------------------------------
# features, cached once per image
# ----------------------------------------------------------------------------------------------------------
def _contiguous_shard(dataset: Dataset) -> Subset:
    world, rank = get_world_size(), get_rank()
    per_rank = -(-len(dataset) // world)
    return Subset(dataset, range(rank * per_rank, min(len(dataset), (rank + 1) * per_rank)))


@torch.no_grad()
def cache_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features (N, d, h, w) float32 and masks (N, S, S) uint8 (labels < 256) of ``dataset``, on ``device``.

    Each rank embeds one contiguous shard; with ``gather`` the shards are gathered in rank order (every rank
    gets the whole set, in dataset order), without it each rank keeps its own shard (evaluation: the
    confusion matrices are summed over ranks instead).
    """
    loader = every_item(_contiguous_shard(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, masks = [], []
    with data_errors_agreed():  # an unreadable image on one rank stops every rank before the gather
        for images, labels in loader:
            feats.append(features(images.to(device, non_blocking=True)).float())
            masks.append(labels.to(device, dtype=torch.uint8))
    if not feats:  # a rank with an empty shard (fewer images than ranks) still joins the gather
        probe = features(dataset[0][0][None].to(device)).float()
        feats, masks = [probe[:0]], [torch.zeros(0, *dataset[0][1].shape, dtype=torch.uint8, device=device)]
    local_feats, local_masks = torch.cat(feats), torch.cat(masks)
    if not gather:
        return local_feats, local_masks
    return torch.cat(all_gather_varlen(local_feats)), torch.cat(all_gather_varlen(local_masks))


# ----------------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------------
def train_epoch(heads: SegmentationHeads, batches: Iterator, optimizer: torch.optim.Optimizer,
                stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """One SGD step per batch on the sum of the heads' pixel losses; returns each head's mean loss (H,), or None
    when ``stop()`` (asked before every step; it may be collective) said to abandon the epoch."""
    heads.train()
    loss_sum, steps = torch.zeros(heads.num_heads, device=next(heads.parameters()).device), 0
    for feats, masks in batches:
        if stop is not None and stop():
            return None
        masks = masks.long()
        per_head = pixel_loss(heads.upsampled(feats, masks.shape[-2:]), masks)
        optimizer.zero_grad(set_to_none=True)
        per_head.sum().backward()  # the heads share no weights: each gets its own loss's gradient
        optimizer.step()
        loss_sum += per_head.detach()
        steps += 1
    return loss_sum / max(steps, 1)


@torch.no_grad()
def evaluate_heads(heads: SegmentationHeads, feats: torch.Tensor, masks: torch.Tensor,
                   batch_size: int) -> torch.Tensor:
    """(H, C, C) confusion matrices of every head on (this rank's) cached val features, summed over ranks."""
    heads.eval()
    num_classes = heads.num_classes
    confusion = torch.zeros(heads.num_heads, num_classes, num_classes, dtype=torch.int64, device=feats.device)
    for start in range(0, feats.shape[0], batch_size):
        target = masks[start:start + batch_size].long()
        pred = heads.upsampled(feats[start:start + batch_size], target.shape[-2:]).argmax(dim=2)  # (H, B, S, S)
        for h in range(heads.num_heads):
            confusion[h] += confusion_matrix(pred[h], target, num_classes)
    return all_reduce_sum(confusion)


@dataclass
class SegProbeState:
    """The heads, their SGD and cosine schedule, the generator of the batch order, and the results so far."""

    heads: SegmentationHeads
    optimizer: torch.optim.SGD
    scheduler: CosineAnnealingLR
    generator: torch.Generator  # head initialisation, then each epoch's order of the cached features
    epoch: int = 0
    confusion: list[list[list[int]]] | None = None  # last evaluation, per head
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, dim: int, num_classes: int, lrs: Sequence[float], epochs: int, seed: int, device: torch.device,
            weight_decay: float = 0.0) -> SegProbeState:
        generator = torch.Generator().manual_seed(seed)
        heads = SegmentationHeads(dim, num_classes, len(lrs), generator=generator).to(device)
        optimizer, scheduler = probe_optimizer(heads.linear, lrs, epochs, weight_decay=weight_decay)
        return cls(heads, optimizer, scheduler, generator)

    def batches(self, feats: torch.Tensor, masks: torch.Tensor, batch_size: int):
        """This epoch's mini-batches of the cached train set, in ``randperm(N, generator)`` order."""
        return feature_batches(feats, masks, batch_size, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "epoch": self.epoch, "confusion": self.confusion, "history": self.history}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.heads.load_state_dict(saved["heads"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        self.epoch, self.confusion, self.history = int(saved["epoch"]), saved["confusion"], list(saved["history"])


# ----------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------
def head_results(lrs: list[float], confusion: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Per lr: mIoU, pixel accuracy and {class: IoU}; the best lr by mIoU (NaN IoUs as null in JSON)."""
    per_lr = {}
    for lr, matrix in zip(lrs, confusion, strict=True):
        scores = iou_from_confusion(matrix)
        per_lr[str(lr)] = {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
                           "iou": {name: _finite(v) for name, v in zip(classes, scores["iou"], strict=True)}}
    best = max(per_lr, key=lambda lr: per_lr[lr]["miou"])
    return {"best_lr": float(best), "miou": per_lr[best]["miou"], "pixel_accuracy": per_lr[best]["pixel_accuracy"],
            "iou": per_lr[best]["iou"], "per_lr": per_lr}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def format_table(results: dict[str, Any], baseline: dict[str, Any]) -> str:
    lines = [f"linear segmentation, best lr {results['best_lr']:g}: mIoU {results['miou']:.4f}  pixel accuracy "
             f"{results['pixel_accuracy']:.4f}  (all-background: mIoU {baseline['miou']:.4f})",
             "  lr: " + "  ".join(f"{lr} {r['miou']:.4f}" for lr, r in results["per_lr"].items())]
    for name, iou in results["iou"].items():
        lines.append(f"  {name:>16} IoU {'  n/a' if iou is None else f'{iou:.4f}'}")
    return "\n".join(lines)


@torch.no_grad()
def save_predictions(path: Path, heads, head: int, dataset, feats: torch.Tensor, count: int) -> Path:
    """One row per val image: the image, its true labels and head ``head``'s prediction, in VOC colours
    (void white). ``feats`` are this rank's cached val features, whose first rows are the dataset's first images."""
    heads.eval()
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    rows = []
    for index in range(count):
        image, truth = dataset[index]
        pred = heads.upsampled(feats[index:index + 1], truth.shape[-2:])[head, 0].argmax(dim=0)
        mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
        rgb = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        gap = np.full((rgb.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([rgb, gap, palette[truth.numpy()], gap, palette[pred.cpu().numpy()]], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
