"""Progressive cluster pruning (GRATING/PRISM, arXiv 2510.15620): which candidates can stop.

Before a layer (from ``min_depth`` on), every live candidate is scored with the model's
own head on its intermediate hidden state. Then:

1. the coefficient of variation of the scores; below ``threshold``, prune nothing;
2. 1-D k-means of the scores (``clusters`` groups, contiguous in score order);
3. the *boundary* cluster holds the candidate ranked at the K-th free slot;
4. clusters above it are *selected* (surely in the top-K), clusters below are *dropped*;
   the boundary cluster is *deferred* to later layers;
5. once selected + deferred = K, nothing is left to decide.

A second rule, ``rule="rank"``, keeps the top ``ceil(keep[l] * n)`` live candidates before
each layer ``l`` of its schedule (never fewer than the free top-K slots) and drops the rest.
A third, ``rule="margin"``, drops before each layer ``l`` of its schedule every live
candidate scored more than ``margin[l]`` below the K-th best live score: it cuts deep where
a query's scores are spread and not at all where they are tied, which a fixed fraction
cannot. Calibration fits each rule and writes whichever skips more (issue 32). All three
are pure functions of the scores they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Defaults for an artifact nobody calibrated: cautious, because on the zero-shot built-ins
# the intermediate layers' head scores carry almost no ranking signal before ~70% depth
# (bench/RESULTS.md, section 5). `python -m edgerank.calibrate` finds an artifact's own.
DEFAULT_THRESHOLD = 0.3  # coefficient of variation below which nothing is pruned
DEFAULT_MIN_DEPTH = 0.8  # fraction of the layers computed before the first check
DEFAULT_CLUSTERS = 3
RULES = ("cluster", "rank", "margin")


@dataclass
class Decision:
    """Indices (into the scores given) that are selected, dropped and deferred."""

    selected: np.ndarray
    dropped: np.ndarray
    deferred: np.ndarray
    cv: float


def dispersion(scores: np.ndarray) -> float:
    """Coefficient of variation std/|mean| (0 for fewer than two scores or a zero mean)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 2:
        return 0.0
    mean = abs(float(s.mean()))
    return float(s.std()) / mean if mean > 1e-12 else 0.0


def kmeans_1d(x: np.ndarray, k: int, iters: int = 50) -> np.ndarray:
    """Cluster labels of 1-D points, relabelled so 0 is the highest-scoring cluster.

    Deterministic: centroids start at evenly spaced quantiles. In 1-D, clusters are
    intervals of the sorted scores."""
    x = np.asarray(x, dtype=np.float64)
    k = max(1, min(k, len(np.unique(x))))
    centroids = np.quantile(x, np.linspace(0.0, 1.0, k))
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        labels = np.argmin(np.abs(x[:, None] - centroids[None, :]), axis=1)
        new = np.array([x[labels == c].mean() if np.any(labels == c) else centroids[c] for c in range(k)])
        if np.allclose(new, centroids):
            break
        centroids = new
    rank = np.argsort(-centroids, kind="stable")  # cluster ids by descending centroid
    relabel = np.empty(k, dtype=np.int64)
    relabel[rank] = np.arange(k)
    return relabel[labels]


@dataclass
class PruningPolicy:
    """The GRATING policy's knobs. ``enabled=False`` turns pruning off entirely."""

    threshold: float = DEFAULT_THRESHOLD
    min_depth: float = DEFAULT_MIN_DEPTH  # a fraction of the layers (< 1) or a layer index (>= 1)
    clusters: int = DEFAULT_CLUSTERS
    exact_order: bool = True
    enabled: bool = True
    rule: str = "cluster"  # or "rank": keep the top fraction ``keep[layer]`` of the candidates
    keep: dict[int, float] | None = None  # the rank rule's schedule: layer -> fraction of n kept
    margin: dict[int, float] | None = None  # the margin rule's: layer -> score margin below the K-th

    def first_layer(self, n_layers: int) -> int:
        """The first layer before which candidates are checked."""
        schedule = self.schedule()
        if schedule is not None:
            return min(schedule) if schedule else n_layers + 1
        d = self.min_depth
        return max(1, int(round(d * n_layers)) if d < 1 else int(d))

    def schedule(self) -> dict[int, float] | None:
        """The per-layer schedule of the rank or margin rule (None for the cluster rule)."""
        if self.rule == "rank":
            return self.keep or {}
        if self.rule == "margin":
            return self.margin or {}
        return None

    def decide(self, scores: np.ndarray, k: int) -> Decision:
        """Split live candidates (``scores``) given ``k`` free top-K slots."""
        n = len(scores)
        everything, nothing = np.arange(n), np.array([], dtype=np.int64)
        if k >= n:
            return Decision(everything, nothing, nothing, 0.0)
        cv = dispersion(positive(scores))
        if cv < self.threshold or k <= 0:
            return Decision(nothing, nothing, everything, cv)
        labels = kmeans_1d(scores, self.clusters)
        kth = np.argsort(-np.asarray(scores), kind="stable")[k - 1]  # the candidate at the last free slot
        boundary = labels[kth]
        return Decision(np.flatnonzero(labels < boundary), np.flatnonzero(labels > boundary),
                        np.flatnonzero(labels == boundary), cv)


class PruningRun:
    """The policy applied over one call's layers: who is live, selected, dropped, and when.

    The layer-wise backend calls :meth:`check` before each layer with the live candidates'
    head scores; the calibration tool replays recorded scores through the same object.
    A candidate's hidden state never depends on its batch-mates, so a replay is exact.
    """

    def __init__(self, policy: PruningPolicy, n: int, k: int, n_layers: int) -> None:
        self.policy, self.n, self.k, self.n_layers = policy, n, min(k, n), n_layers
        self.live = np.arange(n)
        self.selected: list[int] = []
        self.dropped_at = np.full(n, -1)  # layer before which each candidate was dropped
        self.stopped_at = np.full(n, -1)  # selected and stopped (exact_order=False)
        self.steps: list[dict] = []
        self.deciding = policy.enabled and self.k < n
        self.first = policy.first_layer(n_layers) if self.deciding else n_layers + 1
        self.done = False  # exact_order=False and the top-K is known: stop all compute

    def wants_check(self, layer: int) -> bool:
        schedule = self.policy.schedule()
        if schedule is not None:
            return self.deciding and layer in schedule
        return self.deciding and layer >= self.first

    def rank_cut(self, layer: int, scores: np.ndarray) -> Decision:
        """The rank rule before ``layer``: keep the top ``ceil(keep * n)`` (at least the
        free top-K slots), drop the rest; nothing is selected early."""
        free = self.k - len(self.selected)
        r = max(free, int(np.ceil(self.policy.keep[layer] * self.n - 1e-9)))
        order = np.argsort(-np.asarray(scores), kind="stable")
        nothing = np.array([], dtype=np.int64)
        return Decision(nothing, np.sort(order[r:]), np.sort(order[:r]), dispersion(positive(scores)))

    def margin_cut(self, layer: int, scores: np.ndarray) -> Decision:
        """The margin rule before ``layer``: drop every candidate scored more than
        ``margin[layer]`` below the K-th best (free slot) score; nothing is selected early."""
        s = np.asarray(scores, dtype=np.float64)
        free = self.k - len(self.selected)
        kth = np.sort(s)[::-1][min(free, len(s)) - 1]
        out = s < kth - self.policy.margin[layer]
        return Decision(np.array([], dtype=np.int64), np.flatnonzero(out), np.flatnonzero(~out), dispersion(positive(s)))

    def check(self, layer: int, live_scores: np.ndarray) -> Decision:
        """Apply the policy to the live candidates' scores before ``layer``."""
        if self.policy.rule == "rank":
            d = self.rank_cut(layer, live_scores)
        elif self.policy.rule == "margin":
            d = self.margin_cut(layer, live_scores)
        else:
            d = self.policy.decide(live_scores, self.k - len(self.selected))
        sel, drop = self.live[d.selected], self.live[d.dropped]
        self.dropped_at[drop] = layer
        if not self.policy.exact_order:
            self.stopped_at[sel] = layer
        self.selected.extend(sel.tolist())
        self.live = self.live[d.deferred]
        self.steps.append({"layer": layer, "cv": round(d.cv, 4), "selected": int(len(sel)),
                           "dropped": int(len(drop)), "deferred": int(len(self.live))})
        if len(self.live) + len(self.selected) <= self.k:
            self.deciding = False
            if not self.policy.exact_order:
                self.stopped_at[self.live] = layer
                self.done = True
        return d

    def computing(self) -> np.ndarray:
        """Candidates that run through the next layer, in index order."""
        keep = self.live if not self.policy.exact_order else np.concatenate(
            [self.live, np.array(self.selected, dtype=np.int64)])
        return np.sort(keep.astype(np.int64))

    def tiers(self) -> np.ndarray:
        """0 for the top-K (or everything unpruned); 1 + layers missed for dropped ones."""
        return np.where(self.dropped_at >= 0, 1 + self.n_layers - self.dropped_at, 0)


def positive(scores: np.ndarray) -> np.ndarray:
    """Scores moved onto a positive scale for the dispersion test: probabilities and
    expected labels already are; anything with negative values is shifted by its minimum."""
    s = np.asarray(scores, dtype=np.float64)
    return s if s.size == 0 or s.min() >= 0 else s - s.min()
