"""torchrun (``torch.distributed.run``, same flags) that exits 0 when a preemption signal ended a clean save.

    python launch/torchrun.py --standalone --nproc_per_node 8 train_dino.py --output_dir runs/vits ...

Plain torchrun turns SIGTERM (what SLURM and ``docker stop`` send) into a ``SignalException``: it forwards the
signal to its workers, waits for them, then exits 1 with a traceback, even though every worker saved its
checkpoint and returned 0. A job script cannot tell that from a crash, so it cannot requeue. Here:

* each worker that stops after a clean preemption save leaves a file in ``$SIMPOOL_PREEMPTION_DIR`` (a
  temporary folder this launcher creates; see ``simpool.run.stop.write_preemption_marker``);
* on a ``SignalException`` the launcher exits 0 if every local worker left one, else 128 + the signal number;
* SIGUSR1 (SLURM's ``--signal``) is handled like SIGTERM unless ``TORCHELASTIC_SIGNALS_TO_HANDLE`` is set, and
  the workers get ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` = 100 s (not 30) to finish their save before SIGKILL.

Any other outcome (a worker failing, a normal end) is torchrun's own, unchanged.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import config_from_args, parse_args
from torch.distributed.run import main as torchrun_main

PREEMPTION_DIR_VARIABLE = "SIMPOOL_PREEMPTION_DIR"  # == simpool.run.stop.PREEMPTION_DIR_VARIABLE


def local_workers(argv: list[str]) -> int:
    """How many worker processes this node's torchrun starts (its ``--nproc_per_node``)."""
    try:
        return int(config_from_args(parse_args(argv))[0].nproc_per_node)
    except Exception:  # an unusual spelling torch resolves later: one clean worker is then the bar
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "100")
    expected = local_workers(argv)
    with tempfile.TemporaryDirectory(prefix="simpool-preemption-") as folder:
        os.environ[PREEMPTION_DIR_VARIABLE] = folder
        try:
            torchrun_main(argv)
        except SignalException as err:
            saved = len(list(Path(folder).glob("rank*")))
            name = err.sigval.name
            if saved >= expected:
                print(f"launch/torchrun.py: {name}: all {saved} local worker(s) saved a checkpoint and exited "
                      "cleanly; exit 0 (relaunch the same command to resume)", file=sys.stderr)
                return 0
            print(f"launch/torchrun.py: {name}: only {saved} of {expected} local worker(s) finished a clean save; "
                  f"exit {128 + int(err.sigval)}", file=sys.stderr)
            return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
