"""Resuming a DINO run: where it is (:class:`Progress`), what a relaunch may change, what the checkpoint holds.

Progress is counted in samples: the epoch in progress and how many samples of its global permutation are
consumed (``ResumableDistributedSampler``), plus the global iteration count (``--exit_after_iterations``,
``--save_every_steps``, log steps). A relaunch on another number of processes or another batch size therefore
continues the same epoch at the same sample, with schedules rebuilt for its iteration count; only what changes
the weights' shapes or meaning, the optimizer state or the data set is refused (:func:`check_resumable`,
before anything in the output folder is written).

Example:
    >>> source, state = RunCheckpoint(output_dir, DINO_CHECKPOINT, resume_from=args.resume_from).read()
    >>> check_resumable(state, source, args, dataset_size, fingerprint)        # ConfigError: flags or data differ
    >>> progress = Progress.from_state(state, niter_per_epoch, samples_per_step)
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simpool.checkpoint import FORMAT_KEY, FORMAT_VERSION
from simpool.models import AUTO_GAMMA, default_gamma, is_known_arch
from simpool.run.config import ConfigError
from simpool.run.resume_checks import changes
from simpool.run.schedules import cosine_scheduler, scaled_lr
from simpool.run.state import CheckpointFormat

__all__ = ["DINO_CHECKPOINT", "INCOMPATIBLE_FLAGS", "Progress", "check_resumable", "geometry_change",
           "incompatible_changes", "schedule_index"]

# 2: the optimizer has the head's last layer in groups of its own (``is_last_layer``); 1 had two groups.
DINO_CHECKPOINT = CheckpointFormat(FORMAT_KEY, FORMAT_VERSION, "a DINO training checkpoint")

# Flags whose change a resume cannot honour: they change the weights' shapes or meaning or the optimizer state.
# The data set is compared by content (``simpool.data.dataset_fingerprint``), so a moved copy may resume.
# Everything else (processes, nodes, batch size, lr, crops...) may change.
INCOMPATIBLE_FLAGS = ("arch", "mode", "gamma", "patch_size", "model_overrides", "out_dim", "head_hidden_dim",
                      "head_bottleneck_dim", "head_nlayers", "use_bn_in_head", "norm_last_layer", "optimizer")


def _resolved_gamma(args: dict[str, Any]) -> dict[str, Any]:
    """``gamma: auto`` as the value it stands for (the arch's default), so that auto and 1.25 compare equal."""
    arch = str(args.get("arch"))
    if args.get("gamma") == AUTO_GAMMA and is_known_arch(arch):
        return {**args, "gamma": default_gamma(arch)}
    return args


def incompatible_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--flag old -> new`` for each of ``INCOMPATIBLE_FLAGS`` that differs between a checkpoint's args and this
    launch's (flags the checkpoint does not record are not compared)."""
    return changes(_resolved_gamma(saved), _resolved_gamma(now), INCOMPATIBLE_FLAGS, prefix="--")


def check_resumable(state: dict[str, Any] | None, source: Path | None, args: argparse.Namespace,
                    dataset_size: int, fingerprint: str) -> None:
    """Refuse (ConfigError) a resume whose flags change the model or optimizer, whose data set differs, or whose
    ``--epochs`` ends before the epoch the run has reached (it would train nothing and end as if finished)."""
    if state is None:
        return
    done, sample = state.get("epoch"), state.get("epoch_sample", 0)
    if isinstance(done, int) and (done > args.epochs or (done == args.epochs and sample)):
        reached = f"{done} epoch(s)" + (f" and {sample} samples of the next" if sample else "")
        raise ConfigError(f"{source} has trained {reached}, more than --epochs {args.epochs} asks for: relaunch with "
                          f"--epochs {done + bool(sample)} or more to continue it, or use another --output_dir for a "
                          "shorter run")
    found = incompatible_changes(state.get("args", {}), vars(args))
    if found:
        raise ConfigError(f"{source} was trained with other flags, which a resume cannot honour: "
                          f"{', '.join(found)}. Relaunch with the old values, or use another --output_dir")
    if state.get("dataset_fingerprint", fingerprint) != fingerprint:
        flags = changes(state.get("args", {}), vars(args), ("data_path", "subset"), prefix="--")
        raise ConfigError(
            f"{source} was trained on another data set ({state.get('dataset_size')} images then, {dataset_size} "
            f"now, or other files{': ' + ', '.join(flags) if flags else ''}): the epoch's order cannot continue. "
            "Restore the data set or those flags, or use another --output_dir"
        )


@dataclass
class Progress:
    """Where a run is: ``epoch`` in progress, ``epoch_sample`` samples of it consumed, ``iteration`` global steps
    taken, and the bookkeeping of a finished epoch not yet in ``log.txt`` (``pending_epoch_end``)."""

    epoch: int = 0
    epoch_sample: int = 0
    iteration: int = 0
    pending_epoch_end: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any], niter_per_epoch: int, samples_per_step: int) -> Progress:
        """The progress a checkpoint records (older ones counted iterations of the geometry that wrote them,
        assumed unchanged)."""
        iteration = int(state["iteration"])
        if "epoch_sample" in state:
            epoch, epoch_sample = int(state["epoch"]), int(state["epoch_sample"])
        else:
            epoch = iteration // niter_per_epoch
            epoch_sample = (iteration - epoch * niter_per_epoch) * samples_per_step
        return cls(epoch, epoch_sample, iteration, state.get("pending_epoch_end"))


def schedule_index(epoch: int, epoch_sample: int, samples_per_step: int, niter_per_epoch: int, epochs: int) -> int:
    """Index into the per-iteration schedules of the step that starts at ``epoch_sample`` of ``epoch``.

    ``epoch * niter + epoch_sample // samples_per_step`` (clamped to the epoch): uninterrupted runs get 0, 1, 2...;
    after a change of world size or batch the index continues at the same fraction of training.
    """
    within = min(epoch_sample // samples_per_step, niter_per_epoch - 1)
    return min(epoch * niter_per_epoch + within, epochs * niter_per_epoch - 1)


def geometry_change(state: dict[str, Any], args: argparse.Namespace, dataset_size: int, samples_per_step: int,
                    world_size: int, progress: Progress, new_lr: float) -> str | None:
    """What a relaunch changed (processes, batch) and how the schedules were rebuilt for it; None if nothing."""
    old_args = state.get("args", {})
    old_world, old_step = state.get("world_size"), state.get("samples_per_step")
    if old_step is None or old_step == samples_per_step and old_world == world_size:
        return None
    old_niter = dataset_size // old_step
    old_index = schedule_index(progress.epoch, progress.epoch_sample, old_step, old_niter, args.epochs)
    old_lr = cosine_scheduler(scaled_lr(old_args.get("lr", args.lr), old_step), args.min_lr, args.epochs, old_niter,
                              warmup_epochs=args.warmup_epochs)[old_index]
    return (f"elastic resume: processes {old_world} -> {world_size}, batch_size_per_gpu "
            f"{old_args.get('batch_size_per_gpu')} -> {args.batch_size_per_gpu}, samples per step {old_step} -> "
            f"{samples_per_step}; schedules rebuilt for {dataset_size // samples_per_step} iterations per epoch "
            f"(was {old_niter}); epoch {progress.epoch} continues at sample {progress.epoch_sample}; lr at the join "
            f"{old_lr:.4g} -> {new_lr:.4g} (linear scaling with the global batch)")
