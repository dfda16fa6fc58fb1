"""Latency accounting for predict runs: per-item and per-batch percentiles in constant memory.

Torch-free; `Predictor.predict(..., timings=LatencyRecorder())` fills one, `bertedge predict`
prints its report.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyReport:
    """Per-item and per-batch latency percentiles, throughput and where the time went."""

    items: int
    batches: int
    wall_s: float  # first batch start to last batch end, reading and writing included
    throughput_items_s: float
    item_p50_ms: float  # per item = batch latency / batch size (amortized)
    item_p90_ms: float
    item_p99_ms: float
    batch_p50_ms: float  # tokenize share + inference + decode of one batch
    batch_p90_ms: float
    batch_p99_ms: float
    tokenize_s: float
    inference_s: float
    decode_s: float
    items_per_stage: tuple[int, ...] = ()  # a cascade: items each stage answered, stage 1 first

    def format(self) -> str:
        """A few human lines for stderr."""
        if not self.items:
            return "latency: no items predicted"
        busy = max(self.tokenize_s + self.inference_s + self.decode_s, 1e-12)
        staged = sum(self.items_per_stage)
        escalated = [f"  cascade: {staged - self.items_per_stage[0]} of {staged} items escalated "
                     f"({', '.join(f'stage {k + 1}: {n}' for k, n in enumerate(self.items_per_stage))})"] \
            if staged else []
        return "\n".join([
            f"latency: {self.items} items in {self.batches} batches, {self.wall_s:.2f} s, "
            f"{self.throughput_items_s:.1f} items/s",
            f"  per item  p50 {self.item_p50_ms:.2f} ms  p90 {self.item_p90_ms:.2f} ms  "
            f"p99 {self.item_p99_ms:.2f} ms",
            f"  per batch p50 {self.batch_p50_ms:.2f} ms  p90 {self.batch_p90_ms:.2f} ms  "
            f"p99 {self.batch_p99_ms:.2f} ms",
            f"  time split: tokenize {self.tokenize_s:.3f} s ({100 * self.tokenize_s / busy:.0f}%), "
            f"inference {self.inference_s:.3f} s ({100 * self.inference_s / busy:.0f}%), "
            f"decode {self.decode_s:.3f} s ({100 * self.decode_s / busy:.0f}%)",
            *escalated,
        ])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LatencyRecorder:
    """Thread-safe latency accumulator in constant memory (log-spaced histogram, 1% resolution)."""

    LOW_S, RATIO, BINS = 1e-6, 1.01, 2100  # 1 us .. about 1,200 s

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._end = self._start
        self._item_hist = np.zeros(self.BINS, dtype=np.int64)
        self._batch_hist = np.zeros(self.BINS, dtype=np.int64)
        self._totals = np.zeros(3)  # tokenize, inference, decode seconds
        self._items = self._batches = 0
        self._stages: list[int] = []  # items per cascade stage (empty: not a cascade)

    def count_stages(self, stages: Sequence[int]) -> None:
        """Record which stage (1-based) answered each item of a cascade's predict call."""
        with self._lock:
            for stage in stages:
                self._stages += [0] * (stage - len(self._stages))
                self._stages[stage - 1] += 1

    def add(self, n: int, tokenize_s: float, inference_s: float, decode_s: float) -> None:
        """Record one batch of n items."""
        latency = tokenize_s + inference_s + decode_s
        with self._lock:
            self._batch_hist[self._bin(latency)] += 1
            self._item_hist[self._bin(latency / n)] += n
            self._totals += (tokenize_s, inference_s, decode_s)
            self._items += n
            self._batches += 1
            self._end = time.perf_counter()

    def _bin(self, seconds: float) -> int:
        index = math.floor(math.log(max(seconds, self.LOW_S) / self.LOW_S, self.RATIO))
        return min(index, self.BINS - 1)

    def _percentile_ms(self, hist: np.ndarray, q: float) -> float:
        total = int(hist.sum())
        if not total:
            return 0.0
        index = int(np.searchsorted(np.cumsum(hist), q * total))
        return 1000 * self.LOW_S * self.RATIO ** (index + 0.5)

    def report(self) -> LatencyReport:
        with self._lock:
            wall = max(self._end - self._start, 1e-12)
            ih, bh = self._item_hist.copy(), self._batch_hist.copy()
            tok, inf, dec = (float(x) for x in self._totals)
            items, batches, stages = self._items, self._batches, tuple(self._stages)
        return LatencyReport(
            items=items, batches=batches, wall_s=wall, throughput_items_s=items / wall,
            item_p50_ms=self._percentile_ms(ih, 0.5), item_p90_ms=self._percentile_ms(ih, 0.9),
            item_p99_ms=self._percentile_ms(ih, 0.99), batch_p50_ms=self._percentile_ms(bh, 0.5),
            batch_p90_ms=self._percentile_ms(bh, 0.9), batch_p99_ms=self._percentile_ms(bh, 0.99),
            tokenize_s=tok, inference_s=inf, decode_s=dec, items_per_stage=stages)
