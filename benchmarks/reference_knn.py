"""facebookresearch/dino's weighted k-NN (eval_knn.knn_classifier), re-implemented step for step.

Kept in one place for the parity tests (tests/test_knn.py) and the speed comparison (benchmarks/knn.py).
The reference splits the queries into ``n_test // 500`` images per chunk, which is 0 below 500 queries (it
crashes there); ``guard_small_query_sets=True`` uses at least one image per chunk so tests can compare on small sets.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_knn(train_features, train_labels, test_features, test_labels, k, T, num_classes,
                  guard_small_query_sets: bool = False):
    """Returns (top1 %, top5 %, sorted class predictions (n_test, C), sorted class scores (n_test, C))."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images = test_labels.shape[0]
    imgs_per_chunk = num_test_images // 500
    if guard_small_query_sets:
        imgs_per_chunk = max(1, imgs_per_chunk)
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    all_predictions, all_scores = [], []
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx : min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx : min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]

        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)

        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(
                retrieval_one_hot.view(batch_size, -1, num_classes),
                distances_transform.view(batch_size, -1, 1),
            ),
            1,
        )
        scores, predictions = probs.sort(1, True)

        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
        all_predictions.append(predictions)
        all_scores.append(scores)
    return top1 * 100.0 / total, top5 * 100.0 / total, torch.cat(all_predictions), torch.cat(all_scores)
