"""Input records: formats, suffixes, line reading, decoding, pairs and ids.

`bertedge predict` (local) and `--engine ray` both parse their input here, so the two engines
turn every input line into the same item or the same error record. Stdlib only.
"""

from __future__ import annotations

import codecs
import csv
import enum
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

from bertedge.errors import BertedgeError

T = TypeVar("T")
Pair = tuple[str, str | None]  # (text, text_pair or None)
Item = str | Sequence[str | None] | Mapping[str, Any]  # "text", (text, pair), {"text", "text_pair"}

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


# ----------------------------------------------------------------------------- input streams


class InputFormat(str, enum.Enum):
    """How an input file holds its texts."""

    TXT = "txt"  # one text per line
    CSV = "csv"  # header row; --text-column (and --pair-column)
    TSV = "tsv"
    JSONL = "jsonl"  # one JSON object (or string) per line



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


