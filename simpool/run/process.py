"""The start and the end of a driver's process: its process group, device, logging, and a clean exit.

``start_process`` joins the group a launcher describes (torchrun, SLURM ``srun``) or runs alone, picks the
device, creates the CPU control group every rank needs for agreed stops (collective: now, before any rank can
leave a loop) and routes logging by rank. ``end_process`` makes the ranks leave together: a rank exiting while
its peer's gloo threads still talk to it made the peer abort ("terminate called without an active exception").

``driver`` wraps every command line's ``main``: Ctrl-C in a driver without a loop of steps (``KeyboardInterrupt``)
is one line and exit 130 instead of a traceback, a :class:`~simpool.data.paths.DataError` met during the work (an
unreadable image an evaluation needs: :mod:`simpool.data.every_item`) is one ``error:`` line and exit 2, and
whatever the way out, the folder locks of the run
(:mod:`simpool.run.lock`) are released and the signal handlers it replaced put back (in-process runs).

Example:
    >>> @driver
    ... def main(argv=None) -> int:
    ...     dist_info = start_process(args.dist_url)
    ...     ...
    ...     end_process()
    ...     return 0
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from simpool.data.paths import DataError
from simpool.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    cleanup,
    control_group,
    init_distributed,
    is_distributed,
)
from simpool.run.config import bad_input
from simpool.run.lock import release_folders
from simpool.run.log import setup_logging
from simpool.run.stop import INTERRUPT_EXIT_CODE, restore_signal_handlers

__all__ = ["AgreedDataError", "data_errors_agreed", "driver", "end_process", "start_process"]


def start_process(dist_url: str = "env://", backend: str | None = None, tf32: bool = False) -> DistInfo:
    """Join the launcher's process group (or run alone), pick this process's device, route logging by rank.

    On CUDA, cuDNN picks its fastest kernels for the run's fixed shapes (``benchmark``); ``tf32`` also lets
    matrix products use TF32 (training; the evaluators keep float32 products as the reference computes them).
    """
    dist_info = init_distributed(dist_url, backend)
    control_group()
    setup_logging(dist_info.rank)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    return dist_info


def end_process() -> None:
    """Every rank meets, then leaves the process group (a no-op for a single process); the run's folder locks
    are released."""
    barrier()
    cleanup()
    release_folders()


class AgreedDataError(DataError):
    """A ``DataError`` that every rank of the run raises at the same point (:func:`data_errors_agreed`)."""


@contextmanager
def data_errors_agreed() -> Iterator[None]:
    """Run the block, this rank's share of a data set's work, so that a ``DataError`` one rank meets stops every
    rank. Collective on exit: the ranks exchange what they met (one all-gather over the CPU control group), and
    if any rank met a ``DataError`` every rank raises the first one's message as :class:`AgreedDataError`.

    Each rank of an evaluator reads its own share of the images, so a file only one rank cannot read would leave
    the others waiting for it in their next collective, then failing with a gloo traceback. The ranks that met
    nothing finish their share first (its results are kept for the rerun). Alone, the error is raised at once.

    Example:
        >>> with data_errors_agreed():                    # every rank
        ...     for images, indices in every_item(my_share, batch_size=32, num_workers=8):
        ...         items.add(...)
        >>> records = items.gather()                      # reached by every rank, or by none
    """
    met = None
    try:
        yield
    except DataError as err:
        if not is_distributed():
            raise
        met = str(err)
    failures = [message for message in all_gather_objects(met) if message is not None]
    if failures:
        raise AgreedDataError(failures[0])


def driver(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command line's ``main(argv) -> exit code``: ``KeyboardInterrupt`` (Ctrl-C where no
    :class:`~simpool.run.stop.StopSignals` is installed) becomes one line on stderr and exit 130, a ``DataError``
    one ``error:`` line and exit 2; on every way out the folder locks are released and replaced signal handlers
    restored."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C): stopped; every file is written whole or not at all, so a rerun of the "
                  "same command starts cleanly", file=sys.stderr)
            return INTERRUPT_EXIT_CODE
        except DataError as err:
            # Agreed: every rank is here and may meet at the barrier. Otherwise only this rank may be (the others
            # mid-work), and a barrier would pair with their next collective.
            if isinstance(err, AgreedDataError):
                end_process()
            else:
                cleanup()
            return bad_input(err)
        finally:
            release_folders()
            restore_signal_handlers()

    return wrapped
