"""The revisited Oxford/Paris protocol's scores (Radenovic et al., CVPR 2018; revisitop's ``compute_map``): mean
average precision and mean precision at k, with junk images taken out of each ranking, in three setups.

Per query, with ``p_1 < p_2 < ...`` the 0-based places of its positives in the ranking *after removing its junk
images* (a positive's place drops by the number of junk images ranked above it), and ``n`` its positives:

    AP = sum_j (P0_j + P1_j) / 2 / n,   P0_j = j / p_j (1 when p_j = 0),   P1_j = (j + 1) / (p_j + 1)   (j from 0)

(the trapezoid under the precision-recall curve); ``P@k = #{j : p_j + 1 <= k'} / k'`` with ``k' = min(k, p_last + 1)``
-- revisitop's definition, which divides by fewer than k when every positive is found earlier. A query without
positives is left out of the means. The setups (``gnd[i]`` lists ``easy``, ``hard``, ``junk``):

=======  ===================  ========================
setup    positives            junk
=======  ===================  ========================
Easy     easy                 junk + hard
Medium   easy + hard          junk
Hard     hard                 junk + easy
=======  ===================  ========================

Example:
    >>> average_precision(np.array([0, 2]), 2)     # positives at places 1 and 3 of the ranking
    0.7916666666666666
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SETUPS", "average_precision", "compute_map", "precision_at", "query_positions", "revisited_scores"]

SETUPS = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
          "hard": (("hard",), ("junk", "easy"))}


def average_precision(positions: np.ndarray, num_positives: int) -> float:
    """AP of sorted 0-based places (junk already removed) of the positives found, out of ``num_positives``."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size == 0:
        return 0.0
    found = np.arange(positions.size, dtype=np.float64)
    precision_before = np.where(positions == 0, 1.0, found / np.maximum(positions, 1))
    precision_after = (found + 1) / (positions + 1)
    return float(((precision_before + precision_after) / 2).sum() / num_positives)


def precision_at(positions: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """revisitop's mP@k terms for one query: sorted 0-based places (junk removed) of its positives."""
    ranks = np.asarray(positions, dtype=np.int64) + 1
    out = np.zeros(len(kappas))
    for j, k in enumerate(kappas):
        kq = min(int(ranks.max()), k)
        out[j] = (ranks <= kq).sum() / kq
    return out


def _without_junk(ok_places: np.ndarray, junk_places: np.ndarray) -> np.ndarray:
    ok_places, junk_places = np.sort(ok_places), np.sort(junk_places)
    return ok_places - np.searchsorted(junk_places, ok_places, side="left")


def query_positions(ranking: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """0-based places of database ``rows`` in one query's ``ranking`` (a permutation of the database), sorted."""
    return np.sort(np.flatnonzero(np.isin(ranking, rows)))


def _scores(places: Sequence[tuple[np.ndarray, np.ndarray, int]], kappas: Sequence[int]) -> dict[str, Any]:
    aps, prs = np.full(len(places), np.nan), np.full((len(places), len(kappas)), np.nan)
    for i, (ok_places, junk_places, num_ok) in enumerate(places):
        if num_ok == 0:
            continue
        kept = _without_junk(ok_places, junk_places)
        aps[i] = average_precision(kept, num_ok)
        prs[i] = precision_at(kept, kappas)
    valid = ~np.isnan(aps)
    return {"map": float(aps[valid].mean()) if valid.any() else float("nan"),
            "mp_at_k": {int(k): float(v) for k, v in zip(kappas, prs[valid].mean(axis=0) if valid.any()
                                                      else [float("nan")] * len(kappas), strict=True)},
            "aps": aps.tolist(), "num_evaluated": int(valid.sum())}


def compute_map(ranks: np.ndarray, gnd: Sequence[dict[str, Any]], kappas: Sequence[int] = ()) -> tuple:
    """revisitop's ``compute_map(ranks, gnd, kappas)``: ``ranks`` (database, queries) of database indices, best
    first; ``gnd[i]`` has ``ok`` and optionally ``junk``. Returns (mAP, APs, mP@k, P@k per query)."""
    places = []
    for i, entry in enumerate(gnd):
        ok = np.asarray(entry["ok"], dtype=np.int64)
        junk = np.asarray(entry.get("junk", []), dtype=np.int64)
        places.append((query_positions(ranks[:, i], ok), query_positions(ranks[:, i], junk), ok.size))
    scores = _scores(places, kappas)
    aps = np.array(scores["aps"])
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for i, (ok_places, junk_places, num_ok) in enumerate(places):
        if num_ok:
            prs[i] = precision_at(_without_junk(ok_places, junk_places), kappas)
    return scores["map"], aps, np.array(list(scores["mp_at_k"].values())), prs


def revisited_scores(places: Sequence[dict[int, int]], gnd: Sequence[dict[str, Any]],
                     kappas: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, Any]]:
    """mAP and mP@k of the three setups, from each query's ranking places of its easy, hard and junk images
    (``places[i]``: database index -> 0-based place; :func:`simpool.evaluation.search.ranking_positions`)."""
    out = {}
    for setup, (ok_keys, junk_keys) in SETUPS.items():
        per_query = []
        for where, entry in zip(places, gnd, strict=True):
            ok = np.unique(np.concatenate([np.asarray(entry[k], dtype=np.int64) for k in ok_keys]))
            junk = np.unique(np.concatenate([np.asarray(entry[k], dtype=np.int64) for k in junk_keys]))
            per_query.append((np.array([where[int(r)] for r in ok], dtype=np.int64),
                              np.array([where[int(r)] for r in junk], dtype=np.int64), ok.size))
        out[setup] = _scores(per_query, kappas)
    return out
