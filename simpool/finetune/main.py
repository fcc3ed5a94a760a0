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

Usage::

    python finetune.py --config configs/finetune_vit.yaml --pretrained_weights runs/vits/checkpoint.pth \\
        --data_path /data/mydataset --output_dir runs/ft
    torchrun --nproc_per_node=8 finetune.py --config configs/finetune_resnet.yaml --random_init \\
        --arch resnet50 --mode simpool --data_path /imagenet --output_dir runs/rsb
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from simpool.checkpoint import FORMAT_KEY, FORMAT_VERSION, CheckpointError, atomic_save, safe_load
from simpool.dino.checkpointing import PreemptionFlag, rng_state, set_rng_state, set_seeds
from simpool.dino.schedules import cosine_scheduler, scaled_lr
from simpool.distributed import DistInfo, all_reduce_sum, barrier, cleanup
from simpool.evaluation.common import setup_distributed
from simpool.finetune.config import as_record, parse_finetune_args
from simpool.finetune.data import build_mixup, labelled_splits, train_loader, val_loader
from simpool.finetune.engine import FineTuneStep, build_criterion, evaluate
from simpool.finetune.model import FineTuneModel, build_finetune_model, model_record, rebuild_from_record
from simpool.flags import bad_input
from simpool.run_log import RunLogger, format_seconds

log = logging.getLogger("simpool.finetune.main")  # not __name__: "__main__" under python -m

CHECKPOINT_FILE = "checkpoint.pth"
BEST_FILE = "checkpoint_best.pth"
FINETUNE_FORMAT = 1  # "finetune_format" in the checkpoint; FORMAT_KEY marks it as ours (not reference-format)


class FineTuneRun:
    """Owns the model, optimizer, EMA, schedules and checkpoints of one run; ``fit()`` trains to the last epoch."""

    def __init__(self, args: argparse.Namespace, dist_info: DistInfo) -> None:
        self.args, self.dist, self.device = args, dist_info, dist_info.device
        self.output_dir = Path(args.output_dir)
        self.checkpoint_path = self.output_dir / CHECKPOINT_FILE
        set_seeds(args.seed + dist_info.rank)
        self.precision = args.precision or ("bf16" if self.device.type == "cuda" else "fp32")

        # -- everything that can be wrong with the input, before anything is written --------------------------
        self.train_set, self.val_set, self.classes = labelled_splits(args, dist_info.world_size)
        saved = self._read_resume_checkpoint()
        if saved is None:
            model, source = build_finetune_model(args, len(self.classes))
            self.source = source.as_dict()
        else:
            model = rebuild_from_record(saved["args"], len(self.classes), args.drop_path)
            self.source = saved.get("source", {})
        self.model: FineTuneModel = model.to(self.device)

        if dist_info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "args.yaml").write_text(yaml.safe_dump(as_record(args), sort_keys=True))
        barrier()
        self.train_model: nn.Module = self.model
        if dist_info.world_size > 1:
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
        self.loader, self.sampler = train_loader(self.train_set, args, dist_info)
        self.val_loader = val_loader(self.val_set, args, dist_info)
        self.niter_per_epoch = len(self.sampler) // args.batch_size_per_gpu
        global_batch = args.batch_size_per_gpu * dist_info.world_size
        self.lr_schedule = cosine_scheduler(scaled_lr(args.lr, global_batch), args.min_lr, args.epochs,
                                            self.niter_per_epoch, warmup_epochs=args.warmup_epochs,
                                            start_warmup_value=args.warmup_lr)
        self.iteration, self.best = 0, {"top1": -1.0, "epoch": -1}
        self.preempt = PreemptionFlag()
        self.log = RunLogger(self.output_dir, enabled=dist_info.is_main, wandb_project=args.wandb_project,
                             wandb_name=args.wandb_name, config=as_record(args))
        if saved is not None:
            self._resume(saved)
        else:
            self.log.print(f"fine-tuning {self.model.backbone.arch} ({self.model.backbone.mode} mode) from "
                           f"{self.source.get('weights') or 'random initialisation'}: {len(self.classes)} classes, "
                           f"{len(self.train_set)} train / {len(self.val_set)} val images")

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _read_resume_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        saved = safe_load(self.checkpoint_path)
        if saved.get("finetune_format") != FINETUNE_FORMAT:
            raise CheckpointError(f"{self.checkpoint_path} is not a checkpoint of this finetune.py (format "
                                  f"{saved.get('finetune_format')}): use another --output_dir")
        if saved["classifier"]["classes"] != self.classes:
            raise CheckpointError(f"{self.checkpoint_path} was trained on other classes than {self.args.data_path}'s:"
                                  " use another --output_dir")
        return saved

    def state(self) -> dict[str, Any]:
        return {
            FORMAT_KEY: FORMAT_VERSION,
            "finetune_format": FINETUNE_FORMAT,
            "classifier": {"classes": self.classes},
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step.state_dict(),
            "epoch": self.iteration // self.niter_per_epoch,
            "iteration": self.iteration,
            "best": dict(self.best),
            "source": self.source,
            "args": {**as_record(self.args), **model_record(self.model)},
            "rng": rng_state(),
        }

    def save(self, best: bool = False) -> None:
        if self.dist.is_main:
            state = self.state()
            atomic_save(state, self.checkpoint_path)
            if best:
                atomic_save(state, self.output_dir / BEST_FILE)
        barrier()

    def _resume(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        if self.ema is not None and saved.get("model_ema") is not None:
            self.ema.module.load_state_dict(saved["model_ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step.load_state_dict(saved.get("step", {}))
        self.iteration, self.best = int(saved["iteration"]), dict(saved["best"])
        set_rng_state(saved["rng"])
        if self.dist.rank:  # other ranks keep distinct but reproducible streams
            torch.manual_seed(self.args.seed + self.dist.rank + self.iteration)
        self.log.print(f"resumed from {self.checkpoint_path} at epoch {self.iteration // self.niter_per_epoch}, "
                       f"iteration {self.iteration}")

    # -- training ------------------------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        if 0 < self.args.exit_after_iterations <= self.iteration:
            return True
        flag = torch.tensor(float(self.preempt.raised), device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)

    def train_one_epoch(self, epoch: int) -> dict[str, float] | None:
        """Train one epoch; None when stopped early (checkpoint written)."""
        niter = self.niter_per_epoch
        start_batch = self.iteration - epoch * niter
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        self.loader.generator.manual_seed(self.args.seed + 7919 * epoch + self.dist.rank)  # worker seeds
        self.train_model.train()
        loss_sum, steps, epoch_start = torch.zeros((), device=self.device), 0, time.perf_counter()
        self.log.start_epoch(epoch, self.args.epochs, niter, initial=start_batch)
        for batch_index, (images, labels, _) in enumerate(self.loader, start=start_batch):
            if images is None:
                continue
            lr = float(self.lr_schedule[self.iteration])
            loss = self.step(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                             lr, self.iteration)
            loss_sum += loss.float()
            self.iteration += 1
            steps += 1
            done = batch_index + 1
            if done % self.args.log_every == 0 or done == niter:
                remaining = self.args.epochs * niter - self.iteration  # training steps; evaluation not counted
                eta = (time.perf_counter() - epoch_start) / steps * remaining
                self.log.progress(done, niter, epoch, {"loss": (loss_sum / steps).item(), "lr": lr, "eta_s": eta},
                                  step=self.iteration)
            if done != niter and self.stop_requested():
                self.save()
                return None
        self.log.end_epoch()
        mean_loss = (all_reduce_sum(loss_sum) / max(steps * self.dist.world_size, 1)).item()
        return {"loss": mean_loss, "lr": float(self.lr_schedule[self.iteration - 1])}

    def fit(self) -> dict[str, Any]:
        args, start = self.args, time.perf_counter()
        stats: dict[str, Any] = {}
        for epoch in range(self.iteration // self.niter_per_epoch, args.epochs):
            train_stats = self.train_one_epoch(epoch)
            if train_stats is None:
                self.log.print(f"stopped after iteration {self.iteration}: saved {self.checkpoint_path}; "
                               "relaunch the same command to resume")
                self.log.finish()
                return {"stopped": True}
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
            if self.stop_requested():
                self.log.print(f"stopped after epoch {epoch}: relaunch the same command to resume")
                self.log.finish()
                return {"stopped": True, **stats}
        self.log.print(f"fine-tuning time {format_seconds(time.perf_counter() - start)}; best val top-1 "
                       f"{self.best['top1']:.2f} at epoch {self.best['epoch']}")
        self.log.finish()
        return {**stats, "best": self.best}


def main(argv: list[str] | None = None) -> int:
    """Entry point of finetune.py; returns the exit code (2: bad input, reported before anything is written)."""
    try:
        args = parse_finetune_args(argv)
    except ValueError as err:
        return bad_input(err)
    dist_info = setup_distributed(args)
    try:
        run = FineTuneRun(args, dist_info)
    except ValueError as err:  # FinetuneSetupError, DataError, CheckpointError
        cleanup()
        return bad_input(err)
    run.fit()
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
