"""Where a layer's time goes, by ONNX Runtime op type: one DL19 query through an artifact
with ONNX Runtime's profiler on every layer session.

    python bench/op_profile.py --model minilm-l6 --compute int8 --json out.json

Prints each op type's share of the time inside ONNX Runtime (summed over layers and
chunks), e.g. ``DynamicQuantizeMatMul`` (the projections) against ``MatMul`` (attention's
two products), ``Softmax``, ``LayerNormalization``, ``Erf`` (GELU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import edgerank
import edgerank.runtime.streaming as streaming
from edgerank.bench.runner import DL19, load_queries
from edgerank.models.cache import cached_artifact
from edgerank.models.supply import resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--compute", default=None, help="int4 or int8 (default: the runtime's choice)")
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--query", type=int, default=1, help="which DL19 query (index)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    queries, _ = load_queries(DL19, args.query + 1, args.depth)
    q = queries[args.query]
    docs = [t for _, t in q["docs"]]
    folder = tempfile.mkdtemp(prefix="edgerank-profile-")
    plain = streaming.session_options

    def profiled(threads: int):
        opts = plain(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(folder) / "layer")
        return opts

    art = cached_artifact(resolve(args.model), "int4", False)
    with edgerank.Reranker(art, pruning=False, compute=args.compute) as warm:
        warm.score(q["query"], docs)  # conversions, caches, the form's measurement: outside the profile
    streaming.session_options = profiled
    with edgerank.Reranker(art, pruning=False, compute=args.compute) as r:
        r.score(q["query"], docs)
        form = r.last_stats.extra["compute"]["form"]
        sessions = [r._backend.layers.get(i) for i in range(r._backend.artifact.n_layers)]
        files = [s.end_profiling() for s in sessions]
    streaming.session_options = plain
    by_op: dict[str, float] = defaultdict(float)
    for f in files:
        for event in json.loads(Path(f).read_text()):
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"] / 1000  # us -> ms
    total = sum(by_op.values())
    rows = sorted(by_op.items(), key=lambda kv: -kv[1])
    print(f"{args.model}, form {form}, DL19 query {q['qid']}, depth {args.depth}: {total:.0f} ms in kernels")
    for op, ms in rows:
        print(f"  {op:28s} {ms:8.1f} ms  {ms / total:6.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "form": form, "qid": q["qid"],
                                               "depth": args.depth, "kernel_ms": dict(rows)}, indent=1))


if __name__ == "__main__":
    main()
