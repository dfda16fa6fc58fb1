"""The torch-free predictor: a verified bundle in, labels and probabilities out.

Dependency wall: this module and everything it imports use only the stdlib, numpy,
onnxruntime and tokenizers (`tests/test_runtime.py` checks that torch and transformers stay
out of `sys.modules`). The HTTP server and the Ray agents reuse `Predictor` as is.

    >>> p = Predictor("runs/bundle", RuntimeOptions(providers="auto", threads=2))  # doctest: +SKIP
    >>> p.predict(["a gripping film", ("is it good?", "it is great")])  # doctest: +SKIP
    [{'label': 'positive', 'score': 0.98, 'probabilities': {...}}, ...]

A batch whose inference fails is retried row by row; only the rows that still fail get an
error record ({"error": "inference failed (...)"}), so one bad row never loses a whole run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import inference_precision
from bertedge.runtime.bundle import isa_warning, open_bundle
from bertedge.runtime.features import (
    Features,
    length_sorted_batches,
    load_tokenizer,
    pad_batch,
    pad_id,
)
from bertedge.runtime.latency import LatencyRecorder, LatencyReport  # noqa: F401  (re-exported)
from bertedge.runtime.manifest import Manifest
from bertedge.runtime.meta import check_max_length
from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.records import Item, Pair, as_pair
from bertedge.runtime.sessions import feed_plan, make_session, resolve_providers
from bertedge.runtime.stages import OpenedCascade, open_cascade
from bertedge.runtime.tasks import MARGIN_MASK, DecodeOptions, Result
from bertedge.runtime.text import has_text

# A text longer than this many characters per allowed token is cut before tokenizing, so one
# giant input cannot stall a batch; such a text is far past max_length tokens anyway.
CHARS_PER_TOKEN_CAP = 64
# How an error record of a row whose inference failed begins (serve answers it with a 500,
# an input problem with a 422).
INFERENCE_FAILED = "inference failed"

# ----------------------------------------------------------------------------- predictor


class Predictor:
    """A loaded bundle: tokenizer + inference session (the manifest's engine: onnxruntime, or
    OpenVINO with `bertedge[openvino]`) + the task's encoder and decoder. Thread-safe.

    A cascade bundle holds one session per stage: every predict call runs stage 1 on all its
    rows and pools the low-margin ones across the call's batches into the next stage
    (`bertedge.runtime.cascade.run_cascade`); a row's answer and stage depend on that row alone,
    and each result says which `stage` (1-based) answered it.

    Everything task-specific (item checks, windows, decoding, the result schema) comes from the
    bundle's `Task` record; the predictor only batches and runs the graph. The edges (serve,
    Ray) use it through the members their `PredictorLike` protocols list: `check`,
    `count_tokens`, `predict_isolated`, `example_item`, `providers`, `model_files`, `digest`,
    `describe`, `output_schema`, `labels`, `task_name`, `max_length`.

    Args:
        bundle: bundle folder or .tar.gz / .zip archive (checked against its manifest at load).
        options: how it runs (threads, providers, batch size, NER aggregation, QA top-k, the
            expected digest, spinning); default `RuntimeOptions()`.
        providers, threads, batch_size, aggregation, top_k, expect_digest: shorthands that
            replace the field of `options` of the same name (None: keep it).

    Raises:
        BertedgeError: the bundle is missing, corrupt or truncated, its max length exceeds the
            model's positions, an option is invalid, or a provider is unavailable.
    """

    def __init__(self, bundle: str | Path, options: RuntimeOptions | None = None, *,
                 providers: str | None = None, threads: int | None = None, batch_size: int | None = None,
                 aggregation: str | None = None, top_k: int | None = None,
                 expect_digest: str | None = None) -> None:
        shorthands = {"providers": providers, "threads": threads, "batch_size": batch_size,
                      "aggregation": aggregation, "top_k": top_k, "expect_digest": expect_digest}
        self.runtime = (options or RuntimeOptions()).replace(
            **{k: v for k, v in shorthands.items() if v is not None})
        self.options = DecodeOptions(aggregation=self.runtime.aggregation,  # type: ignore[arg-type]
                                     top_k=self.runtime.top_k, max_answer_tokens=self.runtime.max_answer_tokens)
        requested = resolve_providers(self.runtime.providers)
        with open_bundle(bundle, expect_digest=self.runtime.expect_digest) as opened:
            self.manifest: Manifest = opened.manifest  # read only here, by the accessors below
            self.meta = self.manifest.meta()
            if (isa := isa_warning(self.manifest)) is not None:
                warnings.warn(isa, RuntimeWarning, stacklevel=2)
            check_max_length(self.meta.max_length, self.meta.max_positions, f"the manifest of bundle '{bundle}'")
            self.engine = self.manifest.engine
            # the tokenizer the bundle check already loaded (padding and truncation off)
            self.tokenizer = opened.tokenizer or load_tokenizer(opened.tokenizer_path)
            self.pad_id = pad_id(self.tokenizer)
            # a cascade: one session per stage, every predict call answered through `run_cascade`
            self.cascade: OpenedCascade | None = None
            if self.manifest.cascade is not None:
                self.cascade = open_cascade(opened.root, self.manifest.cascade, self.meta.task, self.pad_id,
                                            requested, self.runtime.session_threads, spin=self.runtime.spin)
            self.session = self.cascade.sessions[0] if self.cascade is not None else make_session(
                opened.model_path, requested, self.runtime.session_threads, spin=self.runtime.spin, engine=self.engine,
                inference_precision=inference_precision(self.manifest.artifact))
        self.task = self.meta.task
        self.max_length = self.meta.max_length
        self.task.setup_tokenizer(self.tokenizer, self.max_length, self.meta.stride)
        self.labels: tuple[str, ...] = self.meta.labels
        self.batch_size = self.runtime.batch_size
        self.feeds = feed_plan(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.cascade is not None:  # every stage has the task's outputs (open_cascade checked)
            self.output_names = list(self.task.output_names)
        absent = [n for n in self.task.output_names if n not in self.output_names]
        if absent:
            raise BertedgeError(f"the model has no output {', '.join(absent)} "
                                f"(has {', '.join(self.output_names)}) for task '{self.task.name}'",
                                "package a model exported by `bertedge export`")

    # ------------------------------------------------------------------------- what it runs

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return list(self.session.get_providers())

    @property
    def task_name(self) -> str:
        """The task's name: classification, ner or qa."""
        return self.task.name

    @property
    def example_item(self) -> Pair:
        """An item every model of this task accepts (warm-up, probes)."""
        return self.task.example_item

    @property
    def digest(self) -> str:
        """The bundle's digest (what `bertedge package` printed; `expect_digest` pins it)."""
        return self.manifest.digest

    def model_files(self) -> dict[str, str]:
        """The model's files in the bundle, graph first, name -> SHA-256 (any engine)."""
        return {name: self.manifest.files[name].sha256 for name in self.manifest.model_files}

    def describe(self) -> dict[str, Any]:
        """What this predictor runs: task, labels, limits, precision, engine, providers, checksums."""
        m = self.manifest
        return {"task": m.task, "labels": list(m.labels), "max_length": m.max_length, "model_type": m.model_type,
                "precision": m.precision, "quantization": m.quantization, "bertedge_version": m.bertedge_version,
                "format_version": m.format_version, "created": m.created, "engine": self.engine,
                "providers": self.providers, "inputs": list(self.feeds), "digest": self.digest,
                "checksums": {name: f.sha256 for name, f in m.files.items()},
                "files": {name: {"sha256": f.sha256, "bytes": f.bytes} for name, f in m.files.items()},
                "artifact": m.provenance.get("artifact"),
                **({"stages": self._stages()} if self.cascade is not None else {})}

    def _stages(self) -> list[dict[str, Any]]:
        """A cascade's stages for `describe`: artifact, engine, files, delta, providers."""
        assert self.cascade is not None
        return [{**stage, "providers": list(session.get_providers())}
                for stage, session in zip(self.cascade.spec.to_dict()["stages"], self.cascade.sessions, strict=True)]

    def output_schema(self) -> dict[str, Any]:
        """The fields of a result (pyarrow-free; see `bertedge.runtime.tasks.Schema`), "truncated" included."""
        stage = {"stage": "int64"} if self.cascade is not None else {}  # 1-based: which stage answered
        return {**self.task.output_schema(self.labels, self.options), "truncated": "bool", **stage}

    # ------------------------------------------------------------------------- items

    def check(self, item: Item) -> Pair | str:
        """An item as (text, pair), or what is wrong with it for this model.

        A text of only whitespace, control or zero-width characters is empty, like a blank one.
        """
        checked = as_pair(item)
        if isinstance(checked, str):
            return checked
        text, pair = checked
        if not has_text(text):
            return "empty text"
        if pair is not None and not has_text(pair):
            return "empty text_pair"
        return self.task.check_item(checked) or checked

    def count_tokens(self, items: Sequence[Pair]) -> list[int]:
        """Tokens per checked item as the predictor pads it: its (first) window, at most max_length.

        A long QA context runs as several windows; they count as one (the padded length is what
        one long text costs the short texts it is batched with).
        """
        cap = self.max_length * CHARS_PER_TOKEN_CAP
        cut = [t[:cap] if p is None else (t[:cap], p[:cap]) for t, p in items]
        try:
            encodings = self.tokenizer.encode_batch(cut)
        except Exception:  # e.g. a QA question longer than a window: it will fail alone later
            return [self.max_length] * len(items)
        return [min(len(e.ids), self.max_length) for e in encodings]

    # ------------------------------------------------------------------------- predicting

    def predict(self, items: Iterable[Item], batch_size: int | None = None,
                timings: LatencyRecorder | None = None) -> list[Result]:
        """Predict a list of items; results come back in input order.

        Args:
            items: each a str, a (text, pair) tuple or a {"text", "text_pair"} dict
                ({"question", "context"} for QA).
            batch_size: items per batch (default: the predictor's).
            timings: records tokenize / inference / decode time per batch when given.

        Returns:
            One dict per item, e.g. {"label", "score", "probabilities"} for classification,
            plus "truncated": True when the item was longer than max_length tokens.

        Raises:
            BertedgeError: one error listing every bad item, or every item whose inference
                failed (nothing is returned then).
        """
        items = list(items)
        checked = [self.check(item) for item in items]
        self._raise_for([c if isinstance(c, str) else None for c in checked])
        pairs = [c for c in checked if not isinstance(c, str)]
        results = self._predict_pairs(pairs, batch_size, timings)
        self._raise_for([r.get("error") for r in results])
        return results

    def predict_isolated(self, items: Iterable[Item], batch_size: int | None = None,
                         timings: LatencyRecorder | None = None) -> list[Result]:
        """Like `predict`, but a bad item, or one whose inference fails, gives {"error": why} in
        its place and never fails the others."""
        checked = [self.check(item) for item in items]
        good = [i for i, c in enumerate(checked) if not isinstance(c, str)]
        results: list[Result] = [{"error": c} if isinstance(c, str) else {} for c in checked]
        predicted = self._predict_pairs([checked[i] for i in good], batch_size, timings)  # type: ignore[misc]
        for i, result in zip(good, predicted, strict=True):
            results[i] = result
        return results

    def _raise_for(self, problems: list[str | None]) -> None:
        bad = [f"item {i}: {p}" for i, p in enumerate(problems) if p]
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise BertedgeError(f"{len(bad)} bad input(s): {'; '.join(bad[:5])}{more} (a {self.task.name} model)",
                                "pass non-empty texts; QA takes (question, context) pairs or "
                                "{'question', 'context'} dicts, NER one text")

    def _encode_each(self, pairs: list[Pair]) -> tuple[Features, list[int], dict[int, str]]:
        """Windows of the items the tokenizer takes, their indices, and why it refused the others."""
        try:
            return self.encode_windows(pairs), list(range(len(pairs))), {}
        except BertedgeError:  # find the item(s) at fault; the others are still predicted
            failed: dict[int, str] = {}
            for i, pair in enumerate(pairs):
                try:
                    self.encode_windows([pair])
                except BertedgeError as e:
                    failed[i] = f"{e.problem} -- {e.fix}" if e.fix else e.problem
            good = [i for i in range(len(pairs)) if i not in failed]
            windows = self.encode_windows([pairs[i] for i in good]) if good else Features([], [], None, [])
            return windows, good, failed

    def _predict_pairs(self, pairs: list[Pair], batch_size: int | None,
                       timings: LatencyRecorder | None) -> list[Result]:
        """Checked pairs -> results; an item the tokenizer refuses or whose inference fails gets
        {"error"} alone."""
        if not pairs:
            return []
        started = time.perf_counter()
        windows, good, failed = self._encode_each(pairs)
        tokenize_s = time.perf_counter() - started
        lengths = [len(e.ids) for e in windows.encodings]
        outputs: list[dict[str, np.ndarray]] = [{} for _ in lengths]
        batches = list(length_sorted_batches(lengths, batch_size or self.batch_size)) if lengths else []
        inference_s: list[float] = []
        broken: dict[int, str] = {}  # window -> why its inference failed
        stages = [0] * len(lengths)  # per window: the 0-based cascade stage that answered it
        if self.cascade is not None and batches:  # one call: escalations pooled across its batches
            t0 = time.perf_counter()
            for i, raw, stage in self._cascade_contained(windows, batches, batch_size or self.batch_size, broken):
                outputs[i], stages[i] = self._cut(raw, lengths[i]), stage
            inference_s = [(time.perf_counter() - t0) * len(index) / len(lengths) for index in batches]
        for index in batches if self.cascade is None else []:
            t0 = time.perf_counter()
            for i, raw in self._run_contained(windows.encodings, index, broken):
                outputs[i] = self._cut(raw, lengths[i])
            inference_s.append(time.perf_counter() - t0)
        lost = {windows.example_index[w] for w in broken}  # positions in `good`
        for position in lost:
            failed[good[position]] = broken[min(w for w in broken if windows.example_index[w] == position)]
        t1 = time.perf_counter()
        kept = [p for p in range(len(good)) if p not in lost]
        decoded = self.task.decode([pairs[good[p]] for p in kept], _subset(windows, kept),
                                   [outputs[w] for w in range(len(lengths)) if windows.example_index[w] not in lost],
                                   self.labels, self.options) if kept else []
        decode_s = time.perf_counter() - t1
        if timings is not None:
            for index, seconds in zip(batches, inference_s, strict=True):
                share = len(index) / len(lengths)
                timings.add(len(index), tokenize_s * share, seconds, decode_s * share)
        results: list[Result] = [{"error": failed[i]} if i in failed else {} for i in range(len(pairs))]
        item_stage: dict[int, int] = {}  # an item's windows escalate together (run_cascade's groups)
        for w, item in enumerate(windows.example_index):
            item_stage[item] = max(item_stage.get(item, 0), stages[w] + 1)
        for p, result in zip(kept, decoded, strict=True):
            result = {**result, "truncated": True} if windows.truncated[p] else result
            results[good[p]] = {**result, "stage": item_stage[p]} if self.cascade is not None else result
        if timings is not None and self.cascade is not None:
            timings.count_stages([item_stage[p] for p in kept])
        return results

    def _cut(self, raw: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
        """A window's outputs over its own tokens (per-token tasks) or as they are."""
        return {k: v[:length] for k, v in raw.items()} if self.task.per_token_outputs else raw

    def _cascade_contained(self, windows: Features, batches: list[list[int]], batch_size: int,
                           broken: dict[int, str]) -> list[tuple[int, dict[str, np.ndarray], int]]:
        """(window, its outputs, its 0-based stage) for these batches, run as one cascade call;
        when it fails, each item's windows are run alone (a window's answer and stage do not
        depend on its batch mates) and the ones that still fail go into `broken` with why."""
        assert self.cascade is not None
        try:
            feeds = [self.cascade_feeds([windows.encodings[i] for i in index]) for index in batches]
            groups = [[windows.example_index[i] for i in index] for index in batches]
            out, stages = self.cascade.run(feeds, batch_size, groups)
            return [(i, {k: v[row] for k, v in out[b].items()}, int(stages[b][row]))
                    for b, index in enumerate(batches) for row, i in enumerate(index)]
        except Exception as e:  # onnxruntime / OpenVINO raise untyped errors
            items: dict[int, list[int]] = {}
            for i in (i for index in batches for i in index):
                items.setdefault(windows.example_index[i], []).append(i)
            if len(items) == 1:
                for i in next(iter(items.values())):
                    broken[i] = f"{INFERENCE_FAILED} ({type(e).__name__}: {_first_line(e)})"
                return []
        return [got for item in items.values() for got in self._cascade_contained(windows, [item], batch_size, broken)]

    def cascade_feeds(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """A cascade batch: padded token arrays by tokenizer name, and the task's MARGIN_MASK."""
        arrays = pad_batch(encodings, self.pad_id)
        return {**arrays, MARGIN_MASK: self.task.margin_mask(encodings, arrays["input_ids"].shape[1])}

    def _run_contained(self, encodings: Sequence[Encoding], index: list[int],
                       broken: dict[int, str]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """(window, its outputs) for one batch; when the batch fails, each window is run alone
        and the ones that still fail go into `broken` with why."""
        try:
            raw = self.run_encodings([encodings[i] for i in index])
            return [(i, {k: v[row] for k, v in raw.items()}) for row, i in enumerate(index)]
        except Exception as e:  # onnxruntime / OpenVINO raise untyped errors
            if len(index) == 1:
                broken[index[0]] = f"{INFERENCE_FAILED} ({type(e).__name__}: {_first_line(e)})"
                return []
        return [got for i in index for got in self._run_contained(encodings, [i], broken)]

    def encode_windows(self, pairs: list[Pair]) -> Features:
        """Tokenize checked items into model windows (QA: several per long context).

        Raises:
            BertedgeError: the tokenizer refused an item (it never raises anything else).
        """
        try:
            return self.task.encode_items(self.tokenizer, pairs, self.max_length * CHARS_PER_TOKEN_CAP)
        except BertedgeError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions
            raise BertedgeError(f"tokenizing failed ({e})", "check the input text") from None

    def features(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """The graph feed for a batch: padded to its longest item, by graph input name."""
        arrays = pad_batch(encodings, self.pad_id)
        return {name: arrays[source].astype(dtype, copy=False)
                for name, (source, dtype) in self.feeds.items()}

    def run_encodings(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """Raw graph outputs, by name, for already-tokenized items (a cascade's, through its stages)."""
        if self.cascade is not None:
            return self.cascade.run_batch(self.cascade_feeds(encodings))
        outputs = self.session.run(self.output_names, self.features(encodings))
        return dict(zip(self.output_names, outputs, strict=True))


def _subset(features: Features, kept: list[int]) -> Features:
    """The windows of the items at positions `kept`, renumbered 0..len(kept)-1.

    >>> f = _subset(Features(["a", "b", "c"], [0, 1, 1], None, [False, True]), [1])
    >>> f.encodings, f.example_index, f.truncated
    (['b', 'c'], [0, 0], [True])
    """
    if len(kept) == len(features.truncated):
        return features
    new = {old: n for n, old in enumerate(kept)}
    windows = [w for w, item in enumerate(features.example_index) if item in new]
    return Features([features.encodings[w] for w in windows], [new[features.example_index[w]] for w in windows],
                    None, [features.truncated[p] for p in kept])


def _first_line(e: BaseException) -> str:
    """An exception's message cut to its first line and 200 characters (engines write pages).

    >>> _first_line(RuntimeError("[ONNXRuntimeError] : 2 : bad\\nstack..."))
    '[ONNXRuntimeError] : 2 : bad'
    """
    return (str(e).strip().splitlines() or [""])[0][:200]
