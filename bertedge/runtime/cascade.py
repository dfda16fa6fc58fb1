"""Cascades: a fast stage answers the rows it is sure of, later stages answer the rest.

A cascade is a chain of artifacts of one model. Stage 1 runs on every batch; a row whose
confidence margin (the task's `margin`: top-1 minus top-2 probability, or its NER / QA kin) is
below the stage's delta escalates to the next stage. Escalated rows are pooled across all the
batches of one call and re-batched (length-sorted, padded to each pooled batch's longest row),
because a small second call in nearly every batch costs more than it saves. The later stage's
outputs are written back into each original batch, so callers see one output dict per batch,
rows in input order, plus which stage answered each row.

When every stage is batch-invariant the cascade is too: whether a row escalates depends on that
row's own outputs alone (or, with `groups`, on its item's rows alone).

Torch-free: the runtime (Predictor) runs cascades; export calibrates the deltas
(`bertedge.toolchain.cascade`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import ENGINES

Feeds = dict[str, np.ndarray]  # a padded batch by tokenizer name (input_ids, attention_mask, ...)
Outputs = dict[str, np.ndarray]  # a batch's outputs by graph output name
Runner = Callable[[Feeds], Outputs]
Margin = Callable[[Outputs, Feeds], np.ndarray]  # one margin per row; a task's `margin`
Row = tuple[int, int]  # (batch, row in that batch)

# Margins are probabilities' differences, at most 1: the smallest delta above 1 escalates every row.
ALWAYS = float(np.nextafter(1.0, 2.0))
SPEC_FIX = ("a cascade needs 2 or more stages, each with a known engine, that engine's files "
            "(plain names, none shared) and a delta in [0, 1] (or just above 1: escalate every row); "
            "re-run `bertedge export`")


@dataclass(frozen=True)
class CascadeStage:
    """One stage of a cascade, as the bundle manifest names it."""

    artifact: str  # the artifact kind it was built as (e.g. "int8-openvino", "int8")
    engine: str  # a key of ENGINES
    files: tuple[str, ...]  # its files inside the bundle, graph first (e.g. stage1.xml, stage1.bin)
    delta: float  # rows with margin < delta go on to the next stage; unused on the last stage

    def problems(self, n: int) -> list[str]:
        """What is wrong with this stage (the n-th, 1-based), if anything."""
        out = []
        if not isinstance(self.artifact, str) or not self.artifact:
            out.append(f"stage {n} has no artifact name")
        if not isinstance(self.engine, str) or self.engine not in ENGINES:
            out.append(f"stage {n} engine {self.engine!r} is unknown (known: {', '.join(ENGINES)})")
        else:
            wanted = [PurePosixPath(f).suffix for f in ENGINES[self.engine].bundle_files]
            if [PurePosixPath(str(f)).suffix for f in self.files] != wanted:
                out.append(f"stage {n} files {list(self.files)} are not one {' + '.join(wanted)} set")
        if any(not _plain_name(f) for f in self.files):
            out.append(f"stage {n} files {list(self.files)} are not plain file names")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) \
                or not math.isfinite(self.delta) or not 0 <= self.delta <= ALWAYS:
            out.append(f"stage {n} delta {self.delta!r} is not a number in [0, 1] (or {ALWAYS!r}: every row)")
        return out


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name \
        and name not in (".", "..")


@dataclass(frozen=True)
class CascadeSpec:
    """The stages of a cascade, first (fastest) to last (faithful); the manifest's `cascade`.

    >>> spec = CascadeSpec((CascadeStage("int8-openvino", "openvino", ("stage1.xml", "stage1.bin"), 0.2),
    ...                     CascadeStage("int8", "onnxruntime", ("stage2.onnx",), 0.0)))
    >>> spec.deltas, CascadeSpec.from_dict(spec.to_dict()) == spec
    ((0.2,), True)
    >>> CascadeSpec(spec.stages[:1])
    Traceback (most recent call last):
    ...
    bertedge.errors.BertedgeError: bad cascade: it has 1 stage(s) -- a cascade needs 2 or more stages, each with a known engine, that engine's files (plain names, none shared) and a delta in [0, 1] (or just above 1: escalate every row); re-run `bertedge export`
    """

    stages: tuple[CascadeStage, ...]

    def __post_init__(self) -> None:
        problems = [] if len(self.stages) >= 2 else [f"it has {len(self.stages)} stage(s)"]
        for n, stage in enumerate(self.stages, start=1):
            problems += stage.problems(n)
        files = [f for s in self.stages for f in s.files]
        if len(set(files)) != len(files):
            problems.append(f"stages share file names ({', '.join(files)})")
        if problems:
            raise BertedgeError(f"bad cascade: {'; '.join(problems)}", SPEC_FIX)

    @property
    def deltas(self) -> tuple[float, ...]:
        """The escalation thresholds, one per stage but the last."""
        return tuple(float(s.delta) for s in self.stages[:-1])

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [{"artifact": s.artifact, "engine": s.engine, "files": list(s.files),
                            "delta": float(s.delta)} for s in self.stages]}

    @classmethod
    def from_dict(cls, raw: Any) -> CascadeSpec:
        """Parse the manifest's `cascade` field; every problem is listed in one error."""
        stages = raw.get("stages") if isinstance(raw, dict) else None
        if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
            raise BertedgeError("bad cascade: 'stages' is not a list of objects", SPEC_FIX)
        problems = [f"stage {n} has no {key!r}" for n, s in enumerate(stages, start=1)
                    for key in ("artifact", "engine", "files", "delta") if key not in s]
        problems += [f"stage {n} 'files' is not a list" for n, s in enumerate(stages, start=1)
                     if not isinstance(s.get("files", []), list)]
        if problems:
            raise BertedgeError(f"bad cascade: {'; '.join(problems)}", SPEC_FIX)
        return cls(tuple(CascadeStage(s["artifact"], s["engine"], tuple(s["files"]), s["delta"]) for s in stages))


@dataclass(frozen=True)
class CascadeStats:
    """How many rows each stage answered (for the latency report and serve's /metrics).

    >>> stats = CascadeStats.count([np.array([0, 1, 0]), np.array([1])], 2)
    >>> stats.rows, stats.escalated, (stats + stats).to_dict()
    ((2, 2), 2, {'rows_per_stage': [4, 4], 'escalated': 4, 'escalated_share': 0.5})
    """

    rows: tuple[int, ...]  # rows answered by stage 1, stage 2, ...

    @classmethod
    def count(cls, stages: Sequence[np.ndarray], n_stages: int) -> CascadeStats:
        """Count the `stage` arrays `run_cascade` returns."""
        counts = np.zeros(n_stages, dtype=np.int64)
        for stage in stages:
            counts += np.bincount(np.asarray(stage, dtype=np.int64), minlength=n_stages)[:n_stages]
        return cls(tuple(int(c) for c in counts))

    @property
    def escalated(self) -> int:
        """Rows some later stage answered."""
        return sum(self.rows[1:])

    def __add__(self, other: CascadeStats) -> CascadeStats:
        return CascadeStats(tuple(a + b for a, b in zip(self.rows, other.rows, strict=True)))

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.rows)
        return {"rows_per_stage": list(self.rows), "escalated": self.escalated,
                "escalated_share": self.escalated / total if total else 0.0}


def escalates(margins: np.ndarray, delta: float) -> np.ndarray:
    """The escalation rule, here only: margin below delta, or NaN while delta > 0 (0 escalates
    nothing, so a cascade at delta 0 answers exactly like its first stage).

    >>> escalates(np.array([0.1, 0.5, np.nan]), 0.5).tolist(), escalates(np.array([np.nan]), 0.0).tolist()
    ([True, False, True], [False])
    """
    margins = np.asarray(margins, dtype=np.float64)
    return (margins < delta) | (np.isnan(margins) & (delta > 0))


def graph_runner(session: Any, output_names: Sequence[str], plan: dict[str, tuple[str, type]]) -> Runner:
    """A stage's runner: tokenizer-named feeds -> its graph's inputs (`sessions.feed_plan`) ->
    outputs by name. Feeds the graph does not read (MARGIN_MASK) are left out."""
    names = list(output_names)

    def run(feeds: Feeds) -> Outputs:
        graph_feeds: Feeds = {name: feeds[source].astype(dtype, copy=False) for name, (source, dtype) in plan.items()}
        return dict(zip(names, session.run(names, graph_feeds), strict=True))

    return run


def run_cascade(batches: Sequence[Feeds], runners: Sequence[Runner], deltas: Sequence[float],
                margin: Margin, pad_id: int, batch_size: int, *, per_token: bool,
                groups: Sequence[Sequence[int]] | None = None) -> tuple[list[Outputs], list[np.ndarray]]:
    """Run a cascade over right-padded feed batches, pooling each stage's escalations.

    Args:
        batches: feeds by tokenizer name; each needs input_ids and attention_mask (contiguous
            ones from the left); MARGIN_MASK, when present, travels with its rows.
        runners: one per stage, first (fastest) to last.
        deltas: per stage but the last (a last value, if given, is ignored): a row whose margin
            is below it goes on to the next stage (`escalates`). 0 escalates nothing.
        margin: the task's margin, (outputs, feeds) -> one value per row.
        pad_id: the tokenizer's padding id (pooled input_ids are padded with it, the rest with 0).
        batch_size: the most rows in one pooled later-stage batch.
        per_token: outputs have a sequence axis (NER, QA): only a row's real tokens are written
            back; its padding keeps the values of the batch it came from.
        groups: per batch, an item id per row; when any row of an item escalates, all of that
            item's rows at the same stage do (QA windows of one context stay on one stage).

    Returns:
        (outputs, stage) per batch: outputs like stage 1's, rows in input order, each row from
        the stage that answered it; stage holds that stage's 0-based index per row.

    Raises:
        BertedgeError: the arguments disagree (counts, deltas, a stage's outputs or margins).
    """
    _check_call(batches, runners, deltas, batch_size, groups)
    outputs = [{k: np.array(v, copy=True) for k, v in runners[0](b).items()} for b in batches]
    stages = [np.zeros(len(b["input_ids"]), dtype=np.int64) for b in batches]
    lengths = [np.asarray(b["attention_mask"]).sum(axis=1).astype(np.int64) for b in batches]
    rows = [(b, r) for b in range(len(batches)) for r in range(len(stages[b]))]
    margins = np.concatenate([_margins(margin, o, f, 1) for o, f in zip(outputs, batches, strict=True)]
                             or [np.zeros(0)])
    for k, delta in enumerate(deltas[:len(runners) - 1]):
        up = [row for row, e in zip(rows, escalates(margins, delta), strict=True) if e]
        if groups is not None and up:
            items = {groups[b][r] for b, r in up}
            up = [(b, r) for b, r in rows if groups[b][r] in items]
        if not up:
            break
        pooled = sorted(up, key=lambda row: (int(lengths[row[0]][row[1]]), row))
        rows, found = [], []
        for start in range(0, len(pooled), batch_size):
            chunk = pooled[start:start + batch_size]
            feeds = _gather(batches, lengths, chunk, pad_id)
            out = runners[k + 1](feeds)
            _write_back(outputs, lengths, chunk, out, per_token, k + 2)
            for b, r in chunk:
                stages[b][r] = k + 1
            rows += chunk
            if k + 2 < len(runners):  # the last stage's margins decide nothing
                found.append(_margins(margin, out, feeds, k + 2))
        margins = np.concatenate(found) if found else np.zeros(0)
    return outputs, stages


def _check_call(batches: Sequence[Feeds], runners: Sequence[Runner], deltas: Sequence[float],
                batch_size: int, groups: Sequence[Sequence[int]] | None) -> None:
    problems = []
    if not runners:
        problems.append("no stages")
    if len(deltas) not in (len(runners) - 1, len(runners)):
        problems.append(f"{len(deltas)} deltas for {len(runners)} stages")
    if any(isinstance(d, bool) or not math.isfinite(d) or d < 0 for d in deltas):
        problems.append(f"deltas {list(deltas)} are not all finite numbers >= 0")
    if batch_size < 1:
        problems.append(f"batch size {batch_size} is below 1")
    if any("input_ids" not in b or "attention_mask" not in b for b in batches):
        problems.append("a batch lacks input_ids or attention_mask")
    if groups is not None and [len(g) for g in groups] != [len(b.get("input_ids", ())) for b in batches]:
        problems.append("groups do not give one item id per row of each batch")
    if problems:
        raise BertedgeError(f"cannot run the cascade: {'; '.join(problems)}",
                            "pass one runner per stage, a finite delta >= 0 per stage but the last")


def _margins(margin: Margin, outputs: Outputs, feeds: Feeds, stage: int) -> np.ndarray:
    found = np.asarray(margin(outputs, feeds), dtype=np.float64)
    if found.shape != (len(feeds["input_ids"]),):
        raise BertedgeError(f"stage {stage}'s margins have shape {found.shape} for {len(feeds['input_ids'])} rows",
                            "give the cascade the task's `margin`")
    return found


def _gather(batches: Sequence[Feeds], lengths: Sequence[np.ndarray], chunk: Sequence[Row], pad_id: int) -> Feeds:
    """The chunk's rows as one batch padded to its longest row (input_ids with pad_id, else 0)."""
    width = max(int(lengths[b][r]) for b, r in chunk)
    feeds: Feeds = {}
    for key, first in batches[chunk[0][0]].items():
        per_token = first.ndim >= 2 and first.shape[1] == batches[chunk[0][0]]["input_ids"].shape[1]
        shape = (len(chunk), width, *first.shape[2:]) if per_token else (len(chunk), *first.shape[1:])
        arr = np.full(shape, pad_id if key == "input_ids" else 0, dtype=first.dtype)
        for j, (b, r) in enumerate(chunk):
            n = int(lengths[b][r])
            if per_token:
                arr[j, :n] = batches[b][key][r, :n]
            else:
                arr[j] = batches[b][key][r]
        feeds[key] = arr
    return feeds


def _write_back(outputs: list[Outputs], lengths: Sequence[np.ndarray], chunk: Sequence[Row], out: Outputs,
                per_token: bool, stage: int) -> None:
    """Copy each chunk row's outputs into its own batch: over its real tokens when per-token."""
    absent = [k for k in outputs[chunk[0][0]] if k not in out]
    if absent:
        raise BertedgeError(f"stage {stage} has no output {', '.join(absent)} (has {', '.join(out)})",
                            "build every stage from the same model and task")
    for j, (b, r) in enumerate(chunk):
        n = int(lengths[b][r])
        for key, target in outputs[b].items():
            if per_token:
                target[r, :n] = out[key][j, :n]
            else:
                target[r] = out[key][j]
