"""The rank and margin rules' per-layer schedules fitted on recordings, and the bound: the
most work any policy that cuts by the layer scores' order could skip on them."""

from __future__ import annotations

import numpy as np

from edgerank.calibrate.replay import replay
from edgerank.runtime.pruning import PruningPolicy

RANK_FRACTIONS = (0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1)  # the rank rule's steps
# the margin rule's margins, in units of each layer's score error against the final score
MARGIN_Z = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


def _replay(policy: PruningPolicy, recs, k: int) -> tuple[float, float]:
    """Mean P@K against unpruned and mean work skipped of ``policy`` on recordings."""
    prec, skip = replay(policy, recs, k)
    return float(np.mean(prec)), float(np.mean(skip))


def calibrate_rank(recs, k: int, target_p: float, fractions=RANK_FRACTIONS) -> dict | None:
    """The rank rule's schedule ``{layer: fraction kept}``, greedily: repeatedly lower the
    one layer's fraction by a step that gains the most skipped work per precision lost,
    while mean P@K stays at or above ``target_p``. None if no schedule prunes anything."""
    L = recs[0].layer_scores.shape[0]
    steps = {layer: -1 for layer in range(1, L)}  # index into fractions; -1: no cut
    p_now, s_now = 1.0, 0.0
    while True:
        best = None
        for layer in steps:
            # the next step down that cuts anything (a cut at or above what earlier layers
            # left changes nothing, and must not stop the search)
            for j in range(steps[layer] + 1, len(fractions)):
                keep = {l: fractions[i] for l, i in {**steps, layer: j}.items() if i >= 0}
                p, s = _replay(PruningPolicy(rule="rank", keep=keep), recs, k)
                if p < target_p:
                    break
                if s > s_now + 1e-9:
                    gain = (s - s_now) / (max(p_now - p, 0.0) + 1e-3)
                    if best is None or gain > best[0]:
                        best = (gain, layer, j, p, s)
                    break
        if best is None:
            break
        _, layer, j, p_now, s_now = best
        steps[layer] = j
    keep = {l: fractions[i] for l, i in steps.items() if i >= 0}
    if not keep:
        return None
    return {"rule": "rank", "keep": keep, "precision": p_now, "work_skipped": s_now}


def score_error(recs) -> np.ndarray:
    """Per check (row l-1: before layer l), the spread of the layer's scores' error against
    the final score, both centred per query (only order within a query matters): the root
    mean square over every candidate of the recordings."""
    sq = np.zeros(recs[0].layer_scores.shape[0] - 1)
    count = 0
    for rec in recs:
        s = rec.layer_scores.astype(np.float64)
        centred = s - s.mean(axis=1, keepdims=True)
        sq += ((centred[:-1] - centred[-1]) ** 2).sum(axis=1)
        count += s.shape[1]
    return np.sqrt(sq / max(count, 1))


def calibrate_margin(recs, k: int, target_p: float, zs=MARGIN_Z) -> dict | None:
    """The margin rule's schedule ``{layer: margin}``: from a first layer on, ``z`` times
    that layer's score error (:func:`score_error`). Two knobs, not one per layer, so the
    setting carries to queries it was not fitted on; the pair that skips most while mean
    P@K stays at or above ``target_p``. None if none prunes anything."""
    L = recs[0].layer_scores.shape[0]
    err = score_error(recs)
    best = None
    for first in range(1, L):
        for z in zs:
            margin = {layer: float(z * err[layer - 1]) for layer in range(first, L)}
            p, s = _replay(PruningPolicy(rule="margin", margin=margin), recs, k)
            if p >= target_p and s > 1e-9 and (best is None or s > best["work_skipped"] + 1e-9):
                best = {"rule": "margin", "margin": margin, "z": z, "first": first, "precision": p, "work_skipped": s}
    return best


def _oracle_skip(rec, must: np.ndarray) -> float:
    """Work skipped when, before each layer from 1 on, every live candidate scored below
    the lowest of ``must`` is dropped: the most any cut by the layer's score order can skip
    while keeping ``must``."""
    L, n = rec.layer_scores.shape
    live = np.ones(n, bool)
    full = L * (int(rec.lengths.sum()) + rec.prefix_len)
    work = int(rec.lengths.sum()) + rec.prefix_len  # layer 0 always runs
    for layer in range(1, L):
        s = rec.layer_scores[layer - 1]
        live &= s >= s[must].min()
        work += int(rec.lengths[live].sum()) + rec.prefix_len
    return 1.0 - work / full


def bound(recs, k: int, target_p: float) -> dict:
    """The most work a policy cutting by the layers' score order could skip at mean P@K >=
    ``target_p``: per query, an oracle that keeps exactly the final top-K (or gives up one
    of them, where the precision budget allows, for the query and member that gain most)."""
    base, gains = [], []
    for rec in recs:
        kk = min(k, rec.layer_scores.shape[1])
        top = np.argsort(-rec.layer_scores[-1], kind="stable")[:kk]
        s0 = _oracle_skip(rec, top)
        base.append(s0)
        gains.append(max((_oracle_skip(rec, np.delete(top, j)) - s0 for j in range(kk)), default=0.0) if kk > 1
                     else 0.0)
    # each member given up costs 1/K of one query's precision; spend the budget greedily
    budget = int(np.floor((1.0 - target_p) * k * len(recs) + 1e-9))
    extra = sorted(gains, reverse=True)[:budget]
    return {"work_skipped": float((sum(base) + sum(extra)) / len(recs)), "at_precision_1": float(np.mean(base)),
            "members_given_up": len(extra)}
