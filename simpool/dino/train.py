"""DINO pretraining driver: set-up, the epoch loop, checkpoints and exact resume, preemption, online k-NN.

The iteration itself lives in ``simpool.dino.step.DINOStep`` and what it is built from in ``simpool.dino.build``;
this module feeds it and keeps the run safe:

* ``output_dir/checkpoint.pth`` every epoch (and every ``--save_every_steps``), written atomically, holding
  student, teacher, optimizer, loss scaler, loss centre, epoch, iteration, args and RNG states. Relaunching the
  same command resumes, mid-epoch from the next batch.
* SIGTERM / SIGUSR1 (SLURM preemption): save and exit with code 0.
* Non-finite losses skip their step on every rank (see ``step.py``); ``--max_skipped_steps`` in a row stop
  the run with a message naming the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from simpool.checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWriteError,
    atomic_save,
    remove_stale_temp_files,
    safe_load,
)
from simpool.data import DataError, build_labelled_splits, dataset_fingerprint
from simpool.dino.accum import group_micro_batches
from simpool.dino.attention_log import AttentionLog
from simpool.dino.augment import GPUMultiCrop
from simpool.dino.build import build_dino_step, build_train_loader, use_gpu_augment
from simpool.dino.checkpointing import (
    PreemptionFlag,
    incompatible_changes,
    rng_state,
    set_rng_state,
    set_seeds,
    unreadable_checkpoint_error,
    write_preemption_marker,
)
from simpool.dino.collapse import PROTOTYPES, CollapseMonitor
from simpool.dino.config import ConfigError, args_to_yaml, parse_args, resolve_precision
from simpool.dino.init_from import apply_init_weights, read_init_weights
from simpool.dino.schedules import cosine_scheduler, scaled_lr, teacher_temp_schedule
from simpool.dino.step import StepSchedule, unwrap
from simpool.distributed import all_reduce_sum, any_and_all, barrier, cleanup, control_group, init_distributed
from simpool.evaluation.features import eval_transform, evenly_spaced_subset, extract_features
from simpool.evaluation.knn import knn_on_features
from simpool.flags import bad_input, data_source_options
from simpool.logs import setup_logging
from simpool.run_log import RunLogger, Throughput, format_seconds, peak_memory_gib

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite losses: the run stops and says which checkpoint is the last good one."""


class CollapseStopped(RuntimeError):
    """--stop_on_collapse: the collapse alarm fired; the checkpoint is saved and the message is the warning."""


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
class Trainer:
    """Owns the models, the schedules and the checkpoint of one run; ``fit()`` trains to the last epoch.

    Progress is ``(epoch, epoch_sample)``: the epoch in progress and how many samples of its global permutation
    are consumed (see ``ResumableDistributedSampler``). ``iteration`` counts the global steps taken by this run
    and its predecessors (``--exit_after_iterations``, ``--save_every_steps``, log steps); schedules are indexed
    by ``schedule_index(epoch, epoch_sample)``, so a relaunch on another number of processes or another batch
    size continues the same epoch at the same sample with schedules rebuilt for its iteration count.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.preempt = PreemptionFlag()  # first: a signal during set-up is remembered, not fatal
        self.args = args
        self.dist = init_distributed(args.dist_url, args.backend)
        control_group()  # collective: created now, on every rank, before any rank can leave the loop
        setup_logging(self.dist.rank)
        self.device = self.dist.device
        self.output_dir = Path(args.output_dir)
        self.checkpoint_path = self.output_dir / "checkpoint.pth"
        set_seeds(args.seed + self.dist.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # Read and check the checkpoint before anything in output_dir is written (args.yaml included).
        self.resume_source, resume_state = self.read_resume_state()
        if resume_state is not None:
            changes = incompatible_changes(resume_state.get("args", {}), vars(args))
            if changes:
                raise ConfigError(
                    f"{self.resume_source} was trained with other flags, which a resume cannot honour: "
                    f"{', '.join(changes)}. Relaunch with the old values, or use another --output_dir"
                )
        # --pretrained_weights: read and checked before any write; a resumed run ignores it
        init_weights = read_init_weights(args, self.resume_source)

        self.loader, self.sampler = build_train_loader(args, self.dist)  # fails early on bad data paths
        self.dataset_size = len(self.sampler.dataset)
        self.dataset_fingerprint = dataset_fingerprint(self.sampler.dataset)
        saved = resume_state or {}
        if saved.get("dataset_fingerprint", self.dataset_fingerprint) != self.dataset_fingerprint:
            old_args = saved.get("args", {})
            flags = [f"--{name} {old_args.get(name)} -> {getattr(args, name)}" for name in ("data_path", "subset")
                     if old_args.get(name, getattr(args, name)) != getattr(args, name)]
            raise ConfigError(
                f"{self.resume_source} was trained on another data set ({saved.get('dataset_size')} images then, "
                f"{self.dataset_size} now, or other files{': ' + ', '.join(flags) if flags else ''}): the epoch's "
                "order cannot continue. Restore the data set or those flags, or use another --output_dir"
            )
        self.niter_per_epoch = self.dataset_size // self.samples_per_step
        if self.niter_per_epoch < 1:
            raise DataError(f"{args.data_path} holds {self.dataset_size} images, fewer than one optimizer step "
                            f"({self.samples_per_step} samples); lower --batch_size_per_gpu")
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temp_files(self.output_dir)
            if stale:
                log.info("removed %d temporary file(s) of interrupted saves: %s", len(stale),
                         ", ".join(p.name for p in stale))
            (self.output_dir / "args.yaml").write_text(args_to_yaml(args))
        barrier()

        self.precision = resolve_precision(args, self.device.type == "cuda")
        compile_models = args.compile if args.compile is not None else self.device.type == "cuda"
        self.step = build_dino_step(args, self.dist, self.precision, compile_models)
        self.student, self.teacher = self.step.student, self.step.teacher
        self.loss_fn, self.optimizer = self.step.loss_fn, self.step.optimizer
        self.channels_last = self.device.type == "cuda" and unwrap(self.student).backbone.is_convnet
        self.gpu_multicrop = None
        if use_gpu_augment(args, self.device):
            self.gpu_multicrop = GPUMultiCrop(args.global_crops_scale, args.local_crops_scale,
                                              args.local_crops_number, args.global_crops_size,
                                              args.local_crops_size)
        total = args.epochs * self.niter_per_epoch
        self.lr_schedule = cosine_scheduler(
            scaled_lr(args.lr, self.samples_per_step),
            args.min_lr,
            args.epochs,
            self.niter_per_epoch,
            warmup_epochs=args.warmup_epochs,
        )
        self.wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, self.niter_per_epoch)
        self.momentum_schedule = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, self.niter_per_epoch)
        self.teacher_temp_schedule = teacher_temp_schedule(args.warmup_teacher_temp, args.teacher_temp,
                                                           args.warmup_teacher_temp_epochs, args.epochs,
                                                           self.niter_per_epoch)
        assert len(self.lr_schedule) == len(self.teacher_temp_schedule) == total
        self.iteration = 0
        self.epoch, self.epoch_sample = 0, 0
        self.last_index = 0  # schedule index of the latest step
        self.pending_epoch_end: dict[str, Any] | None = None  # an epoch's bookkeeping not yet in log.txt
        self.last_good_checkpoint: str | None = None
        self.collapse = CollapseMonitor(args.out_dim)
        self.log = RunLogger(
            self.output_dir,
            enabled=self.dist.is_main,
            wandb_project=args.wandb_project,
            wandb_name=args.wandb_name,
            config=vars(args),
        )
        self.attention_log = AttentionLog.from_args(args, self.loader.dataset, self.dist.is_main, self.output_dir,
                                                    self.log.wandb)
        self.resumed = resume_state is not None
        if resume_state is not None:
            self.resume(resume_state)
        for note in apply_init_weights(args, init_weights, unwrap(self.student), unwrap(self.teacher), self.loss_fn):
            self.log.print(note)

    @property
    def samples_per_step(self) -> int:
        """Samples one optimizer step consumes over all processes (the one place this is computed)."""
        return self.args.batch_size_per_gpu * self.dist.world_size * getattr(self.args, "accum_steps", 1)

    @property
    def samples_per_batch(self) -> int:
        """Samples one loader batch consumes over all processes (a micro-batch when steps accumulate)."""
        return self.args.batch_size_per_gpu * self.dist.world_size

    def schedule_index(self, epoch: int, epoch_sample: int) -> int:
        """Index into the per-iteration schedules of the step that starts at ``epoch_sample`` of ``epoch``.

        ``epoch * niter + epoch_sample // samples_per_step`` (clamped to the epoch): uninterrupted runs get
        0, 1, 2...; after a change of world size or batch the index continues at the same fraction of training.
        """
        within = min(epoch_sample // self.samples_per_step, self.niter_per_epoch - 1)
        return min(epoch * self.niter_per_epoch + within, self.args.epochs * self.niter_per_epoch - 1)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            FORMAT_KEY: FORMAT_VERSION,
            "student": unwrap(self.student).state_dict(),
            "teacher": unwrap(self.teacher).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step.state_dict(),
            "dino_loss": self.loss_fn.state_dict(),
            "epoch": self.epoch,
            "epoch_sample": self.epoch_sample,
            "iteration": self.iteration,
            "samples_per_step": self.samples_per_step,
            "world_size": self.dist.world_size,
            "dataset_size": self.dataset_size,
            "dataset_fingerprint": self.dataset_fingerprint,
            "pending_epoch_end": self.pending_epoch_end,
            "args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.args).items()},
            "rng": rng_state(),
        }

    def save(self, extra_name: str | None = None) -> None:
        """checkpoint.pth (atomically) on rank 0; RNG states are rank 0's (all ranks reseed from them)."""
        if self.dist.is_main:
            state = self.checkpoint_state()
            atomic_save(state, self.checkpoint_path)
            if extra_name:
                atomic_save(state, self.output_dir / extra_name)
            self.last_good_checkpoint = str(self.checkpoint_path)
        barrier()

    def read_resume_state(self) -> tuple[Path | None, dict[str, Any] | None]:
        """(source, content) of the checkpoint to resume from: output_dir/checkpoint.pth, or --resume_from when
        that is missing or unreadable; (None, None) for a new run. Nothing is written."""
        resume_from = Path(self.args.resume_from) if self.args.resume_from else None
        if resume_from is not None and not resume_from.is_file():
            raise CheckpointError(f"--resume_from {resume_from}: no such file")
        if self.checkpoint_path.is_file():
            try:
                state = safe_load(self.checkpoint_path)
            except CheckpointError as err:
                if resume_from is None:
                    raise unreadable_checkpoint_error(self.checkpoint_path, err) from None
                log.warning("%s is unreadable (%s): resuming from --resume_from %s", self.checkpoint_path,
                            str(err).split("\n")[0][:200], resume_from)
            else:
                if resume_from is not None:
                    log.warning("--resume_from %s ignored: %s is readable and newer in this run", resume_from,
                                self.checkpoint_path)
                return self.checkpoint_path, state
        if resume_from is None:
            return None, None
        try:
            return resume_from, safe_load(resume_from)
        except CheckpointError as err:
            raise unreadable_checkpoint_error(resume_from, err) from None

    def resume(self, state: dict[str, Any]) -> None:
        if state.get(FORMAT_KEY) != FORMAT_VERSION:
            raise CheckpointError(
                f"{self.resume_source} was written by another simpool version (format {state.get(FORMAT_KEY)}, "
                f"this one reads {FORMAT_VERSION}): finish that run with the version that started it, or move the "
                "file away to start a new run in this output_dir"
            )
        try:
            unwrap(self.student).load_state_dict(state["student"])
            unwrap(self.teacher).load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step.load_state_dict(state.get("step", {}))
            self.loss_fn.load_state_dict(state["dino_loss"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().split("\n")[0][:300]
            raise CheckpointError(f"{self.resume_source} does not fit this model ({first}); resume with the flags "
                                  "of the run that wrote it, or use another --output_dir") from None
        self.iteration = int(state["iteration"])
        if "epoch_sample" in state:
            self.epoch, self.epoch_sample = int(state["epoch"]), int(state["epoch_sample"])
        else:  # older checkpoints: progress in iterations of the geometry that wrote them, assumed unchanged
            self.epoch = self.iteration // self.niter_per_epoch
            self.epoch_sample = (self.iteration - self.epoch * self.niter_per_epoch) * self.samples_per_step
        self.pending_epoch_end = state.get("pending_epoch_end")
        if "rng" in state:
            set_rng_state(state["rng"])
            if self.dist.rank:  # other ranks keep distinct but reproducible streams
                torch.manual_seed(self.args.seed + self.dist.rank + self.iteration)
        self.last_good_checkpoint = str(self.resume_source)
        self.log.print(
            f"resumed from {self.resume_source} at epoch {self.epoch}, iteration {self.iteration} "
            f"(sample {self.epoch_sample} of the epoch's {self.dataset_size})"
        )
        self.log_geometry_change(state)

    def log_geometry_change(self, state: dict[str, Any]) -> None:
        """Say what a relaunch changed (processes, batch) and how the schedules were rebuilt for it."""
        old_args = state.get("args", {})
        old_world = state.get("world_size")
        old_step = state.get("samples_per_step")
        if old_step is None or old_step == self.samples_per_step and old_world == self.dist.world_size:
            return
        old_niter = self.dataset_size // old_step
        old_index = min(self.epoch * old_niter + min(self.epoch_sample // old_step, old_niter - 1),
                        self.args.epochs * old_niter - 1)
        old_lr = cosine_scheduler(scaled_lr(old_args.get("lr", self.args.lr), old_step), self.args.min_lr,
                                  self.args.epochs, old_niter, warmup_epochs=self.args.warmup_epochs)[old_index]
        new_lr = self.lr_schedule[self.schedule_index(self.epoch, self.epoch_sample)]
        self.log.print(
            f"elastic resume: processes {old_world} -> {self.dist.world_size}, batch_size_per_gpu "
            f"{old_args.get('batch_size_per_gpu')} -> {self.args.batch_size_per_gpu}, samples per step {old_step} "
            f"-> {self.samples_per_step}; schedules rebuilt for {self.niter_per_epoch} iterations per epoch "
            f"(was {old_niter}); epoch {self.epoch} continues at sample {self.epoch_sample}; lr at the join "
            f"{old_lr:.4g} -> {new_lr:.4g} (linear scaling with the global batch)"
        )

    # -- training ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        args = self.args
        last_stats: dict[str, Any] = {}
        if self.pending_epoch_end is not None:  # a kill interrupted that epoch's log line / k-NN: redo them
            last_stats.update(self.finish_interrupted_epoch())
        if not self.resumed and args.knn_baselines:
            last_stats["knn_baselines"] = self.knn_baselines()
        if self.epoch < args.epochs and self.reached_exit_iteration():
            n = args.exit_after_iterations
            self.log.print(f"already at iteration {self.iteration} >= --exit_after_iterations {n}: nothing to do. "
                           f"To continue, raise --exit_after_iterations above {self.iteration} or drop it")
            self.log.finish()
            return {"preempted": True}
        run_start = time.perf_counter()
        while self.epoch < args.epochs:
            epoch = self.epoch
            if self.agree_to_stop():  # e.g. a signal during set-up
                self.save()
                return self.stop("preempted")
            train_stats, stop_reason = self.train_one_epoch(epoch)
            if train_stats is None:  # stopped mid-epoch: checkpoint written, exit cleanly
                return self.stop(stop_reason)
            last_stats = {**last_stats, **self.finish_epoch(epoch, train_stats)}
            if stop_reason is None and self.epoch < args.epochs and self.agree_to_stop():
                stop_reason = "preempted"
            if stop_reason is not None and self.epoch < args.epochs:
                return self.stop(stop_reason)
        self.log.print(f"training time {format_seconds(time.perf_counter() - run_start)}")
        self.log.finish()
        return last_stats

    def stop(self, reason: str) -> dict[str, Any]:
        """Leave after a clean save: say where the checkpoint is and how to continue."""
        if "--exit_after_iterations" in reason:
            how = f"to continue, relaunch with --exit_after_iterations above {self.iteration}, or without it"
        else:
            how = "relaunch the same command to resume"
            reason = f"{reason} ({self.preempt.signal_name or 'a signal to another rank'})"
        self.log.print(f"{reason}: saved {self.checkpoint_path} at epoch {self.epoch}, iteration {self.iteration}, "
                       f"exiting; {how}")
        self.log.finish()
        return {"preempted": True}

    def finish_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        """An epoch's bookkeeping: checkpoint (kept copy when due), then k-NN when due and the log line.

        The checkpoint records the epoch as pending until its log line is in log.txt, so a kill during the
        k-NN is redone by the relaunch (``finish_interrupted_epoch``).
        """
        self.epoch, self.epoch_sample = epoch + 1, 0
        self.pending_epoch_end = {"epoch": epoch, "stats": train_stats}
        self.save(extra_name=self.kept_name(epoch))
        return self.epoch_log(epoch, train_stats)

    def kept_name(self, epoch: int) -> str | None:
        keep = self.args.saveckp_freq and epoch % self.args.saveckp_freq == 0
        return f"checkpoint{epoch:04}.pth" if keep else None

    def epoch_log(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if self.dist.world_size > 1:
            log_stats["teacher_rank_max_diff"] = self.teacher_rank_max_diff()
        if self.attention_log.due(epoch):
            self.attention_log.write(epoch, unwrap(self.teacher).backbone, step=self.iteration)
        if self.knn_due(epoch):
            log_stats["knn"] = self.online_knn()
        self.log.log_epoch(log_stats, step=self.iteration)
        self.pending_epoch_end = None
        return log_stats

    def finish_interrupted_epoch(self) -> dict[str, Any]:
        """Redo what a kill between an epoch's checkpoint and its log line left undone."""
        pending = self.pending_epoch_end or {}
        epoch = int(pending.get("epoch", -1))
        if self.epoch_logged(epoch):
            self.pending_epoch_end = None
            return {}
        self.log.print(f"epoch {epoch} was saved but its bookkeeping was interrupted: redoing it")
        kept = self.kept_name(epoch)
        if kept and self.dist.is_main and not (self.output_dir / kept).is_file():
            atomic_save(self.checkpoint_state(), self.output_dir / kept)
        barrier()
        return self.epoch_log(epoch, dict(pending.get("stats", {})))

    def epoch_logged(self, epoch: int) -> bool:
        """Whether log.txt holds epoch ``epoch``'s line (all ranks read the same file)."""
        path = self.output_dir / "log.txt"
        if not path.is_file():
            return False
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if entry.get("epoch") == epoch and "train_loss" in entry:
                return True
        return False

    def agree_to_stop(self) -> bool:
        """Did any rank get a preemption signal? (one CPU collective; every rank must call it together)"""
        on_any, _ = any_and_all([self.preempt.raised])
        return on_any[0]

    @torch.no_grad()
    def teacher_rank_max_diff(self) -> float:
        """Largest difference between this run's teacher weights on any rank and on rank 0 (should be 0)."""
        params = [p.detach().flatten() for p in unwrap(self.teacher).parameters()]
        local = torch.cat(params)
        reference = local.clone()
        dist.broadcast(reference, src=0)
        diff = (local - reference).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff.item())

    def knn_due(self, epoch: int) -> bool:
        every = self.args.eval_every
        return epoch == self.args.epochs - 1 or (every > 0 and epoch % every == 0)

    def train_one_epoch(self, epoch: int) -> tuple[dict[str, float] | None, str | None]:
        """Train from ``self.epoch_sample`` to the end of ``epoch``.

        Returns (stats, None) at the end of the epoch; (stats, reason) when a stop (preemption, or
        ``--exit_after_iterations``) falls on its last batch, so the caller finishes the epoch's bookkeeping
        first; (None, reason) after a stop mid-epoch (checkpoint written). Every batch is agreed on by all ranks
        with one CPU collective: a batch whose images were all unreadable on any rank is skipped by every rank
        (and its samples counted as consumed), so ranks stay in lock-step and the position stays exact.
        """
        args, niter = self.args, self.niter_per_epoch
        self.sampler.set_epoch(epoch, start_sample=self.epoch_sample)
        steps_left = len(self.loader) // args.accum_steps  # a tail too short for a whole step is dropped
        self.student.train()
        self.teacher.train()
        sums = torch.zeros(5, device=self.device)  # loss, entropy, kl, finite steps, prototypes in use
        consecutive_bad = torch.zeros((), device=self.device, dtype=torch.long)
        skipped_images = 0
        skipped_batches = 0
        steps = 0
        meter = Throughput()
        self.log.start_epoch(epoch, args.epochs, niter, initial=self.epoch_sample // self.samples_per_step)
        epoch_start = time.perf_counter()
        fetch_start = time.perf_counter()
        stop_reason = None
        for step_number, (micro_batches, num_bad) in enumerate(group_micro_batches(self.loader, args.accum_steps),
                                                               start=1):
            skipped_images += num_bad
            meter.data_wait += time.perf_counter() - fetch_start
            on_any, on_all = any_and_all([self.preempt.raised, *(m is not None for m in micro_batches)])
            index = self.schedule_index(epoch, self.epoch_sample)
            # only micro-batches readable on every rank: all ranks then make the same number of backward passes
            micro_batches = [m for m, everywhere in zip(micro_batches, on_all[1:]) if everywhere]
            skipped_batches += args.accum_steps - len(micro_batches)
            if micro_batches:
                crops = [self.to_device(micro) for micro in micro_batches]  # the micro-batches of one step
                stats = self.step(crops, self.schedule_at(index, epoch))
                finite = stats.loss_is_finite
                sums += torch.stack(
                    [
                        torch.where(finite, stats.loss, 0.0),
                        torch.where(finite, stats.teacher_entropy, 0.0),
                        torch.where(finite, stats.kl, 0.0),
                        finite.float(),
                        torch.where(finite, stats.prototypes_in_use, 0.0),
                    ]
                )
                consecutive_bad = torch.where(finite, torch.zeros_like(consecutive_bad), consecutive_bad + 1)
                meter.images += sum(micro[0].shape[0] for micro in crops) * self.dist.world_size
                steps += 1
            self.epoch_sample += self.samples_per_step
            self.iteration += 1
            self.last_index = index
            last = step_number == steps_left

            done = self.epoch_sample // self.samples_per_step
            if done % args.log_every == 0 or last:
                self.check_finite(consecutive_bad)
                self.report(epoch, done, niter, sums, max(steps, 1), meter, epoch_start)
            if on_any[0]:
                stop_reason = "preempted"
            elif self.reached_exit_iteration():
                stop_reason = f"stopped after iteration {self.iteration} (--exit_after_iterations)"
            if stop_reason is not None and not last:
                self.save()
                return None, stop_reason
            if stop_reason is None and args.save_every_steps and self.iteration % args.save_every_steps == 0 \
                    and not last:
                self.save()
            fetch_start = time.perf_counter()
        self.log.end_epoch()
        all_reduce_sum(sums)
        total_skipped = all_reduce_sum(torch.tensor(float(skipped_images), device=self.device))
        finite_steps = max(sums[3].item(), 1.0)
        index = self.last_index if steps or skipped_batches else self.schedule_index(epoch, self.epoch_sample)
        return {
            "loss": sums[0].item() / finite_steps,
            "entropy": sums[1].item() / finite_steps,
            "KL_div": sums[2].item() / finite_steps,
            "prototypes_in_use": sums[PROTOTYPES].item() / finite_steps,
            "lr": float(self.lr_schedule[index]),
            "wd": float(self.wd_schedule[index]),
            "skipped_steps": int(steps * self.dist.world_size - sums[3].item()),
            "unreadable_images": int(total_skipped.item()),
            "skipped_batches": skipped_batches,
        }, stop_reason

    def to_device(self, crops) -> list[torch.Tensor]:
        """One loader batch's crops on the device (made there from the padded images on the GPU path)."""
        if self.gpu_multicrop is not None:
            padded, sizes = crops
            crops = self.gpu_multicrop(padded.to(self.device, non_blocking=True), sizes)
        else:
            crops = [c.to(self.device, non_blocking=True) for c in crops]
        if self.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        return crops

    def schedule_at(self, it: int, epoch: int) -> StepSchedule:
        return StepSchedule(lr=self.lr_schedule[it], weight_decay=self.wd_schedule[it],
                            momentum=self.momentum_schedule[it], teacher_temp=self.teacher_temp_schedule[it],
                            freeze_last_layer=epoch < self.args.freeze_last_layer)

    def reached_exit_iteration(self) -> bool:
        return 0 < self.args.exit_after_iterations <= self.iteration

    def check_finite(self, consecutive_bad: torch.Tensor) -> None:
        bad = int(consecutive_bad.item())
        if bad >= self.args.max_skipped_steps > 0:
            where = self.last_good_checkpoint or "none was written yet"
            raise TrainingStopped(
                f"{bad} consecutive steps had a non-finite loss (their updates were skipped); stopping. "
                f"Last good checkpoint: {where}. Try a lower --lr, --clip_grad, or --precision fp32."
            )

    def report(self, epoch, done, niter, sums, steps, meter, epoch_start) -> None:
        averages = (sums / torch.clamp(sums[3], min=1.0)).tolist()
        rate = meter.summary()
        elapsed = time.perf_counter() - epoch_start
        remaining_iters = self.args.epochs * niter - (epoch * niter + done)
        eta = elapsed / max(steps, 1) * remaining_iters
        values = {
            "loss": averages[0],
            "lr": float(self.lr_schedule[self.last_index]),
            "img/s": rate["img_per_s"],
            "data%": rate["data_wait_pct"],
            "compute%": rate["compute_pct"],
            "mem_GiB": peak_memory_gib(self.device),
            "eta_s": eta,
        }
        reading, warning = self.collapse.observe(sums)
        if reading is not None:
            values.update(entropy=reading.entropy, KL=reading.kl, prototypes=reading.prototypes_in_use)
        it = self.last_index
        record = {"wd": float(self.wd_schedule[it]), "momentum": float(self.momentum_schedule[it]),
                  "teacher_temp": float(self.teacher_temp_schedule[it])}
        self.log.progress(done, niter, epoch, values, step=self.iteration, record=record)
        meter.reset()
        if warning:
            self.log.warning(warning)
            if self.args.stop_on_collapse:
                self.save()
                self.log.print(f"--stop_on_collapse: saved {self.checkpoint_path}, stopping")
                raise CollapseStopped(warning)

    # -- online k-NN ---------------------------------------------------------------------------------------
    def knn_datasets(self):
        """The labelled (train, val) k-NN splits, listed once per run (listing ImageNet takes minutes)."""
        if not hasattr(self, "_knn_splits"):
            transform = eval_transform(self.args.global_crops_size)
            try:
                train, val = build_labelled_splits(self.args.data_path, transform=transform,
                                                   options=data_source_options(self.args, self.args.output_dir))
                limit = self.args.knn_max_images
                self._knn_splits = evenly_spaced_subset(train, limit), evenly_spaced_subset(val, limit)
            except DataError as err:
                self.log.print(f"online k-NN skipped: {err}")
                self._knn_splits = None
        return self._knn_splits

    def _knn_on(self, embed, datasets) -> dict[str, list[float]]:
        """{k: [top1, top5]} (JSON-ready) of weighted k-NN on the features ``embed`` gives."""
        train, val = datasets
        batch = max(self.args.batch_size_per_gpu, 64)
        train_features = extract_features(embed, train, batch, self.args.num_workers, self.device)
        val_features = extract_features(embed, val, batch, self.args.num_workers, self.device)
        results = knn_on_features(train_features, val_features, self.args.nb_knn, self.args.temperature)
        return {str(k): [round(top1, 2), round(top5, 2)] for k, (top1, top5) in results.items()}

    def online_knn(self) -> dict[str, Any]:
        datasets = self.knn_datasets()
        if datasets is None:
            return {}
        table = self._knn_on(unwrap(self.teacher).backbone, datasets)
        self.log.print("k-NN (teacher): " + "  ".join(f"{k}-NN top1 {v[0]:.2f}" for k, v in table.items()))
        return table

    def knn_baselines(self) -> dict[str, Any]:
        """k-NN of the untrained teacher and of raw pixels, for comparison with the trained network."""
        datasets = self.knn_datasets()
        if datasets is None:
            return {}
        out = {
            "random_init": self._knn_on(unwrap(self.teacher).backbone, datasets),
            "raw_pixels": self._knn_on(lambda images: images.flatten(1), datasets),
        }
        self.log.log_epoch({"knn_baselines": out, "epoch": -1})
        self.log.print(
            "k-NN before training: "
            + "  ".join(
                f"{k}-NN random init {out['random_init'][k][0]:.2f} / raw pixels {out['raw_pixels'][k][0]:.2f}"
                for k in out["random_init"]
            )
        )
        return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of train_dino.py; returns the process exit code (0 also after a preemption save)."""
    try:
        args = parse_args(argv)
        trainer = Trainer(args)
    except (ConfigError, DataError, CheckpointError) as err:
        return bad_input(err)
    try:
        stats = trainer.fit()
    except (TrainingStopped, CheckpointWriteError) as err:
        return bad_input(err, code=1)
    except CollapseStopped as err:
        trainer.log.finish()
        trainer.log.warning(str(err))  # the alarm is the run's last line
        return 1
    # Every rank is here (stops are agreed on): leave the process group together. A rank exiting while its
    # peer's gloo threads still talk to it made the peer abort ("terminate called without an active exception").
    barrier()
    cleanup()
    if stats.get("preempted"):
        write_preemption_marker(trainer.dist.rank)
        return 0
    if trainer.dist.is_main and "knn" in stats and "knn_baselines" in stats:
        print_demo_summary(stats)
    return 0


def print_demo_summary(stats: dict[str, Any]) -> None:
    """The demo's table (rank 0 only): k-NN top-1 of the trained teacher against the two baselines."""
    baselines, trained = stats["knn_baselines"], stats["knn"]
    lines = ["", "weighted k-NN top-1 (%) on the validation split",
             f"{'k':>5} {'DINO+SimPool':>13} {'random init':>12} {'raw pixels':>11}"]
    for k in trained:
        lines.append(f"{k:>5} {trained[k][0]:>13.2f} {baselines['random_init'][k][0]:>12.2f} "
                     f"{baselines['raw_pixels'][k][0]:>11.2f}")
    log.info("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
