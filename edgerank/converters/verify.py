"""Score real query-document pairs with the full-precision source and the converted model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgerank.converters.sample import SAMPLE
from edgerank.metrics import kendall_tau, precision_at_k_vs, spearman

DL19 = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl19"

def sample_pairs(n_queries: int = 4, per_query: int = 16) -> list[tuple[str, list[str]]]:
    """``n_queries`` DL19 queries with their top BM25 candidates, else the built-in sample
    (``edgerank/converters/sample.py``: 64 pairs, relevant and irrelevant passages per query)."""
    if not DL19.is_dir():
        return SAMPLE
    from edgerank.datasets import load_beir, load_run

    coll = load_beir(DL19)
    run = load_run(DL19 / "run.bm25.top100.trec")
    return [(coll.queries[q], [coll.corpus[d] for d, _ in run[q][:per_query]]) for q in sorted(run)[:n_queries]]


def compare(reference, converted, pairs) -> dict:
    """Agreement of two Rerankers over ``pairs``: rank correlations, top-10, differences.

    Spearman alone misleads where the source's scores nearly tie (a 0.03 difference can
    reorder scores 0.01 apart), so the report also carries Kendall's tau-b and
    ``diff_over_spread``: the RMS score difference over the standard deviation of the
    source's scores, 0 for a perfect copy, about 1.4 for unrelated scores."""
    return agreement(scores(reference, pairs), scores(converted, pairs))


def scores(reranker, pairs) -> list[np.ndarray]:
    """``reranker``'s scores of each query's documents in ``pairs``."""
    return [np.asarray(reranker.score(query, docs)) for query, docs in pairs]


def agreement(reference: list[np.ndarray], converted: list[np.ndarray]) -> dict:
    """:func:`compare`'s figures from the two models' per-query scores."""
    agree = [precision_at_k_vs(list(np.argsort(-b, kind="stable")), list(np.argsort(-a, kind="stable")), 10)
             for a, b in zip(reference, converted)]
    ref, got = np.concatenate(reference), np.concatenate(converted)
    return {
        "pairs": int(len(ref)),
        "spearman": spearman(ref, got),
        "pearson": float(np.corrcoef(ref, got)[0, 1]),
        "topk_agreement": float(np.mean(agree)),
        "kendall_tau_b": kendall_tau(ref, got),
        "max_abs_diff": float(np.max(np.abs(ref - got))),
        "diff_over_spread": float(np.sqrt(np.mean((ref - got) ** 2)) / max(float(np.std(ref)), 1e-12)),
    }


FIT_SPEARMAN = 0.95  # an extra form must rank the sample like the artifact's own to be run unasked


def form_fit(artifact: Path, family: str, own: str, form: str) -> dict:
    """Whether ``form`` of an artifact ranks like its ``own`` form on the built-in sample
    (unpruned): int8 activations, one scale per chunk, wreck a model whose activations have
    outlier channels (SmolLM2: Spearman 0.29; MiniLM: 0.996, RESULTS §18.4), so each
    model's int8 form is checked at conversion and offered only where it holds."""
    from edgerank.api import Reranker

    def sample_scores(compute: str) -> list[np.ndarray]:
        # one form at a time, its layers streamed: a 3B model's two forms resident at once
        # took the conversion to 6,250 MB (RESULTS §13.1)
        with Reranker(artifact, family=family, pruning=False, compute=compute, verify=False,
                      stream_weights=True) as r:
            return scores(r, SAMPLE)

    figures = agreement(sample_scores(own), sample_scores(form))
    return {"spearman": round(figures["spearman"], 4), "kendall_tau_b": round(figures["kendall_tau_b"], 4),
            "pairs": figures["pairs"], "fit": figures["spearman"] >= FIT_SPEARMAN}
