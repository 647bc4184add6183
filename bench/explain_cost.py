"""What explaining costs: rank(..., explain=True) for the top 1, 5, 10 against the same
calls without it, and against generating for every candidate (what a reasoning reranker
without pruning pays).

    PYTHONPATH=. .venv/bin/python bench/explain_cost.py --model smollm2-135m --queries 3 --depth 100 \\
        --tokens 32 --all-queries 1 --json bench/results/explain-cost.json

One Reranker (edgerank backend, the model's int4 artifact). Per DL19 query: for each K,
the plain call and the explaining call, order alternating per query; then, on the first
``--all-queries`` queries, ``top_k=None, explain=True`` (every candidate explained).
Printed: per setting the median call time, explain time, tokens generated and candidates
explained, and three real outputs (query, document, explanation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgerank import Reranker
from edgerank.bench.runner import load_queries

DL19 = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl19"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DL19)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--ks", default="1,5,10")
    ap.add_argument("--tokens", type=int, default=32, help="explain_tokens")
    ap.add_argument("--all-queries", type=int, default=1, help="queries on which every candidate is explained")
    ap.add_argument("--decode-rows", type=int, default=None,
                    help="candidates decoded together (backends/generate.DECODE_ROWS; 1: one at a time)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.decode_rows is not None:
        from edgerank.runtime.backends import generate

        generate.DECODE_ROWS = args.decode_rows
    ks = [int(k) for k in args.ks.split(",")]
    queries, where = load_queries(args.data, args.queries, args.depth)
    rows: dict[str, list[dict]] = {}
    examples = []
    with Reranker(args.model) as r:
        r.rank(queries[0]["query"], [d for _, d in queries[0]["docs"]][:5], top_k=1, explain=True,
               explain_tokens=2)  # warm-up: sessions, embedding rows
        for qi, q in enumerate(queries):
            docs = [d for _, d in q["docs"]]
            for k in ks:
                for explain in ([False, True] if qi % 2 == 0 else [True, False]):
                    t0 = time.perf_counter()
                    res = r.rank(q["query"], docs, top_k=k, explain=explain, explain_tokens=args.tokens)
                    wall = time.perf_counter() - t0
                    s = res.stats
                    rows.setdefault(f"K={k}{' explain' if explain else ''}", []).append(
                        {"qid": q["qid"], "wall_s": wall, "explain_s": s.explain_s, "tokens": s.explain_tokens,
                         "explained": s.explained, "work_skipped": s.extra.get("work_skipped")})
                    print(f"{q['qid']} K={k} explain={explain}: {wall:.2f} s (explain {s.explain_s:.2f} s, "
                          f"{s.explain_tokens} tokens, {s.explained} explained)", flush=True)
                    if explain and k == 1 and len(examples) < 3:
                        examples.append({"query": q["query"], "document": res[0].document,
                                         "verdict": res[0].explanation.verdict, "explanation": res[0].explanation.text})
            if qi < args.all_queries:
                t0 = time.perf_counter()
                res = r.rank(q["query"], docs, top_k=None, explain=True, explain_tokens=args.tokens)
                wall = time.perf_counter() - t0
                s = res.stats
                rows.setdefault(f"all {len(docs)} explain", []).append(
                    {"qid": q["qid"], "wall_s": wall, "explain_s": s.explain_s, "tokens": s.explain_tokens,
                     "explained": s.explained, "work_skipped": s.extra.get("work_skipped")})
                print(f"{q['qid']} all {len(docs)} explain: {wall:.2f} s (explain {s.explain_s:.2f} s, "
                      f"{s.explain_tokens} tokens, {s.explained} explained)", flush=True)
    print(f"\n{args.model} on {where}, {len(queries)} queries, depth {args.depth}, explain_tokens {args.tokens}\n")
    print("| setting | queries | call s (median) | explain s (median) | tokens generated (median) | explained |")
    print("| --- | --- | --- | --- | --- | --- |")
    summary = {}
    for name, rs in rows.items():
        med = {f: statistics.median(x[f] for x in rs) for f in ("wall_s", "explain_s", "tokens", "explained")}
        summary[name] = med
        print(f"| {name} | {len(rs)} | {med['wall_s']:.2f} | {med['explain_s']:.2f} | {med['tokens']:.0f} | "
              f"{med['explained']:.0f} |")
    for e in examples:
        print(f"\nquery: {e['query']}\ndocument: {e['document'][:300]}\nverdict: {e['verdict']!r}\n"
              f"explanation: {e['explanation']}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"data": str(args.data), "json": str(args.json)},
                                         "summary": summary, "rows": rows, "examples": examples}, indent=1))


if __name__ == "__main__":
    main()
