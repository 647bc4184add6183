"""Training data: ``python -m edgerank.data build-train`` and ``python -m edgerank.data label``.

A training file is JSONL, one query group per line::

    {"query": str, "positive": str | null, "negatives": [str, ...],
     "source": str, "teacher_scores": [float, ...]?}

``positive`` is null for a question that its passages do not answer (SQuAD 2.0's
unanswerable ones); ``teacher_scores`` (added by ``label``, by one teacher or an ensemble
of several) score ``[positive] + negatives`` in that order, or ``negatives`` alone when
there is no positive.

Sources (only ``../shared/data/train/`` and SciFact's train split; a TREC DL path is
refused, since those collections are for evaluation only):

- ``squad``: SQuAD v1.1 in BEIR layout; negatives are half BM25-mined over the corpus,
  half other paragraphs of the same article.
- ``squad2``: SQuAD 2.0 pairs; answerable questions get BM25 negatives from the
  paragraph pool, unanswerable ones keep their on-topic paragraph as a hard negative.
- ``wikiqa``: Bing queries with their positive and same-page negatives (train split).
- ``medquad``: consumer-health questions; answers cut into ~``CHUNK_WORDS``-word chunks,
  the first chunk is the positive, BM25 negatives come from other questions' chunks.
- ``scifact``: claims with their ``qrels/train.tsv`` abstracts, BM25 negatives.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from edgerank.cli import atomic_file
from edgerank.data.judged import is_trec_dl, load_beir

SOURCES = ("squad", "squad2", "wikiqa", "medquad", "scifact")
CHUNK_WORDS = 120


class TrainingDataError(ValueError):
    """A training source that must not or cannot be used."""


def refuse_evaluation_data(path: str | Path) -> None:
    """Raise if ``path`` is a TREC Deep Learning collection: those are never trained on."""
    if is_trec_dl(path):
        raise TrainingDataError(
            f"{path} is a TREC Deep Learning collection: DL19/DL20/DL21 are for validation and "
            "calibration only, never for training. Use ../shared/data/train/ (or SciFact's train split)"
        )


def build_groups(source: str, path: str | Path, negatives: int = 7, max_queries: int | None = None,
                 seed: int = 0) -> list[dict]:
    """Query groups of one source, ``negatives`` negatives each, ``max_queries`` sampled."""
    refuse_evaluation_data(path)
    path = Path(path)
    if source not in SOURCES:
        raise TrainingDataError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such training data")
    rng = random.Random(seed)
    reader = {"squad": _beir, "squad2": _squad2, "wikiqa": _wikiqa, "medquad": _medquad,
              "scifact": _beir}[source]
    groups = reader(path, negatives, max_queries, rng)
    for g in groups:
        g["source"] = source
    return groups


def _sample(items: list, k: int | None, rng: random.Random) -> list:
    return items if k is None or k >= len(items) else rng.sample(items, k)


class _Miner:
    """BM25 over a passage pool, returning hard negatives that are not positives."""

    def __init__(self, passages: list[str]) -> None:
        import bm25s

        self.passages = passages
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)

    def mine(self, queries: list[str], exclude: list[set[str]], k: int) -> list[list[str]]:
        import bm25s

        if not queries:
            return []
        depth = min(len(self.passages), k + 8)
        docs, _ = self._bm25.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                      k=depth, show_progress=False)
        out = []
        for row, skip in zip(docs, exclude):
            texts = [self.passages[d] for d in row if self.passages[d] not in skip]
            out.append(texts[:k])
        return out


def _beir(path: Path, negatives: int, max_queries: int | None, rng: random.Random) -> list[dict]:
    """A BEIR folder's train split (SQuAD, SciFact); ``same_article_negatives.jsonl``
    (SQuAD) supplies half the negatives when present, BM25 the rest."""
    coll = load_beir(path, split="train")
    qids = _sample(sorted(q for q in coll.qrels if q in coll.queries), max_queries, rng)
    same_article = {}
    side = path / "same_article_negatives.jsonl"
    if side.is_file():
        for line in open(side, encoding="utf-8"):
            row = json.loads(line)
            same_article[row["qid"]] = row["negative_ids"]
    ids = list(coll.corpus)
    miner = _Miner([coll.corpus[i] for i in ids])
    positives = [[coll.corpus[d] for d, rel in coll.qrels[q].items() if rel > 0] for q in qids]
    n_bm25 = negatives - negatives // 2 if same_article else negatives
    mined = miner.mine([coll.queries[q] for q in qids], [set(p) for p in positives], negatives)
    groups = []
    for q, pos, bm25 in zip(qids, positives, mined):
        if not pos:
            continue
        negs = bm25[:n_bm25]
        for d in same_article.get(q, []):
            text = coll.corpus.get(d)
            if len(negs) >= negatives:
                break
            if text and text not in negs and text not in pos:
                negs.append(text)
        negs += [t for t in bm25[n_bm25:] if t not in negs][: negatives - len(negs)]
        groups.append({"query": coll.queries[q], "positive": pos[0], "negatives": negs})
    return groups


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TrainingDataError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise TrainingDataError(f"{path}:{n}: a line must be a JSON object")
                yield row


def _pairs_file(path: Path) -> Path:
    return path / "pairs.jsonl" if path.is_dir() else path


def _squad2(path: Path, negatives: int, max_queries: int | None, rng: random.Random) -> list[dict]:
    every = list(_read_jsonl(_pairs_file(path)))
    rows = _sample(every, max_queries, rng)
    pool = sorted({r["passage"] for r in every})
    miner = _Miner(pool)
    mined = miner.mine([r["query"] for r in rows], [{r["passage"]} for r in rows], negatives)
    groups = []
    for r, bm25 in zip(rows, mined):
        if r["label"]:
            groups.append({"query": r["query"], "positive": r["passage"], "negatives": bm25[:negatives]})
        else:  # unanswerable: its own on-topic paragraph is the hardest negative
            groups.append({"query": r["query"], "positive": None,
                           "negatives": [r["passage"]] + bm25[: negatives - 1]})
    return groups


def _wikiqa(path: Path, negatives: int, max_queries: int | None, rng: random.Random) -> list[dict]:
    rows = [r for r in _read_jsonl(_pairs_file(path)) if r.get("split", "train") == "train" and r["negatives"]]
    return [{"query": r["query"], "positive": r["positive"], "negatives": r["negatives"][:negatives]}
            for r in _sample(rows, max_queries, rng)]


def _chunks(text: str, words: int = CHUNK_WORDS) -> list[str]:
    toks = text.split()
    return [" ".join(toks[i: i + words]) for i in range(0, max(len(toks), 1), words)]


def _medquad(path: Path, negatives: int, max_queries: int | None, rng: random.Random) -> list[dict]:
    rows = [r for r in _read_jsonl(_pairs_file(path)) if r.get("positive", "").strip()]
    chunks = [_chunks(r["positive"]) for r in rows]
    pool = sorted({c for cs in chunks for c in cs})
    miner = _Miner(pool)
    picked = _sample(list(range(len(rows))), max_queries, rng)
    mined = miner.mine([rows[i]["query"] for i in picked], [set(chunks[i]) for i in picked], negatives)
    return [{"query": rows[i]["query"], "positive": chunks[i][0], "negatives": negs}
            for i, negs in zip(picked, mined)]


def candidates(group: dict) -> list[str]:
    """A group's passages in scoring order: the positive (if any) first, then the negatives."""
    return ([group["positive"]] if group.get("positive") is not None else []) + list(group["negatives"])


def labels(group: dict) -> list[float]:
    """Binary relevance labels in :func:`candidates` order."""
    return ([1.0] if group.get("positive") is not None else []) + [0.0] * len(group["negatives"])


def label_groups(groups: list[dict], teacher: str | Path | Sequence[str | Path],
                 backend: str | None = None, progress: bool = True,
                 max_length: int | None = None) -> list[dict]:
    """Add ``teacher_scores`` to every group, scored by any edgerank model; ``max_length``
    truncates pairs as the student will see them in training (``--max-length``).

    Several teachers make an ensemble (:func:`ensemble_scores`): each scores every group,
    one model loaded at a time."""
    from edgerank import Reranker

    teachers = [teacher] if isinstance(teacher, (str, os.PathLike)) else list(teacher)
    if not teachers:
        raise ValueError("label needs at least one teacher")
    scored: list[list[list[float]]] = []  # [teacher][group][candidate]
    for name in teachers:
        ranker = Reranker(model=name, backend=backend, max_length=max_length)
        try:
            bar = tqdm(groups, desc=f"label with {name}", unit="query", disable=not progress)
            scored.append([[float(s) for s in ranker.score(g["query"], candidates(g))] for g in bar])
        finally:
            ranker.close()
    for n, g in enumerate(groups):
        g["teacher_scores"] = ensemble_scores([t[n] for t in scored])
    return groups


def ensemble_scores(scores: list[list[float]]) -> list[float]:
    """One group's teacher scores from several teachers' scores of it.

    Teachers score on different scales (a cosine, a logit), so each teacher's scores are
    standardised over the group, averaged with equal weights, and put back on the first
    teacher's scale (its mean and spread over the group): a distillation temperature chosen
    for that teacher still fits. A single teacher's scores are returned unchanged.
    """
    if len(scores) == 1:
        return list(scores[0])
    arr = np.asarray(scores, dtype=np.float64)
    mean, std = arr.mean(axis=1, keepdims=True), arr.std(axis=1, keepdims=True)
    z = np.divide(arr - mean, std, out=np.zeros_like(arr), where=std > 0)
    return (z.mean(axis=0) * std[0] + mean[0]).tolist()


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write rows atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_groups(path: str | Path) -> list[dict]:
    """Read a training JSONL, checking each group's shape."""
    refuse_evaluation_data(path)
    groups = list(_read_jsonl(Path(path)))
    if not groups:
        raise TrainingDataError(f"{path} holds no groups")
    for n, g in enumerate(groups, 1):
        if not isinstance(g.get("query"), str) or not isinstance(g.get("negatives"), list):
            raise TrainingDataError(f"{path}:{n}: a group needs 'query' (str) and 'negatives' (list)")
        if not all(isinstance(p, str) for p in candidates(g)):
            raise TrainingDataError(f"{path}:{n}: 'positive' and every negative must be a str")
        if "teacher_scores" in g and len(g["teacher_scores"]) != len(candidates(g)):
            raise TrainingDataError(f"{path}:{n}: teacher_scores has {len(g['teacher_scores'])} "
                                    f"entries for {len(candidates(g))} passages")
    return groups

