"""A bounded load test of ``python -m edgerank.serve`` on loopback: concurrent clients sending
DL19 queries with 20-100 of their BM25 candidates; answers by status, latency, throughput,
server RSS before and after. One phase per set of server flags, each on the same load:

- ``defaults``: the server's default flags (``--max-queue 16 --timeout 60``);
- ``deep``: ``--max-queue 32 --timeout 600``, a queue as deep as the clients are many;
- ``small``: ``--max-queue 4``, where everything beyond the queue must be a 429.

    python bench/serve_load.py --clients 32 --requests 20 --json out.json
    python bench/serve_load.py --phase defaults= --phase q32='--max-queue 32'

It starts the server itself (one per phase, on a free 127.0.0.1 port) and stops it with SIGTERM.
A phase passes when every answer is a complete 200 or a 429 with Retry-After, the queue
never passes its bound, /health answers afterwards; ``deep`` must answer everything 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
DL19 = ROOT.parent / "shared" / "data" / "trec-dl19"


def load_dl19(path: Path) -> list[tuple[str, list[str]]]:
    """[(query, its BM25 top-100 passages in run order)] for the 43 DL19 queries."""
    corpus = {}
    for line in open(path / "corpus.jsonl", encoding="utf-8"):
        d = json.loads(line)
        corpus[str(d["_id"])] = f"{d.get('title') or ''} {d['text']}".strip()
    queries = {str(q["_id"]): q["text"] for q in map(json.loads, open(path / "queries.jsonl", encoding="utf-8"))}
    run: dict[str, list[tuple[int, str]]] = {}
    for line in open(path / "run.bm25.top100.trec", encoding="utf-8"):
        qid, _, doc, rank, *_ = line.split()
        run.setdefault(qid, []).append((int(rank), doc))
    return [(queries[q], [corpus[d] for _, d in sorted(docs)]) for q, docs in run.items() if q in queries]


def make_requests(data, n: int, lo: int, hi: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        query, docs = rng.choice(data)
        k = rng.randint(lo, min(hi, len(docs)))
        out.append({"model": "edgerank", "query": query, "documents": docs[:k], "top_n": 10})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PHASES = {"defaults": "", "deep": "--max-queue 32 --timeout 600", "small": "--max-queue 4"}


def start_server(args, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "edgerank.serve", "--port", str(port), *flags, "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
    proc.kill()
    raise SystemExit("the server did not come up")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(120)


def rss_mb(proc: subprocess.Popen) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def queue_depth(text: str) -> float:
    m = re.search(r"^edgerank_queue_depth (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def load(url: str, requests: list[dict], clients: int, proc: subprocess.Popen) -> dict:
    """``clients`` concurrent clients, each sending its share of ``requests`` one after another."""
    results: list[dict] = []
    peak = {"rss_mb": rss_mb(proc), "queue_depth": 0.0}
    rss_samples: list[float] = [peak["rss_mb"]]  # the server's RSS every 50 ms: between calls it swings by tens of MB
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(share: list[dict]) -> None:
            for body in share:
                t = time.perf_counter()
                try:
                    r = await http.post(url + "/v1/rerank", json=body)
                    status, payload = r.status_code, r.json()
                    retry_after = r.headers.get("Retry-After")
                except Exception as e:  # a lost request is a finding, not a crash of the bench
                    status, payload, retry_after = f"exception {type(e).__name__}", None, None
                rec = {"status": status, "latency_s": time.perf_counter() - t, "docs": len(body["documents"]),
                       "retry_after": retry_after}
                if status == 200:
                    idx = [x["index"] for x in payload["results"]]
                    rec["complete"] = len(idx) == min(10, len(body["documents"])) and len(set(idx)) == len(idx)
                results.append(rec)

        async def watch() -> None:
            while not stop.is_set():
                rss_samples.append(rss_mb(proc))
                peak["rss_mb"] = max(peak["rss_mb"], rss_samples[-1])
                with_metrics = await http.get(url + "/metrics")
                peak["queue_depth"] = max(peak["queue_depth"], queue_depth(with_metrics.text))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        await asyncio.gather(*(client(requests[i::clients]) for i in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await watcher
    ok = [r for r in results if r["status"] == 200]
    lat = sorted(r["latency_s"] for r in ok)
    every = sorted(r["latency_s"] for r in results)
    codes: dict[str, int] = {}
    for r in results:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    return {
        "requests": len(results), "status_codes": codes, "wall_s": round(wall, 2),
        "ok": len(ok), "incomplete_ok": sum(1 for r in ok if not r["complete"]),
        "throughput_rps": round(len(ok) / wall, 3), "docs_per_s": round(sum(r["docs"] for r in ok) / wall, 1),
        "latency_p50_s": percentile(lat, 0.50), "latency_p95_s": percentile(lat, 0.95),
        "latency_p99_s": percentile(lat, 0.99),
        "latency_p50_p95_all_s": [percentile(every, 0.50), percentile(every, 0.95)],  # 429s included
        "retry_after_s": sorted({int(r["retry_after"]) for r in results if r["retry_after"]}),
        "latency_max_s": round(lat[-1], 3) if lat else None,
        "peak_queue_depth": peak["queue_depth"], "peak_rss_mb": round(peak["rss_mb"], 1),
        "429_without_retry_after": sum(1 for r in results if r["status"] == 429 and not r["retry_after"]),
        # growth vs fluctuation: the median RSS over the first and the last quarter of the run
        "rss_first_quarter_median_mb": round(statistics.median(rss_samples[:max(1, len(rss_samples) // 4)]), 1),
        "rss_last_quarter_median_mb": round(statistics.median(rss_samples[-max(1, len(rss_samples) // 4):]), 1),
        # growth or a plateau: the median of each tenth of the run
        "rss_tenths_median_mb": [round(statistics.median(part), 1) for part in
                                 (rss_samples[i * len(rss_samples) // 10: (i + 1) * len(rss_samples) // 10]
                                  for i in range(10)) if part],
    }


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of sorted ``values``."""
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


def machine() -> dict:
    info = {"python": platform.python_version(), "cores_logical": os.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False)}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for key in ("Model name", "Flags"):
            m = re.search(rf"^{key}:\s*(.*)$", lscpu, re.M)
            if m:
                info[key.lower().replace(" ", "_")] = m.group(1).strip()
    except OSError:
        pass
    return info


def run_phase(args, data, flags: list[str], seed: int) -> dict:
    """One server with ``flags``: warm-up, RSS, the load, RSS again, /health, SIGTERM."""
    n = args.clients * args.requests
    proc, url = start_server(args, flags)
    try:
        warm = make_requests(data, args.warmup, args.max_docs, args.max_docs, seed + 1)
        asyncio.run(load(url, warm, min(4, args.warmup), proc))
        rss_before = rss_mb(proc)
        out = asyncio.run(load(url, make_requests(data, n, args.min_docs, args.max_docs, seed), args.clients, proc))
        out.update(flags=" ".join(flags) or "(defaults)", rss_before_mb=round(rss_before, 1),
                   rss_after_mb=round(rss_mb(proc), 1))
        out["rss_growth_mb"] = round(out["rss_after_mb"] - rss_before, 1)
        out["healthy_after"] = httpx.get(url + "/health").status_code == 200
    finally:
        exit_status = stop_server(proc)
    out["exit_after_sigterm"] = exit_status
    return out


def phase_passes(name: str, out: dict, flags: list[str], n: int) -> bool:
    queue = int(flags[flags.index("--max-queue") + 1]) if "--max-queue" in flags else 16
    codes = set(out["status_codes"])
    return (codes <= {"200", "429"} and (codes == {"200"} or name != "deep") and not out["incomplete_ok"]
            and out["healthy_after"] and out["peak_queue_depth"] <= queue + 1
            and not out["429_without_retry_after"] and out["requests"] == n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--min-docs", type=int, default=20)
    p.add_argument("--max-docs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=8, help="requests (largest sizes first) before RSS is read")
    p.add_argument("--model", default=None)
    p.add_argument("--phase", action="append", default=[], metavar="NAME=FLAGS",
                   help=f"a phase and its server flags, repeatable (default: {PHASES})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DL19)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.min_docs, args.warmup) < 1 or args.max_docs < args.min_docs:
        p.error("counts must be positive and --max-docs >= --min-docs")
    phases = dict(item.partition("=")[::2] for item in args.phase) or PHASES

    data = load_dl19(args.data)
    report: dict = {"settings": vars(args) | {"data": str(args.data), "json": str(args.json)},
                    "machine": machine(), "phases": {}}
    ok = True
    for name, flag_text in phases.items():
        flags = shlex.split(flag_text)
        out = run_phase(args, data, flags, args.seed)  # the same load in every phase
        out["pass"] = phase_passes(name, out, flags, args.clients * args.requests)
        ok &= out["pass"]
        report["phases"][name] = out
        print(f"{name}:", json.dumps(out), flush=True)
    report["pass"] = ok
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
