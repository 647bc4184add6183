"""Real explain=True outputs for the README: the top 1 of the first 10 BM25 candidates of
the first DL19 queries, with at most 32 generated tokens.

    PYTHONPATH=. .venv/bin/python bench/explain_examples.py --model smollm2-135m --json bench/results/explain-examples.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgerank import Reranker
from edgerank.bench.runner import load_queries

DL19 = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl19"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    queries, _ = load_queries(DL19, args.queries, args.depth)
    out = []
    with Reranker(args.model) as r:
        for q in queries:
            res = r.rank(q["query"], [d for _, d in q["docs"]], top_k=1, explain=True, explain_tokens=args.tokens)
            e = res[0].explanation
            out.append({"qid": q["qid"], "query": q["query"], "document": res[0].document, "score": res[0].score,
                        "verdict": e.verdict, "explanation": e.text, "tokens": len(e.token_ids)})
            print(json.dumps(out[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
