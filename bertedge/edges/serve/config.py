"""`ServeConfig` (batching, limits and the runtime options of the served predictor) and `ServeArgs`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bertedge.errors import BertedgeError
from bertedge.runtime.options import RuntimeOptions, finite

HELP = "see `bertedge serve --help`"


@dataclass(frozen=True)
class ServeConfig:
    """Batching and input limits of the HTTP server, and how its predictor runs."""

    max_batch_size: int = 32  # most texts coalesced into one predictor call (1: one per request)
    max_batch_tokens: int | None = None  # most padded tokens (texts x longest) per batch; None: no cap
    max_wait_ms: float = 5.0  # longest the first request of a batch waits for others to join
    run_batch_size: int | None = None  # texts per session.run in a coalesced batch; None: auto
    max_texts: int = 64  # most texts in one request
    max_chars: int = 20_000  # most characters in one text (and in one text_pair)
    max_body_bytes: int | None = None  # None: enough for max_texts pairs of max_chars, \\u-escaped
    max_queue: int = 512  # most texts waiting for a batch; more gets 503 + Retry-After
    request_timeout_s: float = 30.0  # a request not answered by then gets 504 (0: no deadline)
    workers: int = 1  # batches predicted at once, each on its own thread (one session, shared)
    # threads, providers, digest, NER aggregation, QA top-k when create_app loads the bundle;
    # idle threads do not spin by default (spinning steals cores from the event loop)
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(spin=False))

    def __post_init__(self) -> None:
        problems = [f"--{name} must be at least {low} (got {value})" for name, value, low in (
            ("max-batch-size", self.max_batch_size, 1),
            ("max-batch-tokens", self.max_batch_tokens if self.max_batch_tokens is not None else 1, 1),
            ("max-queue", self.max_queue, 1), ("workers", self.workers, 1),
            ("run-batch-size", self.run_batch_size or 1, 1),
            ("max-texts", self.max_texts, 1), ("max-chars", self.max_chars, 1),
            ("max-body-bytes", self.max_body_bytes if self.max_body_bytes is not None else 1, 1))
            if value < low]
        problems += [p for p in (finite("--max-wait-ms", self.max_wait_ms),
                                 finite("--request-timeout", self.request_timeout_s)) if p]
        if problems:
            raise BertedgeError("; ".join(problems), HELP)

    def run_batch_for(self, providers: Sequence[str]) -> int:
        """Texts per inference run inside a coalesced batch.

        The runtime sorts a batch by length and runs it in slices of this size. On CPU one
        run padded to the longest of 32 SST-2 sentences costs ~1.6x more per text than
        length-sorted slices of 4-8 (MiniLM-L6 INT8, AVX2), so CPU defaults to 8; a GPU
        takes the whole batch in one run.

        >>> ServeConfig().run_batch_for(["CPUExecutionProvider"]), ServeConfig().run_batch_for(["CUDAExecutionProvider"])
        (8, 32)
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
    config: ServeConfig = field(default_factory=ServeConfig)  # batching, limits, runtime options
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
            raise BertedgeError("; ".join(problems), f"{HELP}; "
                                "build a bundle with `bertedge package EXPORT_DIR --out BUNDLE`")
