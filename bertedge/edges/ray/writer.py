"""The write stage: predicted rows -> the output file (or folder of part files) and error rows.

Both are built under hidden partial paths by `bertedge.runtime.outputs.atomic_output` and renamed
into place only when complete: a full disk, a read-only folder, SIGTERM or a failed job leaves the
old output or nothing, never half a file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertedge.edges.ray.args import DistributedArgs, OutputFormat
from bertedge.errors import BertedgeError
from bertedge.runtime.outputs import atomic_output

if TYPE_CHECKING:
    import pyarrow as pa


def with_status(status: str) -> Any:
    """A Ray Data batch filter keeping the rows of one status."""

    def keep(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        return batch.filter(pc.equal(batch.column("status"), status))

    return keep


def finish_columns(table: pa.Table, files: list[str], keep: list[str], drop: list[str]) -> pa.Table:
    """Swap the file index for its path (multi-file inputs) and drop internal columns."""
    import pyarrow as pa

    if "file" in keep:
        paths = pa.array(files, pa.string()).take(table.column("file"))
        table = table.set_column(table.schema.get_field_index("file"), "file", paths)
    else:
        drop = [*drop, "file"]
    return table.drop_columns([c for c in drop if c in table.column_names])


def write_output(ds: Any, args: DistributedArgs, files: list[str], keep: list[str], rows_in: int,
                 target: Path) -> tuple[int, int, list[dict[str, Any]]]:
    """Write the ok rows to `target` (the partial path of --out); return (ok rows, truncated rows,
    error rows), checked against rows_in.

    The predict stage preserves order, so its blocks already run in (file, row) order: a single
    output file is streamed block by block from the object store, with no sort. A folder output is
    written by the workers (`write_parquet` / `write_json`).
    """
    import pyarrow.compute as pc
    import ray

    single = args.single_file_output
    ok = truncated = 0
    errors: list[dict[str, Any]] = []
    last = (-1, -1)
    with table_sink(target if single else None, args.output_format) as sink:
        for ref in ds.to_arrow_refs():
            block = ray.get(ref)
            if not block.num_rows:
                continue
            first = (block.column("file")[0].as_py(), block.column("row")[0].as_py())
            if first <= last:
                raise BertedgeError("predicted blocks came back out of order",
                                    "this is a bug: please report it with the Ray version")
            last = (block.column("file")[-1].as_py(), block.column("row")[-1].as_py())
            is_ok = pc.equal(block.column("status"), "ok")
            ok += int(pc.sum(is_ok).as_py() or 0)
            truncated += int(pc.sum(block.column("truncated")).as_py() or 0)
            bad = block.filter(pc.invert(is_ok)).select(["file", "row", "line", "id", "reason"])
            errors.extend(finish_columns(bad, files, keep, []).to_pylist())
            sink(finish_columns(block.filter(is_ok), files, keep, ["status", "reason"]))
    if ok + len(errors) != rows_in:
        raise BertedgeError(f"{rows_in} rows in but {ok} predicted + {len(errors)} errors came out",
                            "this is a bug: please report it with the input")
    if not single:
        ok_rows = ds.map_batches(with_status("ok"), batch_format="pyarrow", batch_size=None).map_batches(
            finish_columns, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"files": files, "keep": keep, "drop": ["status", "reason"]})
        if args.output_format is OutputFormat.JSONL:
            ok_rows.write_json(str(target))
        else:
            ok_rows.write_parquet(str(target))
    return ok, truncated, errors


@contextlib.contextmanager
def table_sink(path: Path | None, fmt: OutputFormat | None) -> Iterator[Callable[[pa.Table], None]]:
    """A function that appends Arrow tables to a JSONL or Parquet file (no path: discards them)."""
    if path is None:
        yield lambda table: None
    elif fmt is OutputFormat.JSONL:
        with path.open("w", encoding="utf-8") as f:
            yield lambda table: f.writelines(json_line(r) for r in table.to_pylist())
    else:
        import pyarrow.parquet as pq

        writers: list[Any] = []

        def write(table: pa.Table) -> None:
            if not writers:
                writers.append(pq.ParquetWriter(path, table.schema))
            writers[0].write_table(table)

        try:
            yield write
        finally:
            for w in writers:
                w.close()


def json_line(row: dict[str, Any]) -> str:
    """One JSON line; a lone surrogate (in an id) is written as a JSON escape, not a crash.

    >>> json_line({"id": "\\ud800", "t": "é"})
    '{"id": "\\\\ud800", "t": "\\\\u00e9"}\\n'
    """
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"


def write_errors(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Error rows (ids and reason) as JSONL in (file, row) order, replaced atomically; with no
    error rows, an errors file left by an earlier run (allowed by --overwrite) is removed."""
    if not rows:
        path.unlink(missing_ok=True)
        return None
    with atomic_output(path, folder=False, what="the error rows", announce=False) as target:
        with target.open("w", encoding="utf-8") as f:
            f.writelines(json_line(r) for r in rows)
    return path
