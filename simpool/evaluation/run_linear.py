"""Linear probe on frozen features (DINO's ``eval_linear.py``), behind ``eval_linear.py``.

Protocol (the reference's): a linear layer ``y = W x + b`` (``W ~ N(0, 0.01^2)``, ``b = 0``) on the frozen
backbone's features, cross-entropy, SGD with momentum 0.9 and no weight decay, learning rate
``lr * global_batch / 256`` annealed per epoch as ``lr_e = lr * (1 + cos(pi * e / E)) / 2``. Training images
get RandomResizedCrop(``--image_size``) + horizontal flip; validation images are resized to 256/224 of it and
centre-cropped. Top-1/top-5 on ``val/`` every ``--val_freq`` epochs; the best top-1 is reported.

Features: the backbone's output (the SimPool vector; the [CLS] token or average pool in official mode). For
official-mode ViTs, the [CLS] tokens of the last ``--n_last_blocks`` blocks, concatenated, plus the mean patch
token with ``--avgpool_patchtokens`` (DINO: 4 blocks for ViT-S, 1 block + avgpool for ViT-B).

Beyond the reference:

* ``--lrs 0.001 0.01 0.1`` trains one head per learning rate on the same batches (a ``MultiLRLinear``: one
  GEMM for every head, each head stepped with its own lr) and reports the best: one pass over the images
  instead of one run per lr;
* ``--cached_features`` embeds train/ and val/ once (evaluation transform, no augmentation) and trains the
  heads on the cached features (``train_linear_on_features``): minutes instead of hours, slightly lower
  accuracy than the augmented protocol.

Files in ``--output_dir``: ``checkpoint.pth.tar`` (written atomically every epoch; a rerun resumes from it),
``log.txt`` (one JSON line per epoch). ``--evaluate`` only evaluates the saved heads.

Usage::

    torchrun --nproc_per_node=4 eval_linear.py --pretrained_weights runs/vits/checkpoint.pth \\
        --data_path /imagenet --output_dir runs/lin --epochs 100
    python -m simpool.evaluation.run_linear --pretrained_weights exports/vits --data_path fashion-mnist \\
        --cached_features True --lrs 0.001 0.01 0.1 --output_dir runs/lin_fast
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

from simpool.checkpoint import CheckpointError, atomic_save, safe_load
from simpool.data import collate_skip_bad
from simpool.distributed import DistInfo, all_reduce_sum, barrier, cleanup, is_main_process
from simpool.evaluation.common import (
    EvalSetupError,
    add_data_flags,
    add_distributed_flags,
    add_model_flags,
    build_model,
    labelled_splits,
    parse_flags,
    require_weights,
    run_guarded,
    setup_distributed,
)
from simpool.evaluation.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    extract_features,
    feature_fn,
)
from simpool.evaluation.linear import (
    MultiLRLinear,
    cosine_epoch_lr,
    num_correct,
    sgd_step_per_head,
    train_linear_on_features,
)
from simpool.flags import bool_flag

CHECKPOINT_FILE = "checkpoint.pth.tar"
LOG_FILE = "log.txt"
PROBE_FORMAT = "simpool-linear-probe"
MOMENTUM = 0.9  # the reference's SGD; weight decay is 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear probe on frozen features (DINO protocol)")
    add_model_flags(parser)
    add_data_flags(parser, batch_size=128)
    group = parser.add_argument_group("features")
    group.add_argument(
        "--n_last_blocks",
        default=4,
        type=int,
        help="official-mode ViTs: concatenate the [CLS] tokens of this many last blocks "
        "(DINO: 4 for ViT-S, 1 for ViT-B); other models use their pooled output",
    )
    group.add_argument(
        "--avgpool_patchtokens",
        default=False,
        type=bool_flag,
        help="official-mode ViTs: also concatenate the mean patch token (DINO: True for ViT-B)",
    )
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", default=100, type=int, help="training epochs")
    group.add_argument(
        "--lr", default=0.001, type=float, help="learning rate for a global batch of 256 (scaled linearly)"
    )
    group.add_argument(
        "--lrs",
        default=None,
        type=float,
        nargs="+",
        help="several learning rates, one head each, trained together; overrides --lr",
    )
    group.add_argument(
        "--num_labels",
        default=None,
        type=int,
        help="classifier outputs (default: the number of classes in train/)",
    )
    group.add_argument(
        "--subset", default=-1, type=int, help="train on the first N images per class (-1: all)"
    )
    group.add_argument(
        "--cached_features",
        default=False,
        type=bool_flag,
        help="embed the images once (no augmentation) and train on the cached features",
    )
    group.add_argument("--val_freq", default=1, type=int, help="evaluate every N epochs (and after the last)")
    group.add_argument("--seed", default=0, type=int, help="seed of the head initialisation and data order")
    group.add_argument("--output_dir", default=".", help=f"{CHECKPOINT_FILE} and {LOG_FILE} go here")
    group.add_argument(
        "--evaluate",
        action="store_true",
        help=f"only evaluate the heads saved in --output_dir/{CHECKPOINT_FILE}",
    )
    add_distributed_flags(parser)
    return parser


def check_linear_flags(args: argparse.Namespace) -> None:
    require_weights(args)
    for name in ("epochs", "val_freq", "n_last_blocks"):
        if getattr(args, name) < 1:
            raise EvalSetupError(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.lrs = list(args.lrs or [args.lr])
    if any(not lr > 0 for lr in args.lrs) or len(set(args.lrs)) != len(args.lrs):
        raise EvalSetupError(f"learning rates must be positive and distinct, got {args.lrs}")
    if args.num_labels is not None and args.num_labels < 1:
        raise EvalSetupError(f"--num_labels must be >= 1, got {args.num_labels}")


def train_transform(image_size: int) -> transforms.Compose:
    """The reference's training augmentation: RandomResizedCrop + horizontal flip (crop side scaled)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# set-up: data, model, features, heads
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """Everything the training loop needs, built (and checked) before the first image is embedded."""

    train: Dataset
    val: Dataset
    features: Callable[[torch.Tensor], torch.Tensor]  # images -> (B, feature_dim), frozen
    feature_dim: int
    num_labels: int
    source: dict[str, Any]


def probe_features(model: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool) -> tuple[Callable, int]:
    """(images -> features, their dim): DINO's multi-block [CLS] features for official ViTs, else output."""
    official_vit = getattr(model, "mode", None) == "official" and hasattr(model, "last_block_outputs")
    blocks = n_last_blocks if official_vit else 1  # SimPool and convnet models use their pooled feature
    if official_vit and blocks > len(model.blocks):
        raise EvalSetupError(f"--n_last_blocks {blocks} exceeds the model's {len(model.blocks)} blocks")
    features = feature_fn(model, blocks, avgpool_patchtokens)  # raises for avgpool on non-official models
    return features, model.embed_dim * (blocks + int(avgpool_patchtokens))


def resolve_num_labels(requested: int | None, num_classes: int) -> int:
    if requested is None:
        return num_classes
    if requested < num_classes:
        raise EvalSetupError(
            f"--num_labels {requested} is below the {num_classes} classes of the data: raise it "
            "or leave it out (it defaults to the number of classes)"
        )
    return requested


def prepare(args: argparse.Namespace, dist_info: DistInfo) -> Probe:
    """Data (a DataError names the folders), then the model (a CheckpointError lists the keys that misfit)."""
    val_tf = eval_transform(args.image_size)
    # Cached features are embedded once, so they get the deterministic transform instead of augmentation.
    train_tf = val_tf if args.cached_features else train_transform(args.image_size)
    subset = args.subset if args.subset > 0 else None
    train, val, num_classes = labelled_splits(args, train_tf, val_tf, subset=subset)
    num_labels = resolve_num_labels(args.num_labels, num_classes)
    model, source = build_model(args, dist_info.device)
    features, dim = probe_features(model, args.n_last_blocks, args.avgpool_patchtokens)
    if is_main_process():
        print(
            f"linear probe on {source.arch} ({source.mode} mode, gamma {source.gamma}) from "
            f"{source.weights or 'random initialisation'}: {dim}-d features, {num_labels} labels, "
            f"{len(train)} train / {len(val)} val images"
        )
    return Probe(train, val, features, dim, num_labels, source.as_dict())


def scaled_lrs(lrs: Sequence[float], global_batch: int) -> list[float]:
    """The reference's linear scaling rule: ``lr * global_batch / 256``."""
    return [lr * global_batch / 256.0 for lr in lrs]


# ----------------------------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------------------------
def new_state(probe: Probe, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    heads = MultiLRLinear(probe.feature_dim, probe.num_labels, len(args.lrs), generator=generator).to(device)
    return {
        "heads": heads,
        "momentum": [torch.zeros_like(p) for p in (heads.weight, heads.bias)],
        "epoch": 0,
        "best_top1": [0.0] * len(args.lrs),
        "last": None,
    }


def checkpoint_payload(state: dict[str, Any], args: argparse.Namespace, probe: Probe) -> dict[str, Any]:
    return {
        "format": PROBE_FORMAT,
        "epoch": state["epoch"],
        "lrs": list(args.lrs),
        "cached_features": bool(args.cached_features),
        "feature_dim": probe.feature_dim,
        "num_labels": probe.num_labels,
        "heads": state["heads"].state_dict(),
        "momentum": state["momentum"],
        "best_top1": state["best_top1"],
        "last": state["last"],
        "source": probe.source,
    }


def read_probe_checkpoint(path: Path) -> dict[str, Any]:
    saved = safe_load(path)
    if not isinstance(saved, dict) or saved.get("format") != PROBE_FORMAT:
        raise CheckpointError(
            f"{path} is not a linear-probe checkpoint of this tool: use another --output_dir"
        )
    return saved


def restore_state(
    saved: dict[str, Any], args: argparse.Namespace, probe: Probe, state: dict[str, Any]
) -> None:
    """Resume ``state`` from a saved probe, refusing one trained with other settings (it would mix runs)."""
    differences = [
        f"{name} {saved.get(key)} (now {now})"
        for name, key, now in (
            ("--lrs", "lrs", list(args.lrs)),
            ("--cached_features", "cached_features", bool(args.cached_features)),
            ("feature dim", "feature_dim", probe.feature_dim),
            ("--num_labels", "num_labels", probe.num_labels),
        )
        if saved.get(key) != now
    ]
    if differences:
        raise CheckpointError(
            f"{Path(args.output_dir) / CHECKPOINT_FILE} belongs to a different probe: "
            f"{'; '.join(differences)}. Use another --output_dir, or the same flags to resume it"
        )
    state["heads"].load_state_dict(saved["heads"])
    if saved["momentum"] is not None:
        for buffer, value in zip(state["momentum"], saved["momentum"], strict=True):
            buffer.copy_(value)
    state.update(epoch=int(saved["epoch"]), best_top1=list(saved["best_top1"]), last=saved["last"])


def append_log(output_dir: Path, stats: dict[str, Any]) -> None:
    if is_main_process():
        with (output_dir / LOG_FILE).open("a") as f:
            f.write(json.dumps(stats) + "\n")


# ----------------------------------------------------------------------------------------------------------
# training and evaluation on images
# ----------------------------------------------------------------------------------------------------------
def train_one_epoch(
    trained: nn.Module,
    heads: MultiLRLinear,
    features: Callable,
    loader: DataLoader,
    head_lrs: torch.Tensor,
    momentum: list[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """One pass over ``loader``; ``trained`` is ``heads`` or its DDP wrapper. Returns each head's mean CE."""
    params = [heads.weight, heads.bias]
    loss_sum, batches = torch.zeros(heads.num_heads, device=device), 0
    heads.train()
    for images, targets, _ in loader:
        if images is None:  # every image of the batch was unreadable
            continue
        targets = targets.to(device, non_blocking=True)
        with torch.no_grad():
            x = features(images.to(device, non_blocking=True))
        logits = trained(x)  # (heads, B, C)
        per_head = F.cross_entropy(
            logits.transpose(1, 2), targets.expand(heads.num_heads, -1), reduction="none"
        ).mean(dim=1)
        for p in params:
            p.grad = None
        # Heads share no weights, so the gradient of the sum is each head's own mean-CE gradient.
        per_head.sum().backward()
        sgd_step_per_head(params, [p.grad for p in params], momentum, head_lrs, MOMENTUM, 0.0)
        loss_sum += per_head.detach()
        batches += 1
    return all_reduce_sum(loss_sum) / all_reduce_sum(torch.tensor(float(max(batches, 1)), device=device))


@torch.no_grad()
def evaluate(
    heads: MultiLRLinear, features: Callable, dataset: Dataset, args: argparse.Namespace, dist_info: DistInfo
) -> list[dict[str, float]]:
    """Per head ``{"top1", "top5", "loss"}`` on ``dataset``; each rank takes every world_size-th image."""
    device = dist_info.device
    shard = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = DataLoader(
        shard,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_skip_bad,
    )
    heads.eval()
    totals = torch.zeros(
        heads.num_heads, 3, device=device, dtype=torch.float64
    )  # top1, top5 counts, loss sum
    count = torch.zeros((), device=device, dtype=torch.float64)
    for images, targets, _ in loader:
        if images is None:
            continue
        targets = targets.to(device)
        logits = heads(features(images.to(device)))
        totals[:, :2] += num_correct(logits, targets, (1, 5))
        totals[:, 2] += F.cross_entropy(
            logits.transpose(1, 2), targets.expand(heads.num_heads, -1), reduction="none"
        ).sum(dim=1)
        count += targets.shape[0]
    totals, count = all_reduce_sum(totals), all_reduce_sum(count).clamp(min=1)
    return [
        {
            "top1": (row[0] * 100 / count).item(),
            "top5": (row[1] * 100 / count).item(),
            "loss": (row[2] / count).item(),
        }
        for row in totals
    ]


def train_on_images(
    args: argparse.Namespace, probe: Probe, state: dict[str, Any], dist_info: DistInfo
) -> None:
    """The reference protocol: augmented images through the frozen backbone, once per epoch for all heads."""
    device, output_dir = dist_info.device, Path(args.output_dir)
    heads: MultiLRLinear = state["heads"]
    trained = heads
    if dist_info.world_size > 1:  # gradients averaged over ranks, so every rank keeps identical heads
        device_ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(heads, device_ids=device_ids)
    sampler = DistributedSampler(
        probe.train, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=args.seed
    )
    loader = DataLoader(
        probe.train,
        batch_size=args.batch_size_per_gpu,
        sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_skip_bad,
    )
    base_lrs = scaled_lrs(args.lrs, args.batch_size_per_gpu * dist_info.world_size)
    for epoch in range(state["epoch"], args.epochs):
        sampler.set_epoch(epoch)
        epoch_lrs = [cosine_epoch_lr(lr, epoch, args.epochs) for lr in base_lrs]
        losses = train_one_epoch(
            trained,
            heads,
            probe.features,
            loader,
            torch.tensor(epoch_lrs, device=device),
            state["momentum"],
            device,
        )
        stats: dict[str, Any] = {"epoch": epoch, "train_loss": losses.tolist(), "train_lr": epoch_lrs}
        if (epoch + 1) % args.val_freq == 0 or epoch == args.epochs - 1:
            results = evaluate(heads, probe.features, probe.val, args, dist_info)
            state["best_top1"] = [max(b, r["top1"]) for b, r in zip(state["best_top1"], results, strict=True)]
            state["last"] = results
            stats.update(test_results(args.lrs, results))
            print_results(f"epoch {epoch}", args.lrs, results, len(probe.val))
        state["epoch"] = epoch + 1
        if is_main_process():
            atomic_save(checkpoint_payload(state, args, probe), output_dir / CHECKPOINT_FILE)
        append_log(output_dir, stats)
        barrier()


# ----------------------------------------------------------------------------------------------------------
# training on cached features
# ----------------------------------------------------------------------------------------------------------
def train_on_cached_features(
    args: argparse.Namespace, probe: Probe, state: dict[str, Any], dist_info: DistInfo
) -> None:
    """Embed train/ and val/ once, then train every head on the cached features (each rank the same)."""
    device = dist_info.device
    batch = args.batch_size_per_gpu * dist_info.world_size
    embedded = [
        extract_features(
            probe.features, dataset, args.batch_size_per_gpu, args.num_workers, device, normalize=False
        )  # the probe sees the raw features, as in the image protocol
        for dataset in (probe.train, probe.val)
    ]
    (train_x, train_y), (val_x, val_y) = [(x.to(device), y.to(device)) for x, y in embedded]
    out = train_linear_on_features(
        train_x,
        train_y,
        val_x,
        val_y,
        scaled_lrs(args.lrs, batch),
        args.epochs,
        batch,
        probe.num_labels,
        seed=args.seed,
        momentum=MOMENTUM,
    )
    results = [
        {k: out["per_lr"][lr][k] for k in ("top1", "top5", "loss")} for lr in scaled_lrs(args.lrs, batch)
    ]
    state["heads"].load_state_dict(out["model"].state_dict())
    state.update(epoch=args.epochs, best_top1=[r["top1"] for r in results], last=results, momentum=None)
    print_results("cached features", args.lrs, results, len(val_x))
    if is_main_process():
        atomic_save(checkpoint_payload(state, args, probe), Path(args.output_dir) / CHECKPOINT_FILE)
    append_log(
        Path(args.output_dir),
        {"epoch": args.epochs - 1, "cached_features": True, **test_results(args.lrs, results)},
    )


# ----------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------
def test_results(lrs: Sequence[float], results: list[dict[str, float]]) -> dict[str, Any]:
    """Log fields: the reference's test_acc1/test_acc5/test_loss (of the best head), and every head's."""
    best = max(range(len(lrs)), key=lambda h: (results[h]["top1"], -results[h]["loss"]))
    stats = {
        "test_acc1": results[best]["top1"],
        "test_acc5": results[best]["top5"],
        "test_loss": results[best]["loss"],
    }
    if len(lrs) > 1:
        stats["best_lr"] = lrs[best]
        stats["per_lr"] = {str(lr): r for lr, r in zip(lrs, results, strict=True)}
    return stats


def print_results(when: str, lrs: Sequence[float], results: list[dict[str, float]], num_images: int) -> None:
    if not is_main_process():
        return
    for lr, r in zip(lrs, results, strict=True):
        print(
            f"{when}: lr {lr:g}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f} "
            f"on {num_images} val images"
        )


def print_summary(lrs: Sequence[float], best_top1: list[float]) -> dict[str, float]:
    best = max(range(len(lrs)), key=lambda h: best_top1[h])
    if is_main_process():
        print(f"linear probe done: best top-1 {best_top1[best]:.2f}% (lr {lrs[best]:g})")
    return {"best_top1": best_top1[best], "best_lr": lrs[best]}


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------
def setup(args: argparse.Namespace, dist_info: DistInfo) -> tuple[Probe, dict[str, Any]]:
    """Everything that can fail on bad input, in the order that fails fastest: data, weights, checkpoint."""
    probe = prepare(args, dist_info)
    checkpoint = Path(args.output_dir) / CHECKPOINT_FILE
    saved = read_probe_checkpoint(checkpoint) if checkpoint.is_file() else None
    if args.evaluate:
        if saved is None:
            raise EvalSetupError(
                f"--evaluate: {checkpoint} not found; train the probe first (same --output_dir)"
            )
        args.lrs, args.cached_features = (
            list(saved["lrs"]),
            bool(saved["cached_features"]),
        )  # evaluate as saved
    state = new_state(probe, args, dist_info.device)
    if saved is not None:
        restore_state(saved, args, probe, state)
        if is_main_process():
            verb = "loaded" if args.evaluate else "resumed from"
            print(f"{verb} {checkpoint} at epoch {state['epoch']}")
    return probe, state


def main(argv: list[str] | None = None) -> int:
    """Entry point of eval_linear.py; returns the exit code (2: bad input, found before any training)."""
    args, error = run_guarded(lambda: parse_flags(get_args_parser(), argv))
    if error is None:
        _, error = run_guarded(lambda: check_linear_flags(args))
    if error is not None:
        return error
    dist_info = setup_distributed(args)
    prepared, error = run_guarded(lambda: setup(args, dist_info))
    if error is not None:
        cleanup()
        return error
    probe, state = prepared
    if is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.evaluate:
        results = evaluate(state["heads"], probe.features, probe.val, args, dist_info)
        print_results("evaluate", args.lrs, results, len(probe.val))
    elif args.cached_features:
        if state["epoch"] < args.epochs:
            train_on_cached_features(args, probe, state, dist_info)
        print_summary(args.lrs, state["best_top1"])
    else:
        train_on_images(args, probe, state, dist_info)
        print_summary(args.lrs, state["best_top1"])
    barrier()
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
