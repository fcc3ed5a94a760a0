"""--grad_checkpointing: timm's activation checkpointing gives the same loss and gradients and keeps less."""

from __future__ import annotations

import copy

import pytest
import torch

from simpool import build_backbone
from simpool.dino.build import build_student_teacher
from simpool.dino.config import ConfigError, parse_args
from simpool.models import TimmBackbone
from tests.helpers import TINY_CONVNEXT, TINY_RESNET

CASES = {
    "vit_tiny": {"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 4},
    "resnet18": TINY_RESNET,
    "convnext_tiny": {**TINY_CONVNEXT, "dims": (16, 32, 64, 128)},
}


def loss_and_grads(model, images):
    torch.manual_seed(1)  # the same drop-path draws in both runs (checkpointing replays the RNG state)
    model.zero_grad(set_to_none=True)
    loss = model(images).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def saved_activation_bytes(model, images) -> int:
    """Bytes autograd keeps for backward during one forward (torch's saved-tensor hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum().backward()
    return total


@pytest.mark.parametrize("arch", list(CASES))
def test_same_loss_and_gradients_with_less_kept(arch):
    kwargs = dict(CASES[arch])
    patch = kwargs.pop("patch_size", 16)
    plain = build_backbone(arch, mode="simpool", patch_size=patch, drop_path_rate=0.2, **kwargs)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    images = torch.randn(4, 3, 32, 32)
    loss0, grads0 = loss_and_grads(plain, images)
    loss1, grads1 = loss_and_grads(checkpointed, images)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert len(grads0) == len(grads1) == sum(1 for p in plain.parameters() if p.requires_grad)
    for g0, g1 in zip(grads0, grads1):
        assert (g1 - g0).norm() <= 1e-6 * g0.norm() + 1e-12
    assert saved_activation_bytes(checkpointed, images) < 0.7 * saved_activation_bytes(plain, images)


def test_unsupported_timm_model_is_a_clear_error():
    net = TimmBackbone("convit_tiny", mode="simpool", depth=1)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        net.set_grad_checkpointing(True)
    net.set_grad_checkpointing(False)  # switching it off is always fine


def test_flag_reaches_the_student_only_and_unsupported_is_a_config_error():
    args = parse_args(["--arch", "vit_tiny", "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2",
                       "--patch_size", "8", "--out_dim", "16", "--data_path", "x", "--grad_checkpointing", "True"])
    student, teacher, _ = build_student_teacher(args, torch.device("cpu"))
    assert student.backbone.grad_checkpointing and not teacher.backbone.grad_checkpointing
    args.arch, args.model_overrides = "convit_tiny", {"depth": 1}
    with pytest.raises(ConfigError, match="--grad_checkpointing True: timm.s convit_tiny does not support"):
        build_student_teacher(args, torch.device("cpu"))


def test_memory_benchmark_measures_a_saving(capsys):
    """benchmarks/grad_checkpointing.py at a tiny size: the profiler-based peak is smaller with checkpointing."""
    from benchmarks.grad_checkpointing import main

    main(["--archs", "vit_tiny", "--batch", "4", "--size", "128", "--device", "cpu"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "vit_tiny" and float(row[5].rstrip("x")) > 3, row
