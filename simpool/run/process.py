"""The start and the end of a driver's process: its process group, device, logging, and a clean exit.

``start_process`` joins the group a launcher describes (torchrun, SLURM ``srun``) or runs alone, picks the
device, creates the CPU control group every rank needs for agreed stops (collective: now, before any rank can
leave a loop) and routes logging by rank. ``end_process`` makes the ranks leave together: a rank exiting while
its peer's gloo threads still talk to it made the peer abort ("terminate called without an active exception").

Example:
    >>> dist_info = start_process(args.dist_url)
    >>> ...
    >>> end_process()
"""

from __future__ import annotations

import torch

from simpool.distributed import DistInfo, barrier, cleanup, control_group, init_distributed
from simpool.run.log import setup_logging

__all__ = ["end_process", "start_process"]


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
    """Every rank meets, then leaves the process group (a no-op for a single process)."""
    barrier()
    cleanup()
