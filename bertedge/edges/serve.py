"""`bertedge serve`: the runtime `Predictor` over HTTP, with dynamic batching and Prometheus metrics.

A thin edge around the runtime: tokenization and post-processing stay in `bertedge.runtime`;
this module adds transport, input limits, request coalescing and observability. It needs the
`serve` extra (fastapi, uvicorn, prometheus-client) and, like the runtime, never imports
torch or transformers.

Endpoints:
    POST /v1/predict  {"texts": "one text" | [item, ...]} where an item is "text",
                      ["text", "text_pair"], {"text": ..., "text_pair": ...} or (QA)
                      {"question": ..., "context": ...};
                      -> {"predictions": [...], "truncated": n, "model": {...}}, one prediction
                      per item in order, each the dict `bertedge predict` prints for the task
    GET  /v1/model    the bundle's manifest (task, labels, precision, checksums, ...) and limits
    GET  /healthz     200 while the process is alive
    GET  /readyz      200 once the bundle is verified and the session warmed up, else 503
    GET  /metrics     Prometheus text format
    GET  /docs        OpenAPI docs (/openapi.json)

Every error is JSON: {"error": message, "problems": [{"field", "message", "limit"?}, ...]}:
400 malformed JSON / non-UTF-8 / empty body, 413 body over the byte limit, 422 wrong types,
empty list, too many texts, a text over the character limit or an item the task cannot take,
503 not ready, the queue full (with Retry-After) or the batching worker restarting, 504 no
answer within the request timeout, 500 a prediction that failed (for that request alone; the
connection stays usable). Texts longer than the model's max_length tokens are truncated, as in
`bertedge predict`, and marked "truncated": true.

Batching: concurrent requests are coalesced into one predictor call of up to max_batch_size
texts and max_batch_tokens padded tokens (see `Batcher`); inside it the runtime sorts by length and runs slices of
run_batch_size texts per onnxruntime run, so little compute goes to padding.

    >>> app = create_app("runs/bundle", ServeConfig(max_batch_size=32, max_wait_ms=5))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bertedge import __version__
from bertedge.errors import BertedgeError

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one: our lines join its log

Pair = tuple[str, str | None]  # (text, text_pair or None), as the runtime takes it
Result = dict[str, Any]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WARM_UP_TEXT = "a warm-up sentence of ordinary length, so the session allocates its buffers."


class PredictorLike(Protocol):
    """What the server needs from `bertedge.runtime.Predictor` (tests pass fakes)."""

    manifest: dict[str, Any]

    def predict(self, items: Sequence[Pair], batch_size: int | None = None) -> list[Result]: ...


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServeConfig:
    """Batching and input limits of the HTTP server."""

    max_batch_size: int = 32  # most texts coalesced into one predictor call (1: one per request)
    max_batch_tokens: int | None = None  # most padded tokens (texts x longest) per batch; None: no cap
    max_wait_ms: float = 5.0  # longest the first request of a batch waits for others to join
    run_batch_size: int | None = None  # texts per session.run in a coalesced batch; None: auto
    max_texts: int = 64  # most texts in one request
    max_chars: int = 20_000  # most characters in one text (and in one text_pair)
    max_body_bytes: int | None = None  # None: enough for max_texts pairs of max_chars, \\u-escaped
    threads: int | None = None  # onnxruntime intra-op threads (when create_app loads the bundle)
    providers: str | None = None  # cpu (default), auto, cuda, ... (when create_app loads the bundle)
    max_queue: int = 512  # most texts waiting for a batch; more gets 503 + Retry-After
    request_timeout_s: float = 30.0  # a request not answered by then gets 504 (0: no deadline)
    expect_digest: str | None = None  # refuse any bundle but this one (when create_app loads it)
    workers: int = 1  # batches predicted at once, each on its own thread (one session, shared)
    spin: bool = False  # let idle onnxruntime threads busy-wait (steals cores from the event loop)

    def __post_init__(self) -> None:
        problems = [f"--{name} must be at least {low} (got {value})" for name, value, low in (
            ("max-batch-size", self.max_batch_size, 1), ("max-wait-ms", self.max_wait_ms, 0),
            ("max-batch-tokens", self.max_batch_tokens if self.max_batch_tokens is not None else 1, 1),
            ("max-queue", self.max_queue, 1), ("workers", self.workers, 1),
            ("request-timeout", self.request_timeout_s, 0),
            ("run-batch-size", self.run_batch_size or 1, 1),
            ("max-texts", self.max_texts, 1), ("max-chars", self.max_chars, 1),
            ("max-body-bytes", self.max_body_bytes if self.max_body_bytes is not None else 1, 1),
            ("threads", self.threads or 0, 0)) if value < low]
        if problems:
            raise BertedgeError("; ".join(problems), "see `bertedge serve --help`")

    def run_batch_for(self, providers: Sequence[str]) -> int:
        """Texts per onnxruntime run inside a coalesced batch.

        The runtime sorts a batch by length and runs it in slices of this size. On CPU one
        run padded to the longest of 32 SST-2 sentences costs ~1.6x more per text than
        length-sorted slices of 4-8 (MiniLM-L6 INT8, AVX2), so CPU defaults to 8; a GPU
        takes the whole batch in one run.
        """
        if self.run_batch_size:
            return min(self.run_batch_size, self.max_batch_size)
        on_gpu = any(p not in ("CPUExecutionProvider", "OpenVINO:CPU") for p in providers)
        return self.max_batch_size if on_gpu else min(8, self.max_batch_size)

    @property
    def body_limit(self) -> int:
        """Request body limit in bytes: JSON escapes a character in at most 6 bytes (\\uXXXX)."""
        return self.max_body_bytes or 2 * 6 * self.max_chars * self.max_texts + (64 << 10)


@dataclass
class ServeArgs:
    """Options of `bertedge serve`."""

    bundle: Path  # bundle folder or .tar.gz / .zip archive
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0: every interface)
    port: int = 8000  # TCP port
    config: ServeConfig = field(default_factory=ServeConfig)  # batching and limits
    log_level: str = "info"  # uvicorn log level
    access_log: bool = False  # one log line per request (costs throughput)
    graceful_timeout_s: int = 30  # on SIGTERM / Ctrl-C, how long in-flight requests may finish

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port} is outside 0..65535")
        if self.graceful_timeout_s < 0:
            problems.append("--graceful-timeout must be 0 or more")
        if not self.bundle.exists():
            problems.append(f"bundle '{self.bundle}' does not exist")
        if problems:
            raise BertedgeError("; ".join(problems), "see `bertedge serve --help`; "
                                "build a bundle with `bertedge package EXPORT_DIR --out BUNDLE`")


# ----------------------------------------------------------------------------- request schema


class TextPair(BaseModel):
    """One item as an object; text_pair is the second text of a sentence pair (or QA context)."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    text_pair: StrictStr | None = None


class QuestionContext(BaseModel):
    """A QA item as an object (the same as {"text": question, "text_pair": context})."""

    model_config = ConfigDict(extra="forbid")
    question: StrictStr
    context: StrictStr


def item_kind(value: Any) -> str | None:
    """The union branch an item belongs to, chosen by its JSON type (so errors name one branch)."""
    if isinstance(value, str):
        return "~text"
    if isinstance(value, list | tuple):
        return "~pair"
    if isinstance(value, dict) and ("question" in value or "context" in value):
        return "~qa"
    return "~object" if isinstance(value, dict | TextPair | QuestionContext) else None


def texts_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "~one"
    return "~list" if isinstance(value, list) else None


ITEM_ERROR = ('expected a string, a ["text", "text_pair"] list, a {"text", "text_pair"} object '
              'or a {"question", "context"} object')
Item = Annotated[
    Annotated[StrictStr, Tag("~text")] | Annotated[tuple[StrictStr, StrictStr], Tag("~pair")]
    | Annotated[TextPair, Tag("~object")] | Annotated[QuestionContext, Tag("~qa")],
    Discriminator(item_kind, custom_error_type="item_type", custom_error_message=ITEM_ERROR)]


class PredictRequest(BaseModel):
    """Texts to predict: one string, or a list of items (strings, pairs, or objects)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": "a gripping, beautifully shot film"},
        {"texts": ["a gripping film", ["is it good?", "it is great"],
                   {"text": "a man plays guitar", "text_pair": "someone makes music"}]},
        {"texts": [{"question": "where does john live?", "context": "john lives in paris"}]}]})
    texts: Annotated[
        Annotated[StrictStr, Tag("~one")] | Annotated[list[Item], Tag("~list")],
        Discriminator(texts_kind, custom_error_type="texts_type",
                      custom_error_message="expected a string or a list of items"),
        Field(description="One text, or a list of items; each item is a string, a "
                          "[text, text_pair] list, a {text, text_pair} object or (QA) a "
                          "{question, context} object."),
    ]


class ModelSummary(BaseModel):
    """Which model answered."""

    task: str
    precision: str | None
    model_sha256: str | None
    digest: str | None = Field(None, description="the bundle digest `bertedge package` printed")


class PredictResponse(BaseModel):
    """One prediction per input item, in input order (the same dicts `bertedge predict` prints)."""

    predictions: list[dict[str, Any]] = Field(description="e.g. {label, score, probabilities} "
                                              "for classification; truncated: true when cut")
    truncated: int = Field(description="how many items were longer than max_length tokens")
    model: ModelSummary


class Problem(BaseModel):
    field: str
    message: str
    limit: int | None = None


class ErrorBody(BaseModel):
    """Every 4xx / 5xx answer."""

    error: str
    problems: list[Problem] = []


class ApiError(Exception):
    """A request the server refuses: HTTP status, a message and the fields at fault."""

    def __init__(self, status: int, message: str, problems: Sequence[Problem] = (),
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.problems = status, message, list(problems)
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = ErrorBody(error=self.message, problems=self.problems)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=self.status,
                            headers=self.headers)


def field_name(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a JSON path; union branch tags (~...) are left out.

    >>> field_name(("texts", "~list", 3, "~object", "text_pair"))
    'texts[3].text_pair'
    """
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not part.startswith("~"):
            name += f".{part}" if name else part
    return name or "body"


def validation_error(errors: Sequence[Any]) -> ApiError:
    """A 422 listing every pydantic / FastAPI validation problem with its field."""
    problems = [Problem(field=field_name(tuple(e.get("loc", ())) or ("body",)), message=e["msg"])
                for e in errors]
    return ApiError(422, f"invalid request: {len(problems)} problem(s)", problems)


# ----------------------------------------------------------------------------- parsing


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_big = ApiError(413, f"request body is larger than {limit} bytes",
                       [Problem(field="body", message="too large", limit=limit)])
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """Strict UTF-8 JSON; a 400 naming the byte or the line and column at fault."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})",
                       [Problem(field="body", message=f"invalid UTF-8 at byte {e.start}")]) from None
    if not text.strip():
        raise ApiError(400, "request body is empty; send JSON like {\"texts\": [\"a text\"]}",
                       [Problem(field="body", message="empty")])
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} "
                       f"column {e.colno})", [Problem(field="body", message=e.msg)]) from None
    except RecursionError:
        raise ApiError(400, "request body nests JSON too deeply",
                       [Problem(field="body", message="nested too deeply")]) from None


Check = Callable[[Pair], str | None]  # the task's own item check (e.g. QA needs a pair)


def as_tuple(item: str | tuple[str, str] | TextPair | QuestionContext) -> Pair:
    """A validated item as the runtime's (text, text_pair or None)."""
    if isinstance(item, TextPair):
        return item.text, item.text_pair
    if isinstance(item, QuestionContext):
        return item.question, item.context
    return (item, None) if isinstance(item, str) else item


def parse_items(payload: Any, config: ServeConfig, check: Check | None = None) -> list[Pair]:
    """Validate a decoded body into (text, pair) items; one 422 listing every problem."""
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if isinstance(texts, list) and len(texts) > config.max_texts:  # before validating them all
        raise ApiError(422, f"too many texts: {len(texts)}, the limit is {config.max_texts} per request",
                       [Problem(field="texts", message=f"{len(texts)} texts", limit=config.max_texts)])
    try:
        request = PredictRequest.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    raw = [request.texts] if isinstance(request.texts, str) else request.texts
    if not raw:
        raise ApiError(422, f"texts is an empty list; send 1 to {config.max_texts} texts",
                       [Problem(field="texts", message="empty list", limit=config.max_texts)])
    items: list[Pair] = []
    problems: list[Problem] = []
    for i, item in enumerate(raw):
        text, pair = as_tuple(item)
        where = "texts" if isinstance(request.texts, str) else f"texts[{i}]"
        found = item_problems(where, text, pair, config.max_chars)
        task_problem = check((text, pair)) if check is not None and not found else None
        problems += found + ([Problem(field=where, message=task_problem)] if task_problem else [])
        items.append((text, pair))
    if problems:
        raise ApiError(422, f"invalid request: {len(problems)} problem(s)", problems)
    return items


def item_problems(where: str, text: str, pair: str | None, max_chars: int) -> list[Problem]:
    """Empty or over-long parts of one item."""
    problems = []
    for part, value in (("text", text), ("text_pair", pair)):
        if value is None:
            continue
        name = where if part == "text" and pair is None else f"{where}.{part}"
        if not value.strip():
            problems.append(Problem(field=name, message=f"empty {part}"))
        elif len(value) > max_chars:
            problems.append(Problem(field=name, limit=max_chars,
                                    message=f"{len(value)} characters, the limit is {max_chars}"))
    return problems


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """The server's Prometheus collectors, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bertedge_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("bertedge_request_duration_seconds", "HTTP request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("bertedge_batch_size", "Texts per onnxruntime call (coalesced batch)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("bertedge_batch_requests", "Requests coalesced into one batch",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("bertedge_batch_duration_seconds", "Predictor time per batch "
                                   "(tokenize + inference + decode)", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("bertedge_queue_depth", "Texts waiting for a batch", registry=r)
        self.texts = Counter("bertedge_texts", "Texts predicted", registry=r)
        self.truncated = Counter("bertedge_truncated_texts", "Texts cut to max_length tokens", registry=r)
        self.ready = Gauge("bertedge_ready", "1 once the bundle is verified and warmed up", registry=r)
        self.shed = Counter("bertedge_shed_requests", "Requests refused with 503 because the queue was full",
                            registry=r)
        self.timed_out = Counter("bertedge_timed_out_requests", "Requests answered 504 after the request "
                                 "timeout", registry=r)
        self.restarts = Counter("bertedge_worker_restarts", "Batching worker crashes (each restarted)",
                                registry=r)
        self.worker_up = Gauge("bertedge_worker_up", "1 while the batching worker runs", registry=r)
        self.recent_seconds_per_text = 0.0  # of the last batch: for Retry-After

    def seconds_per_text(self) -> float:
        return self.recent_seconds_per_text

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint (route template) and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"  # not raw paths: bounded labels
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


# ----------------------------------------------------------------------------- the batcher


def token_counter(predictor: PredictorLike) -> Callable[[Sequence[Pair]], list[int]]:
    """Tokens per item as the predictor will pad it: its window length, at most max_length.

    A long QA context runs as several windows; they are counted as one (the padded length is
    what one long text costs the short texts it is batched with).

    Uses the predictor's own tokenizer; a predictor without one (a test fake) counts words + 3.
    """
    tokenizer = getattr(predictor, "tokenizer", None)
    window = int(getattr(predictor, "max_length", 0) or 0)
    if tokenizer is None or not window:
        return lambda items: [len(t.split()) + len((p or "").split()) + 3 for t, p in items]
    cap = window * 64  # characters: far past max_length tokens (the runtime cuts there too)

    def count(items: Sequence[Pair]) -> list[int]:
        encodings = tokenizer.encode_batch([t[:cap] if p is None else (t[:cap], p[:cap]) for t, p in items])
        return [min(len(e.ids), window) for e in encodings]  # the padded length of its (first) window

    return count


EMPTY = object()  # what get_within returns when nothing arrived in time


async def get_within(queue: asyncio.Queue[Any], seconds: float) -> Any:
    """The next queue entry, or EMPTY after `seconds`.

    Built on asyncio.wait, which reports a timeout by returning, not raising: asyncio.wait_for
    raises asyncio.TimeoutError, which before Python 3.11 is not the builtin TimeoutError, so
    an `except TimeoutError` there killed the batching worker on 3.10.
    """
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter}, timeout=max(seconds, 0))
    if done:
        return getter.result()
    getter.cancel()  # a cancelled get leaves the entry in the queue: nothing is lost
    await asyncio.wait({getter})  # let the cancel land (raises nothing, unlike awaiting getter)
    if not getter.cancelled():  # it got an entry between the timeout and the cancel
        return getter.result()
    return EMPTY


@dataclass
class Pending:
    """One request's items waiting in the queue, and where its results go."""

    items: list[Pair]
    future: asyncio.Future[list[Result]]
    arrived: float  # event-loop time it was queued
    longest: int = 0  # tokens of its longest item (counted only when max_batch_tokens is set)
    queued: bool = True  # still counted in the queue (not yet taken into a batch, not expired)


class Batcher:
    """Coalesces concurrent requests into one `predict` call of up to `max_batch_size` texts.

    A single worker task takes the oldest request, then adds queued requests until the batch
    is full (`max_batch_size` texts, or `max_batch_tokens` padded tokens: texts x the longest),
    or the oldest has waited `max_wait_ms`, or no other request is being received (so a lone
    client never waits for company). A request's texts stay in one batch; a request larger
    than the batch runs alone. Calls run on one executor thread, off the event loop and one at
    a time per session; each request gets exactly its own slice of the results, in order.
    While a call runs, new requests queue up and form the next batch, so under load batches
    fill without waiting.

    Load shedding: at most `max_queue` texts wait (more: 503 with Retry-After), and a request
    not answered within `request_timeout_s` gets a 504 and leaves the queue. The worker is
    supervised: if it crashes, the requests it held get a 503, `up` is False until it is
    restarted (after `restart_delay_s`), and queued requests are then served.
    """

    def __init__(self, predictor: PredictorLike, config: ServeConfig, metrics: Metrics,
                 restart_delay_s: float = 0.5) -> None:
        self.predictor, self.metrics, self.config = predictor, metrics, config
        self.max_batch_size, self.max_wait_s = config.max_batch_size, config.max_wait_ms / 1000
        self.run_batch_size = config.run_batch_for(getattr(predictor, "providers", None) or [])
        # One batch at a time by default: onnxruntime's intra-op threads already use every core;
        # more workers suit several cores per session thread pool (e.g. --threads 1 --workers 4).
        self.workers = config.workers
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bertedge-predict")
        self.slots = asyncio.Semaphore(self.workers)  # predictor calls in flight at once
        self.in_flight: set[asyncio.Task[None]] = set()
        self.queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self.held: Pending | None = None  # taken from the queue, but it did not fit the last batch
        self.current: list[Pending] = []  # the batch being collected or run (failed if the worker dies)
        self.worker: asyncio.Task[None] | None = None
        self.closing = False
        self.arriving = 0  # requests being read and validated, about to be submitted
        self.queued_texts = 0  # texts waiting for a batch (the bounded queue's fill)
        self.running = False  # the worker loop is up (False while it restarts after a crash)
        self.restart_delay_s = restart_delay_s
        self.count_tokens = token_counter(predictor) if config.max_batch_tokens else None

    @property
    def up(self) -> bool:
        """The batching worker is running and taking batches."""
        return self.running and self.worker is not None and not self.worker.done()

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Marks a request as on its way in, so the batch being collected waits for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def call(self, items: Sequence[Pair]) -> list[Result]:
        """Run items through the predictor on the executor thread (also used for warm-up)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._predict, list(items))

    def _predict(self, items: list[Pair]) -> list[Result]:
        return self.predictor.predict(items, batch_size=self.run_batch_size)

    def start(self) -> None:
        self.running = True
        self.worker = asyncio.create_task(self._supervise(), name="bertedge-batcher")

    async def submit(self, items: list[Pair]) -> list[Result]:
        """Queue one request's items; its results, in order, once its batch has run.

        Raises:
            ApiError: 503 (not accepting, or the queue is full), 504 (not answered within the
                request timeout), or the status its batch failed with.
        """
        if self.closing or self.worker is None:
            raise ApiError(503, "the server is not accepting predictions (starting or shutting down)")
        limit = self.config.max_queue
        if self.queued_texts and self.queued_texts + len(items) > limit:
            self.metrics.shed.inc()
            raise ApiError(503, f"overloaded: {self.queued_texts} texts are queued (limit {limit}); "
                           "retry later", [Problem(field="texts", message="queue full", limit=limit)],
                           headers={"Retry-After": str(self.retry_after())})
        loop = asyncio.get_running_loop()
        longest = max(self.count_tokens(items)) if self.count_tokens else 0
        pending = Pending(items, loop.create_future(), loop.time(), longest)
        self._queued(len(items))
        self.queue.put_nowait(pending)
        timeout = self.config.request_timeout_s
        timer = loop.call_later(timeout, self._expire, pending) if timeout else None
        try:
            return await pending.future
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, pending: Pending) -> None:
        """The request's deadline passed: a 504 now, and its place in the queue is freed."""
        if pending.future.done():
            return
        self._dequeue(pending)  # a batch already running it just drops its results
        self.metrics.timed_out.inc()
        pending.future.set_exception(ApiError(
            504, f"no prediction within the request timeout ({self.config.request_timeout_s:g} s); "
            "the server is overloaded or the texts are too long",
            headers={"Retry-After": str(self.retry_after())}))

    def retry_after(self) -> int:
        """Seconds a shed client should wait: the queue's drain time at the recent batch rate, >= 1."""
        per_text = self.metrics.seconds_per_text()
        return max(1, math.ceil(self.queued_texts * per_text)) if per_text else 1

    def _queued(self, texts: int) -> None:
        self.queued_texts += texts
        self.metrics.queue_depth.set(self.queued_texts)

    def _dequeue(self, pending: Pending) -> None:
        if pending.queued:
            pending.queued = False
            self._queued(-len(pending.items))

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the worker and the thread."""
        self.closing = True
        if self.worker is not None:
            self.queue.put_nowait(None)
            await self.worker
        self.executor.shutdown(wait=True)

    async def _supervise(self) -> None:
        """Run the worker loop; after a crash fail what it held, wait, and start it again."""
        while True:
            try:
                await self._work()
                return
            except Exception as e:  # a bug in the batcher itself: never leave requests hanging
                self.running = False
                self.metrics.worker_up.set(0)
                self.metrics.restarts.inc()
                log.error("the batching worker crashed; restarting in %g s", self.restart_delay_s,
                          exc_info=e)
                for pending in self.current:
                    self._dequeue(pending)
                    self._fail(pending, ApiError(503, "the batching worker crashed; retry",
                                                 headers={"Retry-After": "1"}))
                self.current = []
                if self.closing:  # the crash may have eaten the stop marker: the restart needs one
                    self.queue.put_nowait(None)
                await asyncio.sleep(self.restart_delay_s)
                self.running = True
                self.metrics.worker_up.set(1)

    async def _work(self) -> None:
        while True:
            await self.slots.acquire()  # a free predictor slot first: meanwhile the queue fills
            try:
                batch, stop = await self._collect()
            except BaseException:
                self.slots.release()
                raise
            if batch:
                task = asyncio.create_task(self._run_in_slot(batch))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            else:
                self.slots.release()
            self.current = []
            if stop:
                await asyncio.gather(*self.in_flight)
                return

    async def _run_in_slot(self, batch: list[Pending]) -> None:
        """Run one batch, then free its slot; a bug here fails this batch's requests, not the worker."""
        try:
            await self._run(batch)
        except Exception as e:
            log.error("a batch failed unexpectedly", exc_info=e)
            for pending in batch:
                self._fail(pending, ApiError(500, f"prediction failed ({type(e).__name__})"))
        finally:
            self.slots.release()

    async def _next(self) -> Pending | None:
        """The next live queue entry (expired requests are dropped), or None: the stop marker."""
        while True:
            entry = self.held or await self.queue.get()
            self.held = None
            if entry is None or not entry.future.done():
                return entry

    async def _collect(self) -> tuple[list[Pending], bool]:
        """The next batch, and whether the stop marker was reached."""
        first = await self._next()
        if first is None:
            return [], True
        self._dequeue(first)
        batch, size, longest = [first], len(first.items), first.longest
        self.current = batch
        deadline = first.arrived + self.max_wait_s
        loop = asyncio.get_running_loop()
        while size < self.max_batch_size:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or not self.arriving:
                    break
                got = await get_within(self.queue, remaining)
                if got is EMPTY:
                    break
                nxt = got  # type: ignore[assignment]
            if nxt is None:
                return batch, True
            if nxt.future.done():  # timed out while queued
                continue
            if size + len(nxt.items) > self.max_batch_size or self._too_many_tokens(
                    size + len(nxt.items), max(longest, nxt.longest)):
                self.held = nxt  # keeps its texts together: it starts the next batch
                break
            self._dequeue(nxt)
            batch.append(nxt)
            size, longest = size + len(nxt.items), max(longest, nxt.longest)
        return batch, False

    def _too_many_tokens(self, texts: int, longest: int) -> bool:
        """Would a batch of `texts` padded to `longest` tokens exceed --max-batch-tokens?"""
        limit = self.config.max_batch_tokens
        return bool(limit) and texts * longest > limit  # type: ignore[operator]

    async def _run(self, batch: list[Pending]) -> None:
        """Predict a batch and hand each request its slice; a bad request fails alone."""
        live = [p for p in batch if not p.future.done()]  # a cancelled caller needs no answer
        if not live:
            return
        items = [item for p in live for item in p.items]
        started = time.perf_counter()
        try:
            results = await self.call(items)
        except Exception as e:
            if len(live) > 1:  # find the request at fault; the others still get their answers
                for p in live:
                    await self._run([p])
            elif isinstance(e, BertedgeError):  # the runtime refused an input that passed our checks
                self._fail(live[0], ApiError(422, str(e), [Problem(field="texts", message=e.problem)]))
            else:  # this request's items break the predictor: a 500 for it alone
                log.error("prediction failed for one request", exc_info=e)
                self._fail(live[0], ApiError(500, f"prediction failed ({type(e).__name__}: "
                                             f"{str(e)[:200]})"))
            return
        self._observe(len(items), len(live), time.perf_counter() - started, results)
        offset = 0
        for p in live:
            if not p.future.done():
                p.future.set_result(results[offset: offset + len(p.items)])
            offset += len(p.items)

    @staticmethod
    def _fail(pending: Pending, error: Exception) -> None:
        if not pending.future.done():
            pending.future.set_exception(error)

    def _observe(self, texts: int, requests: int, seconds: float, results: list[Result]) -> None:
        self.metrics.recent_seconds_per_text = seconds / max(texts, 1)
        self.metrics.batch_size.observe(texts)
        self.metrics.batch_requests.observe(requests)
        self.metrics.inference.observe(seconds)
        self.metrics.texts.inc(texts)
        self.metrics.truncated.inc(sum(bool(r.get("truncated")) for r in results))


# ----------------------------------------------------------------------------- the app


@dataclass
class ServerState:
    """What the lifespan sets up and the endpoints read."""

    predictor: PredictorLike | None = None
    batcher: Batcher | None = None
    ready: bool = False
    status: str = "starting"  # why it is not ready, for /readyz
    summary: dict[str, Any] = field(default_factory=dict)  # model_summary, computed once


def load_predictor(bundle: str | Path, config: ServeConfig) -> PredictorLike:
    """Load and verify a bundle (checksums included) with the runtime's `Predictor`."""
    from bertedge.runtime.predictor import Predictor

    return Predictor(bundle, providers=config.providers, threads=config.threads,
                     batch_size=config.max_batch_size, expect_digest=config.expect_digest,
                     spin=config.spin)


def task_check(predictor: PredictorLike) -> Check | None:
    """The runtime's per-task item check (the task record's `check_item`), when there is one."""
    check = getattr(getattr(predictor, "task", None), "check_item", None)
    return check or getattr(getattr(predictor, "runtime", None), "check", None)


async def warm_up(batcher: Batcher) -> None:
    """One prediction, then a full run batch, so the first request pays no start-up cost."""
    example = getattr(getattr(batcher.predictor, "task", None), "example_item", None)
    item: Pair = tuple(example) if example else (WARM_UP_TEXT, None)  # type: ignore[assignment]
    try:
        await batcher.call([item])
    except BertedgeError:  # a QA model takes (question, context) pairs only
        item = ("what is this?", WARM_UP_TEXT)
        await batcher.call([item])
    await batcher.call([item] * batcher.run_batch_size)


def model_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The short model description sent with every prediction."""
    from bertedge.runtime.bundle import manifest_digest

    model_file = manifest.get("files", {}).get("model.onnx", {})
    return {"task": manifest.get("task"), "precision": manifest.get("precision"),
            "model_sha256": model_file.get("sha256"), "digest": manifest_digest(manifest)}


def model_info(predictor: PredictorLike, config: ServeConfig) -> dict[str, Any]:
    """GET /v1/model: the manifest's facts, checksums, providers and the server's limits."""
    m = predictor.manifest
    keys = ("task", "labels", "max_length", "model_type", "precision", "quantization", "inputs",
            "bertedge_version", "format_version", "created")
    return {
        **{k: m.get(k) for k in keys},
        "engine": m.get("engine") or "onnxruntime",
        "digest": model_summary(m)["digest"],
        "checksums": {name: f.get("sha256") for name, f in m.get("files", {}).items()},
        "files": m.get("files", {}),
        "artifact": m.get("provenance", {}).get("artifact"),
        "providers": list(getattr(predictor, "providers", []) or []),
        "limits": {"max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
                   "run_batch_size": config.run_batch_for(getattr(predictor, "providers", []) or []),
                   "max_texts": config.max_texts, "max_chars": config.max_chars,
                   "max_body_bytes": config.body_limit, "max_batch_tokens": config.max_batch_tokens,
                   "max_queue": config.max_queue, "request_timeout_s": config.request_timeout_s},
    }


def create_app(predictor_or_bundle: PredictorLike | str | Path,
               config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving one predictor (or the bundle at a path, loaded at start-up).

    Start-up (the ASGI lifespan) loads and verifies a bundle path, runs a warm-up prediction
    and starts the batcher; only then does /readyz answer 200. Shutdown stops taking new
    predictions, finishes queued ones and stops the executor thread.

    Args:
        predictor_or_bundle: a loaded `bertedge.runtime.Predictor`, or a bundle folder / archive.
        config: batching and input limits (default `ServeConfig()`).
    """
    config = config or ServeConfig()
    metrics = Metrics()
    state = ServerState()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.status = "loading and verifying the bundle"
        predictor = (await asyncio.to_thread(load_predictor, predictor_or_bundle, config)
                     if isinstance(predictor_or_bundle, str | Path) else predictor_or_bundle)
        batcher = Batcher(predictor, config, metrics)
        state.status = "warming up"
        await warm_up(batcher)
        batcher.start()
        state.summary = model_summary(predictor.manifest)
        state.predictor, state.batcher, state.ready, state.status = predictor, batcher, True, "ready"
        metrics.ready.set(1)
        metrics.worker_up.set(1)
        log.info("bertedge ready: %s; coalescing up to %d texts (waiting up to %g ms), "
                 "%d per onnxruntime run", state.summary,
                 config.max_batch_size, config.max_wait_ms, batcher.run_batch_size)
        try:
            yield
        finally:
            state.ready, state.status = False, "shutting down"
            metrics.ready.set(0)
            await batcher.close()

    app = FastAPI(title="bertedge", version=__version__, lifespan=lifespan,
                  description="Predictions from a bertedge bundle, dynamically batched.")
    app.state.server = state
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    add_error_handlers(app)
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": why} for code, why in (
            (400, "malformed JSON, non-UTF-8 or empty body"), (413, "body over the byte limit"),
            (422, "wrong field types, empty list, too many texts, a text over the size limit"),
            (500, "the prediction failed for this request's texts"),
            (503, "not ready yet, shutting down, worker restarting, or queue full (Retry-After)"),
            (504, "not answered within the request timeout"))}

    @app.post("/v1/predict", response_model=None, responses={200: {"model": PredictResponse}, **errors},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}})
    async def predict(request: Request) -> JSONResponse:
        """Predict one text or a list of items (strings, [text, text_pair] lists or objects).

        Each request's texts are coalesced with concurrent requests into one onnxruntime call.
        Over-long texts are truncated to the model's max_length tokens, as in `bertedge predict`,
        and marked `"truncated": true`; the response counts them.
        """
        if state.batcher is None or state.predictor is None or not state.ready:
            raise ApiError(503, f"not ready: {state.status}")
        with state.batcher.receiving():
            payload = parse_json(await read_body(request, config.body_limit))
            items = parse_items(payload, config, task_check(state.predictor))
        results = await state.batcher.submit(items)  # no await in between: the count stays true
        return JSONResponse({"predictions": results,
                             "truncated": sum(bool(r.get("truncated")) for r in results),
                             "model": state.summary})

    @app.get("/v1/model", responses={503: errors[503]})
    async def model() -> dict[str, Any]:
        """The bundle's manifest: task, labels, precision / quantization, checksums, max length."""
        if state.predictor is None:
            raise ApiError(503, f"not ready: {state.status}")
        return model_info(state.predictor, config)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: errors[503]})
    async def readyz() -> dict[str, Any]:
        """Readiness: the bundle is verified and the session warmed up."""
        if not state.ready:
            raise ApiError(503, f"not ready: {state.status}")
        if state.batcher is None or not state.batcher.up:
            raise ApiError(503, "not ready: the batching worker is restarting", headers={"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics (text exposition format)."""
        return metrics.render()

    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus PredictRequest (the endpoint parses its body itself)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        request = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["PredictRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema


def add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error", "problems"}; bad input is a 4xx, never a 500."""

    async def api_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return e.response()

    async def invalid(request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        return validation_error(e.errors()).response()

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, StarletteHTTPException)
        response = ApiError(e.status_code, str(e.detail)).response()
        response.headers.update(e.headers or {})
        return response

    async def user_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, BertedgeError)
        return ApiError(422, str(e), [Problem(field="texts", message=e.problem)]).response()

    async def internal(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s", request.url.path, exc_info=e)
        # Starlette re-raises after this answer and uvicorn then drops the connection: say so,
        # so a keep-alive client opens a new one instead of failing its next request.
        return ApiError(500, f"internal server error ({type(e).__name__})",
                        headers={"Connection": "close"}).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(BertedgeError, user_error)
    app.add_exception_handler(Exception, internal)


# ----------------------------------------------------------------------------- the command


def serve(args: ServeArgs) -> None:
    """Verify the bundle, then serve it with uvicorn until SIGINT / SIGTERM.

    On shutdown uvicorn stops accepting connections and lets in-flight requests finish (up to
    `graceful_timeout_s`), then the batcher drains its queue.

    Raises:
        BertedgeError: bad options, or a missing / corrupt bundle (before any port is opened).
    """
    import uvicorn

    predictor = load_predictor(args.bundle, args.config)
    app = create_app(predictor, args.config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log, lifespan="on",
                timeout_graceful_shutdown=args.graceful_timeout_s or None)
