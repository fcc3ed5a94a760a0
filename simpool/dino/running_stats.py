"""An epoch's running sums of the step statistics, kept on the device and read by name.

Every step adds its loss, teacher entropy, KL and prototypes in use -- counted only when its loss was finite,
so that a skipped step does not poison the means -- and one to ``finite_steps``. The sums stay on the device
(reading them synchronises, so the loop does it every ``--log_every`` steps), and all of them travel in one
tensor so that ranks combine them with one all-reduce.

    mean_x = sum over finite steps of x / finite_steps

Example:
    >>> sums = RunningSums(device)
    >>> sums.add(step(crops, schedule))            # a StepStats
    >>> sums.all_reduced().means()                 # {"loss": ..., "entropy": ..., "kl": ..., "prototypes_in_use": ...}
"""

from __future__ import annotations

import torch

from simpool.distributed import all_reduce_sum

__all__ = ["RunningSums"]


class RunningSums:
    """Sums of ``NAMES`` over the finite steps, and ``finite_steps`` (all in one device tensor)."""

    NAMES = ("loss", "entropy", "kl", "prototypes_in_use")

    def __init__(self, device: torch.device | str = "cpu", values: torch.Tensor | None = None) -> None:
        self.values = values if values is not None else torch.zeros(len(self.NAMES) + 1, device=device)

    def add(self, stats) -> None:
        """Add one step's ``StepStats`` (device tensors; no host sync)."""
        finite = stats.loss_is_finite
        step = torch.stack([stats.loss, stats.teacher_entropy, stats.kl, stats.prototypes_in_use])
        self.values[:-1] += torch.where(finite, step.float(), 0.0)
        self.values[-1] += finite.float()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[self.NAMES.index(name)]

    @property
    def finite_steps(self) -> torch.Tensor:
        return self.values[-1]

    def copy(self) -> RunningSums:
        return RunningSums(values=self.values.detach().float().clone())

    def __sub__(self, other: RunningSums) -> RunningSums:
        return RunningSums(values=self.values - other.values)

    def all_reduced(self) -> RunningSums:
        """A copy summed over the ranks (collective under DDP)."""
        return RunningSums(values=all_reduce_sum(self.values.detach().clone()))

    def means(self) -> dict[str, float]:
        """Each sum over the finite steps (0 when there were none); reads the device."""
        steps = max(float(self.finite_steps), 1.0)
        return {name: float(value) / steps for name, value in zip(self.NAMES, self.values[:-1].tolist())}
