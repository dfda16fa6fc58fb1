"""The bundle manifest (manifest.json) as one typed record, parsed and checked once, here.

`parse_manifest` turns the JSON object into a frozen `Manifest`, listing every field that is
missing, of the wrong type or out of range in one error. `fit_problems` then checks the record
against what the graph says about itself (`bertedge.runtime.graphinfo.GraphFacts`): the task's
outputs and their rank, one logit per label, the position table, the vocabulary, the labels the
model file carries. Everyone else reads the record's attributes, never the dict.

The record keeps the JSON it was parsed from: `to_dict()` gives it back unchanged, so a bundle's
digest (the SHA-256 of the canonical manifest JSON) stays what `bertedge package` printed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import ARTIFACT_KINDS, CASCADE, ENGINES, ONNXRUNTIME
from bertedge.runtime.cascade import CascadeSpec
from bertedge.runtime.graphinfo import GraphFacts, graph_facts
from bertedge.runtime.meta import (
    MAX_POSITIONS,
    MIN_LENGTH,
    WINDOWED_TASKS,
    ModelMeta,
    default_stride,
    duplicate_labels,
    position_limit,
)
from bertedge.runtime.stages import stage_kind_problems
from bertedge.runtime.tasks import TASKS, get_task

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "bertedge-bundle"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "task", "labels", "max_length", "model_type",
                 "inputs", "files")
PRECISIONS = tuple(dict.fromkeys(k.precision for k in ARTIFACT_KINDS.values()))  # fp32, int8, bf16, fp16
MAX_FILES = 16  # a bundle is 3 or 4 files; an archive holds at most this many members
MIN_LABELS = {"classification": 2, "qa": 0}  # a classifier needs two classes, NER one label; QA has none
OUTPUT_RANK = {"classification": 2, "ner": 3, "qa": 2}  # (batch, labels), (batch, seq, labels), (batch, seq)
LABELS_KEY = "bertedge.labels"  # ONNX metadata_props entry package writes: the labels, as JSON
SHA256_HEX = frozenset("0123456789abcdef")
SHOWN = 10  # problems or names an error lists before "and N more"
REBUILD = "rebuild it with `bertedge package EXPORT_DIR --out BUNDLE` or copy it again"
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 40, 40, 6, 4, 2


def shown(value: Any) -> str:
    """A value's repr, short enough for a one-line error.

    >>> shown("x" * 100)
    "'xxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxx'"
    >>> shown(list(range(100)))
    '[0, 1, 2, 3, 4, 5, ...]'
    """
    return _short.repr(value)


def listing(items: list[str], sep: str = "; ") -> str:
    """The first SHOWN items joined, and how many more there are (an error stays one short line).

    >>> listing([f"p{i}" for i in range(12)])
    'p0; p1; p2; p3; p4; p5; p6; p7; p8; p9; and 2 more'
    """
    more = [f"and {len(items) - SHOWN} more"] if len(items) > SHOWN else []
    return sep.join(items[:SHOWN] + more)


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle: its SHA-256 and, when recorded, its size."""

    sha256: str
    bytes: int | None = None


@dataclass(frozen=True)
class Manifest:
    """A checked manifest.json. Build one with `parse_manifest`; `to_dict()` is the JSON."""

    task: str  # a key of bertedge.runtime.tasks.TASKS
    labels: tuple[str, ...]  # unique, in logit order
    max_length: int  # tokens per window (MIN_LENGTH..max_positions)
    model_type: str  # config.json model_type: "bert", "distilbert", ...
    inputs: tuple[str, ...]  # the graph's input names
    files: dict[str, FileEntry]  # every file of the bundle but the manifest
    engine: str = ONNXRUNTIME  # a key of bertedge.runtime.artifacts.ENGINES
    precision: str | None = None  # fp32, fp16, bf16 or int8 (None: not recorded)
    quantization: dict[str, Any] | None = None  # how an INT8 artifact was quantized
    stride: int | None = None  # QA: tokens shared by consecutive windows (0 < stride < max_length)
    max_positions: int | None = None  # the position table's limit in tokens
    artifact: str | None = None  # the artifact kind shipped (a key of ARTIFACT_KINDS)
    cascade: CascadeSpec | None = None  # a cascade's stages (artifact "cascade"; `engine` is stage 1's)
    provenance: dict[str, Any] = field(default_factory=dict)  # export facts and validation figures
    bertedge_version: str | None = None
    created: str | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the JSON, as read

    @property
    def model_files(self) -> tuple[str, ...]:
        """The engine's model files in the bundle, graph first (a cascade: every stage's, stage 1 first)."""
        if self.cascade is not None:
            return tuple(f for s in self.cascade.stages for f in s.files)
        return ENGINES[self.engine].bundle_files

    @property
    def graphs(self) -> tuple[str, ...]:
        """The graph file of each model in the bundle: one, or one per cascade stage."""
        if self.cascade is not None:
            return tuple(s.files[0] for s in self.cascade.stages)
        return self.model_files[:1]

    @property
    def window_stride(self) -> int:
        """The QA window overlap: the recorded stride, or the default for max_length."""
        return self.stride or default_stride(self.max_length)

    @property
    def position_limit(self) -> int:
        """The longest window the model takes (max_positions, or max_length when not recorded)."""
        return self.max_positions or self.max_length

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical manifest JSON (see `manifest_digest`)."""
        return manifest_digest(self.raw)

    def meta(self) -> ModelMeta:
        """The model metadata this manifest carries."""
        return ModelMeta(task=get_task(self.task), labels=self.labels, max_length=self.max_length,
                         stride=self.window_stride, model_type=self.model_type,
                         max_positions=self.position_limit)

    def to_dict(self) -> dict[str, Any]:
        """The manifest JSON object, as written (a copy: the record stays frozen)."""
        return copy.deepcopy(self.raw)


def manifest_digest(manifest: Manifest | dict[str, Any]) -> str:
    """SHA-256 of the canonical manifest JSON (sorted keys, no spaces).

    The manifest lists the size and SHA-256 of every file, so this one value pins the model,
    the tokenizer and every field (labels, max length, ...): pass it as `expect_digest` to
    refuse any other bundle, as pip's --require-hashes does for packages.

    >>> manifest_digest({"b": 1, "a": [1, 2]}) == manifest_digest({"a": [1, 2], "b": 1})
    True
    """
    data = manifest.raw if isinstance(manifest, Manifest) else manifest
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_manifest(data: dict[str, Any], where: str = "the manifest") -> Manifest:
    """The record of a manifest JSON object, every field checked; one error lists every problem.

    Raises:
        BertedgeError: a missing field, a wrong type or a value out of range (all of them).
    """
    problems = manifest_problems(data)
    if problems:
        raise BertedgeError(f"{where} is not a valid bertedge manifest: {listing(problems)}", REBUILD)
    provenance = data.get("provenance") or {}
    named = provenance.get("artifact", {}).get("name") if isinstance(provenance.get("artifact"), dict) else None
    return Manifest(
        task=data["task"], labels=tuple(data["labels"]), max_length=data["max_length"],
        model_type=data["model_type"], inputs=tuple(data["inputs"]),
        files={n: FileEntry(e["sha256"], e.get("bytes")) for n, e in data["files"].items()},
        engine=data.get("engine") or ONNXRUNTIME, precision=data.get("precision"),
        quantization=data.get("quantization"), stride=data.get("stride"),
        max_positions=data.get("max_positions"),
        artifact=data.get("artifact") or (named if isinstance(named, str) else None),
        cascade=CascadeSpec.from_dict(data["cascade"]) if data.get("cascade") is not None else None,
        provenance=provenance, bertedge_version=data.get("bertedge_version"), created=data.get("created"),
        format=data["format"], format_version=data["format_version"], raw=copy.deepcopy(data))


def is_int(value: Any) -> TypeGuard[int]:
    """An int that is not a bool (JSON true is not a length)."""
    return isinstance(value, int) and not isinstance(value, bool)


def manifest_problems(m: Manifest | dict[str, Any]) -> list[str]:
    """Every way a manifest breaks the schema (required keys, types, ranges, safe file names).

    >>> manifest_problems({"format": "bertedge-bundle"})[:2]
    ['missing format_version', 'missing task']
    """
    if isinstance(m, Manifest):
        m = m.raw
    problems = [f"missing {k}" for k in REQUIRED_KEYS if k not in m]
    if "format" in m and m["format"] != FORMAT:
        problems.append(f"format is {shown(m['format'])}, not {FORMAT!r}")
    if "format_version" in m and not (is_int(m["format_version"]) and 1 <= m["format_version"] <= FORMAT_VERSION):
        problems.append(f"format_version must be an integer in 1..{FORMAT_VERSION} (got {shown(m['format_version'])})")
    if "task" in m and not (isinstance(m["task"], str) and m["task"] in TASKS):
        problems.append(f"unknown task {shown(m['task'])} (this bertedge knows {', '.join(sorted(TASKS))})")
    if "labels" in m:
        problems += labels_problems(m["labels"], m.get("task"))
    problems += length_problems(m)
    for key in ("model_type", "bertedge_version", "created"):
        if key in m and not (isinstance(m[key], str) and (m[key] or key != "model_type")):
            problems.append(f"{key} must be a string (got {shown(m[key])})")
    if "inputs" in m and not (isinstance(m["inputs"], list) and m["inputs"]
                              and all(isinstance(i, str) for i in m["inputs"])):
        problems.append(f"inputs must be a non-empty list of graph input names (got {shown(m['inputs'])})")
    problems += kind_problems(m)
    for key in ("provenance", "quantization"):  # informational, but read at load (ISA warning, describe)
        if m.get(key) is not None and not isinstance(m[key], dict):
            problems.append(f"{key} must be an object or null (got {type(m[key]).__name__})")
    stages, found = cascade_problems(m)
    problems += found
    if "files" in m:
        engine = m.get("engine") if known(m.get("engine"), ENGINES) else None
        model = stages if stages is not None else ENGINES[engine or ONNXRUNTIME].bundle_files
        problems += files_problems(m["files"], model)
    return problems


def cascade_problems(m: dict[str, Any]) -> tuple[tuple[str, ...] | None, list[str]]:
    """(the stages' files, what is wrong): a `cascade` field goes with artifact "cascade" and stage 1's
    engine; 2 or more stages of known single-model kinds on their own engines, deltas in [0, 1].

    >>> cascade_problems({"artifact": "cascade"})[1]
    ["artifact 'cascade' needs a cascade field naming its stages"]
    """
    raw = m.get("cascade")
    if raw is None:
        return None, ["artifact 'cascade' needs a cascade field naming its stages"] \
            if m.get("artifact") == CASCADE else []
    try:
        spec = CascadeSpec.from_dict(raw)
    except BertedgeError as e:
        return (), [e.problem]
    problems = stage_kind_problems(spec)
    if m.get("artifact") != CASCADE:
        problems.append(f"a cascade field goes with artifact 'cascade' (got {shown(m.get('artifact'))})")
    if m.get("engine", ONNXRUNTIME) != spec.stages[0].engine:
        problems.append(f"engine {shown(m.get('engine'))} is not stage 1's ({spec.stages[0].engine})")
    return tuple(f for s in spec.stages for f in s.files), problems


def labels_problems(labels: Any, task: Any = None) -> list[str]:
    """Labels: a list of unique, non-empty strings, as many as the task needs (QA: none).

    >>> labels_problems([], "qa"), labels_problems([], "ner")
    ([], ['labels must be a non-empty list of strings (got [])'])
    """
    least = MIN_LABELS.get(task, 1) if isinstance(task, str) else 1
    if not isinstance(labels, list) or (not labels and least > 0):
        return [f"labels must be a non-empty list of strings (got {shown(labels)})"]
    if not all(isinstance(x, str) and x for x in labels):
        return [f"labels must all be non-empty strings (got {shown(labels)})"]
    repeated = duplicate_labels(labels)
    if repeated:
        return [f"labels repeat {listing([shown(x) for x in repeated], ', ')}"]
    if len(labels) < least:
        return [f"task {task!r} needs at least {least} labels (got {len(labels)})"]
    return []


def length_problems(m: dict[str, Any]) -> list[str]:
    """max_length in MIN_LENGTH..max_positions, max_positions and stride in range if present."""
    problems = []
    positions = m.get("max_positions")
    if positions is not None and not (is_int(positions) and MIN_LENGTH <= positions <= MAX_POSITIONS):
        problems.append(f"max_positions must be an integer in {MIN_LENGTH}..{MAX_POSITIONS} (got {shown(positions)})")
        positions = None
    length = m.get("max_length")
    if "max_length" in m:
        limit = positions or MAX_POSITIONS
        if not is_int(length):
            problems.append(f"max_length must be an integer (got {shown(length)})")
            length = None
        elif not MIN_LENGTH <= length <= limit:
            problems.append(f"max_length {shown(length)} is outside {MIN_LENGTH}..{limit}"
                            + (f" (the model has {positions} positions)" if positions else ""))
            length = None
    stride = m.get("stride")
    if stride is not None:
        if not is_int(stride) or not 1 <= stride <= MAX_POSITIONS:
            problems.append(f"stride must be a positive integer up to {MAX_POSITIONS} or absent "
                            f"(got {shown(stride)})")
        elif is_int(length) and stride >= length and m.get("task") in WINDOWED_TASKS:
            problems.append(f"stride {shown(stride)} must be less than max_length {length}")
    return problems


def known(value: Any, names: Any) -> bool:
    """A name in a table (a list or object from JSON is no name, and cannot be hashed).

    >>> known("int8", ("fp32", "int8")), known(["int8"], {"int8": 1})
    (True, False)
    """
    return isinstance(value, str) and value in names


def kind_problems(m: dict[str, Any]) -> list[str]:
    """engine, precision and artifact: names this bertedge knows (absent engine: onnxruntime)."""
    problems = []
    if "engine" in m and not known(m["engine"], ENGINES):
        problems.append(f"engine {shown(m['engine'])} is not one this bertedge runs ({', '.join(ENGINES)}); "
                        "a newer bertedge may")
    if m.get("precision") is not None and not known(m["precision"], PRECISIONS):
        problems.append(f"precision {shown(m['precision'])} is not one of {', '.join(PRECISIONS)}")
    if "artifact" in m and not known(m["artifact"], ARTIFACT_KINDS):
        problems.append(f"artifact {shown(m['artifact'])} is not a kind this bertedge knows "
                        f"({', '.join(ARTIFACT_KINDS)}); a newer bertedge may")
    return problems


def files_problems(files: Any, model: tuple[str, ...] = ("model.onnx",)) -> list[str]:
    """files: {name: {"sha256", "bytes"}}, names plain and inside the bundle, the engine's model
    files and the tokenizer listed, at most MAX_FILES of them."""
    if not isinstance(files, dict):
        return [f"files must be an object of name -> {{sha256, bytes}} (got {type(files).__name__})"]
    if len(files) > MAX_FILES:
        return [f"files lists {len(files)} files; a bundle has at most {MAX_FILES}"]
    problems = [f"no checksum for {n}" for n in (*model, TOKENIZER) if n not in files]
    for name, entry in files.items():
        if not plain_name(name) or name == MANIFEST:
            problems.append(f"file name {shown(name)} is not a plain name inside the bundle")
            continue
        if not isinstance(entry, dict):
            problems.append(f"files[{shown(name)}] must be an object with sha256 and bytes")
            continue
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= SHA256_HEX):
            problems.append(f"files[{shown(name)}].sha256 is not a SHA-256 hex digest")
        if "bytes" in entry and not (is_int(entry["bytes"]) and entry["bytes"] >= 0):
            problems.append(f"files[{shown(name)}].bytes must be a non-negative integer")
    return problems


def plain_name(name: str) -> bool:
    """A file name that stays inside the bundle folder.

    >>> plain_name("model.onnx"), plain_name("../x"), plain_name("a/b"), plain_name("..")
    (True, False, False, False)
    """
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") \
        and len(name) <= 255


# ----------------------------------------------------------------------------- against the graph


def fit_problems(manifest: Manifest, facts: GraphFacts) -> list[str]:
    """What the graph contradicts in the manifest: the task's outputs and their rank, one logit
    per label (when the graph states the label axis), the position table, the labels the model
    file carries."""
    task = get_task(manifest.task)
    absent = [n for n in task.output_names if n not in facts.outputs]
    if absent:
        return [f"task {task.name!r} needs graph output(s) {', '.join(absent)} but the graph has "
                f"{listing(list(facts.outputs), ', ')}" + graph_task_hint(facts)]
    rank = OUTPUT_RANK.get(task.name)
    for name in task.output_names:
        shape = facts.outputs[name]
        if rank and shape and len(shape) != rank:
            return [f"task {task.name!r} needs a rank-{rank} {name} output, but the graph's has rank "
                    f"{len(shape)}" + graph_task_hint(facts)]
    problems = []
    if "logits" in task.output_names and facts.outputs["logits"]:
        width = facts.outputs["logits"][-1]
        if is_int(width) and width != len(manifest.labels):
            problems.append(f"{len(manifest.labels)} labels but the model outputs {width} logits")
    problems += position_problems(manifest, facts)
    carried = facts.metadata.get(LABELS_KEY)
    if carried is not None and carried != json.dumps(list(manifest.labels)):
        problems.append(f"the model file carries the labels {shown(carried)}, the manifest "
                        f"{shown(list(manifest.labels))}")
    return problems


def graph_task_hint(facts: GraphFacts) -> str:
    """Which task the graph's outputs do fit, as a hint: ' (the graph fits task 'ner')'."""
    for task in TASKS.values():
        shapes = [facts.outputs.get(n) for n in task.output_names]
        if all(s is not None and (not s or len(s) == OUTPUT_RANK.get(task.name, len(s))) for s in shapes):
            return f" (the graph fits task {task.name!r})"
    return ""


def position_problems(manifest: Manifest, facts: GraphFacts) -> list[str]:
    """max_length and max_positions within the graph's position table (less RoBERTa's offset)."""
    if not facts.position_rows:
        return []
    limit = position_limit({"max_position_embeddings": facts.position_rows, "model_type": manifest.model_type})
    problems = []
    for key, value in (("max_length", manifest.max_length), ("max_positions", manifest.max_positions)):
        if value is not None and value > limit:
            problems.append(f"{key} {value} exceeds the graph's position table ({limit} tokens)")
    return problems


def vocabulary_problems(largest_id: int, facts: GraphFacts) -> list[str]:
    """The tokenizer's largest id must index the graph's word-embedding table."""
    if facts.vocab_rows and largest_id >= facts.vocab_rows:
        return [f"the tokenizer's ids go up to {largest_id} but the graph's vocabulary has "
                f"{facts.vocab_rows} rows: it is another model's tokenizer"]
    return []


def check_fit(root: Path, manifest: Manifest, where: str, tokenizer: Any = None, fix: str = REBUILD) -> Any:
    """Refuse a manifest a graph (each cascade stage's) or the tokenizer contradicts; returns the
    loaded tokenizer."""
    if tokenizer is None:
        tokenizer = load_tokenizer_file(root / TOKENIZER, fix, f"{where}: {TOKENIZER}")
    for model in manifest.graphs:
        facts = graph_facts(root / model)
        problems = fit_problems(manifest, facts) + vocabulary_problems(largest_id(tokenizer), facts)
        if problems:
            raise BertedgeError(f"{where}: the manifest does not fit {model}: {listing(problems)}", fix)
    return tokenizer


def load_tokenizer_file(path: Path, fix: str, name: str | None = None) -> Any:
    """tokenizer.json loaded once by `tokenizers` (padding and truncation off), or one error line."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses with long texts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BertedgeError(f"{name or repr(str(path))} is not a valid tokenizer.json ({first})", fix) from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def largest_id(tokenizer: Any) -> int:
    """The largest token id a tokenizer can produce (added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)


def check_file(root: Path, name: str, sha256: str, size: int | None) -> str | None:
    """What is wrong with one bundle file (missing / truncated / edited / corrupt), or None."""
    path = root / name
    if not path.is_file():
        return f"file '{name}' is missing"
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        if edited_json(path):
            return f"file '{name}' was edited ({actual_size} bytes, manifest says {size})"
        state = "truncated" if actual_size < size else "the wrong size"
        return f"file '{name}' is {state} ({actual_size} bytes, manifest says {size})"
    actual = sha256_of(path)
    if actual != sha256:
        state = "was edited" if edited_json(path) else "is corrupt"
        return f"file '{name}' {state} (SHA-256 {actual[:12]}..., manifest says {sha256[:12]}...)"
    return None


def edited_json(path: Path) -> bool:
    """A .json file that still parses: edited, not cut short or damaged."""
    if path.suffix != ".json":
        return False
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        return False
    return True


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks so large models hash in constant memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
