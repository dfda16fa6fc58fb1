"""`bertedge predict --engine ray`: the same `Predictor`, fanned out over CPUs or nodes by Ray Data.

This module adds transport only. Input lines are parsed by `bertedge.runtime.records.read_records` (so
error rows and line numbers match `--engine local` exactly), and every prediction comes from
`bertedge.runtime.Predictor.predict` (tokenization, batching and post-processing live there).

    read_binary_files(inputs) -> map_batches(parse)        rows with file, row, line, id, text, error
      -> materialize                                        rows in: counted before predicting
      -> map_batches(BundlePredictor, actor pool)           one verified bundle per actor
      -> status split: ok rows sorted by (file, row) -> output; error rows -> errors JSONL
      -> rows out == ok + errors == rows in, asserted

Ids. Every output row carries `row` (0-based data row within its file), `line` (1-based physical
line, the `line` of `--engine local`; empty for Parquet) and `id`: the input's id column
(`id_column`, default "id" when present; unchanged: integers stay integers, CSV ids are text) or else `row`. With several input files the rows
also carry `file` (the path), and the id is the pair (file, row). Output is ordered by (file, row)
so it diffs line by line with `--engine local`.

How the bundle reaches the workers. `BundleTransport.PATH` loads the bundle path on each worker:
right for a local instance and for clusters with a shared filesystem (NFS, a baked image).
`BundleTransport.SHIP` packs the bundle into one archive in the Ray object store; each actor writes
it to a temp dir and `Predictor` verifies its checksums there, so no shared path is needed (the
default when connecting to a cluster with `address` / RAY_ADDRESS). Input files are read by Ray
tasks, so they must be readable from the workers (shared path); the output is written by the
driver (a single ordered file) or by the workers (a folder). Workers need `pip install bertedge[ray]`
only: no torch, no transformers.

Scaling. Per-row work (tokenize + ONNX inference + decode) is spread over actors and grows
linearly with their count as long as each actor gets whole cores (`threads_per_actor` = its CPU
reservation = onnxruntime intra-op threads). Fixed costs do not shrink with nodes: Ray start-up or
connection, one bundle load + checksum per actor, reading and parsing each file (one task per file:
split big inputs into several files), the sort and the driver's ordered write of a single output
file. On N nodes of C cores expect about N * C / threads_per_actor times the one-actor rate for
large inputs, minus those fixed seconds; write to a folder (no driver funnel) at that scale.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bertedge.errors import BertedgeError
from bertedge.runtime.tasks import DecodeOptions

if TYPE_CHECKING:
    import pyarrow as pa

PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".text")
FAULT_MARKER_ENV = "BERTEDGE_RAY_FAULT_MARKER"  # test hook: an actor that finds this file deletes it, then dies
WINDOW_BATCHES = 8  # rows per actor call = 8 inference batches, as the local engine's read window
BLOCKS_PER_ACTOR = 8  # input blocks per actor: load balance and a small retry unit


class BundleTransport(str, enum.Enum):
    """How each Ray actor gets the bundle."""

    AUTO = "auto"  # PATH on a local instance, SHIP when connecting to a cluster
    PATH = "path"  # load the same path on every node (shared filesystem)
    SHIP = "ship"  # put the bundle archive in the object store; actors unpack it


class OutputFormat(str, enum.Enum):
    """What the output file (or folder of part files) holds."""

    PARQUET = "parquet"
    JSONL = "jsonl"


@dataclass
class DistributedArgs:
    """Options of `bertedge predict --engine ray`."""

    bundle: Path  # bundle folder or .tar.gz / .zip archive
    inputs: list[str]  # files, folders or globs of .jsonl / .csv / .tsv / .txt / .parquet
    output: Path  # a .parquet / .jsonl file (ordered, one file) or a folder of part files
    errors: Path | None = None  # error rows as JSONL; None: <output>.errors.jsonl
    output_format: OutputFormat | None = None  # None: from the output suffix (folder: parquet)
    text_columns: tuple[str, ...] = ("text", "sentence", "content")  # first present holds the text
    pair_columns: tuple[str, ...] = ()  # first present holds the pair's text (JSONL: text_pair)
    id_column: str | None = None  # None: "id" when the input has it, else the row number
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS, else a local instance
    actors: int | None = None  # predictor actors; None: cluster CPUs // threads_per_actor
    threads_per_actor: int = 1  # CPUs reserved per actor = onnxruntime intra-op threads
    batch_size: int = 32  # items per inference batch (an actor call gets 8 batches)
    providers: str | None = None  # onnxruntime providers, as `bertedge predict --providers`
    aggregation: str = "first"  # NER: simple, first, max or average, as `bertedge predict --aggregation`
    top_k: int = 1  # QA: answer spans per question, as `bertedge predict --top-k`
    transport: BundleTransport = BundleTransport.AUTO  # how the bundle reaches the actors
    num_cpus: int | None = None  # CPUs of a local instance started here (None: all)
    max_line_bytes: int = 1 << 20  # longer input lines are cut (txt) or become error rows
    progress: bool = True  # rows done / total and rows/s on the log stream
    files: list[Path] = field(default_factory=list, init=False)  # inputs expanded, sorted

    def __post_init__(self) -> None:
        self.bundle, self.output = Path(self.bundle), Path(self.output)
        self.inputs = [self.inputs] if isinstance(self.inputs, str | Path) else list(self.inputs)
        self.inputs = [str(i) for i in self.inputs]
        self.errors = Path(self.errors) if self.errors else Path(f"{self.output}.errors.jsonl")
        self.transport = BundleTransport(self.transport)
        if self.output_format is None:
            self.output_format = (OutputFormat.JSONL if self.output.suffix.lower() in (".jsonl", ".json")
                                  else OutputFormat.PARQUET)
        self.output_format = OutputFormat(self.output_format)
        problems = [p for p in (positive("--actors", self.actors), positive("--batch-size", self.batch_size),
                                positive("--threads-per-actor", self.threads_per_actor),
                                positive("--top-k", self.top_k)) if p]
        if not self.bundle.exists():
            problems.append(f"bundle '{self.bundle}' does not exist")
        try:  # checked here so that a bad option fails before Ray starts, not in every actor
            DecodeOptions(aggregation=self.aggregation, top_k=max(self.top_k, 1))  # type: ignore[arg-type]
        except BertedgeError as e:
            problems.append(e.problem)
        try:
            self.files = expand_inputs(self.inputs)
        except BertedgeError as e:
            problems.append(e.problem)
        if self.output.resolve() in {f.resolve() for f in self.files}:
            problems.append(f"--out '{self.output}' is also an input")
        if problems:
            raise BertedgeError("; ".join(problems), "see `bertedge predict --help`")

    @property
    def errors_path(self) -> Path:
        return self.errors or Path(f"{self.output}.errors.jsonl")

    @property
    def single_file_output(self) -> bool:
        """A .parquet / .jsonl output is one ordered file written by the driver; else a folder."""
        return self.output.suffix.lower() in (".parquet", ".pq", ".jsonl", ".json")


def positive(option: str, value: int | None) -> str | None:
    """A problem message when an optional count is below 1.

    >>> positive("--actors", 0), positive("--actors", None)
    ('--actors must be at least 1 (got 0)', None)
    """
    return f"{option} must be at least 1 (got {value})" if value is not None and value < 1 else None


@dataclass(frozen=True)
class DistributedReport:
    """What a Ray predict run did; rows_in == rows_ok + rows_error always holds."""

    rows_in: int
    rows_ok: int
    rows_error: int
    truncated: int
    files: int
    output: str
    errors: str | None  # None when no row failed
    address: str  # "local" or the cluster address
    actors: int
    threads_per_actor: int
    transport: str
    init_s: float  # ray.init / connect
    read_s: float  # read + parse + count the input
    first_batch_s: float  # predict start to the first finished batch: actor start + bundle load
    predict_s: float  # whole predict stage, first_batch_s included
    write_s: float  # sort + write output and errors
    wall_s: float
    rows_per_s: float  # rows_in / predict_s

    def format(self) -> str:
        """A few human lines for stderr."""
        return "\n".join([
            f"{self.rows_in} rows in = {self.rows_ok} predicted + {self.rows_error} error row(s); "
            f"{self.truncated} truncated",
            f"output: {self.output}" + (f"; errors: {self.errors}" if self.errors else ""),
            f"ray ({self.address}): {self.actors} actor(s) x {self.threads_per_actor} thread(s), "
            f"bundle by {self.transport}",
            f"time: init {self.init_s:.1f} s, read {self.read_s:.1f} s, predict {self.predict_s:.1f} s "
            f"(first batch after {self.first_batch_s:.1f} s), write {self.write_s:.1f} s, "
            f"wall {self.wall_s:.1f} s; {self.rows_per_s:.1f} rows/s predicting",
        ])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named, found in folders, or matched by globs; sorted, and of a supported kind."""
    files: list[Path] = []
    problems: list[str] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and supported(p))
        elif path.is_file():
            found = [path]
        else:
            anchor = Path(path.anchor or ".")
            pattern = str(path.relative_to(anchor)) if path.is_absolute() else spec
            found = sorted(p for p in anchor.glob(pattern) if p.is_file() and supported(p))
        if not found:
            problems.append(f"input '{spec}' matches no .jsonl / .csv / .tsv / .txt / .parquet file")
        unsupported = [p.name for p in found if not supported(p)]
        if unsupported:
            problems.append(f"input '{spec}' has an unsupported suffix ({', '.join(unsupported)})")
        files.extend(found)
    if not inputs:
        problems.append("no --input given")
    if problems:
        raise BertedgeError("; ".join(problems), "pass files, folders or globs of those formats")
    return sorted(dict.fromkeys(p.resolve() for p in files))


def supported(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES + TEXT_SUFFIXES


def columns_of(path: Path, max_line_bytes: int) -> list[str]:
    """Column (field) names of an input file, read from its header, schema or first JSON object."""
    from bertedge.runtime.records import input_format_of, read_lines

    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    fmt = input_format_of(path).value
    with path.open("rb") as f:
        for line in read_lines(f, max_line_bytes):
            if fmt in ("csv", "tsv"):
                import csv

                return [c.strip() for c in next(csv.reader([line.text or ""], delimiter="\t" if fmt == "tsv" else ","))]
            if fmt == "jsonl" and line.text and line.text.strip():
                try:
                    value = json.loads(line.text)
                except json.JSONDecodeError:
                    continue
                return list(value) if isinstance(value, dict) else []
            if fmt == "txt":
                return []
    return []


def resolve_id_column(args: DistributedArgs) -> tuple[str | None, bool]:
    """The id column to use (None: row numbers), checked against the first file, and whether
    its ids are integers (from the first file's schema or first JSON record; CSV ids are text)."""
    columns = columns_of(args.files[0], args.max_line_bytes)
    if args.id_column is None:
        column = "id" if "id" in columns else None
    elif args.id_column not in columns:
        raise BertedgeError(f"--id-column '{args.id_column}' is not in '{args.files[0].name}' "
                            f"(columns: {', '.join(columns) or 'none'})",
                            "name an existing column, or leave --id-column out to use row numbers")
    else:
        column = args.id_column
    return column, column is not None and integer_ids(args.files[0], column, args.max_line_bytes)


def integer_ids(path: Path, column: str, max_line_bytes: int) -> bool:
    """Whether a file's ids are integers: its Parquet column type, or its first JSON record's id."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow as pa
        import pyarrow.parquet as pq

        return bool(pa.types.is_integer(pq.read_schema(path).field(column).type))
    from bertedge.runtime.records import InputFormat, input_format_of, read_records

    if input_format_of(path) is not InputFormat.JSONL:
        return False
    with path.open("rb") as f:
        for record in read_records(f, InputFormat.JSONL, ("\0",), (), max_line_bytes, column):
            if record.id is not None:
                return is_int(record.id)
    return False


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parsed_schema(int_ids: bool) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("file", pa.int32()), ("row", pa.int64()), ("line", pa.int64()),
                      ("id", pa.int64() if int_ids else pa.string()), ("text", pa.large_string()),
                      ("text_pair", pa.large_string()), ("error", pa.string()), ("cut", pa.bool_())])


def parse_files(batch: pa.Table, files: list[str], text_columns: tuple[str, ...],
                pair_columns: tuple[str, ...], id_column: str | None, int_ids: bool,
                max_line_bytes: int, block_rows: int) -> Iterator[pa.Table]:
    """Ray task: input files (bytes + path) -> one row per input record, errors included.

    Yields tables of `block_rows` rows, so one huge file never makes one huge Python list.
    """
    import pyarrow as pa

    index = {f: i for i, f in enumerate(files)}
    schema = parsed_schema(int_ids or id_column is None)
    rows: list[dict[str, Any]] = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True):
        file_index = index[str(Path(path).resolve())]
        parse = parse_parquet if Path(path).suffix.lower() in PARQUET_SUFFIXES else parse_text
        for row in parse(data, Path(path), text_columns, pair_columns, id_column, max_line_bytes):
            row["file"] = file_index
            if id_column is not None:
                fit_id(row, int_ids)
            rows.append(row)
            if len(rows) == block_rows:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def fit_id(row: dict[str, Any], int_ids: bool) -> None:
    """Make a row's id fit the id column's type: integers stay integers, other JSON values
    become their JSON text; an id that breaks the column's type makes the row an error row."""
    value = row["id"]
    if value is None or (is_int(value) if int_ids else isinstance(value, str)):
        return
    if not int_ids:
        row["id"] = json.dumps(value)
        return
    row["id"] = None
    if row["error"] is None:
        row["text"] = row["text_pair"] = None
        row["error"] = f"id {json.dumps(value)[:40]} is not an integer like the first record's"


def parse_text(data: bytes, path: Path, text_columns: tuple[str, ...], pair_columns: tuple[str, ...],
               id_column: str | None, max_line_bytes: int) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL / CSV / TSV / TXT file through the local engine's own reader (ids included)."""
    from bertedge.runtime.records import input_format_of, read_records

    fmt = input_format_of(path)
    records = read_records(io.BytesIO(data), fmt, text_columns, pair_columns, max_line_bytes, id_column)
    for row, record in enumerate(records):
        item = record.item or (None, None)
        yield {"row": row, "line": record.line, "id": record.id if id_column else row,
               "text": item[0], "text_pair": item[1], "error": record.error, "cut": record.truncated}


def parse_parquet(data: bytes, path: Path, text_columns: tuple[str, ...], pair_columns: tuple[str, ...],
                  id_column: str | None, max_line_bytes: int) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet file; text checked by the runtime's `as_pair`, binary text decoded here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bertedge.runtime.records import as_pair, column_indices

    table = pq.read_table(pa.BufferReader(data))
    text_at, pair_at = column_indices(table.column_names, text_columns, pair_columns)
    texts = table.column(text_at).to_pylist()
    pairs = table.column(pair_at).to_pylist() if pair_at is not None else [None] * len(texts)
    if id_column:
        ids = (table.column(id_column).to_pylist() if id_column in table.column_names
               else [None] * len(texts))
    else:
        ids = list(range(len(texts)))
    for row, (text, pair, id_) in enumerate(zip(texts, pairs, ids, strict=True)):
        checked = as_pair((decoded(text), decoded(pair)))
        good = not isinstance(checked, str)
        yield {"row": row, "line": None, "id": id_,
               "text": checked[0] if good else None, "text_pair": checked[1] if good else None,
               "error": None if good else undecodable(text, pair) or checked, "cut": False}


def decoded(value: Any) -> Any:
    """bytes as UTF-8 text (undecodable bytes stay bytes, which as_pair then rejects)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def undecodable(*values: Any) -> str | None:
    return "not valid UTF-8" if any(isinstance(decoded(v), bytes) for v in values) else None


# ----------------------------------------------------------------------------- the actor


class BundlePredictor:
    """Ray Data callable class: loads and verifies the bundle once per actor, predicts batches.

    Rows that carry a parse error, or that `Predictor` rejects, come back as status "error"
    with their reason, so no row is ever dropped.
    """

    def __init__(self, bundle: str, shipped: list[Any] | None, providers: str | None, threads: int,
                 batch_size: int, progress: Any = None, fault_marker: str | None = None,
                 aggregation: str = "first", top_k: int = 1) -> None:
        from bertedge.runtime.predictor import Predictor

        self.fault_marker = fault_marker
        self.progress = progress
        with tempfile.TemporaryDirectory(prefix="bertedge-ray-") as tmp:
            path = unpack_shipped(shipped, Path(tmp)) if shipped else Path(bundle)
            self.predictor = Predictor(path, providers=providers, threads=threads, batch_size=batch_size,
                                       aggregation=aggregation, top_k=top_k)
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
        """Predictions for a window; an item the predictor rejects gets its own error row."""
        results = self.predictor.predict_isolated(items)
        return [{"status": "error", "reason": r["error"]} if "error" in r else r for r in results]

    def maybe_die(self) -> None:
        """Test hook: hard-kill this actor once (the marker is deleted first, so the retry lives)."""
        if self.fault_marker and os.path.exists(self.fault_marker):
            try:
                os.remove(self.fault_marker)
            except FileNotFoundError:  # another actor took it
                return
            os._exit(1)


def unpack_shipped(shipped: list[Any], folder: Path) -> Path:
    """Write a shipped bundle archive (an object-store ref in a list) to folder; its path."""
    import ray

    name, data = ray.get(shipped[0])
    path = folder / name
    path.write_bytes(data)
    return path


def result_schema(predictor: Any) -> pa.Schema:
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


# ----------------------------------------------------------------------------- the job


def predict_dataset(args: DistributedArgs, log: TextIO | None = None) -> DistributedReport:
    """Predict every row of the inputs with a Ray actor pool; write output and error rows.

    Args:
        args: inputs, bundle, output and cluster options.
        log: where progress lines go (default stderr; silenced by `args.progress=False`).

    Returns:
        Counts, where things were written, and the time of each stage.

    Raises:
        BertedgeError: bad options or inputs, Ray missing, or rows lost (never expected).
    """
    try:
        import ray
    except ImportError:
        raise BertedgeError("--engine ray needs Ray", "pip install 'bertedge[ray]'") from None
    log = log or sys.stderr
    started = time.perf_counter()
    text_columns, pair_columns = bundle_task(args.bundle).columns(args.text_columns, args.pair_columns)
    args = replace(args, text_columns=text_columns, pair_columns=pair_columns)
    id_column, int_ids = resolve_id_column(args)
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=args.address, num_cpus=args.num_cpus if not (args.address or os.environ.get(
            "RAY_ADDRESS")) else None, include_dashboard=False, logging_level=logging.WARNING,
            log_to_driver=True)
    import ray.data  # noqa: F401  (configures its loggers, which are quieted next)

    ray_data_log = logging.getLogger("ray.data")
    level = ray_data_log.level
    ray_data_log.setLevel(logging.WARNING)  # Ray Data's per-stage INFO lines drown the progress
    try:
        return run_job(args, id_column, int_ids, log, started, time.perf_counter() - started)
    except Exception as e:  # Ray wraps a worker's BertedgeError; show the user the original
        cause = user_error_in(e)
        if cause is None:
            raise
        raise BertedgeError(cause.problem, cause.fix) from None
    finally:
        ray_data_log.setLevel(level)
        if owned:
            ray.shutdown()


def bundle_task(bundle: Path) -> Any:
    """The bundle's task, after verifying it here on the driver (checksums included), so a
    corrupt or unreadable bundle is one clean error before Ray starts, not an actor traceback."""
    from bertedge.runtime.bundle import open_bundle
    from bertedge.runtime.meta import meta_from_manifest

    with open_bundle(bundle) as opened:
        return meta_from_manifest(opened.manifest).task


def user_error_in(error: BaseException) -> BertedgeError | None:
    """The BertedgeError inside a (possibly Ray-wrapped) exception chain, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, BertedgeError):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None


def run_job(args: DistributedArgs, id_column: str | None, int_ids: bool, log: TextIO, started: float,
            init_s: float) -> DistributedReport:
    """The Ray Data pipeline on a connected Ray; see the module docstring."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own rows done / total line instead
    ctx.execution_options.preserve_order = True  # output blocks in (file, row) order: no sort
    address = cluster_address(args)
    actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // args.threads_per_actor)
    check_capacity(actors, args.threads_per_actor, int(ray.cluster_resources().get("CPU", 0)))
    transport = args.transport
    if transport is BundleTransport.AUTO:
        transport = BundleTransport.SHIP if address != "local" else BundleTransport.PATH

    t0 = time.perf_counter()
    window = WINDOW_BATCHES * args.batch_size
    files = [str(f) for f in args.files]
    parse: Any = parse_files  # a generator of blocks; Ray's stubs only admit single returns
    parsed = ray.data.read_binary_files(files, include_paths=True).map_batches(
        parse, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs={"files": files, "text_columns": args.text_columns, "pair_columns": args.pair_columns,
                   "id_column": id_column, "int_ids": int_ids, "max_line_bytes": args.max_line_bytes,
                   "block_rows": window}).materialize()
    rows_in = parsed.count()
    if rows_in == 0:
        raise BertedgeError(f"the input ({len(files)} file(s)) has no rows", "check --input")
    # Ray merges the parse stage's output into few large blocks; split them so every actor gets
    # work (here, before the actors hold the CPUs that this split needs).
    blocks = max(actors, min(-(-rows_in // window), BLOCKS_PER_ACTOR * actors))
    parsed = parsed.repartition(blocks, shuffle=False).materialize()
    read_s = time.perf_counter() - t0

    counter: Any = ray.remote(num_cpus=0)(ProgressCounter).remote()
    shipped = [ray.put(ship_bundle(args.bundle))] if transport is BundleTransport.SHIP else None
    t1, t1_wall = time.perf_counter(), time.time()
    predicted = parsed.map_batches(
        BundlePredictor, batch_size=window, batch_format="pyarrow",
        zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=args.threads_per_actor,
        fn_constructor_kwargs={"bundle": str(args.bundle), "shipped": shipped,
                               "providers": args.providers, "threads": args.threads_per_actor,
                               "batch_size": args.batch_size, "progress": counter,
                               "aggregation": args.aggregation, "top_k": args.top_k,
                               "fault_marker": os.environ.get(FAULT_MARKER_ENV)},
    )  # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: a killed actor
    # restarts and its batch is retried (tests/test_distributed.py kills one to check)
    predicted = run_with_progress(predicted, counter, rows_in, log if args.progress else None)
    predict_s = time.perf_counter() - t1
    first = ray.get(counter.state.remote())[1]
    first_batch_s = first - t1_wall if first else predict_s

    t2 = time.perf_counter()
    keep = ["file", "row", "line", "id"] if len(files) > 1 else ["row", "line", "id"]
    rows_ok, truncated, error_rows = write_output(predicted, args, files, keep, rows_in)
    errors = write_errors(error_rows, args.errors_path) if error_rows else None
    write_s = time.perf_counter() - t2
    return DistributedReport(
        rows_in=rows_in, rows_ok=rows_ok, rows_error=len(error_rows), truncated=truncated, files=len(files),
        output=str(args.output), errors=str(errors) if errors else None, address=address,
        actors=actors, threads_per_actor=args.threads_per_actor, transport=transport.value,
        init_s=init_s, read_s=read_s, first_batch_s=min(max(0.0, first_batch_s), predict_s), predict_s=predict_s,
        write_s=write_s, wall_s=time.perf_counter() - started, rows_per_s=rows_in / max(predict_s, 1e-9))


def cluster_address(args: DistributedArgs) -> str:
    """'local' for an instance on this machine, else the address connected to."""
    return args.address or os.environ.get("RAY_ADDRESS") or "local"


def check_capacity(actors: int, threads: int, cpus: int) -> None:
    """Fail fast when the actor pool cannot fit: a fixed pool waits forever for missing CPUs."""
    if cpus and actors * threads > cpus:
        raise BertedgeError(f"{actors} actor(s) x {threads} thread(s) need {actors * threads} CPUs, "
                            f"the Ray cluster has {cpus}",
                            "lower --actors or --threads-per-actor, or add nodes")


def ship_bundle(bundle: Path) -> tuple[str, bytes]:
    """(archive name, bytes) of the bundle, packing a folder into a .tar.gz first."""
    from bertedge.runtime.bundle import ArchiveFormat, archive_bundle, archive_format_of

    if bundle.is_file() and archive_format_of(bundle):
        return bundle.name, bundle.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bertedge-ship-") as tmp:
        archive = archive_bundle(bundle, Path(tmp) / "bundle.tar.gz", ArchiveFormat.TAR_GZ)
        return archive.name, archive.read_bytes()


def run_with_progress(ds: Any, counter: Any, total: int, log: TextIO | None,
                      every_s: float = 2.0) -> Any:
    """Materialize ds in a thread while printing rows done / total and rows/s from the counter."""
    import ray

    done: dict[str, Any] = {}

    def work() -> None:
        try:
            done["ds"] = ds.materialize()
        except BaseException as e:  # re-raised on the calling thread
            done["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    start = time.perf_counter()
    thread.start()
    while thread.is_alive():
        thread.join(every_s)
        if log is not None:
            rows = min(ray.get(counter.state.remote())[0], total)
            elapsed = time.perf_counter() - start
            log.write(f"rows {rows}/{total} ({100 * rows / total:.0f}%), "
                      f"{rows / max(elapsed, 1e-9):.0f} rows/s, {elapsed:.0f} s\n")
            log.flush()
    if "error" in done:
        raise done["error"]
    return done["ds"]


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


def write_output(ds: Any, args: DistributedArgs, files: list[str], keep: list[str],
                 rows_in: int) -> tuple[int, int, list[dict[str, Any]]]:
    """Write the ok rows; return (ok rows, truncated rows, error rows), checked against rows_in.

    The predict stage preserves order, so its blocks already run in (file, row) order: a single
    output file is streamed block by block from the object store, with no sort. A folder output is
    written by the workers (`write_parquet` / `write_json`).
    """
    import pyarrow.compute as pc
    import ray

    single = args.single_file_output
    partial = args.output.with_name(args.output.name + ".partial")
    if single:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    elif args.output.exists() and any(args.output.iterdir()):
        raise BertedgeError(f"output folder '{args.output}' is not empty", "choose a new --out")
    ok = truncated = 0
    errors: list[dict[str, Any]] = []
    last = (-1, -1)
    with table_sink(partial if single else None, args.output_format) as sink:
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
        partial.unlink(missing_ok=True)
        raise BertedgeError(f"{rows_in} rows in but {ok} predicted + {len(errors)} errors came out",
                            "this is a bug: please report it with the input")
    if single:
        partial.replace(args.output)  # a failed job never leaves a half-written output
    else:
        ok_rows = ds.map_batches(with_status("ok"), batch_format="pyarrow", batch_size=None).map_batches(
            finish_columns, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"files": files, "keep": keep, "drop": ["status", "reason"]})
        if args.output_format is OutputFormat.JSONL:
            ok_rows.write_json(str(args.output))
        else:
            ok_rows.write_parquet(str(args.output))
    return ok, truncated, errors


@contextlib.contextmanager
def table_sink(path: Path | None, fmt: OutputFormat | None) -> Iterator[Callable[[pa.Table], None]]:
    """A function that appends Arrow tables to a JSONL or Parquet file (no path: discards them)."""
    if path is None:
        yield lambda table: None
    elif fmt is OutputFormat.JSONL:
        with path.open("w", encoding="utf-8") as f:
            yield lambda table: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in table.to_pylist())
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


def write_errors(rows: list[dict[str, Any]], path: Path) -> Path:
    """Error rows (ids and reason) as JSONL, in (file, row) order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
