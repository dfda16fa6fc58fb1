"""Input records: formats, suffixes, line reading, decoding, pairs and ids.

`bertedge predict` (local) and `--engine ray` both parse their input here, so the two engines
turn every input line into the same item or the same error record: text, CSV, TSV and JSONL
files (UTF-8, or UTF-16 with its byte-order mark) with the stdlib, Parquet with pyarrow (imported
only when a Parquet input is read). What counts as text at all is `bertedge.runtime.text.has_text`.
"""

from __future__ import annotations

import codecs
import csv
import enum
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

from bertedge.errors import BertedgeError
from bertedge.runtime.text import has_text

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
    for name, value in (("text", text), ("text_pair", pair)):
        if value is not None and (problem := unicode_problem(value)):
            return f"{name} {problem}"
    if not has_text(text):
        return "empty text"
    if pair is not None and not has_text(pair):
        return "empty text_pair"
    return text, pair


def unicode_problem(value: str) -> str | None:
    """What makes a string unencodable (a lone surrogate, e.g. from a JSON "\\ud800" escape), if anything.

    >>> unicode_problem("ok"), unicode_problem("bad \\ud800")
    (None, 'holds a lone surrogate (\\\\ud800 at character 4), which is not valid Unicode')
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start}), which is not valid Unicode"
    return None


# ----------------------------------------------------------------------------- input streams


class InputFormat(str, enum.Enum):
    """How an input file holds its texts."""

    TXT = "txt"  # one text per line
    CSV = "csv"  # header row; --text-column (and --pair-column)
    TSV = "tsv"
    JSONL = "jsonl"  # one JSON object (or string) per line
    PARQUET = "parquet"  # a text column (and a pair column); needs pyarrow


SUFFIX_FORMATS = {".txt": InputFormat.TXT, ".text": InputFormat.TXT, ".csv": InputFormat.CSV,
                  ".tsv": InputFormat.TSV, ".jsonl": InputFormat.JSONL, ".ndjson": InputFormat.JSONL,
                  ".json": InputFormat.JSONL, ".parquet": InputFormat.PARQUET, ".pq": InputFormat.PARQUET}
UTF16_BOMS = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}


class InputRecord(NamedTuple):
    """One input line: an item to predict, or the problem that stops it (never both)."""

    line: int  # 1-based physical line number (command-line texts: argument number; Parquet: row number)
    item: Pair | None
    error: str | None = None
    truncated: bool = False  # the line was cut at the reader's byte limit
    id: Any = None  # the record's id column / field, unchanged (CSV: text); None when it has none


class Line(NamedTuple):
    number: int
    text: str | None  # None when the line is not valid in the file's encoding
    cut: bool  # longer than the byte limit; only its start was kept
    encoding: str = "UTF-8"  # the file's encoding, for the error message of an undecodable line


def input_format_of(path: Path | None) -> InputFormat:
    """The input format a file name implies (stdin and unknown suffixes: one text per line).

    >>> input_format_of(Path("a.jsonl")), input_format_of(None)
    (<InputFormat.JSONL: 'jsonl'>, <InputFormat.TXT: 'txt'>)
    """
    return SUFFIX_FORMATS.get(path.suffix.lower(), InputFormat.TXT) if path else InputFormat.TXT


def read_lines(stream: IO[bytes], max_line_bytes: int = 1 << 20) -> Iterator[Line]:
    """Physical lines decoded as UTF-8 (UTF-16 after its byte-order mark), one at a time; a
    longer line keeps only its start. Reads pipes and devices too: nothing is seeked.

    >>> import io
    >>> [tuple(x)[:3] for x in read_lines(io.BytesIO(b"ok\\n\\xff\\nabcdef"), max_line_bytes=4)]
    [(1, 'ok', False), (2, None, False), (3, 'abcd', True)]
    >>> [x.text for x in read_lines(io.BytesIO("é\\r\\nb".encode("utf-16")))]
    ['é', 'b']
    """
    raw = stream.readline(max_line_bytes)
    if raw[:2] in UTF16_BOMS:  # what was read past the BOM is handed on, so pipes work too
        yield from utf16_lines(raw[2:], stream, UTF16_BOMS[raw[:2]], max_line_bytes)
        return
    number = 0
    while raw:
        number += 1
        cut = len(raw) == max_line_bytes and not raw.endswith(b"\n") and skip_rest(stream, max_line_bytes)
        try:  # a cut can split a multi-byte character: the incremental decoder drops that tail
            text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
        except UnicodeDecodeError:
            yield Line(number, None, cut)
        else:
            text = text.rstrip("\r\n")
            yield Line(number, text.removeprefix("\ufeff") if number == 1 else text, cut)
        raw = stream.readline(max_line_bytes)


def utf16_lines(head: bytes, stream: IO[bytes], codec: str, max_line_bytes: int) -> Iterator[Line]:
    """Lines of a UTF-16 stream (`head`: bytes already read past the BOM), split at newline code
    units (even offsets) only and each decoded on its own: a bad line is one error record."""
    line, cut, rest, number, newline = b"", False, head, 0, "\n".encode(codec)
    while True:
        chunk = stream.read(1 << 16)
        data = rest + chunk
        even = len(data) - len(data) % 2 if chunk else len(data)
        data, rest = data[:even], data[even:]
        start, at = 0, data.find(newline)
        while at >= 0:
            if at % 2 == 0:
                line, cut = append_cut(line, cut, data[start:at], max_line_bytes)
                number += 1
                yield utf16_line(number, line, cut, codec)
                line, cut, start = b"", False, at + 2
            at = data.find(newline, at + 1)
        line, cut = append_cut(line, cut, data[start:], max_line_bytes)
        if not chunk:
            if line or cut:
                yield utf16_line(number + 1, line, cut, codec)
            return


def utf16_line(number: int, raw: bytes, cut: bool, codec: str) -> Line:
    try:
        return Line(number, codecs.getincrementaldecoder(codec)().decode(raw, final=not cut).rstrip("\r"),
                    cut, "UTF-16")
    except UnicodeDecodeError:
        return Line(number, None, cut, "UTF-16")


def append_cut(line: bytes, cut: bool, piece: bytes, limit: int) -> tuple[bytes, bool]:
    """line + piece, kept to `limit` bytes (an even number), and whether anything was dropped."""
    if cut or len(line) + len(piece) <= limit:
        return (line, True) if cut else (line + piece, False)
    return (line + piece)[: limit - limit % 2], True


def skip_rest(stream: IO[bytes], max_line_bytes: int) -> bool:
    """Read past the rest of a line in bounded steps; whether anything but its newline was left."""
    more = False
    while True:
        rest = stream.readline(max_line_bytes)
        more = more or bool(rest.rstrip(b"\r\n"))
        if not rest or rest.endswith(b"\n"):
            return more


def read_records(stream: IO[bytes], fmt: InputFormat, text_columns: Sequence[str] = ("text",),
                 pair_columns: Sequence[str] = (), max_line_bytes: int = 1 << 20,
                 id_column: str | None = "id") -> Iterator[InputRecord]:
    """One record per input line (CSV: per data row), lazily: constant memory for any file size.

    Empty, non-UTF-8, unparsable or over-long structured lines become error records that keep
    their line number; an over-long plain-text line is cut and marked truncated. The text comes
    from the first of `text_columns` present (CSV header / JSONL keys), the pair likewise from
    `pair_columns` (JSONL default: "text_pair"), and the record's id from `id_column` when the
    input has it (JSON values unchanged, CSV cells as text). Parquet rows count as lines.
    """
    if fmt is InputFormat.PARQUET:
        return parquet_records(stream, text_columns, pair_columns, id_column)
    lines = read_lines(stream, max_line_bytes)
    if fmt is InputFormat.TXT:
        return (text_record(line) for line in lines)
    if fmt is InputFormat.JSONL:
        return (json_record(line, text_columns, pair_columns or ("text_pair",), max_line_bytes, id_column)
                for line in lines)
    return csv_records(lines, "\t" if fmt is InputFormat.TSV else ",", text_columns, pair_columns,
                       max_line_bytes, id_column)


def line_problem(line: Line) -> str | None:
    if line.text is None:
        return f"not valid {line.encoding}"
    if not has_text(line.text):
        return "empty line"
    return None


def text_record(line: Line) -> InputRecord:
    problem = line_problem(line)
    if problem or line.text is None:
        return InputRecord(line.number, None, problem)
    return InputRecord(line.number, (line.text, None), truncated=line.cut)


def json_record(line: Line, text_keys: Sequence[str], pair_keys: Sequence[str],
                max_line_bytes: int, id_key: str | None = None) -> InputRecord:
    problem = line_problem(line)
    if problem or line.text is None:
        return InputRecord(line.number, None, problem)
    if line.cut:
        return InputRecord(line.number, None, f"line is longer than {max_line_bytes} bytes")
    try:
        value = json.loads(line.text)
    except json.JSONDecodeError as e:
        return InputRecord(line.number, None, f"not valid JSON ({e.msg})")
    except RecursionError:  # thousands of nested brackets
        return InputRecord(line.number, None, "not valid JSON (nested too deeply)")
    id_ = value.get(id_key) if id_key and isinstance(value, dict) else None
    if isinstance(id_, str) and (bad := unicode_problem(id_)):
        return InputRecord(line.number, None, f"{id_key} {bad}")
    if isinstance(value, dict):
        text_key = next((k for k in text_keys if k in value), None)
        if text_key is None:
            return InputRecord(line.number, None, f"no {' / '.join(text_keys)} field "
                               f"(has: {', '.join(value) or 'nothing'})", id=id_)
        pair_key = next((k for k in pair_keys if k in value), None)
        value = {"text": value[text_key], "text_pair": value.get(pair_key) if pair_key else None}
    checked = as_pair(value)
    if isinstance(checked, str):
        return InputRecord(line.number, None, checked, id=id_)
    return InputRecord(line.number, checked, id=id_)


class PushBack:
    """An iterator of lines that can take lines back (re-read after an unterminated quote)."""

    def __init__(self, lines: Iterator[Line]) -> None:
        self.lines = lines
        self.back: list[Line] = []  # a stack: the next line is last

    def __iter__(self) -> PushBack:
        return self

    def __next__(self) -> Line:
        return self.back.pop() if self.back else next(self.lines)

    def push(self, lines: Sequence[Line]) -> None:
        self.back.extend(reversed(lines))


UNTERMINATED = "unterminated quote: a quoted field never closes (the lines after it are read as rows)"


def csv_row(first: Line, source: PushBack, delimiter: str,
            max_line_bytes: int) -> tuple[list[str] | str | None, Line]:
    """The CSV row starting at `first` (a quoted field may span lines) and its last line;
    (None, first) when a quote never closes, with the lines read past `first` pushed back;
    (what is wrong, line) for a row even the lenient reader refuses (a bare carriage return).

    A quote left open would otherwise swallow every later row into one field, silently; a
    quoted field may grow to `max_line_bytes` before it counts as unterminated.
    """
    used = [first]
    text = (first.text or "") + "\n"
    while True:
        try:
            return next(csv.reader([text], delimiter=delimiter, strict=True), []), used[-1]
        except csv.Error as e:
            if "unexpected end of data" not in str(e):  # a stray quote inside a field: read leniently
                try:
                    return next(csv.reader([text], delimiter=delimiter), []), used[-1]
                except csv.Error as lenient:
                    return f"not valid CSV ({lenient})", used[-1]
        more = next(source, None)
        if more is None or more.text is None or more.cut or len(text) + len(more.text) > max_line_bytes:
            source.push([*used[1:], *([more] if more is not None else [])])
            return None, first
        used.append(more)
        text += more.text + "\n"


def csv_records(lines: Iterator[Line], delimiter: str, text_columns: Sequence[str],
                pair_columns: Sequence[str], max_line_bytes: int, id_column: str | None = "id") -> Iterator[InputRecord]:
    """Rows of a CSV / TSV file; bad physical lines, and a row whose quote never closes, become
    error records in their place (the lines after an unterminated quote are read as rows)."""
    source = PushBack(lines)
    header: list[str] | None = None
    text_at, pair_at, id_at = 0, None, None
    for first in source:
        if first.text is None or first.cut:
            yield InputRecord(first.number, None, f"not valid {first.encoding}" if first.text is None
                              else f"line is longer than {max_line_bytes} bytes")
            continue
        row, last = csv_row(first, source, delimiter, max_line_bytes)
        if row is None:
            yield InputRecord(first.number, None, UNTERMINATED)
        elif isinstance(row, str):
            yield InputRecord(last.number, None, row)
        elif header is None:
            header = row
            text_at, pair_at = column_indices(header, text_columns, pair_columns)
            names = [h.strip() for h in header]
            id_at = names.index(id_column) if id_column in names else None
        else:
            yield csv_record(last.number, row, len(header), text_at, pair_at, id_at)


def csv_record(number: int, row: list[str], width: int, text_at: int, pair_at: int | None,
               id_at: int | None) -> InputRecord:
    id_ = row[id_at] if id_at is not None and id_at < len(row) else None
    if not any(has_text(cell) for cell in row):
        return InputRecord(number, None, "empty line")
    if len(row) <= max(text_at, pair_at if pair_at is not None else -1):
        return InputRecord(number, None, f"row has {len(row)} fields, header has {width}", id=id_)
    checked = as_pair((row[text_at], row[pair_at] if pair_at is not None else None))
    return (InputRecord(number, None, checked, id=id_) if isinstance(checked, str)
            else InputRecord(number, checked, id=id_))


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




# ----------------------------------------------------------------------------- Parquet


def parquet_file(stream: IO[bytes]) -> Any:
    """A `pyarrow.parquet.ParquetFile` over the stream (a pipe is read into memory first)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BertedgeError("reading Parquet needs pyarrow", "pip install 'bertedge[ray]'") from None
    source: Any = stream if stream.seekable() else pa.BufferReader(stream.read())
    try:
        return pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
        raise BertedgeError(f"not a valid Parquet file ({e})", "check the file, or give it its real suffix") from None


def parquet_records(stream: IO[bytes], text_columns: Sequence[str], pair_columns: Sequence[str],
                    id_column: str | None, batch_rows: int = 4096) -> Iterator[InputRecord]:
    """One record per Parquet row (numbered from 1), read `batch_rows` rows at a time."""
    file = parquet_file(stream)
    names = list(file.schema_arrow.names)
    text_at, pair_at = column_indices(names, text_columns, pair_columns)
    wanted = [names[text_at], *([names[pair_at]] if pair_at is not None else []),
              *([id_column] if id_column in names else [])]
    number = 0
    for batch in file.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(wanted))):
        texts = batch.column(names[text_at]).to_pylist()
        pairs = batch.column(names[pair_at]).to_pylist() if pair_at is not None else [None] * len(texts)
        ids = batch.column(id_column).to_pylist() if id_column in names else [None] * len(texts)
        for text, pair, id_ in zip(texts, pairs, ids, strict=True):
            number += 1
            values = [utf8(text), utf8(pair)]
            checked = as_pair(tuple(values)) if not any(isinstance(v, bytes) for v in values) else "not valid UTF-8"
            yield (InputRecord(number, None, checked, id=id_) if isinstance(checked, str)
                   else InputRecord(number, checked, id=id_))


def utf8(value: Any) -> Any:
    """A binary cell as text; bytes that are not UTF-8 stay bytes (then an error record)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


# ----------------------------------------------------------------------------- sniffing


def input_columns(stream: IO[bytes], fmt: InputFormat, max_line_bytes: int = 1 << 20) -> list[str]:
    """Column (field) names of an input: its CSV header, Parquet schema or first JSON object.

    >>> import io
    >>> input_columns(io.BytesIO(b'\\n{"id": 1, "text": "a"}\\n'), InputFormat.JSONL)
    ['id', 'text']
    """
    if fmt is InputFormat.PARQUET:
        return list(parquet_file(stream).schema_arrow.names)
    for line in read_lines(stream, max_line_bytes):
        if fmt is InputFormat.TXT:
            return []
        if fmt in (InputFormat.CSV, InputFormat.TSV):
            delimiter = "\t" if fmt is InputFormat.TSV else ","
            return [c.strip() for c in next(csv.reader([line.text or ""], delimiter=delimiter), [])]
        if line.text and has_text(line.text):
            try:
                value = json.loads(line.text)
            except (json.JSONDecodeError, RecursionError):
                continue
            return list(value) if isinstance(value, dict) else []
    return []


def integer_ids(stream: IO[bytes], fmt: InputFormat, column: str, max_line_bytes: int = 1 << 20) -> bool:
    """Whether an input's ids are integers: its Parquet column type, or its first JSON record's id
    (CSV and text ids are text)."""
    if fmt is InputFormat.PARQUET:
        import pyarrow as pa

        schema = parquet_file(stream).schema_arrow
        return bool(pa.types.is_integer(schema.field(column).type))
    if fmt is not InputFormat.JSONL:
        return False
    for record in read_records(stream, InputFormat.JSONL, ("\0",), (), max_line_bytes, column):
        if record.id is not None:
            return isinstance(record.id, int) and not isinstance(record.id, bool)
    return False


def input_problem(path: Path) -> str | None:
    """What stops a path from being read as one input file, or None. Regular files, FIFOs (a
    shell's `<(...)`) and character devices (/dev/stdin; /dev/null gives no rows) are readable.

    >>> input_problem(Path(".")), input_problem(Path("/dev/null"))
    ("input '.' is a folder, not a file (--engine ray reads folders)", None)
    """
    if path.is_dir():
        return f"input '{path}' is a folder, not a file (--engine ray reads folders)"
    if not path.exists():
        return f"input file '{path}' does not exist"
    if not os.access(path, os.R_OK):
        return f"input file '{path}' is not readable (permission denied)"
    return None
