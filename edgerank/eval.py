"""``python -m edgerank.eval``: rerank a first-stage run on judged data and score both.

    python -m edgerank.eval --data ../shared/data/trec-dl19 --model smollm2-135m \\
        --backend llamacpp --depth 100 --json out.json

The first stage is ``--run FILE``, else the ``run.*.trec`` in the data folder, else a
cached BM25 run. Each query's top ``--depth`` candidates are reranked; candidates below
the depth keep their first-stage order after them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgerank.extras import require

require("eval", "python -m edgerank.eval")

from rich.console import Console  # noqa: E402
from rich.table import Table
from tqdm.auto import tqdm

from edgerank.api import Reranker
from edgerank.backends import BACKENDS
from edgerank.datasets import bm25_run, check_run, find_run, load_beir, load_run
from edgerank.errors import DataError, OutputLocationError, exits_on, option_pair, positive_int, refuse_output_over_inputs
from edgerank.memory import process_peak_mb
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


def check_json_output(out: str | Path, *inputs: str | Path | None) -> None:
    """Refuse a ``--json`` path that is one of the inputs (or a file inside the data
    folder's inputs), a folder, or in a folder that is missing or not writable."""
    out = Path(out)
    refuse_output_over_inputs(out, *inputs)
    data = Path(inputs[0]) if inputs and inputs[0] else None
    if data is not None and data.is_dir() and out.exists():
        # the collection's own files (corpus, queries, qrels, shipped runs) are inputs too
        if any(out.resolve() == f.resolve() for f in data.rglob("*") if f.is_file()):
            raise OutputLocationError(f"--json {out} is a file of the collection {data}: writing there would "
                                      "destroy it; choose another output")
    if out.is_dir():
        raise OutputLocationError(f"--json {out} is a folder; give a file name")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise OutputLocationError(f"--json {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise OutputLocationError(f"--json {out}: not writable")


@exits_on(FileNotFoundError, ValueError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgerank.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="BEIR-format folder")
    p.add_argument("--run", default=None, help="TREC run file (default: run.*.trec in --data, else BM25)")
    p.add_argument("--model", default=None, help="built-in name, path or hf:ORG/NAME (default: the default model)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="default: the model's own (edgerank for built-ins and artifacts)")
    p.add_argument("--depth", type=positive_int, default=100, help="candidates reranked per query, from the top of the run (default 100)")
    p.add_argument("--queries", type=positive_int, default=None, help="only the first N judged queries")
    p.add_argument("--option", type=option_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option, e.g. pruning=False or max_memory_mb=400; repeatable")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the per-query figures and settings here")
    args = p.parse_args(argv)
    if args.json:  # checked before the evaluation, not after it
        check_json_output(args.json, args.data, args.run, args.model)
    report = run_eval(args.data, args.model, args.backend, args.depth, args.queries, args.run, dict(args.option))
    table = Table(title=f"{report['config']['model']} on {report['config']['backend']}, "
                        f"{Path(args.data).name}, depth {args.depth}, {report['stats']['queries']} queries")
    for col in ("", "nDCG@10", "MRR@10", "Recall@100"):
        table.add_column(col, justify="right")
    for name in ("baseline", "reranked"):
        m = report[name]
        table.add_row(name, f"{m['ndcg@10']:.4f}", f"{m['mrr@10']:.4f}", f"{m['recall@100']:.4f}")
    st = report["stats"]
    table.caption = (f"{st['pairs']} pairs, {st['pairs_per_s']:.1f} pairs/s, "
                     f"median {st['latency_ms_median']:.0f} ms/query, peak RSS {st['peak_rss_mb']:.0f} MB")
    Console().print(table)
    if args.json:  # beside it first, renamed into place: a failed write leaves no half file
        out = Path(args.json)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
