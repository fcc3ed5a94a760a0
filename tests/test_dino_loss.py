"""DINOLoss: values and gradients against explicit loops, centring, temperatures, dtype handling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from simpool.dino.loss import DINOLoss, dino_cross_entropy


def naive_dino_loss(student, teacher, center, ncrops, teacher_temp, student_temp=0.1):
    """The maths written as the reference loops over (teacher view, student view) pairs."""
    s = (student / student_temp).chunk(ncrops)
    q = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, n_terms = 0.0, 0
    for iq, q_i in enumerate(q):
        for v in range(ncrops):
            if v == iq:
                continue
            total = total + torch.sum(-q_i * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def make_logits(ncrops, batch, dim, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(ncrops * batch, dim, generator=gen) * scale
    teacher = torch.randn(2 * batch, dim, generator=gen) * scale
    return student, teacher


def test_two_crops_match_a_hand_computation():
    # B = 1, K = 3, 2 crops: pairs (teacher 0, student 1) and (teacher 1, student 0).
    student = [[1.0, -2.0, 0.5], [0.0, 0.3, -0.7]]
    teacher = [[0.2, 0.1, -0.4], [1.5, -1.0, 0.0]]
    t_temp, s_temp = 0.5, 0.1

    def softmax(row, temp):
        e = [math.exp(x / temp) for x in row]
        return [x / sum(e) for x in e]

    def cross_entropy(q, s_row):
        p = softmax(s_row, s_temp)
        return -sum(qk * math.log(pk) for qk, pk in zip(q, p))

    q0, q1 = softmax(teacher[0], t_temp), softmax(teacher[1], t_temp)
    expected = (cross_entropy(q0, student[1]) + cross_entropy(q1, student[0])) / 2

    loss_fn = DINOLoss(3, ncrops=2, student_temp=s_temp)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), teacher_temp=t_temp).loss
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("ncrops", [2, 3, 8])
def test_value_and_gradient_equal_the_pair_loop(ncrops):
    batch, dim, t_temp = 3, 257, 0.04
    student, teacher = make_logits(ncrops, batch, dim, seed=ncrops)
    center = torch.randn(1, dim, generator=torch.Generator().manual_seed(9)) * 0.5

    loss_fn = DINOLoss(dim, ncrops)
    loss_fn.center.copy_(center)
    s = student.clone().requires_grad_(True)
    loss = loss_fn(s, teacher, t_temp).loss
    loss.backward()

    # Ground truth in float64.
    s64 = student.double().requires_grad_(True)
    ref = naive_dino_loss(s64, teacher.double(), center.double(), ncrops, t_temp)
    ref.backward()

    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    scale = s64.grad.abs().max()
    torch.testing.assert_close(s.grad.double() / scale, s64.grad / scale, rtol=0, atol=1e-5)
    # The gradient rows of every crop sum to zero (softmax minus a distribution, times a count).
    torch.testing.assert_close(s.grad.sum(dim=-1) / scale, torch.zeros(ncrops * batch), rtol=0, atol=1e-5)


def test_upstream_gradient_is_propagated():
    student, teacher = make_logits(4, 2, 16)
    probs = F.softmax(teacher, dim=-1)
    s1 = student.clone().requires_grad_(True)
    (dino_cross_entropy(s1, probs, 4) * 2.5).backward()
    s2 = student.clone().requires_grad_(True)
    dino_cross_entropy(s2, probs, 4).backward()
    torch.testing.assert_close(s1.grad, 2.5 * s2.grad)


def test_inputs_are_not_modified():
    student, teacher = make_logits(4, 2, 16)
    s, t = student.clone().requires_grad_(True), teacher.clone()
    loss_fn = DINOLoss(16, 4)
    loss_fn(s, t, 0.04).loss.backward()
    assert torch.equal(s.detach(), student) and torch.equal(t, teacher)


def test_center_is_the_ema_of_teacher_means_and_is_used_before_the_update():
    ncrops, batch, dim, t_temp = 4, 3, 32, 0.07
    loss_fn = DINOLoss(dim, ncrops, center_momentum=0.8)
    assert loss_fn.center.shape == (1, dim) and torch.count_nonzero(loss_fn.center) == 0

    student1, teacher1 = make_logits(ncrops, batch, dim, seed=1)
    student2, teacher2 = make_logits(ncrops, batch, dim, seed=2)
    loss_fn(student1, teacher1, t_temp)
    center1 = 0.2 * teacher1.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, center1)

    loss2 = loss_fn(student2, teacher2, t_temp).loss
    torch.testing.assert_close(loss2, naive_dino_loss(student2, teacher2, center1, ncrops, t_temp))
    torch.testing.assert_close(loss_fn.center, 0.8 * center1 + 0.2 * teacher2.mean(dim=0, keepdim=True))

    # update_center alone gives the same EMA step.
    loss_fn.update_center(teacher1)
    center2 = 0.8 * center1 + 0.2 * teacher2.mean(0, keepdim=True)
    expected = 0.8 * center2 + 0.2 * teacher1.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)


def test_the_given_teacher_temperature_is_used():
    student, teacher = make_logits(2, 2, 8)
    for t_temp in (0.05, 0.3):
        torch.testing.assert_close(DINOLoss(8, 2)(student, teacher, t_temp).loss,
                                   naive_dino_loss(student, teacher, 0.0, 2, t_temp))


def test_logging_stats_are_entropy_and_kl():
    ncrops, batch, dim, t_temp = 5, 4, 64, 0.1
    student, teacher = make_logits(ncrops, batch, dim, seed=4)
    loss_fn = DINOLoss(dim, ncrops)
    loss, teacher_entropy, kl, teacher_mean_probs = loss_fn(student, teacher, t_temp)

    q = F.softmax(teacher / t_temp, dim=-1)
    entropy = -(q * F.log_softmax(teacher / t_temp, dim=-1)).sum(-1).mean()
    s = (student / 0.1).chunk(ncrops)
    kls = [F.kl_div(F.log_softmax(s[v], -1), q_i, reduction="batchmean")
           for iq, q_i in enumerate(q.chunk(2)) for v in range(ncrops) if v != iq]
    assert teacher_entropy.ndim == 0 and kl.ndim == 0 and not kl.requires_grad
    torch.testing.assert_close(teacher_entropy, entropy)
    torch.testing.assert_close(kl, torch.stack(kls).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl + teacher_entropy, loss.detach())
    torch.testing.assert_close(teacher_mean_probs, q.mean(dim=0))


def test_low_precision_inputs_run_in_float32():
    ncrops, batch, dim = 4, 2, 128
    student, teacher = make_logits(ncrops, batch, dim, seed=5)
    s16 = student.bfloat16().requires_grad_(True)
    loss_fn = DINOLoss(dim, ncrops)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(s16, teacher.bfloat16(), 0.04).loss
    loss.backward()
    assert loss.dtype == torch.float32 and loss_fn.center.dtype == torch.float32
    assert s16.grad.dtype == torch.bfloat16

    s32 = s16.detach().float().requires_grad_(True)
    ref = naive_dino_loss(s32, teacher.bfloat16().float(), 0.0, ncrops, 0.04)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=1e-2, atol=1e-4)  # bf16 rounding of the grad


def test_bad_shapes_and_arguments_raise():
    loss_fn = DINOLoss(16, 4)
    with pytest.raises(ValueError, match="student rows"):
        loss_fn(torch.zeros(12, 16), torch.zeros(4, 16), 0.04)  # 3 crops' worth of rows for ncrops=4
    with pytest.raises(ValueError, match="teacher_output"):
        loss_fn(torch.zeros(8, 16), torch.zeros(4, 15), 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(torch.zeros(8, 16), torch.zeros(4, 16), 0.0)
    with pytest.raises(ValueError, match="ncrops"):
        DINOLoss(16, 1)
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(16, 2, student_temp=-0.1)


def _distributed_center_worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        teacher = torch.full((4, 3), float(rank + 1)) + torch.arange(3.0)
        loss_fn = DINOLoss(3, 2, center_momentum=0.5)
        loss_fn.update_center(teacher)
        if rank == 0:
            torch.save(loss_fn.center, result_file)
    finally:
        dist.destroy_process_group()


def test_center_is_averaged_over_ranks(tmp_path):
    result = tmp_path / "center.pt"
    mp.spawn(_distributed_center_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2)
    # Rank means: 1 + [0, 1, 2] and 2 + [0, 1, 2]; global mean 1.5 + [0, 1, 2]; EMA from 0 with m = 0.5.
    torch.testing.assert_close(torch.load(result, weights_only=True), 0.5 * (1.5 + torch.arange(3.0))[None])
