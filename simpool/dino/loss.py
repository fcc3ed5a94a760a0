"""DINO self-distillation loss with teacher centering and sharpening.

For a batch of B images, the student sees V crops (2 global first, then V - 2 local) and the
teacher sees the 2 global crops. With student logits s_v (crop v) and teacher logits t_i (global crop i):

    q_i = softmax((t_i - c) / tau_t)                             teacher, centred and sharpened
    log p_v = log_softmax(s_v / tau_s)                           student
    L = 1 / (B * P) * sum_b sum_{i in {0,1}} sum_{v != i} -q_i[b] . log p_v[b]

with P = 2 (V - 1) (teacher view, student view) pairs. tau_t is passed in per step: its warm-up
schedule sits with the other schedules (``simpool.dino.schedules.teacher_temp_schedule``). After each
forward the centre follows an EMA of the teacher's batch mean, averaged over ranks:

    c <- m c + (1 - m) mean_b t[b]

Implementation. The pairs sharing a student crop v collapse into one dot product with the summed
teacher weight w_v = sum_{i != v} q_i (q_1 for v = 0, q_0 for v = 1, q_0 + q_1 for local crops):
sum_{i != v} -q_i . log p_v = -w_v . log p_v, so the student logits are read once per crop instead
of once per pair (2 (V - 1) pairs). Since every q_i sums to 1, the gradient is, per crop,

    dL/ds_v = (n_v softmax(s_v / tau_s) - w_v) / (B P tau_s),    n_v = |{i in {0,1} : i != v}|

and is recomputed in backward from the logits, so no (V B, K) float32 log-probabilities are kept
between forward and backward, and the work is done crop by crop so temporaries are (B, K). All of
it runs in float32 whatever the autocast state or the input dtype.

The forward also returns the mean teacher entropy H(q_i), the mean KL(q_i || p_v) = L - H over the
pairs and the batch-mean teacher distribution mean_b q_i[b] (whose exp-entropy counts the prototypes in use),
for logging (0-dim tensors: reading them as floats is left to the caller's logging interval).

Example:
    >>> loss_fn = DINOLoss(65536, ncrops=8)
    >>> out = loss_fn(student_logits, teacher_logits, teacher_temp=0.04)   # (8B, K), (2B, K)
    >>> out.loss.backward()
    >>> out.teacher_entropy, out.kl                                         # 0-dim tensors, no host sync
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DINOLoss", "DINOLossOutput", "dino_cross_entropy"]

_NUM_GLOBAL = 2  # the teacher sees the two global crops


def _pair_weights(teacher_probs: torch.Tensor, ncrops: int) -> list[tuple[torch.Tensor, int]]:
    """Per student crop v: (w_v = sum of the teacher distributions paired with v, their number n_v)."""
    q0, q1 = teacher_probs.chunk(_NUM_GLOBAL)
    both = (q0 + q1, 2) if ncrops > _NUM_GLOBAL else None
    return [(q1, 1), (q0, 1)] + [both] * (ncrops - _NUM_GLOBAL)


def _scaled_float32(logits: torch.Tensor, temp: float) -> torch.Tensor:
    """logits / temp as a new float32 tensor (never in place on the caller's tensor)."""
    if logits.dtype == torch.float32:
        return logits / temp
    return logits.float().div_(temp)


class _DinoCrossEntropy(torch.autograd.Function):
    """Mean over (teacher view, student view != teacher view) pairs and the batch of -q . log p."""

    @staticmethod
    def forward(
        ctx, student_logits: torch.Tensor, teacher_probs: torch.Tensor, ncrops: int, student_temp: float
    ) -> torch.Tensor:
        batch = teacher_probs.shape[0] // _NUM_GLOBAL
        scale = 1.0 / (batch * _NUM_GLOBAL * (ncrops - 1))
        total = student_logits.new_zeros((), dtype=torch.float32)
        for s_v, (weight, _) in zip(student_logits.chunk(ncrops), _pair_weights(teacher_probs, ncrops)):
            log_p = torch.log_softmax(_scaled_float32(s_v, student_temp), dim=-1)
            # sum_b sum_{i != v} -q_i[b] . log p_v[b] as a single dot product.
            total = total - torch.dot(weight.reshape(-1), log_p.reshape(-1))
        ctx.save_for_backward(student_logits, teacher_probs)
        ctx.ncrops, ctx.student_temp, ctx.scale = ncrops, student_temp, scale
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        student_logits, teacher_probs = ctx.saved_tensors
        grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
        coef = grad_loss.float() * (ctx.scale / ctx.student_temp)
        for s_v, g_v, (weight, n_pairs) in zip(
            student_logits.chunk(ctx.ncrops), grad.chunk(ctx.ncrops), _pair_weights(teacher_probs, ctx.ncrops)
        ):
            # coef * (n p - w) = (coef n) * (p - w / n); n is 1 or 2, so w / n is exact.
            p = torch.softmax(_scaled_float32(s_v, ctx.student_temp), dim=-1).sub_(weight, alpha=1.0 / n_pairs)
            torch.mul(p, coef * n_pairs, out=g_v)  # writes the input dtype directly
        return grad, None, None, None


def dino_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, ncrops: int, student_temp: float = 0.1
) -> torch.Tensor:
    """DINO cross-entropy between teacher probabilities and student logits (float32, any input dtype).

    Args:
        student_logits: (ncrops * B, K), crop-major (all of crop 0, then crop 1, ...).
        teacher_probs: (2 * B, K) teacher distributions of the two global crops (no gradient).
        ncrops: number of student crops V (>= 2); the first two are the global crops.
        student_temp: tau_s.

    Returns the 0-dim float32 mean of -q_i . log_softmax(s_v / tau_s) over pairs v != i and the batch.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        return _DinoCrossEntropy.apply(student_logits, teacher_probs.detach().float(), ncrops, student_temp)


class DINOLossOutput(NamedTuple):
    """What ``DINOLoss`` returns: the loss and its two logging terms (all 0-dim float32 tensors)."""

    loss: torch.Tensor
    teacher_entropy: torch.Tensor  # mean entropy of the teacher distributions q_i
    kl: torch.Tensor  # loss - teacher_entropy = mean KL(q_i || p_v) over the pairs (detached)
    teacher_mean_probs: torch.Tensor  # (K,) mean of the q_i over this rank's rows: the prototypes in use


class DINOLoss(nn.Module):
    """DINO loss module: teacher centring/sharpening, cross-entropy, centre EMA (see module docstring).

    Args:
        out_dim: number of prototypes K.
        ncrops: student crops per image V (2 global + local crops).
        student_temp: tau_s.
        center_momentum: EMA momentum m of the centre.

    ``forward(student_output, teacher_output, teacher_temp)`` returns a ``DINOLossOutput``.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if ncrops < _NUM_GLOBAL:
            raise ValueError(f"DINOLoss: ncrops counts the 2 global crops plus the local ones, got {ncrops}")
        if student_temp <= 0:
            raise ValueError(f"DINOLoss: temperatures must be positive, got student_temp={student_temp}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _centred_teacher_logits(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        if teacher_temp <= 0:
            raise ValueError(f"DINOLoss: temperatures must be positive, got teacher_temp={teacher_temp}")
        # Subtracting the float32 centre promotes to float32 without a separate cast copy.
        return (teacher_output.detach() - self.center).div_(float(teacher_temp))

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> None:
        if student_output.ndim != 2 or student_output.shape[1] != self.out_dim:
            raise ValueError(
                f"DINOLoss: student_output must be (ncrops * B, {self.out_dim}), got {tuple(student_output.shape)}"
            )
        if teacher_output.ndim != 2 or teacher_output.shape[1] != self.out_dim:
            raise ValueError(
                f"DINOLoss: teacher_output must be (2 * B, {self.out_dim}), got {tuple(teacher_output.shape)}"
            )
        batch, rem = divmod(teacher_output.shape[0], _NUM_GLOBAL)
        if rem or student_output.shape[0] != self.ncrops * batch:
            raise ValueError(
                f"DINOLoss: expected teacher rows = 2 * B and student rows = ncrops ({self.ncrops}) * B, "
                f"got {teacher_output.shape[0]} and {student_output.shape[0]}; feed the teacher the 2 global "
                "crops and the student all crops, crop-major"
            )

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> DINOLossOutput:
        """Loss for student logits (ncrops * B, K) and teacher logits (2 * B, K) at tau_t; updates the centre."""
        self._check_shapes(student_output, teacher_output)
        with torch.no_grad(), torch.autocast(device_type=teacher_output.device.type, enabled=False):
            teacher_logits = self._centred_teacher_logits(teacher_output, teacher_temp)
            teacher_probs = teacher_logits.softmax(dim=-1)
            # H(q) = lse(y) - q . y. Each teacher view is paired with V - 1 student views, so the
            # pair-mean of H(q_i) is the plain row mean. mul_ reuses the logits buffer.
            log_norm = torch.logsumexp(teacher_logits, dim=-1)
            teacher_entropy = (log_norm - teacher_logits.mul_(teacher_probs).sum(dim=-1)).mean()
            teacher_mean_probs = teacher_probs.mean(dim=0)
            del teacher_logits
        loss = dino_cross_entropy(student_output, teacher_probs, self.ncrops, self.student_temp)
        self.update_center(teacher_output)
        return DINOLossOutput(loss, teacher_entropy, loss.detach() - teacher_entropy, teacher_mean_probs)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """c <- m c + (1 - m) * mean of ``teacher_output`` rows over the batch and all ranks (in place)."""
        batch_center = torch.sum(teacher_output.detach(), dim=0, keepdim=True, dtype=torch.float32)
        rows = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            rows *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=(1.0 - self.center_momentum) / rows)
