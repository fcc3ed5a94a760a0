"""The DINO training loop: epochs of steps, the agreed stops, the checkpoints that make a relaunch resume.

The iteration itself is :class:`simpool.dino.step.DINOStep`, what it is built from :mod:`simpool.dino.build`;
where a run is and what a resume may change :mod:`simpool.dino.resume`; an epoch's bookkeeping
:mod:`simpool.dino.epoch_end`; the online k-NN :mod:`simpool.dino.online_knn`. The command line is
:mod:`simpool.dino.run_train`.

* ``output_dir/checkpoint.pth`` every epoch (and every ``--save_every_steps``), written atomically, holding
  student, teacher, optimizer, loss scaler, loss centre, progress, args and RNG states. Relaunching the same
  command resumes, mid-epoch from the next sample, also on another number of processes or batch size.
* SIGTERM / SIGUSR1 (SLURM preemption) on any rank: every rank stops after the same step, rank 0 saves, exit 0.
* Non-finite losses skip their step on every rank (``step.py``); ``--max_skipped_steps`` in a row stop the run
  with a message naming the last good checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from simpool.checkpoint import CheckpointError
from simpool.data import DataError, dataset_fingerprint
from simpool.dino.accum import group_micro_batches
from simpool.dino.attention_log import AttentionLog
from simpool.dino.augment import GPUMultiCrop
from simpool.dino.build import build_dino_step, build_train_loader, checkpoint_bytes, use_gpu_augment
from simpool.dino.collapse import CollapseMonitor
from simpool.dino.epoch_end import EpochEnd
from simpool.dino.init_from import apply_init_weights, read_init_weights
from simpool.dino.online_knn import OnlineKNN
from simpool.dino.resume import DINO_CHECKPOINT, Progress, check_resumable, geometry_change, schedule_index
from simpool.dino.running_stats import RunningSums
from simpool.dino.schedules import DINOSchedules
from simpool.distributed import all_reduce_sum, unwrap
from simpool.run.config import check_decoupled_decay, check_scaled_lr, check_schedule_length, write_args_yaml
from simpool.run.log import RunLogger, Throughput, format_seconds, peak_memory_gib
from simpool.run.model_check import weights_are_finite
from simpool.run.output import OutputFolder
from simpool.run.precision import resolve_precision
from simpool.run.process import start_process
from simpool.run.rng import restore_rng_state, rng_state, set_seeds
from simpool.run.state import RunCheckpoint
from simpool.run.stop import RunEnd, StopControl, StopReason

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite losses: the run stops and says which checkpoint is the last good one."""


class CollapseStopped(RuntimeError):
    """--stop_on_collapse: the collapse alarm fired; the checkpoint is saved and the message is the warning."""


class Trainer:
    """Owns the models, the schedules and the checkpoint of one run; ``fit()`` trains to the last epoch.

    Schedules are indexed by :func:`~simpool.dino.resume.schedule_index` of the progress (epoch, sample), so a
    relaunch on another number of processes or another batch size continues the same epoch at the same sample
    with schedules rebuilt for its iteration count.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.stop_control = StopControl(args.exit_after_iterations)  # first: a signal during set-up is remembered
        self.args = args
        self.dist = start_process(args.dist_url, args.backend, tf32=True)
        self.device = self.dist.device
        set_seeds(args.seed + self.dist.rank)
        resume_state, init_weights = self.read_inputs()  # everything that can be wrong, before anything is written
        self.checkpoint.prepare_folder()
        if self.dist.is_main:
            write_args_yaml(args.output_dir, args)
        self.build_models()
        self.schedules = DINOSchedules.build(args, self.niter_per_epoch, self.samples_per_step)
        self.build_bookkeeping()
        self.start_from(resume_state, init_weights)

    def read_inputs(self) -> tuple[dict[str, Any] | None, Any]:
        """The checkpoint to resume from, the ``--pretrained_weights`` and the data, each checked (nothing is
        written): (resume state or None, init weights or None)."""
        args = self.args
        # The output folder first: writable, room for a checkpoint, and locked if it exists (one run per folder).
        OutputFolder(args.output_dir, need_bytes=checkpoint_bytes(args)).check()
        peak_lr = check_scaled_lr(args.lr, self.samples_per_step)
        if args.optimizer in ("adamw", "sgd"):  # LARS scales each update to its layer's norm: no blow-up from wd
            check_decoupled_decay(peak_lr, max(args.weight_decay, args.weight_decay_end),
                                  "--lr (scaled by the global batch) and --weight_decay / --weight_decay_end")
        self.checkpoint = RunCheckpoint(args.output_dir, DINO_CHECKPOINT, resume_from=args.resume_from)
        self.resume_source, resume_state = self.checkpoint.read()
        init_weights = read_init_weights(args, self.resume_source)  # a resume ignores --pretrained_weights
        self.loader, self.sampler = build_train_loader(args, self.dist)
        self.dataset_size = len(self.sampler.dataset)
        self.dataset_fingerprint = dataset_fingerprint(self.sampler.dataset)
        check_resumable(resume_state, self.resume_source, args, self.dataset_size, self.dataset_fingerprint)
        self.niter_per_epoch = self.dataset_size // self.samples_per_step
        if self.niter_per_epoch < 1:
            raise DataError(f"{args.data_path} holds {self.dataset_size} images, fewer than one optimizer step "
                            f"({self.samples_per_step} samples); lower --batch_size_per_gpu")
        check_schedule_length(args.epochs, self.niter_per_epoch)
        return resume_state, init_weights

    def build_bookkeeping(self) -> None:
        """Progress, the collapse alarm, the logs, the online k-NN, the attention grid and the epoch's end."""
        args, output_dir = self.args, Path(self.args.output_dir)
        self.progress = Progress()
        self.last_index = 0  # schedule index of the latest step
        self.collapse = CollapseMonitor(args.out_dim)
        self.log = RunLogger(output_dir, enabled=self.dist.is_main, wandb_project=args.wandb_project,
                             wandb_name=args.wandb_name, config=vars(args))
        self.online_knn = OnlineKNN(args, self.device, self.log)
        attention_log = AttentionLog.from_args(args, self.loader.dataset, self.dist.is_main, output_dir,
                                               self.log.wandb)
        self.epoch_end = EpochEnd(args, output_dir, self.log, attention_log, self.online_knn, self.dist.world_size)

    def start_from(self, resume_state: dict[str, Any] | None, init_weights) -> None:
        """Resume the run's own checkpoint, or start a new run from ``--pretrained_weights`` (if given)."""
        self.resumed = resume_state is not None
        if resume_state is not None:
            self.resume(resume_state)
        for note in apply_init_weights(self.args, init_weights, unwrap(self.student), unwrap(self.teacher),
                                       self.loss_fn):
            self.log.print(note)

    def build_models(self) -> None:
        """Student, teacher, loss and optimizer in one ``DINOStep``; the GPU multi-crop when it is used."""
        args = self.args
        precision = resolve_precision(args.precision, self.device, use_fp16=args.use_fp16)
        compile_models = args.compile if args.compile is not None else self.device.type == "cuda"
        self.step = build_dino_step(args, self.dist, precision, compile_models)
        self.student, self.teacher = self.step.student, self.step.teacher
        self.loss_fn, self.optimizer = self.step.loss_fn, self.step.optimizer
        self.channels_last = self.device.type == "cuda" and unwrap(self.student).backbone.is_convnet
        self.gpu_multicrop = None
        if use_gpu_augment(args, self.device):
            self.gpu_multicrop = GPUMultiCrop(args.global_crops_scale, args.local_crops_scale,
                                              args.local_crops_number, args.global_crops_size, args.local_crops_size)

    @property
    def samples_per_step(self) -> int:
        """Samples one optimizer step consumes over all processes (the one place this is computed)."""
        return self.args.batch_size_per_gpu * self.dist.world_size * self.args.accum_steps

    def schedule_index(self, epoch: int, epoch_sample: int) -> int:
        return schedule_index(epoch, epoch_sample, self.samples_per_step, self.niter_per_epoch, self.args.epochs)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, keep_as: str | None = None) -> None:
        """checkpoint.pth (atomically) on rank 0; RNG states are rank 0's (every rank restores from them).

        Weights that are no longer finite (an update from a finite loss overflowed) are never written over the
        last good checkpoint: the run stops instead (exit 1), naming it."""
        if not weights_are_finite(unwrap(self.student)):
            where = self.checkpoint.last_written or "none was written yet"
            raise TrainingStopped(
                f"the student's weights are no longer finite at iteration {self.progress.iteration} (an update "
                f"overflowed); not saved. Last good checkpoint: {where}. Try a lower --lr or --clip_grad."
            )
        state = None
        if self.dist.is_main:
            state = {
                "student": unwrap(self.student).state_dict(),
                "teacher": unwrap(self.teacher).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step.state_dict(),
                "dino_loss": self.loss_fn.state_dict(),
                **self.progress.state_dict(),
                "samples_per_step": self.samples_per_step,
                "world_size": self.dist.world_size,
                "dataset_size": self.dataset_size,
                "dataset_fingerprint": self.dataset_fingerprint,
                "args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.args).items()},
                "rng": rng_state(),
            }
        self.checkpoint.write(state, keep_as=keep_as)

    def resume(self, state: dict[str, Any]) -> None:
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
        self.progress = Progress.from_state(state, self.niter_per_epoch, self.samples_per_step)
        if "rng" in state:
            restore_rng_state(state["rng"], self.args.seed, self.dist.rank, self.progress.iteration)
        p = self.progress
        self.log.print(f"resumed from {self.resume_source} at epoch {p.epoch}, iteration {p.iteration} "
                       f"(sample {p.epoch_sample} of the epoch's {self.dataset_size})")
        new_lr = self.schedules.lr[self.schedule_index(p.epoch, p.epoch_sample)]
        change = geometry_change(state, self.args, self.dataset_size, self.samples_per_step, self.dist.world_size,
                                 p, new_lr)
        if change:
            self.log.print(change)

    # -- training ------------------------------------------------------------------------------------------
    def fit(self) -> RunEnd:
        args, progress = self.args, self.progress
        last_stats: dict[str, Any] = {}
        if progress.pending_epoch_end is not None:  # a kill interrupted that epoch's log line / k-NN: redo them
            last_stats.update(self.finish_interrupted_epoch())
        if not self.resumed and args.knn_baselines:
            last_stats["knn_baselines"] = self.online_knn.baselines(unwrap(self.teacher).backbone)
        if progress.epoch < args.epochs and self.stop_control.reached_exit_iteration(progress.iteration):
            n = args.exit_after_iterations
            self.log.print(f"already at iteration {progress.iteration} >= --exit_after_iterations {n}: nothing to "
                           f"do. To continue, raise --exit_after_iterations above {progress.iteration} or drop it")
            self.log.finish()
            return RunEnd(last_stats, StopReason.EXIT_AFTER_ITERATIONS)
        run_start = time.perf_counter()
        while progress.epoch < args.epochs:
            epoch = progress.epoch
            stop = self.stop_control.agree(progress.iteration).stop
            if stop is not None and stop.by_signal:  # e.g. during set-up
                self.save()
                return self.stopped(stop, last_stats)
            train_stats, stop = self.train_one_epoch(epoch)
            if train_stats is None:  # stopped mid-epoch: checkpoint written
                return self.stopped(stop, last_stats)
            last_stats = {**last_stats, **self.finish_epoch(epoch, train_stats)}
            if stop is None and progress.epoch < args.epochs:
                agreed = self.stop_control.agree(progress.iteration).stop
                stop = agreed if agreed is not None and agreed.by_signal else None
            if stop is not None and progress.epoch < args.epochs:
                return self.stopped(stop, last_stats)
        self.log.print(f"training time {format_seconds(time.perf_counter() - run_start)}")
        self.log.finish()
        return RunEnd(last_stats)

    def stopped(self, reason: StopReason, stats: dict[str, Any]) -> RunEnd:
        """Leave after a clean save: say where the checkpoint is and how to continue."""
        p = self.progress
        saved = f"{self.checkpoint.path} at epoch {p.epoch}, iteration {p.iteration}"
        self.log.print(self.stop_control.describe(reason, p.iteration, saved))
        self.log.finish()
        return RunEnd(stats, reason)

    def finish_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint (kept copy when due) with the epoch pending, then its bookkeeping (``epoch_end``)."""
        self.progress.epoch, self.progress.epoch_sample = epoch + 1, 0
        self.progress.pending_epoch_end = {"epoch": epoch, "stats": train_stats}
        self.save(keep_as=self.epoch_end.kept_name(epoch))
        stats = self.epoch_end.log(epoch, train_stats, unwrap(self.teacher), self.progress.iteration)
        self.progress.pending_epoch_end = None
        return stats

    def finish_interrupted_epoch(self) -> dict[str, Any]:
        """Redo what a kill between an epoch's checkpoint and its log line left undone."""
        pending = self.progress.pending_epoch_end or {}
        epoch = int(pending.get("epoch", -1))
        self.progress.pending_epoch_end = None
        if self.epoch_end.logged(epoch):
            return {}
        self.log.print(f"epoch {epoch} was saved but its bookkeeping was interrupted: redoing it")
        kept = self.epoch_end.kept_name(epoch)
        if kept and not (self.checkpoint.folder / kept).is_file():
            self.progress.pending_epoch_end = pending
            self.save(keep_as=kept)
            self.progress.pending_epoch_end = None
        return self.epoch_end.log(epoch, dict(pending.get("stats", {})), unwrap(self.teacher),
                                  self.progress.iteration)

    def train_one_epoch(self, epoch: int) -> tuple[dict[str, float] | None, StopReason | None]:
        """Train from ``progress.epoch_sample`` to the end of ``epoch``.

        Returns (stats, None) at the end of the epoch; (stats, reason) when a stop falls on its last batch, so
        the caller finishes the epoch's bookkeeping first; (None, reason) after a stop mid-epoch (checkpoint
        written). Every batch is agreed on by all ranks with one CPU collective: a micro-batch whose images were
        all unreadable on any rank is dropped by every rank (its samples count as consumed), so ranks stay in
        lock-step and the position stays exact.
        """
        args, niter, progress = self.args, self.niter_per_epoch, self.progress
        self.sampler.set_epoch(epoch, start_sample=progress.epoch_sample)
        steps_left = len(self.loader) // args.accum_steps  # a tail too short for a whole step is dropped
        self.student.train()
        self.teacher.train()
        sums = RunningSums(self.device)
        consecutive_bad = torch.zeros((), device=self.device, dtype=torch.long)
        skipped_images = skipped_batches = steps = 0
        stop: StopReason | None = None
        meter = Throughput()
        self.log.start_epoch(epoch, args.epochs, niter, initial=progress.epoch_sample // self.samples_per_step)
        epoch_start = fetch_start = time.perf_counter()
        for step_number, (micro_batches, num_bad) in enumerate(group_micro_batches(self.loader, args.accum_steps),
                                                               start=1):
            skipped_images += num_bad
            meter.data_wait += time.perf_counter() - fetch_start
            agreed = self.stop_control.agree(progress.iteration + 1, [m is not None for m in micro_batches])
            stop = agreed.stop
            index = self.schedule_index(epoch, progress.epoch_sample)
            # only micro-batches readable on every rank: all ranks then make the same number of backward passes
            micro_batches = [m for m, everywhere in zip(micro_batches, agreed.on_all) if everywhere]
            skipped_batches += args.accum_steps - len(micro_batches)
            if micro_batches:
                crops = [self.to_device(micro) for micro in micro_batches]  # the micro-batches of one step
                stats = self.step(crops, self.schedules.at(index, epoch))
                sums.add(stats)
                consecutive_bad = torch.where(stats.loss_is_finite, torch.zeros_like(consecutive_bad),
                                              consecutive_bad + 1)
                meter.images += sum(micro[0].shape[0] for micro in crops) * self.dist.world_size
                steps += 1
            progress.epoch_sample += self.samples_per_step
            progress.iteration += 1
            self.last_index = index
            last = step_number == steps_left
            done = progress.epoch_sample // self.samples_per_step
            if done % args.log_every == 0 or last:
                self.check_finite(consecutive_bad)
                self.report(epoch, done, sums, max(steps, 1), meter, epoch_start)
            if stop is not None and not last:
                self.save()
                return None, stop
            if stop is None and args.save_every_steps and progress.iteration % args.save_every_steps == 0 \
                    and not last:
                self.save()
            fetch_start = time.perf_counter()
        self.log.end_epoch()
        totals = sums.all_reduced()
        total_skipped = all_reduce_sum(torch.tensor(float(skipped_images), device=self.device))
        index = self.last_index if steps or skipped_batches else self.schedule_index(epoch, progress.epoch_sample)
        values = self.schedules.record(index)
        means = totals.means()
        return {
            "loss": means["loss"],
            "entropy": means["entropy"],
            "KL_div": means["kl"],
            "prototypes_in_use": means["prototypes_in_use"],
            "lr": values["lr"],
            "wd": values["wd"],
            "skipped_steps": int(steps * self.dist.world_size - float(totals.finite_steps)),
            "unreadable_images": int(total_skipped.item()),
            "skipped_batches": skipped_batches,
        }, stop

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

    def check_finite(self, consecutive_bad: torch.Tensor) -> None:
        bad = int(consecutive_bad.item())
        if bad >= self.args.max_skipped_steps > 0:
            where = self.checkpoint.last_written or "none was written yet"
            raise TrainingStopped(
                f"{bad} consecutive steps had a non-finite loss (their updates were skipped); stopping. "
                f"Last good checkpoint: {where}. Try a lower --lr, --clip_grad, or --precision fp32."
            )

    def report(self, epoch: int, done: int, sums: RunningSums, steps: int, meter: Throughput,
               epoch_start: float) -> None:
        """One progress line (console, progress.jsonl, W&B) and the collapse alarm's reading of the window."""
        niter = self.niter_per_epoch
        rate = meter.summary()
        elapsed = time.perf_counter() - epoch_start
        eta = elapsed / max(steps, 1) * (self.args.epochs * niter - (epoch * niter + done))
        at = self.schedules.record(self.last_index)
        values = {"loss": sums.means()["loss"], "lr": at["lr"], "img/s": rate["img_per_s"],
                  "data%": rate["data_wait_pct"], "compute%": rate["compute_pct"],
                  "mem_GiB": peak_memory_gib(self.device), "eta_s": eta}
        reading, warning = self.collapse.observe(sums)
        if reading is not None:
            values.update(entropy=reading.entropy, KL=reading.kl, prototypes=reading.prototypes_in_use)
        self.log.progress(done, niter, epoch, values, step=self.progress.iteration,
                          record={k: at[k] for k in ("wd", "momentum", "teacher_temp")})
        meter.reset()
        if warning:
            self.log.warning(warning)
            if self.args.stop_on_collapse:
                self.save()
                self.log.print(f"--stop_on_collapse: saved {self.checkpoint.path}, stopping")
                raise CollapseStopped(warning)
