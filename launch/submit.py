"""Submit DINO pretraining to SLURM with submitit; jobs requeue themselves on timeout/preemption and resume.

    python launch/submit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2880 --output_dir runs/vits \
        -- --arch vit_small --mode simpool --data_path /imagenet --config configs/vit_small.yaml
    python launch/submit.py --local --ngpus 1 --timeout 30 --output_dir runs/try -- --config configs/demo.yaml

Everything after ``--`` goes to train_dino.py (``--output_dir`` is added). Logs: OUTPUT_DIR/submitit/.

What happens near the time limit (and on preemption when the cluster signals it): SLURM sends submitit's
preemption signal (USR2, ``--signal_delay`` seconds before the limit). ``DINOJob`` forwards it to the trainer,
which finishes its current step, writes OUTPUT_DIR/checkpoint.pth on rank 0 and returns 0 on every rank. Only
then is the signal handed back to submitit, which calls ``DINOJob.checkpoint`` (a ``DelayedSubmission`` of the
same command) and requeues the job; the relaunched trainer resumes from checkpoint.pth by itself. Forwarding
first matters: submitit's own handler exits at once, and the steps since the last save would be lost.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import zlib
from pathlib import Path
from typing import Any

import submitit

REPO = Path(__file__).resolve().parents[1]
# submitit's preemption/timeout signal: USR2 unless the SUBMITIT_PREEMPT_SIGNAL variable says otherwise.
PREEMPT_SIGNAL = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
# One of the two signals simpool.run.stop.StopSignals listens to (SIGTERM, SIGUSR1), not submitit's.
TRAINER_SIGNAL = signal.SIGTERM if PREEMPT_SIGNAL == signal.SIGUSR1 else signal.SIGUSR1


class _PreemptionRelay:
    """Route submitit's preemption signal to the trainer first; hand it back to submitit after the save."""

    def __init__(self) -> None:
        self.received = False
        self._submitit_handler: Any = None

    def install(self) -> None:
        self._submitit_handler = signal.getsignal(PREEMPT_SIGNAL)
        signal.signal(PREEMPT_SIGNAL, self._relay)

    def _relay(self, signum: int, frame: Any) -> None:
        self.received = True
        trainer_handler = signal.getsignal(TRAINER_SIGNAL)
        if callable(trainer_handler):  # the Trainer is running: it saves at its next safe point and returns
            trainer_handler(signum, frame)
        else:  # still setting up: nothing to save, let submitit requeue now
            self.hand_back_to_submitit()

    def hand_back_to_submitit(self) -> None:
        """Re-deliver the signal to submitit's handler: checkpoint() + requeue on rank 0 (it exits)."""
        signal.signal(PREEMPT_SIGNAL, self._submitit_handler or signal.SIG_DFL)
        if callable(self._submitit_handler):
            signal.raise_signal(PREEMPT_SIGNAL)


def master_port(job_id: str) -> int:
    """A port derived from the job id, so that two jobs sharing a node do not collide (range 20000-39999)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def distributed_env(job_env: Any) -> dict[str, str]:
    """torchrun-style variables from submitit's view of the job (read by simpool.distributed)."""
    master = "127.0.0.1" if job_env.num_nodes == 1 else job_env.hostnames[0]
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", master),
        "MASTER_PORT": os.environ.get("MASTER_PORT", str(master_port(str(job_env.job_id)))),
    }


class DINOJob(submitit.helpers.Checkpointable):
    """One DINO run: ``train_argv`` is train_dino.py's command line. Requeued jobs run the same command."""

    def __init__(self, train_argv: list[str]) -> None:
        self.train_argv = list(train_argv)

    def __call__(self) -> int:
        from simpool.dino.run_train import main  # imported on the compute node, after the environment is set

        os.environ.update(distributed_env(submitit.JobEnvironment()))
        relay = _PreemptionRelay()
        relay.install()
        code = main(self.train_argv)
        if relay.received:  # checkpoint.pth is written: now let submitit requeue (rank 0 exits here)
            relay.hand_back_to_submitit()
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # All training state is in OUTPUT_DIR/checkpoint.pth, which the relaunched trainer resumes from:
        # resubmit the same command with a fresh job object (nothing in memory needs to travel).
        return submitit.helpers.DelayedSubmission(DINOJob(self.train_argv))


# ----------------------------------------------------------------------------------------------------------
# submission
# ----------------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Submit DINO pretraining with submitit", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default=1, type=int, help="number of nodes")
    p.add_argument("--ngpus", default=8, type=int, help="GPUs per node (one process each); 0 for CPU")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--timeout", default=2880, type=int, help="time limit per job in minutes (requeues after)")
    p.add_argument("--output_dir", required=True, help="training output (checkpoint.pth) and submitit logs")
    p.add_argument("--job_name", default="simpool_dino")
    p.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per process (data loading)")
    p.add_argument("--mem_gb", default=0, type=int, help="memory per node in GB (0: the partition's default)")
    p.add_argument("--signal_delay", default=120, type=int, help="seconds between the signal and the kill")
    p.add_argument("--max_requeues", default=10, type=int, help="timeouts before giving up requeueing")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--local", action="store_true", help="run here with submitit's LocalExecutor (testing)")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit with its exit code")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train_dino.py flags")
    return p


def train_argv(args: argparse.Namespace) -> list[str]:
    flags = list(args.train_args)
    if flags and flags[0] == "--":
        flags = flags[1:]
    if "--output_dir" in flags or any(f.startswith("--output_dir=") for f in flags):
        raise ValueError("give --output_dir to submit.py (before --), not to train_dino.py")
    return [*flags, "--output_dir", str(Path(args.output_dir).resolve())]


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    folder = Path(args.output_dir) / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else None,
                                     slurm_max_num_timeout=args.max_requeues)
    params: dict[str, Any] = {
        "name": args.job_name,
        "nodes": args.nodes,
        "tasks_per_node": max(args.ngpus, 1),
        "gpus_per_node": args.ngpus,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout,
        "slurm_signal_delay_s": args.signal_delay,
    }
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for flag in ("partition", "account", "qos", "constraint"):
        if getattr(args, flag):
            params[f"slurm_{flag}"] = getattr(args, flag)
    executor.update_parameters(**params)
    return executor


def submit_job(args: argparse.Namespace) -> submitit.Job:
    """Submit one ``DINOJob`` for parsed submit.py flags and return submitit's handle on it.

    Raises ValueError for flags that cannot work (``--output_dir`` after ``--``, ``--local`` on several nodes).
    """
    command = train_argv(args)
    if args.local and args.nodes != 1:
        raise ValueError("--local runs on this machine: use --nodes 1")
    # The job unpickles DINOJob and imports simpool on the compute node: put this checkout (and launch/) on
    # its path. sbatch and the local executor both pass the submitting environment on.
    path = [str(REPO), str(REPO / "launch"), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return build_executor(args).submit(DINOJob(command))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        job = submit_job(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}; logs in {Path(args.output_dir) / 'submitit' / str(job.job_id)}")
    if args.wait:
        try:
            code = job.result()
        except Exception as err:  # submitit's FailedJobError/UncompletedJobError: the job raised or was killed
            print(f"error: job {job.job_id} failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err}",
                  file=sys.stderr)
            return 1
        print(f"job {job.job_id} returned {code}")
        return code if isinstance(code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
