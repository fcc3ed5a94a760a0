"""The fine-tuning run behind ``finetune.py``: set-up (checked before anything is written), epochs, checkpoints.

Files in ``--output_dir``:

* ``checkpoint.pth``: written atomically after every epoch (and on SIGTERM / ``--exit_after_iterations``):
  model, EMA, optimizer, grad scaler, epoch, iteration, best top-1, args, RNG states. Relaunching the same
  command resumes from it, mid-epoch from the next batch; with ``--num_workers 0`` the resumed run equals
  the uninterrupted one bit for bit (with workers, from an epoch boundary: their seeds depend on the epoch).
* ``checkpoint_best.pth``: the same content, from the epoch with the best top-1 on ``val/`` so far.
* ``log.txt``: one JSON line per epoch (``train_loss``, ``train_lr``, ``val_top1``, ``val_top5``, ``val_loss``,
  ``ema_val_*`` with an EMA, ``best_top1``); ``args.yaml``: the resolved flags.

Both checkpoints load wherever a backbone is read (``load_model``, the evaluators, the attention scores), and
``utils/export_backbone.py`` exports them with the head (:func:`simpool.finetune.model.load_finetuned`).

Example:
    >>> run = FineTuneRun(parse_finetune_args(["--config", "configs/finetune_vit.yaml", ...]))
    >>> end = run.fit()          # RunEnd(stats, stopped=None) at the last epoch
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from simpool.checkpoint import FORMAT_KEY, FORMAT_VERSION
from simpool.distributed import all_reduce_sum
from simpool.finetune.data import build_mixup, labelled_splits, train_loader, val_loader
from simpool.finetune.engine import FineTuneStep, build_criterion, evaluate
from simpool.finetune.model import FineTuneModel, build_finetune_model, model_record, rebuild_from_record
from simpool.run.config import (
    ConfigError,
    check_decoupled_decay,
    check_scaled_lr,
    check_schedule_length,
    flags_record,
    write_args_yaml,
)
from simpool.run.flags import backbone_parameters
from simpool.run.log import RunLogger, format_seconds
from simpool.run.model_check import check_image_size, weights_are_finite
from simpool.run.output import OutputFolder, float32_bytes
from simpool.run.precision import resolve_precision
from simpool.run.process import start_process
from simpool.run.resume_checks import changes, refuse_changes, weights_identity
from simpool.run.rng import restore_rng_state, rng_state, set_seeds
from simpool.run.schedules import cosine_scheduler, scaled_lr
from simpool.run.state import CheckpointFormat, RunCheckpoint
from simpool.run.stop import RunEnd, StopControl, StopReason

__all__ = ["BEST_FILE", "FINETUNE_CHECKPOINT", "FineTuneRun", "TrainingStopped"]

BEST_FILE = "checkpoint_best.pth"
# The marker of fine-tuning checkpoints (besides FORMAT_KEY, which tells load_pretrained the file is ours).
FINETUNE_CHECKPOINT = CheckpointFormat("finetune_format", 1, "a fine-tuning checkpoint")


class TrainingStopped(RuntimeError):
    """The weights stopped being finite: the run stops (exit 1) and names the last good checkpoint."""


class FineTuneRun:
    """Owns the model, optimizer, EMA, schedules and checkpoints of one run; ``fit()`` trains to the last epoch."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.stop_control = StopControl(args.exit_after_iterations)  # first: a signal during set-up is remembered
        self.args = args
        self.dist = start_process(args.dist_url)
        self.device = self.dist.device
        set_seeds(args.seed + self.dist.rank)
        self.precision = resolve_precision(args.precision, self.device)

        # -- everything that can be wrong with the input, before anything is written --------------------------
        # the output folder first (writable, room for a checkpoint, locked if it exists), sized by the model built
        # on the meta device (which also checks the --model_overrides values)
        copies = 1 + (args.model_ema_decay > 0) + 2  # the model, its EMA, two optimizer moments (AdamW, LAMB...)
        OutputFolder(args.output_dir, need_bytes=float32_bytes(backbone_parameters(args) * copies)).check()
        global_batch = args.batch_size_per_gpu * self.dist.world_size
        peak_lr = check_scaled_lr(args.lr, global_batch)
        if not any(name in args.opt.lower() for name in ("lars", "lamb")):  # trust ratios bound those updates
            check_decoupled_decay(peak_lr, args.weight_decay, "--lr (scaled by the global batch) and --weight_decay")
        self.train_set, self.val_set, self.classes = labelled_splits(args, self.dist.world_size)
        self.niter_per_epoch = len(self.train_set) // global_batch  # what the sampler's drop_last leaves
        check_schedule_length(args.epochs, self.niter_per_epoch)
        self.checkpoint = RunCheckpoint(args.output_dir, FINETUNE_CHECKPOINT)
        _, saved = self.checkpoint.read()
        if saved is None:
            model, source = build_finetune_model(args, len(self.classes))
            self.source = source.as_dict()
        else:
            self.check_same_run(saved)
            model = rebuild_from_record(saved["args"], len(self.classes), args.drop_path)
            self.source = saved.get("source", {})
        check_image_size(model.backbone, args.input_size, "--input_size")
        self.model: FineTuneModel = model.to(self.device)
        self.checkpoint.prepare_folder()
        if self.dist.is_main:
            write_args_yaml(args.output_dir, args)

        self.train_model: nn.Module = self.model
        if self.dist.world_size > 1:
            if self.device.type == "cuda":
                self.train_model = nn.SyncBatchNorm.convert_sync_batchnorm(self.train_model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=device_ids)
        # timm's param groups: no weight decay on 1-d parameters and no_weight_decay(); layer-wise lr decay
        # through FineTuneModel.group_matcher; each group's "lr_scale" multiplies the scheduled lr.
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             momentum=args.momentum,
                                             layer_decay=args.layer_decay if args.layer_decay < 1 else None)
        self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=True) \
            if args.model_ema_decay > 0 else None
        self.mixup = build_mixup(args, len(self.classes))
        self.step = FineTuneStep(self.train_model, self.optimizer, build_criterion(args, self.mixup is not None),
                                 self.mixup, self.precision, args.clip_grad, self.ema)
        self.loader, self.sampler = train_loader(self.train_set, args, self.dist)
        self.val_loader = val_loader(self.val_set, args, self.dist)
        self.lr_schedule = cosine_scheduler(scaled_lr(args.lr, global_batch), args.min_lr, args.epochs,
                                            self.niter_per_epoch, warmup_epochs=args.warmup_epochs,
                                            start_warmup_value=args.warmup_lr)
        self.iteration, self.best = 0, {"top1": -1.0, "epoch": -1}
        self.log = RunLogger(args.output_dir, enabled=self.dist.is_main, wandb_project=args.wandb_project,
                             wandb_name=args.wandb_name, config=flags_record(args))
        if saved is not None:
            self.resume(saved)
        else:
            self.log.print(f"fine-tuning {self.model.backbone.arch} ({self.model.backbone.mode} mode) from "
                           f"{self.source.get('weights') or 'random initialisation'}: {len(self.classes)} classes, "
                           f"{len(self.train_set)} train / {len(self.val_set)} val images")

    # -- checkpoints ---------------------------------------------------------------------------------------
    def check_same_run(self, saved: dict[str, Any]) -> None:
        """The same classes and the same starting weights as the run in ``checkpoint.pth`` (else it would mix
        two fine-tunings in one folder)."""
        where = self.checkpoint.path
        done = int(saved.get("iteration", 0))
        epochs_done, partial = divmod(done, self.niter_per_epoch)
        if epochs_done > self.args.epochs or (epochs_done == self.args.epochs and partial):
            reached = f"{epochs_done} epoch(s)" + (f" and {partial} iterations of the next" if partial else "")
            raise ConfigError(f"{where} has trained {reached}, more than --epochs {self.args.epochs} asks for: "
                              f"relaunch with --epochs {epochs_done + bool(partial)} or more to continue it, or use "
                              "another --output_dir for a shorter run")
        if saved["classifier"]["classes"] != self.classes:
            raise ValueError(f"{where} was trained on other classes than {self.args.data_path}'s: use another "
                             "--output_dir")
        if not isinstance(saved.get("source"), dict):
            return
        recorded = weights_identity(saved["source"])
        before = {"pretrained_weights": recorded["weights"], "checkpoint_key": recorded["checkpoint_key"]}
        now = {"pretrained_weights": weights_identity({"weights": self.args.pretrained_weights or None})["weights"]}
        if before["checkpoint_key"] is not None:  # a training checkpoint: which of its networks was fine-tuned
            now["checkpoint_key"] = self.args.checkpoint_key
        refuse_changes(where, "a fine-tuning of other weights", changes(before, now, prefix="--"),
                       fix="use another --output_dir for these weights, or the same flags to resume it")

    def state(self) -> dict[str, Any]:
        return {
            FORMAT_KEY: FORMAT_VERSION,
            "classifier": {"classes": self.classes},
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step.state_dict(),
            "epoch": self.iteration // self.niter_per_epoch,
            "iteration": self.iteration,
            "best": dict(self.best),
            "source": self.source,
            "args": {**flags_record(self.args), **model_record(self.model)},
            "rng": rng_state(),
        }

    def save(self, best: bool = False) -> None:
        """checkpoint.pth (and checkpoint_best.pth) atomically on rank 0; weights that are no longer finite are never
        written over the last good checkpoint: :class:`TrainingStopped` (exit 1) instead."""
        if not weights_are_finite(self.model):
            raise TrainingStopped(f"the weights are no longer finite at iteration {self.iteration} (the loss or an "
                                  f"update overflowed); not saved. Last good checkpoint: "
                                  f"{self.checkpoint.last_written or 'none was written yet'}. Try a lower --lr, "
                                  "--clip_grad, or --precision fp32")
        self.checkpoint.write(self.state() if self.dist.is_main else None, keep_as=BEST_FILE if best else None)

    def resume(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        if self.ema is not None and saved.get("model_ema") is not None:
            self.ema.module.load_state_dict(saved["model_ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step.load_state_dict(saved.get("step", {}))
        self.iteration, self.best = int(saved["iteration"]), dict(saved["best"])
        restore_rng_state(saved["rng"], self.args.seed, self.dist.rank, self.iteration)
        self.log.print(f"resumed from {self.checkpoint.path} at epoch {self.iteration // self.niter_per_epoch}, "
                       f"iteration {self.iteration}")

    # -- training ------------------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> tuple[dict[str, float] | None, StopReason | None]:
        """Train one epoch: (stats, None); (None, reason) when stopped early (checkpoint written).

        Every batch is agreed on by all ranks (one CPU collective, as the DINO trainer): a batch whose images were
        all unreadable on any rank is skipped by every rank (DDP needs the same number of backward passes), and
        counts as consumed. With mixup, a batch that lost an odd number of unreadable images also gives up its last
        sample (timm's Mixup pairs a batch with its reverse and needs an even one); both are counted in the log.
        """
        niter = self.niter_per_epoch
        start_batch = self.iteration - epoch * niter
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        self.loader.generator.manual_seed(self.args.seed + 7919 * epoch + self.dist.rank)  # worker seeds
        self.train_model.train()
        loss_sum, steps, epoch_start = torch.zeros((), device=self.device), 0, time.perf_counter()
        unreadable = dropped_for_mixup = skipped_batches = 0
        self.log.start_epoch(epoch, self.args.epochs, niter, initial=start_batch)
        for batch_index, (images, labels, num_bad) in enumerate(self.loader, start=start_batch):
            unreadable += int(num_bad)
            if images is not None and self.mixup is not None and images.shape[0] % 2:
                images, labels = (images[:-1], labels[:-1]) if images.shape[0] > 1 else (None, None)
                dropped_for_mixup += 1
            done = batch_index + 1
            agreed = self.stop_control.agree(self.iteration + 1, [images is not None])
            lr = float(self.lr_schedule[self.iteration])
            if agreed.on_all[0]:
                loss = self.step(images.to(self.device, non_blocking=True),
                                 labels.to(self.device, non_blocking=True), lr, self.iteration)
                loss_sum += loss.float()
                steps += 1
            else:
                skipped_batches += 1
            self.iteration += 1
            if done % self.args.log_every == 0 or done == niter:
                remaining = self.args.epochs * niter - self.iteration  # training steps; evaluation not counted
                eta = (time.perf_counter() - epoch_start) / max(steps, 1) * remaining
                self.log.progress(done, niter, epoch, {"loss": (loss_sum / max(steps, 1)).item(), "lr": lr,
                                                       "eta_s": eta}, step=self.iteration)
            if agreed.stop is not None and done != niter:
                self.save()
                return None, agreed.stop
        self.log.end_epoch()
        totals = all_reduce_sum(torch.tensor([float(loss_sum), float(steps), unreadable, dropped_for_mixup],
                                             dtype=torch.float64, device=self.device))
        return {"loss": float(totals[0] / totals[1].clamp(min=1)), "lr": float(self.lr_schedule[self.iteration - 1]),
                "unreadable_images": int(totals[2]), "dropped_for_mixup": int(totals[3]),
                "skipped_batches": skipped_batches}, None

    def fit(self) -> RunEnd:
        args, start = self.args, time.perf_counter()
        stats: dict[str, Any] = {}
        for epoch in range(self.iteration // self.niter_per_epoch, args.epochs):
            train_stats, stop = self.train_one_epoch(epoch)
            if train_stats is None:
                return self.stopped(stop, stats)
            val = evaluate(self.model, self.val_loader, self.device, self.precision)
            stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"val_{k}": v for k, v in val.items()}}
            if self.ema is not None:
                stats.update({f"ema_val_{k}": v for k, v in
                              evaluate(self.ema.module, self.val_loader, self.device, self.precision).items()})
            improved = val["top1"] > self.best["top1"]
            if improved:
                self.best = {"top1": val["top1"], "epoch": epoch}
            stats["best_top1"] = self.best["top1"]
            self.save(best=improved)
            self.log.log_epoch(stats, step=self.iteration)
            self.log.print(f"epoch {epoch}: val top-1 {val['top1']:.2f}  top-5 {val['top5']:.2f}  "
                           f"(best {self.best['top1']:.2f} at epoch {self.best['epoch']})")
            stop = self.stop_control.agree(self.iteration).stop if epoch < args.epochs - 1 else None
            if stop is not None:
                return self.stopped(stop, stats)
        self.log.print(f"fine-tuning time {format_seconds(time.perf_counter() - start)}; best val top-1 "
                       f"{self.best['top1']:.2f} at epoch {self.best['epoch']}")
        self.log.finish()
        return RunEnd({**stats, "best": self.best})

    def stopped(self, reason: StopReason, stats: dict[str, Any]) -> RunEnd:
        saved = f"{self.checkpoint.path} at epoch {self.iteration // self.niter_per_epoch}"
        self.log.print(self.stop_control.describe(reason, self.iteration, saved))
        self.log.finish()
        return RunEnd(stats, reason)
