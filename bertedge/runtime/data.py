"""Labelled datasets from the user's files: CSV, TSV or JSONL, checked row by row.

Torch-free, so export, bench and the runtime side can use it too. Every problem is reported
with the file, line and column it came from; rows are never dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bertedge.errors import BertedgeError
from bertedge.runtime.text import has_text

csv.field_size_limit(1 << 24)  # long documents are legal input; the tokenizer truncates them


class Nested(str):
    """A JSONL field that held a list or an object: kept as its JSON text, refused where a text
    or a label is read (other columns may hold anything)."""


class BadRows(str, Enum):
    """What to do with a row that has an empty text or a missing label."""

    ERROR = "error"
    SKIP = "skip"


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the optional second text and the label.

    Each name may list alternatives (the first one present in the file wins), e.g. SST-2's
    train.tsv calls its text column `sentence` while dev.tsv calls it `content`.
    """

    text: tuple[str, ...] = ("text", "sentence", "content")
    text_pair: tuple[str, ...] = ()
    label: tuple[str, ...] = ("label",)


@dataclass
class Skipped:
    """One row left out, and why."""

    line: int
    reason: str


@dataclass
class TextExamples:
    """Texts (and optional pairs) with label indices into `label_names`."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | None
    label_names: list[str]
    source: str
    skipped: list[Skipped] = field(default_factory=list)
    rows_read: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextExamples:
        """The examples at `indices`, in that order."""
        return TextExamples(
            texts=[self.texts[i] for i in indices],
            pairs=[self.pairs[i] for i in indices] if self.pairs is not None else None,
            labels=[self.labels[i] for i in indices] if self.labels is not None else None,
            label_names=self.label_names,
            source=self.source,
            skipped=self.skipped,
            rows_read=self.rows_read,
        )


def read_text(path: Path) -> str:
    """Read a whole file as UTF-8, naming the line of the first undecodable byte."""
    if not path.exists():
        raise BertedgeError(f"file not found: {path}", "check the path")
    if path.is_dir():
        raise BertedgeError(f"{path} is a folder, not a data file", "pass a .csv, .tsv or .jsonl file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BertedgeError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x})",
            "re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`",
        ) from None


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, record) from a CSV, TSV or JSONL file, by its extension."""
    text = read_text(path)
    if not has_text(text):
        raise BertedgeError(f"{path} is empty", "give a file with a header row and data rows")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _iter_jsonl(path, text)
    elif suffix in (".csv", ".tsv", ".txt"):
        yield from _iter_delimited(path, text, "\t" if suffix == ".tsv" else ",")
    else:
        raise BertedgeError(
            f"{path}: unknown data format '{suffix}'", "use .csv, .tsv or .jsonl"
        )


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BertedgeError(f"{path}: line {n} is not valid JSON ({e.msg})", "fix or remove that line") from None
        if not isinstance(record, dict):
            raise BertedgeError(f"{path}: line {n} is not a JSON object", 'write one {"text": ..., "label": ...} per line')
        _no_surrogates(path, n, record)
        yield n, {k: cell(v) for k, v in record.items()}


def cell(value: Any) -> str:
    """A JSON value as a field: null is empty, a list or object is `Nested`.

    >>> cell(None), cell(3), type(cell(["a"])).__name__
    ('', '3', 'Nested')
    """
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return Nested(json.dumps(value)[:60])
    return str(value)


def _iter_delimited(path: Path, text: str, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    # GLUE-style TSVs are unquoted and may contain bare quote characters.
    if delimiter == "\t":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header = next(_rows(path, reader), None)
    if not header:
        raise BertedgeError(f"{path} has no header row", "put column names on the first line")
    header = [h.strip() for h in header]
    for row in _rows(path, reader):
        n = reader.line_num
        if not row or not any(has_text(c) for c in row):
            continue
        if len(row) != len(header):
            raise BertedgeError(
                f"{path}: line {n} has {len(row)} fields, the header has {len(header)}",
                "quote fields that contain the delimiter, or fix that line",
            )
        yield n, dict(zip(header, row))


def _rows(path: Path, reader: Any) -> Iterator[list[str]]:
    """The csv reader's rows; a quote left open (which would swallow every later row) is an error."""
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise BertedgeError(f"{path}: the row starting at line {start} is malformed ({e}; "
                                "an unterminated quote?)",
                                'close the quote, or double a quote inside a quoted field ("")') from None
        start = reader.line_num + 1
        yield row


def _no_surrogates(path: Path, n: int, record: dict[str, Any]) -> None:
    """JSON allows lone surrogate escapes such as \\ud800; they are not text and cannot be tokenized."""
    for key, value in record.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BertedgeError(f"{path}: line {n}, field '{key}' holds a lone surrogate escape "
                                    "(\\ud800-\\udfff), which is not a character",
                                    "fix or remove that escape (re-export the file as UTF-8)") from None


def _pick(path: Path, available: Sequence[str], wanted: tuple[str, ...], role: str, option: str) -> str:
    for name in wanted:
        if name in available:
            return name
    raise BertedgeError(
        f"{path}: no {role} column {' / '.join(repr(w) for w in wanted)}; columns are: {', '.join(available)}",
        f"name the right one with {option}",
    )


def load_text_classification(
    path: Path,
    columns: Columns = Columns(),
    label_names: Sequence[str] | None = None,
    require_labels: bool = True,
    bad_rows: BadRows = BadRows.ERROR,
) -> TextExamples:
    """Load a text-classification file.

    Labels may be written as names or as integer indices into `label_names`. When
    `label_names` is None they are collected from this file (sorted; integers numerically).

    Raises:
        BertedgeError: missing file or column, non-UTF-8 bytes, empty text, unknown label.
    """
    path = Path(path)
    records = list(iter_records(path))
    if not records:
        raise BertedgeError(f"{path} has a header but no data rows", "add labelled rows")
    available = list(records[0][1].keys())
    text_col = _pick(path, available, columns.text, "text", "--text-column")
    pair_col = _pick(path, available, columns.text_pair, "text-pair", "--text-pair-column") if columns.text_pair else None
    label_col = None
    if require_labels or any(c in available for c in columns.label):
        label_col = _pick(path, available, columns.label, "label", "--label-column")

    texts: list[str] = []
    pairs: list[str] | None = [] if pair_col else None
    raw_labels: list[str] = []
    kept_lines: list[int] = []
    skipped: list[Skipped] = []
    for line, rec in records:
        problem = _row_problem(rec, text_col, pair_col, label_col)
        if problem:
            if bad_rows is BadRows.SKIP:
                skipped.append(Skipped(line, problem))
                continue
            raise BertedgeError(
                f"{path}: line {line}: {problem}",
                "fix the row, or pass --skip-bad-rows to leave such rows out (they are counted)",
            )
        texts.append(rec[text_col])
        kept_lines.append(line)
        if pairs is not None and pair_col:
            pairs.append(rec[pair_col])
        if label_col:
            raw_labels.append(rec[label_col].strip())
    if not texts:
        raise BertedgeError(f"{path}: every row was skipped", "fix the file's empty texts or labels")

    labels: list[int] | None = None
    names = list(label_names) if label_names else None
    if label_col:
        names = names or _collect_label_names(raw_labels)
        labels = _label_indices(path, raw_labels, names, kept_lines, label_col)
    return TextExamples(texts, pairs, labels, names or [], str(path), skipped, len(records))


def _row_problem(rec: dict[str, str], text_col: str, pair_col: str | None, label_col: str | None) -> str:
    """Why a row cannot be used (a blank, control- or zero-width-only text or label, or a list
    or object where a value belongs), or ''."""
    for column, what in ((text_col, "text"), (pair_col, "text"), (label_col, "label")):
        if column is None:
            continue
        value = rec.get(column, "")
        if isinstance(value, Nested):
            return f"the {what} in column '{column}' is a JSON list or object ({value}), not a single value"
        if not has_text(value):
            return f"empty {what} in column '{column}'"
    return ""


def _collect_label_names(raw: list[str]) -> list[str]:
    unique = set(raw)
    if all(v.lstrip("-").isdigit() for v in unique):
        return [str(v) for v in sorted(int(v) for v in unique)]
    return sorted(unique)


def _label_indices(path: Path, raw: list[str], names: list[str], lines: list[int], column: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, value in enumerate(raw):
        if value in index:
            out.append(index[value])
        elif value.isdigit() and int(value) < len(names) and not any(n.isdigit() for n in names):
            out.append(int(value))  # integer labels with given names, e.g. 0/1 -> negative/positive
        else:
            raise BertedgeError(
                f"{path}: line {lines[i]}: label '{value}' in column '{column}' is not one of the known labels: {', '.join(names)}",
                "use the training labels, or list every label with --label-names",
            )
    return out


def check_trainable(train: TextExamples) -> None:
    """Refuse data a classifier cannot learn from (one class only)."""
    assert train.labels is not None
    present = sorted(set(train.labels))
    if not present:
        raise BertedgeError(f"{train.source}: no training rows are left once the evaluation rows are "
                            "held out", "add labelled rows (two or more classes), or pass --eval with a "
                            "separate evaluation file")
    if len(present) < 2:
        only = train.label_names[present[0]]
        raise BertedgeError(
            f"{train.source}: every training row has the label '{only}'; a classifier needs two or more classes",
            "check --label-column, or add rows of the other classes",
        )


class Subsettable(Protocol):
    """Any examples container: classification, NER sentences or QA questions."""

    def __len__(self) -> int: ...

    def subset(self: E, indices: Sequence[int]) -> E: ...


E = TypeVar("E", bound=Subsettable)


def seeded_subset(examples: E, max_rows: int, seed: int) -> E:
    """A reproducible random subset of at most `max_rows` rows (0 keeps everything)."""
    if max_rows <= 0 or max_rows >= len(examples):
        return examples
    return examples.subset(seeded_indices(len(examples), max_rows, seed))


def seeded_indices(n: int, max_rows: int, seed: int) -> list[int]:
    """The sorted row indices `seeded_subset` keeps of `n` rows: what to leave out elsewhere
    (e.g. calibration rows, or a fine-tune's training rows, from a held-out set).

    >>> seeded_indices(5, 0, 1), len(seeded_indices(100, 10, 1))
    ([0, 1, 2, 3, 4], 10)
    """
    if max_rows <= 0 or max_rows >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_rows))


def seeded_split(examples: E, eval_fraction: float, seed: int) -> tuple[E, E]:
    """Split into (train, eval) reproducibly; the eval part gets at least one row."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(order) * eval_fraction)))
    return examples.subset(sorted(order[n_eval:])), examples.subset(sorted(order[:n_eval]))
