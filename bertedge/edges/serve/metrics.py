"""The server's Prometheus metrics, and the ASGI middleware that counts and times every request."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        self.stage_texts = Counter("bertedge_cascade_stage_texts", "A cascade bundle's texts by the stage "
                                   "that answered them (1: the fast stage; higher: escalated)", ["stage"],
                                   registry=r)
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

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


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
            route = scope.get("route")  # the route template, not the raw path: bounded labels
            endpoint = route.path if isinstance(route, Route) else "unmatched"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
