"""torch.distributed set-up and the few collectives the trainers and evaluators share.

Launch modes recognised by ``init_distributed``:

* ``torchrun`` (one or many nodes): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (+ rendezvous) in the environment;
* SLURM ``srun`` with one task per GPU: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is the
  first host of ``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set;
* a plain ``python train_dino.py``: one process, no process group.

NCCL is used on GPUs, gloo on CPU (tests run 2 gloo processes through torchrun).
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# What DDP ("module.") and torch.compile ("_orig_mod.") put in front of a wrapped model's state-dict keys.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _read_launcher_env() -> tuple[int, int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        return rank, world, int(os.environ["LOCAL_RANK"])
    return None


def init_distributed(dist_url: str = "env://", backend: str | None = None) -> DistInfo:
    """Join the process group the launcher describes (or run alone) and pick this process's device."""
    launcher = _read_launcher_env()
    cuda = torch.cuda.is_available()
    if launcher is None:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        return DistInfo(0, 1, 0, device)
    rank, world_size, local_rank = launcher
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if cuda else "gloo"),
            init_method=dist_url,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if cuda else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


_control_group: dict[str, object] = {}


def control_group():
    """A gloo group over all ranks for small CPU-side decisions (None: the default group is gloo already).

    Deciding on the CPU ("does every rank have a batch?", "did any rank get SIGTERM?") needs no device
    synchronisation: an all-reduce of a CPU tensor over gloo does not wait for the GPU's queued work, which
    an all-reduce over NCCL followed by ``.item()`` would. Collective: every rank must call it the first time.
    """
    if not is_distributed() or dist.get_backend() == "gloo":
        return None
    if "group" not in _control_group:
        _control_group["group"] = dist.new_group(backend="gloo")
    return _control_group["group"]


def any_and_all(flags: list[bool]) -> tuple[list[bool], list[bool]]:
    """For each local flag: (is it set on any rank, is it set on every rank), in one CPU all-reduce.

    Example:
        >>> on_any, on_all = any_and_all([preempt.raised, batch is not None])
        >>> preempted, every_rank_has_a_batch = on_any[0], on_all[1]
    """
    counts = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64)
    if is_distributed():
        dist.all_reduce(counts, group=control_group())
    world = get_world_size()
    return [int(c) > 0 for c in counts], [int(c) == world for c in counts]


def broadcast_from_rank_0(value):
    """Rank 0's ``value`` (any picklable object) on every rank, over the CPU control group; ``value`` itself
    without a process group. Collective: every rank calls it (what the others pass is ignored).

    How rank 0's decisions reach the others, failures included: a check only rank 0 makes (a folder's lock, a
    file list) stops every rank with the same message instead of leaving the others waiting in a collective.
    """
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, over the CPU control group; ``[value]``
    without a process group. Collective: every rank calls it."""
    if not is_distributed():
        return [value]
    values = [None] * get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


def all_gather_varlen(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Gather tensors whose first dimension differs between ranks; returns one tensor per rank."""
    if not is_distributed():
        return [tensor]
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[: int(s.item())] for g, s in zip(gathered, sizes)]


@torch.no_grad()
def max_difference_from_rank0(tensors: list[torch.Tensor]) -> float:
    """The largest absolute difference between ``tensors`` on any rank and the same tensors on rank 0 (0 when
    the ranks hold identical copies, as DDP promises for the weights); collective."""
    local = torch.cat([t.detach().flatten() for t in tensors])
    reference = local.clone()
    dist.broadcast(reference, src=0)
    diff = (local - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def cleanup() -> None:
    """Destroy the process group (and with it the control group) of this process."""
    _control_group.clear()
    if is_distributed():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside its torch.compile and DDP wrappers (in either order), or the model itself."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def strip_wrapper_prefixes(key: str) -> str:
    """A state-dict key without the prefixes DDP and torch.compile add (``module._orig_mod.x`` -> ``x``)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key.removeprefix(prefix), True
    return key
