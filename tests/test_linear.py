"""Tests for simpool.evaluation.linear: the probe, the multi-lr trainer and the accuracy helper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simpool.evaluation.linear import (
    LinearClassifier,
    MultiLRLinear,
    accuracy,
    cosine_epoch_lr,
    fit_multi_lr,
    train_linear_on_features,
)


def blobs(n_per_class: int, dim: int = 32, classes: int = 4, spread: float = 0.5, seed: int = 0):
    """Gaussian blobs around well separated centres: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_linear_classifier_matches_reference_init_and_flattens():
    torch.manual_seed(0)
    probe = LinearClassifier(2 * 192, num_labels=1000)
    assert set(probe.state_dict()) == {"linear.weight", "linear.bias"}  # reference key names
    assert probe.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(probe.linear.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(probe.linear.bias) == 0
    x = torch.randn(3, 2, 192)
    torch.testing.assert_close(probe(x), x.reshape(3, -1) @ probe.linear.weight.T)


def test_multi_lr_heads_compute_independent_linear_maps():
    model = MultiLRLinear(8, num_labels=5, num_heads=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.weight[0], model.weight[2])  # shared initial draw
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight))
        model.bias.add_(torch.randn_like(model.bias))
    x = torch.randn(6, 8)
    logits = model(x)
    assert logits.shape == (3, 6, 5)
    for h in range(3):
        torch.testing.assert_close(logits[h], x @ model.weight[h].T + model.bias[h])
        torch.testing.assert_close(model.head(h)(x), logits[h])


def test_multi_lr_training_equals_torch_sgd_with_cosine_per_head():
    """Each head follows exactly torch.optim.SGD(momentum 0.9) + CosineAnnealingLR stepped per epoch."""
    features, labels = blobs(20, dim=8, classes=3, spread=2.0)
    lrs, epochs, batch_size = [0.02, 0.3], 3, 16  # 60 samples: batches of 16, 16, 16, 12
    model = MultiLRLinear(8, num_labels=3, num_heads=2, generator=torch.Generator().manual_seed(5))
    fit_multi_lr(model, features, labels, lrs, epochs, batch_size, torch.Generator().manual_seed(7))

    init = MultiLRLinear(8, num_labels=3, num_heads=1, generator=torch.Generator().manual_seed(5)).head(0)
    order_generator = torch.Generator().manual_seed(7)
    orders = [torch.randperm(len(labels), generator=order_generator) for _ in range(epochs)]
    for h, lr in enumerate(lrs):
        probe = LinearClassifier(8, num_labels=3)
        probe.load_state_dict(init.state_dict())
        optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
        for order in orders:
            for batch in order.split(batch_size):
                loss = F.cross_entropy(probe(features[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
        torch.testing.assert_close(model.weight[h], probe.linear.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.bias[h], probe.linear.bias, rtol=1e-4, atol=1e-5)


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
    weights = out["model"].weight.detach()
    assert not torch.allclose(weights[1], weights[2])  # heads really differ
    assert (weights[1] - weights[0]).norm() < (weights[2] - weights[0]).norm()  # larger lr moves further


def test_same_seed_reproduces_and_heads_do_not_interact():
    feats, labels = blobs(30, dim=16, spread=3.0)
    kwargs = dict(epochs=3, batch_size=16, num_labels=4, seed=3)
    both = train_linear_on_features(feats, labels, feats, labels, [0.05, 0.5], **kwargs)
    again = train_linear_on_features(feats, labels, feats, labels, [0.05, 0.5], **kwargs)
    alone = train_linear_on_features(feats, labels, feats, labels, [0.5], **kwargs)
    assert both["per_lr"] == again["per_lr"]
    torch.testing.assert_close(both["model"].weight[1], alone["model"].weight[0], rtol=1e-4, atol=1e-6)


def test_cosine_epoch_lr():
    assert cosine_epoch_lr(0.4, 0, 10) == 0.4
    assert cosine_epoch_lr(0.4, 5, 10) == pytest.approx(0.2)
    assert cosine_epoch_lr(0.4, 9, 10) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.9)))


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
    assert cuda["model"].weight.is_cuda
    torch.testing.assert_close(cuda["model"].weight.cpu(), cpu["model"].weight, rtol=1e-3, atol=1e-4)
    assert cuda["best_lr"] == cpu["best_lr"]
