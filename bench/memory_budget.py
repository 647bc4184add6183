"""``max_memory_mb`` against the memory the model really adds, measured from outside.

    python bench/memory_budget.py --model minilm-l6 --factors 1.02,1.5,2,4 --json out.json

For each budget (multiples of the smallest one the runtime accepts for the call) and each
streaming mode, a child process imports everything, reads the passages, and waits. The
parent reads the child's RSS (``/proc/PID/statm``) as the baseline, lets it load the model
with that budget and rank the passages, sampling its RSS every millisecond, and reports the
peak above the baseline: the model-added peak, by the budget's own definition (weights,
embedding cache, hidden states, activations; not the interpreter and libraries loaded
before). The child's own counters are not used.

Passages: the first DL19 query's BM25 top ``--depth`` (100 by default, 8,131 tokens for
``minilm-l6``). ``--artifact PATH`` measures an artifact folder instead of a model name
(the 3B-shaped one of bench/scale_3b.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DL19 = REPO.parent / "shared" / "data" / "trec-dl19"
PAGE = os.sysconf("SC_PAGE_SIZE")

CHILD = r"""
import json, sys
import numpy as np, onnxruntime, tokenizers, psutil  # the libraries, loaded before the baseline
import edgerank
from edgerank.runtime.backends.layerwise import LayerwiseBackend
from edgerank.runtime.budget import MemoryBudgetError
args = json.loads(sys.argv[1])
query, docs = args["query"], args["docs"]
print("ready", flush=True)
sys.stdin.readline()
try:
    with edgerank.Reranker(args["model"], backend="edgerank", **args["options"]) as r:
        ranking = r.rank(query, docs)
        out = {"ok": True, "plan": vars(r._backend.plan), "chunk_tokens": ranking.stats.extra["chunk_tokens"],
               "tokens": ranking.stats.tokens, "self_reported_delta_mb": ranking.stats.rss_delta_mb}
        print("done", flush=True)
        sys.stdin.readline()
except MemoryBudgetError as e:
    out = {"ok": False, "error": str(e)}
    print("done", flush=True)
    sys.stdin.readline()
print(json.dumps(out), flush=True)
"""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def passages(depth: int) -> tuple[str, list[str]]:
    """The first DL19 query and its BM25 top ``depth`` passages."""
    corpus = {}
    for line in open(DL19 / "corpus.jsonl", encoding="utf-8"):
        if line.strip():
            d = json.loads(line)
            corpus[str(d["_id"])] = d["text"]
    queries = {str(q["_id"]): q["text"] for q in map(json.loads, open(DL19 / "queries.jsonl")) if q}
    run: dict[str, list[str]] = {}
    for line in open(DL19 / "run.bm25.top100.trec"):
        parts = line.split()
        if len(parts) >= 6:
            run.setdefault(parts[0], []).append(parts[2])
    qid = next(q for q in run if q in queries)
    return queries[qid], [corpus[d] for d in run[qid][:depth]]


def measure(model: str, options: dict, query: str, docs: list[str], interval_s: float = 0.001) -> dict:
    """Run one child; return its report plus the model-added peak measured from here."""
    payload = json.dumps({"model": model, "options": options, "query": query, "docs": docs})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, payload], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    base = rss_mb(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    peak = base
    os.set_blocking(proc.stdout.fileno(), False)
    buf = ""
    while "done" not in buf:  # sample until the child says the call is over
        peak = max(peak, rss_mb(proc.pid))
        time.sleep(interval_s)
        try:
            buf += proc.stdout.read() or ""
        except (BlockingIOError, TypeError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"child failed (rc {proc.returncode})")
    os.set_blocking(proc.stdout.fileno(), True)
    proc.stdin.write("exit\n")
    proc.stdin.flush()
    rest = buf.split("done", 1)[1] + proc.stdout.read()
    proc.wait()
    report = json.loads(rest.strip().splitlines()[-1])
    report.update(baseline_mb=base, measured_added_mb=peak - base)
    return report


def smallest_budget(model: str, query: str, docs: list[str], stream: bool) -> float:
    """The smallest ``max_memory_mb`` (to 0.5 MB) the runtime accepts for this call, found by
    bisection on its own planning (no model run)."""
    import edgerank
    from edgerank.runtime.budget import MemoryBudgetError

    with edgerank.Reranker(model, backend="edgerank", stream_weights=stream) as r:
        b = r._backend
        batch = edgerank.runtime.tokenization.encode_pairs(r.spec, b.tokenizer, query, docs)
        unique, _ = edgerank.runtime.tokenization.distinct(batch)

        def accepted(budget: float) -> bool:
            from edgerank.runtime.budget import plan_load, tokenizer_mb

            try:
                tok = tokenizer_mb((b.artifact.path / "tokenizer.json").stat().st_size, b.tokenizer.vocab_size)
                b.plan, b.max_memory_mb = plan_load(b.shape, budget, stream, tok), budget
                b.plan_chunk(unique)
                return True
            except MemoryBudgetError:
                return False

        lo, hi = 1.0, 1.0
        while not accepted(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 0.5:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if accepted(mid) else (mid, hi)
        return hi


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--factors", default="1.02,1.5,2,4", help="budgets as multiples of the smallest accepted")
    p.add_argument("--stream", default="off,on", help="streaming modes to run: off, on or both")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    query, docs = passages(args.depth)
    rows = []
    for mode in args.stream.split(","):
        stream = mode == "on"
        least = smallest_budget(args.model, query, docs, stream)
        for f in map(float, args.factors.split(",")):
            budget = round(least * f, 1)
            r = measure(args.model, {"max_memory_mb": budget, "stream_weights": stream}, query, docs)
            row = {"model": args.model, "stream": stream, "smallest_accepted_mb": least, "budget_mb": budget, **r}
            rows.append(row)
            print(f"{args.model} stream={mode} budget {budget:.1f} MB (smallest {least:.1f}): "
                  + (f"model added {r['measured_added_mb']:.1f} MB ({r['measured_added_mb'] / budget:.2f}x), "
                     f"chunk {r['chunk_tokens']}, self-reported {r['self_reported_delta_mb']:.1f} MB"
                     if r["ok"] else f"refused: {r['error']}"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
