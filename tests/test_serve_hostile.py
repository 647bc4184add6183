"""``python -m edgerank.serve`` against careless and hostile clients (issue 43): oversized
bodies read by urllib, httpx and curl, slow clients on raw sockets, lone surrogates, deep
JSON, Retry-After under load, and a hypothesis fuzz over request bodies. Every server is a
real uvicorn on 127.0.0.1, configured as the command line configures it."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.test_serve import (  # noqa: E402
    AUTH, DOCS, KEY, QUERY, Gated, background_post, post, reference, reranker, serving, url, wait_for,
)

__all__ = ["reranker", "url"]  # module-scoped fixtures, shared with test_serve.py's
pytestmark = pytest.mark.slow  # real weights, as in test_serve.py

BIG = 50_000_000  # the 50 MB body, against the fixture's 256 KiB limit


def still_serving(base: str) -> None:
    r = post(base, "/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert r.status_code == 200
    assert [(x["index"], x["relevance_score"]) for x in r.json()["results"]] == reference(QUERY, DOCS)


def assert_413_body(raw: bytes) -> None:
    err = json.loads(raw)["error"]
    assert err["code"] == 413 and err["type"] == "request_too_large"
    assert "larger than the server's limit of 262144 bytes" in err["message"]


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection, or what came within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


# ---- 1. an oversized body: a 413 the client reads -------------------------------------------

@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_oversized_content_length_is_answered_before_the_body_is_sent(url, expect):
    """A raw socket sends only the head: the 413 comes at once, never a ``100 Continue``."""
    head = (f"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {BIG}\r\n"
            + ("Expect: 100-continue\r\n" if expect else "") + "\r\n").encode()
    with socket.create_connection(host_port(url)) as sock:
        sock.sendall(head)
        started = time.monotonic()
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 413 "), first[:80]
        assert time.monotonic() - started < 5
        response = first + read_response(sock, 5)  # a client that sends nothing more: the server closes
    head_part, _, body = response.partition(b"\r\n\r\n")
    assert b"100 Continue" not in response
    assert b"connection: close" in head_part.lower()
    assert_413_body(body)
    still_serving(url)


def test_urllib_reads_the_413_of_an_oversized_body(url):
    """urllib writes its whole body before it reads: the server drains it, so no reset."""
    request = urllib.request.Request(url + "/v1/rerank", data=b"x" * BIG,
                                     headers={**AUTH, "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 413
    assert_413_body(err.value.read())
    still_serving(url)


def test_httpx_reads_the_413_of_an_oversized_body(url):
    r = httpx.post(url + "/v1/rerank", content=b"x" * BIG, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert_413_body(r.content)
    still_serving(url)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("expect", ["default", "off"])
def test_curl_reads_the_413_of_an_oversized_body(url, tmp_path, expect):
    """curl sends ``Expect: 100-continue`` with a large body (``off``: without it, so the
    server drains); either way it reads the 413, and the server never says 100 Continue."""
    body = tmp_path / "big.json"
    body.write_bytes(b"x" * BIG)
    cmd = ["curl", "-sS", "-v", "-o", str(tmp_path / "out"), "-w", "%{http_code}", "--data-binary", f"@{body}",
           "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", url + "/v1/rerank"]
    if expect == "off":
        cmd += ["-H", "Expect:"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "413"
    assert ("> Expect: 100-continue" in done.stderr) == (expect == "default")
    assert "100 Continue" not in done.stderr
    assert_413_body((tmp_path / "out").read_bytes())
    still_serving(url)


# ---- 2. lone surrogates echoed: U+FFFD, as rank() reads them --------------------------------

LONE = ["a \udc80 lone low surrogate", "immune \ud800 system", DOCS[1]]
AS_RANK_READS = [d.replace("\udc80", "\ufffd").replace("\ud800", "\ufffd") for d in LONE]


def post_raw(base: str, path: str, body: dict) -> httpx.Response:
    """``body`` as JSON text with ``\\uXXXX`` escapes: the only way a lone surrogate travels."""
    return httpx.post(base + path, content=json.dumps(body).encode(), timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_lone_surrogates_are_echoed_as_replacement_characters(url, path):
    r = post_raw(url, path, {"model": "m\udc80", "query": QUERY, "documents": LONE, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["index"], x["relevance_score"]) for x in results] == reference(QUERY, LONE)  # rank() reads them too
    assert [x["document"]["text"] for x in results] == [AS_RANK_READS[x["index"]] for x in results]
    if path == "/v1/rerank":
        assert r.json()["model"] == "m\ufffd"


def test_tei_return_text_with_lone_surrogates(url):
    r = post_raw(url, "/rerank", {"query": "immune \udfff", "texts": LONE, "return_text": True})
    assert r.status_code == 200, r.text
    assert [(x["index"], x["score"]) for x in r.json()] == reference("immune \udfff", LONE)
    assert [x["text"] for x in r.json()] == [AS_RANK_READS[x["index"]] for x in r.json()]


# ---- 3. deeply nested JSON: a 400 -----------------------------------------------------------

def nested_documents(depth: int) -> bytes:
    return b'{"query": "q", "documents": ' + b"[" * depth + b'"a"' + b"]" * depth + b"}"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a": ' * 40_000, b"[" * 100_000 + b"]" * 100_000,
                                  nested_documents(1000)],
                         ids=["open-brackets", "open-objects", "balanced", "nested-documents"])
def test_deeply_nested_json_is_a_400(url, body):
    r = httpx.post(url + "/v1/rerank", content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "nests deeper than" in r.json()["error"]["message"]
    still_serving(url)


# ---- 4. slow clients: no queue slot, and a read deadline ------------------------------------

class Trickler:
    """A raw connection that sends a request's head (``body=True``: and the start of a body of
    100 bytes) then one more byte every ``every`` seconds, and keeps what the server answers."""

    def __init__(self, base: str, body: bool = True, every: float = 0.5) -> None:
        self.sock = socket.create_connection(host_port(base))
        self.received, self.closed_at, self.stop = b"", None, threading.Event()
        self.opened = time.monotonic()
        if body:
            head = "POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            self.sock.sendall(head.encode() + b'{"query": ')
            self.drip = b"x"
        else:
            self.sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\n")
            self.drip = b"X-Slow: x\r\n"
        self.threads = [threading.Thread(target=self._send, args=(every,), daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self, every: float) -> None:
        while not self.stop.wait(every) and self.closed_at is None:
            try:
                self.sock.sendall(self.drip)
            except OSError:
                return

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_at = time.monotonic()
                return
            self.received += chunk

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv(); close() alone would not
        self.sock.close()


def test_trickling_bodies_hold_no_queue_slot(reranker):
    """As many trickling connections as the queue holds (2 waiting + 1 running), then a
    normal request: it is answered, not 429 (the issue: every other request got 429)."""
    with serving(reranker, max_queue=2) as (base, app):
        tricklers = [Trickler(base) for _ in range(3)]
        try:
            time.sleep(1.0)  # each has sent its head and a few bytes of body
            for _ in range(3):
                still_serving(base)
            assert app.state.service.queue.pending == 0  # a body still arriving is not queued
            assert all(t.closed_at is None for t in tricklers)  # within the read timeout: still open
        finally:
            for t in tricklers:
                t.close()


def test_a_request_not_in_within_read_timeout_is_answered_408(reranker):
    """--read-timeout bounds sending a request, head and body, apart from --timeout: a body
    still trickling is answered 408 and closed, a head still trickling (or nothing sent) is
    closed, and a body that arrives in time in pieces is ranked."""
    with serving(reranker, read_timeout_s=2, timeout_s=600) as (base, app):
        body, head = Trickler(base), Trickler(base, body=False)
        silent = socket.create_connection(host_port(base))
        silent_reader = threading.Thread(target=lambda: read_response(silent, 10), daemon=True)
        silent_reader.start()
        try:
            in_time = slow_but_in_time(base)
            wait_for(lambda: body.closed_at is not None and head.closed_at is not None, timeout=10)
            silent_reader.join(10)
            assert not silent_reader.is_alive()  # the server closed it
            assert 1.5 < body.closed_at - body.opened < 6 and 1.5 < head.closed_at - head.opened < 6
            status, _, rest = body.received.partition(b"\r\n")
            assert status == b"HTTP/1.1 408 Request Timeout"
            err = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
            assert err["code"] == 408 and "--read-timeout" in err["message"]
            assert head.received == b""  # no request head: nothing to answer
            assert in_time.status_code == 200
            assert [(x["index"], x["relevance_score"]) for x in in_time.json()["results"]] == reference(QUERY, DOCS)
            metrics = httpx.get(base + "/metrics").text
            assert 'edgerank_requests_total{code="408",route="/v1/rerank"} 1.0' in metrics
            still_serving(base)
        finally:
            body.close()
            head.close()
            silent.close()


def test_bodies_being_read_share_a_bounded_room(reranker):
    """Bodies are not counted against the queue while they arrive, so their memory has a
    bound of its own, (max_queue + 1) x max_body_bytes: a body that would pass it is 429,
    and the room frees when the body it held is gone."""
    with serving(reranker, max_queue=0, max_body_bytes=64 * 1024) as (base, app):
        holder = socket.create_connection(host_port(base))
        holder.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 60000\r\n\r\n" + b" " * 50_000)  # 50 kB in, then it waits
        wait_for(lambda: app.state.service.budget.used == 50_000)
        docs = [d + " " + "x" * 3000 for d in DOCS]  # ~18 kB: more than the room left
        refused = post(base, "/v1/rerank", {"query": QUERY, "documents": docs}, headers={})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        holder.close()
        wait_for(lambda: app.state.service.budget.used == 0)
        ok = post(base, "/v1/rerank", {"query": QUERY, "documents": docs}, headers={})
        assert ok.status_code == 200 and ranked_like_rank(ok, docs)


def ranked_like_rank(r: httpx.Response, docs: list[str]) -> bool:
    return [(x["index"], x["relevance_score"]) for x in r.json()["results"]] == reference(QUERY, docs)


def slow_but_in_time(base: str) -> httpx.Response:
    """A valid body sent in four pieces over ~1.2 s, within a 2 s read timeout."""
    payload = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    step = len(payload) // 4 + 1

    def pieces():
        for i in range(0, len(payload), step):
            yield payload[i:i + step]
            time.sleep(0.4)

    return httpx.post(base + "/v1/rerank", content=pieces(), timeout=60,
                      headers={"Content-Type": "application/json", "Content-Length": str(len(payload))})


# ---- 5. Retry-After: the tokens queued ahead x the measured rate -----------------------------

def long_docs(n: int, seed: int) -> list[str]:
    words = " ".join(DOCS).split()
    return [" ".join(words[(seed + i + j) % len(words)] for j in range(220)) for i in range(n)]


def test_retry_after_counts_the_work_queued_ahead(reranker):
    """The issue's case: after 16 three-document calls, large calls fill the queue; the
    429's Retry-After must cover the time the queue then really takes to drain (it was 1 s
    while calls took seconds), measured here against the clock."""
    gated = Gated(reranker)
    gated.gate.set()
    with serving(gated, max_queue=2) as (base, app):
        for i in range(16):
            assert post(base, "/v1/rerank", {"query": f"{QUERY} {i}", "documents": DOCS[:3]}, headers={}).status_code == 200
        gated.gate.clear()
        queue, done = app.state.service.queue, []
        threads = [background_post(base, {"query": QUERY, "documents": long_docs(60, i)}, done, timeout=300)
                   for i in range(1)]
        wait_for(lambda: len(gated.calls) == 17)  # the first large call runs, held at the gate
        threads += [background_post(base, {"query": QUERY, "documents": long_docs(60, i)}, done, timeout=300)
                    for i in (1, 2)]
        wait_for(lambda: queue.pending == 3)
        refused = post(base, "/v1/rerank", {"query": QUERY, "documents": long_docs(60, 3)}, headers={})
        assert refused.status_code == 429
        retry_after = int(refused.headers["Retry-After"])
        started = time.monotonic()
        gated.gate.set()
        for t in threads:
            t.join(300)
        drained = time.monotonic() - started
        assert [r.status_code for r in done] == [200, 200, 200]
        assert 0.5 * drained <= retry_after <= 3 * drained + 1, (retry_after, drained)


# ---- beyond the list: a fuzz over request bodies ---------------------------------------------

POST_ROUTES = ["/v1/rerank", "/rerank", "/v2/rerank", "/reranking", "/v1/reranking", "/infinity/rerank"]
FIELDS = ["query", "documents", "texts", "top_n", "return_documents", "return_text", "model", "rank_fields",
          "raw_scores", "truncate", "truncation_direction", "max_tokens_per_doc", "max_chunks_per_doc"]


def bodies():
    """Request bodies: plausible ones (any Unicode, lone surrogates included, numbers of any
    size), the same fields holding anything, any JSON, raw bytes, and integers past Python's
    4300-digit limit."""
    from hypothesis import strategies as st

    text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=60)
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
               | st.floats() | text)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
    documents = st.lists(text | st.fixed_dictionaries({"text": text}), min_size=1, max_size=5)
    plausible = st.fixed_dictionaries(
        {"query": text.filter(str.strip), "documents": documents},
        optional={"top_n": st.integers(min_value=-2, max_value=10**30), "return_documents": st.booleans(),
                  "model": text, "rank_fields": st.lists(text, max_size=2), "max_tokens_per_doc": st.integers(-1, 10**6),
                  "max_chunks_per_doc": st.integers(-1, 10)})
    tei = st.fixed_dictionaries(
        {"query": text.filter(str.strip), "texts": st.lists(text, min_size=1, max_size=5)},
        optional={"return_text": st.booleans(), "raw_scores": st.booleans(), "truncate": st.booleans(),
                  "truncation_direction": st.sampled_from(["Right", "right", "Left"])})
    chaos = st.fixed_dictionaries({}, optional={f: values for f in FIELDS})
    as_json = st.one_of(plausible, plausible, tei, chaos, values).map(lambda v: json.dumps(v).encode())
    huge_int = st.integers(min_value=4301, max_value=6000).map(
        lambda n: b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * n + b"}")
    return st.one_of(as_json, as_json, as_json, st.binary(max_size=300), huge_int)


def test_fuzzed_bodies_get_a_2xx_or_a_json_4xx(url):
    """Every answer is a 2xx, or a 4xx with the JSON error body; never a 5xx or a dropped
    connection; and the server ranks a normal request afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = httpx.Client(base_url=url, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(path=st.sampled_from(POST_ROUTES), body=bodies())
    def answers(path: str, body: bytes) -> None:
        r = client.post(path, content=body)
        assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
        data = r.json()
        if r.status_code >= 400:
            assert set(data) == {"error"} and set(data["error"]) == {"code", "type", "message"}, data
            assert data["error"]["code"] == r.status_code
        else:
            assert isinstance(data, list) or isinstance(data.get("results"), list)

    with client:
        answers()
    still_serving(url)
