"""The FastAPI app: endpoints, the start-up (load, verify, warm up) and the HTTP mapping of errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bertedge import __version__
from bertedge.edges.serve.batcher import (
    Batcher,
    BatchError,
    Failed,
    NotAccepting,
    Overloaded,
    Refused,
    TimedOut,
)
from bertedge.edges.serve.config import ServeArgs, ServeConfig
from bertedge.edges.serve.metrics import Metrics, MetricsMiddleware
from bertedge.edges.serve.protocol import PredictorLike
from bertedge.edges.serve.schema import (
    ApiError,
    ErrorBody,
    PredictRequest,
    PredictResponse,
    Problem,
    parse_items,
    parse_json,
    read_body,
    validation_error,
)
from bertedge.errors import BertedgeError

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one: our lines join its log


@dataclass
class ServerState:
    """What the lifespan sets up and the endpoints read."""

    predictor: PredictorLike | None = None
    batcher: Batcher | None = None
    ready: bool = False
    status: str = "starting"  # why it is not ready, for /readyz
    summary: dict[str, Any] = field(default_factory=dict)  # model_summary, computed once


def load_predictor(bundle: str | Path, config: ServeConfig) -> PredictorLike:
    """Load and verify a bundle (checksums included) with the runtime's `Predictor`, as predict does."""
    from bertedge.runtime.predictor import Predictor

    return Predictor(bundle, config.runtime)


async def warm_up(batcher: Batcher) -> None:
    """One prediction of the task's example item, then a full run batch, so the first request
    pays no start-up cost.

    Raises:
        BertedgeError: the model cannot predict its own example item.
    """
    item = batcher.predictor.example_item
    for items in ([item], [item] * batcher.run_batch_size):
        errors = [r["error"] for r in await batcher.call(items) if "error" in r]
        if errors:
            raise BertedgeError(f"the warm-up prediction failed: {errors[0]}",
                                "check the bundle with `bertedge predict BUNDLE` first")


def model_summary(predictor: PredictorLike) -> dict[str, Any]:
    """The short model description sent with every prediction."""
    facts = predictor.describe()
    model_sha256 = next(iter(predictor.model_files().values()), None)
    return {"task": predictor.task_name, "precision": facts.get("precision"), "model_sha256": model_sha256,
            "digest": predictor.digest}


def model_info(predictor: PredictorLike, config: ServeConfig) -> dict[str, Any]:
    """GET /v1/model: the bundle's facts, checksums, providers, the output schema and the limits."""
    return {
        **predictor.describe(),
        "task": predictor.task_name, "labels": list(predictor.labels), "max_length": predictor.max_length,
        "digest": predictor.digest, "model_files": predictor.model_files(), "providers": predictor.providers,
        "output_schema": predictor.output_schema(),
        "limits": {"max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
                   "run_batch_size": config.run_batch_for(predictor.providers),
                   "max_texts": config.max_texts, "max_chars": config.max_chars,
                   "max_body_bytes": config.body_limit, "max_batch_tokens": config.max_batch_tokens,
                   "max_queue": config.max_queue, "request_timeout_s": config.request_timeout_s},
    }


def http_error(e: BatchError) -> ApiError:
    """The HTTP answer to a batcher error: 503 not accepting / overloaded, 504 timed out, 422
    refused items, 500 failed."""
    retry = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else {}
    if isinstance(e, Overloaded):
        return ApiError(503, e.message, [Problem(field="texts", message="queue full", limit=e.limit)], retry)
    if isinstance(e, TimedOut):
        return ApiError(504, e.message, headers=retry)
    if isinstance(e, Refused):
        return ApiError(422, e.message, [Problem(field="texts" if i is None else f"texts[{i}]", message=why)
                                         for i, why in e.problems])
    if isinstance(e, NotAccepting):
        return ApiError(503, e.message, headers=retry)
    assert isinstance(e, Failed), e
    return ApiError(500, e.message)


def json_error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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
        state.summary = model_summary(predictor)
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

    async def predict(request: Request) -> JSONResponse:
        """Predict one text or a list of items (strings, [text, text_pair] lists or objects).

        The body is {"texts": one text or a list of items}, one item as the whole body
        ({"text", "text_pair"} or {"question", "context"}), or {"inputs": ...} as
        text-embeddings-inference takes it. Each request's texts are coalesced with concurrent
        requests into one inference call. Over-long texts are truncated to the model's
        max_length tokens, as in `bertedge predict`, and marked `"truncated": true`; the
        response counts them.
        """
        if state.batcher is None or state.predictor is None or not state.ready:
            raise ApiError(503, f"not ready: {state.status}")
        with state.batcher.receiving():
            payload = parse_json(await read_body(request, config.body_limit))
            items = parse_items(payload, config.max_texts, config.max_chars, state.predictor.check)
        try:
            results = await state.batcher.submit(items)  # no await in between: the count stays true
        except BatchError as e:
            raise http_error(e) from None
        return JSONResponse({"predictions": results,
                             "truncated": sum(bool(r.get("truncated")) for r in results),
                             "model": state.summary})

    route = {"response_model": None, "responses": {200: {"model": PredictResponse}, **errors},
             "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}}}
    app.post("/v1/predict", **route)(predict)  # type: ignore[arg-type]
    app.post("/predict", summary="Predict (text-embeddings-inference's path)", **route)(predict)  # type: ignore[arg-type]

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
        body, media_type = metrics.render()
        return Response(body, media_type=media_type)

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
        return json_error(e)

    async def invalid(request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        return json_error(validation_error(e.errors()))

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, StarletteHTTPException)
        response = json_error(ApiError(e.status_code, str(e.detail)))
        response.headers.update(e.headers or {})
        return response

    async def user_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, BertedgeError)
        return json_error(ApiError(422, str(e), [Problem(field="texts", message=e.problem)]))

    async def internal(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s", request.url.path, exc_info=e)
        # Starlette re-raises after this answer and uvicorn then drops the connection: say so,
        # so a keep-alive client opens a new one instead of failing its next request.
        return json_error(ApiError(500, f"internal server error ({type(e).__name__})",
                                   headers={"Connection": "close"}))

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
