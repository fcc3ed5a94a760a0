"""One fine-tuning step and the evaluation loop.

Step (``FineTuneStep``): set each param group's lr to ``lr_t * lr_scale`` (layer-wise decay, from timm's
param groups); mix the batch (``timm.data.Mixup``); forward under ``torch.autocast`` (bf16 / fp16; fp32 runs
without); loss = ``SoftTargetCrossEntropy`` on mixed targets, else ``LabelSmoothingCrossEntropy`` (or timm's
``BinaryCrossEntropy`` for the RSB recipe); backward (through a ``GradScaler`` in fp16), optional global norm
clipping, optimizer step; then the EMA (``timm.utils.ModelEmaV3``) update.

Evaluation (``evaluate``): top-1 / top-5 (%) and mean cross-entropy over ``val/``; each rank passes its shard
and the counts are summed over ranks.

Example:
    >>> step = FineTuneStep(model, optimizer, criterion, mixup, precision="bf16", ema=ema)
    >>> loss = step(images, labels, lr=lr_schedule[it], iteration=it)
    >>> evaluate(model, val_loader, device, precision="bf16")
    {'top1': 87.1, 'top5': 99.6, 'loss': 0.41}
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from simpool.distributed import all_reduce_sum, unwrap
from simpool.run.metrics import num_correct
from simpool.run.precision import autocast, grad_scaler

__all__ = ["FineTuneStep", "build_criterion", "evaluate"]


def build_criterion(args: argparse.Namespace, mixing: bool) -> nn.Module:
    """timm's losses: BCE (RSB), soft-target CE after Mixup (smoothing is in its targets), else smoothed CE."""
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixing else args.smoothing, target_threshold=args.bce_target_thresh)
    if mixing:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


class FineTuneStep:
    """One optimisation step of ``model`` (possibly DDP-wrapped); returns the loss (a 0-d tensor, not synced)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, mixup,
                 precision: str = "fp32", clip_grad: float = 0.0, ema: ModelEmaV3 | None = None) -> None:
        self.model, self.optimizer, self.criterion, self.mixup = model, optimizer, criterion, mixup
        self.precision, self.clip_grad, self.ema = precision, clip_grad, ema
        self.device = next(model.parameters()).device
        self.scaler = grad_scaler(self.device, precision)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float, iteration: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        with autocast(self.device, self.precision):
            loss = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=iteration + 1)
        return loss.detach()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """``{"top1", "top5", "loss"}`` over the images ``loader`` gives each rank, summed over ranks.

    top-5 is top-min(5, C); the loss is the mean cross-entropy (no smoothing) of the logits in float32.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, summed CE
    count = torch.zeros((), device=device, dtype=torch.float64)
    for images, labels, _ in loader:
        if images is None:  # every image of the batch was unreadable
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images).float()
        totals[:2] += num_correct(logits, labels, (1, 5))
        totals[2] += F.cross_entropy(logits, labels, reduction="sum")
        count += labels.shape[0]
    totals, count = all_reduce_sum(totals), all_reduce_sum(count).clamp(min=1)
    model.train(was_training)
    return {"top1": (totals[0] * 100 / count).item(), "top5": (totals[1] * 100 / count).item(),
            "loss": (totals[2] / count).item()}
