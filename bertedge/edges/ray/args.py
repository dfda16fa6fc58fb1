"""What a Ray predict run takes (`DistributedArgs`) and what it reports (`DistributedReport`)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bertedge.errors import BertedgeError
from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.records import SUFFIX_FORMATS, input_problem


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
    """Options of `bertedge predict --engine ray`.

    Threads: each actor reserves `threads_per_actor` CPUs from Ray; its onnxruntime session runs
    `runtime.threads` intra-op threads, where 0 (the default) means one per CPU the actor may
    use, i.e. `threads_per_actor`. More threads than the reservation oversubscribe the cores.
    """

    bundle: Path  # bundle folder or .tar.gz / .zip archive
    inputs: list[str]  # files, folders or globs of .jsonl / .csv / .tsv / .txt / .parquet (or a pipe)
    output: Path  # a .parquet / .jsonl file (ordered, one file) or a folder of part files
    errors: Path | None = None  # error rows as JSONL; None: <output>.errors.jsonl
    output_format: OutputFormat | None = None  # None: from the output suffix (folder: parquet)
    text_columns: tuple[str, ...] = ("text", "sentence", "content")  # first present holds the text
    pair_columns: tuple[str, ...] = ()  # first present holds the pair's text (JSONL: text_pair)
    id_column: str | None = None  # None: "id" when the input has it, else the row number
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS, else a local instance
    actors: int | None = None  # predictor actors; None: cluster CPUs // threads_per_actor
    threads_per_actor: int = 1  # CPUs Ray reserves per actor (its session threads when runtime.threads is 0)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # batch size, providers, digest, ...
    transport: BundleTransport = BundleTransport.AUTO  # how the bundle reaches the actors
    num_cpus: int | None = None  # CPUs of a local instance started here (None: all)
    max_line_bytes: int = 1 << 20  # longer input lines are cut (txt) or become error rows
    progress: bool = True  # rows done / total and rows/s on the log stream
    overwrite: bool = False  # replace an existing output (and errors file) instead of refusing
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
        problems = [p for p in (positive("--actors", self.actors),
                                positive("--threads-per-actor", self.threads_per_actor)) if p]
        if not self.bundle.exists():
            problems.append(f"bundle '{self.bundle}' does not exist")
        try:
            self.files = expand_inputs(self.inputs)
        except BertedgeError as e:
            problems.append(e.problem)
        if self.output.resolve() in {f.resolve() for f in self.files}:
            problems.append(f"--out '{self.output}' is also an input")
        problems += self.existing_outputs()
        if problems:
            raise BertedgeError("; ".join(problems), "see `bertedge predict --help`")

    def existing_outputs(self) -> list[str]:
        """Outputs that exist already: refused unless `overwrite` (as package and export do)."""
        if self.overwrite:
            return []
        taken = [p for p in (self.output, self.errors_path)
                 if p.is_file() or p.is_symlink() or (p.is_dir() and any(p.iterdir()))]
        return [f"'{p}' exists (pass --overwrite to replace it, or choose another --out / --errors)"
                for p in taken]

    @property
    def errors_path(self) -> Path:
        return self.errors or Path(f"{self.output}.errors.jsonl")

    @property
    def single_file_output(self) -> bool:
        """A .parquet / .jsonl output is one ordered file written by the driver; else a folder."""
        return self.output.suffix.lower() in (".parquet", ".pq", ".jsonl", ".json")

    @property
    def session_threads(self) -> int:
        """Intra-op threads of each actor's session: `runtime.threads`, or its CPU reservation."""
        return self.runtime.threads or self.threads_per_actor


def positive(option: str, value: int | None) -> str | None:
    """A problem message when an optional count is below 1.

    >>> positive("--actors", 0), positive("--actors", None)
    ('--actors must be at least 1 (got 0)', None)
    """
    return f"{option} must be at least 1 (got {value})" if value is not None and value < 1 else None


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named, found in folders, or matched by globs; sorted, and of a supported kind.

    A named pipe or device (`-i /dev/stdin`, `-i <(...)`) is taken as it is (one text per line).
    """
    files: list[Path] = []
    problems: list[str] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and supported(p))
        elif path.exists() or path.is_symlink():
            found = [path]
            problems += [p for p in [input_problem(path)] if p]
        else:
            anchor = Path(path.anchor or ".")
            pattern = str(path.relative_to(anchor)) if path.is_absolute() else spec
            found = sorted(p for p in anchor.glob(pattern) if p.is_file() and supported(p))
        if not found:
            problems.append(f"input '{spec}' matches no .jsonl / .csv / .tsv / .txt / .parquet file")
        unsupported = [p.name for p in found if p.is_file() and not supported(p)]
        if unsupported:
            problems.append(f"input '{spec}' has an unsupported suffix ({', '.join(unsupported)})")
        files.extend(found)
    if not inputs:
        problems.append("no --input given")
    if problems:
        raise BertedgeError("; ".join(problems), "pass files, folders or globs of those formats")
    return sorted(dict.fromkeys(p.resolve() if p.is_file() else p.absolute() for p in files))


def supported(path: Path) -> bool:
    return path.suffix.lower() in SUFFIX_FORMATS


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
