"""Pruning out of sample (issue 45.4): a calibrated artifact's pruned top K against its own
unpruned top K, on queries the calibration never saw.

    python bench/pruning_holdout.py ARTIFACT --data ../shared/data/trec-dl19 --depth 100 --top-k 10

Each query runs twice on one loaded model, pruning on (the manifest's calibrated setting
for this K) and off; prints mean P@K of the pruned top K against the unpruned one, the
share of queries below it, and the work skipped (``stats.extra["work_skipped"]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from edgerank import Reranker
from edgerank.bench.runner import load_queries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--top-k", type=int, default=10)
    args = p.parse_args(argv)
    queries, _ = load_queries(args.data, args.queries, args.depth)
    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    agree, skipped = [], []
    with Reranker(args.artifact) as pruned, Reranker(args.artifact, pruning=False) as full:
        for q in tqdm(queries, desc="queries"):
            docs = [t for _, t in q["docs"]]
            a = pruned.rank(q["query"], docs, top_k=args.top_k)
            b = full.rank(q["query"], docs, top_k=args.top_k)
            agree.append(len({r.index for r in a} & {r.index for r in b}) / args.top_k)
            skipped.append(a.stats.extra.get("work_skipped", 0.0))
    print(json.dumps({"artifact": args.artifact, "pruning": manifest.get("pruning"), "queries": len(queries),
                      "depth": args.depth, "top_k": args.top_k,
                      "p_at_k_vs_unpruned": statistics.fmean(agree),
                      "queries_below_1": sum(x < 1 for x in agree),
                      "work_skipped": statistics.fmean(skipped)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
