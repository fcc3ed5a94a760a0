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
import sys
from pathlib import Path
from typing import Any

import yaml

from simpool.flags import AUTO_GAMMA, bool_flag, float_or_none, key_value
from simpool.models import is_known_arch


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag."""


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that also reads the ``!!python/tuple`` tags PyYAML writes for the fork's tuples."""


_YamlLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DINO + SimPool pretraining", add_help=True)
    p.add_argument("--config", type=str, default=None, help="YAML file of flags; explicit flags override it")

    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        default="resnet50",
        type=str,
        help="vit_tiny/small/base, resnet18/34/50/101, convnext_tiny/small/base, or any timm name",
    )
    g.add_argument(
        "--mode",
        default="official",
        choices=["official", "simpool"],
        help="simpool: SimPool pooling; official: DINO's [CLS] token / average pooling",
    )
    g.add_argument(
        "--gamma",
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
    g.add_argument(
        "--model_overrides",
        default={},
        type=key_value,
        nargs="*",
        help="timm keywords for the backbone, e.g. depth=4 embed_dim=96 num_heads=3",
    )

    g = p.add_argument_group("temperatures")
    g.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="initial teacher temperature")
    g.add_argument("--teacher_temp", default=0.07, type=float, help="teacher temperature after warm-up")
    g.add_argument("--warmup_teacher_temp_epochs", default=50, type=int, help="teacher temperature warm-up epochs")

    g = p.add_argument_group("optimisation")
    g.add_argument("--use_fp16", default=None, type=bool_flag, help="True: fp16 with a GradScaler; False: fp32")
    g.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="numeric precision; default bf16 on CUDA, fp32 on CPU (overrides --use_fp16)",
    )
    g.add_argument(
        "--compile",
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
    g.add_argument(
        "--max_skipped_steps",
        default=10,
        type=int,
        help="stop after this many consecutive steps with a non-finite loss",
    )

    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crops_scale", default=(0.14, 1.0), type=float, nargs="+", help="global crop scale")
    g.add_argument("--local_crops_number", default=6, type=int, help="number of local crops")
    g.add_argument("--local_crops_scale", default=(0.05, 0.14), type=float, nargs="+", help="local crop scale")
    g.add_argument("--global_crops_size", default=224, type=int, help="global crop side in pixels")
    g.add_argument("--local_crops_size", default=96, type=int, help="local crop side in pixels")
    g.add_argument(
        "--gpu_augment",
        default=None,
        type=bool_flag,
        help="multi-crop augmentation on the GPU (default: on for CUDA); CPU workers only decode",
    )

    g = p.add_argument_group("data, output, evaluation")
    g.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="dataset root holding train/ (and val/), an ImageFolder, a .txt file list, or fashion-mnist",
    )
    g.add_argument("--subset", default=-1, type=int, help="keep the first N images per class (-1: all)")
    g.add_argument("--output_dir", default=".", type=str, help="checkpoints, log.txt and args.yaml go here")
    g.add_argument("--saveckp_freq", default=20, type=int, help="keep checkpointNNNN.pth every N epochs (0: never)")
    g.add_argument("--save_every_steps", default=0, type=int, help="also save checkpoint.pth every N iterations")
    g.add_argument("--exit_after_iterations", default=0, type=int,
                   help="save and exit (code 0) once this many iterations are done; relaunch to continue")
    g.add_argument("--seed", default=0, type=int, help="random seed")
    g.add_argument("--num_workers", default=10, type=int, help="data loading workers per process")
    g.add_argument("--eval_every", default=5, type=int, help="online k-NN every N epochs (0: only at the end)")
    g.add_argument("--nb_knn", default=[10, 20, 100, 200], type=int, nargs="+", help="k values for k-NN")
    g.add_argument("--temperature", default=0.07, type=float, help="k-NN vote temperature")
    g.add_argument(
        "--knn_max_images", default=0, type=int, help="online k-NN on at most this many train/val images each (0: all)"
    )
    g.add_argument(
        "--knn_baselines",
        default=False,
        type=bool_flag,
        help="before training, also k-NN the untrained network and raw pixels (for comparison)",
    )
    g.add_argument("--log_every", default=10, type=int, help="console/log line every N iterations")
    g.add_argument("--wandb_project", default=None, type=str, help="log to Weights & Biases under this project")
    g.add_argument("--wandb_name", default=None, type=str, help="W&B run name")

    g = p.add_argument_group("distributed")
    g.add_argument("--dist_url", default="env://", type=str, help="process-group init method (torchrun: env://)")
    g.add_argument("--local_rank", default=0, type=int, help="set by the launcher; ignore")
    g.add_argument("--backend", default=None, type=str, help="nccl or gloo (default: nccl on CUDA, gloo on CPU)")
    return p


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Which flags were typed on the command line (so they beat the YAML file)."""
    option_to_dest = {opt: a.dest for a in parser._actions for opt in a.option_strings}
    dests = set()
    for token in argv:
        option = token.split("=", 1)[0]
        if option in option_to_dest:
            dests.add(option_to_dest[option])
    return dests


def load_yaml_flags(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {str(path)!r} does not exist")
    with path.open() as f:
        values = yaml.load(f, Loader=_YamlLoader) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config: {path} has unknown flags {unknown}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (after an optional ``--config``), then validate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.config:
        file_values = load_yaml_flags(args.config, parser)
        explicit = _explicit_dests(parser, argv)
        types = {a.dest: a.type for a in parser._actions}
        for key, value in file_values.items():
            if key in explicit or key == "config":
                continue
            convert = types.get(key)
            if convert in (bool_flag, float_or_none) and value is not None:
                value = convert(value)
            setattr(args, key, value)
    if isinstance(args.model_overrides, list):  # nargs="*" gives a list of one-key dicts
        args.model_overrides = {k: v for item in args.model_overrides for k, v in item.items()}
    validate_args(args)
    return args


def resolve_precision(args: argparse.Namespace, cuda: bool) -> str:
    if args.precision:
        return args.precision
    if args.use_fp16 is True:
        return "fp16"
    if args.use_fp16 is False:
        return "fp32"
    return "bf16" if cuda else "fp32"


def _check_scale(name: str, scale: Any) -> tuple[float, float]:
    values = tuple(float(s) for s in scale) if isinstance(scale, list | tuple) else ()
    if len(values) != 2 or not (0 < values[0] <= values[1] <= 1):
        raise ConfigError(f"--{name} must be two numbers 0 < min <= max <= 1, got {scale}")
    return values


def validate_args(args: argparse.Namespace) -> None:
    """Stop on values that cannot work, naming the flag; fill derived values (scales as tuples)."""
    if not is_known_arch(args.arch):
        from simpool.models import ARCHS

        raise ConfigError(f"--arch {args.arch!r} is unknown: use one of {', '.join(ARCHS)} or a timm model name")
    positive = ["epochs", "batch_size_per_gpu", "out_dim", "patch_size", "global_crops_size", "local_crops_size",
                "head_hidden_dim", "head_bottleneck_dim", "head_nlayers", "log_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in [
        "local_crops_number",
        "num_workers",
        "warmup_epochs",
        "warmup_teacher_temp_epochs",
        "freeze_last_layer",
        "saveckp_freq",
        "save_every_steps",
        "exit_after_iterations",
        "eval_every",
        "max_skipped_steps",
    ]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.warmup_teacher_temp_epochs > args.epochs:
        raise ConfigError(f"--warmup_teacher_temp_epochs ({args.warmup_teacher_temp_epochs}) exceeds --epochs")
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup_epochs ({args.warmup_epochs}) exceeds --epochs ({args.epochs})")
    args.global_crops_scale = _check_scale("global_crops_scale", args.global_crops_scale)
    args.local_crops_scale = _check_scale("local_crops_scale", args.local_crops_scale)
    if not 0 <= args.momentum_teacher <= 1:
        raise ConfigError(f"--momentum_teacher must be in [0, 1], got {args.momentum_teacher}")
    if args.gamma not in (None, AUTO_GAMMA) and args.gamma <= 0:
        raise ConfigError(f"--gamma must be positive, 'None' or 'auto', got {args.gamma}")
    if any(k <= 0 for k in args.nb_knn):
        raise ConfigError(f"--nb_knn values must be positive, got {args.nb_knn}")
    if not args.data_path:
        raise ConfigError("--data_path is required (an ImageFolder, a dataset root with train/, or fashion-mnist)")
    if args.arch.startswith("vit") and args.global_crops_size % args.patch_size:
        raise ConfigError(f"--global_crops_size {args.global_crops_size} is not a multiple of --patch_size")


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved flags, as ``output_dir/args.yaml`` stores them (plain YAML, tuples as lists)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items())}
    return yaml.safe_dump(values, sort_keys=True)
