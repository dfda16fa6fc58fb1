"""`bertedge predict` (local engine): stream input records through a `Predictor` to stdout."""

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
from bertedge.runtime.predictor import LatencyRecorder, LatencyReport, Predictor, Result
from bertedge.runtime.records import (
    InputFormat,
    InputRecord,
    batched,
    input_format_of,
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
    input: Path | None = None  # input file; None or '-' reads stdin
    format: InputFormat | None = None  # input format; None: from the file suffix (stdin: txt)
    text_columns: tuple[str, ...] = ("text", "sentence", "content")  # first present holds the text
    pair_columns: tuple[str, ...] = ()  # first present holds the pair's second text (JSONL: text_pair)
    output: OutputFormat = OutputFormat.JSONL  # stdout format
    batch_size: int = 32  # items per inference batch
    threads: int | None = None  # onnxruntime intra-op threads
    providers: str | None = None  # cpu (default), auto, cuda, or a comma list of provider names
    report: bool = True  # print the summary and latency report to stderr
    aggregation: str = "first"  # NER: simple, first, max or average (see bertedge.runtime.tasks.ner.Aggregation)
    top_k: int = 1  # QA: answer spans per question
    expect_digest: str | None = None  # refuse any bundle but this one (the digest `package` printed)
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
                          batch_size=args.batch_size, aggregation=args.aggregation, top_k=args.top_k,
                          expect_digest=args.expect_digest)
    with input_stream(args, stdin, stderr) as stream:
        if args.texts:
            records: Iterable[InputRecord] = records_from_texts(args.texts)
        else:
            fmt = args.format or input_format_of(args.input if isinstance(args.input, Path) else None)
            text_columns, pair_columns = predictor.task.columns(args.text_columns, args.pair_columns)
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
