"""The predict stage: one verified `Predictor` per Ray actor, Arrow batches in and out."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bertedge.runtime.options import RuntimeOptions

if TYPE_CHECKING:
    import pyarrow as pa

FAULT_MARKER_ENV = "BERTEDGE_RAY_FAULT_MARKER"  # test hook: an actor that finds this file deletes it, then dies
FAULT_TEXT_ENV = "BERTEDGE_RAY_FAULT_TEXT"  # test hook: inference raises on a batch holding this text


class PredictorLike(Protocol):
    """What the actors use of `bertedge.runtime.predictor.Predictor`, and nothing else."""

    def output_schema(self) -> dict[str, Any]: ...

    def predict_isolated(self, items: Sequence[Any]) -> list[dict[str, Any]]: ...


def load_predictor(path: Path, options: RuntimeOptions) -> PredictorLike:
    """A `Predictor` over the bundle, opened and verified (checksums, `expect_digest`) as local predict does."""
    from bertedge.runtime.predictor import Predictor

    return Predictor(path, options)


class BundlePredictor:
    """Ray Data callable class: loads and verifies the bundle once per actor, predicts batches.

    Rows that carry a parse error, that `Predictor` rejects, or whose inference fails come back as
    status "error" with their reason, so no row is ever dropped.
    """

    def __init__(self, bundle: str, shipped: list[Any] | None, options: RuntimeOptions, progress: Any = None,
                 fault_marker: str | None = None, fault_text: str | None = None) -> None:
        self.fault_marker, self.fault_text = fault_marker, fault_text
        self.progress = progress
        with tempfile.TemporaryDirectory(prefix="bertedge-ray-") as tmp:
            path = unpack_shipped(shipped, Path(tmp)) if shipped else Path(bundle)
            self.predictor = load_predictor(path, options)
        self.schema = result_schema(self.predictor)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.maybe_die()
        keys = batch.select(["file", "row", "line", "id"])
        texts, pairs = batch.column("text").to_pylist(), batch.column("text_pair").to_pylist()
        errors, cut = batch.column("error").to_pylist(), batch.column("cut").to_pylist()
        todo = [i for i, e in enumerate(errors) if e is None]
        results: list[dict[str, Any]] = [{"status": "error", "reason": e} for e in errors]
        for i, result in zip(todo, self.predict_rows([(texts[i], pairs[i]) for i in todo]), strict=True):
            results[i] = result if "reason" in result else {
                **result, "status": "ok", "truncated": bool(result.get("truncated") or cut[i])}
        table = result_table(results, self.schema)
        if self.progress is not None:
            self.progress.add.remote(len(results))
        for name in table.column_names:
            keys = keys.append_column(name, table.column(name))
        return keys

    def predict_rows(self, items: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
        """Predictions for a window; a rejected item, or one whose inference fails, gets its own
        error row. `Predictor.predict_isolated` isolates failures itself; should anything still
        escape it, the window is retried row by row here rather than failing the job."""
        try:
            results = self.infer(items)
        except Exception:
            results = [self.infer_one(item) for item in items]
        return [{"status": "error", "reason": r["error"]} if "error" in r else r for r in results]

    def infer(self, items: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
        if self.fault_text and any(self.fault_text in text for text, _ in items):
            raise RuntimeError(f"injected inference failure ({FAULT_TEXT_ENV})")
        return self.predictor.predict_isolated(items)

    def infer_one(self, item: tuple[str, str | None]) -> dict[str, Any]:
        try:
            return self.infer([item])[0]
        except Exception as e:
            from bertedge.runtime.predictor import INFERENCE_FAILED

            message = (str(e).strip().splitlines() or [""])[0][:200]
            return {"error": f"{INFERENCE_FAILED} ({type(e).__name__}{': ' + message if message else ''})"}

    def maybe_die(self) -> None:
        """Test hook: hard-kill this actor once (the marker is deleted first, so the retry lives)."""
        if self.fault_marker and os.path.exists(self.fault_marker):
            try:
                os.remove(self.fault_marker)
            except FileNotFoundError:  # another actor took it
                return
            os._exit(1)


class ProgressCounter:
    """A tiny Ray actor (no CPU) that predictor actors report finished rows to."""

    def __init__(self) -> None:
        self.rows = 0
        self.first: float | None = None

    def add(self, rows: int) -> None:
        self.rows += rows
        self.first = self.first or time.time()

    def state(self) -> tuple[int, float | None]:
        return self.rows, self.first


def ship_bundle(bundle: Path) -> tuple[str, bytes]:
    """(archive name, bytes) of the bundle, packing a folder into a .tar.gz first."""
    from bertedge.runtime.bundle import ArchiveFormat, archive_bundle, archive_format_of

    if bundle.is_file() and archive_format_of(bundle):
        return bundle.name, bundle.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bertedge-ship-") as tmp:
        archive = archive_bundle(bundle, Path(tmp) / "bundle.tar.gz", ArchiveFormat.TAR_GZ)
        return archive.name, archive.read_bytes()


def unpack_shipped(shipped: list[Any], folder: Path) -> Path:
    """Write a shipped bundle archive (an object-store ref in a list) to folder; its path."""
    import ray

    name, data = ray.get(shipped[0])
    path = folder / name
    path.write_bytes(data)
    return path


def result_schema(predictor: PredictorLike) -> pa.Schema:
    """Output columns from the task's result schema, plus status, reason and truncated."""
    import pyarrow as pa

    fields = [(name, arrow_type(spec)) for name, spec in predictor.output_schema().items() if name != "truncated"]
    return pa.schema([*fields, ("truncated", pa.bool_()), ("status", pa.string()), ("reason", pa.string())])


def arrow_type(spec: Any) -> pa.DataType:
    """A pyarrow type from a task's pyarrow-free schema (`bertedge.runtime.tasks.Schema`).

    >>> str(arrow_type([{"text": "string", "score": "float64"}]))
    'list<item: struct<text: string, score: double>>'
    """
    import pyarrow as pa

    if isinstance(spec, dict):
        return pa.struct([(name, arrow_type(inner)) for name, inner in spec.items()])
    if isinstance(spec, list):
        return pa.list_(arrow_type(spec[0]))
    return {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}[spec]


def result_table(results: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    rows = [{**r, "truncated": bool(r.get("truncated"))} if r.get("status") == "ok" else r for r in results]
    return pa.Table.from_pylist(rows, schema=schema)
