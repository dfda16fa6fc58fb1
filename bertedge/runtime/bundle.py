"""The packaged bundle: everything `predict` needs in one folder (or one .tar.gz / .zip).

A bundle holds `model.onnx` (the chosen export artifact), `tokenizer.json` and `manifest.json`:
task, labels, max length, model type, graph inputs, quantization, provenance (the artifact's
validation figures), the bertedge version, and the size and SHA-256 of every file. Opening a
bundle verifies all of it, so a truncated copy or a flipped bit fails loudly at load.

This module sits on the runtime side of the dependency wall: stdlib, onnxruntime and
bertedge's numpy-only modules. It never imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import json
import mmap
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bertedge import __version__
from bertedge.errors import BertedgeError
from bertedge.runtime.meta import ModelMeta, read_model_meta
from bertedge.runtime.tasks import get_task

MANIFEST = "manifest.json"
MODEL = "model.onnx"
OV_MODEL, OV_WEIGHTS = "model.xml", "model.bin"  # an OpenVINO IR: the graph and its weights
TOKENIZER = "tokenizer.json"
FORMAT = "bertedge-bundle"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "task", "labels", "max_length", "model_type",
                 "inputs", "files")
EXPORT_FACTS = ("model_dir", "opset", "onnxruntime_version", "gate", "validation_inputs", "cpu",
                "warnings")  # export-report.json facts kept as provenance
REBUILD = "rebuild it with `bertedge package EXPORT_DIR --out BUNDLE` or copy it again"
# Caps on what extracting an archive may write: a bundle is 3 files, and the largest BERT-family
# ONNX models bertedge ships are well under 4 GiB (protobuf's own 2 GiB limit without external data).
MAX_ARCHIVE_BYTES = 4 << 30
MAX_ARCHIVE_MEMBERS = 16
SHA256_HEX = frozenset("0123456789abcdef")


class ArchiveFormat(str, enum.Enum):
    """How a bundle is shipped: a folder, or one archive file."""

    TAR_GZ = "tar.gz"
    ZIP = "zip"


@dataclass
class PackageArgs:
    """Options of `bertedge package`."""

    export_dir: Path  # folder written by `bertedge export` (export-report.json, model-*.onnx, ...)
    out: Path  # bundle folder, or archive path when archive is set / out ends in .tar.gz or .zip
    artifact: str | None = None  # artifact name (or file) from export-report.json; None: "recommended"
    archive: ArchiveFormat | None = None  # ship as one archive file instead of a folder
    force: bool = False  # package an artifact that failed (or skipped) validation
    overwrite: bool = False  # replace an existing bundle folder or archive at out

    def __post_init__(self) -> None:
        self.export_dir = Path(self.export_dir)
        self.out = Path(self.out)
        if self.archive is None:
            self.archive = archive_format_of(self.out)
        elif not isinstance(self.archive, ArchiveFormat):
            self.archive = ArchiveFormat(self.archive)


@dataclass(frozen=True)
class Bundle:
    """A bundle folder (or, fresh from `package`, its archive file) and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.root / model_files(self.manifest.get("engine"))[0]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER

    @property
    def digest(self) -> str:
        """The bundle's identity: SHA-256 of its canonical manifest (see `manifest_digest`)."""
        return manifest_digest(self.manifest)


def model_files(engine: Any) -> tuple[str, ...]:
    """The model's files in a bundle for an engine: model.onnx (onnxruntime, and bundles without
    an engine field), or OpenVINO's IR, model.xml + model.bin (graph first).

    >>> model_files(None), model_files("openvino")
    (('model.onnx',), ('model.xml', 'model.bin'))
    """
    return (OV_MODEL, OV_WEIGHTS) if engine == "openvino" else (MODEL,)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical manifest JSON (sorted keys, no spaces).

    The manifest lists the size and SHA-256 of every file, so this one value pins the model,
    the tokenizer and every field (labels, max length, ...): pass it as `expect_digest` to
    refuse any other bundle, as pip's --require-hashes does for packages.

    >>> manifest_digest({"b": 1, "a": [1, 2]}) == manifest_digest({"a": [1, 2], "b": 1})
    True
    """
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def archive_format_of(path: Path) -> ArchiveFormat | None:
    """The archive format a path's name implies, if any.

    >>> archive_format_of(Path("b.tar.gz")), archive_format_of(Path("b.zip")), archive_format_of(Path("b"))
    (<ArchiveFormat.TAR_GZ: 'tar.gz'>, <ArchiveFormat.ZIP: 'zip'>, None)
    """
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return ArchiveFormat.TAR_GZ
    if name.endswith(".zip"):
        return ArchiveFormat.ZIP
    return None


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks so large models hash in constant memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- building


def package(args: PackageArgs) -> Bundle:
    """Build a bundle from an export folder: the chosen artifact as model.onnx, plus manifest.

    Nothing is written until every check passed (export folder, artifact, --out); the bundle is
    built beside its destination and moved into place, so a failure leaves no half bundle.

    Returns:
        The bundle (`root`: its folder, or the archive file when an archive was asked for).

    Raises:
        BertedgeError: every problem with the export folder or the artifact choice, at once; an
            existing bundle at --out without `overwrite`; an --out that cannot be written.
    """
    report, meta = read_export(args.export_dir)
    record = choose_artifact(report, args.artifact, args.force)
    model_file = args.export_dir / str(record["file"])
    if not model_file.is_file():
        raise BertedgeError(f"artifact '{record['name']}' file '{model_file}' is missing",
                            "run `bertedge export` again")
    dest = args.out if args.archive is None else archive_path(args.out, args.archive)
    check_destination(dest, archive=args.archive is not None, overwrite=args.overwrite)
    provenance = {
        "export_dir": str(args.export_dir.resolve()),
        "recommended": report.get("recommended"),
        "artifact": record,
        "forced": bool(args.force and not record.get("passed")),
        "export": {k: report[k] for k in EXPORT_FACTS if k in report},
    }
    fields: dict[str, Any] = {
        "task": meta.task.name, "labels": list(meta.labels), "max_length": meta.max_length,
        "model_type": meta.model_type, "precision": record.get("precision"),
        "quantization": record.get("quantization"), "provenance": provenance,
        "stride": meta.stride, "max_positions": meta.max_positions,
        "engine": record.get("engine") or "onnxruntime",
    }
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.partial-", dir=dest.parent) as tmp:
        built = build_bundle(Path(tmp) / "bundle", model_file, args.export_dir / TOKENIZER, **fields)
        if args.archive is None:
            replace_path(built.root, dest)
        else:
            archive_bundle(built.root, Path(tmp) / dest.name, args.archive)
            replace_path(Path(tmp) / dest.name, dest)
    return Bundle(root=dest, manifest=built.manifest)


def check_destination(dest: Path, archive: bool, overwrite: bool) -> None:
    """Refuse an --out that exists (unless `overwrite` and it is a bundle) or cannot be written.

    Checked before anything is written, so a read-only folder costs no work and leaves nothing.
    """
    fix = "choose another --out, or pass --overwrite to replace the bundle"
    if archive and dest.is_dir():
        raise BertedgeError(f"'{dest}' is a folder, not an archive file", "choose another --out")
    if not archive and dest.exists() and not dest.is_dir():
        raise BertedgeError(f"'{dest}' exists and is a file, not a bundle folder", "choose another --out")
    if dest.is_dir() and any(dest.iterdir()):
        if not (dest / MANIFEST).is_file():
            raise BertedgeError(f"'{dest}' exists and is not a bundle; refusing to overwrite it",
                                "choose another --out or empty that folder")
        if not overwrite:
            raise BertedgeError(f"bundle folder '{dest}' already exists", fix)
    if dest.is_file() and not overwrite:
        raise BertedgeError(f"bundle archive '{dest}' already exists", fix)
    try:  # a real probe: permission bits say nothing for root or on a read-only mount
        dest.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f".{dest.name}.probe-", dir=dest.parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise BertedgeError(f"cannot write the bundle into '{dest.parent}' ({e.strerror or e})",
                            "choose an --out in a folder you can write to") from None


def replace_path(built: Path, dest: Path) -> None:
    """Move a finished bundle folder or archive to dest, replacing an old one (already allowed)."""
    if dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()
    os.replace(built, dest)


def read_export(export_dir: Path) -> tuple[dict[str, Any], ModelMeta]:
    """(export-report.json, model metadata) of an export folder; every missing piece listed."""
    if not export_dir.is_dir():
        raise BertedgeError(f"export folder '{export_dir}' does not exist",
                            "run `bertedge export MODEL_DIR --out EXPORT_DIR` first")
    needed = ("export-report.json", "bertedge.json", "config.json", TOKENIZER)
    missing = [n for n in needed if not (export_dir / n).is_file()]
    if missing:
        raise BertedgeError(f"'{export_dir}' is not a complete export folder (missing {', '.join(missing)})",
                            "run `bertedge export MODEL_DIR --out EXPORT_DIR` again")
    report = read_json(export_dir / "export-report.json")
    if not isinstance(report.get("artifacts"), list) or not report["artifacts"]:
        raise BertedgeError(f"export folder '{export_dir}': export-report.json lists no artifacts",
                            "run `bertedge export` again")
    return report, read_model_meta(export_dir)


def choose_artifact(report: dict[str, Any], name: str | None, force: bool) -> dict[str, Any]:
    """The export-report record to ship: by name (or file), default the recommended one."""
    artifacts: list[dict[str, Any]] = report["artifacts"]
    wanted = name or report.get("recommended")
    if not wanted:
        raise BertedgeError("export-report.json recommends no artifact",
                            f"pick one with --artifact ({', '.join(a['name'] for a in artifacts)})")
    record = next((a for a in artifacts if wanted in (a.get("name"), a.get("file"))), None)
    passing = [a["name"] for a in artifacts if a.get("passed")]
    if record is None:
        raise BertedgeError(f"no artifact named '{wanted}' in the export",
                            f"use --artifact with one of: {', '.join(a['name'] for a in artifacts)}")
    if not record.get("passed") and not force:
        why = "failed validation" if record.get("validated") else "was not validated"
        raise BertedgeError(
            f"artifact '{record['name']}' {why} (label agreement {record.get('label_agreement')})",
            f"pick a passing one with --artifact ({', '.join(passing) or 'none passed'}) "
            "or ship it anyway with --force")
    return record


def build_bundle(out: Path, model: Path, tokenizer: Path, *, task: str, labels: list[str],
                 max_length: int, model_type: str, precision: str | None = None,
                 quantization: dict[str, Any] | None = None,
                 provenance: dict[str, Any] | None = None, stride: int | None = None,
                 max_positions: int | None = None, engine: str = "onnxruntime") -> Bundle:
    """Write a bundle folder from a model file and a tokenizer (export can call this directly).

    An existing bundle at `out` is replaced; any other non-empty folder is refused.
    """
    get_task(task)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BertedgeError(f"'{out}' exists and is not a bundle; refusing to overwrite it",
                            "choose another --out or empty that folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in (MODEL, OV_MODEL, OV_WEIGHTS, TOKENIZER, MANIFEST):
        (out / name).unlink(missing_ok=True)
    names = model_files(engine)
    sources = [model] if len(names) == 1 else [model, model.with_suffix(".bin")]  # IR: weights beside the graph
    for src, name in zip(sources, names, strict=True):
        shutil.copyfile(src, out / name)
    shutil.copyfile(tokenizer, out / TOKENIZER)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "bertedge_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task, "labels": list(labels), "max_length": int(max_length), "model_type": model_type,
        **({"stride": stride} if stride else {}),  # QA: overlap of context windows
        **({"max_positions": max_positions} if max_positions else {}),  # the position table's limit
        "inputs": graph_inputs(out / names[0], engine), "engine": engine, "precision": precision, "quantization": quantization,
        "provenance": provenance or {},
        "files": {n: {"sha256": sha256_of(out / n), "bytes": (out / n).stat().st_size}
                  for n in (*names, TOKENIZER)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Bundle(root=out, manifest=manifest)


def graph_inputs(model: Path, engine: str = "onnxruntime") -> list[str]:
    """The graph's input names, read through its engine (the `onnx` package is build-only)."""
    from bertedge.runtime.sessions import make_session

    session = make_session(model, optimize=False, fix="run `bertedge export` again", engine=engine)
    return [i.name for i in session.get_inputs()]


def archive_path(out: Path, fmt: ArchiveFormat) -> Path:
    """`out` with the archive suffix added when it does not already carry it.

    >>> archive_path(Path("b"), ArchiveFormat.ZIP), archive_path(Path("b.tar.gz"), ArchiveFormat.TAR_GZ)
    (PosixPath('b.zip'), PosixPath('b.tar.gz'))
    """
    return out if archive_format_of(out) == fmt else out.with_name(f"{out.name}.{fmt.value}")


def archive_bundle(folder: Path, dest: Path, fmt: ArchiveFormat) -> Path:
    """Pack a bundle folder's files, flat, into one .tar.gz or .zip file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    names = [MANIFEST, *read_json(folder / MANIFEST)["files"]]
    if fmt is ArchiveFormat.TAR_GZ:
        with tarfile.open(dest, "w:gz") as tar:
            for n in names:
                tar.add(folder / n, arcname=n)
    else:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for n in names:
                zf.write(folder / n, arcname=n)
    return dest


# ----------------------------------------------------------------------------- opening


@contextlib.contextmanager
def open_bundle(path: str | Path, expect_digest: str | None = None) -> Iterator[Bundle]:
    """Verify a bundle folder or archive and yield it; an archive lives in a temp dir meanwhile.

    Load what you need (session, tokenizer) inside the `with` block: an extracted archive is
    deleted when it ends.

    Args:
        path: bundle folder or .tar.gz / .zip archive.
        expect_digest: the digest `bertedge package` printed (see `manifest_digest`); any other
            bundle, a tampered manifest included, is refused before anything else is read.

    Raises:
        BertedgeError: missing bundle, digest mismatch, bad manifest, an archive over the size or
            member caps, or a file that is missing, truncated or corrupt.
    """
    path = Path(path)
    pinned = normalize_digest(expect_digest) if expect_digest is not None else None
    fmt = archive_format_of(path) if path.is_file() else None
    if path.is_dir():
        yield verify_bundle(path, pinned)
    elif fmt is not None:
        with tempfile.TemporaryDirectory(prefix="bertedge-bundle-") as tmp:
            yield verify_bundle(extract_archive(path, fmt, Path(tmp)), pinned)
    elif path.exists():
        raise BertedgeError(f"'{path}' is neither a bundle folder nor a .tar.gz / .zip bundle",
                            "point at the --out of `bertedge package`")
    else:
        raise BertedgeError(f"bundle '{path}' does not exist",
                            "build one with `bertedge package EXPORT_DIR --out BUNDLE`")


def normalize_digest(digest: str) -> str:
    """A pinned digest as 64 lower-case hex digits ("sha256:" prefix allowed).

    >>> normalize_digest("sha256:" + "AB" * 32) == "ab" * 32
    True
    """
    value = str(digest).strip().lower().removeprefix("sha256:")
    if len(value) != 64 or not set(value) <= SHA256_HEX:
        raise BertedgeError(f"--expect-digest '{digest}' is not a SHA-256 digest (64 hex digits)",
                            "copy the digest `bertedge package` printed")
    return value


def extract_archive(archive: Path, fmt: ArchiveFormat, dest: Path) -> Path:
    """Extract a bundle archive's plain files into dest; the bundle root (dest or its one subfolder).

    At most MAX_ARCHIVE_MEMBERS members and MAX_ARCHIVE_BYTES bytes, checked against the
    archive's index before anything is written and again while writing.
    """
    try:
        if fmt is ArchiveFormat.TAR_GZ:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                check_archive_index(archive, [(m.name, m.size) for m in members])
                budget = [MAX_ARCHIVE_BYTES]
                for member in members:
                    if member.isfile():
                        source = tar.extractfile(member)
                        assert source is not None  # isfile() members always have data
                        write_member(dest, member.name, source, budget, archive)
        else:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                check_archive_index(archive, [(i.filename, i.file_size) for i in infos])
                budget = [MAX_ARCHIVE_BYTES]
                for info in infos:
                    if not info.is_dir():
                        with zf.open(info) as source:
                            write_member(dest, info.filename, source, budget, archive)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as e:  # zipfile: NotImplemented compression, encrypted
        raise BertedgeError(f"bundle archive '{archive}' is truncated or corrupt ({e})", REBUILD) from None
    subdirs = [d for d in dest.iterdir() if d.is_dir()]
    if not (dest / MANIFEST).is_file() and len(subdirs) == 1:
        return subdirs[0]  # an archive of the folder itself, e.g. `tar czf b.tar.gz bundle/`
    return dest


def check_archive_index(archive: Path, entries: list[tuple[str, int]]) -> None:
    """Refuse an archive whose index declares too many members or too many bytes."""
    total = sum(max(size, 0) for _, size in entries)
    if len(entries) > MAX_ARCHIVE_MEMBERS or total > MAX_ARCHIVE_BYTES:
        raise BertedgeError(
            f"bundle archive '{archive}' holds {len(entries)} members and {total} bytes; a bundle "
            f"has at most {MAX_ARCHIVE_MEMBERS} members and {MAX_ARCHIVE_BYTES} bytes",
            "only use archives made by `bertedge package`")


def write_member(dest: Path, name: str, source: IO[bytes], budget: list[int], archive: Path) -> None:
    """Stream one archive member to disk within the byte budget; unsafe names are refused."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or len(parts) > 2 or "\0" in name:
        raise BertedgeError(f"bundle archive member '{name}' has an unsafe path",
                            "only use archives made by `bertedge package`")
    target = dest.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        for block in iter(lambda: source.read(1 << 20), b""):
            budget[0] -= len(block)
            if budget[0] < 0:  # the index lied about sizes
                raise BertedgeError(f"bundle archive '{archive}' expands past {MAX_ARCHIVE_BYTES} bytes",
                                    "only use archives made by `bertedge package`")
            f.write(block)


def verify_bundle(root: Path, expect_digest: str | None = None) -> Bundle:
    """Check the digest (when pinned), the manifest schema, every file's size and SHA-256, and
    that the graph fits the manifest (outputs of the task, one logit per label); one error each."""
    manifest = read_manifest(root, expect_digest)
    problems = []
    for name, expected in manifest["files"].items():
        problem = check_file(root, name, expected)
        if problem:
            problems.append(problem)
    if problems:
        raise BertedgeError(f"bundle '{root}': {'; '.join(problems)}", REBUILD)
    model = model_files(manifest.get("engine"))[0]
    problems = graph_problems(manifest, root / model)
    if problems:
        raise BertedgeError(f"bundle '{root}': the manifest does not fit {model}: {'; '.join(problems)}",
                            REBUILD)
    return Bundle(root=root, manifest=manifest)


def read_manifest(root: Path, expect_digest: str | None = None) -> dict[str, Any]:
    """manifest.json, pinned to a digest when given, with its schema checked field by field."""
    if not (root / MANIFEST).is_file():
        raise BertedgeError(f"'{root}' is not a bertedge bundle (no {MANIFEST})",
                            "build one with `bertedge package EXPORT_DIR --out BUNDLE`")
    manifest = read_json(root / MANIFEST)
    if expect_digest is not None:
        actual = manifest_digest(manifest)
        if actual != normalize_digest(expect_digest):
            raise BertedgeError(f"bundle '{root}' has digest {actual}, not the expected "
                                f"{normalize_digest(expect_digest)}: it is another or a modified bundle",
                                "use the bundle that digest was printed for, or pin the new digest")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise BertedgeError(f"bundle format {version} is newer than this bertedge "
                            f"({__version__}, format {FORMAT_VERSION})", "upgrade: pip install -U bertedge")
    problems = manifest_problems(manifest)
    if problems:
        raise BertedgeError(f"'{root / MANIFEST}' is not a valid bertedge manifest: {'; '.join(problems)}",
                            REBUILD)
    return manifest


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def manifest_problems(m: dict[str, Any]) -> list[str]:
    """Every way a manifest breaks the schema (required keys, types, ranges, safe file names).

    >>> manifest_problems({"format": "bertedge-bundle"})[:2]
    ['missing format_version', 'missing task']
    """
    problems = [f"missing {k}" for k in REQUIRED_KEYS if k not in m]
    if "format" in m and m["format"] != FORMAT:
        problems.append(f"format is {m['format']!r}, not {FORMAT!r}")
    if "format_version" in m and not (is_int(m["format_version"]) and m["format_version"] >= 1):
        problems.append(f"format_version must be a positive integer (got {m['format_version']!r})")
    if "task" in m:
        problems += task_problems(m["task"])
    if "labels" in m:
        problems += labels_problems(m["labels"])
    problems += length_problems(m)
    if "model_type" in m and not isinstance(m["model_type"], str):
        problems.append(f"model_type must be a string (got {m['model_type']!r})")
    if "inputs" in m and not (isinstance(m["inputs"], list) and all(isinstance(i, str) for i in m["inputs"])):
        problems.append(f"inputs must be a list of graph input names (got {m['inputs']!r})")
    from bertedge.runtime.sessions import ENGINES

    if "engine" in m and m["engine"] not in ENGINES:  # absent: onnxruntime (bundles before engines)
        problems.append(f"engine {m['engine']!r} is not one this bertedge runs ({', '.join(ENGINES)}); "
                        "a newer bertedge may")
    for key in ("provenance", "quantization"):  # informational, but read at load (ISA warning, describe)
        if m.get(key) is not None and not isinstance(m[key], dict):
            problems.append(f"{key} must be an object or null (got {type(m[key]).__name__})")
    if "files" in m:
        problems += files_problems(m["files"], model_files(m.get("engine")))
    return problems


def task_problems(task: Any) -> list[str]:
    from bertedge.runtime.tasks import TASKS

    if isinstance(task, str) and task in TASKS:
        return []
    return [f"unknown task {task!r} (this bertedge knows {', '.join(sorted(TASKS))})"]


def labels_problems(labels: Any) -> list[str]:
    if not isinstance(labels, list) or not labels:
        return [f"labels must be a non-empty list of strings (got {labels!r})"]
    if not all(isinstance(x, str) for x in labels):
        return [f"labels must all be strings (got {labels!r})"]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    return [f"labels repeat {', '.join(map(repr, repeated))}"] if repeated else []


def length_problems(m: dict[str, Any]) -> list[str]:
    """max_length within 1..max_positions; max_positions and stride positive integers if present."""
    problems = []
    positions = m.get("max_positions")
    if positions is not None and not (is_int(positions) and positions >= 1):
        problems.append(f"max_positions must be a positive integer (got {positions!r})")
        positions = None
    if "max_length" in m:
        length = m["max_length"]
        if not is_int(length):
            problems.append(f"max_length must be an integer (got {length!r})")
        elif length < 1 or (positions is not None and length > positions):
            limit = f"1..{positions}" if positions else "1 or more"
            problems.append(f"max_length {length} is outside {limit}"
                            + (f" (the model has {positions} positions)" if positions else ""))
    stride = m.get("stride")
    if stride is not None and not (is_int(stride) and stride >= 1):
        problems.append(f"stride must be a positive integer or absent (got {stride!r})")
    return problems


def files_problems(files: Any, model: tuple[str, ...] = (MODEL,)) -> list[str]:
    """files: {name: {"sha256", "bytes"}}, names plain and inside the bundle, the engine's model
    files and the tokenizer listed."""
    if not isinstance(files, dict):
        return [f"files must be an object of name -> {{sha256, bytes}} (got {type(files).__name__})"]
    problems = [f"no checksum for {n}" for n in (*model, TOKENIZER) if n not in files]
    for name, entry in files.items():
        if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
                or Path(name).is_absolute()):
            problems.append(f"file name {name!r} is not a plain name inside the bundle")
            continue
        if not isinstance(entry, dict):
            problems.append(f"files[{name!r}] must be an object with sha256 and bytes")
            continue
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= SHA256_HEX):
            problems.append(f"files[{name!r}].sha256 is not a SHA-256 hex digest")
        if "bytes" in entry and not (is_int(entry["bytes"]) and entry["bytes"] >= 0):
            problems.append(f"files[{name!r}].bytes must be a non-negative integer")
    return problems


def graph_problems(manifest: dict[str, Any], model: Path) -> list[str]:
    """What the ONNX graph contradicts in the manifest: the task's outputs, one logit per label.

    The label dimension is checked when the graph states it (a static last axis of `logits`).
    """
    shapes = graph_output_shapes(model)
    task = get_task(manifest["task"])
    wanted = tuple(getattr(task, "output_names", ()))
    absent = [n for n in wanted if n not in shapes]
    if absent:
        return [f"task {task.name!r} needs graph output(s) {', '.join(absent)} but the graph has "
                f"{', '.join(shapes)}"]
    problems = []
    if "logits" in wanted and shapes["logits"]:
        width = shapes["logits"][-1]
        if is_int(width) and width != len(manifest["labels"]):
            problems.append(f"{len(manifest['labels'])} labels but the model outputs {width} logits")
    return problems


Dim = int | str | None  # a static size, a symbolic name, or unknown


def graph_output_shapes(model: Path) -> dict[str, list[Dim]]:
    """The graph outputs' names and shapes, read from the ONNX protobuf without building a session.

    A session costs a third of a bundle's load time (MiniLM INT8); this reads only the field
    headers of ModelProto.graph (initializers are skipped by length). Anything it cannot parse
    falls back to onnxruntime, which then reports a broken file in its own words. An OpenVINO IR
    (`.xml`) is read by OpenVINO without compiling it.
    """
    if model.suffix == ".xml":
        return ir_output_shapes(model)
    try:
        with model.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages in only what is read
        try:
            graph = next(value for number, value in proto_fields(memoryview(mapped)) if number == 7)
            shapes = dict(value_info(v) for number, v in proto_fields(graph) if number == 12)  # type: ignore[arg-type]
            del graph
            return shapes
        finally:
            with contextlib.suppress(BufferError):  # a view still alive: the GC closes it later
                mapped.close()
    except (StopIteration, ValueError, IndexError, TypeError, UnicodeDecodeError, OSError):
        from bertedge.runtime.sessions import make_session

        session = make_session(model, threads=1, optimize=False, fix=REBUILD)
        return {o.name: list(o.shape) for o in session.get_outputs()}


def ir_output_shapes(model: Path) -> dict[str, list[Dim]]:
    """An OpenVINO IR's outputs and shapes (dynamic axes as None), read without compiling."""
    try:
        import openvino as ov
    except ImportError:
        raise BertedgeError(f"'{model.name}' is an OpenVINO model, and OpenVINO is not installed",
                            "pip install 'bertedge[openvino]'") from None
    try:
        graph = ov.Core().read_model(str(model))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BertedgeError(f"OpenVINO cannot read '{model.name}' ({first})", REBUILD) from None
    return {o.get_any_name(): [d.get_length() if d.is_static else None for d in o.get_partial_shape()]
            for o in graph.outputs}


def proto_fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of one protobuf message: varints as int, the rest as bytes.

    >>> [(n, bytes(v) if isinstance(v, memoryview) else v) for n, v in proto_fields(memoryview(b"\\x08\\x96\\x01\\x12\\x02hi"))]
    [(1, 150), (2, b'hi')]
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos: pos + size], pos + size
        elif wire == 2:
            size, pos = varint(buf, pos)
            value, pos = buf[pos: pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by ONNX")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """A base-128 varint at pos: (value, position after it)."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("malformed varint")


def value_info(message: memoryview) -> tuple[str, list[Dim]]:
    """ValueInfoProto -> (name, dims): type(2).tensor_type(1).shape(2).dim(1).{dim_value(1) | dim_param(2)}."""
    name, dims = "", []
    for number, value in proto_fields(message):
        if number == 1:
            name = bytes(value).decode("utf-8")  # type: ignore[arg-type]
        elif number == 2:
            for tensor in submessages(value, 1):
                for shape in submessages(tensor, 2):
                    for dim in submessages(shape, 1):
                        dims.append(dimension(dim))
    return name, dims


def submessages(message: int | memoryview, wanted: int) -> Iterator[memoryview]:
    if not isinstance(message, memoryview):
        raise ValueError("expected a sub-message")
    for number, value in proto_fields(message):
        if number == wanted and isinstance(value, memoryview):
            yield value


def dimension(message: memoryview) -> Dim:
    for number, value in proto_fields(message):
        if number == 1 and isinstance(value, int):
            return value if value < 1 << 63 else None  # a negative (unknown) size
        if number == 2 and isinstance(value, memoryview):
            return bytes(value).decode("utf-8")
    return None


def check_file(root: Path, name: str, expected: dict[str, Any]) -> str | None:
    """What is wrong with one bundle file (missing / truncated / corrupt), or None."""
    path = root / name
    if not path.is_file():
        return f"file '{name}' is missing"
    size = path.stat().st_size
    if "bytes" in expected and size != int(expected["bytes"]):
        state = "truncated" if size < int(expected["bytes"]) else "the wrong size"
        return f"file '{name}' is {state} ({size} bytes, manifest says {expected['bytes']})"
    actual = sha256_of(path)
    if actual != expected.get("sha256"):
        return (f"file '{name}' is corrupt (SHA-256 {actual[:12]}..., "
                f"manifest says {str(expected.get('sha256'))[:12]}...)")
    return None


VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """This CPU's model name and ISA flags from /proc/cpuinfo ('unknown' and none where there is
    no such file, e.g. macOS). The one reader: export, bench and the ISA warning all call it."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown", set()
    fields = [(k.strip(), v) for k, _, v in (ln.partition(":") for ln in text.splitlines())]
    model = next((v.strip() for k, v in fields if k == "model name"), "unknown")
    return model, set(next((v for k, v in fields if k == "flags"), "").split())


def cpu_flags() -> set[str]:
    """This CPU's ISA flags (empty where /proc/cpuinfo is missing)."""
    return cpu_model_and_flags()[1]


def isa_warning(manifest: dict[str, Any], flags: set[str] | None = None) -> str | None:
    """Why this INT8 bundle may answer differently here than where export validated it, if it may.

    INT8 validated with VNNI (32-bit accumulation) but run without it (AVX2's 16-bit u8 x s8
    intermediate saturates) flips more labels than export measured.
    """
    provenance = manifest.get("provenance")
    artifact = provenance.get("artifact") if isinstance(provenance, dict) else None
    validated = artifact.get("validated_on") if isinstance(artifact, dict) else None
    if manifest.get("precision") != "int8" or not isinstance(validated, dict) \
            or not any(validated.get(f) for f in VNNI_FLAGS):
        return None
    here = cpu_flags() if flags is None else flags
    if not here or here & set(VNNI_FLAGS):
        return None
    return (f"this INT8 bundle was validated on a CPU with VNNI ({validated.get('model', 'unknown')}); this CPU has "
            "none, so expect more answers to differ from fp32 than export measured "
            "(re-export here, or package the fused fp32 artifact)")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a BertedgeError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BertedgeError(f"'{path}' is not valid JSON ({e})", REBUILD) from None
    except RecursionError:
        raise BertedgeError(f"'{path}' nests JSON too deeply", REBUILD) from None
    if not isinstance(data, dict):
        raise BertedgeError(f"'{path}' does not hold a JSON object", REBUILD)
    return data
