"""`export(ExportArgs) -> ExportReport`: build every candidate kind, gate it, recommend, write the folder.

Every artifact is checked against PyTorch before the export folder appears, in the batches the
runtime builds (length-sorted groups of `batch_size`, padded to their longest): max |output
difference| on real and random inputs, agreement with PyTorch's answers, the task metric on
`--eval` data, and batch invariance (a text alone, among 31 others, padded). Lossy candidates
must meet the metric and agreement budgets and stay batch-invariant; every validated artifact is
timed at the target shapes and the fastest passer is recommended. The folder is built hidden
beside `--out` (`bertedge.runtime.outputs.atomic_output`) and moved into place only when
everything succeeded.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import artifact_kind
from bertedge.runtime.bundle import sha256_of
from bertedge.runtime.meta import ModelMeta, write_meta
from bertedge.runtime.outputs import atomic_output
from bertedge.toolchain.export import candidates
from bertedge.toolchain.export.args import ExportArgs, check_targets
from bertedge.toolchain.export.cascade import price_curves
from bertedge.toolchain.export.compare import Feeds
from bertedge.toolchain.export.draft import check_draft
from bertedge.toolchain.export.footprint import measure_footprints
from bertedge.toolchain.export.gate import (
    BuildContext,
    build_reference,
    cpu_info,
    recommend,
    retime,
)
from bertedge.toolchain.export.plot import write_tradeoff
from bertedge.toolchain.export.report import ExportReport
from bertedge.toolchain.export.source import (
    EvalSet,
    Source,
    load_agreement_texts,
    load_calibration,
    load_eval,
    load_source,
)

COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "bertedge.json")
REPORT_FILE = "export-report.json"


def export(args: ExportArgs) -> ExportReport:
    """Export, optimize, quantize and validate; write the folder only if every step succeeded.

    Raises:
        BertedgeError: bad model folder, data or options; fp32 parity failure; with
            `require_int8`, no INT8 candidate met the budget; an --out that cannot be written.
        Terminated: SIGTERM arrived (nothing is left behind).
    """
    start = time.perf_counter()
    check_out(args)
    with atomic_output(args.out, folder=True, what="the export") as tmp:
        source = load_source(args.model_dir)
        check_targets(args.targets, source.info)
        if args.draft is not None:  # a student that cannot start the cascade is refused before any work
            check_draft(args.draft, args.model_dir, source.info)
        eval_set, calibration = load_eval(args, source), load_calibration(args, source)
        report = build(args, source, eval_set, calibration, tmp, load_agreement_texts(args, source))
        report.seconds = round(time.perf_counter() - start, 3)
        write_tradeoff(report, tmp, args.min_agreement)  # a failed plot is a warning, never a failed export
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def check_out(args: ExportArgs) -> None:
    """Refuse an existing, non-empty --out unless --overwrite."""
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        raise BertedgeError(f"--out '{args.out}' already exists and is not empty",
                            "choose a new folder or pass --overwrite")


def build(args: ExportArgs, source: Source, eval_set: EvalSet | None, calibration: list[Feeds],
          out: Path, extra: Sequence[Feeds] = ()) -> ExportReport:
    """Build and gate every kind in `candidates.CANDIDATES` into `out`; the report says what passed."""
    import onnxruntime as ort

    ref, inputs_text = build_reference(args, source, eval_set, calibration, extra)
    report = ExportReport(
        model_dir=str(args.model_dir), task=source.info.task.name, labels=list(source.info.labels),
        opset=args.opset, input_names=source.input_names, output_names=list(source.info.task.output_names),
        cpu=cpu_info(), onnxruntime_version=ort.__version__, gate=ref.gate_text(),
        validation_inputs=inputs_text, targets=[f"{b}x{n}" for b, n in ref.shapes],
    )
    ctx = BuildContext(args, source, ref, out, calibration, report)
    for candidate in candidates.CANDIDATES:
        started = time.perf_counter()
        for artifact in candidate.build(ctx):
            artifact.seconds = round(time.perf_counter() - started, 3)
            report.artifacts.append(artifact)
    check_require_int8(args, report)
    drop_failed(report, out, ctx.tentative)
    copy_metadata(args.model_dir, source.info, out)
    retime(ref, out, report.artifacts, ctx.timers)
    price_curves(report.artifacts)  # the cascade's curve, priced with the stages' final timings
    report.recommended = recommend(report.artifacts)
    record_checksums(report, out)
    measure_footprints(args, report, out, source.info)  # each artifact packaged, loaded in a fresh process
    report.warnings += [f"{a.name}: {a.notes}" for a in report.artifacts if not a.passed]
    int8 = [a for a in report.artifacts if a.precision == "int8"]
    if int8 and not any(a.passed for a in int8):
        report.warnings.append(f"INT8 did not pass; recommended falls back to {report.recommended}")
    return report


def check_require_int8(args: ExportArgs, report: ExportReport) -> None:
    """With --require-int8, fail the export when no INT8 artifact passed."""
    int8 = [a for a in report.artifacts if a.precision == "int8"]
    if args.require_int8 and not any(a.passed for a in int8):
        summary = ", ".join(f"{t.candidate}: agreement {t.agreement}" for t in report.int8_search)
        raise BertedgeError(f"no INT8 candidate met the budget ({report.gate}); tried {summary}",
                            "loosen --max-accuracy-drop / --min-agreement, or drop --require-int8")


def drop_failed(report: ExportReport, out: Path, tentative: Collection[str] = ()) -> None:
    """Keep a failed non-lossy graph (a fused one off parity) out of the folder: nothing should
    package it by mistake; so too a failed artifact kept only while a cascade might start with it
    (`tentative`: no cascade did). Failed lossy artifacts stay, marked failed, for inspection."""
    for a in report.artifacts:
        if not a.passed and a.file and (not artifact_kind(a.name).lossy or a.name in tentative):
            for name in artifact_kind(a.name).files:
                (out / name).unlink(missing_ok=True)
            a.notes += "; files removed" if len(artifact_kind(a.name).files) > 1 else "; file removed"
            a.file = ""


def copy_metadata(model_dir: Path, info: ModelMeta, out: Path) -> None:
    """Make the export folder self-contained for `bertedge package`."""
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    if not (out / "bertedge.json").is_file():
        write_meta(out, info)


def record_checksums(report: ExportReport, out: Path) -> None:
    """SHA-256 of every artifact file (`ArtifactReport.sha256`) and of the metadata files beside
    them (`ExportReport.metadata_sha256`): `package` can tell a file swapped after export."""
    for a in report.artifacts:
        if a.file:
            a.sha256 = {name: sha256_of(out / name) for name in a.files() if (out / name).is_file()}
    report.metadata_sha256 = {name: sha256_of(out / name) for name in COPIED_FILES if (out / name).is_file()}
