"""One DINO training iteration -- the whole algorithm on one screen.

    lr, wd, m, tau_t, frozen = this iteration's StepSchedule   (schedules.py; built per iteration by train.py)
    teacher_out = teacher(global crops)                  no gradient; EMA of the student
    student_out = student(all crops)
    loss, H, KL = DINOLoss(student_out, teacher_out, tau_t)   centring + sharpening, cross-entropy, centre EMA
    loss.backward(); clip each gradient; if frozen: last-layer gradients <- None; optimizer.step()
    teacher <- m * teacher + (1 - m) * student            momentum m follows a cosine schedule to 1

What differs from the reference, and why:

* No host synchronisation per step. The reference called ``loss.item()`` and ``cuda.synchronize()`` every
  iteration; here the statistics stay on the device (read by the caller every N steps) and a non-finite loss
  is handled on the device too: a ``GradScaler`` (a real one in fp16; one with a fixed scale of 1 otherwise)
  skips the optimizer step whenever a gradient is not finite. With DDP the gradients are all-reduced, so every
  rank sees the same non-finite values and all ranks skip together. Fused AdamW/SGD take the scaler's
  ``found_inf`` flag directly, so the skip costs no sync at all.
* The teacher EMA is two foreach kernels over all parameters instead of a Python loop of small ones.
* bf16 autocast by default on CUDA; the loss always runs in float32.

Gradient accumulation (``--accum_steps N``): ``step([crops_1, ..., crops_N], schedule)`` makes the update of
the concatenated batch, exactly where the maths allows it. Every micro-batch is centred with the same centre
c (the step's), the loss of each is divided by N so that the summed gradient is the big batch's mean-loss
gradient, and the centre then takes one EMA update from the teacher rows of all N micro-batches (what one
forward of the big batch would do). Clipping, the skip on non-finite gradients, the freeze, the optimizer
step, the teacher EMA and the schedule values happen once, on the summed gradient. Under DDP the gradient
all-reduce runs only on the last micro-batch (``no_sync`` on the others). What is not exact: BatchNorm
(e.g. ``--use_bn_in_head True``, ResNet trunks) normalises with each micro-batch's statistics, not the big
batch's, and its running statistics take N updates; SimPool itself is per sample, so a BN-free ViT/head
gives the big batch's update to float32 rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from simpool.dino.optim import clip_gradients, set_schedule_values
from simpool.distributed import unwrap
from simpool.run.precision import AUTOCAST_DTYPES, autocast, grad_scaler


@dataclass(frozen=True)
class StepSchedule:
    """One iteration's values of the schedules (``train.py`` indexes its per-iteration arrays).

    ``freeze_last_layer`` True (the first ``--freeze_last_layer`` epochs) keeps the head's prototype
    layer (the ``is_last_layer`` parameter groups) fixed: its lr is 0 and its gradients are dropped.
    """

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool = False


@dataclass
class StepStats:
    """Per-step values, all device tensors (no host sync until someone reads them)."""

    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    kl: torch.Tensor
    loss_is_finite: torch.Tensor
    prototypes_in_use: torch.Tensor  # exp(H(batch-mean teacher distribution)), between 1 and K



def effective_prototypes(mean_probs: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) of a distribution over K prototypes: K when used uniformly, 1 when all mass is on one."""
    return torch.exp(torch.special.entr(mean_probs.float()).sum())


def as_micro_batches(batch: Sequence) -> list[list[torch.Tensor]]:
    """One batch of crops (a list of tensors) or N of them (a list of such lists), as a list of N batches."""
    if len(batch) and isinstance(batch[0], torch.Tensor):
        return [list(batch)]
    return [list(crops) for crops in batch]


class DINOStep:
    """Callable that performs one DINO iteration on a list of crop batches (2 global first).

    Args:
        student: MultiCropWrapper(backbone, head), possibly wrapped in DDP and/or torch.compile.
        teacher: the teacher MultiCropWrapper (same architecture, ``requires_grad`` False).
        loss_fn: ``DINOLoss``.
        optimizer: over the student's parameter groups.
        precision: "fp32", "fp16" (autocast + dynamic loss scaling) or "bf16" (autocast).
        clip_grad: per-parameter gradient-norm clip; 0 disables.

    Example:
        >>> step = DINOStep(student, teacher, DINOLoss(K, ncrops), optimizer, precision="bf16", clip_grad=3.0)
        >>> stats = step(crops, StepSchedule(lr=5e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04,
        ...                                  freeze_last_layer=True))
        >>> float(stats.loss)   # reading it synchronises; do it every N steps
        >>> stats = step([crops_a, crops_b], schedule)   # --accum_steps 2: the update of the two batches together
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str = "fp32",
        clip_grad: float = 0.0,
    ) -> None:
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}, got {precision!r}")
        self.student, self.teacher = student, teacher
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.precision, self.clip_grad = precision, clip_grad
        self.device = next(unwrap(student).parameters()).device
        # In fp32/bf16 the scale stays 1 (reset after every step): the scaler is only the on-device
        # "skip steps with non-finite gradients" switch (torch has no other on-device one that fused
        # optimizers honour). In fp16 it is the usual dynamic loss scaling.
        self.fixed_scale = None if precision == "fp16" else 1.0
        self.scaler = grad_scaler(self.device, precision, skip_non_finite=True)
        self.student_params = [p for p in unwrap(student).parameters()]
        self.teacher_params = [p for p in unwrap(teacher).parameters()]
        if len(self.student_params) != len(self.teacher_params):
            raise ValueError("student and teacher must have the same parameters")
        # Found once from the group flag (get_params_groups), not by a name search every step.
        self.last_layer_params = [p for g in optimizer.param_groups if g.get("is_last_layer") for p in g["params"]]

    def no_sync(self, last: bool):
        """DDP's ``no_sync`` (no gradient all-reduce in backward) for all but the last micro-batch."""
        ddp = getattr(self.student, "_orig_mod", self.student)
        if last or not hasattr(ddp, "no_sync"):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def __call__(self, crops: Sequence, schedule: StepSchedule) -> StepStats:
        """One optimizer step on a batch of crops, or on N micro-batches of crops (see the module docstring)."""
        micro_batches = as_micro_batches(crops)
        n = len(micro_batches)
        frozen = schedule.freeze_last_layer
        set_schedule_values(self.optimizer, schedule.lr, schedule.weight_decay, last_layer_lr=0.0 if frozen else None)
        self.optimizer.zero_grad(set_to_none=True)
        center = self.loss_fn.center.clone() if n > 1 else None
        sums, teacher_outputs = None, []
        for i, micro in enumerate(micro_batches):
            if center is not None:
                # DINOLoss moves its centre in every forward; put the step's centre back so that every
                # micro-batch is centred with it (the (1, K) all-reduce of those moves is wasted, and tiny).
                self.loss_fn.center.copy_(center)
            with self.no_sync(last=i == n - 1):
                with autocast(self.device, self.precision):
                    with torch.no_grad():
                        teacher_out = self.teacher(micro[:2])  # only the 2 global views pass through the teacher
                    student_out = self.student(micro)
                out = self.loss_fn(student_out, teacher_out, schedule.teacher_temp)  # float32 whatever the autocast
                self.scaler.scale(out.loss / n if n > 1 else out.loss).backward()
            values = [out.loss.detach(), out.teacher_entropy, out.kl, out.teacher_mean_probs]
            sums = values if sums is None else [a + b for a, b in zip(sums, values)]
            if center is not None:
                teacher_outputs.append(teacher_out.detach())
        if center is not None:  # one centre update from the teacher rows of all micro-batches
            self.loss_fn.center.copy_(center)
            self.loss_fn.update_center(torch.cat(teacher_outputs))
        loss, entropy, kl, mean_probs = (v / n for v in sums) if n > 1 else sums

        self.scaler.unscale_(self.optimizer)  # flags non-finite gradients on the device
        if self.clip_grad:
            clip_gradients(unwrap(self.student), self.clip_grad)
        if frozen:
            # lr 0 alone is not a freeze: AdamW / SGD momentum / LARS would still accumulate these gradients
            # in their state. Dropping them (as the reference does) leaves that state untouched until the
            # unfreeze, so optimizer state and weights equal the reference's.
            for p in self.last_layer_params:
                p.grad = None
        self.scaler.step(self.optimizer)  # skipped if any gradient is inf/NaN
        self.scaler.update(self.fixed_scale)
        self.update_teacher(schedule.momentum)
        return StepStats(loss=loss, teacher_entropy=entropy, kl=kl, loss_is_finite=torch.isfinite(loss),
                         prototypes_in_use=effective_prototypes(mean_probs))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, over all parameters at once."""
        torch._foreach_mul_(self.teacher_params, momentum)
        torch._foreach_add_(self.teacher_params, self.student_params, alpha=1.0 - momentum)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
