"""Two checkouts of edgerank side by side on the same queries: latency, peak RSS, nDCG@10.

    python bench/compare_trees.py OLD_TREE [NEW_TREE] --model minilm-l6 --queries 43 --depth 100

Each tree's ``edgerank`` backend runs in its own worker process (the bench's worker, with
that tree's code first on the path); queries alternate which tree goes first, so drifting
load on the machine falls on both. Used to show a restructure left speed and quality as
they were (issue 27)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from edgerank.bench.runner import Worker, load_queries
from edgerank.data.judged import SHARED_DATA
from edgerank.metrics import ndcg_at_k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=Path(__file__).resolve().parents[1])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--old-model", default=None, help="the old tree's model, where it differs (an artifact it converted)")
    p.add_argument("--new-model", default=None, help="the new tree's model, where it differs")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "trec-dl19")
    p.add_argument("--queries", type=int, default=43)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--compute", default=None, help="the form both trees run (default: each chooses)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    queries, source = load_queries(args.data, args.queries, args.depth)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    models = {"old": args.old_model or args.model, "new": args.new_model or args.model}
    extra = {"compute": args.compute} if args.compute else {}
    workers = {name: Worker(name, {"model": models[name], "backend": "edgerank", **extra}, tree)
               for name, tree in trees.items()}
    rows = {name: {"latency_s": [], "ndcg@10": [], "max_rss_mb": 0.0, "orders": []} for name in trees}
    for i, q in enumerate(queries):
        docs = [d for _, d in q["docs"]]
        for name in (["old", "new"] if i % 2 == 0 else ["new", "old"]):
            out = workers[name].rank(q["query"], docs, args.top_k)
            rows[name]["latency_s"].append(out["latency_s"])
            rows[name]["ndcg@10"].append(ndcg_at_k([q["docs"][j][0] for j in out["order"]], q["qrels"], 10))
            rows[name]["orders"].append(out["order"])
            rows[name]["max_rss_mb"] = max(rows[name]["max_rss_mb"], out["max_rss_mb"])
    for w in workers.values():
        w.stop()
    report = {"model": args.model, "models": models, "data": source, "queries": len(queries), "depth": args.depth,
              "machine": platform.processor() or platform.machine(), "trees": {k: str(v) for k, v in trees.items()}}
    for name, r in rows.items():
        report[name] = {"median_ms": 1000 * statistics.median(r["latency_s"]), "ndcg@10": statistics.mean(r["ndcg@10"]),
                        "peak_rss_mb": r["max_rss_mb"]}
    pairs = [n / o for n, o in zip(rows["new"]["latency_s"], rows["old"]["latency_s"])]
    report["identical_rankings"] = sum(a == b for a, b in zip(rows["new"]["orders"], rows["old"]["orders"]))
    report["new_over_old_latency_median"] = statistics.median(pairs)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
