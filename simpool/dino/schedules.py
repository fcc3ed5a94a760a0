"""Per-iteration schedules of the DINO recipe (learning rate, weight decay, teacher momentum and temperature).

``cosine_scheduler`` reproduces facebookresearch/dino's ``utils.cosine_scheduler`` value for value:
``warmup_epochs * niter_per_ep`` iterations of linear warm-up (``np.linspace`` from
``start_warmup_value`` to ``base_value``, both ends included), then for the remaining n iterations

    v_i = final + (base - final) * (1 + cos(pi * i / n)) / 2,    i = 0 .. n - 1

so the last value is just above ``final_value`` (as in the reference). Plain numpy arrays rather than
``torch.optim.lr_scheduler``: the same arrays drive lr, weight decay, teacher momentum and temperature (not only
optimizer lrs), are indexed by iteration on resume, and equal the reference's to the last bit.

Example (ViT-S recipe, 100 epochs, batch 800):
    >>> lr = cosine_scheduler(scaled_lr(5e-4, 800), 1e-5, 100, niter_per_ep, warmup_epochs=10)
    >>> wd = cosine_scheduler(0.04, 0.4, 100, niter_per_ep)
    >>> momentum = cosine_scheduler(0.996, 1.0, 100, niter_per_ep)
    >>> teacher_temp = teacher_temp_schedule(0.04, 0.07, 30, 100, niter_per_ep)

The schedules are numpy float64 arrays indexed by the global iteration, as the reference's (torch's
``LRScheduler`` drives only an optimizer's lr, not weight decay, momentum or the teacher temperature).
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler", "scaled_lr", "teacher_temp_schedule"]


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Linear warm-up then half-cosine decay; returns a float64 array of ``epochs * niter_per_ep`` values."""
    if epochs < 0 or niter_per_ep < 0:
        raise ValueError(f"cosine_scheduler: epochs ({epochs}), niter_per_ep ({niter_per_ep}) must be >= 0")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"cosine_scheduler: warmup_epochs ({warmup_epochs}) must be in [0, {epochs}]")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    decay_iters = epochs * niter_per_ep - warmup_iters
    i = np.arange(decay_iters)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / max(decay_iters, 1)))
    return np.concatenate((warmup, decay))


def scaled_lr(lr: float, global_batch: int) -> float:
    """DINO's linear scaling rule: ``lr * global_batch / 256`` (lr is quoted for a batch of 256)."""
    if global_batch < 1:
        raise ValueError(f"scaled_lr: global_batch must be >= 1, got {global_batch}")
    return lr * global_batch / 256.0


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, epochs: int, niter_per_ep: int
) -> np.ndarray:
    """Teacher temperature per iteration: a linear warm-up by epoch, then constant.

    Epoch e gets tau_e = ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)[e]`` for
    e < ``warmup_epochs`` (both ends included, as the reference) and ``teacher_temp`` after; every
    iteration of an epoch repeats its value. Returns ``epochs * niter_per_ep`` float64 values.

    Example:
        >>> teacher_temp_schedule(0.04, 0.07, 4, 5, niter_per_ep=2)
        array([0.04, 0.04, 0.05, 0.05, 0.06, 0.06, 0.07, 0.07, 0.07, 0.07])
    """
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(
            f"teacher_temp_schedule: warmup epochs ({warmup_epochs}) must lie in [0, epochs={epochs}]; "
            "shorten the teacher-temperature warm-up"
        )
    if min(warmup_teacher_temp, teacher_temp) <= 0:
        raise ValueError("teacher_temp_schedule: temperatures must be positive")
    per_epoch = np.concatenate(
        (np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs), np.full(epochs - warmup_epochs, teacher_temp))
    )
    return np.repeat(per_epoch, niter_per_ep)
