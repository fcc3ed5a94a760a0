"""``python -m simpool.evaluation.run_segmentation`` / ``simpool-segmentation``: linear semantic segmentation on
frozen patch features.

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
schedule, batch-order generator; atomic, every epoch) makes a rerun of the same command resume (the same weights,
flags and data, or one line saying which differ); ``log.txt``
gets one JSON line per epoch; ``--save_predictions N`` draws the first N val images as image | truth | prediction
(VOC colours) in ``OUTPUT_DIR/predictions.png``. Under torchrun each rank embeds its shard of the images, every
rank trains the same heads on all cached train features (nothing to synchronise, as the linear probe's
``--cached_features``), and the val confusion matrices are summed over ranks.

Usage::

    python -m simpool.evaluation.run_segmentation --pretrained_weights runs/demo/checkpoint.pth \\
        --data_path fashion-on-photos:500 --image_size 56 --output_dir runs/demo/seg
    torchrun --nproc_per_node=4 -m simpool.evaluation.run_segmentation --pretrained_weights exports/vits \\
        --data_path /data/VOCdevkit/VOC2012 --image_size 448 --epochs 40 --output_dir runs/voc_seg
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from simpool.attention_maps import model_stride
from simpool.data.segmentation import build_segmentation_splits
from simpool.distributed import all_reduce_sum, is_main_process
from simpool.evaluation.common import add_data_flags, build_model, parse_flags, write_json
from simpool.evaluation.linear_probe import stopped_line
from simpool.evaluation.segmentation_probe import (
    SEGMENTATION_PROBE_CHECKPOINT,
    SegProbeState,
    all_background_confusion,
    cache_features,
    evaluate_heads,
    format_table,
    head_results,
    iou_from_confusion,
    save_predictions,
    train_epoch,
)
from simpool.run.config import (
    AT_LEAST_ONE,
    EPOCHS,
    LEARNING_RATE,
    MAX_LR,
    NON_NEGATIVE,
    SEED,
    ConfigError,
    FlagParser,
    Range,
    bad_input,
    check_decoupled_decay,
    check_ranges,
)
from simpool.run.flags import add_distributed_flags, add_model_flags, backbone_parameters, require_weights
from simpool.run.log import append_json_line
from simpool.run.output import OutputFolder
from simpool.run.process import driver, end_process, start_process
from simpool.run.resume_checks import check_same_run, weights_identity
from simpool.run.state import RunCheckpoint
from simpool.run.stop import RunEnd, StopControl, exit_code

log = logging.getLogger("simpool.evaluation.run_segmentation")  # not __name__: "__main__" under python -m

CHECKPOINT_FILE = "checkpoint.pth.tar"
LOG_FILE = "log.txt"
RESULTS_FILE = "segmentation.json"
DEFAULT_LRS = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
PREDICTIONS_FILE = "predictions.png"


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-segmentation", description="Linear segmentation probe on frozen patch features")
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
    check_ranges(args, {"epochs": EPOCHS, "val_freq": AT_LEAST_ONE, "save_predictions": NON_NEGATIVE,
                        "lrs": LEARNING_RATE, "weight_decay": Range(0, MAX_LR), "seed": SEED})
    if len(set(args.lrs)) != len(args.lrs):
        raise ConfigError(f"--lrs must be distinct, got {args.lrs}")
    check_decoupled_decay(max(args.lrs), args.weight_decay, "--lrs and --weight_decay")


def check_stride(model: torch.nn.Module, image_size: int) -> int:
    stride = model_stride(model)
    if image_size % stride:
        raise ConfigError(f"--image_size {image_size} is not a multiple of the model's stride {stride}: use "
                             f"{max(stride, round(image_size / stride) * stride)}")
    return stride


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, found before any training; 0 / 130 after a
    stop by SIGTERM / Ctrl-C, which keeps the checkpoint of the last finished epoch)."""
    try:
        args = parse_flags(get_args_parser(), argv)
        check_flags(args)
        train, val, classes = build_segmentation_splits(args.data_path, args.image_size)
    except ValueError as err:
        return bad_input(err)
    control = StopControl()  # before the work: a signal during set-up stops the run at its first step
    dist_info = start_process(args.dist_url)
    device = dist_info.device
    checkpoint = RunCheckpoint(args.output_dir, SEGMENTATION_PROBE_CHECKPOINT, name=CHECKPOINT_FILE)
    output_dir = checkpoint.folder
    try:
        OutputFolder(args.output_dir).check()
        backbone_parameters(args)  # the model's values, before its weights are read
        model, source = build_model(args, device)
        check_stride(model, args.image_size)
        with torch.no_grad():
            dim = model.patch_features(train[0][0][None].to(device)).shape[1]
        identity = {"lrs": list(args.lrs), "epochs": args.epochs, "weight_decay": args.weight_decay,
                    "feature_dim": dim, "num_classes": len(classes), "image_size": args.image_size,
                    "data_path": str(args.data_path), "seed": args.seed}
        _, saved = checkpoint.read()
        if saved is not None:  # the same weights too: the linear probe's rule (heads of other features would mix)
            check_same_run(saved, identity, source.as_dict(), checkpoint.path, "a probe of other features or flags")
    except ValueError as err:
        end_process()
        return bad_input(err)

    log.info("linear segmentation on %s (%s mode, gamma %s) from %s: %d-d patch features, %d classes, "
             "%d train / %d val images at %d px", source.arch, source.mode, source.gamma,
             source.weights or "random initialisation", dim, len(classes), len(train), len(val), args.image_size)
    checkpoint.prepare_folder()
    state = SegProbeState.new(dim, len(classes), args.lrs, args.epochs, args.seed, device, args.weight_decay)
    if saved is not None:
        state.load_state_dict(saved)
        log.info("resumed from %s at epoch %d", checkpoint.path, state.epoch)

    batch, workers = args.batch_size_per_gpu, args.num_workers
    features = model.patch_features
    val_feats, val_masks = cache_features(features, val, batch, workers, device, gather=False)
    if state.epoch < args.epochs:
        train_feats, train_masks = cache_features(features, train, batch, workers, device)
        for epoch in range(state.epoch, args.epochs):
            epoch_lrs = [group["lr"] for group in state.optimizer.param_groups]
            losses = train_epoch(state.heads, state.batches(train_feats, train_masks, batch), state.optimizer,
                                 control.asked_to_stop)
            if losses is None:  # a signal: the epoch in progress is dropped, the checkpoint of the last one kept
                log.info(stopped_line(control.stopped, control, state.epoch, checkpoint.path))
                end_process()
                return exit_code(RunEnd(stopped=control.stopped), dist_info.rank)
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
            checkpoint.write({**identity, "source": weights_identity(source.as_dict()), **state.state_dict()})
            if is_main_process():
                append_json_line(output_dir / LOG_FILE, stats)
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
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
