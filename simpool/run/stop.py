"""When a run stops before its end, every rank stops at the same step: signals, the agreed stop, the stop reason.

A cluster ends a job by signalling every process of it (SLURM: SIGTERM, or SIGUSR1 with ``--signal``;
``docker stop`` / Kubernetes: SIGTERM to the process group), a user by Ctrl-C (SIGINT to the terminal's
foreground process group). :class:`StopSignals` turns those signals into a flag (installed first thing, so a
signal during set-up is remembered rather than fatal); the loop reads it at its next safe point, through
:meth:`StopControl.agree`: one all-reduce of a few CPU integers over gloo (no device synchronisation, see
:func:`simpool.distributed.any_and_all`), so that a signal that reached one rank only stops all of them after the
same step, together with ``--exit_after_iterations``. The driver then saves and ends with :func:`exit_code`:
0 after SIGTERM / SIGUSR1 (``launch/torchrun.py`` learns from :func:`write_preemption_marker` that the exit was a
clean stop, and job scripts requeue), 130 after Ctrl-C (128 + SIGINT, what a shell reports for an interrupted
command: a user's stop, not a requeue). The first Ctrl-C restores SIGINT's default action, so a second one ends
the process at once (a save in progress is abandoned: the checkpoint it was replacing stays, whole).

Drivers without a loop of steps (k-NN, export, ...) install nothing: Ctrl-C raises ``KeyboardInterrupt``, which
:func:`simpool.run.process.driver` turns into one line and exit 130 (every file is written whole or not at all).

Example:
    >>> control = StopControl(exit_after_iterations=args.exit_after_iterations)   # first thing in the driver
    >>> for batch in loader:
    ...     step(batch); iteration += 1
    ...     agreed = control.agree(iteration, [batch is not None])    # collective, every rank, every step
    ...     if agreed.stop is not None:
    ...         save(); print(control.describe(agreed.stop, iteration, "runs/a/checkpoint.pth")); break
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpool.data.sampler import PREEMPTION_SIGNALS
from simpool.distributed import any_and_all, is_main_process

__all__ = ["INTERRUPT_EXIT_CODE", "PREEMPTION_DIR_VARIABLE", "Agreement", "RunEnd", "StopControl", "StopReason",
           "StopSignals", "exit_code", "restore_signal_handlers", "write_preemption_marker"]

# 128 + SIGINT: what a shell reports for a command ended by Ctrl-C.
INTERRUPT_EXIT_CODE = 128 + int(signal.SIGINT)

# Set by launch/torchrun.py: a folder where each rank that exits after a clean preemption save leaves a file.
PREEMPTION_DIR_VARIABLE = "SIMPOOL_PREEMPTION_DIR"


class StopReason(enum.Enum):
    """Why a run stopped before its last epoch (after saving)."""

    SIGNAL = "preempted"  # SIGTERM / SIGUSR1 on any rank
    INTERRUPT = "interrupted"  # Ctrl-C (SIGINT) on any rank
    EXIT_AFTER_ITERATIONS = "stopped by --exit_after_iterations"
    COLLAPSE = "stopped by the collapse alarm (--stop_on_collapse)"

    @property
    def by_signal(self) -> bool:
        """A stop asked for from outside (preemption or Ctrl-C), as opposed to one the run decided."""
        return self in (StopReason.SIGNAL, StopReason.INTERRUPT)


# The handlers StopSignals replaced, to put back at the end of a driver (in-process runs: tests, notebooks).
_replaced: dict[int, object] = {}


class StopSignals:
    """Set by SIGTERM / SIGUSR1 / SIGINT in this process; read by the loop at its next safe point.

    The first SIGINT also restores SIGINT's default action: a second Ctrl-C ends the process at once. Loader
    workers ignore all three (``simpool.data.sampler.ignore_preemption_signals``): the main process ends them
    itself after its save.
    """

    def __init__(self) -> None:
        self.raised = False
        self.interrupted = False
        self.signal_name: str | None = None
        for sig in (*PREEMPTION_SIGNALS, signal.SIGINT):
            previous = signal.signal(sig, self._interrupt if sig == signal.SIGINT else self._handler)
            _replaced.setdefault(int(sig), previous)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.raised = True
        self.signal_name = signal.Signals(signum).name

    def _interrupt(self, signum, frame) -> None:
        self._handler(signum, frame)
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C: the default action, at once
        if is_main_process():  # os.write: no lock a signal handler could find held
            os.write(2, b"interrupted (Ctrl-C): stopping at the next step (the run saves there); press Ctrl-C "
                        b"again to quit at once (the last saved checkpoint stays whole)\n")


def restore_signal_handlers() -> None:
    """Put back the handlers :class:`StopSignals` replaced (the end of a driver run in-process)."""
    for signum, previous in _replaced.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _replaced.clear()


@dataclass(frozen=True)
class Agreement:
    """What all ranks agreed on: the stop (None: go on) and, per extra local flag, set on any / on every rank."""

    stop: StopReason | None
    on_any: list[bool] = field(default_factory=list)
    on_all: list[bool] = field(default_factory=list)


class StopControl:
    """The one stop mechanism of every driver: signals on any rank, or ``--exit_after_iterations`` reached."""

    def __init__(self, exit_after_iterations: int = 0) -> None:
        self.signals = StopSignals()
        self.exit_after_iterations = exit_after_iterations
        self.stopped: StopReason | None = None  # what asked_to_stop agreed on

    def asked_to_stop(self) -> bool:
        """Collective: whether a signal on any rank asks the run to stop now (``stopped`` then says which); the
        check a loop without its own iteration count passes down (the probes' epochs)."""
        reason = self.agree(0).stop
        if reason is not None and reason.by_signal:
            self.stopped = reason
            return True
        return False

    def reached_exit_iteration(self, iteration: int) -> bool:
        return 0 < self.exit_after_iterations <= iteration

    def agree(self, iteration: int, flags: Sequence[bool] = ()) -> Agreement:
        """Collective (every rank, same point): stop or not, plus any / all of ``flags`` over the ranks, in one
        CPU all-reduce. Ctrl-C on any rank makes the stop an interruption on every rank (all exit 130)."""
        on_any, on_all = any_and_all([self.signals.raised, self.signals.interrupted, *flags])
        if on_any[1]:
            stop = StopReason.INTERRUPT
        elif on_any[0]:
            stop = StopReason.SIGNAL
        elif self.reached_exit_iteration(iteration):
            stop = StopReason.EXIT_AFTER_ITERATIONS
        else:
            stop = None
        return Agreement(stop, on_any[2:], on_all[2:])

    def describe(self, reason: StopReason, iteration: int, saved: str) -> str:
        """The last line of a stopped run: why, what was ``saved`` (e.g. "runs/a/checkpoint.pth at epoch 2"), and
        how to continue."""
        if reason is StopReason.EXIT_AFTER_ITERATIONS:
            head = f"stopped after iteration {iteration} (--exit_after_iterations)"
            how = f"to continue, relaunch with --exit_after_iterations above {iteration}, or without it"
        elif reason.by_signal:
            head = f"{reason.value} ({self.signals.signal_name or 'a signal to another rank'})"
            how = "relaunch the same command to resume"
        else:
            head, how = reason.value, "see the message above"
        return f"{head}: saved {saved}, exiting; {how}"


@dataclass
class RunEnd:
    """What a driver's run returns: its last statistics, and why it stopped early (None: it finished)."""

    stats: dict[str, Any] = field(default_factory=dict)
    stopped: StopReason | None = None


def exit_code(end: RunEnd, rank: int) -> int:
    """A driver's exit code after its run returned ``end``: 130 after Ctrl-C, else 0 -- after a preemption
    save also telling ``launch/torchrun.py`` so (:func:`write_preemption_marker`)."""
    if end.stopped is StopReason.INTERRUPT:
        return INTERRUPT_EXIT_CODE
    if end.stopped is not None:
        write_preemption_marker(rank)
    return 0


def write_preemption_marker(rank: int) -> None:
    """Tell ``launch/torchrun.py`` (which sets ``SIMPOOL_PREEMPTION_DIR``) that this rank stopped cleanly after
    a preemption save, so the launcher exits 0 (requeue) rather than reporting the signal as a failure."""
    folder = os.environ.get(PREEMPTION_DIR_VARIABLE)
    if folder:
        Path(folder, f"rank{rank}").write_text("saved\n")
