"""Cosine schedules, lr scaling, LARS, parameter groups, optimizer factory and gradient helpers."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from simpool.dino.head import DINOHead
from simpool.dino.optim import (
    LARS,
    build_optimizer,
    clip_gradients,
    get_params_groups,
    set_schedule_values,
)
from simpool.dino.schedules import cosine_scheduler, scaled_lr, teacher_temp_schedule

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/reference/vit_simpool_dino_checkpoint.pth"


# ---------------------------------------------------------------- schedules

def test_cosine_scheduler_warmup_and_decay_values():
    base, final, epochs, niter, warm, start = 1.0, 0.1, 5, 4, 2, 0.2
    sched = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warm, start_warmup_value=start)
    assert isinstance(sched, np.ndarray) and sched.shape == (epochs * niter,)
    warm_iters, decay_iters = warm * niter, (epochs - warm) * niter
    # Warm-up: linspace including both ends.
    np.testing.assert_allclose(sched[:warm_iters], [start + (base - start) * i / (warm_iters - 1)
                                                    for i in range(warm_iters)])
    # Decay restarts at base and never quite reaches final (cos(pi * (n - 1) / n)).
    expected = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / decay_iters))
                for i in range(decay_iters)]
    np.testing.assert_allclose(sched[warm_iters:], expected, rtol=1e-12)
    assert sched[warm_iters] == base and sched[-1] > final
    assert np.all(np.diff(sched[warm_iters:]) < 0)


def test_cosine_scheduler_without_warmup_and_teacher_momentum():
    sched = cosine_scheduler(0.996, 1.0, 3, 10)
    assert sched[0] == pytest.approx(0.996) and len(sched) == 30
    assert np.all(np.diff(sched) > 0) and sched[-1] < 1.0
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, 2, 10, warmup_epochs=3)


def test_teacher_temperature_warms_up_linearly_by_epoch_then_stays():
    sched = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, epochs=10, niter_per_ep=3)
    assert sched.shape == (30,)
    per_epoch = sched.reshape(10, 3)
    assert np.all(per_epoch == per_epoch[:, :1])  # one value per epoch, repeated over its iterations
    # The reference's np.linspace(warmup, final, warmup_epochs) per epoch, value for value.
    assert per_epoch[:4, 0].tolist() == np.linspace(0.04, 0.07, 4).tolist()
    assert per_epoch[4:, 0].tolist() == [0.07] * 6
    assert teacher_temp_schedule(0.04, 0.07, 0, 2, 2).tolist() == [0.07] * 4
    with pytest.raises(ValueError, match="warm-up"):
        teacher_temp_schedule(0.04, 0.07, 30, 10, 1)
    with pytest.raises(ValueError, match="positive"):
        teacher_temp_schedule(0.0, 0.07, 2, 10, 1)


def test_scaled_lr():
    assert scaled_lr(5e-4, 800) == pytest.approx(1.5625e-3)
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0)


# ---------------------------------------------------------------- LARS

def test_lars_two_steps_match_hand_computation():
    lr, wd, momentum, eta = 0.5, 0.1, 0.9, 0.01
    w0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ||w|| = 5
    b0 = torch.tensor([1.0, -1.0])
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=momentum, eta=eta)

    gw, gb = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, 0.25])
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d_w = gw + wd * w0                                  # weight decay on the matrix only
    d_w = d_w * (eta * w0.norm() / d_w.norm())          # trust ratio on the matrix only
    mu_w, mu_b = d_w, gb                                # bias: plain SGD with momentum
    torch.testing.assert_close(w.detach(), w0 - lr * mu_w)
    torch.testing.assert_close(b.detach(), b0 - lr * mu_b)

    w1, b1 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d_w = gw + wd * w1
    d_w = d_w * (eta * w1.norm() / d_w.norm())
    mu_w, mu_b = momentum * mu_w + d_w, momentum * mu_b + gb
    torch.testing.assert_close(w.detach(), w1 - lr * mu_w)
    torch.testing.assert_close(b.detach(), b1 - lr * mu_b)
    assert set(opt.state[w]) == {"mu"}


def test_lars_zero_norm_weight_and_filters():
    w = nn.Parameter(torch.zeros(2, 2))                 # ||w|| = 0: trust ratio 1
    v = nn.Parameter(torch.ones(2, 2))                  # excluded from both by the filters
    opt = LARS([w, v], lr=1.0, weight_decay=0.5, momentum=0.0,
               weight_decay_filter=lambda p: p is v, lars_adaptation_filter=lambda p: p is v)
    w.grad, v.grad = torch.full((2, 2), 2.0), torch.full((2, 2), 3.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -2.0))
    torch.testing.assert_close(v.detach(), torch.full((2, 2), -2.0))


def test_lars_skips_parameters_without_grad():
    w = nn.Parameter(torch.ones(2, 2))
    opt = LARS([w], lr=1.0)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(2, 2)) and not opt.state


# ---------------------------------------------------------------- parameter groups and optimizers

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(4)
        self.beta = nn.Parameter(torch.zeros(1))
        self.scalar = nn.Parameter(torch.tensor(1.0))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.head = DINOHead(4, 8, hidden_dim=8, bottleneck_dim=4)  # weight_g frozen


def test_params_groups_split_decay_and_last_layer_and_skip_frozen():
    net = TinyNet()
    decay, no_decay, last_layer = get_params_groups(net)  # weight_g frozen: no last-layer no-decay group
    assert [(g["wd_multiplier"], g["is_last_layer"]) for g in (decay, no_decay, last_layer)] == [
        (1.0, False), (0.0, False), (1.0, True)]
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    expected_decay = [net.conv.weight, net.pos_embed, net.head.mlp[0].weight]
    expected_no_decay = [net.conv.bias, net.bn.weight, net.bn.bias, net.norm.weight, net.norm.bias, net.beta,
                         net.scalar, net.head.mlp[0].bias]
    assert {id(p) for p in expected_decay} <= decay_ids
    assert {id(p) for p in expected_no_decay} <= no_decay_ids
    assert not decay_ids & no_decay_ids
    assert [id(p) for p in last_layer["params"]] == [id(net.head.last_layer.weight_v)]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(decay_ids) + len(no_decay_ids) + 1 == len(trainable)

    net.head.last_layer.weight_g.requires_grad_(True)  # norm_last_layer=False: weight_g (out, 1) trains, decayed
    groups = get_params_groups(net)
    assert len(groups) == 3 and [id(p) for p in groups[-1]["params"]] == [
        id(net.head.last_layer.weight_g), id(net.head.last_layer.weight_v)]


def _module_from_state(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree whose named_parameters are the given keys and shapes."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.zeros_like(value, dtype=torch.float32)))
    return root


@pytest.mark.skipif(not FIXTURE.exists(), reason="reference fixtures not available")
def test_params_groups_match_reference_optimizer_state():
    torch.serialization.add_safe_globals([argparse.Namespace])
    ckpt = torch.load(FIXTURE, weights_only=True, map_location="cpu")
    student = _module_from_state(ckpt["student"])
    groups = get_params_groups(student)
    ref_groups = ckpt["optimizer"]["param_groups"]
    # The reference's (decay, no decay) groups are ours with the last-layer groups merged in.
    decayed = sum(len(g["params"]) for g in groups if g["wd_multiplier"])
    assert [decayed, sum(len(g["params"]) for g in groups) - decayed] == [len(g["params"]) for g in ref_groups]


def test_build_optimizer_kinds_and_schedule_values():
    net = TinyNet()
    for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("LARS", LARS)):
        opt = build_optimizer(name, get_params_groups(net))
        assert isinstance(opt, cls)
        assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
        set_schedule_values(opt, np.float64(0.25), np.float64(0.04))
        assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25, 0.25]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0, 0.04]
        assert isinstance(opt.param_groups[0]["lr"], float)
        set_schedule_values(opt, 0.25, 0.04, last_layer_lr=0.0)  # the freeze: last-layer group only
        assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25, 0.0]
    assert build_optimizer("sgd", get_params_groups(net)).param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", get_params_groups(net))


def test_sgd_step_after_schedule_applies_decay_only_to_decayed_groups():
    w, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    opt = build_optimizer("sgd", [{"params": [w]}, {"params": [b], "wd_multiplier": 0.0}])
    set_schedule_values(opt, 0.1, 0.5)
    w.grad, b.grad = torch.zeros(2, 2), torch.zeros(2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 1 - 0.1 * 0.5))
    torch.testing.assert_close(b.detach(), torch.ones(2))


# ---------------------------------------------------------------- gradient helpers

def reference_clip(grads, clip):
    """Per-parameter clipping written as the reference loop, on copies."""
    out, norms = [], []
    for g in grads:
        g = g.clone()
        n = g.norm(2)
        norms.append(n.item())
        coef = clip / (n + 1e-6)
        if coef < 1:
            g.mul_(coef)
        out.append(g)
    return out, norms


def test_clip_gradients_clips_each_parameter_separately():
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    grads = [torch.randn_like(p) * s for p, s in zip(net.parameters(), (10.0, 0.01, 5.0, 0.02))]
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    net[1].bias.grad = None                              # parameters without gradient are skipped
    expected, ref_norms = reference_clip(grads[:3], 0.5)

    norms = clip_gradients(net, 0.5)
    assert isinstance(norms, torch.Tensor) and norms.dtype == torch.float32
    np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-6)
    for p, e in zip(list(net.parameters())[:3], expected):
        torch.testing.assert_close(p.grad, e)
    # The big gradients now have norm ~clip, the small one is untouched (not rescaled to a global norm).
    assert net[0].weight.grad.norm().item() == pytest.approx(0.5, rel=1e-5)
    assert torch.equal(net[0].bias.grad, grads[1])


def test_clip_gradients_mixed_dtypes_keep_parameter_order():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, dtype=torch.float64))
    c = nn.Parameter(torch.zeros(4))
    holder = nn.Module()
    holder.a, holder.b, holder.c = a, b, c
    a.grad, b.grad, c.grad = torch.full((3,), 2.0), torch.full((2,), 3.0, dtype=torch.float64), torch.ones(4)
    norms = clip_gradients(holder, 1.0)
    torch.testing.assert_close(norms, torch.tensor([math.sqrt(12), math.sqrt(18), 2.0]))
    for p in (a, b, c):
        assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="clip"):
        clip_gradients(holder, 0.0)
