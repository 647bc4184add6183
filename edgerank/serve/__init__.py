"""A local rerank HTTP server over one loaded model, in the request shapes of Cohere (v1, v2),
Jina, llama.cpp, Infinity and text-embeddings-inference (TEI); ``python -m edgerank.serve``.

Requests queue to the model: one call runs at a time (each already uses every core), at
most ``max_queue`` wait behind it, and the rest get 429 with ``Retry-After``. A request joins
the queue once its body is in; reading it is bounded apart, in bytes (413) and in time (408).
Errors are one JSON shape, llama.cpp's and OpenAI's:
``{"error": {"code": 422, "type": "...", "message": "..."}}``. The server uses only
edgerank's public API.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Union

from edgerank.runtime.extras import require

require("server", "python -m edgerank.serve")

import h11  # noqa: E402  (uvicorn's own HTTP/1.1 parser)
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator  # noqa: E402
from starlette.datastructures import Headers  # noqa: E402
from starlette.middleware.cors import CORSMiddleware  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

import edgerank  # noqa: E402
from edgerank import Ranking, Reranker  # noqa: E402

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "request_timeout", 413: "request_too_large",
               422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
               500: "server_error", 503: "unavailable_error"}

MAX_DEPTH = 64  # JSON nesting a body may have; rerank bodies use 3
DRAIN_BYTES = 64 * 1024 * 1024  # read on (and dropped) after a 413, so a client still sending reads it
DRAIN_S = 10.0  # ... for at most this long in all
DRAIN_IDLE_S = 2.0  # ... or until the client sends nothing for this long
READ_TIMED_OUT = "edgerank.read_timed_out"  # scope key: the protocol gave up waiting for the body


@dataclass
class Settings:
    """The server's limits and its model; ``options`` go to :class:`edgerank.Reranker`."""

    model: str | None = None
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_queue: int = 16  # requests waiting behind the one running; more get 429
    timeout_s: float = 60.0  # per request once its body is in, queueing included; then 503
    read_timeout_s: float = 30.0  # to send one request, head and body, from its first byte; then 408
    max_body_bytes: int = 8 * 1024 * 1024
    max_documents: int = 1000
    api_key: str | None = None  # when set, every route but /health and / needs "Authorization: Bearer KEY"
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call (CORS); none by default


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"code", "type", "message"}}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "type": ERROR_TYPES.get(status, "error"), "message": valid_unicode(message)}}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


# ---- request bodies ------------------------------------------------------------------------

def valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (JSON's ``"\\udc80"``) as U+FFFD, the way ``rank()``
    reads them: they cannot be encoded as UTF-8, so an answer echoing them could not be sent."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _clean(value: Any, depth: int = 0) -> Any:
    """``value`` with every string made valid Unicode; deeper than MAX_DEPTH is a 400."""
    if isinstance(value, str):
        return valid_unicode(value)
    if not isinstance(value, (list, dict)):
        return value
    if depth >= MAX_DEPTH:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, list):
        return [_clean(v, depth + 1) for v in value]
    return {valid_unicode(k): _clean(v, depth + 1) for k, v in value.items()}


def parse_json(raw: bytes) -> Any:
    """The body as JSON, its strings valid Unicode. Not JSON (NaN and Infinity included), not
    UTF-8, or nested deeper than MAX_DEPTH: a 400."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # the decoder recurses per level: 100,000 "[" is no parse
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past int_max_str_digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    return _clean(data)


class TextDocument(BaseModel):
    """Cohere v1's and Jina's document object; only ``text`` is read."""

    model_config = ConfigDict(extra="ignore")
    text: StrictStr


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty: there is nothing to rank against")
    return value


def _some(value: list) -> list:
    if not value:
        raise ValueError("is empty: give at least one document to rank")
    return value


class RerankBody(BaseModel):
    """Cohere v1/v2, Jina, llama.cpp and Infinity: ``{model?, query, documents, top_n?,
    return_documents?}``. Fields these APIs define that do not apply here (``rank_fields``,
    ``max_chunks_per_doc``, ``max_tokens_per_doc``) are accepted and answered with a warning;
    unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None  # echoed, never opened
    query: StrictStr
    documents: list[Union[StrictStr, TextDocument]]
    top_n: StrictInt | None = Field(default=None, gt=0)
    return_documents: StrictBool | None = None
    max_tokens_per_doc: StrictInt | None = Field(default=None, gt=0)
    rank_fields: Any = None
    max_chunks_per_doc: Any = None

    _query = field_validator("query")(_non_blank)
    _documents = field_validator("documents")(_some)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def top_k(self) -> int | None:
        """``top_n`` for ``rank()``: one past the list means the whole list, so it is capped there."""
        return None if self.top_n is None else min(self.top_n, len(self.documents))

    def warnings(self) -> list[str]:
        """What the request asked for that the answer does not do."""
        out = []
        if self.max_tokens_per_doc is not None:
            out.append("max_tokens_per_doc is not applied: documents are truncated to the model's "
                       "input limit instead")
        if self.rank_fields is not None:
            out.append("rank_fields is ignored: each document is ranked by its text (a string, or an "
                       "object's text field)")
        if self.max_chunks_per_doc is not None:
            out.append("max_chunks_per_doc is ignored: a long document is truncated, not chunked")
        return out


class TeiBody(BaseModel):
    """text-embeddings-inference: ``{query, texts, raw_scores?, return_text?, truncate?}``."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None  # documents are always truncated to the model's limit, and reported
    truncation_direction: StrictStr | None = None

    _query = field_validator("query")(_non_blank)
    _texts = field_validator("texts")(_some)

    @field_validator("truncation_direction")
    @classmethod
    def _right_only(cls, value: str | None) -> str | None:
        if value is not None and value.lower() != "right":
            raise ValueError("only Right truncation is supported: edgerank keeps a document's beginning")
        return value


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# ---- the queue to the model ----------------------------------------------------------------

class Busy(Exception):
    """The queue (or the room for bodies being read) is full."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


CHARS_PER_TOKEN = 4  # a tokenizer-free estimate; the rate is measured per estimated token, so its error cancels


def estimate_tokens(query: str, documents: list[str], max_length: int) -> int:
    """The tokens a call will score, estimated from characters: each (query, document) pair
    is capped at the model's input length, as truncation caps it."""
    return sum(min(max_length, (len(query) + len(d)) // CHARS_PER_TOKEN + 1) for d in documents)


class ModelQueue:
    """One model call at a time on a worker thread, at most ``max_queue`` waiting behind it.

    ``pending`` (running + waiting) and ``work_ahead`` (their estimated tokens) are only
    touched on the event loop's thread. A request whose client disconnects or whose time
    runs out while it waits is taken off the queue and never runs; one already running
    finishes and its result is dropped.
    """

    def __init__(self, reranker: Reranker, max_queue: int, on_depth: Any = None) -> None:
        self.reranker, self.max_queue = reranker, max_queue
        self.max_length = reranker.spec.max_length
        self.pending = 0
        self.work_ahead = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgerank-model")
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)  # (seconds, tokens)
        self._recent_lock = threading.Lock()  # appended on the worker thread, read on the loop's
        self._on_depth = on_depth or (lambda n: None)

    def seconds_per_token(self) -> float | None:
        """The model's measured time per estimated token over recent calls; None before any."""
        with self._recent_lock:
            seconds, tokens = sum(s for s, _ in self._recent), sum(t for _, t in self._recent)
        return seconds / tokens if tokens else None

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: the tokens of the calls running and
        waiting x the measured rate (1 s a call until a call has been measured)."""
        rate = self.seconds_per_token()
        ahead = rate * self.work_ahead if rate is not None else float(self.pending)
        return max(1, math.ceil(ahead))

    def _release(self, tokens: int) -> None:
        self.pending -= 1
        self.work_ahead -= tokens
        self._on_depth(self.pending)

    def _run(self, query: str, documents: list[str], top_k: int | None, tokens: int) -> tuple[Ranking, float]:
        started = time.perf_counter()
        ranking = self.reranker.rank(query, documents, top_k=top_k)
        with self._recent_lock:  # the call's own time: a lent reranker may have waited before it
            self._recent.append((ranking.stats.wall_s, tokens))
        return ranking, started

    async def rank(self, request: Request, query: str, documents: list[str], top_k: int | None,
                   timeout_s: float) -> tuple[Ranking, float]:
        """Rank through the queue; returns the ranking and the seconds it waited to start."""
        if self.pending > self.max_queue:
            raise Busy()
        loop = asyncio.get_running_loop()
        tokens = estimate_tokens(query, documents, self.max_length)
        self.pending += 1
        self.work_ahead += tokens
        self._on_depth(self.pending)
        queued = time.perf_counter()
        job = self._pool.submit(self._run, query, documents, top_k, tokens)
        # the count drops when the call ends or when a cancelled one leaves the queue
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, tokens))
        waiter = asyncio.wrap_future(job)
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
        return await self._wait(request, job, waiter, queued, timeout_s)

    async def _wait(self, request: Request, job: Any, waiter: asyncio.Future, queued: float,
                    timeout_s: float) -> tuple[Ranking, float]:
        deadline = queued + timeout_s
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=max(0.0, min(0.2, deadline - time.perf_counter())))
            if done:
                ranking, started = waiter.result()
                return ranking, started - queued
            if await request.is_disconnected():
                job.cancel()  # a no-op once running: that call finishes, nobody reads it
                raise ClientGone()
            if time.perf_counter() >= deadline:
                job.cancel()
                raise ApiError(503, f"the request did not finish within {timeout_s:g} s "
                               f"({self.pending} requests ahead or running)",
                               {"Retry-After": str(self.retry_after())})

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class BodyBudget:
    """Bytes of the request bodies being read, all together. A body is not counted against
    the queue while it arrives (a slow client holds no slot), so this bounds their memory
    instead: ``limit`` bytes, as many as a full queue of the largest bodies."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise Busy()
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


# ---- metrics -------------------------------------------------------------------------------

class Metrics:
    """Prometheus series, in a registry of the app's own (several apps can live in one process)."""

    def __init__(self, max_queue: int) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgerank_requests", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        self.errors = Counter("edgerank_errors", "Requests answered with an error, by status code",
                              ["code"], registry=r)
        self.latency = Histogram("edgerank_request_seconds", "Time from request to response of rankings served (2xx)",
                                 ["route"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("edgerank_queue_depth", "Rerank requests running or waiting for the model",
                                 registry=r)
        Gauge("edgerank_queue_limit", "Requests that may wait behind the running one (--max-queue)",
              registry=r).set(max_queue)
        self.documents = Counter("edgerank_documents_scored", "Documents ranked", registry=r)
        self.truncated = Counter("edgerank_documents_truncated", "Documents truncated to the model's limit",
                                 registry=r)
        self.tokens = Counter("edgerank_tokens", "Tokens scored (distinct sequences)", registry=r)
        self.work = Counter("edgerank_layer_token_work", "Layer x token work done (edgerank backend)",
                            registry=r)
        self.work_skipped = Counter("edgerank_layer_token_work_skipped",
                                    "Layer x token work skipped by progressive pruning (edgerank backend)",
                                    registry=r)
        self.pruned = Counter("edgerank_documents_pruned", "Documents dropped early by pruning", registry=r)

    def record_call(self, ranking: Ranking) -> None:
        stats = ranking.stats
        self.documents.inc(stats.candidates)
        self.truncated.inc(len(stats.truncated))
        self.tokens.inc(stats.tokens)
        extra = stats.extra
        if "layer_token_work" in extra:
            self.work.inc(extra["layer_token_work"])
            self.work_skipped.inc(max(0, extra["layer_token_work_unpruned"] - extra["layer_token_work"]))
            self.pruned.inc(sum(1 for d in extra.get("dropped_before_layer", ()) if d is not None))


# ---- responses -----------------------------------------------------------------------------

def _logit(p: float) -> float:
    p = min(max(p, 1e-15), 1 - 1e-15)
    return math.log(p) - math.log1p(-p)


def edgerank_meta(ranking: Ranking, queue_s: float) -> dict[str, Any]:
    """What the call did: truncation, timing, and (edgerank backend) what pruning dropped where."""
    s = ranking.stats
    out: dict[str, Any] = {"backend": s.backend, "model": s.model, "candidates": s.candidates,
                           "duplicates": s.duplicates, "tokens": s.tokens, "truncated": list(s.truncated),
                           "queue_ms": round(queue_s * 1000, 2), "wall_ms": round(s.wall_s * 1000, 2)}
    x = s.extra
    if "layers" in x:
        out.update(layers=x["layers"], pruning=x["pruning"], work_skipped=x["work_skipped"],
                   pruning_steps=x["pruning_steps"], layers_per_candidate=x["layers_per_candidate"])
        dropped = x.get("dropped_before_layer") or []
        scores = x.get("document_scores") or []
        out["pruned"] = [{"index": i, "dropped_before_layer": layer, "provisional_score": scores[i]}
                         for i, layer in enumerate(dropped) if layer is not None]
    return out


def truncation_warning(truncated: list[int]) -> list[str]:
    if not truncated:
        return []
    return [f"documents {', '.join(map(str, truncated))} were longer than the model's input limit and "
            "were truncated (their beginning was ranked)"]


def cohere_response(body: RerankBody, ranking: Ranking, texts: list[str], queue_s: float, version: str,
                    server_model: str) -> dict[str, Any]:
    """Cohere's response (v1 and v2), with llama.cpp's and Jina's ``model``/``usage`` beside it."""
    results = []
    for r in ranking:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if body.return_documents:
            item["document"] = {"text": texts[r.index]}
        results.append(item)
    tokens = ranking.stats.tokens
    meta = {"api_version": {"version": version}, "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": tokens, "output_tokens": 0},
            "warnings": truncation_warning(ranking.stats.truncated) + body.warnings(),
            "edgerank": edgerank_meta(ranking, queue_s)}
    out: dict[str, Any] = {"id": str(uuid.uuid4()), "results": results, "meta": meta}
    if version == "1":
        out.update(model=body.model or server_model, object="list",
                   usage={"prompt_tokens": tokens, "total_tokens": tokens})
    return out


def infinity_response(body: RerankBody, ranking: Ranking, texts: list[str], server_model: str) -> dict[str, Any]:
    """Infinity's response: each result's ``document`` is the bare string (or null), which is
    what LiteLLM's ``infinity/`` provider reads; Cohere's readers need ``{"text": ...}``."""
    tokens = ranking.stats.tokens
    results = [{"relevance_score": r.score, "index": r.index,
                "document": texts[r.index] if body.return_documents else None} for r in ranking]
    return {"object": "rerank", "results": results, "model": body.model or server_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())}


def tei_response(body: TeiBody, ranking: Ranking, raw_logits: bool) -> list[dict[str, Any]]:
    """TEI's bare array ``[{index, score, text?}]``; ``truncated: true`` marks a cut document."""
    truncated = set(ranking.stats.truncated)
    out = []
    for r in ranking:
        item: dict[str, Any] = {"index": r.index, "score": _logit(r.score) if raw_logits else r.score}
        if body.return_text:
            item["text"] = body.texts[r.index]
        if r.index in truncated:
            item["truncated"] = True
        out.append(item)
    return out


def truncation_headers(ranking: Ranking) -> dict[str, str]:
    t = ranking.stats.truncated
    return {"X-Edgerank-Truncated": ",".join(map(str, t))} if t else {}


# ---- reading a request: size, time ---------------------------------------------------------

def _declared_length(scope: dict) -> int | None:
    value = Headers(scope=scope).get("content-length", "")
    return int(value) if value.isdigit() else None


async def drain(receive: Callable) -> None:
    """Read and drop what a refused client is still sending: at most DRAIN_BYTES, DRAIN_S in
    all, until it has sent nothing for DRAIN_IDLE_S (one that waits for ``100 Continue`` never
    sends), or it has sent its whole body or gone."""
    deadline, dropped = time.monotonic() + DRAIN_S, 0
    while dropped <= DRAIN_BYTES:
        wait = min(DRAIN_IDLE_S, deadline - time.monotonic())
        if wait <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        dropped += len(message.get("body", b""))


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 as soon as that is known:
    before any of it is read when its Content-Length says so (so ``Expect: 100-continue`` gets
    the 413, never ``100 Continue``), else as the count passes the limit. The answer is sent
    whole, then what the client is still sending is drained (bounded) before the connection
    closes: a client that writes its whole body before it reads (urllib, httpx) would
    otherwise get a connection reset, not the 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes (--max-body-bytes)"

    async def refuse(self, receive: Callable, send: Callable, more_body: bool = True) -> None:
        response = error_response(413, self._message(), {"Connection": "close"})
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        if more_body:
            await drain(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            return await self.refuse(receive, send)
        state = {"size": 0, "refused": False, "started": False}

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request" and not state["refused"]:
                state["size"] += len(message.get("body", b""))
                if state["size"] > self.limit and not state["started"]:
                    state["refused"] = True  # the app sees a disconnect; its answer is dropped
                    await self.refuse(receive, send, message.get("more_body", False))
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: dict) -> None:
            if not state["refused"]:
                state["started"] = True
                await send(message)

        await self.app(scope, counted, unless_refused)


async def read_body(request: Request, budget: BodyBudget) -> Any:
    """The JSON body. Its bytes count against ``budget`` as they arrive (past it: Busy); its
    size limit is :class:`BodyLimit`'s, its time limit the protocol's (:func:`server_config`)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            budget.take(len(chunk))
            size += len(chunk)
            chunks.append(chunk)
        return parse_json(b"".join(chunks))
    except ClientDisconnect:
        if request.scope.get(READ_TIMED_OUT):
            raise ApiError(408, "the request body did not arrive within the server's read timeout "
                           "(--read-timeout)") from None
        raise ClientGone() from None
    finally:
        budget.give(size)


class ReadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request, head and body:
    ``read_timeout_s`` from its first byte (or from the connection's opening). uvicorn alone
    waits on a slow client without limit; its keep-alive timeout runs only between requests.
    Past the deadline, a request whose head is in and which has no answer yet is answered 408;
    the connection closes either way."""

    read_timeout_s = 30.0
    _read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request is in (or the connection is done)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self.conn.their_state is h11.SEND_BODY and not cycle.response_started:
                cycle.scope[READ_TIMED_OUT] = True  # type: ignore[literal-required]
                self._answer_408()
            cycle.disconnected = True  # the app's receive() returns a disconnect; its answer is dropped
            cycle.message_event.set()
        self.transport.close()

    def _answer_408(self) -> None:
        body = json.dumps(error_body(408, f"the request was not sent within {self.read_timeout_s:g} s "
                                          "(--read-timeout)")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))


def server_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """uvicorn's config for ``app`` (made by :func:`create_app`): its HTTP/1.1 protocol with
    the read deadline of the app's settings. ``options`` go to :class:`uvicorn.Config`."""
    protocol = type("ReadDeadlineH11", (ReadDeadlineH11,), {"read_timeout_s": app.state.settings.read_timeout_s})
    return uvicorn.Config(app, http=protocol, **options)


# ---- the routes' work ----------------------------------------------------------------------

class Service:
    """What the routes share: settings and metrics, and from start-up the model, its queue
    and the room for bodies being read."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.budget = BodyBudget((settings.max_queue + 1) * settings.max_body_bytes)
        self.reranker: Reranker | None = None
        self.queue: ModelQueue | None = None
        self.name, self.created = "", 0

    def start(self, reranker: Reranker) -> None:
        self.reranker, self.name, self.created = reranker, reranker.source.name, int(time.time())
        self.queue = ModelQueue(reranker, self.settings.max_queue, self.metrics.queue_depth.set)

    def busy(self) -> ApiError:
        queue = self.queue
        return ApiError(429, f"the server is busy: {queue.pending} requests are running or queued "
                        f"(--max-queue {self.settings.max_queue}); retry later",
                        {"Retry-After": str(queue.retry_after())})

    async def read(self, request: Request) -> Any:
        try:
            return await read_body(request, self.budget)
        except Busy:
            raise self.busy() from None
        except ClientGone:
            raise ApiError(499, "the client disconnected while sending its request") from None

    def parse(self, model: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        docs = data.get("texts" if model is TeiBody else "documents")
        if isinstance(docs, list) and len(docs) > self.settings.max_documents:
            raise ApiError(413, f"{len(docs)} documents is more than the server's limit of "
                           f"{self.settings.max_documents} (--max-documents)")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _validation_message(e)) from None

    async def rank(self, request: Request, query: str, texts: list[str], top_k: int | None) -> tuple[Ranking, float]:
        try:
            ranking, queue_s = await self.queue.rank(request, query, texts, top_k, self.settings.timeout_s)
        except Busy:
            raise self.busy() from None
        except ClientGone:
            raise ApiError(499, "the client disconnected before its answer was ready") from None
        except (ValueError, TypeError) as e:  # input the model cannot take, e.g. a query too long
            raise ApiError(422, str(e)) from None
        self.metrics.record_call(ranking)
        return ranking, queue_s

    async def cohere(self, request: Request, version: str) -> Response:
        """Cohere v1/v2, Jina and llama.cpp; on v1's routes TEI's body too (llama.cpp answers it there)."""
        data = await self.read(request)
        if version == "1" and isinstance(data, dict) and "texts" in data and "documents" not in data:
            return await self.tei(request, data)
        body: RerankBody = self.parse(RerankBody, data)
        texts = body.texts()
        ranking, queue_s = await self.rank(request, body.query, texts, body.top_k())
        out = cohere_response(body, ranking, texts, queue_s, version, self.name)
        return JSONResponse(out, headers=truncation_headers(ranking))

    async def tei(self, request: Request, data: Any) -> Response:
        body: TeiBody = self.parse(TeiBody, data)
        ranking, _ = await self.rank(request, body.query, body.texts, None)
        raw = body.raw_scores and self.reranker.spec.score.kind == "yes_no"
        return JSONResponse(tei_response(body, ranking, raw), headers=truncation_headers(ranking))

    async def infinity(self, request: Request) -> Response:
        body: RerankBody = self.parse(RerankBody, await self.read(request))
        texts = body.texts()
        ranking, _ = await self.rank(request, body.query, texts, body.top_k())
        return JSONResponse(infinity_response(body, ranking, texts, self.name), headers=truncation_headers(ranking))


# ---- the app -------------------------------------------------------------------------------

COHERE_V1_ROUTES = ("/v1/rerank", "/rerank", "/reranking", "/v1/reranking")  # llama-server serves all four
INFINITY_ROUTE = "/infinity/rerank"  # LiteLLM's infinity/ provider, api_base http://HOST:PORT/infinity


class Guard:
    """ASGI middleware: the API key check, and the request and error counters."""

    ROUTES = (*COHERE_V1_ROUTES, "/v2/rerank", INFINITY_ROUTE, "/health", "/v1/models", "/metrics", "/")

    def __init__(self, app: Any, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    def _authorised(self, scope: dict) -> bool:
        if not self.settings.api_key or scope["path"] in ("/health", "/") or scope["method"] == "OPTIONS":
            return True
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                     self.settings.api_key.encode())

    def _count(self, path: str, status: int, started: float) -> None:
        route = path if path in self.ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(str(status)).inc()
        if "rerank" in route and status < 400:  # the latency of rankings served
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self._authorised(scope):
            await self.app(scope, receive, sending)
        else:
            await error_response(401, "a valid 'Authorization: Bearer KEY' header is needed",
                                 {"WWW-Authenticate": "Bearer"})(scope, receive, sending)
        self._count(scope["path"], status[0], started)


def _lifespan(service: Service, reranker: Reranker | None) -> Callable:
    """Load the model at start-up (or use the one lent, which the app then does not close)."""
    settings = service.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        model = reranker or Reranker(model=settings.model, backend=settings.backend, **settings.options)
        service.start(model)
        try:
            yield
        finally:
            service.queue.close()  # in-flight calls have drained by now (uvicorn waits for them)
            if reranker is None:
                model.close()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # uvicorn still logs the traceback
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def _wrong_method(request: Request, exc: Exception) -> JSONResponse:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")


def _add_rerank_routes(app: FastAPI, service: Service) -> None:
    async def rerank_v1(request: Request) -> Response:
        return await service.cohere(request, "1")

    async def rerank_v2(request: Request) -> Response:
        return await service.cohere(request, "2")

    async def rerank_infinity(request: Request) -> Response:
        return await service.infinity(request)

    for path in COHERE_V1_ROUTES:
        app.add_api_route(path, rerank_v1, methods=["POST"])
    app.add_api_route("/v2/rerank", rerank_v2, methods=["POST"])
    app.add_api_route(INFINITY_ROUTE, rerank_infinity, methods=["POST"])


def _add_info_routes(app: FastAPI, service: Service) -> None:
    """The GET routes, each answering HEAD too (FastAPI adds no HEAD of its own)."""
    page = resources.files(__name__).joinpath("playground.html").read_text(encoding="utf-8")

    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.name, "backend": service.reranker.backend_name}

    async def models() -> dict[str, Any]:
        r = service.reranker
        return {"object": "list", "data": [{
            "id": service.name, "object": "model", "created": service.created, "owned_by": "edgerank",
            "meta": {"backend": r.backend_name, "family": r.spec.family, "max_length": r.spec.max_length}}]}

    async def prometheus() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    for path, endpoint in (("/health", health), ("/v1/models", models), ("/metrics", prometheus),
                           ("/", playground)):
        app.add_api_route(path, endpoint, methods=["GET", "HEAD"])


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Innermost first: the body limit, then the key check and counters, then (opt-in) CORS,
    outermost so that a browser can read every answer, errors included."""
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "HEAD", "POST"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After", "X-Edgerank-Truncated"])


def create_app(settings: Settings, reranker: Reranker | None = None) -> FastAPI:
    """The ASGI app. The model is loaded at start-up (``reranker`` lends one already loaded,
    which the app then does not close). Serve it with :func:`server_config`'s uvicorn config."""
    metrics = Metrics(settings.max_queue)
    service = Service(settings, metrics)
    app = FastAPI(title="edgerank", version=edgerank.__version__, lifespan=_lifespan(service, reranker),
                  docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_rerank_routes(app, service)
    _add_info_routes(app, service)
    _add_middleware(app, settings, metrics)
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, service
    return app
