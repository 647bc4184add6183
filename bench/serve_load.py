"""A bounded load test of ``python -m edgerank.serve`` on loopback: concurrent clients sending
DL19 queries with 20-100 of their BM25 candidates; latency, throughput, errors, server RSS;
then the same load against ``--max-queue 4``, where everything beyond the queue must be a 429.

    python bench/serve_load.py --clients 32 --requests 20 --json out.json

It starts the server itself (one per phase, on a free 127.0.0.1 port) and stops it with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
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


def start_server(args, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "edgerank.serve", "--port", str(port), "--max-queue", str(max_queue),
           "--timeout", str(args.timeout), "--log-level", "warning"]
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
    codes: dict[str, int] = {}
    for r in results:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    return {
        "requests": len(results), "status_codes": codes, "wall_s": round(wall, 2),
        "ok": len(ok), "incomplete_ok": sum(1 for r in ok if not r["complete"]),
        "throughput_rps": round(len(ok) / wall, 3), "docs_per_s": round(sum(r["docs"] for r in ok) / wall, 1),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--min-docs", type=int, default=20)
    p.add_argument("--max-docs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=8, help="requests (largest sizes first) before RSS is read")
    p.add_argument("--model", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="the server's --timeout for phase 1")
    p.add_argument("--small-queue", type=int, default=4, help="--max-queue of phase 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DL19)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.min_docs, args.warmup) < 1 or args.max_docs < args.min_docs:
        p.error("counts must be positive and --max-docs >= --min-docs")

    data = load_dl19(args.data)
    n = args.clients * args.requests
    report: dict = {"settings": vars(args) | {"data": str(args.data), "json": str(args.json)},
                    "machine": machine()}

    # phase 1: a queue deep enough for every client: latency, throughput, RSS after warm-up
    proc, url = start_server(args, max_queue=args.clients)
    try:
        warm = make_requests(data, args.warmup, args.max_docs, args.max_docs, args.seed + 1)
        asyncio.run(load(url, warm, min(4, args.warmup), proc))
        rss_warm = rss_mb(proc)
        phase1 = asyncio.run(load(url, make_requests(data, n, args.min_docs, args.max_docs, args.seed),
                                  args.clients, proc))
        phase1.update(rss_after_warmup_mb=round(rss_warm, 1), rss_end_mb=round(rss_mb(proc), 1))
        phase1["rss_growth_mb"] = round(phase1["rss_end_mb"] - rss_warm, 1)
        phase1["healthy_after"] = httpx.get(url + "/health").status_code == 200
    finally:
        phase1_exit = stop_server(proc)
    phase1["exit_after_sigterm"] = phase1_exit
    report["deep_queue"] = phase1
    print("deep queue:", json.dumps(phase1))

    # phase 2: --max-queue small: beyond it only 429s, nothing lost, the server stays up
    proc, url = start_server(args, max_queue=args.small_queue)
    try:
        phase2 = asyncio.run(load(url, make_requests(data, n, args.min_docs, args.max_docs, args.seed + 2),
                                  args.clients, proc))
        phase2["healthy_after"] = httpx.get(url + "/health").status_code == 200
        phase2["queue_limit"] = args.small_queue
    finally:
        phase2["exit_after_sigterm"] = stop_server(proc)
    report["small_queue"] = phase2
    print("small queue:", json.dumps(phase2))

    ok = (set(phase1["status_codes"]) == {"200"} and not phase1["incomplete_ok"] and phase1["healthy_after"]
          and set(phase2["status_codes"]) <= {"200", "429"} and not phase2["incomplete_ok"]
          and phase2["healthy_after"] and phase2["peak_queue_depth"] <= args.small_queue + 1
          and not phase2["429_without_retry_after"] and phase2["requests"] == n)
    report["pass"] = ok
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
