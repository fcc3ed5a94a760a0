"""Per-iteration schedules of the DINO recipe: lr, weight decay, teacher momentum and teacher temperature.

The cosine schedule and the lr scaling rule are the run layer's (:mod:`simpool.run.schedules`, shared with
fine-tuning); the teacher temperature's warm-up is DINO's own. All are numpy float64 arrays indexed by the global
iteration, as the reference's (torch's ``LRScheduler`` drives only an optimizer's lr, not weight decay, momentum
or the teacher temperature).

Example (ViT-S recipe, 100 epochs, batch 800):
    >>> lr = cosine_scheduler(scaled_lr(5e-4, 800), 1e-5, 100, niter_per_ep, warmup_epochs=10)
    >>> wd = cosine_scheduler(0.04, 0.4, 100, niter_per_ep)
    >>> momentum = cosine_scheduler(0.996, 1.0, 100, niter_per_ep)
    >>> teacher_temp = teacher_temp_schedule(0.04, 0.07, 30, 100, niter_per_ep)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simpool.dino.step import StepSchedule
from simpool.run.schedules import cosine_scheduler, scaled_lr  # shared with fine-tuning

__all__ = ["DINOSchedules", "cosine_scheduler", "scaled_lr", "teacher_temp_schedule"]


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


@dataclass(frozen=True)
class DINOSchedules:
    """The four per-iteration schedules of a run, and the ``StepSchedule`` of one iteration.

    Example:
        >>> schedules = DINOSchedules.build(args, niter_per_epoch=1251, samples_per_step=1024)
        >>> step(crops, schedules.at(index=42, epoch=0))
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_epochs: int

    @classmethod
    def build(cls, args, niter_per_epoch: int, samples_per_step: int) -> DINOSchedules:
        """From the flags: lr scaled by the global batch of one optimizer step (``scaled_lr``) with its warm-up,
        weight decay and teacher momentum cosine, the teacher temperature's warm-up."""
        epochs = args.epochs
        return cls(
            lr=cosine_scheduler(scaled_lr(args.lr, samples_per_step), args.min_lr, epochs, niter_per_epoch,
                                warmup_epochs=args.warmup_epochs),
            weight_decay=cosine_scheduler(args.weight_decay, args.weight_decay_end, epochs, niter_per_epoch),
            momentum=cosine_scheduler(args.momentum_teacher, 1.0, epochs, niter_per_epoch),
            teacher_temp=teacher_temp_schedule(args.warmup_teacher_temp, args.teacher_temp,
                                               args.warmup_teacher_temp_epochs, epochs, niter_per_epoch),
            freeze_last_layer_epochs=args.freeze_last_layer,
        )

    def at(self, index: int, epoch: int) -> StepSchedule:
        """The step's values at iteration ``index`` of epoch ``epoch`` (the head's last layer frozen early on)."""
        return StepSchedule(lr=self.lr[index], weight_decay=self.weight_decay[index], momentum=self.momentum[index],
                            teacher_temp=self.teacher_temp[index],
                            freeze_last_layer=epoch < self.freeze_last_layer_epochs)

    def record(self, index: int) -> dict[str, float]:
        """The values at ``index`` for the logs."""
        return {"lr": float(self.lr[index]), "wd": float(self.weight_decay[index]),
                "momentum": float(self.momentum[index]), "teacher_temp": float(self.teacher_temp[index])}
