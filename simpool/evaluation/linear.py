"""Linear probing on frozen features: one linear head per learning rate, all trained in a single pass.

The DINO linear protocol (facebookresearch/dino ``eval_linear.py``) trains ``y = W x + b`` on frozen
features with cross-entropy and ``torch.optim.SGD`` (momentum 0.9, weight decay 0); the learning rate,
scaled by ``global_batch / 256``, follows ``CosineAnnealingLR(T_max=E, eta_min=0)`` stepped once per epoch,

    ``lr_e = lr * (1 + cos(pi * e / E)) / 2``   for epochs ``e = 0 .. E-1``.

The best learning rate is data dependent, so :class:`MultiLRLinear` holds ``H`` heads (one ``nn.Linear``
each) trained on the same mini-batches, as dinov2's ``eval/linear.py`` does: one GEMM computes every head's
logits, the summed loss gives each head exactly its own gradient (the heads share no parameters), and
:func:`probe_optimizer` puts each head in its own SGD param group with its own learning rate.

One loop serves both feature sources. :func:`fit` (epochs), :func:`train_one_epoch` and :func:`evaluate`
take batches of ``(features, labels)``: from :class:`Embedded` (a frozen feature function over an image
loader, the reference protocol) or from :func:`feature_batches` (a ``TensorDataset`` of cached features,
``--cached_features``); :func:`train_linear_on_features` is the whole run on cached features.

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
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler, TensorDataset

from simpool.distributed import all_reduce_sum, get_rank, get_world_size
from simpool.evaluation.features import check_labels
from simpool.run.metrics import num_correct

__all__ = ["Embedded", "MultiLRLinear", "Permutation", "accuracy", "evaluate", "feature_batches", "fit",
           "probe_optimizer", "train_linear_on_features", "train_one_epoch"]

INIT_STD = 0.01  # the reference initialises the probe with N(0, 0.01^2) weights and zero bias
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (features (B, D), labels (B,)) on the heads' device


class MultiLRLinear(nn.Module):
    """``H`` independent linear heads ``heads[h]: x -> flatten(x) W_h^T + b_h`` (``nn.Linear`` each).

    ``forward(x)`` returns logits ``(H, B, C)`` from one matrix product over the stacked ``(H*C, D)``
    weights. Every head starts from the same ``N(0, 0.01^2)`` draw and zero bias so that, in a
    learning-rate sweep, the learning rate is the only difference between heads.

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
        # skip_init: nn.Linear's own init would draw from the global RNG, which the image augmentations use.
        self.heads = nn.ModuleList(skip_init(nn.Linear, dim, num_labels) for _ in range(num_heads))
        with torch.no_grad():
            for head in self.heads:
                head.weight.copy_(shared_init)
                head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, classes = self.num_heads, self.num_labels
        weight = torch.stack([head.weight for head in self.heads]).reshape(heads * classes, self.dim)
        bias = torch.stack([head.bias for head in self.heads])
        # (B, D) @ (D, H*C): one GEMM for all heads, then split the columns per head.
        logits = x.flatten(1) @ weight.T
        return (logits.view(-1, heads, classes) + bias).transpose(0, 1)


def probe_optimizer(
    model: MultiLRLinear, lrs: Sequence[float], epochs: int, momentum: float = 0.9, weight_decay: float = 0.0
) -> tuple[torch.optim.SGD, CosineAnnealingLR]:
    """SGD with one param group per head (head ``h`` at ``lrs[h]``), and the per-epoch cosine over ``epochs``.

    Step the scheduler once after each epoch: epoch ``e`` then trains at ``lrs[h] * (1 + cos(pi e / E)) / 2``.

    >>> optimizer, scheduler = probe_optimizer(MultiLRLinear(8, 2, num_heads=2), [0.1, 1.0], epochs=2)
    >>> scheduler.step(); [round(group["lr"], 6) for group in optimizer.param_groups]
    [0.05, 0.5]
    """
    if len(lrs) != model.num_heads:
        raise ValueError(f"got {len(lrs)} learning rates for {model.num_heads} heads; pass one per head")
    groups = [{"params": head.parameters(), "lr": lr} for head, lr in zip(model.heads, lrs, strict=True)]
    optimizer = torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    return optimizer, CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)


class Embedded:
    """Batches ``(features(images), labels)`` on ``device`` from a loader of ``(images, labels, paths)``.

    Re-iterable (one pass over ``loader`` per ``iter``); the frozen ``features`` run without autograd, and
    a batch whose images were all unreadable (``collate_skip_bad`` gives ``None``) is skipped.
    """

    def __init__(self, loader: DataLoader, features: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device) -> None:
        self.loader, self.features, self.device = loader, features, device

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a ``DistributedSampler`` for ``epoch`` (a sampler without epochs is left alone)."""
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets, _ in self.loader:
            if images is None:
                continue
            with torch.no_grad():
                x = self.features(images.to(self.device, non_blocking=True))
            yield x, targets.to(self.device, non_blocking=True)


class Permutation(Sampler[int]):
    """Each pass visits ``0 .. n-1`` in the order ``torch.randperm(n, generator=generator)``.

    Not ``RandomSampler``: it draws a second, unused permutation at the end of every pass, so from the
    second epoch on its order would differ from the one randperm per epoch of the previous trainer.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def feature_batches(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> DataLoader:
    """Mini-batches of cached ``(features, labels)``: in order, or each pass in the order
    ``torch.randperm(N, generator=generator)`` when a generator is given; the last batch may be smaller."""
    dataset = TensorDataset(features, labels)
    order = SequentialSampler(dataset) if generator is None else Permutation(len(dataset), generator)
    # batch_size=None with a BatchSampler: each batch is one tensor indexing, not B rows collated one by one.
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """One SGD step per batch on the sum over heads of each head's mean cross-entropy.

    ``model`` is a :class:`MultiLRLinear` or its DDP wrapper. The heads share no weights, so the gradient of
    the sum is each head's own mean-CE gradient. Returns each head's mean batch loss ``(H,)``, over ranks; None
    when ``stop()`` (asked before every step, on every rank: it may be collective) said to abandon the epoch.
    """
    device = optimizer.param_groups[0]["params"][0].device
    loss_sum, steps = torch.zeros(len(optimizer.param_groups), device=device), 0
    model.train()
    for x, y in batches:
        if stop is not None and stop():
            return None
        logits = model(x)  # (H, B, C)
        per_head = F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1), reduction="none")
        per_head = per_head.mean(dim=1)
        optimizer.zero_grad(set_to_none=True)
        per_head.sum().backward()
        optimizer.step()
        loss_sum += per_head.detach()
        steps += 1
    return all_reduce_sum(loss_sum) / all_reduce_sum(torch.tensor(float(max(steps, 1)), device=device))


@torch.no_grad()
def evaluate(model: MultiLRLinear, batches: Batches) -> list[dict[str, float]]:
    """Per head ``{"top1", "top5", "loss"}`` (%, %, mean CE; top5 is top-min(5, C)) over ``batches``.

    Under a process group, each rank passes its own shard: counts and loss sums are summed over ranks.
    """
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(model.num_heads, 3, device=device, dtype=torch.float64)  # top1, top5 counts, loss
    count = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in batches:
        logits = model(x)
        totals[:, :2] += num_correct(logits, y, (1, 5))
        totals[:, 2] += F.cross_entropy(
            logits.transpose(1, 2), y.expand(model.num_heads, -1), reduction="none"
        ).sum(dim=1)
        count += y.shape[0]
    totals, count = all_reduce_sum(totals), all_reduce_sum(count).clamp(min=1)
    return [{"top1": (row[0] * 100 / count).item(), "top5": (row[1] * 100 / count).item(),
             "loss": (row[2] / count).item()} for row in totals]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: CosineAnnealingLR,
    train_batches: Batches,
    val_batches: Batches,
    epochs: int,
    start_epoch: int = 0,
    val_freq: int = 1,
    stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, torch.Tensor, list[float], list[dict[str, float]] | None]]:
    """Train epochs ``start_epoch .. epochs-1``; after each, yield ``(epoch, train losses (H,), the epoch's
    lrs, val results)``. Val results (as :func:`evaluate`) come every ``val_freq`` epochs and after the
    last, else ``None``. ``model`` may be a DDP wrapper; the heads evaluated are its ``module``. When ``stop()``
    says so (see :func:`train_one_epoch`) the epoch in progress is abandoned and nothing more is yielded."""
    heads = getattr(model, "module", model)
    for epoch in range(start_epoch, epochs):
        if hasattr(train_batches, "set_epoch"):
            train_batches.set_epoch(epoch)
        lrs = [group["lr"] for group in optimizer.param_groups]
        losses = train_one_epoch(model, train_batches, optimizer, stop)
        if losses is None:
            return
        scheduler.step()
        due = (epoch + 1) % val_freq == 0 or epoch == epochs - 1
        yield epoch, losses, lrs, evaluate(heads, val_batches) if due else None


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

    ``lrs`` are used as given: scale them by ``global_batch / 256`` first, as the reference does. Heads
    start from ``torch.Generator().manual_seed(seed)``, which then draws each epoch's sample order. They
    train on the device of ``train_feats``; under a process group every rank trains the same heads on all
    of ``train_feats`` and evaluates its shard of the val set. Returns::

        {"per_lr": {lr: {"top1": %, "top5": %, "loss": val mean CE}},   # top5 is top-min(5, C)
         "best_lr": lr, "best_top1": %, "best_top5": %,                 # highest top1, then lowest loss
         "model": the trained MultiLRLinear (heads[h] <-> lrs[h])}
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
    optimizer, scheduler = probe_optimizer(model, lrs, epochs, momentum, weight_decay)
    train = feature_batches(train_feats.float(), train_labels.to(torch.int64), batch_size, generator)
    rank, world = get_rank(), get_world_size()
    val = feature_batches(val_feats[rank::world].float(), val_labels[rank::world].to(torch.int64), batch_size)
    *_, (_, _, _, results) = fit(model, optimizer, scheduler, train, val, epochs, val_freq=epochs)  # last epoch

    per_lr = dict(zip(lrs, results, strict=True))
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
    check_labels(name, labels, features.shape[0], num_labels, count_flag="num_labels")
