"""Collapse alarms: tell a run that has collapsed, which way, and what usually helps.

DINO collapses in two ways (Caron et al. 2021, sec. 5.3), both visible in three numbers the step already has:

* **uniform**: the teacher's output is flat. Its entropy H(q) approaches log K (K = ``--out_dim``) and the
  student soon matches it, so KL(q || p) -> 0 and nothing is learnt. Too much centring for the sharpening.
* **one prototype**: every image goes to the same prototype. The effective number of prototypes in use,
  exp(H(mean_b q_b)) of the batch-mean teacher distribution, approaches 1 (it is K when all are used
  equally). Too much sharpening for the centring.

``CollapseMonitor`` is fed the training loop's running sums (:class:`~simpool.dino.running_stats.RunningSums`)
at every log step, takes the means over the steps
since its previous call (all-reduced, so that every rank decides alike), and classifies them. A run that sits
in one region for ``patience`` log points in a row gets one warning naming the mode and the usual remedies;
it is warned again only after it has left the region. ``--stop_on_collapse True`` turns the warning into a
saved checkpoint and exit code 1 (``simpool.dino.train``).

Example:
    >>> monitor = CollapseMonitor(out_dim=65536)
    >>> reading, warning = monitor.observe(sums)   # RunningSums: loss, entropy, KL, prototypes in use, steps
    >>> reading.mode, warning                      # e.g. ("uniform", "collapse alarm: uniform collapse ...")
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simpool.dino.running_stats import RunningSums

REMEDIES = {
    "uniform": ("the teacher's output is flat and the student has matched it: sharpen more (lower --teacher_temp "
                "and --warmup_teacher_temp, e.g. 0.04), centre less (raise --center_momentum, e.g. 0.99), "
                "lower --lr, or enlarge the batch (--batch_size_per_gpu, --accum_steps)"),
    "one_prototype": ("every image goes to the same few prototypes: sharpen less (raise --teacher_temp, or a "
                      "longer --warmup_teacher_temp_epochs), centre more (lower --center_momentum, e.g. 0.9), "
                      "lower --lr, or enlarge the batch (--batch_size_per_gpu, --accum_steps) for a better centre"),
}


@dataclass(frozen=True)
class CollapseReading:
    """Means over one log window; ``mode`` is "uniform", "one_prototype" or None (healthy)."""

    entropy: float
    kl: float
    prototypes_in_use: float
    out_dim: int
    mode: str | None

    @property
    def entropy_fraction(self) -> float:
        """H(q) / log K: 1 for a flat teacher, 0 for a one-hot one."""
        return self.entropy / math.log(self.out_dim)


def collapse_mode(entropy: float, kl: float, prototypes_in_use: float, out_dim: int,
                  uniform_entropy: float = 0.95, uniform_kl: float = 0.1, one_prototype: float = 2.0) -> str | None:
    """The collapse region (entropy, KL, prototypes in use) lie in, or None.

    uniform: H >= ``uniform_entropy`` * log K and KL <= ``uniform_kl`` * log K;
    one prototype: exp(H(batch-mean q)) <= ``one_prototype``.
    """
    log_k = math.log(out_dim)
    if entropy >= uniform_entropy * log_k and kl <= uniform_kl * log_k:
        return "uniform"
    if prototypes_in_use <= one_prototype:
        return "one_prototype"
    return None


class CollapseMonitor:
    """Classifies each log window and warns after ``patience`` collapsed windows in a row (see module docstring).

    Args:
        out_dim: K, the number of prototypes.
        patience: log points in a collapse region before the warning.
        **thresholds: ``uniform_entropy``, ``uniform_kl``, ``one_prototype`` of ``collapse_mode``.
    """

    def __init__(self, out_dim: int, patience: int = 3, **thresholds: float) -> None:
        self.out_dim, self.patience, self.thresholds = out_dim, patience, thresholds
        self.previous: RunningSums | None = None
        self.streak_mode: str | None = None
        self.streak = 0
        self.warned = False

    def window(self, sums: RunningSums) -> RunningSums:
        """This window's sums: ``sums`` minus those of the previous call (sums restart at 0 every epoch)."""
        sums = sums.copy()
        previous, self.previous = self.previous, sums
        if previous is not None and previous.finite_steps <= sums.finite_steps:
            return sums - previous
        return sums

    def observe(self, sums: RunningSums) -> tuple[CollapseReading | None, str | None]:
        """(reading of the window since the last call, the warning if one is due now); None readings when the
        window holds no finite step. Collective under DDP: call it on every rank."""
        window = self.window(sums).all_reduced()
        if float(window.finite_steps) <= 0:
            return None, None
        means = window.means()
        entropy, kl, prototypes = means["entropy"], means["kl"], means["prototypes_in_use"]
        mode = collapse_mode(entropy, kl, prototypes, self.out_dim, **self.thresholds)
        reading = CollapseReading(entropy, kl, prototypes, self.out_dim, mode)
        if mode != self.streak_mode:
            self.streak_mode, self.streak, self.warned = mode, 0, False
        self.streak += 1
        if mode is None or self.warned or self.streak < self.patience:
            return reading, None
        self.warned = True
        return reading, self.message(reading)

    def message(self, reading: CollapseReading) -> str:
        name = reading.mode.replace("_", " ")
        return (f"collapse alarm: {name} collapse for the last {self.streak} log points (teacher entropy "
                f"{reading.entropy:.3f} = {reading.entropy_fraction:.2f} log K, KL {reading.kl:.4f}, "
                f"{reading.prototypes_in_use:.1f} of {self.out_dim} prototypes in use): {REMEDIES[reading.mode]}")
