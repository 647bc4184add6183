"""Ranking metrics, as trec_eval computes them, and ranking-agreement measures.

A ranking is a list of document ids, best first. Qrels map document id to graded
relevance. Gains are linear (trec_eval's ``ndcg_cut``): DCG = sum rel_i / log2(i + 1).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k with linear gain; the ideal ranking uses every judged document of the query."""
    dcg = sum(max(qrels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((r for r in qrels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10, min_rel: int = 1) -> float:
    """Reciprocal rank of the first document with relevance >= ``min_rel`` in the top k."""
    for i, d in enumerate(ranking[:k]):
        if qrels.get(d, 0) >= min_rel:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 100, min_rel: int = 1) -> float:
    """Share of the documents with relevance >= ``min_rel`` found in the top k."""
    relevant = {d for d, r in qrels.items() if r >= min_rel}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def precision_at_k_vs(ranking: Sequence, reference: Sequence, k: int) -> float:
    """Share of ``ranking``'s top k that is also in ``reference``'s top k (1.0 = same set)."""
    top = list(ranking[:k])
    if not top:
        return 1.0
    return len(set(top).intersection(reference[:k])) / min(k, len(reference)) if reference else 0.0


def topk_overlap(a: Sequence, b: Sequence, k: int) -> float:
    """Jaccard overlap of two rankings' top-k sets."""
    sa, sb = set(a[:k]), set(b[:k])
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists over the same items (ties handled)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("kendall_tau needs two 1-D sequences of equal length")
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), k=1)
    dx, dy = dx[iu], dy[iu]
    concordance = float(np.sum(dx * dy))
    denom = math.sqrt(float(np.sum(dx != 0)) * float(np.sum(dy != 0)))
    return concordance / denom if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2  # ties share their mean rank
        i = j + 1
    return ranks


def evaluate(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@100 over the queries of ``run`` that have qrels."""
    qids = [q for q in run if q in qrels]
    if not qids:
        raise ValueError("no query of the run has relevance judgments")
    return {
        "ndcg@10": float(np.mean([ndcg_at_k(run[q], qrels[q], 10) for q in qids])),
        "mrr@10": float(np.mean([mrr_at_k(run[q], qrels[q], 10) for q in qids])),
        "recall@100": float(np.mean([recall_at_k(run[q], qrels[q], 100) for q in qids])),
        "queries": len(qids),
    }
