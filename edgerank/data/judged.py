"""Judged retrieval data: BEIR-format folders, TREC run files, and a cached BM25 first stage."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgerank.errors import DataError
from edgerank.models.pull import edgerank_home

# The project's judged and training data: ``../shared/data`` beside the repository.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TREC_DL_NAMES = ("trec-dl", "trec_dl", "dl19", "dl20", "dl21", "msmarco-passage-trec")


@dataclass
class Collection:
    """A BEIR-format collection: texts, queries and graded judgments."""

    path: Path
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(path: str | Path, split: str = "test") -> Collection:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{split}.tsv`` from ``path``."""
    root = Path(path)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / need).is_file():
            raise FileNotFoundError(f"{root} is not a BEIR folder: {need} is missing")
    corpus, queries = load_texts(root)
    qrels: dict[str, dict[str, int]] = {}
    qrels_path = root / f"qrels/{split}.tsv"
    for i, (n, parts) in enumerate(_lines(qrels_path)):
        if i == 0 and not parts[-1].lstrip("-").isdigit():
            continue  # header
        if len(parts) < 3 or not parts[-1].lstrip("-").isdigit():
            raise DataError(f"{qrels_path}:{n}: expected 'query-id corpus-id score' with an integer score, "
                            f"got {' '.join(parts)[:80]!r}")
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[-1])
    return Collection(root, corpus, queries, qrels)


def load_texts(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """The passages (title and text joined) and queries of a BEIR folder, judgments or not."""
    root = Path(path)
    for need in ("corpus.jsonl", "queries.jsonl"):
        if not (root / need).is_file():
            raise FileNotFoundError(f"{root} is not a BEIR folder: {need} is missing")
    corpus = {}
    for where, doc in _jsonl(root / "corpus.jsonl"):
        title = doc.get("title") or ""
        text = _text(where, doc, "text")
        if not isinstance(title, str):
            raise DataError(f"{where}: \"title\" must be a string")
        title = title.strip()
        corpus[_id(where, doc)] = f"{title} {text}".strip() if title else text
    queries = {_id(where, q): _text(where, q, "text") for where, q in _jsonl(root / "queries.jsonl")}
    return corpus, queries


def load_run(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """A TREC run, per query sorted as trec_eval sorts: score descending, then docid descending."""
    run: dict[str, list[tuple[str, float]]] = {}
    for n, parts in _lines(Path(path)):
        if len(parts) < 6:
            raise DataError(f"{path}:{n}: a TREC run line is 'qid Q0 docid rank score tag', got "
                            f"{' '.join(parts)[:80]!r}")
        try:
            score = float(parts[4])
        except ValueError:
            raise DataError(f"{path}:{n}: the score {parts[4]!r} is not a number") from None
        if score != score:
            raise DataError(f"{path}:{n}: the score is NaN")
        run.setdefault(parts[0], []).append((parts[2], score))
    for qid, docs in run.items():
        docs.sort(key=lambda t: t[0], reverse=True)
        docs.sort(key=lambda t: t[1], reverse=True)
    return run


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of each non-blank line of a text file."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line.split()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", object) for each non-blank line of a JSONL file; a line that is not a
    JSON object is a :class:`DataError` naming its file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{where}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _id(where: str, row: dict) -> str:
    if not isinstance(row.get("_id"), (str, int)) or isinstance(row.get("_id"), bool):
        raise DataError(f"{where}: missing \"_id\" (a string)")
    return str(row["_id"])


def _text(where: str, row: dict, key: str) -> str:
    if not isinstance(row.get(key), str):
        raise DataError(f"{where}: missing \"{key}\" (a string)")
    return row[key]


def write_run(run: dict[str, list[tuple[str, float]]], path: Path, tag: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for qid, docs in run.items():
            for rank, (doc, score) in enumerate(docs, 1):
                f.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")


def check_run(coll: Collection, run: dict[str, list[tuple[str, float]]], qids: list[str], depth: int,
              name: str | Path) -> None:
    """Raise :class:`DataError` unless each of ``qids`` is a query of ``coll`` and its first
    ``depth`` documents in ``run`` are in its corpus: a run from another collection is
    refused before any model loads, not found midway."""
    for q in qids:
        missing = [d for d, _ in run[q][:depth] if d not in coll.corpus]
        if q not in coll.queries or missing:
            raise DataError(f"{name} does not match {coll.path}: query {q} "
                            + (f"has {len(missing)} documents not in the corpus, e.g. {missing[0]}" if missing
                               else "is not in queries.jsonl"))


def find_run(path: str | Path) -> Path | None:
    """The ``run.*.trec`` shipped in a collection folder, if exactly one is."""
    runs = sorted(Path(path).glob("run.*.trec"))
    return runs[0] if runs else None


def bm25_run(coll: Collection, depth: int = 100, qids: list[str] | None = None) -> dict[str, list[tuple[str, float]]]:
    """A BM25 first stage over the collection (bm25s), cached under ``$EDGERANK_HOME/bm25``."""
    qids = qids or [q for q in coll.queries if q in coll.qrels]
    key = hashlib.sha256(f"{coll.path.resolve()}|{depth}|{','.join(qids)}".encode()).hexdigest()[:16]
    cache = edgerank_home() / "bm25" / f"{coll.path.name}-{key}.trec"
    if cache.is_file():
        return load_run(cache)
    import bm25s

    ids = list(coll.corpus)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([coll.corpus[i] for i in ids], stopwords="en", show_progress=False),
                    show_progress=False)
    tokens = bm25s.tokenize([coll.queries[q] for q in qids], stopwords="en", show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=min(depth, len(ids)), show_progress=False)
    run = {q: [(ids[d], float(s)) for d, s in zip(docs[n], scores[n])] for n, q in enumerate(qids)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    write_run(run, tmp, "bm25s")
    tmp.replace(cache)
    return run


def is_trec_dl(path: str | Path) -> bool:
    """Whether a path names a TREC Deep Learning collection (evaluation only, never training)."""
    return any(n in part.lower() for part in Path(path).resolve().parts for n in TREC_DL_NAMES)
