"""Weights on disk -> a backbone: ``load_model`` is the one function every tool builds its model with.

``load_model(weights, checkpoint_key, arch=..., mode=..., gamma=..., patch_size=..., **overrides)`` reads

* an export folder (``config.json`` + ``model.safetensors``, written by :func:`simpool.export.export_backbone`):
  its config fixes the model, so model arguments are refused, naming them;
* a training checkpoint (ours, DINO's, the SimPool fork's) or a backbone-only state dict: the model arguments
  given win over the run's recorded training args; a backbone-only file records none, so it needs
  ``arch`` and ``mode``;
* nothing, with ``random_init=True``: a randomly initialised model (a baseline), ``vit_small`` in ``simpool`` mode
  unless the arguments say otherwise.

The export folder format is read here (``load_backbone``, ``read_export_config``) and written by
:mod:`simpool.export`, which builds its model with ``load_model``: the imports go one way.

Example:
    >>> model, source = load_model("runs/vits/checkpoint.pth", "teacher")             # as trained
    >>> model, source = load_model("dino_deitsmall16_pretrain.pth", arch="vit_small", mode="official")
    >>> model, source = load_model("exports/vits")                                    # an export folder
    >>> source.as_dict()
    {'weights': 'exports/vits', 'checkpoint_key': None, 'arch': 'vit_small', 'mode': 'simpool', 'gamma': 1.25,
     'epoch': None}
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from simpool.checkpoint import LoadedCheckpoint, args_as_dict, load_backbone_weights, load_pretrained, safe_load
from simpool.export_format import CONFIG_FILE, EXPORT_FORMAT, EXPORT_VERSION, WEIGHTS_FILE, check_export_config
from simpool.models import AUTO_GAMMA, PooledBackbone, arch_family, build_backbone, is_known_arch

__all__ = [
    "CONFIG_FILE", "EXPORT_FORMAT", "EXPORT_VERSION", "FROM_CHECKPOINT", "WEIGHTS_FILE", "ModelSource",
    "is_export_dir", "load_backbone", "load_model", "model_builder", "read_export_config",
]

# What random_init=True builds when arch / mode are not given: DINO's default arch, this project's mode.
RANDOM_INIT_ARGS = {"arch": "vit_small", "mode": "simpool"}


class _Unset(enum.Enum):
    FROM_CHECKPOINT = "from the checkpoint"


# gamma=FROM_CHECKPOINT: "not given, take the run's recorded gamma" (None already means "no gamma").
FROM_CHECKPOINT = _Unset.FROM_CHECKPOINT


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model's weights came from: printed by the tools and written into their result files."""

    weights: str | None  # the checkpoint file / export folder; None for random_init
    arch: str
    mode: str
    gamma: float | None
    checkpoint: LoadedCheckpoint | None = None  # what a checkpoint file held besides the weights

    @property
    def checkpoint_key(self) -> str | None:
        return self.checkpoint.key if self.checkpoint else None

    @property
    def epoch(self) -> int | None:
        return self.checkpoint.epoch if self.checkpoint else None

    def as_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "checkpoint_key": self.checkpoint_key, "arch": self.arch,
                "mode": self.mode, "gamma": self.gamma, "epoch": self.epoch}


def load_model(
    weights: str | os.PathLike | None = None,
    checkpoint_key: str = "teacher",
    *,
    arch: str | None = None,
    mode: str | None = None,
    gamma: float | str | None | _Unset = FROM_CHECKPOINT,
    patch_size: int | None = None,
    random_init: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> tuple[PooledBackbone, ModelSource]:
    """The backbone ``weights`` hold, in eval mode on the CPU, and where it came from.

    Args:
        weights: an export folder, a training checkpoint or a backbone-only file; None with ``random_init``.
        checkpoint_key: ``"teacher"`` (the network DINO evaluates) or ``"student"``, for training checkpoints.
        arch, mode, patch_size: None = as the checkpoint's training args record them.
        gamma: ``FROM_CHECKPOINT`` = as recorded (the arch's default when nothing is); a float, ``None`` (no
            gamma) or ``AUTO_GAMMA`` (the arch's default).
        random_init: build random weights on purpose (``weights`` must then be None).
        seed: the seed of those random weights, so that every process and every rerun gets the same network
            (torch's own start seed differs per process); the global RNG is left as it was.
        **overrides: timm keywords merged over the run's recorded ``model_overrides``, e.g. ``depth=2``.

    Raises ``ValueError`` (a :class:`simpool.checkpoint.CheckpointError` for weights that do not fit the model)
    with a message that names the argument to change.
    """
    flags = {"arch": arch, "mode": mode, "gamma": gamma, "patch_size": patch_size, **overrides}
    build = model_builder(weights, checkpoint_key, random_init=random_init, **flags)
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
        return model.eval(), ModelSource(None, model.arch, model.mode, model.gamma)
    if is_export_dir(weights):
        model = load_backbone(weights)
        return model, ModelSource(str(weights), model.arch, model.mode, model.gamma)
    model = build()
    loaded = load_pretrained(model, weights, checkpoint_key=checkpoint_key)
    return model.eval(), ModelSource(str(weights), model.arch, model.mode, model.gamma, loaded)


def model_builder(
    weights: str | os.PathLike | None = None,
    checkpoint_key: str = "teacher",
    *,
    random_init: bool = False,
    arch: str | None = None,
    mode: str | None = None,
    gamma: float | str | None | _Unset = FROM_CHECKPOINT,
    patch_size: int | None = None,
    **overrides: Any,
) -> Callable[[], PooledBackbone]:
    """A function building (without weights) the backbone :func:`load_model` would return for these arguments.

    What decides the model is read and checked now (the export folder's ``config.json``, the checkpoint's
    recorded training args: ``ValueError`` naming the argument to change); the build itself is left to the
    caller, e.g. on the ``meta`` device to check the model's values and count its parameters before any weight
    is read (``simpool.run.model_check.checked_build``).
    """
    if checkpoint_key not in ("teacher", "student"):
        raise ValueError(f"checkpoint_key must be 'teacher' or 'student', got {checkpoint_key!r}")
    flags = {"arch": arch, "mode": mode, "gamma": gamma, "patch_size": patch_size, **overrides}
    if random_init:
        if weights is not None:
            raise ValueError("random_init=True builds random weights: pass weights=None, or drop random_init")
        arguments = _model_arguments(RANDOM_INIT_ARGS, "random_init", **flags)
        return lambda: _build(arguments, RANDOM_INIT_ARGS, "random_init")
    if weights is None:
        raise ValueError("no weights given: pass a checkpoint file or an export folder, or random_init=True")
    if is_export_dir(weights):
        given = [name for name in ("arch", "mode", "patch_size") if flags[name] is not None]
        if gamma is not FROM_CHECKPOINT:
            given.append("gamma")
        given += sorted(overrides)
        if given:
            raise ValueError(
                f"{str(weights)!r} is an export folder whose config.json fixes the model: drop {', '.join(given)}"
            )
        config = read_export_config(weights)
        return lambda: _build_exported(config)
    recorded = _recorded_args(weights)
    _check_arch_fits_the_run(arch, recorded.get("arch"), recorded.get("mode", "official"), str(weights))
    arguments = _model_arguments(recorded, str(weights), **flags)
    return lambda: _build(arguments, recorded, str(weights))


def _recorded_args(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's recorded training args (``{}`` if none).

    The file is memory-mapped, so only the small ``args`` entry is actually read even when the checkpoint
    also holds gigabytes of optimizer state (``load_pretrained`` reads the weights afterwards).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mapped; safe_load also explains unreadable files
        checkpoint = safe_load(path)
    return args_as_dict(checkpoint.get("args")) if isinstance(checkpoint, dict) else {}


def _model_arguments(recorded: dict[str, Any], source: str, arch: str | None, mode: str | None, gamma: Any,
                     patch_size: int | None, **overrides: Any) -> dict[str, Any]:
    """``build_backbone``'s arguments: the given ones, the missing ones taken from the ``recorded`` training args.

    facebookresearch/dino's args have no ``mode``: such a run is DINO's own, i.e. ``"official"``.
    """
    arch = arch or recorded.get("arch")
    if not arch:
        raise ValueError(
            f"{source} records no training args (a backbone-only file?): pass --arch and --mode "
            "(and --gamma / --patch_size / --model_overrides if the run changed them)"
        )
    if mode is None:
        if not recorded:
            raise ValueError(f"{source} records no training args: pass --mode simpool or --mode official")
        mode = recorded.get("mode", "official")
    if gamma is FROM_CHECKPOINT:
        gamma = recorded.get("gamma", AUTO_GAMMA)
    patch_size = int(patch_size or recorded.get("patch_size") or 16)
    # An inference copy: no stochastic depth unless asked for (a no-op in eval mode, but export records it).
    kwargs = {"drop_path_rate": 0.0, **dict(recorded.get("model_overrides") or {}), **overrides}
    return {"arch": arch, "mode": mode, "gamma": gamma, "patch_size": patch_size, **kwargs}


def _build(arguments: dict[str, Any], recorded: dict[str, Any], source: str) -> PooledBackbone:
    try:
        model = build_backbone(**arguments)
    except TypeError as err:  # a keyword the model does not take: say whose it is instead of a traceback
        recorded_overrides = dict(recorded.get("model_overrides") or {})
        named = {"arch", "mode", "gamma", "patch_size", "drop_path_rate"}
        whose = {k: ("the run's model_overrides" if k in recorded_overrides and recorded_overrides[k] == v
                     else "--model_overrides") for k, v in arguments.items() if k not in named}
        raise ValueError(f"cannot build {arguments['arch']} for {source} ({err}); keywords given: "
                         f"{', '.join(f'{k} ({w})' for k, w in whose.items()) or 'none'}: "
                         "drop the ones this arch does not take") from None
    if recorded.get("pos_embed_resampling") and hasattr(model, "pos_embed_resampling"):
        model.pos_embed_resampling = recorded["pos_embed_resampling"]  # a run that kept the reference's rule
    return model


def _check_arch_fits_the_run(arch: str | None, recorded_arch: str | None, recorded_mode: str, source: str) -> None:
    """--arch of another family than the run's (a ResNet for ViT weights) can never load: say so before building.

    Names this simpool does not know (DINO's ``deit_small``) are left to the weight check, which names the keys.
    """
    if not arch or not recorded_arch or arch == recorded_arch:
        return
    if not (is_known_arch(arch) and is_known_arch(recorded_arch)) or arch_family(arch) == arch_family(recorded_arch):
        return
    raise ValueError(f"the weights in {source} are a {recorded_arch} ({recorded_mode} mode, as their training args "
                     f"record); --arch {arch} does not fit them: drop --arch to load the {recorded_arch}, or pass "
                     f"weights of a {arch}")


# ----------------------------------------------------------------------------------------------------------
# the export folder
# ----------------------------------------------------------------------------------------------------------
def is_export_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_export_config(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an export folder, every field checked (``simpool.export_format``): untrusted input."""
    folder = Path(out_dir)
    config_path = folder / CONFIG_FILE
    if not folder.exists():
        raise ValueError(f"export folder {str(folder)!r} does not exist: check the path, or write one with "
                         "utils/export_backbone.py")
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is a file, not an export folder: load checkpoint files with load_model()")
    if not config_path.is_file():
        raise ValueError(
            f"{str(folder)!r} holds no {CONFIG_FILE}: pass a folder written by utils/export_backbone.py"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} cannot be read ({err}): re-run utils/export_backbone.py into "
                         f"{str(folder)!r}") from None
    return check_export_config(config, config_path)


def _build_exported(config: dict[str, Any]) -> PooledBackbone:
    """The backbone a checked ``config.json`` describes, with its position-embedding rule, without weights."""
    model = build_backbone(config["arch"], mode=config["mode"], gamma=config.get("gamma"), **config["build_kwargs"])
    if config.get("pos_embed_resampling") is not None:
        model.pos_embed_resampling = config["pos_embed_resampling"]
    return model


def load_backbone(out_dir: str | os.PathLike, device: str | torch.device | None = None) -> PooledBackbone:
    """Rebuild an exported backbone from its ``config.json`` and ``model.safetensors``; eval mode.

    The ViT's position-embedding rule recorded at export (``"reference"`` for weights trained by DINO / the
    SimPool fork) is restored and the weights load strictly, so the features equal those of the checkpoint's
    backbone bit for bit.

    Example:
        >>> model = load_backbone("exports/vits", device=torch.device("cpu"))
        >>> features = model(images)                     # (B, embed_dim)
    """
    folder = Path(out_dir)
    config = read_export_config(folder)
    weights = folder / config.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise ValueError(f"{str(weights)!r} is missing: re-run utils/export_backbone.py into {str(folder)!r}")
    try:
        model = _build_exported(config)
    except Exception as err:  # noqa: BLE001 - checked fields whose values a constructor still refuses
        why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
        raise ValueError(f"{folder / CONFIG_FILE} describes a model that cannot be built ({why}): export the "
                         "checkpoint again") from None
    try:
        state_dict = load_file(str(weights), device="cpu")
    except Exception as err:  # safetensors raises SafetensorError (not an OSError) for truncated/damaged files
        raise ValueError(f"{str(weights)!r} cannot be read ({type(err).__name__}: {err}): the export is damaged or "
                         f"incomplete; re-run utils/export_backbone.py into {str(folder)!r}") from None
    load_backbone_weights(model, state_dict)
    model.eval()
    return model.to(device) if device is not None else model
