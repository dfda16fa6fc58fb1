"""`bertedge serve`: the runtime `Predictor` over HTTP, with dynamic batching and Prometheus metrics.

A thin edge around the runtime: tokenization, item checks and post-processing stay in
`bertedge.runtime`, reached only through `PredictorLike`; this package adds transport, input
limits, request coalescing and observability. It needs the `serve` extra (fastapi, uvicorn,
prometheus-client) and, like the runtime, never imports torch or transformers.

    config    ServeConfig (batching, limits, the predictor's RuntimeOptions), ServeArgs
    protocol  PredictorLike: every member of the predictor the server uses
    schema    request / response / error bodies; parsing a body into the runtime's items
    batcher   coalescing, queue limits, deadlines (no HTTP: raises Overloaded, TimedOut, ...)
    metrics   Prometheus collectors and the request-counting middleware
    app       the FastAPI app, its start-up, the HTTP mapping of errors, `serve`

Endpoints:
    POST /v1/predict  {"texts": "one text" | [item, ...]} where an item is "text",
                      ["text", "text_pair"], {"text": ..., "text_pair": ...} or (QA)
                      {"question": ..., "context": ...}; one item may also be the whole body,
                      and {"inputs": ...} (text-embeddings-inference) is taken as "texts";
                      -> {"predictions": [...], "truncated": n, "model": {...}}, one prediction
                      per item in order, each the dict `bertedge predict` prints for the task
    POST /predict     the same (text-embeddings-inference's path)
    GET  /v1/model    the bundle's facts (task, labels, precision, checksums, ...), the output
                      schema and the server's limits
    GET  /healthz     200 while the process is alive
    GET  /readyz      200 once the bundle is verified and the session warmed up, else 503
    GET  /metrics     Prometheus text format
    GET  /docs        OpenAPI docs (/openapi.json)

Every error is JSON: {"error": message, "problems": [{"field", "message", "limit"?}, ...]}:
400 malformed JSON / non-UTF-8 / empty body / a number JSON cannot hold, 413 body over the byte
limit, 422 wrong types, empty list, too many texts, a text over the character limit, an empty
text (blank, or only control / zero-width characters) or an item the task cannot take, 503 not
ready, the queue full (with Retry-After) or the batching worker restarting, 504 no answer
within the request timeout, 500 a prediction that failed (for that request alone; the
connection stays usable). Texts longer than the model's max_length tokens are truncated, as in
`bertedge predict`, and marked "truncated": true.

Batching: concurrent requests are coalesced into one predictor call of up to max_batch_size
texts and max_batch_tokens padded tokens (see `Batcher`); inside it the runtime sorts by length
and runs slices of run_batch_size texts per inference run, so little compute goes to padding.

    >>> app = create_app("runs/bundle", ServeConfig(max_batch_size=32, max_wait_ms=5))  # doctest: +SKIP
"""

from __future__ import annotations

from bertedge.edges.serve.app import create_app, load_predictor, model_info, serve, warm_up
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
)

__all__ = ["ApiError", "BatchError", "Batcher", "ErrorBody", "Failed", "Metrics", "MetricsMiddleware",
           "NotAccepting", "Overloaded", "PredictRequest", "PredictResponse", "PredictorLike", "Problem",
           "Refused", "ServeArgs", "ServeConfig", "TimedOut", "create_app", "load_predictor", "model_info",
           "parse_items", "parse_json", "serve", "warm_up"]
