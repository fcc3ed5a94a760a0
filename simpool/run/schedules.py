"""Per-iteration schedules and the learning-rate scaling rule every trainer uses (DINO pretraining, fine-tuning).

``cosine_scheduler`` reproduces facebookresearch/dino's ``utils.cosine_scheduler`` value for value:
``warmup_epochs * niter_per_ep`` iterations of linear warm-up (``np.linspace`` from
``start_warmup_value`` to ``base_value``, both ends included), then for the remaining n iterations

    v_i = final + (base - final) * (1 + cos(pi * i / n)) / 2,    i = 0 .. n - 1

so the last value is just above ``final_value`` (as in the reference). Plain numpy float64 arrays indexed by the
global iteration rather than ``torch.optim.lr_scheduler``: the same arrays drive lr, weight decay, teacher
momentum and temperature (not only optimizer lrs), are indexed by iteration on resume, and equal the
reference's to the last bit. ``scaled_lr`` is the linear scaling rule every recipe quotes its lr with.

Example (ViT-S recipe, 100 epochs, batch 800):
    >>> lr = cosine_scheduler(scaled_lr(5e-4, 800), 1e-5, 100, niter_per_ep, warmup_epochs=10)
    >>> wd = cosine_scheduler(0.04, 0.4, 100, niter_per_ep)
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler", "scaled_lr"]


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
