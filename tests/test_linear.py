"""Tests for simpool.evaluation.linear: the multi-lr heads, their torch optimiser, the loop, resume, accuracy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simpool.evaluation.linear import (
    MultiLRLinear,
    accuracy,
    feature_batches,
    fit,
    probe_optimizer,
    train_linear_on_features,
)
from simpool.evaluation.linear_probe import ProbeState


def blobs(n_per_class: int, dim: int = 32, classes: int = 4, spread: float = 0.5, seed: int = 0):
    """Gaussian blobs around well separated centres: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def stacked(model: MultiLRLinear, name: str) -> torch.Tensor:
    return torch.stack([getattr(head, name).detach() for head in model.heads])


def test_multi_lr_heads_start_alike_from_the_reference_init_and_compute_independent_linear_maps():
    rng = torch.get_rng_state()
    model = MultiLRLinear(96, num_labels=200, num_heads=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG (image augmentations) is left alone
    expected = torch.randn(200, 96, generator=torch.Generator().manual_seed(0)) * 0.01
    for head in model.heads:
        assert torch.equal(head.weight, expected) and torch.count_nonzero(head.bias) == 0
    assert stacked(model, "weight").std().item() == pytest.approx(0.01, rel=0.05)
    with torch.no_grad():
        for head in model.heads:
            head.weight.add_(torch.randn_like(head.weight))
            head.bias.add_(torch.randn_like(head.bias))
    x = torch.randn(6, 2, 48)
    logits = model(x)
    assert logits.shape == (3, 6, 200)
    for h, head in enumerate(model.heads):
        torch.testing.assert_close(logits[h], x.flatten(1) @ head.weight.T + head.bias)


def naive_probe(features, labels, lrs, epochs, batch_size, num_labels, seed):
    """Ground truth: per head a plain nn.Linear and its own torch.optim.SGD, the lr set by the formula
    ``lr (1 + cos(pi e / E)) / 2`` each epoch; init and sample orders drawn from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    init = torch.randn(num_labels, features.shape[1], generator=generator) * 0.01
    orders = [torch.randperm(len(labels), generator=generator) for _ in range(epochs)]
    heads = []
    for lr in lrs:
        head = torch.nn.Linear(features.shape[1], num_labels)
        with torch.no_grad():
            head.weight.copy_(init)
            head.bias.zero_()
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        for epoch, order in enumerate(orders):
            optimizer.param_groups[0]["lr"] = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
            for batch in order.split(batch_size):
                loss = F.cross_entropy(head(features[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        heads.append(head)
    return heads


def test_multi_lr_training_equals_per_head_sgd_with_the_cosine_formula():
    features, labels = blobs(20, dim=8, classes=3, spread=2.0)
    lrs, epochs, batch_size = [0.02, 0.3, 1.5], 3, 16  # 60 samples: batches of 16, 16, 16, 12
    out = train_linear_on_features(features, labels, features, labels, lrs, epochs, batch_size, num_labels=3,
                                   seed=7)
    expected = naive_probe(features, labels, lrs, epochs, batch_size, num_labels=3, seed=7)
    for head, truth in zip(out["model"].heads, expected, strict=True):
        torch.testing.assert_close(head.weight, truth.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.bias, truth.bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["model"].heads[0].weight, out["model"].heads[2].weight)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no training here
def test_per_epoch_lrs_follow_the_cosine_of_the_reference():
    lrs, epochs = [0.001, 0.1], 7
    optimizer, scheduler = probe_optimizer(MultiLRLinear(4, 2, num_heads=2), lrs, epochs)
    seen = []
    for _ in range(epochs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        scheduler.step()
    for epoch, epoch_lrs in enumerate(seen):
        assert epoch_lrs == pytest.approx([lr * (1 + math.cos(math.pi * epoch / epochs)) / 2 for lr in lrs],
                                          rel=1e-12)
    assert seen[0] == lrs and all(group["momentum"] == 0.9 for group in optimizer.param_groups)
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)


def test_resume_from_the_state_dict_is_bitwise(tmp_path):
    """Train 2 epochs, save, restore into fresh objects, train the 3rd: the same bits as 3 epochs straight."""
    features, labels = blobs(25, dim=12, spread=2.0)
    lrs, epochs = [0.05, 0.5], 3

    def run(state, stop):
        train = feature_batches(features, labels, 16, state.generator)
        for epoch, *_ in fit(state.heads, state.optimizer, state.scheduler, train, [], epochs, state.epoch):
            state.epoch = epoch + 1
            if state.epoch == stop:
                break

    straight = ProbeState.new(12, 4, lrs, epochs, seed=3, device=torch.device("cpu"))
    run(straight, stop=epochs)
    first = ProbeState.new(12, 4, lrs, epochs, seed=3, device=torch.device("cpu"))
    run(first, stop=2)
    torch.save(first.state_dict(), tmp_path / "probe.pth")
    torch.manual_seed(99)  # the resumed process's RNG is elsewhere: the checkpoint puts it back
    resumed = ProbeState.new(12, 4, lrs, epochs, seed=123, device=torch.device("cpu"))
    resumed.load_state_dict(torch.load(tmp_path / "probe.pth", weights_only=True))
    run(resumed, stop=epochs)
    assert resumed.epoch == straight.epoch == 3
    for name in ("weight", "bias"):
        assert torch.equal(stacked(resumed.heads, name), stacked(straight.heads, name))
        assert not torch.equal(stacked(first.heads, name), stacked(straight.heads, name))
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_separable_blobs_reach_99_percent_and_best_lr_is_reported():
    train_feats, train_labels = blobs(100, seed=0)
    val_feats, val_labels = blobs(50, seed=1)
    lrs = [1e-5, 0.01, 0.1]
    out = train_linear_on_features(
        train_feats, train_labels, val_feats, val_labels, lrs, epochs=10, batch_size=32, num_labels=4, seed=0
    )
    assert list(out["per_lr"]) == lrs
    best = out["best_lr"]
    assert out["per_lr"][best]["top1"] == max(r["top1"] for r in out["per_lr"].values())
    assert out["best_top1"] >= 99.0
    assert out["best_top5"] == 100.0  # 4 classes: top-5 is top-4
    # the tiny lr barely leaves the initialisation: loss ~ log(4), and it cannot be the best head
    assert out["per_lr"][1e-5]["loss"] > 1.0 > 0.1 > out["per_lr"][best]["loss"]
    assert best != 1e-5
    weights = stacked(out["model"], "weight")
    assert not torch.allclose(weights[1], weights[2])  # heads really differ
    assert (weights[1] - weights[0]).norm() < (weights[2] - weights[0]).norm()  # larger lr moves further


def test_same_seed_reproduces_and_heads_do_not_interact():
    feats, labels = blobs(30, dim=16, spread=3.0)
    kwargs = dict(epochs=3, batch_size=16, num_labels=4, seed=3)
    both = train_linear_on_features(feats, labels, feats, labels, [0.05, 0.5], **kwargs)
    again = train_linear_on_features(feats, labels, feats, labels, [0.05, 0.5], **kwargs)
    alone = train_linear_on_features(feats, labels, feats, labels, [0.5], **kwargs)
    assert both["per_lr"] == again["per_lr"]
    torch.testing.assert_close(both["model"].heads[1].weight, alone["model"].heads[0].weight, rtol=1e-5,
                               atol=1e-6)


def test_accuracy_by_hand():
    output = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.9],  # ranked 6, 1, 2, ...
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # ranked 0, 1, ...
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # ranked 6, 5, 4, 3, 2, 1, 0
            [0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2],  # ranked 0, 1, 2, 3, ...: no ties
        ]
    )
    target = torch.tensor([1, 0, 0, 3])
    # top-1: only sample 1; top-2 adds sample 0; top-5: sample 3 (class 3 ranks 4th); sample 2 never.
    assert accuracy(output, target, topk=(1, 2, 5)) == [25.0, 50.0, 75.0]
    assert accuracy(output[:, :3], torch.tensor([1, 0, 0, 2]), topk=(1, 5)) == [50.0, 100.0]  # k > C


def test_invalid_inputs_raise_value_error():
    feats, labels = blobs(5, dim=8)
    run = dict(epochs=1, batch_size=4, num_labels=4)
    with pytest.raises(ValueError, match="lrs is empty"):
        train_linear_on_features(feats, labels, feats, labels, [], **run)
    with pytest.raises(ValueError, match="> 0"):
        train_linear_on_features(feats, labels, feats, labels, [0.1, -1.0], **run)
    with pytest.raises(ValueError, match="distinct"):
        train_linear_on_features(feats, labels, feats, labels, [0.1, 0.1], **run)
    with pytest.raises(ValueError, match=r"train labels must lie in \[0, 3\)"):
        train_linear_on_features(feats, labels, feats, labels, [0.1], epochs=1, batch_size=4, num_labels=3)
    with pytest.raises(ValueError, match="val labels must have shape"):
        train_linear_on_features(feats, labels, feats, labels[:-1], [0.1], **run)
    with pytest.raises(ValueError, match="dim"):
        train_linear_on_features(feats, labels, feats[:, :4], labels, [0.1], **run)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_on_features(feats, labels, feats, labels, [0.1], epochs=0, batch_size=4, num_labels=4)
    with pytest.raises(ValueError, match="target"):
        accuracy(torch.randn(4, 3), torch.tensor([0, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    feats, labels = blobs(30, dim=16, spread=3.0)
    kwargs = dict(lrs=[0.05, 0.5], epochs=3, batch_size=16, num_labels=4, seed=3)
    cpu = train_linear_on_features(feats, labels, feats, labels, **kwargs)
    cuda = train_linear_on_features(feats.cuda(), labels.cuda(), feats.cuda(), labels.cuda(), **kwargs)
    assert cuda["model"].heads[0].weight.is_cuda
    torch.testing.assert_close(stacked(cuda["model"], "weight").cpu(), stacked(cpu["model"], "weight"),
                               rtol=1e-3, atol=1e-4)
    assert cuda["best_lr"] == cpu["best_lr"]
