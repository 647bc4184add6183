"""Pairs per second of ``python -m edgerank.batch`` on DL19: the single-process path with
2 threads against Ray Data with 1 and 2 actors of 1 thread each (a local loopback
cluster), plus the driver's serial cost per query (writing its part file), which bounds
how far more machines can help.

    python bench/batch_scaling.py --queries 43 --depth 100 --json bench/batch-scaling.json

Each configuration runs as its own ``python -m edgerank.batch`` process, one after the
other; the load average is recorded before and after each, since other work on the
machine distorts the figures (run it on a quiet machine: ``uptime`` below ~1.5 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DL19 = ROOT.parent / "shared" / "data" / "trec-dl19"
CONFIGS = {  # name -> batch arguments
    "single-2t": ["--workers", "1", "--threads", "2"],
    "ray-1x1t": ["--ray", "local", "--workers", "1", "--threads", "1"],
    "ray-2x1t": ["--ray", "local", "--workers", "2", "--threads", "1"],
}


def first_queries(n: int, out: Path) -> Path:
    seen: list[str] = []
    keep = []
    for line in (DL19 / "run.bm25.top100.trec").read_text().splitlines():
        qid = line.split()[0]
        if qid not in seen:
            seen.append(qid)
        if len(seen) > n:
            break
        keep.append(line)
    out.write_text("\n".join(keep) + "\n")
    return out


def driver_write_ms(tmp: Path, lines: str, n: int = 200) -> float:
    """Milliseconds the driver spends writing one query's part (atomic, fsynced): the
    serial step every query passes through, whatever the number of machines."""
    sys.path.insert(0, str(ROOT))
    from edgerank.batch import Parts

    parts = Parts(tmp / "probe.parts")
    parts.dir.mkdir()
    t0 = time.perf_counter()
    for i in range(n):
        parts.write(f"q{i}", lines)
    return (time.perf_counter() - t0) / n * 1000


def cpu() -> dict[str, str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: info.get(k, "").strip() for k in ("Model name", "CPU(s)", "Flags")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=43)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    results, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = first_queries(args.queries, tmp / "run.trec")
        for name in args.configs.split(","):
            out, report = tmp / f"{name}.trec", tmp / f"{name}.json"
            cmd = [sys.executable, "-m", "edgerank.batch", str(run), "--data", str(DL19), "--out", str(out),
                   "--depth", str(args.depth), "--quiet", "--report", str(report), *CONFIGS[name]]
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(report.read_text())
            r.update(name=name, command=" ".join(cmd[1:]), wall_s=wall, load_before=load_before,
                     load_after=os.getloadavg())
            results.append(r)
            outputs[name] = out.read_bytes()
            print(f"{name:10s} {r['pairs']} pairs  {r['pairs_per_s']:7.1f} pairs/s  "
                  f"steady {r['steady_pairs_per_s']:7.1f} pairs/s  rerank {r['rerank_s']:6.1f} s  "
                  f"cluster start {r['cluster_s']:5.1f} s  process {wall:6.1f} s  "
                  f"load {load_before[0]:.2f} -> {r['load_after'][0]:.2f}", flush=True)
        one_query = outputs[results[0]["name"]].decode().splitlines(keepends=True)[: args.depth]
        write_ms = driver_write_ms(tmp, "".join(one_query))
    same = len(set(outputs.values())) == 1
    print(f"outputs identical across configurations: {same}; driver write per query {write_ms:.2f} ms")
    if args.json:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({"configs": results, "outputs_identical": same,
                                               "driver_write_ms_per_query": write_ms, "queries": args.queries,
                                               "depth": args.depth, "commit": commit, "cpu": cpu()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
