"""``python -m edgerank.batch``: rerank a whole run file and write the reranked run, in
local processes or on a Ray cluster.

    python -m edgerank.batch run.trec --data ../shared/data/trec-dl19 --out reranked.trec
    python -m edgerank.batch pairs.jsonl --out reranked.trec --workers 2 --threads 1
    python -m edgerank.batch run.trec --data DIR --out reranked.trec --ray auto --workers 8 --threads 4

The input is a TREC run (``qid Q0 docid rank score tag``; texts from the ``--data`` BEIR
folder) or JSON lines of ``{query_id, query, doc_id, text}`` (candidates in file order).
Each query's first ``--depth`` candidates (all by default) are reranked; the output is a
TREC run of them, best first, queries in input order.

Locally it runs ``--workers`` processes of ``--threads`` threads each (one process per
core group). With ``--ray ADDRESS`` (``auto``, ``ray://HOST:10001``, or ``local`` for a
cluster of this machine alone) it runs on Ray Data: one row per query, ``map_batches``
with a stateful scorer (the model loaded once per actor), ``--workers`` actors of
``--threads`` CPUs each. Ray is the scheduler; this module only feeds it and writes.

Every finished query is written at once to ``OUT.parts/`` (atomically), so a job that is
interrupted resumes where it stopped: run the same command again and the queries already
written are not recomputed. The run file is assembled from the parts at the end and
written atomically; then the parts are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerank import Reranker
from edgerank.runtime.backends import BACKENDS
from edgerank.data.judged import load_run, load_texts
from edgerank.cli import check_output, exits_on, option_pair, positive_int, refuse_output_over_inputs, write_atomic
from edgerank.errors import DataError, EdgerankError, OptionError, OutputOverlapError
from edgerank.models.supply import input_paths
from edgerank.runtime.reranker import is_blank

TAG = "edgerank"


@dataclass
class Query:
    """One query of the input and its candidates (already cut to the depth)."""

    qid: str
    text: str
    doc_ids: list[str]
    texts: list[str]


# --- input -------------------------------------------------------------------------------

def read_queries(path: str | Path, data: str | Path | None = None, depth: int | None = None) -> list[Query]:
    """The queries of a TREC run (texts from the BEIR folder ``data``) or of a JSONL file
    of ``{query_id, query, doc_id, text}`` rows, in input order, each cut to ``depth``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().lstrip()
        if first.startswith("{"):
            if data is not None:
                raise DataError(f"{path} is JSON lines with its own texts: --data is for TREC runs")
            queries = _read_jsonl(path)
        else:
            if data is None:
                raise DataError(f"{path} is a TREC run: give --data, the BEIR folder holding its texts")
            queries = _read_trec(path, data)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not queries:
        raise DataError(f"{path} holds no candidates")
    blank = next((q for q in queries if is_blank(q.text)), None)
    if blank is not None:  # before any model loads: nothing could be ranked against it
        raise DataError(f"{path}: query {blank.qid} is empty (only blank, control or format characters): "
                        "there is nothing to rank against")
    if depth:
        for q in queries:
            q.doc_ids, q.texts = q.doc_ids[:depth], q.texts[:depth]
    return queries


def _read_jsonl(path: Path) -> list[Query]:
    out: dict[str, Query] = {}
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, query, doc, text = (row[k] for k in ("query_id", "query", "doc_id", "text"))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: not a {{query_id, query, doc_id, text}} object ({e})") from None
        if not isinstance(query, str) or not isinstance(text, str):
            raise DataError(f"{path}:{n}: query and text must be strings")
        if any(ch.isspace() for ch in f"{qid}{doc}"):
            raise DataError(f"{path}:{n}: query_id and doc_id must hold no whitespace (a TREC run's "
                            f"columns are whitespace-separated): {qid!r}, {doc!r}")
        q = out.setdefault(str(qid), Query(str(qid), query, [], []))
        if q.text != query:
            raise DataError(f"{path}:{n}: query {qid} has two different query texts")
        q.doc_ids.append(str(doc))
        q.texts.append(text)
    return list(out.values())


def _read_trec(path: Path, data: str | Path) -> list[Query]:
    corpus, texts = load_texts(data)
    run = load_run(path)  # sorted as trec_eval reads it: the first-stage order
    out = []
    for qid, docs in run.items():
        missing = [d for d, _ in docs if d not in corpus]
        if qid not in texts or missing:
            raise DataError(f"{path} does not match {data}: query {qid} "
                            + (f"has {len(missing)} documents not in the corpus, e.g. {missing[0]}"
                               if missing else "is not in queries.jsonl"))
        out.append(Query(qid, texts[qid], [d for d, _ in docs], [corpus[d] for d, _ in docs]))
    return out


# --- scoring: the one function every path runs -------------------------------------------

def rerank_query(reranker: Reranker, q: Query) -> str:
    """The query's reranked TREC lines. Scores are written in full (``repr``), so a tie at
    six decimals cannot reorder the run when trec_eval reads it back."""
    if not q.texts:
        return ""
    ranking = reranker.rank(q.text, q.texts)
    return "".join(f"{q.qid} Q0 {q.doc_ids[r.index]} {n} {r.score!r} {TAG}\n" for n, r in enumerate(ranking, 1))


# --- per-query parts: what makes a job resumable -----------------------------------------

class Parts:
    """``OUT.parts/``: one file per finished query, written atomically, plus ``job.json``
    naming the job they belong to (a changed input, model or option starts afresh)."""

    def __init__(self, folder: Path, job: dict[str, Any] | None = None) -> None:
        self.dir = folder
        self.job = job
        self.finished: list[tuple[float, str]] = []  # (when, query id), as this process saw them

    @staticmethod
    def beside(out: Path) -> Path:
        """The parts folder of the run file ``out``."""
        return out.with_name(out.name + ".parts")

    def open(self) -> set[str]:
        """Create or reopen the folder; returns the query ids already finished."""
        stamp = self.dir / "job.json"
        if self.dir.is_dir() and stamp.is_file():
            if json.loads(stamp.read_text()) != self.job:
                raise EdgerankError(f"{self.dir} holds parts of a different job (other input, model or "
                                    "options): remove it, or write to another --out")
        elif self.dir.exists() and any(self.dir.iterdir()):
            raise EdgerankError(f"{self.dir} exists and is not a batch job's parts folder: remove it")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(stamp, json.dumps(self.job, indent=1, sort_keys=True))
        return {json.loads(p.read_text(encoding="utf-8").partition("\n")[0])
                for p in self.dir.glob("*.part")}

    def path(self, qid: str) -> Path:
        return self.dir / (hashlib.sha256(qid.encode()).hexdigest()[:24] + ".part")

    def write(self, qid: str, lines: str) -> None:
        """The query's lines, behind a first line naming it (ids may hold any character)."""
        write_atomic(self.path(qid), json.dumps(qid) + "\n" + lines)
        self.mark(qid)

    def mark(self, qid: str) -> None:
        """Note that ``qid`` is on disk now (a worker process wrote it)."""
        self.finished.append((time.perf_counter(), qid))

    def read(self, qid: str) -> str:
        return self.path(qid).read_text(encoding="utf-8").partition("\n")[2]

    def remove(self) -> None:
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- local processes ---------------------------------------------------------------------

_worker: Reranker | None = None


def _init_worker(model: str | None, backend: str | None, options: dict[str, Any]) -> None:
    global _worker
    _worker = Reranker(model=model, backend=backend, **options)


def _score_in_worker(args: tuple[Query, str]) -> tuple[str, int]:
    q, parts_dir = args
    lines = rerank_query(_worker, q)
    Parts(Path(parts_dir)).write(q.qid, lines)  # by the worker itself: a killed driver loses nothing finished
    return q.qid, len(q.texts)


def _run_local(todo: list[Query], parts: Parts, model: str | None, backend: str | None,
               options: dict[str, Any], workers: int, progress: bool) -> None:
    """Score ``todo`` here (one worker) or in ``workers`` spawned processes."""
    if workers == 1:
        with Reranker(model=model, backend=backend, **options) as reranker:
            for n, q in enumerate(todo, 1):
                parts.write(q.qid, rerank_query(reranker, q))
                _tick(progress, n, len(todo))
        return
    # spawn, not fork: a forked ONNX Runtime or OpenMP pool is not safe to use
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model, backend, options)) as pool:
        for n, (qid, _) in enumerate(pool.imap_unordered(_score_in_worker, [(q, str(parts.dir)) for q in todo]), 1):
            parts.mark(qid)
            _tick(progress, n, len(todo))


def _tick(progress: bool, n: int, total: int) -> None:
    if progress:
        print(f"\r{n}/{total} queries", end="" if n < total else "\n", file=sys.stderr, flush=True)


# --- Ray Data ----------------------------------------------------------------------------

class RayScorer:
    """The stateful scorer of ``map_batches``: each Ray actor builds one, so the model is
    loaded once per actor and reused for every query the actor is given."""

    def __init__(self, model: str | None, backend: str | None, options: dict[str, Any]) -> None:
        self.reranker = Reranker(model=model, backend=backend, **options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        qids, lines, pairs = [], [], []
        for qid, text, doc_ids, texts in zip(batch["query_id"], batch["query"], batch["doc_ids"], batch["texts"]):
            q = Query(str(qid), str(text), [str(d) for d in doc_ids], [str(t) for t in texts])
            qids.append(q.qid)
            lines.append(rerank_query(self.reranker, q))
            pairs.append(len(q.texts))
        return {"query_id": np.array(qids, dtype=object), "lines": np.array(lines, dtype=object),
                "pairs": np.array(pairs)}


def _run_ray(todo: list[Query], parts: Parts, model: str | None, backend: str | None, options: dict[str, Any],
             address: str, workers: int, threads: int, progress: bool) -> float:
    """Score ``todo`` on Ray; returns the seconds spent starting or joining the cluster."""
    import ray

    t0 = time.perf_counter()

    ctx_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    if address == "local":  # a cluster of this machine alone, on loopback, sized for the job
        ray.init(num_cpus=max(workers * threads, os.cpu_count() or 1), _node_ip_address="127.0.0.1", **ctx_args)
    else:
        ray.init(address=address, **ctx_args)
    init_s = time.perf_counter() - t0
    try:
        import ray.data

        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = progress
        # one row per query: a query's candidates are scored in one call, as locally. One
        # block per row too: Ray Data hands the driver whole output blocks, so a block of
        # many queries would come back (and be written) only when all of them were done
        rows = [{"query_id": q.qid, "query": q.text, "doc_ids": q.doc_ids, "texts": q.texts} for q in todo]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        scored = ds.map_batches(RayScorer, fn_constructor_kwargs={"model": model, "backend": backend,
                                                                  "options": options},
                                batch_size=1, batch_format="numpy", num_cpus=threads,
                                # a fixed pool of --workers actors (Ray Data's concurrency=N)
                                compute=ray.data.ActorPoolStrategy(size=workers))
        # results stream back as actors finish them; each is on disk before the next is read
        for row in scored.iter_rows():
            parts.write(str(row["query_id"]), str(row["lines"]))
    finally:
        ray.shutdown()
    return init_s


# --- the command -------------------------------------------------------------------------

def _load_once(run: Path, queries: list[Query], model: str | None, backend: str | None,
               options: dict[str, Any]) -> None:
    """Load the model here first: a bad model or option, or a query the model cannot take
    (too long to leave room for a document), fails before any worker starts, and a model
    converted on first use is converted once, not by every worker at the same time."""
    try:
        reranker = Reranker(model=model, backend=backend, **options)
    except EdgerankError:
        raise
    except (ValueError, TypeError) as e:  # an option's value the backend refuses (threads=0)
        raise OptionError(f"--option: {e}") from None
    with reranker:
        for q in queries:
            try:
                reranker.check_query(q.text)
            except ValueError as e:
                raise DataError(f"{run}: query {q.qid}: {e}") from None


def run_batch(run: str | Path, out: str | Path, data: str | Path | None = None, model: str | None = None,
              backend: str | None = None, depth: int | None = None, options: dict[str, Any] | None = None,
              workers: int = 1, threads: int | None = None, ray_address: str | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Rerank ``run`` into ``out``; returns the job's report (``--report`` writes it)."""
    run, out = Path(run), Path(out)
    check_output(out, run, data, *input_paths(model))
    refuse_output_over_inputs(Parts.beside(out), run, data, *input_paths(model))
    options = dict(options or {})
    if threads is not None:
        options["threads"] = threads
    if ray_address is not None and threads is None:
        raise DataError("--ray needs --threads: the CPUs each actor asks Ray for and uses")
    t0 = time.perf_counter()
    queries = read_queries(run, data, depth)
    # a job is its input, model and options: parts of another job are never mixed in. The
    # thread count is not part of it (the scores do not depend on it), so a job may resume
    # with another --workers/--threads, or move between local processes and Ray
    job = {"input": str(run.resolve()), "input_sha256": _fingerprint(run),
           "data": str(Path(data).resolve()) if data else None, "model": model, "backend": backend,
           "depth": depth, "options": {k: repr(v) for k, v in sorted(options.items()) if k != "threads"}}
    _load_once(run, queries, model, backend, options)
    parts = Parts(Parts.beside(out), job)
    done = parts.open() & {q.qid for q in queries}
    todo = [q for q in queries if q.qid not in done]
    t1 = time.perf_counter()
    cluster_s = 0.0
    if todo:
        if ray_address is not None:
            cluster_s = _run_ray(todo, parts, model, backend, options, ray_address, workers, threads, progress)
        else:
            _run_local(todo, parts, model, backend, options, workers, progress)
    t2 = time.perf_counter()
    missing = [q.qid for q in queries if not parts.path(q.qid).is_file()]
    if missing:
        raise EdgerankError(f"{len(missing)} queries were not written (e.g. {missing[0]}); run again to resume")
    write_atomic(out, "".join(parts.read(q.qid) for q in queries))
    parts.remove()
    pairs = sum(len(q.texts) for q in todo)
    # rerank_s: from the workers' start (model loads included) to the last query written;
    # starting or joining the Ray cluster is counted apart, in cluster_s
    rerank_s = t2 - t1 - cluster_s
    # steady rate: from the first query written to the last, so model loads and actor
    # start-up (paid once per worker, whatever the job's size) are left out
    sizes = {q.qid: len(q.texts) for q in todo}
    steady = 0.0
    if len(parts.finished) > 1:
        (first, _), (last, _) = parts.finished[0], parts.finished[-1]
        steady = sum(sizes[qid] for _, qid in parts.finished[1:]) / (last - first) if last > first else 0.0
    return {"queries": len(queries), "resumed": len(done), "scored": len(todo), "pairs": pairs,
            "setup_s": t1 - t0, "cluster_s": cluster_s, "rerank_s": rerank_s,
            "pairs_per_s": pairs / rerank_s if todo else 0.0, "steady_pairs_per_s": steady,
            "workers": workers, "threads": threads, "ray": ray_address, "out": str(out)}


@exits_on(FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgerank.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="TREC run file (with --data) or JSONL of {query_id, query, doc_id, text}")
    p.add_argument("--out", required=True, help="the reranked TREC run to write (never one of the inputs)")
    p.add_argument("--data", default=None, help="BEIR folder with the texts of a TREC run")
    p.add_argument("--model", default=None, help="built-in name or path (default: the default model)")
    p.add_argument("--backend", default=None, choices=BACKENDS)
    p.add_argument("--depth", type=positive_int, default=None, help="rerank each query's first N candidates (default all)")
    p.add_argument("--option", type=option_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="a Reranker option, e.g. pruning=false; repeatable")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="local processes, or with --ray the number of actors (default 1)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads per process or actor (default: every physical core; needed with --ray)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: auto, ray://HOST:PORT, or local (start one on this machine)")
    p.add_argument("--report", default=None, metavar="JSON", help="also write the job's figures here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.report:  # before the job, not after it
        check_output(args.report, args.run, args.data, *input_paths(args.model), flag="--report")
        if Path(args.report).absolute() == Path(args.out).absolute():
            raise OutputOverlapError(f"--report {args.report} is --out: the report would replace the reranked run")
    if args.ray is not None:
        from edgerank.runtime.extras import require

        require("ray", "python -m edgerank.batch --ray")
    report = run_batch(args.run, args.out, args.data, args.model, args.backend, args.depth, dict(args.option),
                       args.workers, args.threads, args.ray, progress=not args.quiet)
    print(f"{report['queries']} queries ({report['resumed']} already done, {report['scored']} scored), "
          f"{report['pairs']} pairs in {report['rerank_s']:.1f} s ({report['pairs_per_s']:.1f} pairs/s) "
          f"-> {args.out}", file=sys.stderr)
    if args.report:
        write_atomic(args.report, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    # run the module under its own name, so that what workers and Ray actors unpickle
    # (RayScorer, Query, the worker functions) is edgerank.batch's, not __main__'s
    from edgerank.batch import main as _main

    sys.exit(_main())
