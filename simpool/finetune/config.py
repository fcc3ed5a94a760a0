"""Flags of ``finetune.py``: weights, data, timm augmentation / mixup, optimisation, run control; YAML configs.

The model flags are the evaluators' (:func:`simpool.run.flags.add_model_flags`: ``--pretrained_weights``,
``--checkpoint_key``, ``--random_init``, ``--arch/--mode/--gamma/--patch_size/--model_overrides``). Per-family
defaults live in ``configs/finetune_{vit,convnext,resnet}.yaml`` (``--config``; flags typed on the command line
win: :func:`simpool.run.config.parse_over_config`, as in ``train_dino.py``). Bad values raise
:class:`~simpool.run.config.ConfigError` here, before any data or model is touched.

Example:
    >>> args = parse_finetune_args(["--config", "configs/finetune_vit.yaml", "--pretrained_weights",
    ...                             "runs/demo/checkpoint.pth", "--data_path", "fashion-mnist"])
"""

from __future__ import annotations

import argparse
import re

from PIL import Image, ImageOps
from timm.optim import list_optimizers

from simpool.run.config import (
    AT_LEAST_ONE,
    EPOCHS,
    IMAGE_SIDE,
    LEARNING_RATE,
    MAX_LR,
    NON_NEGATIVE,
    SEED,
    UNIT_INTERVAL,
    WORKERS,
    ConfigError,
    FlagParser,
    Range,
    check_ranges,
    parse_over_config,
)
from simpool.run.flags import (
    add_data_source_flags,
    add_distributed_flags,
    add_model_flags,
    bool_flag,
    require_weights,
)
from simpool.run.precision import PRECISIONS

__all__ = ["build_parser", "parse_finetune_args"]


def build_parser() -> FlagParser:
    """The parser of finetune.py."""
    p = FlagParser("finetune.py", description="Supervised fine-tuning of a pretrained backbone with a linear head")
    p.add_argument("--config", type=str, default=None, help="YAML file of flags (configs/finetune_*.yaml)")
    add_model_flags(p)

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, type=str,
                   help="root with train/ and val/ class folders, fashion-mnist, a shard index.json "
                   "(simpool-pack) or a Hugging Face dataset (parquet / save_to_disk)")
    add_data_source_flags(g)  # --rescan, --image_column, --label_column
    g.add_argument("--input_size", default=224, type=int, help="training and evaluation crop side")
    g.add_argument("--crop_pct", default=0.875, type=float, help="evaluation: resize to input_size / crop_pct, crop")
    g.add_argument("--batch_size_per_gpu", default=64, type=int, help="images per process")
    g.add_argument("--num_workers", default=8, type=int, help="data loading workers per process")
    g.add_argument("--subset", default=-1, type=int, help="train on the first N images per class (-1: all)")
    g.add_argument("--val_subset", default=-1, type=int, help="evaluate on the first N val images per class")
    g.add_argument("--mean", default=(0.485, 0.456, 0.406), type=float, nargs=3, help="normalisation mean")
    g.add_argument("--std", default=(0.229, 0.224, 0.225), type=float, nargs=3, help="normalisation std")

    g = p.add_argument_group("augmentation (timm.data.create_transform)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1-mmax9", type=str,
                   help="timm auto-augment policy (DeiT's RandAugment 'rand-m9-mstd0.5-inc1', magnitudes clipped "
                        "at 9: see posterize_needs_mmax9); 'none' disables")
    g.add_argument("--scale", default=(0.08, 1.0), type=float, nargs=2, help="RandomResizedCrop scale")
    g.add_argument("--hflip", default=0.5, type=float, help="horizontal flip probability")
    g.add_argument("--color_jitter", default=0.4, type=float, help="colour jitter (timm ignores it with --aa)")
    g.add_argument("--interpolation", default="bicubic", type=str, help="resize interpolation")
    g.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    g.add_argument("--remode", default="pixel", type=str, help="random erasing mode")
    g.add_argument("--recount", default=1, type=int, help="random erasing count")

    g = p.add_argument_group("mixup / cutmix / label smoothing (timm.data.Mixup)")
    g.add_argument("--mixup", default=0.8, type=float, help="mixup alpha (0 disables)")
    g.add_argument("--cutmix", default=1.0, type=float, help="cutmix alpha (0 disables)")
    g.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixing a batch")
    g.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix when both are on")
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"], help="how to mix")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--bce_loss", default=False, type=bool_flag,
                   help="binary cross-entropy on the (mixed) targets, as ResNet strikes back")
    g.add_argument("--bce_target_thresh", default=None, type=float, help="BCE: binarise targets above this")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", default=100, type=int, help="training epochs")
    g.add_argument("--opt", default="adamw", type=str, help="timm optimizer name (adamw, lamb, sgd, ...)")
    g.add_argument("--lr", default=1e-3, type=float, help="peak lr for a global batch of 256 (scaled linearly)")
    g.add_argument("--min_lr", default=1e-6, type=float, help="final lr of the cosine")
    g.add_argument("--warmup_lr", default=1e-6, type=float, help="lr at the start of the warm-up")
    g.add_argument("--warmup_epochs", default=5, type=int, help="linear warm-up epochs")
    g.add_argument("--weight_decay", default=0.05, type=float, help="weight decay (not on 1-d parameters)")
    g.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    g.add_argument("--layer_decay", default=1.0, type=float,
                   help="layer-wise lr decay: block i of L gets lr * layer_decay^(L - i) (1.0: off)")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate of the backbone")
    g.add_argument("--clip_grad", default=0.0, type=float, help="clip the global gradient norm (0: off)")
    g.add_argument("--model_ema_decay", default=0.0, type=float,
                   help="keep an EMA of the weights (timm ModelEmaV3) with this decay and evaluate it (0: off)")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="autocast precision; default bf16 on CUDA, fp32 on CPU")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=".", type=str, help="checkpoint.pth, checkpoint_best.pth, log.txt")
    g.add_argument("--seed", default=0, type=int, help="random seed")
    g.add_argument("--log_every", default=20, type=int, help="progress line every N iterations")
    g.add_argument("--exit_after_iterations", default=0, type=int,
                   help="save and exit (code 0) after this many iterations; relaunch to continue")
    g.add_argument("--wandb_project", default=None, type=str, help="log to Weights & Biases under this project")
    g.add_argument("--wandb_name", default=None, type=str, help="W&B run name")
    add_distributed_flags(p)
    return p


def parse_finetune_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line over an optional ``--config`` file, then :func:`validate`."""
    args = parse_over_config(build_parser(), argv)
    validate(args)
    return args


def posterize_needs_mmax9(policy: str) -> bool:
    """True when ``policy`` would crash this Pillow: timm's increasing posterize keeps 4 - int(4 m / 10) bits,
    0 bits at magnitude 10, which Pillow 13 refuses (``ValueError: bits must be between ... 1 and 8``) where older
    versions returned a black image; ``mstd0.5`` reaches 10 in ~2% of draws at m9. ``-mmax9`` clips magnitudes at 9."""
    if "inc1" not in policy:
        return False
    mmax = re.search(r"-mmax(\d+)", policy)
    if mmax and int(mmax.group(1)) < 10:
        return False
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return True
    return False


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup_prob > 0 and (args.mixup > 0 or args.cutmix > 0)


# The upper bounds where values break memory or numerics are the run layer's (simpool.run.config).
RANGES = {
    **dict.fromkeys(["batch_size_per_gpu", "log_every", "recount"], AT_LEAST_ONE),
    **dict.fromkeys(["warmup_epochs", "exit_after_iterations", "clip_grad", "mixup", "cutmix"], NON_NEGATIVE),
    **dict.fromkeys(["min_lr", "warmup_lr", "weight_decay"], Range(0, MAX_LR)),
    "epochs": EPOCHS, "lr": LEARNING_RATE, "input_size": IMAGE_SIDE, "num_workers": WORKERS, "seed": SEED,
    "layer_decay": Range(0, 1, low_open=True), "model_ema_decay": Range(0, 1, high_open=True),
    "crop_pct": Range(0, 1, low_open=True), "mixup_prob": UNIT_INTERVAL, "mixup_switch_prob": UNIT_INTERVAL,
    "hflip": UNIT_INTERVAL, "reprob": UNIT_INTERVAL, "drop_path": Range(0, 1, high_open=True),
    "smoothing": Range(0, 1, high_open=True), "momentum": Range(0, 1, high_open=True), "scale": Range(0, 1),
    "mean": Range(0, 1), "std": Range(0, 1e3, low_open=True), "color_jitter": Range(0, 1e3),
    "bce_target_thresh": UNIT_INTERVAL,
}


def validate(args: argparse.Namespace) -> None:
    """Stop on values that cannot work, naming the flag."""
    require_weights(args)
    if isinstance(args.model_overrides, dict):  # a YAML mapping; the command line gives a list of one-key dicts
        args.model_overrides = [args.model_overrides]
    if not args.data_path:
        raise ConfigError("--data_path is required: a root holding train/ and val/ class folders, or fashion-mnist")
    check_ranges(args, RANGES)
    if args.scale[0] > args.scale[1] or args.scale[1] == 0:
        raise ConfigError(f"--scale must be two numbers 0 <= min <= max <= 1 with max > 0, got {args.scale}")
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup_epochs ({args.warmup_epochs}) exceeds --epochs ({args.epochs})")
    if args.opt.lower() not in list_optimizers():
        raise ConfigError(f"--opt {args.opt!r} is not a timm optimizer: use e.g. adamw, lamb, sgd "
                          "(timm.optim.list_optimizers())")
    if posterize_needs_mmax9(str(args.aa)):
        raise ConfigError(f"--aa {args.aa}: with this Pillow, timm's posterize crashes at magnitude 10; "
                          f"append -mmax9 (e.g. --aa {args.aa}-mmax9)")
    if mixup_active(args) and args.batch_size_per_gpu % 2:  # timm's Mixup asserts it in every --mixup_mode
        raise ConfigError(f"mixup / cutmix mix a batch with its reverse and need an even "
                          f"--batch_size_per_gpu, got {args.batch_size_per_gpu}")
