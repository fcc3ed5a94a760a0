"""Tests for simpool.evaluation.knn: hand-computed votes, agreement with the reference algorithm."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize

from benchmarks.reference_knn import reference_knn
from simpool.evaluation.features import check_labels, num_classes_of
from simpool.evaluation.knn import knn_classifier, knn_predict, knn_search, weighted_vote

T = 0.07


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Six train points on the unit circle and two queries. For each query two of its three nearest
# neighbours share a label, but the single closest neighbour wins the exp(sim / T) vote.
TRAIN_ANGLES = [10.0, 30.0, -35.0, 90.0, 180.0, 205.0]
TRAIN_LABELS = [0, 1, 1, 2, 0, 2]
QUERY_ANGLES = [0.0, 190.0]
QUERY_LABELS = [0, 2]


def tiny_case():
    train = torch.tensor([unit(a) for a in TRAIN_ANGLES])
    test = torch.tensor([unit(a) for a in QUERY_ANGLES])
    return train, torch.tensor(TRAIN_LABELS), test, torch.tensor(QUERY_LABELS)


def vote(angle_differences: list[float]) -> float:
    return sum(math.exp(math.cos(math.radians(d)) / T) for d in angle_differences)


def test_hand_computed_vote_k3():
    train, train_labels, test, test_labels = tiny_case()
    # Query at 0 deg: neighbours 10 deg (label 0), 30 deg (1), -35 deg (1).
    # Query at 190 deg: neighbours 180 deg (label 0), 205 deg (2), 90 deg (2).
    expected_scores = torch.tensor(
        [
            [vote([10]), vote([30, 35]), 0.0],
            [vote([10]), 0.0, vote([15, 100])],
        ]
    )
    (start, sims, idx), = list(knn_search(train, test, 3))
    assert start == 0
    assert idx.tolist() == [[0, 1, 2], [4, 5, 3]]
    torch.testing.assert_close(sims, torch.tensor([[math.cos(math.radians(d)) for d in row]
                                                   for row in ([10, 30, 35], [10, 15, 100])]))
    scores = weighted_vote(sims, train_labels[idx], T, num_classes=3)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=0.0)
    # Class 0 wins both votes (exp(0.985/0.07) = 1.29e6 against 3.57e5 and 9.84e5); zero-score
    # classes follow in index order.
    assert knn_predict(train, train_labels, test, 3, T, num_classes=3).tolist() == [[0, 1, 2], [0, 2, 1]]
    # Query 1 (label 2) is wrong at top-1 but its label is among the top-min(5, k) = 3 classes.
    assert knn_classifier(train, train_labels, test, test_labels, 3, T, num_classes=3) == (50.0, 100.0)


def test_top5_is_top_min_5_k_as_the_reference():
    train, train_labels, test, test_labels = tiny_case()
    # k=1: one neighbour per query, "top5" narrows to the first class only, so it equals top-1.
    assert knn_classifier(train, train_labels, test, test_labels, 1, T, num_classes=3) == (50.0, 50.0)
    # k=2: query 1 ranks [0, 2, ...]; its label 2 is second, inside top-min(5, 2).
    assert knn_classifier(train, train_labels, test, test_labels, 2, T, num_classes=3) == (50.0, 100.0)


def clustered(n_train: int, n_test: int, dim: int = 16, classes: int = 10, noise: float = 2.5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = normalize(torch.randn(classes, dim, generator=generator), dim=1)

    def draw(n):
        labels = torch.randint(0, classes, (n,), generator=generator)
        points = centres[labels] + noise * torch.randn(n, dim, generator=generator) / dim**0.5
        return normalize(points, dim=1), labels

    return (*draw(n_train), *draw(n_test))


@pytest.mark.parametrize("k", [1, 4, 20, 50])
def test_matches_reference_algorithm(k):
    train, train_labels, test, test_labels = clustered(600, 120)
    ref_top1, ref_top5, ref_predictions, ref_scores = reference_knn(
        train, train_labels, test, test_labels, k, T, 10, guard_small_query_sets=True
    )
    ours = knn_predict(train, train_labels, test, k, T, num_classes=10)
    assert 20.0 < ref_top1 < 95.0  # a non-trivial problem
    assert torch.equal(ours[:, 0], ref_predictions[:, 0])
    # Ranks 2..5 are compared only where the reference's scores are non-zero: classes without a vote
    # tie at 0 and the reference's sort leaves their order unspecified.
    voted = ref_scores[:, :5] > 0
    assert torch.equal(ours[voted], ref_predictions[:, :5][voted])
    assert knn_classifier(train, train_labels, test, test_labels, k, T, num_classes=10) == pytest.approx(
        (ref_top1, ref_top5)
    )


def test_fewer_than_500_queries():
    train, train_labels, test, test_labels = clustered(200, 7)
    top1, top5, predictions, _ = reference_knn(
        train, train_labels, test, test_labels, 10, T, 10, guard_small_query_sets=True
    )
    assert torch.equal(knn_predict(train, train_labels, test, 10, T, num_classes=10)[:, 0], predictions[:, 0])
    assert knn_classifier(train, train_labels, test, test_labels, 10, T, num_classes=10) == pytest.approx(
        (top1, top5)
    )
    single = knn_classifier(train, train_labels, test[:1], test_labels[:1], 10, T, num_classes=10)
    assert single[0] in (0.0, 100.0)


def test_list_of_k_equals_separate_calls():
    train, train_labels, test, test_labels = clustered(500, 60, seed=1)
    ks = [10, 1, 20, 100]
    together = knn_classifier(train, train_labels, test, test_labels, ks, T, num_classes=10)
    assert list(together) == ks
    predictions = knn_predict(train, train_labels, test, ks, T, num_classes=10)
    for k in ks:
        assert together[k] == knn_classifier(train, train_labels, test, test_labels, k, T, num_classes=10)
        assert torch.equal(predictions[k], knn_predict(train, train_labels, test, k, T, num_classes=10))
    assert together[1] != together[100]  # k really changes the vote on this data


def test_torch_backend_and_small_chunks_match_faiss():
    train, train_labels, test, test_labels = clustered(400, 50, seed=2)
    faiss_predictions = knn_predict(train, train_labels, test, [5, 30], T, num_classes=10, backend="faiss")
    for backend, chunk in [("torch", None), ("torch", 3), ("faiss", 7)]:
        predictions = knn_predict(
            train, train_labels, test, [5, 30], T, num_classes=10, backend=backend, query_chunk_size=chunk
        )
        for k in (5, 30):
            assert torch.equal(predictions[k][:, 0], faiss_predictions[k][:, 0]), (backend, chunk, k)


def test_predictions_shape_with_few_classes():
    train, train_labels, test, _ = clustered(100, 9, classes=3)
    predictions = knn_predict(train, train_labels, test, 10, T, num_classes=3)
    assert predictions.shape == (9, 3)
    assert sorted(predictions[0].tolist()) == [0, 1, 2]  # a full ranking of the three classes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    train, train_labels, test, test_labels = clustered(3000, 700, seed=3)
    cpu = knn_classifier(train, train_labels, test, test_labels, [10, 20], T, num_classes=10)
    cuda = knn_classifier(train.cuda(), train_labels.cuda(), test.cuda(), test_labels.cuda(), [10, 20], T,
                          num_classes=10)
    for k in (10, 20):
        assert cuda[k] == pytest.approx(cpu[k], abs=0.3)  # at most 2 of 700 queries flip on fp rounding


def test_invalid_inputs_raise_value_error():
    train, train_labels, test, test_labels = clustered(50, 5)
    with pytest.raises(ValueError, match="dim"):
        knn_classifier(train, train_labels, test[:, :8], test_labels, 5, T, 10)
    with pytest.raises(ValueError, match="exceeds the bank size"):
        knn_classifier(train, train_labels, test, test_labels, 51, T, 10)
    with pytest.raises(ValueError, match="exceeds the bank size"):
        knn_classifier(train, train_labels, test, test_labels, [5, 60], T, 10)
    with pytest.raises(ValueError, match=r"train labels must lie in \[0, 5\)"):
        knn_classifier(train, train_labels, test, test_labels, 5, T, num_classes=5)
    with pytest.raises(ValueError, match="test labels must lie"):
        knn_classifier(train, train_labels, test, test_labels - 1, 5, T, 10)
    with pytest.raises(ValueError, match="shape"):
        knn_classifier(train, train_labels[:-1], test, test_labels, 5, T, 10)
    with pytest.raises(ValueError, match="2-D"):
        knn_classifier(train[None], train_labels, test, test_labels, 5, T, 10)
    with pytest.raises(ValueError, match="positive int"):
        knn_classifier(train, train_labels, test, test_labels, 0, T, 10)
    with pytest.raises(ValueError, match="empty"):
        knn_classifier(train, train_labels, test, test_labels, [], T, 10)
    with pytest.raises(ValueError, match="T must be > 0"):
        knn_classifier(train, train_labels, test, test_labels, 5, 0.0, 10)
    with pytest.raises(ValueError, match="integer"):
        knn_classifier(train, train_labels.float(), test, test_labels, 5, T, 10)
    with pytest.raises(ValueError, match="backend"):
        knn_classifier(train, train_labels, test, test_labels, 5, T, 10, backend="annoy")


def test_class_count_and_label_check_shared_with_the_probes():
    class Folder:  # an ImageFolder-like data set whose last class folder is empty
        classes, targets = ["a", "b", "c"], [0, 1, 1]

    assert num_classes_of(Folder()) == 3
    assert num_classes_of(torch.tensor([0, 2]), torch.tensor([4, 1])) == 5
    check_labels("val", torch.tensor([0, 2]), 2, 3)
    with pytest.raises(ValueError, match=r"val labels must lie in \[0, 2\), found \[0, 2\]; pass the right num_labels"):
        check_labels("val", torch.tensor([0, 2]), 2, 2, count_flag="num_labels")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        check_labels("train", torch.tensor([0, 2]), 3, 3)
    check_labels("train", torch.zeros(0, dtype=torch.long), 0, 3)  # no rows, no range to check
