"""Frozen-feature extraction shared by eval_knn.py, eval_linear.py and the trainer's online k-NN, and the checks
on the (features, labels) pairs it returns (``check_labels``, ``num_classes_of``).

Each rank embeds one contiguous shard of the dataset; the shards are gathered in rank order, so the rows come
back in dataset order on every rank (as the reference did with its index bookkeeping, without the bookkeeping).

Example:
    >>> features, labels = extract_features(backbone, dataset, batch_size=256, device=device)
    >>> features.shape        # (len(dataset), embed_dim), L2-normalised, float32 on the CPU
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # (0.485, 0.456, 0.406)
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD  # (0.229, 0.224, 0.225)
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from simpool.checkpoint import atomic_save
from simpool.data import collate_skip_bad
from simpool.data.sampler import ignore_preemption_signals
from simpool.distributed import all_gather_varlen, get_rank, get_world_size


def eval_transform(crop_size: int = 224, resize_size: int | None = None) -> transforms.Compose:
    """Resize (256/224 of the crop) + center crop + normalise, the evaluation transform of DINO."""
    resize_size = resize_size or round(crop_size * 256 / 224)
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def feature_fn(backbone: nn.Module, n_last_blocks: int = 1, avgpool_patchtokens: bool = False) -> Callable:
    """images -> (B, D): the pooled output, or for official ViTs DINO's linear-probe features.

    With ``n_last_blocks > 1`` or ``avgpool_patchtokens`` (official ViTs only), the [CLS] tokens of the last
    ``n`` blocks are concatenated, optionally with the mean patch token of the last block.
    """
    if n_last_blocks == 1 and not avgpool_patchtokens:
        return backbone
    if getattr(backbone, "mode", None) != "official" or not hasattr(backbone, "last_block_outputs"):
        raise ValueError("--n_last_blocks > 1 / --avgpool_patchtokens apply to official-mode ViTs only; "
                         "SimPool models use their pooled feature")

    def features(images: torch.Tensor) -> torch.Tensor:
        outputs = backbone.last_block_outputs(images, n_last_blocks)
        parts = [out[:, 0] for out in outputs]
        if avgpool_patchtokens:
            parts.append(outputs[-1][:, backbone.num_prefix_tokens:].mean(dim=1))
        return torch.cat(parts, dim=-1)

    return features


def evenly_spaced_subset(dataset: Dataset, max_items: int) -> Dataset:
    """At most ``max_items`` items spread over the whole dataset (every class stays represented)."""
    if not max_items or len(dataset) <= max_items:
        return dataset
    step = len(dataset) / max_items
    return Subset(dataset, [int(i * step) for i in range(max_items)])


def _rank_shard(dataset: Dataset) -> Dataset:
    world, rank = get_world_size(), get_rank()
    per_rank = -(-len(dataset) // world)
    return Subset(dataset, range(rank * per_rank, min(len(dataset), (rank + 1) * per_rank)))


@torch.no_grad()
def extract_features(
    model: nn.Module | Callable,
    dataset: Dataset,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    normalize: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ``dataset`` (labels included) on every rank's shard and gather the rows in dataset order.

    Returns float32 features (N, D) -- L2-normalised when ``normalize`` -- and int64 labels (N,), on the CPU.
    Unreadable images are dropped (with their labels) by ``collate_skip_bad``.
    """
    device = torch.device(device)
    if isinstance(model, nn.Module):
        was_training = model.training
        model.eval()
    loader = DataLoader(_rank_shard(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_skip_bad,
                        worker_init_fn=ignore_preemption_signals if num_workers else None)
    feats, labels = [], []
    for images, targets, _ in loader:
        if images is None:
            continue
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(images.to(device, non_blocking=True))
        feats.append(out.float())
        labels.append(torch.as_tensor(targets).to(device))
    if isinstance(model, nn.Module) and was_training:
        model.train()
    local_feats = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    features = torch.cat(all_gather_varlen(local_feats)).cpu()
    all_labels = torch.cat(all_gather_varlen(local_labels)).cpu().long()
    if normalize:
        features = F.normalize(features, dim=1, p=2)
    return features, all_labels


def save_features(path: str | Path, features: torch.Tensor, labels: torch.Tensor) -> None:
    """``--dump_features``: write (features, labels) as plain tensors, whole or not at all (``atomic_save``)."""
    atomic_save({"features": features, "labels": labels}, path)


def load_features(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["features"], data["labels"]


def num_classes_of(*labelled: Dataset | torch.Tensor) -> int:
    """The number of classes over data sets and / or label tensors: a data set's ``classes`` count (an
    ImageFolder's folders, empty ones included) where it has one, else the largest label + 1.

    Example:
        >>> num_classes_of(torch.tensor([0, 2]), torch.tensor([1, 3]))
        4
    """
    counts = []
    for item in labelled:
        classes = getattr(item, "classes", None)
        if classes:
            counts.append(len(classes))
        else:
            labels = item if isinstance(item, torch.Tensor) else torch.as_tensor(item.targets)
            counts.append(int(labels.max()) + 1)
    return max(counts)


def check_labels(name: str, labels: torch.Tensor, num_rows: int, num_classes: int,
                 count_flag: str = "num_classes") -> None:
    """Raise a ValueError unless ``labels`` are ``num_rows`` integers in ``[0, num_classes)``, one per feature row;
    the message names the split (``name``) and the argument to fix (``count_flag``)."""
    if labels.shape != (num_rows,):
        raise ValueError(
            f"{name} labels must have shape ({num_rows},) to match the features, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be an integer tensor, got {labels.dtype}")
    if not num_rows:
        return
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} labels must lie in [0, {num_classes}), found [{low}, {high}]; pass the right {count_flag}"
        )
