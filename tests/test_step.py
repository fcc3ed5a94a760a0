"""DINOStep: one iteration updates the student and EMA-updates the teacher; non-finite steps are skipped."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simpool import build_backbone
from simpool.dino.head import DINOHead, MultiCropWrapper
from simpool.dino.loss import DINOLoss
from simpool.dino.optim import build_optimizer, get_params_groups
from simpool.dino.schedules import cosine_scheduler, teacher_temp_schedule
from simpool.dino.step import DINOStep, StepSchedule

SCHEDULE = StepSchedule(lr=1e-2, weight_decay=0.04, momentum=0.9, teacher_temp=0.04)


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
    opt = build_optimizer(optimizer, get_params_groups(student))
    return DINOStep(student, teacher, DINOLoss(16, ncrops=4), opt, precision=precision, clip_grad=3.0)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_step_updates_student_and_ema_teacher(optimizer):
    step = make_step(optimizer=optimizer)
    student_before, teacher_before = snapshot(step.student), snapshot(step.teacher)
    stats = step(crops(), SCHEDULE)
    assert torch.isfinite(stats.loss) and bool(stats.loss_is_finite)
    student_after = snapshot(step.student)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student_after))
    for t0, s1, t1 in zip(teacher_before, student_after, snapshot(step.teacher)):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss_skips_the_update(precision):
    step = make_step(precision)
    step(crops(), SCHEDULE)  # optimizer state exists
    student_before = snapshot(step.student)
    optimizer_state = copy.deepcopy(step.optimizer.state_dict()["state"])
    stats = step(crops(nan=True), SCHEDULE)
    assert not bool(stats.loss_is_finite)
    for a, b in zip(student_before, snapshot(step.student)):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in step.teacher.parameters())
    after = step.optimizer.state_dict()["state"]
    for key, value in optimizer_state.items():
        torch.testing.assert_close(after[key]["exp_avg"], value["exp_avg"])
    # the next finite step trains again
    stats = step(crops(), SCHEDULE)
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
    loss = DINOLoss(256, ncrops=4)
    optimizer = build_optimizer("adamw", get_params_groups(student))
    return DINOStep(student, teacher, loss, optimizer, precision=precision, clip_grad=3.0)


def test_bf16_step_tracks_fp32_loss_curve():
    """No change in what is learned: over 200 steps on a fixed batch, the bf16 loss curve stays within 2%."""
    torch.manual_seed(0)
    fixed = [torch.randn(16, 3, 16, 16) for _ in range(2)] + [torch.randn(16, 3, 8, 8) for _ in range(2)]
    temps = teacher_temp_schedule(0.04, 0.07, 50, 200, niter_per_ep=1)
    curves = {}
    for precision in ("fp32", "bf16"):
        step = recipe_step(precision)
        curves[precision] = torch.tensor([
            float(step(fixed, StepSchedule(5e-4, 0.04, 0.996, temps[i // 4])).loss) for i in range(200)
        ])
    assert curves["fp32"][-1] < 0.6 * curves["fp32"][0]  # it does learn
    relative = (curves["bf16"] - curves["fp32"]).abs() / curves["fp32"].abs()
    assert relative.max() < 0.02, relative.max()


# ---------------------------------------------------------------- parity with the previous implementation

# Recorded with the implementation before issue 12 (epoch-indexed DINOLoss schedule, cancel_gradients_last_layer
# by name): 30 fp32 CPU steps on one thread (conftest), see run_recorded_recipe. Values: per-step loss, last
# entropy / KL, and (sum |x|, sum x^2) of the centre, the student, the teacher, the last layer and the optimizer
# state tensors.
RECORDED = {
    "adamw": {
        "losses": [
            4.345818519592285, 5.821758270263672, 4.307132244110107, 0.9658965468406677, 1.0035219192504883,
            0.9584426879882812, 0.7158921957015991, 0.17578783631324768, 0.02643449231982231, 0.0041074627079069614,
            0.0017617312259972095, 0.002331080613657832, 0.006060387473553419, 0.020032677799463272,
            0.08540340512990952,
            1.7011327743530273, 2.3105177879333496, 1.8600459098815918, 1.6350481510162354, 1.4397214651107788,
            1.1679781675338745, 1.0646185874938965, 1.0231091976165771, 0.9759194850921631, 1.1141718626022339,
            1.171515941619873, 1.3227341175079346, 1.5101735591888428, 1.6923739910125732, 1.9167855978012085,
        ],
        "entropy": 1.7101634740829468,
        "kl": 0.20662212371826172,
        "center": [3.533461896702647, 1.4763910883840592],
        "student": [691.7281127938113, 173.82246300381428],
        "teacher": [565.2176254175837, 167.65604565153401],
        "last_layer": [37.15278974053217, 19.320784716752634],
        "opt_state": [6.06531203753226, 0.0970535409849367],
    },
    "sgd": {
        "losses": [
            4.345818519592285, 5.821758270263672, 5.553430080413818, 2.4797799587249756, 2.0686092376708984,
            1.1198582649230957, 1.2493138313293457, 1.1407606601715088, 0.9837089776992798, 0.5319878458976746,
            0.1468069851398468, 0.08061203360557556, 0.07939685136079788, 0.17396950721740723, 0.3061012923717499,
            1.2393690347671509, 1.4791196584701538, 1.7210884094238281, 1.959282636642456, 1.977033019065857,
            1.7875909805297852, 1.3520619869232178, 1.1078612804412842, 0.9416157603263855, 0.8918148279190063,
            1.0460188388824463, 1.1326375007629395, 1.2653422355651855, 1.4432077407836914, 1.7499516010284424,
        ],
        "entropy": 1.453832745552063,
        "kl": 0.2961188554763794,
        "center": [3.049907827284187, 1.370677616234455],
        "student": [468.31044830389646, 157.83334728477718],
        "teacher": [519.7524020942792, 165.3486799933458],
        "last_layer": [35.273019537562504, 17.7406915207091],
        "opt_state": [1061.350601119942, 276.1747477047503],
    },
}


def run_recorded_recipe(optimizer: str, epochs: int = 2, niter: int = 15):
    """The recipe RECORDED was taken with: teacher-temperature warm-up, last layer frozen in epoch 0, clipping."""
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=4, depth=1, embed_dim=32, num_heads=2, img_size=16)
    student = MultiCropWrapper(backbone, DINOHead(32, 16, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    loss = DINOLoss(16, ncrops=4)
    opt = build_optimizer(optimizer, get_params_groups(student))
    step = DINOStep(student, teacher, loss, opt, precision="fp32", clip_grad=0.3)
    lr = cosine_scheduler(1e-2, 1e-4, epochs, niter, warmup_epochs=1)
    wd = cosine_scheduler(0.04, 0.4, epochs, niter)
    momentum = cosine_scheduler(0.9, 1.0, epochs, niter)
    temps = teacher_temp_schedule(0.04, 0.07, 2, epochs, niter)
    generator = torch.Generator().manual_seed(1)
    losses, initial, epoch0 = [], snapshot(student.head.last_layer), None
    for it in range(epochs * niter):
        views = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
        views += [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2)]
        stats = step(views, StepSchedule(lr[it], wd[it], momentum[it], temps[it], freeze_last_layer=it < niter))
        losses.append(float(stats.loss))
        if it == niter - 1:
            epoch0 = (initial, snapshot(student.head.last_layer), [p in opt.state for p in step.last_layer_params])
    return step, stats, losses, epoch0


def sums(tensors):
    tensors = [t.detach().double() for t in tensors]
    return [float(sum(t.abs().sum() for t in tensors)), float(sum((t ** 2).sum() for t in tensors))]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_step_reproduces_the_previous_implementation(optimizer):
    """Losses, centre, weights and optimizer state over 30 steps equal those recorded before the refactor."""
    # rtol: the numbers were recorded on another x86 CPU; float32 rounding differs between CPUs' kernels and
    # drifts over 30 steps to at most 3.5e-5 relative (measured on a second machine), while a real change is
    # orders larger (clip_grad 0.3 -> 0.33 moves the losses by 2.6e-2 relative).
    rtol = 2e-4
    step, stats, losses, _ = run_recorded_recipe(optimizer)
    expected = RECORDED[optimizer]
    np.testing.assert_allclose(losses, expected["losses"], rtol=rtol, atol=1e-7)
    np.testing.assert_allclose([float(stats.teacher_entropy), float(stats.kl)], [expected["entropy"], expected["kl"]],
                               rtol=rtol)
    student = step.student
    optimizer_state = [t for s in step.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    for key, tensors in (("center", [step.loss_fn.center]), ("student", student.parameters()),
                         ("teacher", step.teacher.parameters()), ("last_layer", student.head.last_layer.parameters()),
                         ("opt_state", optimizer_state)):
        np.testing.assert_allclose(sums(tensors), expected[key], rtol=rtol, err_msg=key)


def test_frozen_last_layer_gets_no_update_and_no_optimizer_state():
    """While frozen the prototypes keep their initial values and AdamW holds no moments for them."""
    step, _, _, (initial, last_layer, has_state) = run_recorded_recipe("adamw")
    assert len(step.last_layer_params) == 2 and not any(has_state)  # weight_g and weight_v
    for before, after in zip(initial, last_layer):
        assert torch.equal(before, after)
    assert all(p in step.optimizer.state for p in step.last_layer_params)  # trained after the unfreeze
