"""Weighted k-nearest-neighbour classifier on frozen, L2-normalised features (DINO protocol).

For a query feature ``q`` and a bank of training features ``x_1 .. x_N`` with labels ``y_1 .. y_N``
(all rows already L2-normalised by the caller, so a dot product is a cosine similarity):

    s_i      = <q, x_i>                                   similarity to every bank feature
    N_k(q)   = indices of the k largest s_i               exact search, sorted by decreasing s_i
    score(c) = sum_{i in N_k(q), y_i = c} exp(s_i / T)     temperature-weighted vote per class
    prediction = classes sorted by decreasing score(c)

top-1 accuracy counts queries whose first class is the label; "top-5" counts queries whose label is
among the first ``min(5, k)`` classes, exactly as facebookresearch/dino's ``eval_knn.py`` does (with
``k < 5`` fewer than 5 classes can have a non-zero score, so the reference narrows to ``k``).

Differences from the reference (same numbers, different cost):

- one exact search for ``max(k)`` serves every ``k`` (neighbours are sorted, so the top-``k'`` list is a
  prefix of the top-``k`` list) instead of recomputing the full similarity matrix per ``k``;
- CPU features use faiss' brute-force inner-product search (BLAS, multi-threaded, blocked internally);
  CUDA features use a chunked ``matmul`` + ``topk`` whose similarity block has a bounded size;
- the vote is a ``scatter_add`` of ``k`` weights per query instead of a ``(B * k, C)`` one-hot matrix;
- any number of queries works (the reference's ``imgs_per_chunk = n_test // 500`` is 0 below 500);
- ties in the class scores are broken towards the lower class index (stable sort), so results are
  deterministic.

Example::

    >>> import torch
    >>> from torch.nn.functional import normalize
    >>> bank = normalize(torch.randn(1000, 64), dim=1)
    >>> bank_labels = torch.randint(0, 10, (1000,))
    >>> queries = normalize(torch.randn(50, 64), dim=1)
    >>> query_labels = torch.randint(0, 10, (50,))
    >>> results = knn_classifier(bank, bank_labels, queries, query_labels, k=[10, 20], T=0.07,
    ...                          num_classes=10)
    >>> sorted(results)
    [10, 20]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import faiss
import torch

from simpool.evaluation.features import check_labels, num_classes_of

__all__ = [
    "NUM_TOP_PREDICTIONS", "knn_classifier", "knn_on_features", "knn_predict", "knn_search", "usable_ks",
    "weighted_vote",
]

log = logging.getLogger(__name__)

# How many ranked classes are returned per query: enough for top-1 and top-5 accuracy.
NUM_TOP_PREDICTIONS = 5
# Queries per faiss call on CPU. faiss blocks the similarity computation internally, so this only bounds
# the size of our per-chunk outputs (neighbours and a (chunk, num_classes) vote matrix).
_CPU_QUERY_CHUNK = 4096
# Largest similarity block (chunk x bank, float32) materialised by the torch search path.
_TORCH_SIMILARITY_BYTES = 512 * 2**20


def knn_search(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    backend: str = "auto",
    query_chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Exact maximum-inner-product search, yielded one query chunk at a time.

    Yields ``(start, similarities, indices)`` where rows ``start : start + len(indices)`` of
    ``test_features`` have their ``k`` most similar bank rows in ``indices`` (``(chunk, k)`` int64),
    sorted by decreasing similarity ``similarities`` (``(chunk, k)`` float32). Both live on the device
    of ``train_features``.

    ``backend``: ``"faiss"`` (CPU tensors only), ``"torch"`` (any device) or ``"auto"`` (faiss on CPU,
    torch otherwise). ``query_chunk_size`` overrides the number of queries handled per step.
    """
    backend = _resolve_backend(backend, train_features.device)
    train = train_features.detach().float().contiguous()
    test = test_features.detach().to(train.device).float().contiguous()
    if backend == "faiss":
        chunk = query_chunk_size or _CPU_QUERY_CHUNK
        bank = train.numpy()  # zero-copy view; faiss.knn does not copy the bank (an index would)
        for start in range(0, test.shape[0], chunk):
            queries = test[start : start + chunk].numpy()
            sims, idx = faiss.knn(queries, bank, k, metric=faiss.METRIC_INNER_PRODUCT)
            yield start, torch.from_numpy(sims), torch.from_numpy(idx)
    else:
        chunk = query_chunk_size or max(1, _TORCH_SIMILARITY_BYTES // (4 * train.shape[0]))
        for start in range(0, test.shape[0], chunk):
            similarity = test[start : start + chunk] @ train.T
            sims, idx = similarity.topk(k, dim=1, largest=True, sorted=True)
            yield start, sims, idx


# Below this T, exp(s / T) with cosine similarities s <= 1 (and a sum of up to 10^6 of them) overflows float32:
# 1 / (ln(3.4e38) - ln(10^6)) = 0.0133. knn_predict then votes with exp((s - max s) / T) instead (the same order
# of classes, every weight in (0, 1]); above it the votes are the reference's, bit for bit.
_OVERFLOW_T = 1.0 / (88.72 - 13.82)


def weighted_vote(
    similarities: torch.Tensor, neighbour_labels: torch.Tensor, T: float, num_classes: int
) -> torch.Tensor:
    """Class scores ``score[q, c] = sum_j [neighbour_labels[q, j] == c] * exp(similarities[q, j] / T)``.

    ``similarities`` and ``neighbour_labels`` are ``(Q, k)``; returns ``(Q, num_classes)`` float32.
    A ``scatter_add`` touches ``Q * k`` entries, where the reference's one-hot product touches
    ``Q * k * num_classes``.
    """
    weights = (similarities.float() / T).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int | Sequence[int],
    T: float,
    num_classes: int = 1000,
    backend: str = "auto",
    query_chunk_size: int | None = None,
) -> torch.Tensor | dict[int, torch.Tensor]:
    """Ranked class predictions of the weighted k-NN vote.

    Returns a ``(n_test, min(5, num_classes))`` int64 tensor whose row ``q`` lists the classes of
    highest score first (ties: lower class index first); for a list of ``k`` a dict ``{k: tensor}``
    computed from a single search for ``max(k)``. Tensors are on the device of ``train_features``.
    """
    ks = _as_k_list(k)
    _validate(train_features, train_labels, test_features, None, ks, T, num_classes)
    labels = train_labels.to(train_features.device, torch.int64)
    n_test, n_top = test_features.shape[0], min(NUM_TOP_PREDICTIONS, num_classes)
    predictions = {
        kk: torch.empty(n_test, n_top, dtype=torch.int64, device=train_features.device) for kk in ks
    }
    for start, sims, idx in knn_search(train_features, test_features, max(ks), backend, query_chunk_size):
        neighbour_labels = labels[idx.to(labels.device)]
        sims = sims.to(labels.device)
        if T < _OVERFLOW_T:  # exp(s / T) would overflow float32: divide each row by exp(max s / T), same ranking
            sims = sims.float() - sims.float().amax(dim=1, keepdim=True)
        for kk in ks:  # neighbours are sorted, so the k nearest are the first k columns
            scores = weighted_vote(sims[:, :kk], neighbour_labels[:, :kk], T, num_classes)
            ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :n_top]
            predictions[kk][start : start + ranked.shape[0]] = ranked
    return predictions if isinstance(k, Sequence) else predictions[ks[0]]


def knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int | Sequence[int],
    T: float,
    num_classes: int = 1000,
    **search: Any,
) -> tuple[float, float] | dict[int, tuple[float, float]]:
    """Weighted k-NN accuracy ``(top1, top5)`` in percent, as DINO's ``eval_knn.knn_classifier``.

    ``k`` an int gives ``(top1, top5)``; a list gives ``{k: (top1, top5)}`` from one search. "top5" is
    top-``min(5, k)`` (the reference's convention), also capped at ``num_classes``. Features must be
    L2-normalised rows (``(N, D)`` bank, ``(M, D)`` queries); labels are integers in
    ``[0, num_classes)``; ``search`` (``backend``, ``query_chunk_size``) goes to :func:`knn_predict`. See the
    module docstring for the formula.
    """
    ks = _as_k_list(k)
    _validate(train_features, train_labels, test_features, test_labels, ks, T, num_classes)
    predictions = knn_predict(train_features, train_labels, test_features, ks, T, num_classes, **search)
    results = {kk: _top1_top5(preds, test_labels, kk) for kk, preds in predictions.items()}
    return results if isinstance(k, Sequence) else results[ks[0]]


def usable_ks(nb_knn: Sequence[int], bank_size: int) -> list[int]:
    """The requested k that fit in a bank of ``bank_size`` features, in order, without repeats; the whole bank
    when none fits (a k above the bank has too few neighbours)."""
    ks = [k for k in dict.fromkeys(nb_knn) if k <= bank_size]
    if len(ks) < len(set(nb_knn)):
        log.info("note: k > %d skipped: there are only %d train images", bank_size, bank_size)
    return ks or [bank_size]


def knn_on_features(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    nb_knn: Sequence[int],
    temperature: float,
    device: torch.device | None = None,
) -> dict[int, tuple[float, float]]:
    """``{k: (top1, top5)}`` of the weighted k-NN for every usable ``k`` of ``nb_knn``, from one search.

    The one entry point of ``eval_knn.py`` and of the trainer's online k-NN. ``train`` / ``val`` are
    (L2-normalised features, labels) pairs as ``extract_features`` returns them; the classes are counted over
    both splits; the search runs on ``device`` (default: where the features are).

    Example:
        >>> train = extract_features(backbone, train_set)
        >>> knn_on_features(train, extract_features(backbone, val_set), [10, 20], 0.07)
        {10: (71.2, 89.0), 20: (71.9, 90.3)}
    """
    (train_x, train_y), (val_x, val_y) = train, val
    device = device or train_x.device
    num_classes = num_classes_of(train_y, val_y)
    ks = usable_ks(nb_knn, train_x.shape[0])
    return knn_classifier(train_x.to(device), train_y.to(device), val_x.to(device), val_y.to(device), ks,
                          temperature, num_classes=num_classes)


def _top1_top5(predictions: torch.Tensor, test_labels: torch.Tensor, k: int) -> tuple[float, float]:
    correct = predictions == test_labels.to(predictions.device, torch.int64).view(-1, 1)
    n = predictions.shape[0]
    top1 = correct[:, 0].sum().item() * 100.0 / n
    top5 = correct[:, : min(NUM_TOP_PREDICTIONS, k)].any(dim=1).sum().item() * 100.0 / n
    return top1, top5


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend == "auto":
        return "faiss" if device.type == "cpu" else "torch"
    if backend == "faiss" and device.type != "cpu":
        raise ValueError(
            f"backend='faiss' needs CPU features (faiss-cpu), got {device}; use backend='torch' or 'auto'"
        )
    return backend


def _as_k_list(k: int | Sequence[int]) -> list[int]:
    ks = list(k) if isinstance(k, Sequence) else [k]
    if not ks:
        raise ValueError("k is an empty list; pass an int or a non-empty list of ints, e.g. [10, 20]")
    for kk in ks:
        if isinstance(kk, bool) or not isinstance(kk, int) or kk < 1:
            raise ValueError(f"every k must be a positive int, got {kk!r}")
    return list(dict.fromkeys(ks))  # drop duplicates, keep order


def _validate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None,
    ks: list[int],
    T: float,
    num_classes: int,
) -> None:
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError(
            "features must be 2-D (num_samples, dim); got train "
            f"{tuple(train_features.shape)} and test {tuple(test_features.shape)} (flatten them first)"
        )
    n_train, dim = train_features.shape
    if test_features.shape[1] != dim:
        raise ValueError(
            f"train features have dim {dim} but test features have dim {test_features.shape[1]}; "
            "extract both with the same model"
        )
    if test_features.shape[0] == 0 or n_train == 0:
        raise ValueError("need at least one train and one test feature")
    if test_features.device != train_features.device:
        raise ValueError(
            f"train features on {train_features.device} but test features on {test_features.device}; "
            "move both to the same device"
        )
    if max(ks) > n_train:
        raise ValueError(f"k={max(ks)} exceeds the bank size ({n_train} train features); lower k")
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_labels("train", train_labels, n_train, num_classes)
    if test_labels is not None:
        check_labels("test", test_labels, test_features.shape[0], num_classes)
