"""Recordings of unpruned passes, replayed through the pruning policy.

Each sample query runs once with pruning off, recording every candidate's check score
before every layer. Because a candidate's hidden state never depends on the others,
replaying those scores through :class:`edgerank.runtime.pruning.PruningRun` gives exactly what a
pruned run would return, so a whole grid of settings costs one pass per query.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from edgerank.metrics import spearman
from edgerank.runtime.pruning import PruningPolicy, PruningRun

THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
MIN_DEPTHS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CLUSTERS = (2, 3, 4)  # k of the 1-D k-means: "small k"


@dataclass
class Recording:
    """One query's unpruned pass: head scores ``[L, n]`` (row l: before layer l+1; last
    row: final) and the candidates' own token counts."""

    layer_scores: np.ndarray
    lengths: np.ndarray
    prefix_len: int
    head_scores: np.ndarray | None = None  # the model's own head, where readouts scored the checks


def record(reranker, query: str, documents: list[str]) -> Recording:
    """Run one query unpruned through a ``Reranker(..., pruning=False, record_layers=True)``."""
    out = reranker.rank(query, documents)
    ex = out.stats.extra
    return Recording(ex["layer_scores"], np.asarray(ex["candidate_lengths"]), ex["prefix_tokens"],
                     ex.get("head_layer_scores"))


def simulate(policy: PruningPolicy, rec: Recording, k: int) -> tuple[set[int], float]:
    """The top-K set a pruned run returns, and the fraction of layer x token work it skips."""
    L, n = rec.layer_scores.shape
    run = PruningRun(policy, n, k, L)
    work, full = 0, L * (int(rec.lengths.sum()) + rec.prefix_len)
    for layer in range(L):
        if run.wants_check(layer):
            run.check(layer, rec.layer_scores[layer - 1][run.live])
            if run.done:
                break
        work += int(rec.lengths[run.computing()].sum()) + rec.prefix_len
    tiers = run.tiers()
    final = rec.layer_scores[-1]
    order = np.lexsort((-final, tiers))  # provisional order does not change the set
    return set(order[:k].tolist()), 1.0 - work / full


def replay(policy: PruningPolicy, recs: list[Recording], k: int) -> tuple[list[float], list[float]]:
    """Per recording: P@K of ``policy``'s top K against the unpruned one, and the work it skips."""
    prec, skipped = [], []
    for rec in recs:
        kk = min(k, rec.layer_scores.shape[1])
        truth = set(np.argsort(-rec.layer_scores[-1], kind="stable")[:kk].tolist())
        got, skip = simulate(policy, rec, kk)
        prec.append(len(got & truth) / kk)
        skipped.append(skip)
    return prec, skipped


def evaluate_grid(recs: list[Recording], k: int, exact_order: bool = True,
                  thresholds=THRESHOLDS, min_depths=MIN_DEPTHS, clusters=CLUSTERS) -> list[dict]:
    """Mean P@K (vs unpruned) and work skipped for every setting of the grid."""
    rows = []
    for n_clusters, depth, thr in itertools.product(clusters, min_depths, thresholds):
        policy = PruningPolicy(threshold=thr, min_depth=depth, clusters=n_clusters, exact_order=exact_order)
        prec, skipped = replay(policy, recs, k)
        rows.append({"threshold": thr, "min_depth": depth, "clusters": n_clusters,
                     "precision": float(np.mean(prec)), "min_precision": float(np.min(prec)),
                     "work_skipped": float(np.mean(skipped))})
    return rows


def layer_agreement(recs: list[Recording], k: int) -> list[dict]:
    """Per layer: how well the intermediate head scores already rank like the final ones
    (mean Spearman, and the share of the final top-K inside the layer's top-3K)."""
    L = recs[0].layer_scores.shape[0]
    out = []
    for layer in range(L - 1):
        rho, kept, head = [], [], []
        for rec in recs:
            now, final = rec.layer_scores[layer], rec.layer_scores[-1]
            kk = min(k, len(final))
            rho.append(spearman(now, final))
            if rec.head_scores is not None:
                head.append(spearman(rec.head_scores[layer], final))
            top = set(np.argsort(-final, kind="stable")[:kk].tolist())
            kept.append(len(top & set(np.argsort(-now, kind="stable")[: 3 * kk].tolist())) / kk)
        row = {"before_layer": layer + 1, "spearman": float(np.mean(rho)), "topk_in_top3k": float(np.mean(kept))}
        if head:  # the checks were scored by readouts: the head's own figure beside them
            row["head_spearman"] = float(np.mean(head))
        out.append(row)
    return out
