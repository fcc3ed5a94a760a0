"""Export a trained backbone to a self-describing folder (read back by ``simpool.loading.load_backbone``).

A DINO checkpoint holds much more than the backbone (head, optimizer, loss centre, RNG...) and needs the
training flags to be rebuilt. ``export_backbone`` writes a folder that needs nothing else::

    OUT_DIR/model.safetensors       the backbone's state dict (safetensors: no pickle, memory-mappable)
    OUT_DIR/config.json             arch, mode, gamma, patch_size, embed_dim, family, pos_embed_resampling,
                                    the keywords that rebuild it, a summary of the training run
    OUT_DIR/timm_model.safetensors  official mode only: the same weights as a plain timm state dict
    OUT_DIR/model.onnx              with --onnx (``export_onnx``): images (B, 3, H, W) -> features, dynamic B, H, W

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

import json
import logging
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from simpool.checkpoint import safe_load
from simpool.loading import CONFIG_FILE, EXPORT_FORMAT, EXPORT_VERSION, WEIGHTS_FILE, is_export_dir, load_model

__all__ = ["CLASSIFIER_FILE", "ONNX_FILE", "TIMM_WEIGHTS_FILE", "OnnxUnavailable", "check_replaceable",
           "export_backbone", "export_onnx", "onnx_max_relative_error", "remove_stale_staging", "require_onnx",
           "timm_equivalent", "training_summary"]

log = logging.getLogger(__name__)

TIMM_WEIGHTS_FILE = "timm_model.safetensors"
# Checkpoints of finetune.py also carry a linear head ("head.weight"/"head.bias" beside "backbone.*" in "model").
CLASSIFIER_FILE = "classifier.safetensors"

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


def _export_classifier(checkpoint: str | os.PathLike, out: Path) -> dict[str, Any] | None:
    """A finetune.py checkpoint's linear head -> OUT_DIR/classifier.safetensors; None for other checkpoints."""
    state = safe_load(checkpoint)
    info = state.get("classifier") if isinstance(state, dict) else None
    if not isinstance(info, dict):
        return None
    head = {k.removeprefix("head."): v.contiguous() for k, v in state["model"].items() if k.startswith("head.")}
    _save(head, out / CLASSIFIER_FILE)
    return {"file": CLASSIFIER_FILE, "num_classes": int(head["weight"].shape[0]), **_jsonable(info)}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.save_file``, then the mode any file of this process gets (``0o666 & ~umask``): safetensors
    writes 0600, which locks a shared export away from the group."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# Files an export folder may hold besides config.json: what export_backbone and the evaluators write there.
_EXPORT_FILES = {WEIGHTS_FILE, CONFIG_FILE, TIMM_WEIGHTS_FILE, CLASSIFIER_FILE, "model.onnx", "knn.json",
                 "attention.json", ".simpool.lock"}
# Working names beside OUT_DIR: the folder being written, and the previous export while it is replaced.
_STAGING = re.compile(r"^\.(?P<name>.+)\.\d+-[0-9a-f]{8}\.(?:new|old)-export$")


def check_replaceable(out: Path) -> None:
    """``out`` may become an export folder: absent, empty, or an export folder (replaced whole); else ValueError.

    A folder holding anything else (a user's files) is never replaced: the export would delete them."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not an export folder: pick another output folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FILES)
    if others and not is_export_dir(out):
        raise ValueError(f"{out} exists and is not an export folder (it holds {', '.join(others[:5])}): an export "
                         "replaces its folder whole; pick another output folder, or empty it")


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the working folders a killed export left beside ``out`` (call it while holding the folder's lock)."""
    removed = []
    if out.parent.is_dir():
        for candidate in out.parent.iterdir():
            match = _STAGING.match(candidate.name)
            if match and match.group("name") == out.name and candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
    return removed


def _replace(staging: Path, out: Path) -> None:
    """Put ``staging`` in the place of ``out``: the old folder is moved aside, the new one renamed into place, the
    old one removed afterwards; readers see the old export or the new one, never a mix."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / staging.name.replace(".new-export", ".old-export")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_backbone(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, which: str = "teacher",
    extra: Callable[[Path], None] | None = None, claim: Callable[[Path], None] | None = None, **model_args: Any
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``timm_model.safetensors`` in official mode) into ``out_dir``,
    whole: everything is written into a folder beside it (``.<name>.<pid>-<hex>.new-export``) that then replaces
    ``out_dir`` in one rename, so a failure or a kill at any point leaves the previous export as it was and an
    export of another model leaves none of the old one's files behind.

    Args:
        checkpoint: a training checkpoint (ours or the reference's) or a backbone-only state dict.
        out_dir: absent, empty or an export folder (replaced whole); its parents are created.
        which: ``"teacher"`` (DINO's evaluated network) or ``"student"``.
        extra: called with the folder being written, before it replaces ``out_dir`` (the ONNX file of ``--onnx``).
        claim: called with ``out_dir`` once the weights are read and fit, before anything is written (the command
            line creates the parent folder and takes its lock there).
        **model_args: ``arch``, ``mode``, ``gamma``, ``patch_size`` and timm keywords such as ``depth=2``, as
            :func:`simpool.loading.load_model` takes them: they override what the checkpoint's args say, and
            backbone-only files, which record no args, need ``arch`` and ``mode``.

    Returns the output folder.
    """
    if is_export_dir(checkpoint):
        raise ValueError(f"{str(checkpoint)!r} is an export folder already: pass the training checkpoint")
    out = Path(out_dir)
    check_replaceable(out)
    model, source = load_model(checkpoint, which, **model_args)
    if claim is not None:
        claim(out)
    staging = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.new-export"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:  # e.g. a parent that is a file (NotADirectoryError / FileExistsError)
        blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else err.strerror
        raise ValueError(f"cannot create the export folder {out}: {why}; pick another output folder") from None
    try:
        _write_export(model, source, checkpoint, which, staging)
        if extra is not None:
            extra(staging)
        _replace(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(out.parent).free / 2**20
        raise ValueError(f"cannot write the export {out} ({err.strerror}; {free:.1f} MiB free there); the previous "
                         "export, if any, is unchanged") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s %s (%s mode) to %s", which, model.arch, model.mode, out)
    return out


def _write_export(model: nn.Module, source: Any, checkpoint: str | os.PathLike, which: str, folder: Path) -> None:
    """The files of one export into ``folder`` (the staging folder of :func:`export_backbone`)."""
    loaded = source.checkpoint
    _save(plain_state_dict(model), folder / WEIGHTS_FILE)
    timm_entry = None
    if model.mode == "official":
        name, kwargs, prefix = timm_equivalent(model)
        timm_state = plain_state_dict(model, strip_prefix=prefix)
        _check_timm_accepts(name, kwargs, timm_state)
        _save(timm_state, folder / TIMM_WEIGHTS_FILE)
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
        "classifier": _export_classifier(checkpoint, folder),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# ONNX (optional extra: pip install 'simpool[onnx]')
# ----------------------------------------------------------------------------------------------------------
ONNX_FILE = "model.onnx"
ONNX_INSTALL = "pip install 'simpool[onnx]' (or: pip install 'onnx>=1.15' 'onnxruntime>=1.17')"
ONNX_OPSET = 17


class OnnxUnavailable(ValueError):
    """``onnx`` / ``onnxruntime`` are not installed; the message gives the pip command."""


def require_onnx() -> None:
    """Import onnx and onnxruntime or raise :class:`OnnxUnavailable` naming the pip command (before any work)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise OnnxUnavailable(f"ONNX export needs the onnx extra ({err}): {ONNX_INSTALL}") from None


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: int | None = None) -> Path:
    """Write ``model`` (images (B, 3, H, W) -> features (B, embed_dim)) as ONNX with dynamic batch, H and W.

    Traced by ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: the dynamo one needs onnxscript,
    which this project does not depend on) at ``image_size`` (default: the ViT's ``img_size`` or 224) in eval mode,
    opset 17, checked with ``onnx.checker``. ViT position embeddings are resampled inside the graph for the input's
    grid, by either rule (:mod:`simpool.models.pos_embed`): weights trained by the reference code compute their
    size-dependent ``scale_factor`` from the input's height and width in the graph. Returns ``path``.

    Example:
        >>> export_onnx(load_backbone("exports/vits"), "exports/vits/model.onnx")
        >>> onnxruntime.InferenceSession("exports/vits/model.onnx").run(None, {"images": batch})[0].shape
        (8, 384)
    """
    require_onnx()
    import inspect

    import onnx

    size = image_size or getattr(model, "build_kwargs", {}).get("img_size", 224)
    axes = {0: "batch", 2: "height", 3: "width"}
    device = next(model.parameters()).device
    example = torch.randn(1, 3, size, size, device=device)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    was_training = model.training
    model.eval()
    path = Path(path)
    try:
        # TracerWarnings flag Python-side shape arithmetic; the parity check (onnx_max_relative_error) is the proof.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": axes, "features": {0: "batch"}}, opset_version=ONNX_OPSET,
                              **kwargs)
    finally:
        model.train(was_training)
    onnx.checker.check_model(str(path))
    return path


def onnx_max_relative_error(model: nn.Module, path: str | os.PathLike,
                            shapes: list[tuple[int, int, int, int]]) -> float:
    """Largest ``max|onnx - torch| / max|torch|`` over random inputs of ``shapes``, onnxruntime on the CPU."""
    require_onnx()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    model = model.eval()
    for shape in shapes:
        images = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = model(images.to(device)).float().cpu()
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    return worst
