"""DINOStep: one iteration updates the student and EMA-updates the teacher; non-finite steps are skipped."""

from __future__ import annotations

import copy

import pytest
import torch

from simpool import build_backbone
from simpool.dino.head import DINOHead, MultiCropWrapper
from simpool.dino.loss import DINOLoss
from simpool.dino.optim import build_optimizer, get_params_groups
from simpool.dino.step import DINOStep


def tiny_pair():
    backbone = build_backbone("vit_tiny", patch_size=4, depth=1, embed_dim=32, num_heads=2)
    student = MultiCropWrapper(backbone, DINOHead(32, 16, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def crops(batch=3, nan=False):
    views = [torch.randn(batch, 3, 16, 16) for _ in range(2)] + [torch.randn(batch, 3, 8, 8) for _ in range(2)]
    if nan:
        views[3][0, 0, 0, 0] = float("nan")
    return views


def make_step(precision="fp32", optimizer="adamw"):
    student, teacher = tiny_pair()
    loss = DINOLoss(16, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                    nepochs=2)
    opt = build_optimizer(optimizer, get_params_groups(student))
    return DINOStep(student, teacher, loss, opt, precision=precision, clip_grad=3.0, freeze_last_layer=0)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_step_updates_student_and_ema_teacher(optimizer):
    step = make_step(optimizer=optimizer)
    student_before, teacher_before = snapshot(step.student), snapshot(step.teacher)
    stats = step(crops(), epoch=0, lr=1e-2, weight_decay=0.04, momentum=0.9)
    assert torch.isfinite(stats.loss) and bool(stats.loss_is_finite)
    student_after = snapshot(step.student)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student_after))
    for t0, s1, t1 in zip(teacher_before, student_after, snapshot(step.teacher)):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss_skips_the_update(precision):
    step = make_step(precision)
    step(crops(), epoch=0, lr=1e-2, weight_decay=0.04, momentum=0.9)  # optimizer state exists
    student_before = snapshot(step.student)
    optimizer_state = copy.deepcopy(step.optimizer.state_dict()["state"])
    stats = step(crops(nan=True), epoch=0, lr=1e-2, weight_decay=0.04, momentum=0.9)
    assert not bool(stats.loss_is_finite)
    for a, b in zip(student_before, snapshot(step.student)):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in step.teacher.parameters())
    after = step.optimizer.state_dict()["state"]
    for key, value in optimizer_state.items():
        torch.testing.assert_close(after[key]["exp_avg"], value["exp_avg"])
    # the next finite step trains again
    stats = step(crops(), epoch=0, lr=1e-2, weight_decay=0.04, momentum=0.9)
    assert bool(stats.loss_is_finite)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, snapshot(step.student)))


def recipe_step(precision: str) -> DINOStep:
    """A small model with DINO's recipe: teacher-temperature warm-up, momentum 0.996, normalised prototypes."""
    torch.manual_seed(1)
    backbone = build_backbone("vit_tiny", patch_size=4, depth=2, embed_dim=64, num_heads=2, img_size=16)
    student = MultiCropWrapper(backbone, DINOHead(64, 256, hidden_dim=128, bottleneck_dim=32))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    loss = DINOLoss(256, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=50,
                    nepochs=200)
    optimizer = build_optimizer("adamw", get_params_groups(student))
    return DINOStep(student, teacher, loss, optimizer, precision=precision, clip_grad=3.0)


def test_bf16_step_tracks_fp32_loss_curve():
    """No change in what is learned: over 200 steps on a fixed batch, the bf16 loss curve stays within 2%."""
    torch.manual_seed(0)
    fixed = [torch.randn(16, 3, 16, 16) for _ in range(2)] + [torch.randn(16, 3, 8, 8) for _ in range(2)]
    curves = {}
    for precision in ("fp32", "bf16"):
        step = recipe_step(precision)
        curves[precision] = torch.tensor(
            [float(step(fixed, epoch=i // 4, lr=5e-4, weight_decay=0.04, momentum=0.996).loss) for i in range(200)]
        )
    assert curves["fp32"][-1] < 0.6 * curves["fp32"][0]  # it does learn
    relative = (curves["bf16"] - curves["fp32"]).abs() / curves["fp32"].abs()
    assert relative.max() < 0.02, relative.max()
