"""The packaged bundle: everything `predict` needs in one folder (or one .tar.gz / .zip).

A bundle holds the model (`model.onnx`, OpenVINO's `model.xml` + `model.bin`, or a cascade's
stages: `stage1.*`, `stage2.*`, ... named in the manifest's `cascade` field, see `stages`),
`tokenizer.json` and `manifest.json`: task, labels, max length, model type, graph inputs,
quantization, provenance (the artifact's validation figures), the bertedge version, and the
size and SHA-256 of every file. Opening a bundle verifies all of it, and checks the manifest
against the graph and the tokenizer, so a truncated copy, a flipped bit or a mismatched file
fails loudly at load in one line.

The seams: `manifest` (the typed record and its checks), `graphinfo` (what the graph says about
itself, read from the protobuf), `archive` (packing and safe extraction); this module builds
and opens bundles, and re-exports the names callers import from it.

This module sits on the runtime side of the dependency wall: stdlib, onnxruntime and
bertedge's numpy-only modules. It never imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertedge import __version__
from bertedge.errors import BertedgeError
from bertedge.runtime.archive import (
    MAX_MANIFEST_BYTES,
    ArchiveFormat,
    archive_bundle,
    archive_format_of,
    archive_path,
    extract_archive,
    is_bundle_archive,
)
from bertedge.runtime.artifacts import CASCADE, ENGINES, ONNXRUNTIME
from bertedge.runtime.cascade import CascadeSpec
from bertedge.runtime.graphinfo import graph_facts, graph_output_shapes, metadata_entry  # noqa: F401
from bertedge.runtime.manifest import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    LABELS_KEY,
    MANIFEST,
    REBUILD,
    SHA256_HEX,
    TOKENIZER,
    Manifest,
    check_file,
    check_fit,
    is_int,
    listing,
    load_tokenizer_file,
    manifest_digest,
    manifest_problems,
    parse_manifest,
    plain_name,
    sha256_of,
)
from bertedge.runtime.meta import ModelMeta, read_model_meta
from bertedge.runtime.outputs import atomic_output
from bertedge.runtime.stages import bundle_spec, read_export_spec

MODEL = "model.onnx"
OV_MODEL, OV_WEIGHTS = "model.xml", "model.bin"  # an OpenVINO IR: the graph and its weights
EXPORT_FACTS = ("model_dir", "opset", "onnxruntime_version", "gate", "validation_inputs", "cpu",
                "warnings")  # export-report.json facts kept as provenance
EXPORT_AGAIN = "run `bertedge export MODEL_DIR --out EXPORT_DIR` again"


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
    """A bundle folder (or, fresh from `package`, its archive file), its manifest and, once
    verified, its loaded tokenizer (a `tokenizers.Tokenizer`: load it once, reuse it)."""

    root: Path
    manifest: Manifest
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_files[0]

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
    return ENGINES[engine if engine in ENGINES else ONNXRUNTIME].bundle_files


# ----------------------------------------------------------------------------- building


def package(args: PackageArgs) -> Bundle:
    """Build a bundle from an export folder: the chosen artifact, the tokenizer and a manifest.

    Nothing is written until every check passed (export folder, artifact checksums, tokenizer,
    --out); the bundle is built under a hidden path beside its destination, locked against a
    concurrent `package` into the same --out, and moved into place (see `atomic_output`), so a
    failure, SIGTERM or a full disk leaves no half bundle.

    Returns:
        The bundle (`root`: its folder, or the archive file when an archive was asked for).

    Raises:
        BertedgeError: every problem with the export folder or the artifact choice, at once; an
            existing bundle at --out without `overwrite`; an --out that cannot be written.
    """
    report, meta = read_export(args.export_dir)
    record = choose_artifact(report, args.artifact, args.force)
    sources, engine, cascade = artifact_payload(args.export_dir, report, record)
    tokenizer = load_tokenizer_file(args.export_dir / TOKENIZER, EXPORT_AGAIN)
    dest = args.out if args.archive is None else archive_path(args.out, args.archive)
    check_destination(dest, archive=args.archive is not None, overwrite=args.overwrite)
    provenance = {
        "export_dir": str(args.export_dir.resolve()),
        "recommended": report.get("recommended"),
        "artifact": record,
        "forced": bool(args.force and not record.get("passed")),
        "export": {k: report[k] for k in EXPORT_FACTS if k in report},
    }
    fields = {**bundle_fields(meta, record, engine, cascade), "provenance": provenance, "tokenizer_object": tokenizer}
    with atomic_output(dest, folder=args.archive is None, what="the bundle") as target:
        check_destination(dest, archive=args.archive is not None, overwrite=args.overwrite)  # under the lock
        if args.archive is None:
            built = build_bundle(target, sources, args.export_dir / TOKENIZER, **fields)
        else:
            built = build_bundle(target.parent / "folder", sources, args.export_dir / TOKENIZER, **fields)
            archive_bundle(built.root, target, args.archive)
    return Bundle(root=dest, manifest=built.manifest)


def artifact_payload(export_dir: Path, report: dict[str, Any],
                     record: dict[str, Any]) -> tuple[list[Path], str, CascadeSpec | None]:
    """What `package` ships for the export-report `record`, every file checked against the SHA-256
    export recorded: (its files, graph first or a cascade's stages in order; the bundle's engine,
    a cascade's first stage's; a cascade's spec with its files named as the bundle holds them)."""
    engine = str(record.get("engine") or ONNXRUNTIME)
    check_artifact_files(export_dir, report, record, engine, stacklevel=4)
    if engine != CASCADE:
        return artifact_sources(export_dir, record, engine), engine, None
    spec, stages = read_export_spec(export_dir, report, record)  # other artifacts of the export: each checked
    for stage in stages:
        check_artifact_files(export_dir, report, stage, str(stage.get("engine") or ONNXRUNTIME), stacklevel=4)
    return [export_dir / f for s in spec.stages for f in s.files], spec.stages[0].engine, bundle_spec(spec)


def bundle_fields(meta: ModelMeta, record: dict[str, Any], engine: str, cascade: CascadeSpec | None) -> dict[str, Any]:
    """`build_bundle`'s keywords for the export-report `record` (all but provenance and the tokenizer)."""
    return {"task": meta.task.name, "labels": list(meta.labels), "max_length": meta.max_length,
            "model_type": meta.model_type, "precision": record.get("precision"),
            "quantization": record.get("quantization"), "stride": meta.stride,
            "max_positions": meta.max_positions, "engine": engine, "artifact": record.get("name"),
            "cascade": cascade}


def check_destination(dest: Path, archive: bool, overwrite: bool) -> None:
    """Refuse an --out that exists, unless `overwrite` and it is a bundle (folder or archive)."""
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
    if dest.is_file():
        if not overwrite:
            raise BertedgeError(f"bundle archive '{dest}' already exists", fix)
        if not is_bundle_archive(dest):
            raise BertedgeError(f"'{dest}' exists and is not a bundle archive; refusing to overwrite it",
                                "choose another --out or remove that file")


def read_export(export_dir: Path) -> tuple[dict[str, Any], ModelMeta]:
    """(export-report.json, model metadata) of an export folder; every missing piece listed."""
    if not export_dir.is_dir():
        raise BertedgeError(f"export folder '{export_dir}' does not exist",
                            "run `bertedge export MODEL_DIR --out EXPORT_DIR` first")
    needed = ("export-report.json", "bertedge.json", "config.json", TOKENIZER)
    missing = [n for n in needed if not (export_dir / n).is_file()]
    if missing:
        raise BertedgeError(f"'{export_dir}' is not a complete export folder (missing {', '.join(missing)})",
                            EXPORT_AGAIN)
    report = read_json(export_dir / "export-report.json", EXPORT_AGAIN)
    artifacts = report.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("file"), str)
            for a in artifacts):
        raise BertedgeError(f"export folder '{export_dir}': export-report.json lists no artifacts "
                            "(each needs a name and a file)", EXPORT_AGAIN)
    return report, read_model_meta(export_dir)


def choose_artifact(report: dict[str, Any], name: str | None, force: bool) -> dict[str, Any]:
    """The export-report record to ship: by name (or file), default the recommended one."""
    artifacts: list[dict[str, Any]] = report["artifacts"]
    names = listing([a["name"] for a in artifacts], ", ")
    wanted = name or report.get("recommended")
    if not wanted:
        raise BertedgeError("export-report.json recommends no artifact", f"pick one with --artifact ({names})")
    record = next((a for a in artifacts if wanted in (a.get("name"), a.get("file"))), None)
    passing = [a["name"] for a in artifacts if a.get("passed")]
    if record is None:
        raise BertedgeError(f"no artifact named {str(wanted)[:80]!r} in the export",
                            f"use --artifact with one of: {names}")
    if not record.get("file"):
        raise BertedgeError(f"artifact '{record['name']}' left no file in the export ({str(record.get('notes'))[:200]})",
                            f"pick one with --artifact ({listing(passing, ', ') or 'none passed'})")
    if not record.get("passed") and not force:
        why = "failed validation" if record.get("validated") else "was not validated"
        raise BertedgeError(
            f"artifact '{record['name']}' {why} (label agreement {record.get('label_agreement')})",
            f"pick a passing one with --artifact ({listing(passing, ', ') or 'none passed'}) "
            "or ship it anyway with --force")
    return record


def artifact_sources(export_dir: Path, record: dict[str, Any], engine: str) -> list[Path]:
    """The artifact's files in the export folder, graph first (an IR's weights beside its graph)."""
    model = export_dir / str(record["file"])
    return [model] if len(model_files(engine)) == 1 else [model, model.with_suffix(".bin")]


def check_artifact_files(export_dir: Path, report: dict[str, Any], record: dict[str, Any], engine: str,
                         stacklevel: int = 3) -> None:
    """The artifact's files (and the metadata files beside them) exist and have the SHA-256 export
    recorded; an old report without checksums is a warning (at the caller's caller: `stacklevel`),
    and its files are trusted."""
    sources = artifact_sources(export_dir, record, engine)
    missing = [p.name for p in sources if not p.is_file()]
    if missing:
        raise BertedgeError(f"artifact '{record['name']}' file(s) {', '.join(missing)} missing from "
                            f"'{export_dir}'", EXPORT_AGAIN)
    recorded = record.get("sha256")
    if not isinstance(recorded, dict) or not recorded:
        warnings.warn(f"export-report.json records no SHA-256 for artifact '{record['name']}', so its "
                      "files are packaged unchecked (re-run `bertedge export` to record them)",
                      RuntimeWarning, stacklevel=stacklevel)
        recorded = {}
    else:
        unlisted = [p.name for p in sources if p.name not in recorded]
        if unlisted:
            raise BertedgeError(f"export-report.json lists no SHA-256 for {', '.join(unlisted)} of artifact "
                                f"'{record['name']}'", EXPORT_AGAIN)
    metadata = report.get("metadata_sha256")
    expected = {**(metadata if isinstance(metadata, dict) else {}), **recorded}
    wrong = [name for name, digest in expected.items()
             if plain_name(str(name)) and (export_dir / name).is_file() and sha256_of(export_dir / name) != digest]
    if wrong:
        raise BertedgeError(f"'{export_dir}': {listing(wrong, ', ')} changed since export (SHA-256 differs "
                            "from export-report.json)", EXPORT_AGAIN)


def build_bundle(out: Path, model: Path | list[Path], tokenizer: Path, *, task: str, labels: list[str],
                 max_length: int, model_type: str, precision: str | None = None,
                 quantization: dict[str, Any] | None = None,
                 provenance: dict[str, Any] | None = None, stride: int | None = None,
                 max_positions: int | None = None, engine: str = ONNXRUNTIME,
                 artifact: str | None = None, tokenizer_object: Any = None,
                 cascade: CascadeSpec | None = None) -> Bundle:
    """Write a bundle folder from a model file (or a cascade's stage files, in `cascade`'s order)
    and a tokenizer (export can call this directly), then check it as a load would: its manifest,
    and the manifest against each graph and the tokenizer.

    An existing bundle at `out` is replaced; any other non-empty folder is refused.
    """
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BertedgeError(f"'{out}' exists and is not a bundle; refusing to overwrite it",
                            "choose another --out or empty that folder")
    out.mkdir(parents=True, exist_ok=True)
    stages = cascade.stages if cascade is not None else ()
    names = tuple(f for s in stages for f in s.files) or model_files(engine)
    for name in (MODEL, OV_MODEL, OV_WEIGHTS, TOKENIZER, MANIFEST, *names):
        (out / name).unlink(missing_ok=True)
    sources = model if isinstance(model, list) else [model, model.with_suffix(".bin")][:len(names)]  # IR: weights beside the graph
    for src, name in zip(sources, names, strict=True):
        shutil.copyfile(src, out / name)
    shutil.copyfile(tokenizer, out / TOKENIZER)
    for graph, graph_engine in [(s.files[0], s.engine) for s in stages] or [(names[0], engine)]:
        if graph_engine == ONNXRUNTIME:
            carry_labels(out / graph, labels)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "bertedge_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task, "labels": list(labels), "max_length": int(max_length), "model_type": model_type,
        **({"stride": stride} if stride else {}),  # QA: overlap of context windows
        **({"max_positions": max_positions} if max_positions else {}),  # the position table's limit
        **({"artifact": artifact} if artifact else {}),  # the artifact kind shipped
        **({"cascade": cascade.to_dict()} if cascade is not None else {}),  # its stages, stage 1 first
        "inputs": graph_inputs(out / names[0], engine), "engine": engine, "precision": precision,
        "quantization": quantization, "provenance": provenance or {},
        "files": {n: {"sha256": sha256_of(out / n), "bytes": (out / n).stat().st_size}
                  for n in (*names, TOKENIZER)},
    }
    record = parse_manifest(manifest, "the manifest package wrote")
    loaded = check_fit(out, record, f"bundle built from '{sources[0].parent}'", tokenizer_object, EXPORT_AGAIN)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Bundle(root=out, manifest=record, tokenizer=loaded)


def carry_labels(model: Path, labels: list[str]) -> None:
    """Append the labels to an ONNX model's metadata_props (unless it carries them already), so
    the model file names its own logits: the graph and its weights are left as they were."""
    carried = graph_facts(model).metadata.get(LABELS_KEY)
    if carried is None:
        with model.open("ab") as f:
            f.write(metadata_entry(LABELS_KEY, json.dumps(list(labels))))


def graph_inputs(model: Path, engine: str = ONNXRUNTIME) -> list[str]:
    """The graph's input names, read through its engine (the `onnx` package is build-only)."""
    from bertedge.runtime.sessions import make_session

    session = make_session(model, optimize=False, fix="run `bertedge export` again", engine=engine)
    return [i.name for i in session.get_inputs()]


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
            member caps, a file that is missing, truncated or corrupt, or a manifest that does not
            fit the graph or the tokenizer.
    """
    path = Path(path)
    pinned = normalize_digest(expect_digest) if expect_digest is not None else None
    fmt = archive_format_of(path) if path.is_file() else None
    if path.is_dir():
        yield verify_bundle(path, pinned)
    elif fmt is not None:
        with tempfile.TemporaryDirectory(prefix="bertedge-bundle-") as tmp:
            root = extract_archive(path, fmt, Path(tmp))
            yield verify_bundle(root, pinned, where=f"bundle archive '{path}'")
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
        raise BertedgeError(f"--expect-digest {str(digest)[:80]!r} is not a SHA-256 digest (64 hex digits)",
                            "copy the digest `bertedge package` printed")
    return value


def verify_bundle(root: Path, expect_digest: str | None = None, where: str | None = None) -> Bundle:
    """Check the digest (when pinned), the manifest, every file's size and SHA-256, and that the
    manifest fits the graph and the tokenizer; each stage raises one error listing its problems.

    `where` is how errors name the bundle (an archive's name rather than its temp folder).
    """
    where = where or f"bundle '{root}'"
    manifest = read_manifest(root, expect_digest, where)
    problems = [p for n, entry in manifest.files.items() if (p := check_file(root, n, entry.sha256, entry.bytes))]
    if problems:
        raise BertedgeError(f"{where}: {listing(problems)}", REBUILD)
    return Bundle(root=root, manifest=manifest, tokenizer=check_fit(root, manifest, where))


def read_manifest(root: Path, expect_digest: str | None = None, where: str | None = None) -> Manifest:
    """manifest.json as a checked record, pinned to a digest when given."""
    where = where or f"bundle '{root}'"
    path = root / MANIFEST
    if not path.is_file():
        raise BertedgeError(f"{where} is not a bertedge bundle (no {MANIFEST})",
                            "build one with `bertedge package EXPORT_DIR --out BUNDLE`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BertedgeError(f"{where}: {MANIFEST} is {path.stat().st_size} bytes; a manifest is at most "
                            f"{MAX_MANIFEST_BYTES}", REBUILD)
    data = read_json(path, REBUILD, f"{where}: {MANIFEST}")
    if expect_digest is not None:
        actual = manifest_digest(data)
        if actual != normalize_digest(expect_digest):
            raise BertedgeError(f"{where} has digest {actual}, not the expected "
                                f"{normalize_digest(expect_digest)}: it is another or a modified bundle",
                                "use the bundle that digest was printed for, or pin the new digest")
    version = data.get("format_version")
    if is_int(version) and version > FORMAT_VERSION:
        raise BertedgeError(f"bundle format {version} is newer than this bertedge "
                            f"({__version__}, format {FORMAT_VERSION})", "upgrade: pip install -U bertedge")
    return parse_manifest(data, f"{where}: {MANIFEST}")


# ----------------------------------------------------------------------------- this CPU


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


def isa_warning(manifest: Manifest | dict[str, Any], flags: set[str] | None = None) -> str | None:
    """Why this INT8 bundle may answer differently here than where export validated it, if it may.

    INT8 validated with VNNI (32-bit accumulation) but run without it (AVX2's 16-bit u8 x s8
    intermediate saturates) flips more labels than export measured.
    """
    if isinstance(manifest, Manifest):
        manifest = manifest.raw
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


def read_json(path: Path, fix: str = REBUILD, shown_as: str | None = None) -> dict[str, Any]:
    """A JSON object from a file, or a BertedgeError naming the file (as `shown_as`) and the fix."""
    name = shown_as or f"'{path}'"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BertedgeError(f"{name} is not valid JSON ({str(e)[:200]})", fix) from None
    except RecursionError:
        raise BertedgeError(f"{name} nests JSON too deeply", fix) from None
    if not isinstance(data, dict):
        raise BertedgeError(f"{name} does not hold a JSON object", fix)
    return data
