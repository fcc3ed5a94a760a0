"""The export folder's ``config.json``, checked field by field: an export folder is untrusted input.

A folder passed as ``--pretrained_weights`` (or to ``load_backbone``, ``torch.hub.load``, ``load_finetuned``) may
have been edited by hand, damaged, or written by something else. Every loader reads its ``config.json`` through
:func:`check_export_config`, so a wrong type, a missing field, a keyword of another model family or a file name
pointing out of the folder is one ``ValueError`` line naming the field, never a ``TypeError`` / ``KeyError``
traceback from deep inside a model constructor.

Fields (written by :func:`simpool.export.export_backbone`):

==========================  ==========================================================================
``format``                  ``"simpool-backbone"``; ``format_version``: an integer, at most this version's
``arch``, ``mode``          a known arch (ours or any timm model), ``simpool`` or ``official``
``family``                  the arch's family (``vit``, ``resnet``, ``convnext``, ``timm``)
``gamma``                   ``null`` or a finite number > 0
``patch_size``              ``null`` or an integer >= 1; ``embed_dim``: an integer >= 1
``pos_embed_resampling``    ``null``, ``"exact"`` or ``"reference"`` (ViTs only)
``build_kwargs``            an object of keywords the arch's class takes (a ``layers`` for a ViT is refused)
``weights``                 a file name inside the folder (no path separators)
``timm``, ``classifier``    ``null`` or objects whose ``file`` is a file name inside the folder
``source``, ``training``    objects (informative)
==========================  ==========================================================================

Example:
    >>> check_export_config({"format": "simpool-backbone", "arch": "vit_small", ...}, Path("exports/a/config.json"))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from simpool.models import MODES, accepted_keywords, arch_family, is_known_arch

__all__ = ["CONFIG_FILE", "EXPORT_FORMAT", "EXPORT_VERSION", "WEIGHTS_FILE", "check_export_config"]

EXPORT_FORMAT = "simpool-backbone"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bare_file_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


def _problems(config: dict[str, Any]) -> list[str]:
    """What is wrong with ``config``, field by field (empty: nothing)."""
    version = config.get("format_version", 0)
    if not _is_int(version):
        return [f"format_version must be an integer, got {version!r}"]
    if version > EXPORT_VERSION:
        return [f"format_version {version} is newer than this simpool ({EXPORT_VERSION}): upgrade simpool"]
    arch = config.get("arch")
    if not isinstance(arch, str) or not arch:
        return [f"arch must be a model name, got {arch!r}" if "arch" in config else "arch is missing"]
    if not is_known_arch(arch):
        return [f"arch {arch!r} is neither a simpool arch nor a timm model"]
    problems = []
    if config.get("mode") not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}, got {config.get('mode')!r}")
    family = arch_family(arch)
    if config.get("family", family) != family:
        problems.append(f"family {config.get('family')!r} is not the family of {arch} ({family})")
    gamma = config.get("gamma")
    if gamma is not None and not (isinstance(gamma, int | float) and not isinstance(gamma, bool)
                                  and math.isfinite(gamma) and gamma > 0):
        problems.append(f"gamma must be null or a finite number > 0, got {gamma!r}")
    for name in ("patch_size", "embed_dim"):
        value = config.get(name)
        if (value is not None or name == "embed_dim") and not (_is_int(value) and value >= 1):
            problems.append(f"{name} must be an integer >= 1, got {value!r}")
    resampling = config.get("pos_embed_resampling")
    if resampling not in (None, "exact", "reference") or (resampling is not None and family != "vit"):
        problems.append(f"pos_embed_resampling must be null, 'exact' or 'reference' (ViTs only), got {resampling!r}")
    kwargs = config.get("build_kwargs")
    if not isinstance(kwargs, dict):
        problems.append(f"build_kwargs must be an object, got {kwargs!r}")
    else:
        accepted = accepted_keywords(arch)
        foreign = sorted(set(kwargs) - accepted) if accepted is not None else []
        if foreign:
            problems.append(f"build_kwargs {foreign} are not keywords of {arch} ({family} family)")
    if not _bare_file_name(config.get("weights", WEIGHTS_FILE)):
        problems.append(f"weights must be a file name inside the folder, got {config.get('weights')!r}")
    for name in ("timm", "classifier"):
        entry = config.get(name)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not _bare_file_name(entry.get("file")):
            problems.append(f"{name} must be null or an object whose file is a file name inside the folder")
    if config.get("timm") and not (isinstance(config["timm"].get("model_name"), str)
                                   and isinstance(config["timm"].get("kwargs", {}), dict)):
        problems.append("timm must name a model_name (a string) and kwargs (an object)")
    classifier = config.get("classifier")
    if classifier and "num_classes" in classifier and not (_is_int(classifier["num_classes"])
                                                           and classifier["num_classes"] >= 1):
        problems.append(f"classifier.num_classes must be an integer >= 1, got {classifier['num_classes']!r}")
    for name in ("source", "training"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            problems.append(f"{name} must be an object, got {type(config[name]).__name__}")
    return problems


def check_export_config(config: Any, path: Path) -> dict[str, Any]:
    """``config`` (the parsed ``config.json`` at ``path``) when it is a valid simpool export; else a ``ValueError``
    naming the first fields at fault and the fix."""
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a simpool export (not a JSON object)")
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a simpool export (format {config.get('format')!r})")
    problems = _problems(config)
    if problems:
        raise ValueError(f"{path} is damaged: {'; '.join(problems[:3])}: export the checkpoint again "
                         f"(simpool-export CHECKPOINT {path.parent})")
    return config
