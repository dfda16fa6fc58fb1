"""The read stage: input files -> Arrow rows (file, row, line, id, text, text_pair, error, cut).

Every format is parsed by `bertedge.runtime.records.read_records`, the local engine's own reader,
so both engines give every line the same item or the same error record. This module only opens
the files, picks the id column and fits rows into Arrow.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bertedge.errors import BertedgeError
from bertedge.runtime.records import (
    InputFormat,
    input_columns,
    input_format_of,
    integer_ids,
    read_records,
)

if TYPE_CHECKING:
    import pyarrow as pa

INT64 = (-(1 << 63), (1 << 63) - 1)


@contextmanager
def open_input(path: Path, data: bytes | None = None) -> Iterator[IO[bytes]]:
    """The bytes of an input: `data` when the driver read it already (a pipe or device), else the file."""
    if data is not None:
        yield io.BytesIO(data)
        return
    try:
        with path.open("rb") as f:
            yield f
    except OSError as e:
        raise BertedgeError(f"cannot read input '{path}' ({e.strerror or e})", "check --input") from None


def read_special(files: list[Path]) -> dict[int, bytes]:
    """Read pipes and devices (`-i /dev/stdin`, `-i <(...)`) once, here on the driver: they can be
    read only once, and only by this process. Regular files are read by the Ray tasks."""
    special: dict[int, bytes] = {}
    for i, path in enumerate(files):
        if not path.is_file():
            with open_input(path) as f:
                special[i] = f.read()
    return special


def resolve_id_column(files: list[Path], special: dict[int, bytes], id_column: str | None,
                      max_line_bytes: int) -> tuple[str | None, bool]:
    """The id column to use (None: row numbers), checked against the first file, and whether its
    ids are integers (from the first file's schema or first JSON record; CSV ids are text)."""
    first, fmt = files[0], input_format_of(files[0])
    try:
        with open_input(first, special.get(0)) as f:
            columns = input_columns(f, fmt, max_line_bytes)
    except BertedgeError as e:  # e.g. not Parquet at all: name the file
        raise BertedgeError(f"input '{first}': {e.problem}", e.fix) from None
    if id_column is None:
        column = "id" if "id" in columns else None
    elif id_column not in columns:
        raise BertedgeError(f"--id-column '{id_column}' is not in '{first.name}' "
                            f"(columns: {', '.join(columns) or 'none'})",
                            "name an existing column, or leave --id-column out to use row numbers")
    else:
        column = id_column
    if column is None:
        return None, False
    with open_input(first, special.get(0)) as f:
        return column, integer_ids(f, fmt, column, max_line_bytes)


def parsed_schema(int_ids: bool) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("file", pa.int32()), ("row", pa.int64()), ("line", pa.int64()),
                      ("id", pa.int64() if int_ids else pa.string()), ("text", pa.large_string()),
                      ("text_pair", pa.large_string()), ("error", pa.string()), ("cut", pa.bool_())])


def parse_files(batch: pa.Table, files: list[str], special: dict[int, Any], text_columns: tuple[str, ...],
                pair_columns: tuple[str, ...], id_column: str | None, int_ids: bool,
                max_line_bytes: int, block_rows: int) -> Iterator[pa.Table]:
    """Ray task: file indices -> one row per input record, errors included.

    Yields tables of `block_rows` rows, so one huge file never makes one huge Python list.
    """
    import pyarrow as pa
    import ray

    schema = parsed_schema(int_ids or id_column is None)
    rows: list[dict[str, Any]] = []
    for index in batch.column("file").to_pylist():
        data = ray.get(special[index]) if index in special else None
        for row in file_rows(Path(files[index]), data, text_columns, pair_columns, id_column, max_line_bytes):
            row["file"] = index
            if id_column is not None:
                fit_id(row, int_ids)
            rows.append(row)
            if len(rows) == block_rows:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def file_rows(path: Path, data: bytes | None, text_columns: tuple[str, ...], pair_columns: tuple[str, ...],
              id_column: str | None, max_line_bytes: int) -> Iterator[dict[str, Any]]:
    """Rows of one input through the runtime's reader; a file-level problem names the file."""
    fmt = input_format_of(path)
    try:
        with open_input(path, data) as f:
            records = read_records(f, fmt, text_columns, pair_columns, max_line_bytes, id_column)
            for row, record in enumerate(records):
                item = record.item or (None, None)
                yield {"row": row, "line": None if fmt is InputFormat.PARQUET else record.line,
                       "id": record.id if id_column else row, "text": item[0], "text_pair": item[1],
                       "error": record.error, "cut": record.truncated}
    except BertedgeError as e:
        raise BertedgeError(f"input '{path}': {e.problem}", e.fix) from None


def fit_id(row: dict[str, Any], int_ids: bool) -> None:
    """Make a row's id fit the id column's type: integers stay integers, other JSON values become
    their JSON text; an id that breaks the column's type (or does not fit 64 bits) makes the row
    an error row, which keeps its file, row and line.

    >>> row = {"id": 10**30, "text": "a", "text_pair": None, "error": None}
    >>> fit_id(row, int_ids=True); row["id"], row["error"]
    (None, 'id 1000000000000000000000000000000 does not fit a 64-bit integer id column')
    """
    value = row["id"]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None or (is_int and INT64[0] <= value <= INT64[1] if int_ids else isinstance(value, str)):
        return
    if not int_ids:
        row["id"] = json.dumps(value)
        return
    row["id"] = None
    if row["error"] is None:
        row["text"] = row["text_pair"] = None
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        row["error"] = (f"id {shown} does not fit a 64-bit integer id column" if is_int
                        else f"id {shown} is not an integer like the first record's")
