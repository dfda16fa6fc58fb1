"""The torch-free predictor: a verified bundle in, labels and probabilities out.

Dependency wall: this module and everything it imports use only the stdlib, numpy,
onnxruntime and tokenizers (`tests/test_runtime.py` checks that torch and transformers stay
out of `sys.modules`). The HTTP server and the Ray agents reuse `Predictor` as is.

    >>> p = Predictor("runs/bundle", providers="auto", threads=2)  # doctest: +SKIP
    >>> p.predict(["a gripping film", ("is it good?", "it is great")])  # doctest: +SKIP
    [{'label': 'positive', 'score': 0.98, 'probabilities': {...}}, ...]
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from bertedge.errors import BertedgeError
from bertedge.runtime.bundle import open_bundle
from bertedge.runtime.features import (
    Features,
    length_sorted_batches,
    load_tokenizer,
    pad_batch,
    pad_id,
)
from bertedge.runtime.records import Item, Pair, as_pairs
from bertedge.runtime.sessions import feed_plan, make_session, resolve_providers
from bertedge.runtime.tasks import decode_classification, get_task, ner, qa

Result = dict[str, Any]
# A text longer than this many characters per allowed token is cut before tokenizing, so one
# giant input cannot stall a batch; such a text is far past max_length tokens anyway.
CHARS_PER_TOKEN_CAP = 64


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskRuntime:
    """How a task's items become windows and its graph outputs become answers."""

    check: Callable[[Pair], str | None]  # what is wrong with an item for this task, if anything
    encode: Callable[[Tokenizer, list[Pair], int], Features]  # (tokenizer, items, char cap)
    decode: Callable[[Predictor, list[Pair], Features, list[dict[str, np.ndarray]]], list[Result]]


def _one_window_each(tokenizer: Tokenizer, pairs: list[Pair], cap: int) -> Features:
    """Classification / NER: one window per item, truncated at max_length."""
    cut = [len(t) > cap or (p is not None and len(p) > cap) for t, p in pairs]
    inputs = [t[:cap] if p is None else (t[:cap], p[:cap]) for t, p in pairs]
    try:
        encodings = tokenizer.encode_batch(inputs)
    except Exception as e:  # e.g. a pair given to a tokenizer with no pair template
        raise BertedgeError(f"tokenizing failed ({e})", "check the inputs (pairs need a pair-aware tokenizer)") from None
    return Features(encodings, list(range(len(pairs))),
                    truncated=[c or bool(e.overflowing) for c, e in zip(cut, encodings, strict=True)])


def _qa_windows(tokenizer: Tokenizer, pairs: list[Pair], cap: int) -> Features:
    """QA: (question, context) -> overlapping windows over the whole context (nothing is cut)."""
    return qa.encode_qa(tokenizer, [q for q, _ in pairs], [c or "" for _, c in pairs])


def _decode_classification(p: Predictor, pairs: list[Pair], w: Features,
                           outputs: list[dict[str, np.ndarray]]) -> list[Result]:
    return decode_classification(np.stack([o["logits"] for o in outputs]), list(p.labels))


def _decode_ner(p: Predictor, pairs: list[Pair], w: Features, outputs: list[dict[str, np.ndarray]]) -> list[Result]:
    results = []
    for (text, _), enc, out in zip(pairs, w.encodings, outputs, strict=True):
        entities = ner.group_entities(text, out["logits"], enc.word_ids, enc.offsets, p.labels, p.aggregation)
        results.append({"entities": entities})
    return results


def _decode_qa(p: Predictor, pairs: list[Pair], w: Features, outputs: list[dict[str, np.ndarray]]) -> list[Result]:
    per_item: list[list[Any]] = [[] for _ in pairs]
    for enc, owner, out in zip(w.encodings, w.example_index, outputs, strict=True):
        per_item[owner].append((enc, out["start_logits"], out["end_logits"]))
    results = []
    for (_, context), windows in zip(pairs, per_item, strict=True):
        spans = qa.best_spans(windows, context or "", top_k=p.top_k, max_answer_tokens=p.max_answer_tokens)
        best = spans[0] if spans else {"text": "", "start": -1, "end": -1, "score": 0.0}
        result: Result = {"answer": best["text"], "start": best["start"], "end": best["end"], "score": best["score"],
                          "windows": len(windows)}
        if p.top_k > 1:
            result["answers"] = [{k: v for k, v in s.items() if k != "window"} for s in spans]
        results.append(result)
    return results


def _no_pair(item: Pair) -> str | None:
    return "this model takes one text, not a pair" if item[1] is not None else None


def _needs_pair(item: Pair) -> str | None:
    return None if item[1] is not None else "a QA item needs a question and a context"


TASK_RUNTIMES: dict[str, TaskRuntime] = {
    "classification": TaskRuntime(check=lambda item: None, encode=_one_window_each, decode=_decode_classification),
    "ner": TaskRuntime(check=_no_pair, encode=_one_window_each, decode=_decode_ner),
    "qa": TaskRuntime(check=_needs_pair, encode=_qa_windows, decode=_decode_qa),
}


# ----------------------------------------------------------------------------- latency


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

    def format(self) -> str:
        """A few human lines for stderr."""
        if not self.items:
            return "latency: no items predicted"
        busy = max(self.tokenize_s + self.inference_s + self.decode_s, 1e-12)
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
            items, batches = self._items, self._batches
        return LatencyReport(
            items=items, batches=batches, wall_s=wall, throughput_items_s=items / wall,
            item_p50_ms=self._percentile_ms(ih, 0.5), item_p90_ms=self._percentile_ms(ih, 0.9),
            item_p99_ms=self._percentile_ms(ih, 0.99), batch_p50_ms=self._percentile_ms(bh, 0.5),
            batch_p90_ms=self._percentile_ms(bh, 0.9), batch_p99_ms=self._percentile_ms(bh, 0.99),
            tokenize_s=tok, inference_s=inf, decode_s=dec)


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """A loaded bundle: tokenizer + onnxruntime session + the task's decoder. Thread-safe.

    Args:
        bundle: bundle folder or .tar.gz / .zip archive (checked against its manifest at load).
        providers: None or "cpu"; "auto" (CUDA when available, else CPU); "cuda"; or an explicit
            list of onnxruntime provider names. An unavailable explicit provider fails fast.
        threads: onnxruntime intra-op threads (None: one per physical core).
        batch_size: items per inference batch.
        aggregation: NER: how sub-words become words (simple, first, max, average).
        top_k: QA: how many answer spans to return (the best is always "answer").
        max_answer_tokens: QA: the longest answer considered.
        expect_digest: refuse any bundle but the one with this digest (printed by `bertedge package`).

    Raises:
        BertedgeError: the bundle is missing, corrupt or truncated, or a provider is unavailable.
    """

    def __init__(self, bundle: str | Path, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, batch_size: int = 32, aggregation: str = "first",
                 top_k: int = 1, max_answer_tokens: int = 30, expect_digest: str | None = None) -> None:
        if batch_size < 1:
            raise BertedgeError(f"batch size must be at least 1, got {batch_size}", "use --batch-size 32")
        requested = resolve_providers(providers)
        with open_bundle(bundle, expect_digest=expect_digest) as opened:
            self.manifest: dict[str, Any] = opened.manifest
            self.session = make_session(opened.model_path, requested, threads)
            self.max_length = int(self.manifest["max_length"])
            self.tokenizer = load_tokenizer(opened.tokenizer_path)
            self.tokenizer.enable_truncation(self.max_length)
        self.task = get_task(self.manifest["task"])
        if self.task.name not in TASK_RUNTIMES:
            raise BertedgeError(f"this bertedge cannot run '{self.task.name}' bundles yet",
                                "upgrade: pip install -U bertedge")
        self.runtime = TASK_RUNTIMES[self.task.name]
        try:
            self.aggregation = ner.Aggregation(aggregation)
        except ValueError:
            raise BertedgeError(f"unknown NER aggregation '{aggregation}'",
                                f"use one of: {', '.join(a.value for a in ner.Aggregation)}") from None
        self.top_k, self.max_answer_tokens = top_k, max_answer_tokens
        if self.task.name == "qa":
            stride = int(self.manifest.get("stride") or min(128, self.max_length // 2))
            qa.configure_windows(self.tokenizer, self.max_length, stride)
        self.labels: tuple[str, ...] = tuple(self.manifest["labels"])
        self.batch_size = batch_size
        self.pad_id = pad_id(self.tokenizer)
        self.feeds = feed_plan(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]
        absent = [n for n in self.task.output_names if n not in self.output_names]
        if absent:
            raise BertedgeError(f"the model has no output {', '.join(absent)} "
                                f"(has {', '.join(self.output_names)}) for task '{self.task.name}'",
                                "package a model exported by `bertedge export`")

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return list(self.session.get_providers())

    def describe(self) -> dict[str, Any]:
        """What this predictor runs: task, labels, limits, precision, providers."""
        keys = ("task", "labels", "max_length", "model_type", "precision", "quantization",
                "bertedge_version")
        return {**{k: self.manifest.get(k) for k in keys}, "providers": self.providers,
                "inputs": list(self.feeds)}

    def predict(self, items: Iterable[Item], batch_size: int | None = None,
                timings: LatencyRecorder | None = None) -> list[Result]:
        """Predict a list of items; results come back in input order.

        Args:
            items: each a str, a (text, pair) tuple or a {"text", "text_pair"} dict.
            batch_size: items per batch (default: the predictor's).
            timings: records tokenize / inference / decode time per batch when given.

        Returns:
            One dict per item, e.g. {"label", "score", "probabilities"} for classification,
            plus "truncated": True when the item was longer than max_length tokens.
        """
        pairs = as_pairs(items)
        problems = [f"item {i}: {msg}" for i, pair in enumerate(pairs) if (msg := self.runtime.check(pair))]
        if problems:
            raise BertedgeError(f"{len(problems)} bad input(s) for a {self.task.name} model: {'; '.join(problems[:5])}",
                                "QA takes (question, context) pairs or {'question', 'context'} dicts; NER one text")
        if not pairs:
            return []
        started = time.perf_counter()
        windows = self.encode_windows(pairs)
        tokenize_s = time.perf_counter() - started
        lengths = [len(e.ids) for e in windows.encodings]
        outputs: list[dict[str, np.ndarray]] = [{} for _ in lengths]
        batches = list(length_sorted_batches(lengths, batch_size or self.batch_size))
        inference_s = []
        for index in batches:
            t0 = time.perf_counter()
            raw = self.run_encodings([windows.encodings[i] for i in index])
            inference_s.append(time.perf_counter() - t0)
            for row, i in enumerate(index):
                outputs[i] = {k: v[row, : lengths[i]] if self.task.per_token_outputs else v[row] for k, v in raw.items()}
        t1 = time.perf_counter()
        results = self.runtime.decode(self, pairs, windows, outputs)
        decode_s = time.perf_counter() - t1
        if timings is not None:
            for index, seconds in zip(batches, inference_s, strict=True):
                share = len(index) / len(lengths)
                timings.add(len(index), tokenize_s * share, seconds, decode_s * share)
        return [{**r, "truncated": True} if cut else r for r, cut in zip(results, windows.truncated, strict=True)]

    def encode_windows(self, pairs: list[Pair]) -> Features:
        """Tokenize items into model windows (QA: several per long context)."""
        return self.runtime.encode(self.tokenizer, pairs, self.max_length * CHARS_PER_TOKEN_CAP)

    def features(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """The graph feed for a batch: padded to its longest item, by graph input name."""
        arrays = pad_batch(encodings, self.pad_id)
        return {name: arrays[source].astype(dtype, copy=False)
                for name, (source, dtype) in self.feeds.items()}

    def run_encodings(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """Raw graph outputs, by name, for already-tokenized items (reused by serve / Ray)."""
        outputs = self.session.run(self.output_names, self.features(encodings))
        return dict(zip(self.output_names, outputs, strict=True))


