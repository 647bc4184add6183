"""Score real query-document pairs with the full-precision source and the converted model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgerank.metrics import precision_at_k_vs, spearman

DL19 = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl19"

BUILTIN_SAMPLE = [
    ("how do vaccines train the immune system", [
        "Vaccines expose the immune system to a harmless piece of a pathogen so it learns to respond.",
        "The stock market closed higher on Friday after strong earnings.",
        "Memory B cells keep antibodies ready after a booster shot.",
        "Rivers carry sediment from mountains to the sea.",
    ]),
    ("what is the capital of france", [
        "Paris is the capital and most populous city of France.",
        "Berlin is the capital of Germany.",
        "The Seine flows through Paris.",
        "Croissants are a French pastry.",
    ]),
]


def sample_pairs(n_queries: int = 4, per_query: int = 16) -> list[tuple[str, list[str]]]:
    """``n_queries`` DL19 queries with their top BM25 candidates, else a built-in sample."""
    if not DL19.is_dir():
        return BUILTIN_SAMPLE
    from edgerank.datasets import load_beir, load_run

    coll = load_beir(DL19)
    run = load_run(DL19 / "run.bm25.top100.trec")
    return [(coll.queries[q], [coll.corpus[d] for d, _ in run[q][:per_query]]) for q in sorted(run)[:n_queries]]


def compare(reference, converted, pairs) -> dict:
    """Agreement of two Rerankers over ``pairs``: rank correlation, top-10, max difference."""
    ref, got, agree = [], [], []
    for query, docs in pairs:
        a, b = reference.score(query, docs), converted.score(query, docs)
        ref.append(a)
        got.append(b)
        agree.append(precision_at_k_vs(list(np.argsort(-b, kind="stable")), list(np.argsort(-a, kind="stable")), 10))
    ref, got = np.concatenate(ref), np.concatenate(got)
    return {
        "pairs": int(len(ref)),
        "spearman": spearman(ref, got),
        "pearson": float(np.corrcoef(ref, got)[0, 1]),
        "topk_agreement": float(np.mean(agree)),
        "max_abs_diff": float(np.max(np.abs(ref - got))),
    }
