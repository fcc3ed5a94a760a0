"""Numeric precision of a run: which one, the autocast context, and the gradient scaler that goes with it.

``--precision fp32|fp16|bf16`` in every driver; by default bf16 on CUDA (tensor cores, no loss scaling needed)
and fp32 on the CPU. The reference's ``--use_fp16 True/False`` still means fp16 / fp32 where a driver takes it.
Under autocast the matrix products run in 16 bits; losses and statistics are computed in float32 by the
callers. fp16 needs dynamic loss scaling (a ``GradScaler``); bf16 and fp32 do not, but a scaler with a fixed
scale of 1 is still the one on-device switch that skips an optimizer step whose gradients are not finite.

Example:
    >>> precision = resolve_precision(args.precision, device, use_fp16=args.use_fp16)   # "bf16" on a GPU
    >>> scaler = grad_scaler(device, precision)
    >>> with autocast(device, precision):
    ...     loss = criterion(model(images), labels)
    >>> scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()
"""

from __future__ import annotations

import torch

__all__ = ["AUTOCAST_DTYPES", "PRECISIONS", "autocast", "grad_scaler", "resolve_precision"]

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def resolve_precision(requested: str | None, device: torch.device, use_fp16: bool | None = None) -> str:
    """``requested`` when given; else the reference's ``--use_fp16`` (True: fp16, False: fp32); else bf16 on
    CUDA and fp32 elsewhere."""
    if requested:
        if requested not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {requested!r}")
        return requested
    if use_fp16 is not None:
        return "fp16" if use_fp16 else "fp32"
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """``torch.autocast`` to the precision's 16-bit type on ``device``; disabled (a no-op) for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str, skip_non_finite: bool = False) -> torch.amp.GradScaler:
    """A ``GradScaler``: dynamic loss scaling in fp16. In fp32 / bf16 it is disabled, or with
    ``skip_non_finite`` kept at a fixed scale of 1 (the caller resets it after each step) so that it still
    skips the optimizer step when a gradient is not finite, on the device, without a host sync."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, enabled=skip_non_finite)
