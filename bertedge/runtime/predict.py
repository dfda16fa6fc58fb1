"""`bertedge predict` (local engine): stream input records through a `Predictor` to stdout or --out.

Every input row gives exactly one output line: its prediction, or an error record (an empty
or undecodable line, an item the model refuses, or a row whose inference failed).
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from bertedge.errors import BertedgeError
from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.outputs import atomic_output
from bertedge.runtime.predictor import (
    INFERENCE_FAILED,
    LatencyRecorder,
    LatencyReport,
    Predictor,
    Result,
)
from bertedge.runtime.records import (
    InputFormat,
    InputRecord,
    batched,
    input_format_of,
    input_problem,
    read_records,
    records_from_texts,
)


class OutputFormat(str, enum.Enum):
    """How predictions are written to stdout."""

    JSONL = "jsonl"
    TABLE = "table"


def predict_stream(predictor: Predictor, records: Iterable[InputRecord], window: int = 256,
                   timings: LatencyRecorder | None = None) -> Iterator[tuple[InputRecord, Result]]:
    """(record, result) for every record, in input order; error records pass through as {"error"}.

    Reads `window` records at a time (sorted by length inside the window), so memory stays
    constant however long the input is. An item the model refuses (e.g. a QA line without a
    context) becomes its own error record; the rest of its window is still predicted. A record
    with an id carries it into its result unchanged.
    """
    for chunk in batched(records, window):
        good = [r.item for r in chunk if r.item is not None]
        answers = iter(predictor.predict_isolated(good, timings=timings))
        for record in chunk:
            head: Result = {"line": record.line} if record.id is None else {"line": record.line, "id": record.id}
            if record.item is None:
                yield record, {**head, "error": record.error}
                continue
            result = {**head, **next(answers)}
            if record.truncated and "error" not in result:
                result["truncated"] = True
            yield record, result


# ----------------------------------------------------------------------------- predict command


@dataclass
class PredictArgs:
    """Options of `bertedge predict`."""

    bundle: Path  # bundle folder or archive
    texts: list[str] = field(default_factory=list)  # texts given as arguments (then no file is read)
    input: Path | None = None  # input file, pipe or device; None or '-' reads stdin
    format: InputFormat | None = None  # input format; None: from the file suffix (stdin: txt)
    text_columns: tuple[str, ...] = ("text", "sentence", "content")  # first present holds the text
    pair_columns: tuple[str, ...] = ()  # first present holds the pair's second text (JSONL: text_pair)
    output: OutputFormat = OutputFormat.JSONL  # output format
    out: Path | None = None  # write the predictions to this file (atomically) instead of stdout
    overwrite: bool = False  # replace an existing `out`
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # threads, providers, batch size, ...
    report: bool = True  # print the summary and latency report to stderr
    max_line_bytes: int = 1 << 20  # longer input lines are cut (txt) or rejected (csv / jsonl)

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        self.output = OutputFormat(self.output)
        if self.format is not None:
            self.format = InputFormat(self.format)
        self.input = None if self.input is None or str(self.input) == "-" else Path(self.input)
        self.out = None if self.out is None else Path(self.out)
        problems = []
        if self.texts and self.input is not None:
            problems.append("texts were given both as arguments and with --input")
        if isinstance(self.input, Path) and (problem := input_problem(self.input)) is not None:
            problems.append(problem)
        if self.out is not None and self.out.exists() and not self.overwrite:
            problems.append(f"'{self.out}' exists; pass --overwrite to replace it")
        if problems:
            raise BertedgeError("; ".join(problems), "see `bertedge predict --help`")


class StdoutError(BertedgeError):
    """The predictions could not be written to stdout (a full disk, /dev/full, an I/O error)."""


@dataclass(frozen=True)
class PredictSummary:
    """What a predict run did, for the closing summary."""

    items: int
    errors: int  # error records written (input problems and failed inference)
    truncated: int
    latency: LatencyReport
    failed: int = 0  # rows whose inference failed (their error records are among `errors`)

    def format(self, max_length: int) -> str:
        none = " (no input rows)" if not self.items and not self.errors else ""
        lines = [f"{self.items} predicted, {self.errors} error record(s), "
                 f"{self.truncated} truncated to {max_length} tokens{none}"]
        return "\n".join([*lines, self.latency.format()])


def run_predict(args: PredictArgs, stdout: TextIO, stderr: TextIO,
                stdin: IO[bytes] | None = None) -> PredictSummary:
    """Load the bundle, stream predictions to stdout (or --out), then the summary and latency to stderr.

    Every input row gives one output line, a prediction or an error record; a row whose
    inference fails is an error record too, counted in `PredictSummary.failed`.

    Raises:
        BertedgeError: the bundle or the input cannot be read, or --out cannot be written.
        StdoutError: stdout cannot take the predictions (BrokenPipeError passes through).
    """
    predictor = Predictor(args.bundle, args.runtime)
    if args.out is None:
        try:
            summary = write_predictions(predictor, args, stdout, stderr, stdin)
            stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(f"cannot write the predictions to stdout ({e.strerror or type(e).__name__})",
                              "redirect stdout to a place with room, or pass --out FILE") from None
    else:
        with atomic_output(args.out, folder=False, what="the predictions") as tmp, \
                tmp.open("w", encoding="utf-8") as f:
            summary = write_predictions(predictor, args, f, stderr, stdin)
    if args.report:
        if summary.truncated:
            stderr.write(f"warning: {summary.truncated} input(s) were longer than "
                         f"{predictor.max_length} tokens and were truncated\n")
        stderr.write(summary.format(predictor.max_length) + "\n")
    return summary


def write_predictions(predictor: Predictor, args: PredictArgs, sink: TextIO, stderr: TextIO,
                      stdin: IO[bytes] | None) -> PredictSummary:
    """Stream every input record through the predictor into `sink`, one line each."""
    window = 8 * args.runtime.batch_size
    with input_stream(args, stdin, stderr) as stream:
        if args.texts:
            records: Iterable[InputRecord] = records_from_texts(args.texts)
        else:
            fmt = args.format or input_format_of(args.input if isinstance(args.input, Path) else None)
            text_columns, pair_columns = predictor.task.columns(args.text_columns, args.pair_columns)
            records = read_records(stream, fmt, text_columns, pair_columns, args.max_line_bytes)
        timings = LatencyRecorder()
        counts = {"items": 0, "errors": 0, "truncated": 0, "failed": 0}
        if args.output is OutputFormat.TABLE:
            sink.write(f"{'line':>6}  {'label':<16} {'score':>6}  text\n")
        for n, (record, result) in enumerate(predict_stream(predictor, records, window, timings), start=1):
            error = result.get("error")
            counts["errors" if error is not None else "items"] += 1
            counts["failed"] += str(error).startswith(INFERENCE_FAILED) if error is not None else 0
            counts["truncated"] += bool(result.get("truncated"))
            sink.write(format_result(record, result, args.output))
            if n % window == 0:
                sink.flush()  # downstream readers of a pipe see each window as it is done
    return PredictSummary(**counts, latency=timings.report())


@contextlib.contextmanager
def input_stream(args: PredictArgs, stdin: IO[bytes] | None, stderr: TextIO) -> Iterator[IO[bytes]]:
    """The bytes to read: the --input file (or pipe, or device), or stdin (neither for argument texts)."""
    if isinstance(args.input, Path):
        try:
            f = args.input.open("rb")
        except OSError as e:
            raise BertedgeError(f"cannot read input '{args.input}' ({e.strerror or type(e).__name__})",
                                "pass a readable file, or '-' for stdin") from None
        with f:
            yield f
    elif args.texts:
        yield io.BytesIO()
    else:
        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
        if stream is None or stream.closed:
            raise BertedgeError("stdin is closed, so there are no texts to read",
                                "pass texts as arguments, --input FILE, or pipe lines in")
        if stream.isatty():
            stderr.write("reading texts from stdin, one per line (Ctrl-D to end)\n")
        yield stream


def format_result(record: InputRecord, result: Result, output: OutputFormat) -> str:
    """One output line: a JSON object, or a table row."""
    if output is OutputFormat.JSONL:
        line = json.dumps(result, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in an id: write it as a JSON escape
            line = json.dumps(result)
        return line + "\n"
    text = record.item[0] if record.item else ""
    text = text if len(text) <= 60 else text[:57] + "..."
    if "error" in result:
        return f"{record.line:>6}  {'ERROR':<16} {'':>6}  {result['error']}\n"
    mark = " [truncated]" if result.get("truncated") else ""
    label = str(result.get("label", json.dumps({k: v for k, v in result.items() if k != "line"})))
    score = result.get("score")
    score_text = f"{score:.3f}" if isinstance(score, float) else ""
    return f"{record.line:>6}  {label:<16} {score_text:>6}  {text}{mark}\n"
