"""The torch-free predictor: a verified bundle in, labels and probabilities out.

Dependency wall: this module and everything it imports use only the stdlib, numpy,
onnxruntime and tokenizers (`tests/test_runtime.py` checks that torch and transformers stay
out of `sys.modules`). The HTTP server and the Ray agents reuse `Predictor` as is.

    >>> p = Predictor("runs/bundle", providers="auto", threads=2)  # doctest: +SKIP
    >>> p.predict(["a gripping film", ("is it good?", "it is great")])  # doctest: +SKIP
    [{'label': 'positive', 'score': 0.98, 'probabilities': {...}}, ...]
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import enum
import io
import json
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, TextIO, TypeVar

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from bertedge import ner, qa
from bertedge.bundle import open_bundle
from bertedge.errors import BertedgeError
from bertedge.features import Features, length_sorted_batches, load_tokenizer, pad_batch, pad_id
from bertedge.tasks import decode_classification, get_task

T = TypeVar("T")
Pair = tuple[str, str | None]  # (text, text_pair or None)
Item = str | Sequence[str | None] | Mapping[str, Any]  # "text", (text, pair), {"text", "text_pair"}
Result = dict[str, Any]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_ALIASES = {
    "cpu": CPU, "cuda": CUDA, "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider", "rocm": "ROCMExecutionProvider",
}
# Graph input name -> which tokenizer array feeds it (old TF-style exports use the second names).
FEED_SOURCES = {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids",
                "input_mask": "attention_mask", "segment_ids": "token_type_ids"}
ONNX_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
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


# ----------------------------------------------------------------------------- batching


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter), read lazily.

    >>> list(batched(range(5), 2))
    [[0, 1], [2, 3], [4]]
    """
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def as_pair(item: Item) -> Pair | str:
    """An item as (text, pair), or a string saying what is wrong with it.

    >>> as_pair("hi"), as_pair(("q", "c")), as_pair({"text": "t", "text_pair": "p"}), as_pair("  ")
    (('hi', None), ('q', 'c'), ('t', 'p'), 'empty text')
    """
    text: Any
    pair: Any
    if isinstance(item, str):
        text, pair = item, None
    elif isinstance(item, Mapping):
        text = item.get("text", item.get("question"))
        pair = item.get("text_pair", item.get("context"))
    elif isinstance(item, Sequence) and len(item) == 2:
        text, pair = item[0], item[1]
    else:
        return f"a {type(item).__name__} is not an input (use a str, a (text, pair) tuple or a dict)"
    if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
        return "text and text_pair must be strings"
    if not text.strip():
        return "empty text"
    if pair is not None and not pair.strip():
        return "empty text_pair"
    return text, pair


def as_pairs(items: Iterable[Item]) -> list[Pair]:
    """Every item as (text, pair); one BertedgeError listing all bad items."""
    pairs, problems = [], []
    for i, item in enumerate(items):
        checked = as_pair(item)
        if isinstance(checked, str):
            problems.append(f"item {i}: {checked}")
        else:
            pairs.append(checked)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BertedgeError(f"{len(problems)} bad input(s): {'; '.join(problems[:5])}{more}",
                            "pass non-empty strings, (text, pair) tuples or {'text', 'text_pair'} dicts")
    return pairs


# ----------------------------------------------------------------------------- providers


def resolve_providers(requested: str | Sequence[str] | None,
                      available: Sequence[str] | None = None) -> list[str]:
    """Execution providers to ask for: explicit list > CUDA when asked and available > CPU.

    >>> resolve_providers(None, [CPU])
    ['CPUExecutionProvider']
    >>> resolve_providers("auto", [CPU]), resolve_providers("auto", [CUDA, CPU])
    (['CPUExecutionProvider'], ['CUDAExecutionProvider', 'CPUExecutionProvider'])
    >>> resolve_providers(["cuda"], [CUDA, CPU])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    available = list(available if available is not None else ort.get_available_providers())
    parts = [requested] if isinstance(requested, str) else list(requested or ["cpu"])
    names = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    if [n.lower() for n in names] == ["auto"]:
        return [CUDA, CPU] if CUDA in available else [CPU]
    wanted = [PROVIDER_ALIASES.get(n.lower(), n) for n in names] or [CPU]
    missing = [p for p in wanted if p not in available]
    if missing:
        gpu_hint = " (install onnxruntime-gpu for CUDA)" if CUDA in missing else ""
        raise BertedgeError(
            f"execution provider {', '.join(missing)} is not available in this onnxruntime "
            f"(available: {', '.join(available)})",
            f"use --providers cpu or auto{gpu_hint}")
    return list(dict.fromkeys([*wanted, CPU]))


def make_session(model: Path, providers: list[str], threads: int | None) -> ort.InferenceSession:
    """An onnxruntime session; warns when a requested accelerator silently fell back to CPU."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or 0)  # 0: onnxruntime picks (physical cores)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(str(model), options, providers=providers)
    except Exception as e:  # onnxruntime raises untyped errors (Fail, InvalidGraph, ...)
        raise BertedgeError(f"onnxruntime cannot load '{model.name}' ({e})",
                            "rebuild the bundle with `bertedge package`") from None
    lost = [p for p in providers if p not in session.get_providers()]
    if lost:
        warnings.warn(f"onnxruntime could not use {', '.join(lost)} and fell back to "
                      f"{', '.join(session.get_providers())}; check the CUDA / cuDNN install",
                      RuntimeWarning, stacklevel=3)
    return session


def feed_plan(session: ort.InferenceSession) -> dict[str, tuple[str, type]]:
    """Graph input name -> (tokenizer array, dtype); DistilBERT simply has no token_type_ids."""
    plan: dict[str, tuple[str, type]] = {}
    unknown: list[str] = []
    for node in session.get_inputs():
        if node.name in FEED_SOURCES and node.type in ONNX_INT_TYPES:
            plan[node.name] = (FEED_SOURCES[node.name], ONNX_INT_TYPES[node.type])
        else:
            unknown.append(f"{node.name} ({node.type})")
    if unknown or "input_ids" not in plan:
        raise BertedgeError(f"the model's graph inputs {', '.join(unknown) or '(no input_ids)'} "
                            "are not BERT-style token inputs",
                            "package an ONNX model made by `bertedge export`")
    return plan


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

    Raises:
        BertedgeError: the bundle is missing, corrupt or truncated, or a provider is unavailable.
    """

    def __init__(self, bundle: str | Path, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, batch_size: int = 32, aggregation: str = "first",
                 top_k: int = 1, max_answer_tokens: int = 30) -> None:
        if batch_size < 1:
            raise BertedgeError(f"batch size must be at least 1, got {batch_size}", "use --batch-size 32")
        requested = resolve_providers(providers)
        with open_bundle(bundle) as opened:
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


# ----------------------------------------------------------------------------- input streams


class InputFormat(str, enum.Enum):
    """How an input file holds its texts."""

    TXT = "txt"  # one text per line
    CSV = "csv"  # header row; --text-column (and --pair-column)
    TSV = "tsv"
    JSONL = "jsonl"  # one JSON object (or string) per line


class OutputFormat(str, enum.Enum):
    """How predictions are written to stdout."""

    JSONL = "jsonl"
    TABLE = "table"


SUFFIX_FORMATS = {".txt": InputFormat.TXT, ".text": InputFormat.TXT, ".csv": InputFormat.CSV,
                  ".tsv": InputFormat.TSV, ".jsonl": InputFormat.JSONL, ".ndjson": InputFormat.JSONL,
                  ".json": InputFormat.JSONL}


class InputRecord(NamedTuple):
    """One input line: an item to predict, or the problem that stops it (never both)."""

    line: int  # 1-based physical line number (argument number for command-line texts)
    item: Pair | None
    error: str | None = None
    truncated: bool = False  # the line was cut at the reader's byte limit


class Line(NamedTuple):
    number: int
    text: str | None  # None when the line is not valid UTF-8
    cut: bool  # longer than the byte limit; only its start was kept


def input_format_of(path: Path | None) -> InputFormat:
    """The input format a file name implies (stdin and unknown suffixes: one text per line).

    >>> input_format_of(Path("a.jsonl")), input_format_of(None)
    (<InputFormat.JSONL: 'jsonl'>, <InputFormat.TXT: 'txt'>)
    """
    return SUFFIX_FORMATS.get(path.suffix.lower(), InputFormat.TXT) if path else InputFormat.TXT


def read_lines(stream: IO[bytes], max_line_bytes: int = 1 << 20) -> Iterator[Line]:
    """Physical lines decoded as UTF-8, one at a time; a longer line keeps only its start.

    >>> import io
    >>> [tuple(x) for x in read_lines(io.BytesIO(b"ok\\n\\xff\\nabcdef"), max_line_bytes=4)]
    [(1, 'ok', False), (2, None, False), (3, 'abcd', True)]
    """
    number = 0
    while True:
        raw = stream.readline(max_line_bytes)
        if not raw:
            return
        number += 1
        cut = len(raw) == max_line_bytes and not raw.endswith(b"\n") and skip_rest(stream, max_line_bytes)
        try:  # a cut can split a multi-byte character: the incremental decoder drops that tail
            text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
        except UnicodeDecodeError:
            yield Line(number, None, cut)
            continue
        text = text.rstrip("\r\n")
        yield Line(number, text.removeprefix("\ufeff") if number == 1 else text, cut)


def skip_rest(stream: IO[bytes], max_line_bytes: int) -> bool:
    """Read past the rest of a line in bounded steps; whether anything but its newline was left."""
    more = False
    while True:
        rest = stream.readline(max_line_bytes)
        more = more or bool(rest.rstrip(b"\r\n"))
        if not rest or rest.endswith(b"\n"):
            return more


def read_records(stream: IO[bytes], fmt: InputFormat, text_columns: Sequence[str] = ("text",),
                 pair_columns: Sequence[str] = (), max_line_bytes: int = 1 << 20) -> Iterator[InputRecord]:
    """One record per input line (CSV: per data row), lazily: constant memory for any file size.

    Empty, non-UTF-8, unparsable or over-long structured lines become error records that keep
    their line number; an over-long plain-text line is cut and marked truncated. The text comes
    from the first of `text_columns` present (CSV header / JSONL keys), the pair likewise from
    `pair_columns` (JSONL default: "text_pair").
    """
    lines = read_lines(stream, max_line_bytes)
    if fmt is InputFormat.TXT:
        return (text_record(line) for line in lines)
    if fmt is InputFormat.JSONL:
        return (json_record(line, text_columns, pair_columns or ("text_pair",), max_line_bytes)
                for line in lines)
    return csv_records(lines, "\t" if fmt is InputFormat.TSV else ",", text_columns, pair_columns,
                       max_line_bytes)


def line_problem(line: Line) -> str | None:
    if line.text is None:
        return "not valid UTF-8"
    if not line.text.strip():
        return "empty line"
    return None


def text_record(line: Line) -> InputRecord:
    problem = line_problem(line)
    if problem or line.text is None:
        return InputRecord(line.number, None, problem)
    return InputRecord(line.number, (line.text, None), truncated=line.cut)


def json_record(line: Line, text_keys: Sequence[str], pair_keys: Sequence[str],
                max_line_bytes: int) -> InputRecord:
    problem = line_problem(line)
    if problem or line.text is None:
        return InputRecord(line.number, None, problem)
    if line.cut:
        return InputRecord(line.number, None, f"line is longer than {max_line_bytes} bytes")
    try:
        value = json.loads(line.text)
    except json.JSONDecodeError as e:
        return InputRecord(line.number, None, f"not valid JSON ({e.msg})")
    if isinstance(value, dict):
        text_key = next((k for k in text_keys if k in value), None)
        if text_key is None:
            return InputRecord(line.number, None, f"no {' / '.join(text_keys)} field "
                               f"(has: {', '.join(value) or 'nothing'})")
        pair_key = next((k for k in pair_keys if k in value), None)
        value = {"text": value[text_key], "text_pair": value.get(pair_key) if pair_key else None}
    checked = as_pair(value)
    if isinstance(checked, str):
        return InputRecord(line.number, None, checked)
    return InputRecord(line.number, checked)


def csv_records(lines: Iterator[Line], delimiter: str, text_columns: Sequence[str],
                pair_columns: Sequence[str], max_line_bytes: int) -> Iterator[InputRecord]:
    """Rows of a CSV / TSV file; bad physical lines become error records in their place."""
    held: list[InputRecord] = []  # bad lines met while the csv reader pulled its next row
    last = [0]

    def good_text() -> Iterator[str]:
        for line in lines:
            if line.text is None or line.cut:
                held.append(InputRecord(line.number, None, "not valid UTF-8" if line.text is None
                                        else f"line is longer than {max_line_bytes} bytes"))
                continue
            last[0] = line.number
            yield line.text + "\n"  # the csv reader keeps newlines inside quoted fields

    rows = csv.reader(good_text(), delimiter=delimiter)
    header = next(rows, None)
    if header is None:
        yield from held
        return
    text_at, pair_at = column_indices(header, text_columns, pair_columns)
    for row in rows:
        yield from held
        held.clear()
        if not any(cell.strip() for cell in row):
            yield InputRecord(last[0], None, "empty line")
        elif len(row) <= max(text_at, pair_at if pair_at is not None else -1):
            yield InputRecord(last[0], None, f"row has {len(row)} fields, header has {len(header)}")
        else:
            pair = row[pair_at] if pair_at is not None else None
            checked = as_pair((row[text_at], pair))
            yield (InputRecord(last[0], None, checked) if isinstance(checked, str)
                   else InputRecord(last[0], checked))
    yield from held


def column_indices(header: list[str], text_columns: Sequence[str],
                   pair_columns: Sequence[str]) -> tuple[int, int | None]:
    """Positions of the first present text (and pair) column in a CSV header.

    >>> column_indices(["id", "sentence", "label"], ["text", "sentence"], [])
    (1, None)
    """
    names = [h.strip() for h in header]
    found = [next((names.index(c) for c in want if c in names), None)
             for want in (text_columns, pair_columns)]
    missing = [" / ".join(want) for want, at in zip((text_columns, pair_columns), found, strict=True)
               if want and at is None]
    if missing or found[0] is None:
        raise BertedgeError(f"the input has no column {' nor '.join(missing)} (columns: {', '.join(names)})",
                            "pick one with --text-column / --text-pair-column")
    return found[0], found[1]


def records_from_texts(texts: Sequence[str]) -> Iterator[InputRecord]:
    """Command-line texts as records numbered from 1."""
    for number, text in enumerate(texts, start=1):
        checked = as_pair(text)
        yield (InputRecord(number, None, checked) if isinstance(checked, str)
               else InputRecord(number, checked))


def predict_stream(predictor: Predictor, records: Iterable[InputRecord], window: int = 256,
                   timings: LatencyRecorder | None = None) -> Iterator[tuple[InputRecord, Result]]:
    """(record, result) for every record, in input order; error records pass through as {"error"}.

    Reads `window` records at a time (sorted by length inside the window), so memory stays
    constant however long the input is.
    """
    for chunk in batched(records, window):
        good = [r.item for r in chunk if r.item is not None]
        answers = iter(predictor.predict(good, timings=timings))
        for record in chunk:
            if record.item is None:
                yield record, {"line": record.line, "error": record.error}
                continue
            result = {"line": record.line, **next(answers)}
            if record.truncated:
                result["truncated"] = True
            yield record, result


# ----------------------------------------------------------------------------- predict command


@dataclass
class PredictArgs:
    """Options of `bertedge predict`."""

    bundle: Path  # bundle folder or archive
    texts: list[str] = field(default_factory=list)  # texts given as arguments (then no file is read)
    input: Path | None = None  # input file; None or '-' reads stdin
    format: InputFormat | None = None  # input format; None: from the file suffix (stdin: txt)
    text_columns: tuple[str, ...] = ("text", "sentence", "content")  # first present holds the text
    pair_columns: tuple[str, ...] = ()  # first present holds the pair's second text (JSONL: text_pair)
    output: OutputFormat = OutputFormat.JSONL  # stdout format
    batch_size: int = 32  # items per inference batch
    threads: int | None = None  # onnxruntime intra-op threads
    providers: str | None = None  # cpu (default), auto, cuda, or a comma list of provider names
    report: bool = True  # print the summary and latency report to stderr
    aggregation: str = "first"  # NER: simple, first, max or average (see bertedge.ner.Aggregation)
    top_k: int = 1  # QA: answer spans per question
    max_line_bytes: int = 1 << 20  # longer input lines are cut (txt) or rejected (csv / jsonl)

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        self.output = OutputFormat(self.output)
        if self.format is not None:
            self.format = InputFormat(self.format)
        self.input = None if self.input is None or str(self.input) == "-" else Path(self.input)
        problems = []
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.threads is not None and self.threads < 0:
            problems.append(f"--threads must be 0 or more (got {self.threads})")
        if self.texts and self.input is not None:
            problems.append("texts were given both as arguments and with --input")
        if self.top_k < 1:
            problems.append(f"--top-k must be at least 1 (got {self.top_k})")
        if isinstance(self.input, Path) and not self.input.is_file():
            problems.append(f"input file '{self.input}' does not exist")
        if problems:
            raise BertedgeError("; ".join(problems), "see `bertedge predict --help`")


@dataclass(frozen=True)
class PredictSummary:
    """What a predict run did, for the closing summary."""

    items: int
    errors: int
    truncated: int
    latency: LatencyReport

    def format(self, max_length: int) -> str:
        lines = [f"{self.items} predicted, {self.errors} error record(s), "
                 f"{self.truncated} truncated to {max_length} tokens"]
        return "\n".join([*lines, self.latency.format()])


def run_predict(args: PredictArgs, stdout: TextIO, stderr: TextIO,
                stdin: IO[bytes] | None = None) -> PredictSummary:
    """Load the bundle, stream predictions to stdout, then the summary and latency to stderr."""
    predictor = Predictor(args.bundle, providers=args.providers, threads=args.threads,
                          batch_size=args.batch_size, aggregation=args.aggregation, top_k=args.top_k)
    with input_stream(args, stdin, stderr) as stream:
        if args.texts:
            records: Iterable[InputRecord] = records_from_texts(args.texts)
        else:
            fmt = args.format or input_format_of(args.input if isinstance(args.input, Path) else None)
            text_columns, pair_columns = args.text_columns, args.pair_columns
            if predictor.task.name == "qa" and not pair_columns:  # QA reads question + context
                text_columns = ("question", *text_columns)
                pair_columns = ("context",)
            records = read_records(stream, fmt, text_columns, pair_columns, args.max_line_bytes)
        timings = LatencyRecorder()
        counts = {"items": 0, "errors": 0, "truncated": 0}
        if args.output is OutputFormat.TABLE:
            stdout.write(f"{'line':>6}  {'label':<16} {'score':>6}  text\n")
        for n, (record, result) in enumerate(predict_stream(predictor, records, 8 * args.batch_size,
                                                            timings), start=1):
            counts["errors" if "error" in result else "items"] += 1
            counts["truncated"] += bool(result.get("truncated"))
            stdout.write(format_result(record, result, args.output))
            if n % (8 * args.batch_size) == 0:
                stdout.flush()  # downstream readers of a pipe see each window as it is done
    stdout.flush()
    summary = PredictSummary(**counts, latency=timings.report())
    if args.report:
        if summary.truncated:
            stderr.write(f"warning: {summary.truncated} input(s) were longer than "
                         f"{predictor.max_length} tokens and were truncated\n")
        stderr.write(summary.format(predictor.max_length) + "\n")
    return summary


@contextlib.contextmanager
def input_stream(args: PredictArgs, stdin: IO[bytes] | None, stderr: TextIO) -> Iterator[IO[bytes]]:
    """The bytes to read: the --input file, or stdin (neither is touched for argument texts)."""
    if isinstance(args.input, Path):
        with args.input.open("rb") as f:
            yield f
    elif args.texts:
        yield io.BytesIO()
    else:
        stream = stdin if stdin is not None else sys.stdin.buffer
        if stream.isatty():
            stderr.write("reading texts from stdin, one per line (Ctrl-D to end)\n")
        yield stream


def format_result(record: InputRecord, result: Result, output: OutputFormat) -> str:
    """One output line: a JSON object, or a table row."""
    if output is OutputFormat.JSONL:
        return json.dumps(result, ensure_ascii=False) + "\n"
    text = record.item[0] if record.item else ""
    text = text if len(text) <= 60 else text[:57] + "..."
    if "error" in result:
        return f"{record.line:>6}  {'ERROR':<16} {'':>6}  {result['error']}\n"
    mark = " [truncated]" if result.get("truncated") else ""
    label = str(result.get("label", json.dumps({k: v for k, v in result.items() if k != "line"})))
    score = result.get("score")
    score_text = f"{score:.3f}" if isinstance(score, float) else ""
    return f"{record.line:>6}  {label:<16} {score_text:>6}  {text}{mark}\n"
