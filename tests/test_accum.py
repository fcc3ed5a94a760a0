"""--accum_steps: N micro-batches per optimizer step make exactly the big batch's update (BN-free head)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.distributed as dist

from simpool import build_backbone
from simpool.dino.accum import group_micro_batches
from simpool.dino.head import DINOHead, MultiCropWrapper
from simpool.dino.loss import DINOLoss
from simpool.dino.optim import build_optimizer, get_params_groups
from simpool.dino.run_train import main
from simpool.dino.step import DINOStep, StepSchedule
from tests.helpers import FASHION_TINY, free_port, needs_fashion, run_cli

K = 32


def make_step(optimizer="adamw", use_bn=False, clip_grad=0.05):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=4, depth=1, embed_dim=32, num_heads=2, img_size=16)
    student = MultiCropWrapper(backbone, DINOHead(32, K, hidden_dim=32, bottleneck_dim=8, use_bn=use_bn,
                                                  norm_last_layer=False))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    opt = build_optimizer(optimizer, get_params_groups(student))
    return DINOStep(student, teacher, DINOLoss(K, ncrops=4), opt, precision="fp32", clip_grad=clip_grad)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(n, 3, 8, 8, generator=g)
                                                                          for _ in range(2)]


def split(crops, parts):
    return [list(views) for views in zip(*(c.chunk(parts) for c in crops))]


def state(step):
    return ([p.detach().clone() for p in step.student.parameters()]
            + [p.detach().clone() for p in step.teacher.parameters()] + [step.loss_fn.center.clone()]
            + [t.clone() for s in step.optimizer.state.values() for t in s.values() if torch.is_tensor(t)])


def grads(step):
    return torch.cat([p.grad.flatten() for p in step.student.parameters() if p.grad is not None])


# Not AdamW: its update is about lr * sign(g), so a parameter whose gradient is float32 noise (a scalar here)
# moves by +-lr either way, in both runs alike only by chance.


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_two_by_eight_equals_one_by_sixteen(optimizer):
    """The summed (clipped) gradients, weights, teacher, centre, optimizer state and logged values after 3 steps
    (clip active, last layer frozen on the first) agree to float32 rounding; the same micro-batches fed as
    separate steps do not."""
    big, accum, separate = make_step(optimizer), make_step(optimizer), make_step(optimizer)
    for it in range(3):
        schedule = StepSchedule(lr=0.05, weight_decay=0.04, momentum=0.9, teacher_temp=0.04,
                                freeze_last_layer=it == 0)
        crops = batch(seed=it)
        s_big = big(crops, schedule)
        s_acc = accum(split(crops, 2), schedule)
        g_big, g_acc = grads(big), grads(accum)
        # atol on the whole gradient's scale: a few scalar parameters' gradients are themselves rounding noise
        torch.testing.assert_close(g_acc, g_big, rtol=1e-5, atol=1e-5 * float(g_big.abs().max()))
        for micro in split(crops, 2):
            separate(micro, schedule)
    for a, b in zip(state(big), state(accum), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for name in ("loss", "teacher_entropy", "kl", "prototypes_in_use"):
        torch.testing.assert_close(getattr(s_acc, name), getattr(s_big, name), rtol=1e-5, atol=1e-6)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(state(big), state(separate)))


def test_one_batch_and_a_list_of_one_are_the_same_step():
    a, b = make_step(), make_step()
    crops = batch(8)
    schedule = StepSchedule(lr=0.05, weight_decay=0.04, momentum=0.9, teacher_temp=0.04)
    a(crops, schedule)
    b([crops], schedule)
    for x, y in zip(state(a), state(b)):
        assert torch.equal(x, y)


def test_ddp_all_reduces_only_on_the_last_micro_batch(tmp_path):
    """A real (one-process gloo) DDP student: its communication hook runs in the last backward only."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        step = make_step(clip_grad=0.0)
        ddp = torch.nn.parallel.DistributedDataParallel(step.student)
        calls = []

        def counting_hook(_, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, counting_hook)
        step.student = ddp
        schedule = StepSchedule(lr=0.05, weight_decay=0.04, momentum=0.9, teacher_temp=0.04)
        step(split(batch(12), 3), schedule)
        buckets_per_backward = len(calls)
        assert buckets_per_backward >= 1
        step(batch(12), schedule)  # a plain step all-reduces in its one backward: the same bucket count
        assert len(calls) == 2 * buckets_per_backward
    finally:
        dist.destroy_process_group()


def test_group_micro_batches_counts_and_drops_the_tail():
    loader = [([torch.full((2, 1), i)], None, i % 2) for i in range(7)]
    groups = list(group_micro_batches(loader, 3))
    assert len(groups) == 2  # the 7th batch cannot fill a step: dropped, as drop_last drops a short batch
    crops, bad = groups[1]
    assert [int(c[0][0, 0]) for c in crops] == [3, 4, 5] and bad == 1 + 0 + 1
    singles = list(group_micro_batches(loader, 1))
    assert singles == [([crops], bad) for crops, _, bad in loader]
    # an unreadable batch keeps its place, so that every rank can drop the same micro-batches
    assert list(group_micro_batches([(None, None, 4), ([torch.ones(1)], None, 0)], 2)) == [([None, [torch.ones(1)]], 4)]


@needs_fashion
def test_training_run_counts_optimizer_steps_and_resumes_on_their_boundaries(tmp_path):
    """train_dino.py with 2 x 2 images per step equals 1 x 4 (BN-free head, no drop path), also when the run is
    stopped after 3 optimizer steps and resumed; checkpoints and the logged iteration count optimizer steps."""
    flags = [*FASHION_TINY, "--epochs", "1", "--drop_path_rate", "0", "--clip_grad", "0"]
    big, accum = tmp_path / "big", tmp_path / "accum"
    assert main([*flags, "--output_dir", str(big)]) == 0
    small = [*flags, "--batch_size_per_gpu", "2", "--accum_steps", "2", "--output_dir", str(accum)]
    assert main([*small, "--exit_after_iterations", "3"]) == 0
    assert torch.load(accum / "checkpoint.pth", weights_only=True)["iteration"] == 3
    assert main(small) == 0
    a = torch.load(big / "checkpoint.pth", weights_only=True)
    b = torch.load(accum / "checkpoint.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 5  # 20 images, 4 per optimizer step
    for key in a["teacher"]:
        torch.testing.assert_close(b["teacher"][key], a["teacher"][key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["dino_loss"]["center"], a["dino_loss"]["center"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_fashion
def test_two_gloo_processes_accumulate_and_stop_on_collapse_together(tmp_path):
    """torchrun, 2 gloo processes: --accum_steps 2 keeps the teachers identical and counts optimizer steps; the
    collapse alarm is decided on all-reduced values, so both ranks stop at the same step (no hang), exit 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    small = [*FASHION_TINY, "--subset", "4", "--batch_size_per_gpu", "2", "--accum_steps", "2"]
    out = tmp_path / "ddp"
    result = run_cli([*small, "--epochs", "1", "--output_dir", str(out)], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert epoch_log["teacher_rank_max_diff"] == 0.0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 5  # 40 images / (2 x 2 x 2)
    out = tmp_path / "collapse"
    result = run_cli([*small, "--epochs", "4", "--output_dir", str(out), "--stop_on_collapse", "True", "--lr", "2",
                      "--teacher_temp", "100", "--warmup_teacher_temp", "100"], launcher=launcher)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("collapse alarm: uniform collapse")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] < 20
