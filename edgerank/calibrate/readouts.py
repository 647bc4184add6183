"""Fit per-layer readouts without labels (issue 32): the tool half of ``edgerank.runtime.readouts``.

Run the model once, unpruned, over unlabelled (query, passage) groups from training data
(SQuAD questions against their BM25 neighbours, their own paragraph and a few random ones,
for spread), record each layer's pooled states and the final scores, and fit one ridge
regression per layer from the pooled state to the model's **own final score** (or its
logit, where the formula is a sigmoid: the logit is what is linear in the last state).
No labels and no gradients through the model: minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerank.data.judged import Collection, bm25_run, is_trec_dl, load_beir
from edgerank.errors import DataError
from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.readouts import feature_width, features, model_digest, save

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge strength, per sample, on standardised features


# ---- training groups -------------------------------------------------------------------

def training_groups(data: Path, queries: int, per_query: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``queries`` (question, passages) groups from a BEIR folder of training data: each
    question's BM25 top passages, its own paragraph (from the train qrels) and, for spread,
    a quarter random paragraphs. TREC DL sets are refused: they are for measurement."""
    if is_trec_dl(data):
        raise DataError(f"{data} is a TREC DL set; readouts are fitted on training data (../shared/data/train)")
    split = "train" if (data / "qrels" / "train.tsv").is_file() else "test"
    coll: Collection = load_beir(data, split)
    rng = random.Random(seed)
    qids = sorted(q for q in coll.qrels if q in coll.queries)
    qids = rng.sample(qids, min(queries, len(qids)))
    n_random = per_query // 4
    run = bm25_run(coll, depth=per_query, qids=qids)
    ids = list(coll.corpus)
    groups = []
    for q in qids:
        own = [d for d in coll.qrels[q] if d in coll.corpus][:1]
        docs = own + [d for d, _ in run.get(q, []) if d not in own]
        docs = docs[: per_query - n_random]
        docs += [d for d in rng.sample(ids, min(len(ids), n_random + per_query)) if d not in docs][:n_random]
        groups.append((coll.queries[q], [coll.corpus[d] for d in docs]))
    return groups


@dataclass
class StateRecording:
    """One group's unpruned pass: pooled states before layers 1..L-1 ``[L-1, n, H]``, the
    query's (bi-encoders) ``[L-1, H]``, and the final scores ``[n]``."""

    pooled: np.ndarray
    query: np.ndarray | None
    final: np.ndarray
    head: np.ndarray | None = None  # the model's own head scores before layers 1..L-1 [L-1, n]


def record_states(reranker, query: str, documents: list[str]) -> StateRecording:
    """One group through ``Reranker(..., pruning=False, record_layers=True, record_states=True)``."""
    ex = reranker.rank(query, documents).stats.extra
    scores = np.asarray(ex["layer_scores"])  # readouts off: the head's
    return StateRecording(ex["layer_pooled"], ex.get("query_pooled"), scores[-1], scores[:-1])


# ---- fitting ---------------------------------------------------------------------------

def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Ridge regression ``y ~ x @ w + b`` with an unpenalised intercept; ``lam`` is per
    sample on standardised columns (so one grid fits every layer's scale)."""
    x = np.asarray(x, np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    ym = float(np.mean(y))
    a = z.T @ z + lam * len(z) * np.eye(z.shape[1])
    w = np.linalg.solve(a, z.T @ (np.asarray(y, np.float64) - ym)) / sd
    return w, ym - float(mu @ w)


def _spearman_within(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    from edgerank.metrics import spearman

    return float(np.mean([spearman(pred[groups == g], y[groups == g]) for g in np.unique(groups)]))


def fit_layer(x: np.ndarray, y: np.ndarray, groups: np.ndarray, lambdas=LAMBDAS,
              head: np.ndarray | None = None) -> tuple[np.ndarray, float, float, dict]:
    """One layer's readout: the ridge strength that ranks best within held-out groups (a
    fifth of them), refitted on all. Returns (weight, bias, chosen lambda, held-out mean
    within-group Spearman of the readout and, given ``head`` scores, of the head)."""
    ug = np.unique(groups)
    held = np.isin(groups, ug[:: 5]) if len(ug) >= 5 else np.zeros(len(groups), bool)
    best, heldout = lambdas[len(lambdas) // 2], {}
    if held.any() and (~held).any():
        scored = []
        for lam in lambdas:
            w, b = ridge(x[~held], y[~held], lam)
            scored.append((_spearman_within(x[held] @ w + b, y[held], groups[held]), -lam))
        heldout["readout"], best = max(scored)[0], -max(scored)[1]
        if head is not None:
            heldout["head"] = _spearman_within(head[held], y[held], groups[held])
    w, b = ridge(x, y, best)
    return w, b, best, heldout


def target(final: np.ndarray, link: str) -> np.ndarray:
    """What the readouts regress on: the final score, or its logit for a sigmoid formula."""
    if link == "sigmoid":
        p = np.clip(final, 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))
    return np.asarray(final, np.float64)


def link_for(spec, artifact: Artifact) -> str:
    """``sigmoid`` where the score formula is one (yes/no, two-logit classifier)."""
    if spec.score.kind == "yes_no":
        return "sigmoid"
    if spec.score.kind == "classifier":
        return "sigmoid" if artifact.head()["cls_weight"].shape[0] > 1 else "identity"
    return "identity"


def fit_readouts(recs: list[StateRecording], kind: str, link: str, n_layers: int, hidden: int) -> dict:
    """One readout per layer 1..L-1 from the recordings: ``weight [L, F]``, ``bias [L]``,
    ``fitted [L]`` and the chosen ridge strengths."""
    width = feature_width(kind, hidden)
    weight, bias = np.zeros((n_layers, width)), np.zeros(n_layers)
    fitted, lams, heldout = np.zeros(n_layers, bool), {}, {}
    y = np.concatenate([target(r.final, link) for r in recs])
    groups = np.concatenate([np.full(len(r.final), i) for i, r in enumerate(recs)])
    has_head = all(r.head is not None for r in recs)
    for layer in range(1, n_layers):
        x = np.concatenate([features(kind, r.pooled[layer - 1], None if r.query is None else r.query[layer - 1])
                            for r in recs])
        head = np.concatenate([r.head[layer - 1] for r in recs]) if has_head else None
        weight[layer], bias[layer], lams[layer], heldout[layer] = fit_layer(x, y, groups, head=head)
        # a readout that ranks no better than the head on held-out groups is not kept:
        # the check then uses the head, as without readouts
        fitted[layer] = heldout[layer].get("readout", 1.0) > heldout[layer].get("head", -1.0)
    return {"weight": weight, "bias": bias, "fitted": fitted, "lambdas": lams, "heldout": heldout}


def write_readouts(artifact: Artifact, fit: dict, kind: str, link: str, meta: dict) -> Path:
    """Store the readouts in the artifact: the file, its sha256 and size in the manifest's
    ``files`` (so the runtime checks it like every other file), and ``readouts`` meta."""
    path = artifact.path / layout.READOUTS
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save(tmp, fit["weight"], fit["bias"], fit["fitted"], model_digest(artifact), kind, link)
    os.replace(tmp, path)
    mf = artifact.path / layout.MANIFEST
    doc = json.loads(mf.read_text())
    doc["files"][layout.READOUTS] = {"sha256": layout.sha256_file(path), "size": path.stat().st_size}
    doc["readouts"] = {"features": kind, "link": link, "bytes": path.stat().st_size, **meta}
    tmp = mf.with_name(f".{mf.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, mf)
    return path


def fit_artifact(reranker_cls, artifact_path: Path, spec, groups: list[tuple[str, list[str]]], progress=None) -> dict:
    """Record ``groups`` on the artifact, fit its readouts and write them; returns a
    summary (timings, size, per-layer held-out figures)."""
    artifact = Artifact.open(artifact_path, verify=False)
    t0 = time.perf_counter()
    recs = []
    with reranker_cls(artifact_path, backend="edgerank", pruning=False, record_layers=True, record_states=True,
                      readouts=False) as r:
        for query, docs in (progress(groups) if progress else groups):
            recs.append(record_states(r, query, docs))
    t_record = time.perf_counter() - t0
    kind = "biencoder" if spec.kind == "bi-encoder" else "state"
    link = link_for(spec, artifact)
    t1 = time.perf_counter()
    fit = fit_readouts(recs, kind, link, artifact.n_layers, artifact.dims["hidden"])
    t_fit = time.perf_counter() - t1
    meta = {"groups": len(recs), "pairs": int(sum(len(r.final) for r in recs)), "record_s": round(t_record, 1),
            "fit_s": round(t_fit, 2), "lambdas": {str(k): v for k, v in fit["lambdas"].items()},
            "heldout_spearman": {str(k): {a: round(b, 4) for a, b in v.items()} for k, v in fit["heldout"].items()},
            "layers": [int(i) for i in np.flatnonzero(fit["fitted"])]}
    path = write_readouts(artifact, fit, kind, link, meta)
    return {**meta, "features": kind, "link": link, "bytes": path.stat().st_size, "path": str(path)}
