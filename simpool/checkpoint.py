"""Reading and writing checkpoints: safe loading, reference-format adaptation, atomic saves.

Formats ``load_pretrained`` accepts:

* full DINO checkpoints, ours or the reference's: ``{"teacher": {"backbone.*", "head.*"}, "student":
  {"module.backbone.*", ...}, ...}`` -- pick one with ``checkpoint_key``;
* backbone-only state dicts (as DINO publishes ViT weights), with or without ``module.``/``backbone.`` prefixes;
* facebookresearch-layout ConvNeXt weights (converted with timm's own converter);
* ``{"model": state_dict}`` / ``{"state_dict": ...}`` wrappers.

Everything is read with ``torch.load(weights_only=True)``: tensors and plain containers only. The reference stores
an ``argparse.Namespace`` under ``args``; that one class is allow-listed.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models.convnext import checkpoint_filter_fn as convnext_filter_fn
from torch import nn

from simpool.distributed import strip_wrapper_prefixes
from simpool.models import AUTO_GAMMA, default_gamma

log = logging.getLogger(__name__)

# Our own checkpoints carry this key; anything without it was written by DINO / the SimPool fork.
FORMAT_KEY = "simpool_format"
# 2: the optimizer has the head's last layer in groups of its own (``is_last_layer``); 1 had two groups.
FORMAT_VERSION = 2

_CLASSIFIER_PREFIXES = ("fc.", "head.weight", "head.bias", "head.fc.")

torch.serialization.add_safe_globals([argparse.Namespace])


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to change."""


@dataclass
class LoadedCheckpoint:
    """What ``load_pretrained`` found besides the weights."""

    path: str
    key: str | None
    reference_format: bool
    args: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (check --pretrained_weights / the path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a safe checkpoint"
        raise CheckpointError(f"cannot read {str(path)!r} as a weights-only torch checkpoint: {err}") from err


def args_as_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, no permission); the message names the path and the free
    space, and says that the previous file at that path is unchanged."""


# Temporary names atomic_save writes beside the target: ".<name>.<pid>-<random>.tmp".
# (and mkstemp's ".<name>.<8 random>.tmp" of earlier versions).
_TEMP_NAME = re.compile(r"^\..+\.(\d+-[0-9a-f]{8}|[a-z0-9_]{8})\.tmp$")


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free on its file system"


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch.save reports a failed write as RuntimeError("unexpected pos"), with
    the real OSError (ENOSPC, EDQUOT, EIO...) as its ``__context__``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    os_error = _os_error_in(err)
    if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason, fix = "the disk is full", "free space there or pick another output folder"
    elif os_error is not None and os_error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason, fix = "no permission to write there", "make the folder writable or pick another output folder"
    else:
        reason, fix = str(os_error or err), "check the folder"
    before = f"{path.name} is unchanged" if path.exists() else f"{path.name} was not created"
    return CheckpointWriteError(f"cannot write {path} ({reason}; {_free_space(path.parent)}); {before}: {fix}")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is always either the old or the new complete file.

    The bytes go to a temporary file ``.<name>.<pid>-<random>.tmp`` in the same folder, are flushed to disk,
    and replace ``path`` with one ``os.replace`` (atomic on POSIX). A crash or kill mid-write leaves the previous
    file untouched (and at worst the temporary one, which ``remove_stale_temp_files`` deletes). The file gets
    mode ``0o666 & ~umask`` like any file the process creates (``mkstemp``'s 0600 would lock a shared run folder
    away from the group). A full disk or a missing permission raises :class:`CheckpointWriteError` naming the
    path and the free space.

    Example:
        >>> atomic_save({"model": model.state_dict()}, "runs/a/checkpoint.pth")
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError | RuntimeError) and _os_error_in(err) is not None:
            raise _write_error(path, err) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON results, ``args.yaml``) so that readers see the old or the new file whole:
    a temporary file of ``atomic_save``'s naming (removed by ``remove_stale_temp_files`` after a kill), then one
    ``os.replace``. Errors as :class:`CheckpointWriteError`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException:  # e.g. Ctrl-C mid-write: no temporary file left behind either
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_save`` leaves behind when a process is killed mid-write.

    Call it where no other process is writing into ``folder`` (a run's rank 0 at start-up). Returns the
    removed paths.
    """
    removed = []
    for candidate in Path(folder).glob(".*.tmp"):
        if _TEMP_NAME.match(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def select_state_dict(checkpoint: Any, checkpoint_key: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Pick the state dict out of a checkpoint: ``checkpoint[checkpoint_key]``, a wrapper, or the dict itself."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict checkpoint, got {type(checkpoint).__name__}")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None
    for key in (checkpoint_key, "model", "state_dict"):
        if key and isinstance(checkpoint.get(key), dict):
            return checkpoint[key], key
    available = [k for k, v in checkpoint.items() if isinstance(v, dict)]
    raise CheckpointError(
        f"checkpoint has no {checkpoint_key!r} entry; it holds {available}: pass --checkpoint_key with one of them"
    )


def backbone_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile/DINO prefixes and drop the DINO head and classifier weights (ignored on purpose)."""
    has_backbone_prefix = any(strip_wrapper_prefixes(k).startswith("backbone.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        key = strip_wrapper_prefixes(key)
        if has_backbone_prefix:
            if not key.startswith("backbone."):
                continue  # the DINO head
            key = strip_wrapper_prefixes(key.removeprefix("backbone."))
        if key.startswith(_CLASSIFIER_PREFIXES):
            continue
        out[key] = value
    return out


def _convert_convnext_layout(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """facebookresearch ConvNeXt keys -> timm keys (timm's converter); SimPool keys pass through untouched."""
    pooling = {k: v for k, v in state_dict.items() if k.startswith("simpool.")}
    rest = {k: v for k, v in state_dict.items() if not k.startswith("simpool.")}
    converted = convnext_filter_fn(rest, model)
    return {**converted, **pooling}


def _mismatch_hints(model: nn.Module, missing: set[str], unexpected: set[str]) -> list[str]:
    hints = []
    if "cls_token" in missing:
        hints.append("this checkpoint has no [CLS] token: use --mode simpool")
    if "cls_token" in unexpected:
        hints.append("this checkpoint has a [CLS] token: use --mode official")
    if any(k.startswith("simpool.") for k in unexpected) and "cls_token" not in unexpected:
        hints.append("this checkpoint holds SimPool weights: use --mode simpool")
    if any(k.startswith("simpool.") and k != "simpool.beta" for k in missing) and "cls_token" not in missing:
        hints.append("this checkpoint has no SimPool weights: use --mode official")
    if "simpool.beta" in missing ^ unexpected:
        hints.append("SimPool's beta exists only with a gamma: check --gamma against the training run")
    if any(".blocks." in k or k.startswith(("blocks.", "layer", "stages.")) for k in missing | unexpected):
        hints.append(f"depth/width differ from --arch {getattr(model, 'arch', '?')}: check --arch and --patch_size")
    return hints


def _short(keys: set[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load that explains itself: missing, unexpected and wrongly-shaped keys, plus a hint."""
    expected = model.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    wrong_shape = {
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    }
    if missing or unexpected or wrong_shape:
        lines = [f"weights do not fit {type(model).__name__} (arch {getattr(model, 'arch', '?')}, "
                 f"mode {getattr(model, 'mode', '?')}):"]
        if missing:
            lines.append(f"  missing keys: {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_short(unexpected)}")
        if wrong_shape:
            lines.append(f"  wrong shapes: {_short(wrong_shape)}")
        lines += [f"  hint: {h}" for h in _mismatch_hints(model, missing, unexpected)]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, checkpoint_key: str | None = "teacher"
) -> LoadedCheckpoint:
    """Load backbone weights from ``path`` into ``model`` (strict), reproducing the reference's features.

    Weights written by the reference code switch a ViT to its position-embedding rule
    (``model.pos_embed_resampling = "reference"``), which its weights were trained with.
    A gamma that contradicts the checkpoint's recorded ``args`` is reported with a warning.

    Example:
        >>> model = build_backbone("vit_small", mode="simpool")
        >>> info = load_pretrained(model, "runs/vits/checkpoint.pth", checkpoint_key="teacher")
    """
    checkpoint = safe_load(path)
    state_dict, key = select_state_dict(checkpoint, checkpoint_key)
    reference_format = not (isinstance(checkpoint, dict) and FORMAT_KEY in checkpoint)
    state_dict = backbone_state_dict(state_dict)
    if any(k.startswith("downsample_layers.") for k in state_dict):
        state_dict = _convert_convnext_layout(state_dict, model)
    load_backbone_weights(model, state_dict)

    if reference_format and hasattr(model, "pos_embed_resampling"):
        model.pos_embed_resampling = "reference"
        log.info("%s: reference-format ViT weights, position embeddings resampled as the reference does", path)
    args = args_as_dict(checkpoint.get("args")) if isinstance(checkpoint, dict) else {}
    _warn_on_args_conflict(model, args, path)
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    return LoadedCheckpoint(str(path), key, reference_format, args, epoch if isinstance(epoch, int) else None)


def _warn_on_args_conflict(model: nn.Module, args: dict[str, Any], path: Any) -> None:
    if getattr(model, "mode", None) != "simpool" or "gamma" not in args:
        return
    recorded, ours = args["gamma"], getattr(model, "gamma", None)
    if recorded == AUTO_GAMMA:  # the run asked for the arch's default
        recorded = default_gamma(args.get("arch", getattr(model, "arch", "")))
        if recorded is None:
            return
    if recorded != ours and not (recorded is not None and ours is not None and abs(recorded - ours) < 1e-9):
        warnings.warn(
            f"{path} was trained with gamma={recorded}, but the model uses gamma={ours}: "
            f"pass --gamma {recorded} to get the features it was trained for",
            stacklevel=2,
        )
