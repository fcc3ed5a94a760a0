"""One logging path for the whole library: the standard ``logging`` tree under ``"simpool"``, rank-aware.

Library modules log with ``log = logging.getLogger(__name__)`` and never ``print``. A command-line entry point
calls ``setup_logging(rank)`` once: rank 0 prints INFO and above to stdout as plain lines (cluster logs stay
readable, tests can read them); other ranks print only warnings and errors, prefixed with their rank. Used as
a library without ``setup_logging``, simpool stays quiet except for warnings (Python's default).

Example:
    >>> setup_logging(rank=dist_info.rank)
    >>> logging.getLogger("simpool.dino.train").info("resumed from %s", path)
    resumed from runs/vits/checkpoint.pth
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]

ROOT = "simpool"
# A driver run as ``python -m simpool.evaluation.attention`` logs as "__main__", outside the "simpool" tree.
ROOTS = (ROOT, "__main__")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (pytest's capture and redirections keep working)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)
        self.flush()


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Route the ``simpool`` loggers (and ``__main__``'s, for ``python -m``) to stdout: ``level`` and above on
    rank 0, warnings and errors elsewhere."""
    for name in ROOTS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _StdoutHandler)]:
            logger.removeHandler(handler)
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level if rank == 0 else logging.WARNING)
        logger.propagate = False
    return logging.getLogger(ROOT)
