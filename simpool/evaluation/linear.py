"""Linear probing on frozen features: one head, or one head per learning rate trained in a single pass.

The DINO linear protocol (facebookresearch/dino ``eval_linear.py``) trains ``y = W x + b`` on frozen
features with cross-entropy, SGD (momentum 0.9, weight decay 0), a learning rate scaled by
``global_batch / 256`` and annealed per epoch with a cosine, ``lr_e = lr * (1 + cos(pi * e / E)) / 2``
for epochs ``e = 0 .. E-1``. The best learning rate is data dependent, so :class:`MultiLRLinear` holds
``H`` heads in one stacked weight ``(H, C, D)`` and trains all of them on the same mini-batches: one
GEMM computes every head's logits, the summed loss gives each head exactly its own gradient (the heads
share no parameters), and the SGD step applies each head's own learning rate.

:func:`train_linear_on_features` is the ``--cached_features`` mode: features are extracted once (no
augmentation), then every head is trained and evaluated on them.

Example::

    >>> import torch
    >>> feats, labels = torch.randn(256, 32), torch.randint(0, 4, (256,))
    >>> out = train_linear_on_features(feats, labels, feats, labels, lrs=[0.01, 0.1], epochs=2,
    ...                                batch_size=64, num_labels=4, seed=0)
    >>> sorted(out["per_lr"]) == [0.01, 0.1] and out["best_lr"] in (0.01, 0.1)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearClassifier", "MultiLRLinear", "accuracy", "cosine_epoch_lr", "fit_multi_lr",
           "train_linear_on_features"]

INIT_STD = 0.01  # the reference initialises the probe with N(0, 0.01^2) weights and zero bias


class LinearClassifier(nn.Module):
    """``logits = W flatten(x) + b`` with ``W ~ N(0, 0.01^2)``, ``b = 0`` (the reference probe).

    The submodule is named ``linear`` like the reference's, so its state dicts load directly.

    >>> LinearClassifier(384, num_labels=10)(torch.randn(2, 384)).shape
    torch.Size([2, 10])
    """

    def __init__(self, dim: int, num_labels: int = 1000) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MultiLRLinear(nn.Module):
    """``H`` independent linear heads stored as one weight ``(H, C, D)`` and bias ``(H, C)``.

    ``forward(x)`` returns logits ``(H, B, C)``: ``logits[h] = flatten(x) W_h^T + b_h``, all heads in one
    matrix product. Every head starts from the same ``N(0, 0.01^2)`` draw so that, in a learning-rate
    sweep, the learning rate is the only difference between heads.

    >>> MultiLRLinear(384, num_labels=10, num_heads=3)(torch.randn(2, 384)).shape
    torch.Size([3, 2, 10])
    """

    def __init__(
        self, dim: int, num_labels: int = 1000, num_heads: int = 1, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.dim, self.num_labels, self.num_heads = dim, num_labels, num_heads
        shared_init = torch.randn(num_labels, dim, generator=generator) * INIT_STD
        self.weight = nn.Parameter(shared_init.expand(num_heads, -1, -1).clone())
        self.bias = nn.Parameter(torch.zeros(num_heads, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        heads, classes = self.num_heads, self.num_labels
        # (B, D) @ (D, H*C): one GEMM for all heads, then split the columns per head.
        logits = x @ self.weight.reshape(heads * classes, self.dim).T
        return (logits.view(-1, heads, classes) + self.bias).transpose(0, 1)

    def head(self, index: int) -> LinearClassifier:
        """Head ``index`` as a standalone :class:`LinearClassifier` (a copy), e.g. the best lr's."""
        classifier = LinearClassifier(self.dim, self.num_labels).to(self.weight.device)
        with torch.no_grad():
            classifier.linear.weight.copy_(self.weight[index])
            classifier.linear.bias.copy_(self.bias[index])
        return classifier


def cosine_epoch_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """``base_lr * (1 + cos(pi * epoch / epochs)) / 2``: CosineAnnealingLR(T_max=epochs, eta_min=0)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent of ``output`` logits ``(B, C)`` against integer ``target`` ``(B,)``.

    ``k`` larger than the number of classes counts as ``C`` (every sample is then correct).

    >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), topk=(1, 2))
    [50.0, 100.0]
    """
    if output.dim() != 2 or target.shape != (output.shape[0],):
        raise ValueError(
            "accuracy needs output (B, C) and target (B,), "
            f"got {tuple(output.shape)} and {tuple(target.shape)}"
        )
    counts = num_correct(output, target, topk)
    return [count * 100.0 / output.shape[0] for count in counts.tolist()]


def num_correct(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int]) -> torch.Tensor:
    """Correct counts ``(..., len(topk))`` for logits ``(..., B, C)``; leading dims are heads."""
    max_k = min(max(topk), output.shape[-1])
    ranked = output.topk(max_k, dim=-1).indices
    hit = ranked == target.view(-1, 1)
    return torch.stack([hit[..., : min(k, max_k)].any(dim=-1).sum(dim=-1) for k in topk], dim=-1)


def fit_multi_lr(
    model: MultiLRLinear,
    features: torch.Tensor,
    labels: torch.Tensor,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> MultiLRLinear:
    """Train every head of ``model`` on ``(features, labels)``, head ``h`` with learning rate ``lrs[h]``.

    Each epoch visits the samples in the order ``torch.randperm(N, generator=generator)`` (drawn on
    the CPU), in mini-batches of ``batch_size`` (the last one may be smaller, as the reference's
    loader). Per head this is exactly ``torch.optim.SGD(momentum, dampening=0, weight_decay)`` with a
    per-epoch cosine schedule (:func:`cosine_epoch_lr`) on the mean cross-entropy.
    """
    if len(lrs) != model.num_heads:
        raise ValueError(f"got {len(lrs)} learning rates for {model.num_heads} heads; pass one per head")
    device = model.weight.device
    params = [model.weight, model.bias]
    momentum_buffers = [torch.zeros_like(p) for p in params]
    model.train()
    for epoch in range(epochs):
        head_lrs = torch.tensor([cosine_epoch_lr(lr, epoch, epochs) for lr in lrs], device=device)
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for batch in order.split(batch_size):
            x, y = features[batch].to(device), labels[batch].to(device)
            logits = model(x)
            # Sum over heads of each head's mean loss: head h's gradient is its own mean-CE gradient.
            loss = F.cross_entropy(
                logits.reshape(-1, model.num_labels), y.repeat(model.num_heads), reduction="sum"
            ) / y.shape[0]
            grads = torch.autograd.grad(loss, params)
            sgd_step_per_head(params, grads, momentum_buffers, head_lrs, momentum, weight_decay)
    return model


@torch.no_grad()
def sgd_step_per_head(
    params: list[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    head_lrs: torch.Tensor,
    momentum: float,
    weight_decay: float,
) -> None:
    """torch.optim.SGD's update, ``buf = momentum * buf + (g + wd * p)``, ``p -= lr_h * buf``, with a
    learning rate per head (dim 0). torch's optimiser has one lr per parameter tensor, hence this."""
    for param, grad, buf in zip(params, grads, momentum_buffers, strict=True):
        if weight_decay:
            grad = grad.add(param, alpha=weight_decay)
        buf.mul_(momentum).add_(grad)  # the first step gives buf = grad, as torch does
        param.sub_(head_lrs.view(-1, *([1] * (param.dim() - 1))) * buf)


@torch.no_grad()
def _evaluate_heads(
    model: MultiLRLinear, features: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ``(top1 %, top5 %)`` as an ``(H, 2)`` tensor, and per-head mean cross-entropy ``(H,)``."""
    model.eval()
    device = model.weight.device
    correct = torch.zeros(model.num_heads, 2, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(model.num_heads, device=device)
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        correct += num_correct(logits, y, (1, 5))
        loss_sum += F.cross_entropy(
            logits.transpose(1, 2), y.expand(model.num_heads, -1), reduction="none"
        ).sum(dim=1)
    n = features.shape[0]
    return correct.double().cpu() * 100.0 / n, loss_sum.cpu() / n


def train_linear_on_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    num_labels: int,
    seed: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> dict:
    """Train one linear head per learning rate on cached features and evaluate each on the val set.

    ``lrs`` are used as given: scale them by ``global_batch / 256`` first, as the reference does.
    Heads are trained on the device of ``train_feats``. Returns::

        {"per_lr": {lr: {"top1": %, "top5": %, "loss": val mean CE}},   # top5 is top-min(5, C)
         "best_lr": lr, "best_top1": %, "best_top5": %,                 # highest top1, then lowest loss
         "model": the trained MultiLRLinear (head h <-> lrs[h]; .head(h) gives a LinearClassifier)}
    """
    lrs = _validate_lrs(lrs)
    train_feats, val_feats = train_feats.flatten(1), val_feats.flatten(1)
    _validate_split("train", train_feats, train_labels, num_labels)
    _validate_split("val", val_feats, val_labels, num_labels)
    if val_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(
            f"train features have dim {train_feats.shape[1]}, val features {val_feats.shape[1]}; "
            "extract both with the same model"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")

    generator = torch.Generator().manual_seed(seed)
    model = MultiLRLinear(train_feats.shape[1], num_labels, len(lrs), generator=generator)
    model = model.to(train_feats.device)
    train_labels = train_labels.to(torch.int64)
    fit_multi_lr(model, train_feats.float(), train_labels, lrs, epochs, batch_size, generator, momentum,
                 weight_decay)
    top_accuracies, losses = _evaluate_heads(model, val_feats.float(), val_labels.to(torch.int64), batch_size)

    per_lr = {
        lr: {"top1": top_accuracies[h, 0].item(), "top5": top_accuracies[h, 1].item(),
             "loss": losses[h].item()}
        for h, lr in enumerate(lrs)
    }
    best_lr = max(lrs, key=lambda lr: (per_lr[lr]["top1"], -per_lr[lr]["loss"]))
    return {
        "per_lr": per_lr,
        "best_lr": best_lr,
        "best_top1": per_lr[best_lr]["top1"],
        "best_top5": per_lr[best_lr]["top5"],
        "model": model,
    }


def _validate_lrs(lrs: Sequence[float]) -> list[float]:
    lrs = [float(lr) for lr in lrs]
    if not lrs:
        raise ValueError("lrs is empty; pass at least one learning rate, e.g. [1e-3, 1e-2, 1e-1]")
    if any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
        raise ValueError(f"learning rates must be finite and > 0, got {lrs}")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"learning rates must be distinct (they key the results), got {lrs}")
    return lrs


def _validate_split(name: str, features: torch.Tensor, labels: torch.Tensor, num_labels: int) -> None:
    if features.shape[0] == 0:
        raise ValueError(f"{name} features are empty")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"{name} labels must have shape ({features.shape[0]},) to match the features, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be an integer tensor, got {labels.dtype}")
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= num_labels:
        raise ValueError(
            f"{name} labels must lie in [0, {num_labels}), found [{low}, {high}]; pass the right num_labels"
        )
