"""Linear probe on frozen features (DINO's ``eval_linear.py``): the command line of ``eval_linear.py``.

Protocol (the reference's): a linear layer ``y = W x + b`` (``W ~ N(0, 0.01^2)``, ``b = 0``) on the frozen
backbone's features, cross-entropy, ``torch.optim.SGD`` with momentum 0.9 and no weight decay, learning rate
``lr * global_batch / 256`` annealed per epoch by ``CosineAnnealingLR``: ``lr_e = lr * (1 + cos(pi * e / E)) / 2``.
Training images get RandomResizedCrop(``--image_size``) + horizontal flip; validation images are resized to
256/224 of it and centre-cropped. Top-1/top-5 on ``val/`` every ``--val_freq`` epochs; the best top-1 is reported.

Features: the backbone's output (the SimPool vector; the [CLS] token or average pool in official mode). For
official-mode ViTs, the [CLS] tokens of the last ``--n_last_blocks`` blocks, concatenated, plus the mean patch
token with ``--avgpool_patchtokens`` (DINO: 4 blocks for ViT-S, 1 block + avgpool for ViT-B).

Beyond the reference:

* ``--lrs 0.001 0.01 0.1`` trains one head per learning rate on the same batches (a ``MultiLRLinear``: one
  GEMM for every head, one SGD param group per head) and reports the best: one pass over the images instead
  of one run per lr;
* ``--cached_features`` embeds train/ and val/ once (evaluation transform, no augmentation) and trains the
  heads on the cached features with the same loop: minutes instead of hours, slightly lower accuracy than the
  augmented protocol.

Files in ``--output_dir``: ``checkpoint.pth.tar`` (heads, optimizer and scheduler state, written atomically
every epoch; a rerun with the same flags resumes from it exactly), ``log.txt`` (one JSON line per epoch) and, once
the last epoch is done, ``linear.json`` (the best top-1 over epochs per lr and overall, the data set sizes).
``--evaluate`` only evaluates the saved heads. The training itself is :mod:`simpool.evaluation.linear` and
:mod:`simpool.evaluation.linear_probe`.

Usage::

    torchrun --nproc_per_node=4 eval_linear.py --pretrained_weights runs/vits/checkpoint.pth \\
        --data_path /imagenet --output_dir runs/lin --epochs 100
    python -m simpool.evaluation.run_linear --pretrained_weights exports/vits --data_path fashion-mnist \\
        --cached_features True --lrs 0.001 0.01 0.1 --output_dir runs/lin_fast
"""

from __future__ import annotations

import argparse
import logging
import sys

from torch.nn.parallel import DistributedDataParallel

from simpool.evaluation.common import add_data_flags, build_model, labelled_splits, parse_flags, write_json
from simpool.evaluation.features import eval_transform
from simpool.evaluation.linear import evaluate
from simpool.evaluation.linear_probe import (
    CHECKPOINT_FILE,
    LINEAR_PROBE_CHECKPOINT,
    LOG_FILE,
    ProbeState,
    cached_batches,
    image_batches,
    log_results,
    log_summary,
    probe_features,
    resolve_num_labels,
    scaled_lrs,
    stopped_line,
    train_probe,
    train_transform,
)
from simpool.run.config import (
    AT_LEAST_ONE,
    EPOCHS,
    LEARNING_RATE,
    SEED,
    ConfigError,
    FlagParser,
    Range,
    bad_input,
    check_ranges,
    check_scaled_lr,
)
from simpool.run.flags import add_distributed_flags, add_model_flags, backbone_parameters, bool_flag, require_weights
from simpool.run.model_check import check_image_size
from simpool.run.output import OutputFolder
from simpool.run.process import driver, end_process, start_process
from simpool.run.resume_checks import check_same_run, weights_identity
from simpool.run.state import RunCheckpoint
from simpool.run.stop import RunEnd, StopControl, exit_code

log = logging.getLogger("simpool.evaluation.run_linear")  # not __name__: "__main__" under python -m
RESULTS_FILE = "linear.json"


def get_args_parser() -> FlagParser:
    parser = FlagParser("eval_linear.py", description="Linear probe on frozen features (DINO protocol)")
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
    args.lrs = list(args.lrs or [args.lr])
    check_ranges(args, {"epochs": EPOCHS, "val_freq": AT_LEAST_ONE, "n_last_blocks": AT_LEAST_ONE,
                        "num_labels": AT_LEAST_ONE, "lrs": LEARNING_RATE, "seed": SEED, "subset": Range(-1)})
    if len(set(args.lrs)) != len(args.lrs):
        raise ConfigError(f"learning rates must be distinct, got {args.lrs}")


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point of eval_linear.py; returns the exit code (2: bad input, found before any training; 0 / 130 after
    a stop by SIGTERM / Ctrl-C, which keeps the checkpoint of the last finished epoch)."""
    try:
        args = parse_flags(get_args_parser(), argv)
        check_linear_flags(args)
    except ValueError as err:
        return bad_input(err)
    control = StopControl()  # before the work: a signal during set-up stops the run at its first step
    dist_info = start_process(args.dist_url)
    device = dist_info.device
    checkpoint = RunCheckpoint(args.output_dir, LINEAR_PROBE_CHECKPOINT, name=CHECKPOINT_FILE)
    try:
        # The output folder and the model's values first (nothing read but flags and recorded args), then the
        # data (a DataError names the folders), then the model (a CheckpointError lists the misfit keys).
        OutputFolder(args.output_dir).check()
        backbone_parameters(args)
        check_scaled_lr(max(args.lrs), args.batch_size_per_gpu * dist_info.world_size, "--lrs")
        val_tf = eval_transform(args.image_size)
        # Cached features are embedded once, so they get the deterministic transform instead of augmentation.
        train_tf = val_tf if args.cached_features else train_transform(args.image_size)
        subset = args.subset if args.subset > 0 else None
        train, val, num_classes = labelled_splits(args, train_tf, val_tf, subset=subset)
        num_labels = resolve_num_labels(args.num_labels, num_classes)
        model, source = build_model(args, device)
        check_image_size(model, args.image_size)
        features, dim = probe_features(model, args.n_last_blocks, args.avgpool_patchtokens)
        _, saved = checkpoint.read()
        if args.evaluate:
            if saved is None:
                raise ConfigError(f"--evaluate: {checkpoint.path} not found; train the probe first (same "
                                  "--output_dir)")
            args.lrs, args.cached_features, args.epochs = saved["lrs"], saved["cached_features"], saved["epochs"]
        identity = {"lrs": list(args.lrs), "cached_features": bool(args.cached_features), "epochs": args.epochs,
                    "feature_dim": dim, "num_labels": num_labels}
        if saved is not None:
            check_same_run(saved, identity, source.as_dict(), checkpoint.path, "a probe of other features or flags")
    except ValueError as err:
        end_process()
        return bad_input(err)

    log.info("linear probe on %s (%s mode, gamma %s) from %s: %d-d features, %d labels, %d train / %d val images",
             source.arch, source.mode, source.gamma, source.weights or "random initialisation", dim, num_labels,
             len(train), len(val))
    checkpoint.prepare_folder()
    batch, workers = args.batch_size_per_gpu, args.num_workers
    lrs = scaled_lrs(args.lrs, batch * dist_info.world_size)
    state = ProbeState.new(dim, num_labels, lrs, args.epochs, args.seed, device)
    if saved is not None:
        state.load_state_dict(saved)
        log.info("%s %s at epoch %d", "loaded" if args.evaluate else "resumed from", checkpoint.path, state.epoch)

    if args.evaluate:
        results = evaluate(state.heads, image_batches(val, features, batch, workers, dist_info))
        log_results("evaluate", args.lrs, results, len(val))
    else:
        if state.epoch < args.epochs:
            if args.cached_features:  # every rank trains the same heads on all features: nothing to synchronise
                trained, log_extra = state.heads, {"cached_features": True}
                batches = cached_batches(train, val, features, batch, workers, dist_info, state.generator)
            else:
                trained, log_extra = state.heads, None
                if dist_info.world_size > 1:  # gradients averaged over ranks: every rank keeps identical heads
                    device_ids = [device.index] if device.type == "cuda" else None
                    trained = DistributedDataParallel(state.heads, device_ids=device_ids)
                batches = (image_batches(train, features, batch, workers, dist_info, seed=args.seed),
                           image_batches(val, features, batch, workers, dist_info))
            meta = {**identity, "source": weights_identity(source.as_dict())}
            stop = train_probe(state, trained, batches, args.epochs, args.val_freq, args.lrs, len(val), checkpoint,
                               meta, log_extra, control)
            if stop is not None:
                log.info(stopped_line(stop, control, state.epoch, checkpoint.path))
                end_process()
                return exit_code(RunEnd(stopped=stop), dist_info.rank)
        log_summary(args.lrs, state.best_top1)
        best = max(range(len(args.lrs)), key=lambda h: state.best_top1[h])
        write_json(checkpoint.folder / RESULTS_FILE, {
            "evaluator": "linear", **source.as_dict(), "data_path": args.data_path, "image_size": args.image_size,
            **identity, "n_last_blocks": args.n_last_blocks,
            "avgpool_patchtokens": args.avgpool_patchtokens, "num_train": len(train), "num_val": len(val),
            "best_top1": state.best_top1[best], "best_lr": args.lrs[best],
            "best_top1_per_lr": {str(lr): top1 for lr, top1 in zip(args.lrs, state.best_top1, strict=True)}})
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
