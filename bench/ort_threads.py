"""ONNX Runtime thread settings, paired on one artifact: does a setting change latency?

    python bench/ort_threads.py ARTIFACT --queries 10 --depth 100
    python bench/ort_threads.py ARTIFACT --variant spin=session.intra_op.allow_spinning:1 \\
        --variant nospin=session.intra_op.allow_spinning:0 --variant one-thread=;1

Each variant is a Reranker over the same artifact (its int4 form, every layer resident, pruning off),
its layer sessions built with extra session config entries (``KEY:VALUE,...``) and
optionally a thread count after ``;``. All variants are loaded first; then each DL19
query runs on every variant, the order rotating per query, so slow spells of a shared
machine fall on all of them alike. Printed: median seconds per query and the median of
the per-query ratios against the first variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import edgerank.runtime.engines as engines
from edgerank import Reranker
from edgerank.runtime.artifact import Artifact
from edgerank.bench.runner import load_queries

DEFAULT_VARIANTS = ["spin=session.intra_op.allow_spinning:1", "nospin=session.intra_op.allow_spinning:0"]


def parse_variant(text: str) -> tuple[str, list[tuple[str, str]], int | None]:
    name, _, rest = text.partition("=")
    entries, _, threads = rest.partition(";")
    return name, [tuple(e.split(":", 1)) for e in entries.split(",") if e], int(threads) if threads else None


def load(artifact: str, entries: list[tuple[str, str]], threads: int | None) -> Reranker:
    base = engines.session_options

    def options(n: int):
        opts = base(n)
        for key, value in entries:
            opts.add_session_config_entry(key, value)
        return opts

    engines.session_options = options
    try:
        # the artifact's stored form: ONNX Runtime sessions, whatever this CPU would choose
        own = Artifact.open(artifact, verify=False).weights  # its stored form only: the worker verifies it
        return Reranker(artifact, pruning=False, stream_weights=False, threads=threads, compute=own)
    finally:
        engines.session_options = base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/trec-dl19")
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--variant", action="append", help="NAME=KEY:VALUE,...[;THREADS] (repeat)")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    rerankers = {name: load(args.artifact, entries, threads) for name, entries, threads in variants}
    names = list(rerankers)
    queries, _ = load_queries(args.data, args.queries, args.depth)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for i, q in enumerate(queries):
        docs = [text for _, text in q["docs"]]
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            rerankers[name].rank(q["query"], docs)
            seconds[name].append(time.perf_counter() - t0)
    first = seconds[names[0]]
    print(json.dumps({
        "artifact": args.artifact, "queries": len(queries), "depth": args.depth,
        "median_s": {n: round(statistics.median(s), 3) for n, s in seconds.items()},
        f"median_ratio_vs_{names[0]}": {n: round(statistics.median([b / a for a, b in zip(first, s)]), 3)
                                        for n, s in seconds.items()},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
