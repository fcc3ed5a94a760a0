"""Logging of every run: the rank-aware ``logging`` set-up, console progress, ``log.txt`` JSON lines, W&B.

* ``setup_logging(rank)``: library modules log with ``logging.getLogger(__name__)`` and never ``print``; a
  command-line driver calls this once: rank 0 prints INFO and above to stdout as plain lines (cluster logs stay
  readable, tests can read them); other ranks print only warnings and errors, prefixed with their rank. Used as
  a library without it, simpool stays quiet except for warnings (Python's default).

* Console: a tqdm bar when stdout is a terminal, plain lines otherwise (cluster logs stay readable). Every
  console line goes through ``RunLogger.print``: above the bar while one is shown, else to the ``logging``
  tree (``setup_logging`` sends it to stdout on rank 0).
* ``output_dir/log.txt``: one JSON object per epoch (``append_json_line``; ``logged_epochs`` reads it back),
  with the SimPool fork's keys (``train_loss``, ``train_entropy``, ``train_KL_div``, ``train_lr``, ``train_wd``,
  ``epoch``, ``k-NN``) plus ours.
* ``output_dir/progress.jsonl``: one JSON object per log step (``iteration``, ``epoch`` and the progress
  values: loss, teacher entropy, KL, prototypes in use, lr, wd, momentum, img/s, data-wait %, ...), for
  ``utils/plot_log.py``.
* W&B when a project is given; ``WANDB_MODE=offline`` works without network.

Only rank 0 writes anything.

Example:
    >>> setup_logging(rank=dist_info.rank)
    >>> run_log = RunLogger("runs/vits", enabled=dist_info.is_main)
    >>> run_log.log_epoch({"epoch": 0, "train_loss": 9.2})          # one line of runs/vits/log.txt
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunLogger", "Throughput", "append_json_line", "format_seconds", "logged_epochs", "peak_memory_gib",
           "setup_logging"]

log = logging.getLogger(__name__)

ROOT = "simpool"
# A driver run as ``python -m simpool.evaluation.run_attention`` logs as "__main__", outside the "simpool" tree.
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


def append_json_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON object as a line of ``path`` (``log.txt``, ``progress.jsonl``)."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def logged_epochs(path: str | os.PathLike, key: str) -> set[int]:
    """The epochs ``path`` (a ``log.txt``) holds a line with ``key`` for; lines cut by a kill are skipped."""
    epochs = set()
    path = Path(path)
    if not path.is_file():
        return epochs
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and key in entry and isinstance(entry.get("epoch"), int):
            epochs.add(entry["epoch"])
    return epochs


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


class RunLogger:
    """Progress lines/bars, JSON-lines epoch log and optional W&B, for the main process."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        wandb_project: str | None = None,
        wandb_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.log_path = Path(output_dir) / "log.txt"
        self.progress_path = Path(output_dir) / "progress.jsonl"
        self.interactive = enabled and sys.stdout.isatty()
        self.bar = None
        self.wandb = None
        if enabled and wandb_project:
            import wandb  # imported only when asked for: it takes seconds and starts a service

            self.wandb = wandb.init(project=wandb_project, name=wandb_name, config=config, dir=str(output_dir),
                                    resume="allow")

    def print(self, message: str) -> None:
        """One console line (the single route for progress and messages of the run)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)  # tqdm redraws its bar below the line
        else:
            log.info(message)

    def warning(self, message: str) -> None:
        """A warning line (above the bar while one is shown)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.warning(message)

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int = 0) -> None:
        if self.interactive:
            from tqdm import tqdm  # only for an interactive terminal

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True)

    def progress(self, step_in_epoch: int, steps_in_epoch: int, epoch: int, values: dict[str, float],
                 step: int | None = None, record: dict[str, float] | None = None) -> None:
        """One progress report: bar postfix on a terminal, one plain line otherwise; ``values`` and the
        ``record``-only values (not shown on the console) go to ``progress.jsonl`` and W&B."""
        if not self.enabled:
            return
        append_json_line(self.progress_path, {"iteration": step, "epoch": epoch, **values, **(record or {})})
        if self.wandb is not None and step is not None and record:
            self.wandb.log({f"train/{k}": v for k, v in record.items()}, step=step)
        if self.wandb is not None and step is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)
        if self.bar is not None:
            self.bar.n = step_in_epoch
            self.bar.set_postfix({k: _short(v) for k, v in values.items() if k != "eta_s"}, refresh=True)
            return
        text = "  ".join(f"{k} {_short(v)}" for k, v in values.items() if k != "eta_s")
        eta = format_seconds(values.get("eta_s", 0))
        self.print(f"epoch {epoch} [{step_in_epoch}/{steps_in_epoch}]  {text}  eta {eta}")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_epoch(self, stats: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        append_json_line(self.log_path, stats)
        if self.wandb is not None:
            flat = {k: v for k, v in stats.items() if isinstance(v, int | float)}
            for k, (top1, top5) in stats.get("knn", {}).items():
                flat[f"knn/top1@{k}"], flat[f"knn/top5@{k}"] = top1, top5
            self.wandb.log(flat, step=step)

    def finish(self) -> None:
        self.end_epoch()
        if self.wandb is not None:
            self.wandb.finish()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Throughput:
    """Images/s and the split of wall time between waiting for data and the rest (the step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "img_per_s": self.images / elapsed,
            "data_wait_pct": 100.0 * self.data_wait / elapsed,
            "compute_pct": 100.0 * (elapsed - self.data_wait) / elapsed,
        }
