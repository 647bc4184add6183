"""A local rerank HTTP server over one loaded model, in the request shapes of Cohere (v1, v2),
Jina, llama.cpp and text-embeddings-inference (TEI); ``python -m edgerank.serve``.

Requests queue to the model: one call runs at a time (each already uses every core), at
most ``max_queue`` wait behind it, and the rest get 429 with ``Retry-After``. Errors are one
JSON shape, llama.cpp's and OpenAI's: ``{"error": {"code": 422, "type": "...", "message": "..."}}``.
The server uses only edgerank's public API.
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
from typing import Any, Union

from edgerank.runtime.extras import require

require("server", "python -m edgerank.serve")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

import edgerank
from edgerank import Ranking, Reranker

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed_request",
               500: "server_error", 503: "unavailable_error"}


@dataclass
class Settings:
    """The server's limits and its model; ``options`` go to :class:`edgerank.Reranker`."""

    model: str | None = None
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_queue: int = 16  # requests waiting behind the one running; more get 429
    timeout_s: float = 60.0  # per request, queueing included; then 503
    max_body_bytes: int = 8 * 1024 * 1024
    max_documents: int = 1000
    api_key: str | None = None  # when set, every route but /health and / needs "Authorization: Bearer KEY"


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"code", "type", "message"}}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": status, "type": ERROR_TYPES.get(status, "error"), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- request bodies ------------------------------------------------------------------------

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
    """Cohere v1/v2, Jina and llama.cpp: ``{model?, query, documents, top_n?, return_documents?}``.
    Fields these APIs define that do not apply here (``rank_fields``, ``max_chunks_per_doc``)
    are ignored, like any unknown field."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None  # echoed, never opened
    query: StrictStr
    documents: list[Union[StrictStr, TextDocument]]
    top_n: StrictInt | None = Field(default=None, gt=0)
    return_documents: StrictBool | None = None
    max_tokens_per_doc: StrictInt | None = Field(default=None, gt=0)

    _query = field_validator("query")(_non_blank)
    _documents = field_validator("documents")(_some)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


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
    """The queue is full."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class ModelQueue:
    """One model call at a time on a worker thread, at most ``max_queue`` waiting behind it.

    ``pending`` (running + waiting) is only touched on the event loop's thread. A request
    whose client disconnects or whose time runs out while it waits is taken off the queue
    and never runs; one already running finishes and its result is dropped.
    """

    def __init__(self, reranker: Reranker, max_queue: int, on_depth: Any = None) -> None:
        self.reranker, self.max_queue = reranker, max_queue
        self.pending = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgerank-model")
        self._recent: collections.deque[float] = collections.deque(maxlen=16)  # recent call times
        self._recent_lock = threading.Lock()  # appended on the worker thread, read on the loop's
        self._on_depth = on_depth or (lambda n: None)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: recent call time x calls ahead."""
        with self._recent_lock:
            per_call = sum(self._recent) / len(self._recent) if self._recent else 1.0
        return max(1, math.ceil(per_call * self.pending))

    def _release(self) -> None:
        self.pending -= 1
        self._on_depth(self.pending)

    def _run(self, query: str, documents: list[str], top_k: int | None) -> tuple[Ranking, float, float]:
        started = time.perf_counter()
        ranking = self.reranker.rank(query, documents, top_k=top_k)
        elapsed = time.perf_counter() - started
        with self._recent_lock:
            self._recent.append(elapsed)
        return ranking, started, elapsed

    async def rank(self, request: Request, query: str, documents: list[str], top_k: int | None,
                   timeout_s: float) -> tuple[Ranking, float]:
        """Rank through the queue; returns the ranking and the seconds it waited to start."""
        if self.pending > self.max_queue:
            raise Busy()
        loop = asyncio.get_running_loop()
        self.pending += 1
        self._on_depth(self.pending)
        queued = time.perf_counter()
        job = self._pool.submit(self._run, query, documents, top_k)
        # the count drops when the call ends or when a cancelled one leaves the queue
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        waiter = asyncio.wrap_future(job)
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
        deadline = queued + timeout_s
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=max(0.0, min(0.2, deadline - time.perf_counter())))
            if done:
                ranking, started, _ = waiter.result()
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
                    server_model: str, extra_warnings: list[str]) -> dict[str, Any]:
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
            "warnings": truncation_warning(ranking.stats.truncated) + extra_warnings,
            "edgerank": edgerank_meta(ranking, queue_s)}
    out: dict[str, Any] = {"id": str(uuid.uuid4()), "results": results, "meta": meta}
    if version == "1":
        out.update(model=body.model or server_model, object="list",
                   usage={"prompt_tokens": tokens, "total_tokens": tokens})
    return out


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


# ---- the app -------------------------------------------------------------------------------

DRAIN_BYTES = 16 * 1024 * 1024  # read on past the limit (and drop) so the client sees the 413


async def read_body(request: Request, limit: int, keep: bool = True) -> Any:
    """The JSON body; more than ``limit`` bytes is a 413, and is never held in memory.
    ``keep=False`` reads the body and drops it (a request refused before it is read)."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(ClientDisconnect):
        async for chunk in request.stream():
            size += len(chunk)
            if too_big or size > limit:
                too_big = True
                if size > limit + DRAIN_BYTES:
                    break
            elif keep:
                chunks.append(chunk)
    if not keep:
        return None
    if too_big:
        raise ApiError(413, f"the request body is larger than the server's limit of {limit} bytes "
                       "(--max-body-bytes)", {"Connection": "close"})
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


class Guard:
    """ASGI middleware: the API key check, and the request and error counters."""

    ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/health", "/v1/models", "/metrics", "/")

    def __init__(self, app: Any, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    def _authorised(self, scope: dict) -> bool:
        if not self.settings.api_key or scope["path"] in ("/health", "/") or scope["method"] == "OPTIONS":
            return True
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                     self.settings.api_key.encode())

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
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        code = str(status[0])
        self.metrics.requests.labels(route, code).inc()
        if status[0] >= 400:
            self.metrics.errors.labels(code).inc()
        if route.endswith("rerank") and status[0] < 400:  # the latency of rankings served
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(settings: Settings, reranker: Reranker | None = None) -> FastAPI:
    """The ASGI app. The model is loaded at start-up (``reranker`` lends one already loaded,
    which the app then does not close)."""
    metrics = Metrics(settings.max_queue)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = reranker is None
        model = reranker or Reranker(model=settings.model, backend=settings.backend, **settings.options)
        state["reranker"] = model
        state["queue"] = ModelQueue(model, settings.max_queue, metrics.queue_depth.set)
        state["name"] = model.source.name
        state["created"] = int(time.time())
        state["reading"] = 0  # requests admitted whose bodies are being read
        try:
            yield
        finally:
            state["queue"].close()  # in-flight calls have drained by now (uvicorn waits for them)
            if owned:
                model.close()

    app = FastAPI(title="edgerank", version=edgerank.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # uvicorn still logs the traceback
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def parse(model: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        docs = data.get("texts" if model is TeiBody else "documents")
        if isinstance(docs, list) and len(docs) > settings.max_documents:
            raise ApiError(413, f"{len(docs)} documents is more than the server's limit of "
                           f"{settings.max_documents} (--max-documents)")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _validation_message(e)) from None

    async def rank(request: Request, query: str, texts: list[str], top_k: int | None) -> tuple[Ranking, float]:
        queue: ModelQueue = state["queue"]
        try:
            ranking, queue_s = await queue.rank(request, query, texts, top_k, settings.timeout_s)
        except Busy:
            raise busy(queue) from None
        except ClientGone:
            raise ApiError(499, "the client disconnected before its answer was ready") from None
        except (ValueError, TypeError) as e:  # input the model cannot take, e.g. a query too long
            raise ApiError(422, str(e)) from None
        metrics.record_call(ranking)
        return ranking, queue_s

    def truncation_headers(ranking: Ranking) -> dict[str, str]:
        t = ranking.stats.truncated
        return {"X-Edgerank-Truncated": ",".join(map(str, t))} if t else {}

    async def admit_and_read(request: Request) -> Any:
        """The body, if the queue has room for the request: bodies are held only for requests
        that can run, so a flood of large requests cannot grow memory past the queue's bound."""
        queue: ModelQueue = state["queue"]
        if queue.pending + state["reading"] > settings.max_queue:
            await read_body(request, settings.max_body_bytes, keep=False)
            raise busy(queue)
        state["reading"] += 1
        try:
            return await read_body(request, settings.max_body_bytes)
        finally:
            state["reading"] -= 1

    def busy(queue: ModelQueue) -> ApiError:
        return ApiError(429, f"the server is busy: {queue.pending} requests are running or queued "
                        f"(--max-queue {settings.max_queue}); retry later",
                        {"Retry-After": str(queue.retry_after())})

    async def cohere_route(request: Request, version: str) -> Response:
        data = await admit_and_read(request)
        if version == "1" and isinstance(data, dict) and "texts" in data and "documents" not in data:
            return await tei_route(request, data)  # llama.cpp answers TEI's body on these routes too
        body: RerankBody = parse(RerankBody, data)
        texts = body.texts()
        ranking, queue_s = await rank(request, body.query, texts, body.top_n)
        warnings = []
        if body.max_tokens_per_doc is not None:
            warnings.append("max_tokens_per_doc is not applied: documents are truncated to the model's "
                            "input limit instead")
        out = cohere_response(body, ranking, texts, queue_s, version, state["name"], warnings)
        return JSONResponse(out, headers=truncation_headers(ranking))

    async def tei_route(request: Request, data: Any) -> Response:
        body: TeiBody = parse(TeiBody, data)
        ranking, _ = await rank(request, body.query, body.texts, None)
        raw = body.raw_scores and state["reranker"].spec.score.kind == "yes_no"
        return JSONResponse(tei_response(body, ranking, raw), headers=truncation_headers(ranking))

    @app.post("/v1/rerank")
    async def rerank_v1(request: Request) -> Response:
        return await cohere_route(request, "1")

    @app.post("/rerank")
    async def rerank_plain(request: Request) -> Response:
        return await cohere_route(request, "1")

    @app.post("/v2/rerank")
    async def rerank_v2(request: Request) -> Response:
        return await cohere_route(request, "2")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state["name"], "backend": state["reranker"].backend_name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        r: Reranker = state["reranker"]
        return {"object": "list", "data": [{
            "id": state["name"], "object": "model", "created": state["created"], "owned_by": "edgerank",
            "meta": {"backend": r.backend_name, "family": r.spec.family, "max_length": r.spec.max_length}}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = resources.files(__name__).joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/")
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def _wrong_method(request: Request, exc: Exception) -> JSONResponse:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    app.add_middleware(Guard, settings=settings, metrics=metrics)
    app.state.settings, app.state.metrics, app.state.runtime = settings, metrics, state
    return app
