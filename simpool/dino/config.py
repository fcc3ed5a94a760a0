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
import inspect
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from simpool.dino.attention_log import validate as validate_attention_flags
from simpool.flags import AUTO_GAMMA, DATA_SOURCE_FLAGS, bool_flag, float_or_none, key_value
from simpool.models import ARCHS, arch_family, is_known_arch


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag."""


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that also reads the ``!!python/tuple`` tags PyYAML writes for the fork's tuples."""


_YamlLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The parser of train_dino.py and its actions by dest (recorded as the flags are declared)."""
    p = argparse.ArgumentParser("DINO + SimPool pretraining", add_help=True)
    actions: dict[str, argparse.Action] = {}

    def add(container, *names: str, **kwargs: Any) -> None:
        action = container.add_argument(*names, **kwargs)
        actions[action.dest] = action

    add(p, "--config", type=str, default=None, help="YAML file of flags; explicit flags override it")

    g = p.add_argument_group("model")
    add(
        g, "--arch",
        default="resnet50",
        type=str,
        help="vit_tiny/small/base, resnet18/34/50/101, convnext_tiny/small/base, or any timm name",
    )
    add(
        g, "--mode",
        default="official",
        choices=["official", "simpool"],
        help="simpool: SimPool pooling; official: DINO's [CLS] token / average pooling",
    )
    add(
        g, "--gamma",
        default=AUTO_GAMMA,
        type=float_or_none,
        help="SimPool exponent; 'None' for no gamma; default: 1.25 for ViTs, 2.0 for convnets",
    )
    add(g, "--patch_size", default=16, type=int, help="ViT patch size")
    add(g, "--out_dim", default=60000, type=int, help="DINO head output dimension")
    add(g, "--norm_last_layer", default=True, type=bool_flag, help="weight-normalise the last head layer")
    add(g, "--head_hidden_dim", default=2048, type=int, help="DINO head MLP width")
    add(g, "--head_bottleneck_dim", default=256, type=int, help="DINO head bottleneck before prototypes")
    add(g, "--head_nlayers", default=3, type=int, help="DINO head MLP layers")
    add(g, "--momentum_teacher", default=0.996, type=float, help="base teacher EMA momentum (cosine to 1)")
    add(g, "--use_bn_in_head", default=True, type=bool_flag, help="BatchNorm in the projection head")
    add(g, "--drop_path_rate", default=0.1, type=float, help="stochastic depth rate")
    add(
        g, "--model_overrides",
        default={},
        type=key_value,
        nargs="*",
        help="timm keywords for the backbone, e.g. depth=4 embed_dim=96 num_heads=3",
    )
    add(g, "--pretrained_weights", default=None, type=str,
        help="start from these weights (checkpoint, backbone-only file or export folder); a checkpoint "
             "in output_dir still wins (resume)")
    add(g, "--checkpoint_key", default="teacher", choices=["teacher", "student"],
        help="which network of a full --pretrained_weights checkpoint both student and teacher start from")
    add(g, "--pos_embed_resampling", default=None, choices=["exact", "reference"],
        help="ViT position-embedding rule (default exact; set to reference by reference-format --pretrained_weights)")

    g = p.add_argument_group("temperatures")
    add(g, "--warmup_teacher_temp", default=0.04, type=float, help="initial teacher temperature")
    add(g, "--teacher_temp", default=0.07, type=float, help="teacher temperature after warm-up")
    add(g, "--warmup_teacher_temp_epochs", default=50, type=int, help="teacher temperature warm-up epochs")
    add(g, "--center_momentum", default=0.9, type=float, help="EMA momentum of the teacher centre (1: no centring)")

    g = p.add_argument_group("optimisation")
    add(g, "--use_fp16", default=None, type=bool_flag, help="True: fp16 with a GradScaler; False: fp32")
    add(
        g, "--precision",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="numeric precision; default bf16 on CUDA, fp32 on CPU (overrides --use_fp16)",
    )
    add(
        g, "--compile",
        default=None,
        type=bool_flag,
        help="torch.compile student and teacher (default: on for CUDA, off on CPU)",
    )
    add(g, "--weight_decay", default=1e-6, type=float, help="initial weight decay")
    add(g, "--weight_decay_end", default=1e-6, type=float, help="final weight decay (cosine)")
    add(g, "--clip_grad", default=0.0, type=float, help="per-parameter gradient norm clip; 0 disables")
    add(g, "--batch_size_per_gpu", default=64, type=int, help="images per process")
    add(g, "--epochs", default=100, type=int, help="training epochs")
    add(g, "--freeze_last_layer", default=1, type=int, help="epochs with the head's last layer frozen")
    add(g, "--lr", default=0.3, type=float, help="peak lr for a global batch of 256 (scaled linearly)")
    add(g, "--warmup_epochs", default=10, type=int, help="linear lr warm-up epochs")
    add(g, "--min_lr", default=0.0048, type=float, help="final lr (cosine)")
    add(g, "--optimizer", default="lars", choices=["adamw", "sgd", "lars"], help="optimizer")
    add(
        g, "--max_skipped_steps",
        default=10,
        type=int,
        help="stop after this many consecutive steps with a non-finite loss",
    )
    add(g, "--grad_checkpointing", default=False, type=bool_flag,
        help="recompute the backbone's activations in backward (timm's set_grad_checkpointing): less memory")
    add(g, "--accum_steps", default=1, type=int,
        help="micro-batches per optimizer step: the exact update of a batch accum_steps times larger")

    g = p.add_argument_group("multi-crop")
    add(g, "--global_crops_scale", default=(0.14, 1.0), type=float, nargs="+", help="global crop scale")
    add(g, "--local_crops_number", default=6, type=int, help="number of local crops")
    add(g, "--local_crops_scale", default=(0.05, 0.14), type=float, nargs="+", help="local crop scale")
    add(g, "--global_crops_size", default=224, type=int, help="global crop side in pixels")
    add(g, "--local_crops_size", default=96, type=int, help="local crop side in pixels")
    add(
        g, "--gpu_augment",
        default=None,
        type=bool_flag,
        help="multi-crop augmentation on the GPU (default: on for CUDA); CPU workers only decode",
    )

    g = p.add_argument_group("data, output, evaluation")
    add(
        g, "--data_path",
        default=None,
        type=str,
        help="dataset root holding train/ (and val/), an ImageFolder, a .txt file list, fashion-mnist, a shard "
        "index.json (simpool-pack), shards-{000000..000009}.tar, or a Hugging Face dataset (parquet/save_to_disk)",
    )
    add(g, "--subset", default=-1, type=int, help="keep the first N images per class (-1: all)")
    for names, kwargs in DATA_SOURCE_FLAGS:  # --rescan, --image_column, --label_column
        add(g, *names, **kwargs)
    add(g, "--output_dir", default=".", type=str, help="checkpoints, log.txt and args.yaml go here")
    add(g, "--saveckp_freq", default=20, type=int, help="keep checkpointNNNN.pth every N epochs (0: never)")
    add(g, "--save_every_steps", default=0, type=int, help="also save checkpoint.pth every N iterations")
    add(g, "--exit_after_iterations", default=0, type=int,
                   help="save and exit (code 0) once this many iterations are done; relaunch to continue")
    add(g, "--resume_from", default=None, type=str,
        help="resume from this checkpoint when output_dir/checkpoint.pth is missing or unreadable")
    add(g, "--seed", default=0, type=int, help="random seed")
    add(g, "--num_workers", default=10, type=int, help="data loading workers per process")
    add(g, "--eval_every", default=5, type=int, help="online k-NN every N epochs (0: only at the end)")
    add(g, "--nb_knn", default=[10, 20, 100, 200], type=int, nargs="+", help="k values for k-NN")
    add(g, "--temperature", default=0.07, type=float, help="k-NN vote temperature")
    add(
        g, "--knn_max_images", default=0, type=int,
        help="online k-NN on at most this many train/val images each (0: all)",
    )
    add(
        g, "--knn_baselines",
        default=False,
        type=bool_flag,
        help="before training, also k-NN the untrained network and raw pixels (for comparison)",
    )
    add(g, "--log_every", default=10, type=int, help="console/log line every N iterations")
    add(g, "--attention_every", default=0, type=int,
        help="every N epochs (and after the last) draw the teacher's attention maps into "
        "output_dir/attention/epochNNNN.png and W&B (0: off)")
    add(g, "--attention_images", default=None, type=str,
        help="folder of images for --attention_every (its first 8, sorted; default: the first training images)")
    add(g, "--stop_on_collapse", default=False, type=bool_flag,
        help="save and exit with code 1 when the collapse alarm fires (simpool/dino/collapse.py)")
    add(g, "--wandb_project", default=None, type=str, help="log to Weights & Biases under this project")
    add(g, "--wandb_name", default=None, type=str, help="W&B run name")

    g = p.add_argument_group("distributed")
    add(g, "--dist_url", default="env://", type=str, help="process-group init method (torchrun: env://)")
    add(g, "--local_rank", default=0, type=int, help="set by the launcher; ignore")
    add(g, "--backend", default=None, type=str, help="nccl or gloo (default: nccl on CUDA, gloo on CPU)")
    return p, actions


def _flag_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value checked and converted as the command line would: the flag's ``type`` and ``choices``.

    Scalars go through ``type`` as their text (so ``epochs: 7.5`` fails like ``--epochs 7.5``), each item of a
    list for ``nargs`` flags; ``null`` stays None. The one place where YAML values get the flags' validation.
    """
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        items = list(value) if isinstance(value, list | tuple) else [value]  # `nb_knn: 5` is `--nb_knn 5`
        if action.nargs == "+" and not items:
            raise argparse.ArgumentTypeError("expected at least one value, got an empty list")
        return [_flag_value_one(action, item) for item in items]
    return _flag_value_one(action, value)


def _flag_value_one(action: argparse.Action, value: Any) -> Any:
    """One value through the flag's ``type`` and ``choices`` (a list or mapping is not one value)."""
    if isinstance(value, list | tuple | dict) and action.type is not key_value:
        kind = "mapping" if isinstance(value, dict) else "list"
        raise argparse.ArgumentTypeError(f"expected a single value, got a {kind}")
    if action.type is not None:
        value = action.type(str(value) if isinstance(value, bool | int | float) else value)
    if action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(f"expected one of {list(action.choices)}, got {value!r}")
    return value


def load_yaml_flags(path: str | Path, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """The flags of a YAML file by dest, converted and validated through their actions (``--config``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {str(path)!r} does not exist")
    try:
        with path.open() as f:
            values = yaml.load(f, Loader=_YamlLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of flag names to values")
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"--config: {path} has unknown flags {unknown}")
    converted = {}
    for key, value in values.items():
        if key == "config":  # a saved args.yaml names the file it came from; it is not read again
            continue
        try:
            converted[key] = _flag_value(actions[key], value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise ConfigError(f"--config: {path}: {key}: {value!r} is not a valid value ({err})") from None
    return converted


def parse_over_config(parser: argparse.ArgumentParser, actions: dict[str, argparse.Action],
                      argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` over the values of the ``--config`` YAML file ``argv`` names, if any.

    timm's pattern: a first parse reads only ``--config``; the file's values become the parser's defaults
    (``set_defaults``), so the full parse lets every flag typed on the command line win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", type=str, default=None)
    config, _ = config_parser.parse_known_args(argv)
    if config.config:
        parser.set_defaults(**load_yaml_flags(config.config, actions))
    return parser.parse_args(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line over the values of an optional ``--config`` file (``parse_over_config``), then
    validate."""
    parser, actions = build_parser()
    args = parse_over_config(parser, actions, argv)
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
        raise ConfigError(f"--arch {args.arch!r} is unknown: use one of {', '.join(ARCHS)} or a timm model name")
    positive = ["epochs", "batch_size_per_gpu", "out_dim", "patch_size", "global_crops_size", "local_crops_size",
                "head_hidden_dim", "head_bottleneck_dim", "head_nlayers", "log_every", "accum_steps"]
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
    if not 0 <= args.center_momentum <= 1:
        raise ConfigError(f"--center_momentum must be in [0, 1], got {args.center_momentum}")
    if not 0 <= args.momentum_teacher <= 1:
        raise ConfigError(f"--momentum_teacher must be in [0, 1], got {args.momentum_teacher}")
    if args.gamma not in (None, AUTO_GAMMA) and args.gamma <= 0:
        raise ConfigError(f"--gamma must be positive, 'None' or 'auto', got {args.gamma}")
    if any(k <= 0 for k in args.nb_knn):
        raise ConfigError(f"--nb_knn values must be positive, got {args.nb_knn}")
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
    _check_numbers(args)
    _check_model_overrides(args)


def _check_numbers(args: argparse.Namespace) -> None:
    """Finite values, positive where a zero or negative one divides by zero or makes no sense."""
    rules = {  # flag: (lowest allowed, is the lowest itself allowed)
        "lr": (0.0, False), "teacher_temp": (0.0, False), "warmup_teacher_temp": (0.0, False),
        "temperature": (0.0, False), "min_lr": (0.0, True), "weight_decay": (0.0, True),
        "weight_decay_end": (0.0, True), "clip_grad": (0.0, True), "drop_path_rate": (0.0, True),
    }
    for name, (low, inclusive) in rules.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            what = "a finite number > 0" if not inclusive else "a finite number >= 0"
            raise ConfigError(f"--{name} must be {what}, got {value}")
    if args.drop_path_rate >= 1:
        raise ConfigError(f"--drop_path_rate must be below 1, got {args.drop_path_rate}")


def allowed_model_overrides(arch: str) -> set[str] | None:
    """Keywords the backbone of ``arch`` accepts (its class's and its timm base classes' constructors), or None
    for other timm models (timm checks those when the model is built)."""
    if arch not in ARCHS:
        return None
    names: set[str] = set()
    for cls in ARCHS[arch].cls.__mro__:
        if "__init__" not in vars(cls) or cls.__module__.startswith("torch."):
            continue
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name != "self":
                names.add(param.name)
    # set by the backbone class or by a flag of their own (--patch_size, --drop_path_rate)
    return names - {"mode", "gamma", "arch", "num_classes", "global_pool", "class_token", "dynamic_img_size",
                    "patch_size", "drop_path_rate", "device", "dtype"}


def _check_model_overrides(args: argparse.Namespace) -> None:
    allowed = allowed_model_overrides(args.arch)
    unknown = sorted(set(args.model_overrides or {}) - allowed) if allowed is not None else []
    if unknown:
        close = {k: difflib.get_close_matches(k, allowed, n=1) for k in unknown}
        hints = ", ".join(f"{k} (did you mean {v[0]}?)" if v else k for k, v in close.items())
        common = sorted(allowed & {"depth", "embed_dim", "num_heads", "mlp_ratio", "layers", "depths", "dims"})
        raise ConfigError(f"--model_overrides: {args.arch} does not accept {hints}; it accepts e.g. "
                          f"{', '.join(common)}")


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved flags, as ``output_dir/args.yaml`` stores them (plain YAML, tuples as lists)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items())}
    return yaml.safe_dump(values, sort_keys=True)
