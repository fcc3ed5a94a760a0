"""Linear semantic segmentation on frozen patch features: ``python -m simpool.evaluation.segmentation``.

The probe (:mod:`simpool.evaluation.segmentation_probe`): a frozen backbone's dense features -- the last block's
patch tokens after the final LayerNorm for ViTs (SimPool and official mode alike; the [CLS] token is left
out), the last feature map for convnets -- cached once per image; per patch, BatchNorm + a linear layer
(a 1x1 convolution); logits upsampled bilinearly to the mask; cross-entropy with void (255) ignored; one head
per ``--lrs`` value, all trained on the same batches (SGD, momentum 0.9, per-epoch cosine), the best on val
mIoU reported. Learning rates are used as given (no batch scaling: the loss is a mean over pixels).

Data (``--data_path``, :mod:`simpool.data.segmentation`): a VOC-style folder (``JPEGImages/``,
``SegmentationClass/`` palette PNGs, ``ImageSets/Segmentation/{train,val}.txt``) or ``fashion-on-photos:N``
(N train + N val images rendered on the fly, background + 10 Fashion-MNIST classes). Images are resized to
``--image_size`` squared, which must be a multiple of the model's stride (ViT patch, convnet 32).

Output: mIoU, pixel accuracy and per-class IoU (fractions in [0, 1]; NaN/null for a class absent from both
truth and predictions) of every head, printed and written to ``OUTPUT_DIR/segmentation.json``, together with
the score of the constant all-background prediction. ``OUTPUT_DIR/checkpoint.pth.tar`` (heads, optimizer,
schedule, batch-order generator; atomic, every epoch) makes a rerun of the same command resume; ``log.txt``
gets one JSON line per epoch; ``--save_predictions N`` draws the first N val images as image | truth | prediction
(VOC colours) in ``OUTPUT_DIR/predictions.png``. Under torchrun each rank embeds its shard of the images, every
rank trains the same heads on all cached train features (nothing to synchronise, as the linear probe's
``--cached_features``), and the val confusion matrices are summed over ranks.

Usage::

    python -m simpool.evaluation.segmentation --pretrained_weights runs/demo/checkpoint.pth \\
        --data_path fashion-on-photos:500 --image_size 56 --output_dir runs/demo/seg
    torchrun --nproc_per_node=4 -m simpool.evaluation.segmentation --pretrained_weights exports/vits \\
        --data_path /data/VOCdevkit/VOC2012 --image_size 448 --epochs 40 --output_dir runs/voc_seg
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from simpool.attention_maps import model_stride
from simpool.checkpoint import CheckpointError, atomic_save, safe_load
from simpool.data.fashion_on_photos import voc_palette
from simpool.data.segmentation import build_segmentation_splits
from simpool.distributed import all_reduce_sum, barrier, cleanup, is_main_process
from simpool.evaluation.common import (
    EvalSetupError,
    add_data_flags,
    add_distributed_flags,
    add_model_flags,
    build_model,
    parse_flags,
    require_weights,
    setup_distributed,
    write_json,
)
from simpool.evaluation.linear_probe import check_same_probe
from simpool.evaluation.segmentation_probe import (
    SegProbeState,
    all_background_confusion,
    cache_features,
    evaluate_heads,
    iou_from_confusion,
    train_epoch,
)
from simpool.flags import bad_input

log = logging.getLogger("simpool.evaluation.segmentation")  # not __name__: "__main__" under python -m

CHECKPOINT_FILE = "checkpoint.pth.tar"
LOG_FILE = "log.txt"
RESULTS_FILE = "segmentation.json"
SEG_PROBE_FORMAT = "simpool-segmentation-probe-1"
DEFAULT_LRS = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
PREDICTIONS_FILE = "predictions.png"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear segmentation probe on frozen patch features",
                                     description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    add_data_flags(parser, batch_size=16)
    parser.set_defaults(num_workers=2)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", default=20, type=int, help="passes over the cached train features")
    group.add_argument("--lrs", default=DEFAULT_LRS, type=float, nargs="+",
                       help="learning rates, one head each, trained together (used as given)")
    group.add_argument("--weight_decay", default=0.0, type=float, help="SGD weight decay of the heads")
    group.add_argument("--val_freq", default=5, type=int, help="evaluate every N epochs (and after the last)")
    group.add_argument("--seed", default=0, type=int,
                       help="seed of the head initialisation and batch order (and of --random_init weights)")
    group.add_argument("--output_dir", default=".", help=f"{RESULTS_FILE}, {CHECKPOINT_FILE} and {LOG_FILE} go here")
    group.add_argument("--save_predictions", default=0, type=int,
                       help=f"draw the first N val images as image | truth | prediction (best lr) in "
                       f"{PREDICTIONS_FILE}")
    add_distributed_flags(parser)
    return parser


def check_flags(args: argparse.Namespace) -> None:
    require_weights(args)
    for name in ("epochs", "val_freq"):
        if getattr(args, name) < 1:
            raise EvalSetupError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.save_predictions < 0:
        raise EvalSetupError(f"--save_predictions must be >= 0, got {args.save_predictions}")
    if any(not (math.isfinite(lr) and lr > 0) for lr in args.lrs) or len(set(args.lrs)) != len(args.lrs):
        raise EvalSetupError(f"--lrs must be positive and distinct, got {args.lrs}")
    if args.weight_decay < 0:
        raise EvalSetupError(f"--weight_decay must be >= 0, got {args.weight_decay}")


def check_stride(model: torch.nn.Module, image_size: int) -> int:
    stride = model_stride(model)
    if image_size % stride:
        raise EvalSetupError(f"--image_size {image_size} is not a multiple of the model's stride {stride}: use "
                             f"{max(stride, round(image_size / stride) * stride)}")
    return stride


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    saved = safe_load(path)
    if not isinstance(saved, dict) or saved.get("format") != SEG_PROBE_FORMAT:
        raise CheckpointError(f"{path} is not a segmentation-probe checkpoint of this version: use another "
                              "--output_dir")
    return saved


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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, found before any training)."""
    try:
        args = parse_flags(get_args_parser(), argv)
        check_flags(args)
        train, val, classes = build_segmentation_splits(args.data_path, args.image_size)
    except ValueError as err:
        return bad_input(err)
    dist_info = setup_distributed(args)
    device, output_dir = dist_info.device, Path(args.output_dir)
    checkpoint = output_dir / CHECKPOINT_FILE
    try:
        model, source = build_model(args, device)
        check_stride(model, args.image_size)
        with torch.no_grad():
            dim = model.patch_features(train[0][0][None].to(device)).shape[1]
        identity = {"lrs": list(args.lrs), "epochs": args.epochs, "weight_decay": args.weight_decay,
                    "feature_dim": dim, "num_classes": len(classes), "image_size": args.image_size,
                    "data_path": str(args.data_path), "seed": args.seed}
        saved = read_checkpoint(checkpoint)
        if saved is not None:
            check_same_probe(saved, identity, checkpoint)
    except ValueError as err:
        cleanup()
        return bad_input(err)

    log.info("linear segmentation on %s (%s mode, gamma %s) from %s: %d-d patch features, %d classes, "
             "%d train / %d val images at %d px", source.arch, source.mode, source.gamma,
             source.weights or "random initialisation", dim, len(classes), len(train), len(val), args.image_size)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    state = SegProbeState.new(dim, len(classes), args.lrs, args.epochs, args.seed, device, args.weight_decay)
    if saved is not None:
        state.load_state_dict(saved)
        log.info("resumed from %s at epoch %d", checkpoint, state.epoch)

    batch, workers = args.batch_size_per_gpu, args.num_workers
    features = model.patch_features
    val_feats, val_masks = cache_features(features, val, batch, workers, device, gather=False)
    if state.epoch < args.epochs:
        train_feats, train_masks = cache_features(features, train, batch, workers, device)
        for epoch in range(state.epoch, args.epochs):
            epoch_lrs = [group["lr"] for group in state.optimizer.param_groups]
            losses = train_epoch(state.heads, state.batches(train_feats, train_masks, batch), state.optimizer)
            state.scheduler.step()
            stats: dict[str, Any] = {"epoch": epoch, "train_loss": losses.tolist(), "train_lr": epoch_lrs}
            if (epoch + 1) % args.val_freq == 0 or epoch == args.epochs - 1:
                confusion = evaluate_heads(state.heads, val_feats, val_masks, batch)
                state.confusion = confusion.tolist()
                results = head_results(args.lrs, confusion, classes)
                stats.update(val_miou=results["miou"], best_lr=results["best_lr"],
                             per_lr_miou={lr: r["miou"] for lr, r in results["per_lr"].items()})
                log.info("epoch %d: val mIoU %.4f (lr %g)", epoch, results["miou"], results["best_lr"])
            state.epoch = epoch + 1
            state.history.append(stats)
            if is_main_process():
                atomic_save({"format": SEG_PROBE_FORMAT, **identity, "source": source.as_dict(),
                             **state.state_dict()}, checkpoint)
                with (output_dir / LOG_FILE).open("a") as f:
                    f.write(json.dumps(stats) + "\n")
            barrier()
    confusion = torch.tensor(state.confusion)
    results = head_results(args.lrs, confusion, classes)
    baseline_confusion = all_background_confusion(val_masks.long(), len(classes))
    baseline_confusion = all_reduce_sum(baseline_confusion.to(device))
    baseline = iou_from_confusion(baseline_confusion.cpu())
    log.info(format_table(results, baseline))
    write_json(output_dir / RESULTS_FILE, {
        **source.as_dict(), "data_path": str(args.data_path), "image_size": args.image_size,
        "features": "last feature map" if model.is_convnet else "last block's patch tokens after the final LayerNorm",
        "feature_dim": dim, "classes": classes, "num_train": len(train), "num_val": len(val), "epochs": args.epochs,
        **results,
        "all_background": {"miou": baseline["miou"], "pixel_accuracy": baseline["pixel_accuracy"]},
        "confusion_best_lr": confusion[args.lrs.index(results["best_lr"])].tolist(),
    })
    if args.save_predictions and is_main_process():
        best = args.lrs.index(results["best_lr"])
        path = save_predictions(output_dir / PREDICTIONS_FILE, state.heads, best, val, val_feats,
                                min(args.save_predictions, val_feats.shape[0]))
        log.info("predictions of the first %d val images: %s", min(args.save_predictions, val_feats.shape[0]), path)
    barrier()
    cleanup()
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
