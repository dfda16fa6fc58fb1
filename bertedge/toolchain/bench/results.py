"""The timed loop's statistics (warm-up, `time.perf_counter()` runs, percentiles) and the JSON-ready result records."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bertedge.toolchain.bench.spec import MIN_TIMED_RUNS, Call

# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles, mean ± sample std and throughput of one shape's timed runs."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    sequences_per_s: float
    tokens_per_s: float
    total_s: float


def latency_stats(latencies_s: Sequence[float], batch_size: int, seq_len: int) -> LatencyStats:
    """Summarize per-call latencies (seconds) of calls that each ran `batch_size` x `seq_len` tokens.

    Throughput is sequences over the summed call time, so it matches batch / mean latency.

    >>> s = latency_stats([0.010, 0.020, 0.030, 0.040], batch_size=8, seq_len=16)
    >>> s.p50_ms, s.mean_ms, s.sequences_per_s, s.tokens_per_s
    (25.0, 25.0, 320.0, 5120.0)
    """
    if len(latencies_s) == 0:
        raise ValueError("no latencies to summarize")
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
    total_s = float(ms.sum() / 1e3)
    seqs = batch_size * len(ms) / total_s if total_s > 0 else 0.0
    return LatencyStats(
        runs=len(ms), p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, min_ms=float(ms.min()),
        max_ms=float(ms.max()), sequences_per_s=seqs, tokens_per_s=seqs * seq_len, total_s=total_s,
    )


def time_calls(call: Call, warmup: int, runs: int, duration: float) -> list[float]:
    """Warm up, then time `call` `runs` times, or for `duration` seconds (at least 3 runs)."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    deadline = time.perf_counter() + duration
    while (len(latencies) < runs) if runs else (time.perf_counter() < deadline or len(latencies) < MIN_TIMED_RUNS):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return latencies


# ----------------------------------------------------------------------------- results


@dataclass
class ShapeResult:
    """One backend at one batch size x sequence length."""

    batch_size: int
    seq_len: int
    stats: LatencyStats


@dataclass
class ColdStart:
    """Fresh-process start: interpreter + imports + load + first inference, and peak memory."""

    runs: int
    seconds: float  # median of runs, from process spawn to the first prediction
    seconds_all: list[float]
    import_s: float
    load_s: float
    first_inference_s: float
    peak_rss_mb: float  # the child's peak resident memory (median)
    imports_torch: bool  # whether the child ended up with torch loaded (ONNX backends should not)
    gpu_memory_mb: float | None  # the child's GPU memory (nvidia-smi), GPU backends only


@dataclass
class Accuracy:
    """The --data pass: metric, agreement with the reference backend, and its throughput."""

    rows: int
    accuracy: float | None  # None when --data has no labels
    agreement: float | None  # share of labels equal to the reference backend's
    max_abs_logit_diff: float | None
    reference: str
    seconds: float
    sequences_per_s: float
    tokens_per_s: float


@dataclass
class BackendResult:
    """Everything measured for one backend; `status` is ok, skipped or failed (with `reason`)."""

    name: str
    description: str
    status: str = "ok"
    reason: str = ""
    file: str | None = None
    precision: str = ""
    size_mb: float | None = None
    provider_requested: str = ""
    providers_used: list[str] = field(default_factory=list)
    io_binding: bool = False
    threads_requested: int = 0
    threads_used: int | None = None
    threads_how: str = ""
    load_s: float | None = None
    rss_delta_mb: float | None = None  # in-process RSS growth over load + timing (rough)
    gpu_memory_mb: float | None = None  # this process, after timing (GPU backends)
    cold_start: ColdStart | None = None
    cold_start_note: str = ""
    accuracy: Accuracy | None = None
    task_metric: dict[str, Any] | None = None  # NER / QA: the task's metric on labelled --data
    shapes: list[ShapeResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class BenchReport:
    """bench.json: settings, environment, one entry per backend, and every warning."""

    created: str
    source: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    backends: list[BackendResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    schema: str = "bertedge-bench/1"

    def backend(self, name: str) -> BackendResult | None:
        """The result for backend `name`, if it was selected."""
        return next((b for b in self.backends if b.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
