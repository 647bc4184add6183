"""A converted GGUF served by a real ``llama-server --reranking``, against ``edgerank.rank``.

    python bench/llama_server.py smol.gguf --queries 10 --depth 30 [--server PATH] [--out result.json]

Builds ``llama-server`` from the llama.cpp sources vendored in the llama-cpp-python sdist
of the installed version (``pip download --no-binary``, then cmake; cached under
``--build-dir``, default /work/.llama-server-build, outside the repo), unless ``--server``
names one. Serves the GGUF on 127.0.0.1 only, sends each DL19 query with its BM25 top
``--depth`` passages to ``POST /v1/rerank``, and ranks the same passages with
``edgerank.rank`` on the same file (the ``llamacpp`` backend: the file is what both run).
Reports, per query, the Spearman correlation of the two score lists and the largest
|difference| after mapping ``relevance_score`` to edgerank's score (the file's
``edgerank.relevance_score`` says how: ``logit`` -> sigmoid, ``probability`` -> as is),
and the median latency per query of both (server: the HTTP round trip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

DEFAULT_BUILD_DIR = Path("/work/.llama-server-build")


def build_server(build_dir: Path, jobs: int = 2) -> Path:
    """``llama-server`` built from the llama.cpp vendored in the installed llama-cpp-python's sdist."""
    from importlib.metadata import version

    ver = version("llama_cpp_python")
    binary = build_dir / f"build-{ver}" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    build_dir.mkdir(parents=True, exist_ok=True)
    sdist = build_dir / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(build_dir)], check=True)
    src = build_dir / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(build_dir)], check=True)
    build = binary.parent.parent
    # no network at build time (no prebuilt web UI, no HTTPS): the rerank endpoint needs neither
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_CURL=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
    if not binary.is_file():
        raise FileNotFoundError(f"the build finished without {binary}")
    return binary


def _repack_is_safe() -> bool:
    import llama_cpp

    from edgerank.runtime.backends.llamacpp import extra_buffers_are_safe

    return extra_buffers_are_safe(llama_cpp.llama_print_system_info().decode(errors="replace"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``llama-server -m GGUF --reranking`` on 127.0.0.1, stopped on exit."""

    def __init__(self, binary: Path, model: Path, threads: int, log: Path, parallel: int = 1) -> None:
        self.port = _free_port()
        self._log = open(log, "w")
        # llama-server's own defaults (batch sizes, context) but the threads and slots: llama.cpp as users run
        # it. One slot: with several, documents of one request decode in one batch, and on this llama.cpp
        # (0.3.36's) a causal rank-pooled document then comes back wrong (RESULTS §12: 0.31 for 0.86).
        # no weight repacking where llama.cpp would pick its AMX kernels, which crash on the first decode
        # (llama.cpp#20824; the llamacpp backend does the same)
        self.repack = _repack_is_safe()
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(model), "--reranking", "--host", "127.0.0.1", "--port", str(self.port),
             "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "--no-webui",
             *([] if self.repack else ["--no-repack"])],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise TimeoutError(f"llama-server did not come up in 120 s; see {log}")

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        """``relevance_score`` per document, in input order."""
        body = json.dumps({"query": query, "documents": documents, "top_n": len(documents)}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/rerank", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            results = json.loads(r.read())["results"]
        scores = [0.0] * len(documents)
        for item in results:
            scores[item["index"]] = item["relevance_score"]
        return scores

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_edgerank_score(relevance: np.ndarray, kind: str | None) -> np.ndarray:
    """llama-server's relevance_score as edgerank's score (see edgerank/converters/gguf_export.py)."""
    if kind == "logit":
        return 1.0 / (1.0 + np.exp(-relevance))
    if kind == "probability":
        return relevance
    raise ValueError(f"the GGUF does not say what llama-server's relevance_score is ({kind!r}); "
                     "convert it with python -m edgerank.converters ... --to gguf")


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import spearmanr

    import edgerank
    from edgerank.runtime.gguf_header import gguf_metadata

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, nargs="?", help="a GGUF written by python -m edgerank.converters")
    p.add_argument("--server", type=Path, help="a llama-server binary (default: build one)")
    p.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    p.add_argument("--build-only", action="store_true", help="build (or find) llama-server, print its path")
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--depth", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--parallel", type=int, default=1, help="llama-server slots (-np); see Server")
    p.add_argument("--edgerank-model", default=None,
                   help="also time edgerank's default runtime on this model (e.g. the built-in the GGUF came "
                        "from), and its Spearman against the server")
    p.add_argument("--out", type=Path, help="write the figures as JSON")
    args = p.parse_args(argv)
    if args.queries <= 0 or args.depth <= 0 or args.threads <= 0 or args.parallel <= 0:
        p.error("--queries, --depth, --threads and --parallel must be positive")
    binary = args.server or build_server(args.build_dir)
    if not Path(binary).is_file():
        p.error(f"--server {binary}: no such file")
    if args.build_only:
        print(binary)
        return 0
    if args.model is None or not args.model.is_file():
        p.error("give the GGUF to serve")
    kind = gguf_metadata(args.model).get("edgerank.relevance_score")
    queries = _dl19(args.queries, args.depth)

    rows, server_ms, edgerank_ms, runtime_ms = [], [], [], []
    with edgerank.Reranker(args.model, backend="llamacpp") as reranker, \
            _maybe_reranker(args.edgerank_model, reranker.spec.family) as runtime:
        spec = reranker.spec
        log = (args.out or Path("llama-server")).with_suffix(".server.log")
        with Server(Path(binary), args.model, args.threads, log=log, parallel=args.parallel) as server:
            for qid, query, docs in queries:
                docs = [d.rstrip() for d in docs]  # edgerank right-strips documents; the server does not
                server.rerank(query, docs[:2])  # warm-up per query is not counted (first call pays page-ins)
                t0 = time.perf_counter()
                relevance = np.array(server.rerank(query, docs))
                server_ms.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                ranked = reranker.rank(query, docs)
                edgerank_ms.append((time.perf_counter() - t0) * 1e3)
                ours = np.empty(len(docs))
                for r in ranked:
                    ours[r.index] = r.score
                theirs = to_edgerank_score(relevance, kind)
                rows.append({"qid": qid, "spearman": float(spearmanr(theirs, ours).statistic),
                             "max_abs_diff": float(np.max(np.abs(theirs - ours)))})
                line = (f"{qid}: spearman {rows[-1]['spearman']:.4f}  max|d| {rows[-1]['max_abs_diff']:.2e}  "
                        f"server {server_ms[-1]:.0f} ms  edgerank llamacpp {edgerank_ms[-1]:.0f} ms")
                if runtime is not None:
                    runtime.rank(query, docs[:2])  # first call converts/loads; not counted
                    t0 = time.perf_counter()
                    ranked = runtime.rank(query, docs)
                    runtime_ms.append((time.perf_counter() - t0) * 1e3)
                    other = np.empty(len(docs))
                    for r in ranked:
                        other[r.index] = r.score
                    rows[-1]["runtime_spearman"] = float(spearmanr(theirs, other).statistic)
                    line += f"  edgerank {runtime.backend_name} {runtime_ms[-1]:.0f} ms"
                print(line, flush=True)
    result = {
        "model": str(args.model), "relevance_score": kind, "queries": len(rows), "depth": args.depth,
        "threads": args.threads, "server": str(binary), "server_repack": server.repack,
        "spearman_min": min(r["spearman"] for r in rows), "spearman_median": statistics.median(r["spearman"] for r in rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "server_median_ms": statistics.median(server_ms), "edgerank_median_ms": statistics.median(edgerank_ms),
        "per_query": rows,
    }
    if runtime_ms:
        result.update(edgerank_model=args.edgerank_model, runtime_median_ms=statistics.median(runtime_ms),
                      runtime_spearman_median=statistics.median(r["runtime_spearman"] for r in rows))
    print(json.dumps({k: v for k, v in result.items() if k != "per_query"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


def _maybe_reranker(model: str | None, family: str):
    """A Reranker on ``model`` with its default backend, or a null context."""
    import contextlib

    import edgerank

    return edgerank.Reranker(model, family=family) if model else contextlib.nullcontext()


def _dl19(n_queries: int, depth: int, data: Path | None = None) -> list[tuple[str, str, list[str]]]:
    """(qid, query, BM25 top-``depth`` passages) for the first ``n_queries`` judged DL19
    queries, in the order of the shipped BM25 run (as ``python -m edgerank.eval`` takes them)."""
    from edgerank.data.judged import SHARED_DATA, check_run, find_run, load_beir, load_run

    root = data or SHARED_DATA / "trec-dl19"
    coll = load_beir(root)
    run_path = find_run(root)
    if run_path is None:
        raise FileNotFoundError(f"{root} has no run.*.trec BM25 run")
    run = load_run(run_path)
    qids = [q for q in run if q in coll.qrels][:n_queries]
    check_run(coll, run, qids, depth, run_path)
    return [(q, coll.queries[q], [coll.corpus[d] for d, _ in run[q][:depth]]) for q in qids]


if __name__ == "__main__":
    sys.exit(main())
