"""Where flag values break the numerics: the measurements behind the upper bounds of simpool's flags.

Not a speed benchmark: for each value that reaches floating-point arithmetic it finds, on the demo's model
(``configs/demo.yaml``: ViT 4 x 96, patch 7, 28 px, head 512/128/1024) and on random images, the first value in a
sweep of powers of ten at which the run's numbers stop being finite, and prints it beside the bound simpool
accepts (its ``RANGES``), so the margin can be read off:

* the peak learning rate of a DINO step (as scaled by the global batch), for each optimizer: 3 steps, then are
  the student's weights and the loss finite?
* the decoupled weight decay of AdamW at a given lr (weights are multiplied by ``1 - lr * wd`` every step);
* the teacher temperature of the DINO loss, and the k-NN vote temperature: ``exp(s / T)`` (``s <= 1``) as the
  reference computes it, and simpool's ``knn_predict`` (which votes with ``exp((s - max s) / T)`` below T = 0.0133).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/numeric_limits.py      # ~1 min on a CPU core
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpool.dino import DINOHead, DINOLoss, DINOStep, MultiCropWrapper, StepSchedule  # noqa: E402
from simpool.dino.optim import build_optimizer, get_params_groups  # noqa: E402
from simpool.evaluation.knn import knn_predict, weighted_vote  # noqa: E402
from simpool.models import build_backbone  # noqa: E402


def demo_step(optimizer: str) -> tuple[DINOStep, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", mode="simpool", patch_size=7, depth=4, embed_dim=96, num_heads=3,
                              img_size=28)
    student = MultiCropWrapper(backbone, DINOHead(96, 1024, hidden_dim=512, bottleneck_dim=128, use_bn=True,
                                                  norm_last_layer=False))
    teacher = copy.deepcopy(student).requires_grad_(False)
    step = DINOStep(student, teacher, DINOLoss(1024, 4), build_optimizer(optimizer, get_params_groups(student)),
                    clip_grad=3.0)
    return step, student


def finite_after(optimizer: str, lr: float, wd: float = 0.04, steps: int = 3, teacher_temp: float = 0.04) -> bool:
    step, student = demo_step(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        crops = [torch.randn(8, 3, 28, 28, generator=generator) for _ in range(2)]
        crops += [torch.randn(8, 3, 14, 14, generator=generator) for _ in range(2)]
        stats = step(crops, StepSchedule(lr=lr, weight_decay=wd, momentum=0.99, teacher_temp=teacher_temp))
        if not bool(stats.loss_is_finite):
            return False
    return all(bool(torch.isfinite(p).all()) for p in student.parameters())


def first_failure(values, check) -> float | None:
    for value in values:
        if not check(value):
            return value
    return None


def main() -> None:
    from simpool.dino.config import RANGES as DINO_RANGES
    from simpool.finetune.config import RANGES as FINETUNE_RANGES

    powers = [10.0 ** k for k in range(-2, 39, 2)] + [3e38, 1e39]
    print("peak lr (scaled) of a DINO step at which 3 steps leave non-finite weights or loss (demo ViT):")
    for optimizer in ("adamw", "sgd", "lars"):
        bad = first_failure(powers, lambda lr, o=optimizer: finite_after(o, lr))
        print(f"  {optimizer:6s} first non-finite at lr {bad:g}" if bad else f"  {optimizer:6s} finite up to 1e39")
    print(f"  accepted --lr (train_dino.py): {DINO_RANGES['lr'].describe(1.0)}; "
          f"(finetune.py): {FINETUNE_RANGES['lr'].describe(1.0)}")

    print("AdamW weight decay at lr 1.0: weights multiplied by 1 - lr * wd each step")
    bad = first_failure([0.5, 1.0, 2.0, 3.0, 10.0, 1e3, 1e6, 1e12],
                        lambda wd: finite_after("adamw", 1.0, wd=wd, steps=20))
    print(f"  first non-finite (20 steps) at lr * wd = {bad:g}" if bad else "  finite up to 1e12")

    temps = [10.0 ** -k for k in range(1, 46, 2)]
    bad = first_failure(temps, lambda t: finite_after("adamw", 1e-4, teacher_temp=t, steps=1))
    print(f"DINO teacher temperature: first non-finite loss at {bad:g}" if bad else
          "DINO teacher temperature: finite down to 1e-45")
    print(f"  accepted --teacher_temp: {DINO_RANGES['teacher_temp'].describe(1.0)}")

    similarities = torch.tensor([[1.0, 0.5, -1.0]])
    labels = torch.tensor([[0, 1, 1]])
    bad = first_failure([10.0 ** -k for k in range(0, 40)] + [0.02, 0.0113, 0.0112, 0.011],
                        lambda t: bool(torch.isfinite(weighted_vote(similarities, labels, t, 2)).all()))
    print(f"k-NN vote exp(s / T): first non-finite at T = {bad:g} (exp(1/T) overflows float32 below "
          f"T = 1 / ln(3.4e38) = {1 / math.log(torch.finfo(torch.float32).max):.5f})" if bad else
          "k-NN vote: finite at every T tried")
    generator = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(200, 16, generator=generator), dim=1)
    test = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=1)
    labels = torch.randint(0, 5, (200,), generator=generator)

    def right(t: float) -> bool:  # simpool's top-1 against the definition in float64 (finite down to T ~ 0.0015)
        sims = (test.double() @ train.double().T).topk(20, dim=1)
        scores = torch.zeros(50, 5, dtype=torch.float64).scatter_add_(1, labels[sims.indices],
                                                                     (sims.values / t).exp())
        ours = knn_predict(train, labels, test, 20, t, num_classes=5)[:, 0]
        return not torch.isfinite(scores).all() or bool(torch.equal(ours, scores.argmax(dim=1)))

    bad = first_failure([1.0, 0.1, 0.07, 0.02, 0.0113, 0.01, 0.005, 0.002], right)
    print("simpool's knn_predict: the float64 definition's top-1 at every T tried down to 0.002" if bad is None
          else f"simpool's knn_predict differs from the float64 definition at T = {bad:g}")
    print(f"  accepted --temperature (eval_knn.py): {DINO_RANGES['temperature'].describe(1.0)}")


if __name__ == "__main__":
    main()
