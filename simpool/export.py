"""Export a trained backbone to a self-describing folder, and load it back.

A DINO checkpoint holds much more than the backbone (head, optimizer, loss centre, RNG...) and needs the
training flags to be rebuilt. ``export_backbone`` writes a folder that needs nothing else::

    OUT_DIR/model.safetensors       the backbone's state dict (safetensors: no pickle, memory-mappable)
    OUT_DIR/config.json             arch, mode, gamma, patch_size, embed_dim, family, pos_embed_resampling,
                                    the keywords that rebuild it, a summary of the training run
    OUT_DIR/timm_model.safetensors  official mode only: the same weights as a plain timm state dict

``load_backbone(OUT_DIR)`` rebuilds the model with ``build_backbone(arch, mode, gamma, **build_kwargs)``,
restores the ViT's position-embedding rule (``"reference"`` for weights trained by DINO / the SimPool fork,
``"exact"`` for ours: see ``simpool.models.vit``) and loads the weights strictly, so its features equal those
of the checkpoint's backbone bit for bit.

Official-mode backbones are plain timm models (DINO's [CLS] token / average pooling); their timm copy loads
into timm itself, without simpool::

    cfg = json.load(open("OUT_DIR/config.json"))["timm"]
    model = timm.create_model(cfg["model_name"], pretrained=True, num_classes=0, **cfg["kwargs"],
                              pretrained_cfg_overlay=dict(file="OUT_DIR/timm_model.safetensors"))

(timm's ``load_pretrained`` reads a ``file`` overlay with ``safetensors.torch.load_file`` when the name ends
in ``.safetensors``, runs the model's own ``checkpoint_filter_fn``, and drops the classifier because
``num_classes=0`` differs from the pretrained 1000 classes.) Export checks that the timm model accepts the
weights strictly before writing them.

Example:
    >>> export_backbone("runs/vits/checkpoint.pth", "exports/vits")          # teacher, flags from the run
    >>> model = load_backbone("exports/vits")                                # eval mode, on the CPU
    >>> model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 384])
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from simpool.checkpoint import (
    FORMAT_KEY,
    LoadedCheckpoint,
    args_as_dict,
    load_backbone_weights,
    load_pretrained,
    safe_load,
)
from simpool.flags import float_or_none, key_value
from simpool.models import AUTO_GAMMA, MODES, build_backbone

log = logging.getLogger(__name__)

EXPORT_FORMAT = "simpool-backbone"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIMM_WEIGHTS_FILE = "timm_model.safetensors"

NOT_GIVEN: Any = object()  # "take it from the checkpoint's args"; distinct from gamma=None ("no gamma")

# Training flags worth keeping next to the weights: enough to tell runs apart and to cite the recipe.
TRAINING_SUMMARY_KEYS = (
    "epochs", "out_dim", "lr", "min_lr", "warmup_epochs", "optimizer", "batch_size_per_gpu",
    "weight_decay", "weight_decay_end", "momentum_teacher", "teacher_temp", "warmup_teacher_temp",
    "warmup_teacher_temp_epochs", "norm_last_layer", "use_bn_in_head", "drop_path_rate", "clip_grad",
    "freeze_last_layer", "local_crops_number", "global_crops_scale", "local_crops_scale", "global_crops_size",
    "local_crops_size", "precision", "use_fp16", "seed", "data_path", "subset", "output_dir",
)
# build_backbone keywords that are not part of the timm model's own architecture.
_NOT_TIMM_KWARGS = ("drop_path_rate", "block")


@dataclass
class BackboneSpec:
    """What ``build_backbone`` needs: from the flags, else the checkpoint's recorded args."""

    arch: str
    mode: str
    gamma: Any  # a float, None (no gamma) or simpool.models.AUTO_GAMMA (the arch's default)
    patch_size: int
    overrides: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# reading a checkpoint
# ----------------------------------------------------------------------------------------------------------
def read_checkpoint_args(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """The checkpoint's recorded training args (``{}`` if none) and whether it is in our own format.

    The file is memory-mapped, so only the small ``args`` entry is actually read even when the checkpoint
    also holds gigabytes of optimizer state (``load_pretrained`` reads the weights afterwards).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mapped; safe_load also explains unreadable files
        checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict):
        return {}, False
    return args_as_dict(checkpoint.get("args")), FORMAT_KEY in checkpoint


def resolve_spec(
    args: dict[str, Any],
    arch: str | None = None,
    mode: str | None = None,
    gamma: Any = NOT_GIVEN,
    patch_size: int | None = None,
    overrides: dict[str, Any] | None = None,
    source: str = "the checkpoint",
) -> BackboneSpec:
    """Combine explicit flags (which win) with recorded training args.

    ``gamma``: ``NOT_GIVEN`` -> the recorded one; ``AUTO_GAMMA`` (``"auto"``) -> the arch's default; ``None`` -> no
    gamma. facebookresearch/dino's args have no ``mode``: such a run is DINO's own, i.e. ``"official"``.
    """
    arch = arch or args.get("arch")
    if not arch:
        raise ValueError(
            f"{source} records no training args (a backbone-only file?): pass --arch and --mode "
            "(and --gamma / --patch_size / --model_overrides if the run changed them)"
        )
    if mode is None:
        if not args:
            raise ValueError(f"{source} records no training args: pass --mode simpool or --mode official")
        mode = args.get("mode", "official")
    if gamma is NOT_GIVEN:
        gamma = args.get("gamma", AUTO_GAMMA)
    patch_size = int(patch_size or args.get("patch_size") or 16)
    merged = {**dict(args.get("model_overrides") or {}), **dict(overrides or {})}
    return BackboneSpec(arch, mode, gamma, patch_size, merged)


def build_from_checkpoint(
    checkpoint: str | os.PathLike,
    which: str = "teacher",
    arch: str | None = None,
    mode: str | None = None,
    gamma: Any = NOT_GIVEN,
    patch_size: int | None = None,
    **overrides: Any,
) -> tuple[nn.Module, LoadedCheckpoint]:
    """Build the backbone a checkpoint was trained with and load its ``which`` weights; eval mode, CPU.

    Works for our checkpoints, reference (DINO / SimPool fork) checkpoints and backbone-only files; the latter
    record no args, so ``arch`` and ``mode`` must be given. Reference weights get the reference's position
    embedding rule (see ``simpool.load_pretrained``).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    args, _ = read_checkpoint_args(checkpoint)
    spec = resolve_spec(args, arch, mode, gamma, patch_size, overrides, source=str(checkpoint))
    # An inference copy: no stochastic depth (a no-op in eval mode, but config.json would record it).
    model = build_backbone(spec.arch, mode=spec.mode, gamma=spec.gamma, patch_size=spec.patch_size,
                           drop_path_rate=0.0, **spec.overrides)
    loaded = load_pretrained(model, checkpoint, checkpoint_key=which)
    return model.eval(), loaded


# ----------------------------------------------------------------------------------------------------------
# writing the export folder
# ----------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively; anything exotic -> its str (config.json must always be writable)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def training_summary(args: dict[str, Any]) -> dict[str, Any]:
    return {key: _jsonable(args[key]) for key in TRAINING_SUMMARY_KEYS if key in args}


def plain_state_dict(model: nn.Module, strip_prefix: str = "") -> dict[str, torch.Tensor]:
    """CPU, contiguous copies (safetensors refuses views and channels_last strides), prefix removed."""
    return {
        key.removeprefix(strip_prefix): value.detach().to("cpu", copy=True).contiguous()
        for key, value in model.state_dict().items()
    }


def timm_equivalent(model: nn.Module) -> tuple[str, dict[str, Any], str]:
    """(timm model name, create_model keywords, state-dict prefix to strip) of an official-mode backbone.

    Our ViTs are named ``vit_tiny``/``vit_small``/``vit_base``; timm's ``vit_<size>_patch<p>_<img>`` have
    the same layout ([CLS] token, ``global_pool="token"``), so the keys are identical. ResNet and ConvNeXt
    names are timm's own. The architecture keywords are passed on, so tiny variants (``depth=2``) rebuild too.
    """
    if getattr(model, "mode", None) != "official":
        raise ValueError("only official-mode backbones are plain timm models; SimPool adds its own weights")
    kwargs = {k: v for k, v in model.build_kwargs.items() if k not in _NOT_TIMM_KWARGS}
    if model.family == "vit":
        name = f"{model.arch}_patch{model.patch_size}_{kwargs.get('img_size', 224)}"
        if not timm.is_model(name):  # e.g. vit_tiny_patch8_224: build the patch-16 model with patch_size=8
            name = f"{model.arch}_patch16_224"
        return name, kwargs, ""
    if model.family == "timm":
        return model.arch, kwargs, "model."
    return model.arch, kwargs, ""


def _check_timm_accepts(name: str, kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load into a fresh timm model: timm's own loader is not strict once the classifier is dropped."""
    reference = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    reference.load_state_dict(state_dict, strict=True)


def export_backbone(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    which: str = "teacher",
    arch: str | None = None,
    mode: str | None = None,
    gamma: Any = NOT_GIVEN,
    patch_size: int | None = None,
    **overrides: Any,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``timm_model.safetensors`` in official mode).

    Args:
        checkpoint: a training checkpoint (ours or the reference's) or a backbone-only state dict.
        out_dir: created if missing; existing export files are overwritten.
        which: ``"teacher"`` (DINO's evaluated network) or ``"student"``.
        arch, mode, gamma, patch_size, **overrides: override what the checkpoint's args say (``overrides`` are
            timm keywords such as ``depth=2``). Required for backbone-only files, which record no args.

    Returns the output folder.
    """
    model, loaded = build_from_checkpoint(checkpoint, which, arch, mode, gamma, patch_size, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(plain_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    timm_entry = None
    if model.mode == "official":
        name, kwargs, prefix = timm_equivalent(model)
        timm_state = plain_state_dict(model, strip_prefix=prefix)
        _check_timm_accepts(name, kwargs, timm_state)
        save_file(timm_state, str(out / TIMM_WEIGHTS_FILE), metadata={"format": "pt"})
        timm_entry = {"model_name": name, "kwargs": _jsonable(kwargs), "file": TIMM_WEIGHTS_FILE}

    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "arch": model.arch,
        "mode": model.mode,
        "gamma": model.gamma,
        "patch_size": getattr(model, "patch_size", None),
        "embed_dim": model.embed_dim,
        "family": model.family,
        "pos_embed_resampling": getattr(model, "pos_embed_resampling", None),
        "build_kwargs": _jsonable(model.build_kwargs),
        "weights": WEIGHTS_FILE,
        "timm": timm_entry,
        "source": {
            "checkpoint": str(checkpoint),
            "which": which if loaded.key is not None else None,  # backbone-only files have no teacher/student
            "reference_format": loaded.reference_format,
            "epoch": loaded.epoch,
        },
        "training": training_summary(loaded.args),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    log.info("exported %s %s (%s mode) to %s", which, model.arch, model.mode, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# loading it back
# ----------------------------------------------------------------------------------------------------------
def is_export_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_export_config(out_dir: str | os.PathLike) -> dict[str, Any]:
    folder = Path(out_dir)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{str(folder)!r} holds no {CONFIG_FILE}: pass a folder written by utils/export_backbone.py"
        )
    config = json.loads(config_path.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_path} is not a simpool export (format {config.get('format')!r})")
    if config.get("format_version", 0) > EXPORT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {config['format_version']}, newer than this simpool "
            f"({EXPORT_VERSION}): upgrade simpool"
        )
    return config


def load_backbone(out_dir: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild an exported backbone from its ``config.json`` and ``model.safetensors``; eval mode.

    Example:
        >>> model = load_backbone("exports/vits", device=torch.device("cpu"))
        >>> features = model(images)                     # (B, embed_dim)
    """
    folder = Path(out_dir)
    config = read_export_config(folder)
    weights = folder / config.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise ValueError(f"{str(weights)!r} is missing: re-run utils/export_backbone.py into {str(folder)!r}")
    model = build_backbone(
        config["arch"], mode=config["mode"], gamma=config["gamma"], **config["build_kwargs"]
    )
    if config.get("pos_embed_resampling") is not None:
        model.pos_embed_resampling = config["pos_embed_resampling"]
    load_backbone_weights(model, load_file(str(weights), device="cpu"))
    model.eval()
    return model.to(device) if device is not None else model


def load_any_backbone(
    weights: str | os.PathLike,
    which: str = "teacher",
    arch: str | None = None,
    mode: str | None = None,
    gamma: Any = NOT_GIVEN,
    patch_size: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """An export folder (``load_backbone``; the other arguments must be left unset) or a checkpoint file."""
    if is_export_dir(weights):
        flags = (("arch", arch), ("mode", mode), ("patch_size", patch_size))
        given = [name for name, value in flags if value]
        if given or gamma is not NOT_GIVEN or overrides:
            raise ValueError(
                f"{str(weights)!r} is an export folder whose config.json fixes the model: drop "
                f"{', '.join(given + (['gamma'] if gamma is not NOT_GIVEN else []) + sorted(overrides))}"
            )
        return load_backbone(weights)
    model, _ = build_from_checkpoint(weights, which, arch, mode, gamma, patch_size, **overrides)
    return model


# ----------------------------------------------------------------------------------------------------------
# command-line flags shared by utils/export_backbone.py and utils/visualize_attention.py
# ----------------------------------------------------------------------------------------------------------
def add_backbone_flags(
    parser: argparse.ArgumentParser, prefix: str = "", what: str = "the checkpoint"
) -> None:
    """--{prefix}arch/mode/gamma/patch_size/model_overrides; unset flags come from the checkpoint's args."""
    group = parser.add_argument_group(f"model of {what} (default: as recorded in its training args)")
    group.add_argument(f"--{prefix}arch", default=None, help="e.g. vit_small, resnet50, convnext_small")
    group.add_argument(f"--{prefix}mode", default=None, choices=MODES, help="simpool or official")
    group.add_argument(f"--{prefix}gamma", default=NOT_GIVEN, type=float_or_none,
                       help="SimPool exponent: a number, 'None' (no gamma) or 'auto' (the arch's default)")
    group.add_argument(f"--{prefix}patch_size", default=None, type=int, help="ViT patch size")
    group.add_argument(f"--{prefix}model_overrides", default=[], type=key_value, nargs="*",
                       help="timm keywords, e.g. depth=2 embed_dim=192 num_heads=3")


def backbone_flags(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The keyword arguments of ``build_from_checkpoint`` / ``export_backbone`` from parsed flags."""
    overrides = {k: v for item in getattr(args, f"{prefix}model_overrides") for k, v in item.items()}
    return {
        "arch": getattr(args, f"{prefix}arch"),
        "mode": getattr(args, f"{prefix}mode"),
        "gamma": getattr(args, f"{prefix}gamma"),
        "patch_size": getattr(args, f"{prefix}patch_size"),
        **overrides,
    }


__all__ = [
    "NOT_GIVEN",
    "add_backbone_flags",
    "backbone_flags",
    "load_any_backbone",
    "BackboneSpec",
    "build_from_checkpoint",
    "export_backbone",
    "is_export_dir",
    "load_backbone",
    "read_checkpoint_args",
    "read_export_config",
    "resolve_spec",
    "timm_equivalent",
]
