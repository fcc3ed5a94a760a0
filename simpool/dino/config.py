"""Command-line flags of ``train_dino.py``: the reference ``main_dino.py`` flags, a YAML config, and validation.

Every flag of the SimPool fork's ``main_dino.py`` keeps its name and meaning (``True``/``False`` strings for
booleans, ``--gamma None`` for no gamma). Defaults are the fork's, except where noted in the help:

* ``--gamma`` defaults to the architecture's paper value (1.25 for ViTs, 2.0 for convnets); the fork used 2.0
  for everything and built its ViT teacher with the default whatever ``--gamma`` said.
* ``--precision`` (new) picks fp32/fp16/bf16; by default bf16 on CUDA and fp32 on CPU. ``--use_fp16 True``
  means fp16 and ``--use_fp16 False`` means fp32, as in the reference.

``--config file.yaml`` loads flags from a file (the fork's ``args.yaml`` loads as it is); flags given on the
command line override it. Bad values stop the run here, before any model or data loader is built.
"""

from __future__ import annotations

import argparse
import difflib
import math
from typing import Any

from simpool.dino.attention_log import validate as validate_attention_flags
from simpool.models import ARCHS, accepted_keywords, arch_family, is_known_arch
from simpool.run.config import (
    AT_LEAST_ONE,
    EPOCHS,
    IMAGE_SIDE,
    LEARNING_RATE,
    MAX_LR,
    NON_NEGATIVE,
    SEED,
    TEMPERATURE,
    UNIT_INTERVAL,
    WORKERS,
    ConfigError,
    FlagParser,
    Range,
    check_ranges,
    parse_over_config,
)
from simpool.run.flags import (
    AUTO_GAMMA,
    add_data_source_flags,
    add_distributed_flags,
    bool_flag,
    float_or_none,
    key_value,
)
from simpool.run.precision import PRECISIONS


def build_parser() -> FlagParser:
    """The parser of train_dino.py: the fork's ``main_dino.py`` flags and ours."""
    p = FlagParser("train_dino.py", description="DINO + SimPool pretraining")
    p.add_argument("--config", type=str, default=None, help="YAML file of flags; explicit flags override it")

    g = p.add_argument_group("model")
    g.add_argument("--arch",
        default="resnet50",
        type=str,
        help="vit_tiny/small/base, resnet18/34/50/101, convnext_tiny/small/base, or any timm name",
    )
    g.add_argument("--mode",
        default="official",
        choices=["official", "simpool"],
        help="simpool: SimPool pooling; official: DINO's [CLS] token / average pooling",
    )
    g.add_argument("--gamma",
        default=AUTO_GAMMA,
        type=float_or_none,
        help="SimPool exponent; 'None' for no gamma; default: 1.25 for ViTs, 2.0 for convnets",
    )
    g.add_argument("--patch_size", default=16, type=int, help="ViT patch size")
    g.add_argument("--out_dim", default=60000, type=int, help="DINO head output dimension")
    g.add_argument("--norm_last_layer", default=True, type=bool_flag, help="weight-normalise the last head layer")
    g.add_argument("--head_hidden_dim", default=2048, type=int, help="DINO head MLP width")
    g.add_argument("--head_bottleneck_dim", default=256, type=int, help="DINO head bottleneck before prototypes")
    g.add_argument("--head_nlayers", default=3, type=int, help="DINO head MLP layers")
    g.add_argument("--momentum_teacher", default=0.996, type=float, help="base teacher EMA momentum (cosine to 1)")
    g.add_argument("--use_bn_in_head", default=True, type=bool_flag, help="BatchNorm in the projection head")
    g.add_argument("--drop_path_rate", default=0.1, type=float, help="stochastic depth rate")
    g.add_argument("--model_overrides",
        default={},
        type=key_value,
        nargs="*",
        help="timm keywords for the backbone, e.g. depth=4 embed_dim=96 num_heads=3",
    )
    g.add_argument("--pretrained_weights", default=None, type=str,
        help="start from these weights (checkpoint, backbone-only file or export folder); a checkpoint "
             "in output_dir still wins (resume)")
    g.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
        help="which network of a full --pretrained_weights checkpoint both student and teacher start from")
    g.add_argument("--pos_embed_resampling", default=None, choices=["exact", "reference"],
        help="ViT position-embedding rule (default exact; set to reference by reference-format --pretrained_weights)")

    g = p.add_argument_group("temperatures")
    g.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="initial teacher temperature")
    g.add_argument("--teacher_temp", default=0.07, type=float, help="teacher temperature after warm-up")
    g.add_argument("--warmup_teacher_temp_epochs", default=50, type=int, help="teacher temperature warm-up epochs")
    g.add_argument("--center_momentum", default=0.9, type=float,
                   help="EMA momentum of the teacher centre (1: no centring)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--use_fp16", default=None, type=bool_flag, help="True: fp16 with a GradScaler; False: fp32")
    g.add_argument("--precision",
        default=None,
        choices=PRECISIONS,
        help="numeric precision; default bf16 on CUDA, fp32 on CPU (overrides --use_fp16)",
    )
    g.add_argument("--compile",
        default=None,
        type=bool_flag,
        help="torch.compile student and teacher (default: on for CUDA, off on CPU)",
    )
    g.add_argument("--weight_decay", default=1e-6, type=float, help="initial weight decay")
    g.add_argument("--weight_decay_end", default=1e-6, type=float, help="final weight decay (cosine)")
    g.add_argument("--clip_grad", default=0.0, type=float, help="per-parameter gradient norm clip; 0 disables")
    g.add_argument("--batch_size_per_gpu", default=64, type=int, help="images per process")
    g.add_argument("--epochs", default=100, type=int, help="training epochs")
    g.add_argument("--freeze_last_layer", default=1, type=int, help="epochs with the head's last layer frozen")
    g.add_argument("--lr", default=0.3, type=float, help="peak lr for a global batch of 256 (scaled linearly)")
    g.add_argument("--warmup_epochs", default=10, type=int, help="linear lr warm-up epochs")
    g.add_argument("--min_lr", default=0.0048, type=float, help="final lr (cosine)")
    g.add_argument("--optimizer", default="lars", choices=["adamw", "sgd", "lars"], help="optimizer")
    g.add_argument("--max_skipped_steps",
        default=10,
        type=int,
        help="stop after this many consecutive steps with a non-finite loss",
    )
    g.add_argument("--grad_checkpointing", default=False, type=bool_flag,
        help="recompute the backbone's activations in backward (timm's set_grad_checkpointing): less memory")
    g.add_argument("--accum_steps", default=1, type=int,
        help="micro-batches per optimizer step: the exact update of a batch accum_steps times larger")

    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crops_scale", default=(0.14, 1.0), type=float, nargs="+", help="global crop scale")
    g.add_argument("--local_crops_number", default=6, type=int, help="number of local crops")
    g.add_argument("--local_crops_scale", default=(0.05, 0.14), type=float, nargs="+", help="local crop scale")
    g.add_argument("--global_crops_size", default=224, type=int, help="global crop side in pixels")
    g.add_argument("--local_crops_size", default=96, type=int, help="local crop side in pixels")
    g.add_argument("--gpu_augment",
        default=None,
        type=bool_flag,
        help="multi-crop augmentation on the GPU (default: on for CUDA); CPU workers only decode",
    )

    g = p.add_argument_group("data, output, evaluation")
    g.add_argument("--data_path",
        default=None,
        type=str,
        help="dataset root holding train/ (and val/), an ImageFolder, a .txt file list, fashion-mnist, a shard "
        "index.json (simpool-pack), shards-{000000..000009}.tar, or a Hugging Face dataset (parquet/save_to_disk)",
    )
    g.add_argument("--subset", default=-1, type=int, help="keep the first N images per class (-1: all)")
    add_data_source_flags(g)  # --rescan, --image_column, --label_column
    g.add_argument("--output_dir", default=".", type=str, help="checkpoints, log.txt and args.yaml go here")
    g.add_argument("--saveckp_freq", default=20, type=int, help="keep checkpointNNNN.pth every N epochs (0: never)")
    g.add_argument("--save_every_steps", default=0, type=int, help="also save checkpoint.pth every N iterations")
    g.add_argument("--exit_after_iterations", default=0, type=int,
                   help="save and exit (code 0) once this many iterations are done; relaunch to continue")
    g.add_argument("--resume_from", default=None, type=str,
        help="resume from this checkpoint when output_dir/checkpoint.pth is missing or unreadable")
    g.add_argument("--seed", default=0, type=int, help="random seed")
    g.add_argument("--num_workers", default=10, type=int, help="data loading workers per process")
    g.add_argument("--eval_every", default=5, type=int, help="online k-NN every N epochs (0: only at the end)")
    g.add_argument("--nb_knn", default=[10, 20, 100, 200], type=int, nargs="+", help="k values for k-NN")
    g.add_argument("--temperature", default=0.07, type=float, help="k-NN vote temperature")
    g.add_argument("--knn_max_images", default=0, type=int,
        help="online k-NN on at most this many train/val images each (0: all)",
    )
    g.add_argument("--knn_baselines",
        default=False,
        type=bool_flag,
        help="before training, also k-NN the untrained network and raw pixels (for comparison)",
    )
    g.add_argument("--log_every", default=10, type=int, help="console/log line every N iterations")
    g.add_argument("--attention_every", default=0, type=int,
        help="every N epochs (and after the last) draw the teacher's attention maps into "
        "output_dir/attention/epochNNNN.png and W&B (0: off)")
    g.add_argument("--attention_images", default=None, type=str,
        help="folder of images for --attention_every (its first 8, sorted; default: the first training images)")
    g.add_argument("--stop_on_collapse", default=False, type=bool_flag,
        help="save and exit with code 1 when the collapse alarm fires (simpool/dino/collapse.py)")
    g.add_argument("--wandb_project", default=None, type=str, help="log to Weights & Biases under this project")
    g.add_argument("--wandb_name", default=None, type=str, help="W&B run name")

    add_distributed_flags(p)
    p.add_argument("--backend", default=None, type=str, help="nccl or gloo (default: nccl on CUDA, gloo on CPU)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line over the values of an optional ``--config`` file (``parse_over_config``), then
    validate."""
    args = parse_over_config(build_parser(), argv)
    if isinstance(args.model_overrides, list):  # nargs="*" gives a list of one-key dicts
        args.model_overrides = {k: v for item in args.model_overrides for k, v in item.items()}
    validate_args(args)
    return args


def _check_scale(name: str, scale: Any) -> tuple[float, float]:
    values = tuple(float(s) for s in scale) if isinstance(scale, list | tuple) else ()
    if len(values) != 2 or not (0 < values[0] <= values[1] <= 1):
        raise ConfigError(f"--{name} must be two numbers 0 < min <= max <= 1, got {scale}")
    return values


# Ranges of the numeric flags (checked after parsing, for the command line and YAML alike); the upper bounds where
# values break memory or numerics are the run layer's (simpool.run.config: EPOCHS, LEARNING_RATE, TEMPERATURE...).
RANGES = {
    **dict.fromkeys(["batch_size_per_gpu", "out_dim", "patch_size", "head_hidden_dim", "head_bottleneck_dim",
                     "head_nlayers", "log_every", "accum_steps", "nb_knn"], AT_LEAST_ONE),
    **dict.fromkeys(["global_crops_size", "local_crops_size"], IMAGE_SIDE),
    **dict.fromkeys(["local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                     "saveckp_freq", "save_every_steps", "exit_after_iterations", "eval_every", "max_skipped_steps",
                     "clip_grad", "knn_max_images", "attention_every"], NON_NEGATIVE),
    **dict.fromkeys(["weight_decay", "weight_decay_end"], Range(0, MAX_LR)),
    "epochs": EPOCHS, "lr": LEARNING_RATE, "min_lr": Range(0, MAX_LR), "num_workers": WORKERS, "seed": SEED,
    **dict.fromkeys(["teacher_temp", "warmup_teacher_temp", "temperature"], TEMPERATURE),
    "center_momentum": UNIT_INTERVAL, "momentum_teacher": UNIT_INTERVAL,
    "drop_path_rate": Range(0, 1, high_open=True),
}


def validate_args(args: argparse.Namespace) -> None:
    """Stop on values that cannot work, naming the flag; fill derived values (scales as tuples)."""
    if not is_known_arch(args.arch):
        raise ConfigError(f"--arch {args.arch!r} is unknown: use one of {', '.join(ARCHS)} or a timm model name")
    check_ranges(args, RANGES)
    if args.warmup_teacher_temp_epochs > args.epochs:
        raise ConfigError(f"--warmup_teacher_temp_epochs ({args.warmup_teacher_temp_epochs}) exceeds --epochs")
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup_epochs ({args.warmup_epochs}) exceeds --epochs ({args.epochs})")
    args.global_crops_scale = _check_scale("global_crops_scale", args.global_crops_scale)
    args.local_crops_scale = _check_scale("local_crops_scale", args.local_crops_scale)
    if args.gamma not in (None, AUTO_GAMMA) and not (math.isfinite(args.gamma) and args.gamma > 0):
        raise ConfigError(f"--gamma must be positive, 'None' or 'auto', got {args.gamma}")
    if not args.data_path:
        raise ConfigError("--data_path is required (an ImageFolder, a dataset root with train/, or fashion-mnist)")
    if arch_family(args.arch) == "vit":
        for name in ("global_crops_size", "local_crops_size"):
            if name == "local_crops_size" and not args.local_crops_number:
                continue
            size = getattr(args, name)
            if size % args.patch_size:
                raise ConfigError(f"--{name} {size} is not a multiple of --patch_size {args.patch_size}: use "
                                  f"{max(size // args.patch_size, 1) * args.patch_size} or change --patch_size")
    if (problem := validate_attention_flags(args)) is not None:
        raise ConfigError(problem)
    _check_model_overrides(args)
    from simpool.dino.build import student_parameters  # imported here: build imports the data layer, flags do not

    student_parameters(args)  # --model_overrides values (depth=-1, embed_dim=50 ...) fail here, before anything


def allowed_model_overrides(arch: str) -> set[str] | None:
    """Keywords the backbone of ``arch`` accepts (its class's and its timm base classes' constructors), or None
    for other timm models (timm checks those when the model is built)."""
    names = accepted_keywords(arch)
    if names is None:
        return None
    # set by the backbone class or by a flag of their own (--patch_size, --drop_path_rate)
    return names - {"num_classes", "global_pool", "class_token", "dynamic_img_size", "patch_size", "drop_path_rate",
                    "device", "dtype"}


def _check_model_overrides(args: argparse.Namespace) -> None:
    allowed = allowed_model_overrides(args.arch)
    unknown = sorted(set(args.model_overrides or {}) - allowed) if allowed is not None else []
    if unknown:
        close = {k: difflib.get_close_matches(k, allowed, n=1) for k in unknown}
        hints = ", ".join(f"{k} (did you mean {v[0]}?)" if v else k for k, v in close.items())
        common = sorted(allowed & {"depth", "embed_dim", "num_heads", "mlp_ratio", "layers", "depths", "dims"})
        raise ConfigError(f"--model_overrides: {args.arch} does not accept {hints}; it accepts e.g. "
                          f"{', '.join(common)}")
