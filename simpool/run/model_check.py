"""A model built on the ``meta`` device before the run: its flags' values checked, its size known, nothing written.

``--model_overrides depth=abc`` (or ``depth=-1``, ``embed_dim=50`` with 3 heads) passes every flag check and
fails only where timm builds the model, after the run has written ``args.yaml``. Building it on the ``meta``
device first costs no memory and no initialisation (tensors have shapes, no data: a ViT-B in 0.1 s) and raises
the same errors, so a driver calls :func:`checked_build` while it checks its flags; the parameter count it gives
sizes the free space one checkpoint needs (:class:`simpool.run.output.OutputFolder`).

A model that cannot be built on ``meta`` for reasons of its own (an ``.item()`` in some timm constructor) is
built once more on the CPU before the values are blamed.

Example:
    >>> model = checked_build(lambda: build_backbone("vit_tiny", depth=-1), "--model_overrides depth=-1")
    simpool.run.config.ConfigError: --model_overrides depth=-1: cannot build this model (RuntimeError: number of
    steps must be non-negative)
    >>> parameter_count(checked_build(lambda: build_backbone("vit_small"), "--arch vit_small"))
    21960577
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from simpool.attention_maps import model_stride
from simpool.run.config import ConfigError

__all__ = ["check_image_size", "checked_build", "parameter_count", "weights_are_finite"]


def checked_build(build: Callable[[], nn.Module], what: str) -> nn.Module:
    """``build()`` on the meta device; a :class:`ConfigError` ``"<what>: cannot build this model (<why>)"`` when it
    fails there and on the CPU alike (a model the meta device cannot build comes back built on the CPU)."""
    try:
        with torch.device("meta"):
            return build()
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - any error of a constructor; the CPU build below tells which it was
        pass
    try:
        return build()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - timm raises TypeError, ValueError, AssertionError, RuntimeError...
        why = type(err).__name__ + (f": {str(err).strip().splitlines()[0][:200]}" if str(err).strip() else "")
        raise ConfigError(f"{what}: cannot build this model ({why})") from None


def parameter_count(module: nn.Module) -> int:
    """Numbers in ``module``'s state (parameters and buffers): what a float32 copy of it holds."""
    return sum(t.numel() for t in module.state_dict().values())


def check_image_size(model: nn.Module, image_size: int, flag: str = "--image_size") -> None:
    """A ViT cuts its input into patches: an image side that is not a multiple of the patch would fail in the
    patch embedding (an ``AssertionError`` deep in timm); a ConfigError naming the nearest sizes instead.
    Convnets take any side (their last map is then rounded)."""
    inner = getattr(model, "model", model)  # TimmBackbone wraps the timm model
    patched = isinstance(getattr(model, "patch_size", None), int) or hasattr(inner, "patch_embed")
    if not patched or getattr(model, "is_convnet", False):
        return
    stride = model_stride(model)
    if image_size % stride:
        lower, upper = max(stride, image_size // stride * stride), (image_size // stride + 1) * stride
        raise ConfigError(f"{flag} {image_size} is not a multiple of the model's patch size {stride}: use "
                          f"{lower} or {upper}")


@torch.no_grad()
def weights_are_finite(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite (one device synchronisation): what a trainer checks before
    it writes a checkpoint over the last good one (an update from a finite loss can still overflow)."""
    flags = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True
