"""Cosine search over a large database in bounded memory: the top k per query, and the positions of chosen items in
each query's full ranking.

Both walk the database in chunks of at most ``chunk_size`` rows (fewer when there are many queries: a block of
similarities stays near 2^24 floats), so the memory is bounded whatever the database size (1M distractors
included), on whatever device the features are on. Why not faiss: its CPU index would move
GPU features to the host, and an exact flat search is a matmul either way.

The ranking is by decreasing similarity, ties broken by the smaller database index (a stable sort): the same
order on every device and chunk size, which ``torch.argsort`` does not promise.

Example:
    >>> scores, indices = topk_cosine(queries, database, k=20)                 # (Q, 20) each
    >>> positions = ranking_positions(queries, database, [pos_of_q0, ...])     # 0-based places in the ranking
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ranking_positions", "topk_cosine"]

DEFAULT_CHUNK = 65536


def _check(queries: torch.Tensor, database: torch.Tensor, chunk_size: int) -> None:
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and database {tuple(database.shape)} must be (N, D) with "
                         "the same D")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


@torch.no_grad()
def topk_cosine(queries: torch.Tensor, database: torch.Tensor, k: int,
                chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar database rows per query by dot product (cosine for L2-normalised rows), best first.

    Returns (scores, indices), each (Q, min(k, N)); equal scores keep the smaller index first.
    """
    _check(queries, database, chunk_size)
    k = min(k, database.shape[0])
    best_scores = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    step = max(1, min(chunk_size, (1 << 24) // max(1, queries.shape[0])))  # a (Q, step) block near 2^24 floats
    for start in range(0, database.shape[0], step):
        chunk = database[start:start + step].to(queries.device, queries.dtype)
        scores = torch.cat([best_scores, queries @ chunk.T], dim=1)
        indices = torch.cat([best_indices, torch.arange(start, start + chunk.shape[0], device=queries.device)
                             .expand(queries.shape[0], -1)], dim=1)
        # stable sort on (-score): earlier columns hold smaller database indices, so ties keep index order
        order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
        best_scores, best_indices = scores.gather(1, order), indices.gather(1, order)
    return best_scores, best_indices


@torch.no_grad()
def ranking_positions(queries: torch.Tensor, database: torch.Tensor, targets: Sequence[np.ndarray | Sequence[int]],
                      chunk_size: int = DEFAULT_CHUNK) -> list[np.ndarray]:
    """For query i, the 0-based positions of database rows ``targets[i]`` in its ranking (decreasing similarity,
    ties by index), in the order ``targets[i]`` lists them, without sorting the database.

    position(j) = #{rows with a higher score} + #{rows with the same score and a smaller index}.
    """
    _check(queries, database, chunk_size)
    if len(targets) != queries.shape[0]:
        raise ValueError(f"{len(targets)} target lists for {queries.shape[0]} queries")
    device = queries.device
    width = max((len(t) for t in targets), default=0)
    if width == 0:
        return [np.zeros(0, dtype=np.int64) for _ in targets]
    index = torch.zeros((len(targets), width), dtype=torch.long, device=device)
    valid = torch.zeros((len(targets), width), dtype=torch.bool, device=device)
    for i, rows in enumerate(targets):
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= database.shape[0]):
            raise ValueError(f"target index out of range for a database of {database.shape[0]} rows (query {i})")
        index[i, :rows.numel()], valid[i, :rows.numel()] = rows, True
    target_scores = torch.einsum("qd,qtd->qt", queries, database[index.view(-1)].to(device, queries.dtype)
                                 .view(len(targets), width, -1))
    before = torch.zeros((len(targets), width), dtype=torch.long, device=device)
    # (Q, chunk, width) comparisons per step: keep that near 2^24 elements
    step = max(1, min(chunk_size, (1 << 24) // max(1, len(targets) * width)))
    for start in range(0, database.shape[0], step):
        chunk = database[start:start + step].to(device, queries.dtype)
        scores = (queries @ chunk.T)[:, :, None]  # (Q, chunk, 1)
        rows = torch.arange(start, start + chunk.shape[0], device=device)[None, :, None]
        target = target_scores[:, None, :]
        ahead = (scores > target) | ((scores == target) & (rows < index[:, None]))
        # a row never ranks ahead of itself, even if the chunked matmul rounds its score above the einsum's
        before += (ahead & (rows != index[:, None])).sum(dim=1)
    return [before[i, valid[i]].cpu().numpy() for i in range(len(targets))]
