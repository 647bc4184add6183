"""``python -m edgerank.bench``: latency, peak memory and ranking quality, side by side.

    python -m edgerank.bench --json out.json --plot out.png
    python -m edgerank.bench --model smollm2-135m --full

Configurations (``--configs`` picks a subset):

- ``fp32-reference``: full precision, torch (the anchor);
- ``llamacpp-q4``: the model's 4-bit GGUF, whole model, on llama.cpp (candidates batched);
- ``ort-fp32-graph``, ``ort-int8-graph``: the whole model as one standard ONNX graph
  (``--to onnx-graph``: torch export, and ``quantize_dynamic`` for int8) on ONNX Runtime,
  length-sorted batches of 32 (``edgerank.bench.peers``);
- ``sentence-transformers``: its CrossEncoder / SentenceTransformer (encoders only);
- ``openvino``, ``openvino-int8``: the fp32 graph on OpenVINO at its default precision (bf16
  where the CPU has bf16 hardware), and NNCF-compressed (encoders: int8 weights and
  activations; decoders: int8 weights) (``edgerank.bench.peers``);
- ``ctranslate2-int8``: CTranslate2's int8 encoder (BERT-style encoders only);
- ``onnx-int4-full``: edgerank's int4 artifact (in the form chosen), every candidate through every layer;
- ``edgerank``: the product, with pruning, shared prefix, chunking at their defaults;
- ``edgerank-int4``: the same on the int4 form (what ran before the int8-compute form; what
  a tight memory budget runs);
- ``edgerank-int8``: the same on the int8 form (per-token activation scales on ONNX Runtime:
  what an encoder runs on a VNNI CPU without the ``openvino`` extra);
- ``edgerank-lowmem``: the same with streamed weights under ``--lowmem-mb``.

The first eight are the peers, what a user would run instead; every row is set against the
fastest of them whose top K agrees with fp32's (P@K ≥ ``FAITHFUL``; ``latency_vs_fastest_peer``). The machine's fp32 and int8 matmul peaks
are measured in the same run (:func:`gemm_peaks`), so a row's achieved GFLOP/s on its
layer work reads against them.

Each configuration runs in its own subprocess (its own lifetime peak RSS, see
:func:`edgerank.runtime.memory.process_peak_mb`, and a baseline taken after imports so the
model's own share can be shown).
A warm-up query goes first, then the queries interleave across configurations
(A B C A B C ...), so machine drift hits all of them alike. Every configuration is asked
for the top ``--top-k`` as a user would (``rank(..., top_k=K)``), which is the K that
pruning works towards; nDCG@10 is computed on the ranking returned (K of them).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgerank.data.judged import SHARED_DATA

PEERS = ("fp32-reference", "llamacpp-q4", "ort-fp32-graph", "ort-int8-graph", "sentence-transformers",
         "openvino", "openvino-int8", "ctranslate2-int8")
FAITHFUL = 0.8  # P@K against fp32 a peer needs to count as the fastest peer
CONFIGS = PEERS + ("onnx-int4-full", "edgerank", "edgerank-int4", "edgerank-int8", "edgerank-lowmem")
DL19 = SHARED_DATA / "trec-dl19"
MARK = "@@bench "  # worker replies are the stdout lines with this prefix
CONSISTENCY_QUERIES = 5  # queries whose candidates are also ranked in random subsets (score_drift)


# ---- what each configuration loads -------------------------------------------------------

def prepare(model: str, configs: list[str], progress: bool = True, gguf_quant: str | None = None
            ) -> dict[str, dict]:
    """Each configuration's Reranker arguments; converts (once, cached) what it needs.
    ``llamacpp-q4`` runs a GGUF model as it is, else a ``gguf_quant`` conversion (default:
    :func:`default_gguf_quant`)."""
    from edgerank.models.cache import cached_artifact, cached_gguf, cached_graph
    from edgerank.models.supply import resolve

    source = resolve(model)
    out: dict[str, dict] = {}
    if source.kind == "artifact":  # an artifact (calibrated, say) runs as it is; it has no fp32 or GGUF form
        other = [c for c in configs if c in PEERS]
        if other:
            raise ValueError(f"{model} is an edgerank artifact: {', '.join(other)} need the HF folder or GGUF it "
                             f"came from; run the artifact with --configs onnx-int4-full,edgerank,edgerank-lowmem")
        artifact = source.path
    elif any(c.startswith(("onnx", "edgerank")) for c in configs):
        artifact = cached_artifact(source, "int4", progress)
    for c in configs:
        if c == "fp32-reference":
            out[c] = {"model": str(model), "backend": "reference"}
        elif c == "llamacpp-q4":
            quant = gguf_quant or default_gguf_quant(source)
            gguf = source.path if source.kind == "gguf" else cached_gguf(source, quant, progress)
            out[c] = {"model": str(gguf), "backend": "llamacpp", "family": source.spec.family}
        elif c in ("ort-fp32-graph", "ort-int8-graph"):
            out[c] = {"peer": "ort-graph", "model": str(cached_graph(source, c.split("-")[1], progress))}
        elif c == "sentence-transformers":
            out[c] = ({"peer": "sentence-transformers", "model": str(model)} if source.spec.kind != "decoder"
                      else {"error": "n/a: sentence-transformers runs encoders, not LLM rerankers"})
        elif c in ("openvino", "openvino-int8"):
            out[c] = {"peer": "openvino", "model": str(cached_graph(source, "fp32", progress)),
                      "precision": "int8" if c.endswith("int8") else "default"}
        elif c == "ctranslate2-int8":
            out[c] = ({"peer": "ctranslate2", "model": str(model), "family": source.spec.family}
                      if source.spec.kind != "decoder" and source.kind == "hf"
                      else {"error": "n/a: the CTranslate2 peer runs BERT-style HF encoders"})
        elif c == "onnx-int4-full":
            out[c] = {"model": str(artifact), "backend": "edgerank", "pruning": False}
        elif c == "edgerank":
            out[c] = {"model": str(artifact), "backend": "edgerank"}
        elif c in ("edgerank-int4", "edgerank-int8"):
            out[c] = {"model": str(artifact), "backend": "edgerank", "compute": c.split("-")[1]}
        elif c == "edgerank-lowmem":
            out[c] = {"model": str(artifact), "backend": "edgerank", "stream_weights": True}
        else:
            raise ValueError(f"unknown configuration {c!r}; known: {', '.join(CONFIGS)}")
    return out


def default_gguf_quant(source) -> str:
    """The llama.cpp comparison's quant type: q4_0 for bi-encoders; q4_1 for a model trained
    from a Q4_1 GGUF base (re-quantizing that grid to a K-quant swamps the fine-tuning,
    RESULTS §8, while q4_1 keeps it); q4_k_m otherwise."""
    from gguf import LlamaFileType

    from edgerank.errors import EdgerankError
    from edgerank.models.supply import resolve
    from edgerank.runtime.gguf_header import gguf_metadata
    from edgerank.runtime.sources import FAMILY_FILE

    if source.spec.kind == "bi-encoder":
        return "q4_0"
    made = source.path / FAMILY_FILE
    if source.kind == "hf" and made.is_file():
        base = json.loads(made.read_text()).get("base")
        try:
            base_source = resolve(base, pull=False) if base else None
        except EdgerankError:  # the base is gone or not pulled: nothing to match
            base_source = None
        if base_source is not None and base_source.kind == "gguf" and \
                gguf_metadata(base_source.path).get("general.file_type") == LlamaFileType.MOSTLY_Q4_1:
            return "q4_1"
    return "q4_k_m"


def _size_bytes(model: str) -> int:
    """On-disk size of what a configuration loads (a built-in name resolves to its file)."""
    from edgerank.converters.output import size_on_disk
    from edgerank.models.supply import resolve

    p = Path(model)
    return size_on_disk(p if p.exists() else resolve(model).path)


# ---- the worker: one configuration, one process --------------------------------------------

def worker(spec: dict) -> None:
    """Load one Reranker and answer ranking requests from stdin, one JSON line each."""
    from edgerank import Reranker
    from edgerank.runtime.memory import process_peak_mb, rss_mb

    def reply(obj: dict) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    _import_backend(spec.get("peer") or spec.get("backend"))
    baseline = rss_mb()  # after the libraries, before the model
    t0 = time.perf_counter()
    if spec.get("peer"):
        from edgerank.bench import peers

        reranker = peers.load(spec)
    else:
        reranker = Reranker(**spec)
    reply({"ready": True, "baseline_rss_mb": baseline, "loaded_rss_mb": rss_mb(), "load_s": time.perf_counter() - t0})
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("stop"):
            break
        t = time.perf_counter()
        if spec.get("peer"):  # a peer scores everything; the top K are read off its scores
            scores = reranker.score(req["query"], req["documents"])
            order = np.argsort(-scores, kind="stable")[: req["top_k"]]
            latency = time.perf_counter() - t
            reply({"order": order.tolist(), "scores": scores[order].tolist(), "latency_s": latency, "extra": {},
                   "max_rss_mb": process_peak_mb()})
            continue
        ranking = reranker.rank(req["query"], req["documents"], top_k=req["top_k"])  # the K that prunes
        latency = time.perf_counter() - t
        extra = {k: v for k, v in ranking.stats.extra.items() if k != "layer_scores"}
        reply({"order": [r.index for r in ranking], "scores": [r.score for r in ranking],
               "provisional": [r.provisional for r in ranking],
               "latency_s": latency, "extra": extra, "max_rss_mb": process_peak_mb()})
    reranker.close()
    reply({"done": True, "max_rss_mb": process_peak_mb()})


def _import_backend(backend: str | None) -> None:
    """Import a backend's libraries up front, so the baseline RSS includes them."""
    if backend == "reference":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import edgerank.runtime.backends.reference  # noqa: F401
    elif backend == "llamacpp":
        import llama_cpp  # noqa: F401

        import edgerank.runtime.backends.llamacpp  # noqa: F401
    elif backend == "ort-graph":
        import onnxruntime  # noqa: F401
    elif backend == "sentence-transformers":
        import sentence_transformers  # noqa: F401
    elif backend == "openvino":
        import openvino  # noqa: F401
    elif backend == "ctranslate2":
        import ctranslate2  # noqa: F401
    else:
        import edgerank.runtime.backends.layerwise  # noqa: F401


class Worker:
    """The parent's handle on one configuration's subprocess."""

    def __init__(self, name: str, spec: dict, tree: Path | None = None) -> None:
        """``tree``: run the worker from another checkout of edgerank (its code on the
        path first), to compare two versions side by side (``bench/compare_trees.py``)."""
        self.name = name
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen([sys.executable, "-m", "edgerank.bench", "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=env, cwd=tree)
        self.hello = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"configuration {self.name!r}: worker exited with code {self.proc.wait()}")

    def rank(self, query: str, documents: list[str], top_k: int) -> dict:
        self.proc.stdin.write(json.dumps({"query": query, "documents": documents, "top_k": top_k}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> dict:
        self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
        self.proc.stdin.flush()
        bye = self._read()
        self.proc.wait(timeout=60)
        return bye


# ---- data --------------------------------------------------------------------------------

def load_queries(data: Path | None, n: int | None, depth: int) -> tuple[list[dict], str]:
    """``[{qid, query, docs: [(docid, text)], qrels}]`` from DL19, else the built-in sample."""
    if data is not None and data.is_dir():
        from edgerank.data.judged import check_run, find_run, load_beir, load_run

        coll = load_beir(data)
        run_path = find_run(data)
        if run_path is None:
            raise FileNotFoundError(f"{data} has no first-stage run (run.*.trec) to rerank")
        run = load_run(run_path)
        qids = [q for q in run if q in coll.qrels][: n or None]
        check_run(coll, run, qids, depth, run_path)
        return [{"qid": q, "query": coll.queries[q], "docs": [(d, coll.corpus[d]) for d, _ in run[q][:depth]],
                 "qrels": coll.qrels[q]} for q in qids], str(data)
    from edgerank.converters.sample import SAMPLE

    out = []
    for i, (query, docs) in enumerate(SAMPLE[: n or None]):  # the first three documents answer the query
        out.append({"qid": str(i), "query": query, "docs": [(str(j), d) for j, d in enumerate(docs[:depth])],
                    "qrels": {"0": 2, "1": 2, "2": 2}})
    return out, "built-in sample"


# ---- the run -----------------------------------------------------------------------------

def run_bench(model: str, configs: list[str], queries: list[dict], top_k: int, subset: dict[str, int],
              lowmem_mb: float | None, progress: bool = True, gguf_quant: str | None = None) -> dict[str, Any]:
    """Run every configuration over ``queries``, interleaved; return the JSON report."""
    from tqdm.auto import tqdm

    specs = prepare(model, configs, progress, gguf_quant)
    if "edgerank-lowmem" in specs and lowmem_mb:
        specs["edgerank-lowmem"]["max_memory_mb"] = lowmem_mb
    workers, results, errors = {}, {c: [] for c in configs}, {}
    peaks = gemm_peaks()  # before any worker loads: the machine as quiet as this run gets it
    for c in configs:
        if "error" in specs[c]:
            errors[c] = specs[c]["error"]
            continue
        try:
            workers[c] = Worker(c, specs[c])
            warm = queries[0]
            workers[c].rank(warm["query"], [t for _, t in warm["docs"]], top_k)  # warm-up, not measured
        except Exception as e:  # a configuration that cannot run here is reported, not fatal
            errors[c] = f"{type(e).__name__}: {e}"
            workers.pop(c, None)
    steps = [(qi, c) for qi in range(len(queries)) for c in configs
             if c in workers and qi < subset.get(c, len(queries))]
    for qi, c in tqdm(steps, desc="bench (interleaved)", unit="query", disable=not progress):
        q = queries[qi]
        r = workers[c].rank(q["query"], [t for _, t in q["docs"]], top_k)
        r["qi"] = qi
        results[c].append(r)
    consistency = {c: score_drift(w, queries[:CONSISTENCY_QUERIES], top_k) for c, w in workers.items()}
    finals = {c: w.stop() for c, w in workers.items()}
    hellos = {c: w.hello for c, w in workers.items()}
    rows = summarize(configs, results, finals, hellos, specs, queries, top_k, errors)
    for row in rows:
        if row["name"] in consistency:
            row["score_drift_max"] = consistency[row["name"]]
        if "layer_gflops" in row:
            row["layer_gflops_vs_peak"] = {k: row["layer_gflops"] / v for k, v in peaks.items()}
    return {"configs": rows, "errors": errors, "machine": {**machine(), "gemm_gflops": peaks},
            "settings": {"model": str(model), "top_k": top_k, "queries": len(queries),
                         "depth": max(len(q["docs"]) for q in queries), "subset": subset,
                         "interleaved": True, "warmup_queries": 1, "lowmem_mb": lowmem_mb}}


def score_drift(worker: "Worker", queries: list[dict], top_k: int, subsets: int = 3, seed: int = 0) -> float:
    """Consistency: the largest |Δscore| of a document between a call of all its query's
    candidates (every one scored, nothing pruned) and calls of random subsets of them, in
    random orders and with random K (pruning on, as a user calls it); provisional scores
    (dropped before the last layer) are not compared. 0 for an engine whose scores depend
    on the pair alone, up to float rounding."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for q in queries:
        texts = [t for _, t in q["docs"]]
        full = worker.rank(q["query"], texts, None)
        by_doc = dict(zip(full["order"], full["scores"]))
        for _ in range(subsets):
            pick = rng.permutation(len(texts))[: int(rng.integers(1, len(texts) + 1))]
            got = worker.rank(q["query"], [texts[i] for i in pick], int(rng.integers(1, top_k + 1)))
            for j, (row, score) in enumerate(zip(got["order"], got["scores"])):
                if not (got.get("provisional") or [False] * len(got["order"]))[j]:
                    worst = max(worst, abs(score - by_doc[int(pick[row])]))
    return worst


def summarize(configs: list[str], results: dict[str, list[dict]], finals: dict, hellos: dict, specs: dict,
              queries: list[dict], top_k: int, errors: dict | None = None) -> list[dict]:
    """One row of metrics per configuration from the workers' raw answers."""
    from edgerank.metrics import ndcg_at_k, precision_at_k_vs, topk_overlap

    errors = errors or {}

    def order_ids(r, q):
        return [q["docs"][i][0] for i in r["order"]]

    ref_orders = {r["qi"]: order_ids(r, queries[r["qi"]]) for r in results.get("fp32-reference", [])}
    full_orders = {r["qi"]: order_ids(r, queries[r["qi"]]) for r in results.get("onnx-int4-full", [])}
    rows = []
    for c in configs:
        if c in errors:
            rows.append({"name": c, "error": errors[c]})
            continue
        rs = results[c]
        lat = np.array([r["latency_s"] for r in rs]) * 1000
        pairs = sum(len(queries[r["qi"]]["docs"]) for r in rs)
        orders = {r["qi"]: order_ids(r, queries[r["qi"]]) for r in rs}
        row = {
            "name": c, "queries": len(rs), "options": specs[c],
            "latency_ms_median": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90)),
            "latency_ms_per_query": {int(r["qi"]): float(ms) for r, ms in zip(rs, lat)},
            "pairs_per_s": pairs / (lat.sum() / 1000) if lat.sum() else 0.0,
            "peak_rss_mb": finals[c]["max_rss_mb"], "baseline_rss_mb": hellos[c]["baseline_rss_mb"],
            "model_rss_mb": finals[c]["max_rss_mb"] - hellos[c]["baseline_rss_mb"],
            "load_s": hellos[c]["load_s"], "size_bytes": _size_bytes(specs[c]["model"]),
            "ndcg@10": float(np.mean([ndcg_at_k(o, queries[qi]["qrels"], 10) for qi, o in orders.items()])),
        }
        both = [qi for qi in orders if qi in ref_orders]
        if both:
            row["precision_at_k_vs_fp32"] = float(np.mean([precision_at_k_vs(orders[qi], ref_orders[qi], top_k)
                                                           for qi in both]))
            row["topk_overlap_vs_fp32"] = float(np.mean([topk_overlap(orders[qi], ref_orders[qi], top_k)
                                                         for qi in both]))
            row["ndcg@10_on_fp32_queries"] = float(np.mean([ndcg_at_k(orders[qi], queries[qi]["qrels"], 10)
                                                            for qi in both]))
        same = [qi for qi in orders if qi in full_orders]
        if same and c.startswith("edgerank"):
            row["precision_at_k_vs_unpruned"] = float(np.mean(
                [precision_at_k_vs(orders[qi], full_orders[qi], top_k) for qi in same]))
        row.update(_runtime_figures([r["extra"] for r in rs if r.get("extra")]))
        rows.append(row)
    _add_ratios(rows)
    return rows


def _runtime_figures(extras: list[dict]) -> dict:
    """The edgerank runtime's own figures over a configuration's calls: work skipped, where
    the time goes, the layers' GFLOP/s and the form they ran in."""
    if not extras or "work_skipped" not in extras[0]:
        return {}
    row: dict = {}
    row["work_skipped"] = float(np.mean([e["work_skipped"] for e in extras]))
    row["work_saved_vs_unshared"] = float(np.mean([e["work_saved_vs_unshared"] for e in extras]))
    row["padding_fraction"] = float(np.mean([e["padding_fraction"] for e in extras]))
    row["io_wait_s_mean"] = float(np.mean([e["io_wait_s"] for e in extras]))
    # where a call's time goes: embedding, the layers (inside ONNX Runtime, and the padding,
    # masks and copies between its calls), pruning checks (readout + policy)
    row["stage_ms_median"] = {stage: 1000 * float(np.median([e[f"{stage}_s"] for e in extras]))
                              for stage in ("embed", "ort", "between_calls", "prune")}
    if "layer_gflop" in extras[0]:  # achieved on the layer work: GFLOP run / seconds in ONNX Runtime
        row["layer_gflops"] = (sum(e["layer_gflop"] for e in extras) / max(sum(e["ort_s"] for e in extras), 1e-9))
        row["compute"] = extras[0]["compute"]["form"]
    layers = extras[0]["layers"]
    hist = np.sum([e["layers_per_candidate"] for e in extras], axis=0)
    computed = np.array([hist[i + 1:].sum() for i in range(layers)], dtype=float)  # reached layer i
    row["computed_fraction_per_layer"] = (computed / max(hist.sum(), 1)).tolist()
    return row


def _add_ratios(rows: list[dict]) -> None:
    """Latency ratios are paired: medians over the queries both configurations ran (a
    ``--subset`` configuration ran only the first N), so they compare like with like."""
    by = {r["name"]: r for r in rows if "error" not in r}
    # a peer whose top K is not fp32's is not a choice a user would keep (SmolLM2's int8
    # graph: P@10 0.09 against fp32, RESULTS §18.4)
    peers = [r for name, r in by.items() if name in PEERS and r.get("precision_at_k_vs_fp32", 1.0) >= FAITHFUL]
    if peers:
        fastest = min(peers, key=lambda r: r["latency_ms_median"])
        for r in by.values():
            mine, theirs = r["latency_ms_per_query"], fastest["latency_ms_per_query"]
            both = [qi for qi in mine if qi in theirs]
            r["fastest_peer"] = fastest["name"]
            if both:
                r["latency_vs_fastest_peer"] = (float(np.median([mine[qi] for qi in both]))
                                                / float(np.median([theirs[qi] for qi in both])))
            r["peak_rss_vs_fastest_peer"] = r["peak_rss_mb"] / fastest["peak_rss_mb"]
    for r in by.values():
        for anchor in ("fp32-reference", "llamacpp-q4"):
            if anchor in by:
                a = by[anchor]
                mine, theirs = r["latency_ms_per_query"], a["latency_ms_per_query"]
                both = [qi for qi in mine if qi in theirs]
                if both:
                    r[f"latency_vs_{anchor}"] = (float(np.median([mine[qi] for qi in both]))
                                                 / float(np.median([theirs[qi] for qi in both])))
                    r[f"latency_vs_{anchor}_queries"] = len(both)
                r[f"peak_rss_vs_{anchor}"] = r["peak_rss_mb"] / a["peak_rss_mb"]


def gemm_peaks(threads: int | None = None, m: int = 1024, k: int = 1536, n: int = 1536) -> dict[str, float]:
    """This machine's matmul GFLOP/s at one large compute-bound shape: ONNX Runtime's fp32
    ``MatMul`` and int8 ``DynamicQuantizeMatMul`` (the int8 form's kernels), and, where the
    bf16 form runs, OpenVINO's bf16 matmul: what a row's achieved layer GFLOP/s is read against."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgerank.converters.quantize import quantize_channels
    from edgerank.runtime.compute import median_ms
    from edgerank.runtime.cpu import default_threads, has_bf16
    from edgerank.runtime.engines import OpenVinoLayer, openvino_available, session_options

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    codes, scales = quantize_channels(w)
    graphs = {
        "fp32": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w.T.copy(), "w")]),
        "int8": ([helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"], domain="com.microsoft")],
                 [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scales, "s"),
                  numpy_helper.from_array(np.zeros(n, np.int8), "z")]),
    }
    x = rng.standard_normal((m, k)).astype(np.float32)
    threads = threads or default_threads()
    out = {}
    for name, (nodes, inits) in graphs.items():
        g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                    providers=["CPUExecutionProvider"])
        out[name] = 2 * m * k * n / (median_ms(sess, {"x": x}, 10) / 1000) / 1e9
        if name == "fp32" and openvino_available() and has_bf16():
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "matmul.onnx"
                path.write_bytes(model.SerializeToString())
                out["bf16"] = 2 * m * k * n / (median_ms(OpenVinoLayer(path, threads), {"x": x}, 10) / 1000) / 1e9
    return out


def machine() -> dict:
    import psutil

    from edgerank.runtime.cpu import cpu_id

    return {"cpu": cpu_id(), "physical_cores": psutil.cpu_count(logical=False), "logical_cores": psutil.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "commit": _commit()}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- output ------------------------------------------------------------------------------

def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    s = report["settings"]
    t = Table(title=f"{s['model']}: {s['queries']} queries, depth {s['depth']}, K={s['top_k']}")
    cols = ("config", "queries", "median ms", "p90 ms", "pairs/s", "peak MB", "model MB", "size MB", "nDCG@10",
            "nDCG@10 fp32 qs", f"P@{s['top_k']} vs fp32", "work skipped", "layer GFLOP/s", "score drift",
            "x fp32 lat", "x fastest peer")
    for col in cols:
        t.add_column(col, justify="right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    for r in report["configs"]:
        if "error" in r:
            t.add_row(r["name"], f"[red]{r['error'][:60]}[/]", *[""] * (len(cols) - 2))
            continue
        t.add_row(r["name"], str(r["queries"]), f(r["latency_ms_median"], ".0f"), f(r["latency_ms_p90"], ".0f"),
                  f(r["pairs_per_s"], ".1f"), f(r["peak_rss_mb"], ".0f"), f(r["model_rss_mb"], ".0f"),
                  f(r["size_bytes"] / 2**20, ".0f"), f(r["ndcg@10"], ".4f"), f(r.get("ndcg@10_on_fp32_queries"), ".4f"),
                  f(r.get("precision_at_k_vs_fp32"), ".3f"),
                  f(r.get("work_skipped"), ".1%"), f(r.get("layer_gflops"), ".0f"), f(r.get("score_drift_max"), ".1e"),
                  f(r.get("latency_vs_fp32-reference"), ".2f"), f(r.get("latency_vs_fastest_peer"), ".2f"))
    m = report["machine"]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in m.get("gemm_gflops", {}).items())
    t.caption = (f"{escape(m['cpu'])}, {m['physical_cores']} cores, {m['ram_gb']} GB RAM, commit {m['commit']}; "
                 f"matmul peak GFLOP/s here: {peaks}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=190)
    console.print(t)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["configs"] if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:  # a legend, not labels beside the points: close points would overlap
        ndcg = r.get("ndcg@10_on_fp32_queries", r["ndcg@10"])  # same queries for every point
        a.scatter(r["peak_rss_mb"], r["latency_ms_median"], s=60,
                  label=f"{r['name']}: {r['latency_ms_median'] / 1000:.2f} s, {r['peak_rss_mb']:.0f} MB, "
                        f"nDCG@10 {ndcg:.3f}")
    a.legend(fontsize=8, loc="best")
    a.set_xlabel("peak RSS (MB)")
    a.set_ylabel("median latency per query (ms)")
    a.set_title(f"{report['settings']['model']}, K={report['settings']['top_k']} (nDCG@10 on the fp32 queries)")
    a.grid(alpha=0.3)
    for r in rows:
        if "computed_fraction_per_layer" in r:
            frac = np.array(r["computed_fraction_per_layer"])
            b.plot(np.arange(len(frac)), 1 - frac, marker="o", ms=3, label=r["name"])
    b.set_xlabel("layer")
    b.set_ylabel("fraction of candidates skipping the layer")
    b.set_title("work skipped per layer")
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
