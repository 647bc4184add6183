"""``python -m edgerank.eval``: rerank a first-stage run on judged data and score both.

    python -m edgerank.eval --data ../shared/data/trec-dl19 --model smollm2-135m \\
        --backend llamacpp --depth 100 --json out.json

The first stage is ``--run FILE``, else the ``run.*.trec`` in the data folder, else a
cached BM25 run. Each query's top ``--depth`` candidates are reranked; candidates below
the depth keep their first-stage order after them.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgerank.runtime.extras import require

require("eval", "python -m edgerank.eval")

from tqdm.auto import tqdm

from edgerank import Reranker
from edgerank.data.judged import bm25_run, check_run, find_run, load_beir, load_run
from edgerank.errors import DataError
from edgerank.runtime.memory import process_peak_mb
from edgerank.metrics import evaluate, ndcg_at_k


def run_eval(data: str | Path, model: str | None = None, backend: str | None = None,
             depth: int = 100, queries: int | None = None, run_file: str | Path | None = None,
             options: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Rerank and evaluate; returns the report that ``--json`` writes."""
    coll = load_beir(data)
    run_path = Path(run_file) if run_file else find_run(data)
    first = load_run(run_path) if run_path else bm25_run(coll, depth=max(depth, 100))
    qids = [q for q in first if q in coll.qrels]
    if not qids:
        judged = sum(map(len, coll.qrels.values()))
        raise DataError(f"nothing to evaluate: none of the {len(first)} queries of "
                        f"{run_path or 'the BM25 run'} has a judgment in {coll.path}/qrels "
                        f"({judged} judgments in all). Pruning calibration needs no judgments: "
                        "python -m edgerank.calibrate compares against unpruned rankings.")
    if queries:
        qids = qids[:queries]
    first = {q: first[q] for q in qids}
    check_run(coll, first, qids, depth, run_path or "the BM25 run")
    baseline = evaluate({q: [d for d, _ in first[q]] for q in qids}, coll.qrels)

    t_load = time.perf_counter()
    reranker = Reranker(model=model, backend=backend, **(options or {}))
    load_s = time.perf_counter() - t_load
    reranked, per_query = {}, {}
    pairs = tokens = truncated = 0
    latencies, peaks = [], []
    with reranker:
        for q in tqdm(qids, desc=f"rerank {coll.path.name}", unit="query", disable=not progress):
            cands = [d for d, _ in first[q]][:depth]
            ranking = reranker.rank(coll.queries[q], [coll.corpus[d] for d in cands])
            order = [cands[r.index] for r in ranking] + [d for d, _ in first[q][depth:]]
            reranked[q] = order
            per_query[q] = {"ranking": order[:depth], "scores": [r.score for r in ranking],
                            "ndcg@10": ndcg_at_k(order, coll.qrels[q], 10)}
            s = ranking.stats
            pairs += s.candidates
            tokens += s.tokens
            truncated += len(s.truncated)
            latencies.append(s.wall_s)
            peaks.append(s.peak_rss_mb)
    total_s = float(np.sum(latencies))
    return {
        "baseline": baseline,
        "reranked": evaluate(reranked, coll.qrels),
        "per_query": per_query,
        "stats": {
            "queries": len(qids), "pairs": pairs, "tokens": tokens, "truncated_documents": truncated,
            "load_s": load_s, "rerank_s": total_s, "pairs_per_s": pairs / total_s if total_s else 0.0,
            "latency_ms_median": float(np.median(latencies) * 1000) if latencies else 0.0,
            "peak_rss_mb": max(peaks, default=0.0),
            "max_rss_mb_process": process_peak_mb(),
        },
        "config": {
            "data": str(coll.path), "run": str(run_path) if run_path else "bm25s (cached)",
            "model": str(model), "resolved_model": str(reranker.source.path),
            "family": reranker.spec.family, "backend": reranker.backend_name, "depth": depth,
            "options": options or {}, "machine": f"{platform.processor() or platform.machine()}, "
            f"{platform.system()} {platform.release()}",
        },
    }

