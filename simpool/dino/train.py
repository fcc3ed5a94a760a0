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
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from simpool.checkpoint import FORMAT_KEY, FORMAT_VERSION, CheckpointError, atomic_save, safe_load
from simpool.data import DataError, build_labelled_splits
from simpool.dino.accum import group_micro_batches, steps_per_epoch
from simpool.dino.augment import GPUMultiCrop
from simpool.dino.build import build_dino_step, build_train_loader, use_gpu_augment
from simpool.dino.checkpointing import PreemptionFlag, rng_state, set_rng_state, set_seeds
from simpool.dino.collapse import PROTOTYPES, CollapseMonitor
from simpool.dino.config import ConfigError, args_to_yaml, parse_args, resolve_precision
from simpool.dino.schedules import cosine_scheduler, scaled_lr, teacher_temp_schedule
from simpool.dino.step import StepSchedule, unwrap
from simpool.distributed import all_reduce_sum, barrier, init_distributed
from simpool.evaluation.features import eval_transform, evenly_spaced_subset, extract_features
from simpool.evaluation.knn import knn_on_features
from simpool.flags import bad_input
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
    """Owns the models, the schedules and the checkpoint of one run; ``fit()`` trains to the last epoch."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dist = init_distributed(args.dist_url, args.backend)
        setup_logging(self.dist.rank)
        self.device = self.dist.device
        self.output_dir = Path(args.output_dir)
        self.checkpoint_path = self.output_dir / "checkpoint.pth"
        set_seeds(args.seed + self.dist.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "args.yaml").write_text(args_to_yaml(args))
        barrier()

        self.loader, self.sampler = build_train_loader(args, self.dist)  # fails early on bad data paths
        self.niter_per_epoch = steps_per_epoch(len(self.sampler), args.batch_size_per_gpu, args.accum_steps)
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
        global_batch = args.batch_size_per_gpu * self.dist.world_size * args.accum_steps  # per optimizer step
        total = args.epochs * self.niter_per_epoch
        self.lr_schedule = cosine_scheduler(
            scaled_lr(args.lr, global_batch),
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
        self.last_good_checkpoint: str | None = None
        self.preempt = PreemptionFlag()
        self.collapse = CollapseMonitor(args.out_dim)
        self.log = RunLogger(
            self.output_dir,
            enabled=self.dist.is_main,
            wandb_project=args.wandb_project,
            wandb_name=args.wandb_name,
            config=vars(args),
        )
        self.resumed = self.maybe_resume()

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            FORMAT_KEY: FORMAT_VERSION,
            "student": unwrap(self.student).state_dict(),
            "teacher": unwrap(self.teacher).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step.state_dict(),
            "dino_loss": self.loss_fn.state_dict(),
            "epoch": self.iteration // self.niter_per_epoch,
            "iteration": self.iteration,
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

    def maybe_resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = safe_load(self.checkpoint_path)
        if state.get(FORMAT_KEY) != FORMAT_VERSION:
            raise CheckpointError(
                f"{self.checkpoint_path} was written by another simpool version (format {state.get(FORMAT_KEY)}, "
                f"this one reads {FORMAT_VERSION}): finish that run with the version that started it, or move the "
                "file away to start a new run in this output_dir"
            )
        unwrap(self.student).load_state_dict(state["student"])
        unwrap(self.teacher).load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step.load_state_dict(state.get("step", {}))
        self.loss_fn.load_state_dict(state["dino_loss"])
        self.iteration = int(state["iteration"])
        if "rng" in state:
            set_rng_state(state["rng"])
            if self.dist.rank:  # other ranks keep distinct but reproducible streams
                torch.manual_seed(self.args.seed + self.dist.rank + self.iteration)
        self.last_good_checkpoint = str(self.checkpoint_path)
        self.log.print(
            f"resumed from {self.checkpoint_path} at epoch {self.iteration // self.niter_per_epoch}, "
            f"iteration {self.iteration}"
        )
        return True

    # -- training ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        args = self.args
        last_stats: dict[str, Any] = {}
        if not self.resumed and args.knn_baselines:
            last_stats["knn_baselines"] = self.knn_baselines()
        start_epoch = self.iteration // self.niter_per_epoch
        run_start = time.perf_counter()
        for epoch in range(start_epoch, args.epochs):
            train_stats = self.train_one_epoch(epoch)
            if train_stats is None:  # preempted or --exit_after_iterations: checkpoint written, exit cleanly
                reason = (f"stopped after iteration {self.iteration} (--exit_after_iterations)"
                          if self.reached_exit_iteration() else "preempted")
                self.log.print(f"{reason}: saved {self.checkpoint_path}, exiting; relaunch the same command to resume")
                self.log.finish()
                return {"preempted": True}
            keep = args.saveckp_freq and epoch % args.saveckp_freq == 0
            self.save(extra_name=f"checkpoint{epoch:04}.pth" if keep else None)
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
            if self.dist.world_size > 1:
                log_stats["teacher_rank_max_diff"] = self.teacher_rank_max_diff()
            if self.knn_due(epoch):
                log_stats["knn"] = self.online_knn()
            self.log.log_epoch(log_stats, step=self.iteration)
            last_stats = {**last_stats, **log_stats}
        self.log.print(f"training time {format_seconds(time.perf_counter() - run_start)}")
        self.log.finish()
        return last_stats

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

    def train_one_epoch(self, epoch: int) -> dict[str, float] | None:
        args, niter = self.args, self.niter_per_epoch
        start_batch = self.iteration - epoch * niter
        self.sampler.set_epoch(epoch, start_batch=start_batch * args.accum_steps)
        self.student.train()
        self.teacher.train()
        sums = torch.zeros(5, device=self.device)  # loss, entropy, kl, finite steps, prototypes in use
        consecutive_bad = torch.zeros((), device=self.device, dtype=torch.long)
        skipped_images = 0
        steps = 0
        meter = Throughput()
        self.log.start_epoch(epoch, args.epochs, niter, initial=start_batch)
        epoch_start = time.perf_counter()
        fetch_start = time.perf_counter()
        for batch_index, (crops, _, num_bad) in enumerate(group_micro_batches(self.loader, args.accum_steps),
                                                          start=start_batch):
            skipped_images += int(num_bad)
            meter.data_wait += time.perf_counter() - fetch_start
            if crops is None:
                fetch_start = time.perf_counter()
                continue
            crops = [self.to_device(micro) for micro in crops]  # the micro-batches of one optimizer step
            stats = self.step(crops, self.schedule_at(self.iteration, epoch))
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
            self.iteration += 1
            steps += 1
            meter.images += sum(micro[0].shape[0] for micro in crops) * self.dist.world_size

            done = batch_index + 1
            if done % args.log_every == 0 or done == niter:
                self.check_finite(consecutive_bad)
                self.report(epoch, done, niter, sums, steps, meter, epoch_start)
                if self.preempted():
                    self.save()
                    return None
            if args.save_every_steps and self.iteration % args.save_every_steps == 0 and done != niter:
                self.save()
            if (self.dist.world_size == 1 and self.preempt.raised) or self.reached_exit_iteration():
                self.save()
                return None
            fetch_start = time.perf_counter()
        self.log.end_epoch()
        all_reduce_sum(sums)
        total_skipped = all_reduce_sum(torch.tensor(float(skipped_images), device=self.device))
        finite_steps = max(sums[3].item(), 1.0)
        return {
            "loss": sums[0].item() / finite_steps,
            "entropy": sums[1].item() / finite_steps,
            "KL_div": sums[2].item() / finite_steps,
            "prototypes_in_use": sums[PROTOTYPES].item() / finite_steps,
            "lr": float(self.lr_schedule[self.iteration - 1]),
            "wd": float(self.wd_schedule[self.iteration - 1]),
            "skipped_steps": int(steps * self.dist.world_size - sums[3].item()),
            "unreadable_images": int(total_skipped.item()),
        }

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

    def preempted(self) -> bool:
        flag = torch.tensor(float(self.preempt.raised), device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)

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
        remaining_iters = (self.args.epochs * niter) - self.iteration
        eta = elapsed / max(steps, 1) * remaining_iters
        values = {
            "loss": averages[0],
            "lr": float(self.lr_schedule[self.iteration - 1]),
            "img/s": rate["img_per_s"],
            "data%": rate["data_wait_pct"],
            "compute%": rate["compute_pct"],
            "mem_GiB": peak_memory_gib(self.device),
            "eta_s": eta,
        }
        reading, warning = self.collapse.observe(sums)
        if reading is not None:
            values.update(entropy=reading.entropy, KL=reading.kl, prototypes=reading.prototypes_in_use)
        it = self.iteration - 1
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
                train, val = build_labelled_splits(self.args.data_path, transform=transform)
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
    except TrainingStopped as err:
        return bad_input(err, code=1)
    except CollapseStopped as err:
        trainer.log.finish()
        trainer.log.warning(str(err))  # the alarm is the run's last line
        return 1
    if stats.get("preempted"):
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
