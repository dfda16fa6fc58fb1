"""Each artifact's footprint: size on disk, and the cold start and peak RSS of a fresh process
that loads it as `bertedge predict` does.

The export folder is not a bundle, so each artifact is first packaged as `bertedge package`
would package it (`bertedge.runtime.bundle`: the same files, checksums, manifest and checks)
into a temporary folder; a fresh Python process then opens that bundle with `Predictor` and
answers the task's example item once (bench's cold-start child,
`bertedge.toolchain.bench.coldstart`, which reads its own peak RSS). A cascade's bundle holds
every stage, opened together. Cold start counts from the process spawn to the first answer,
the interpreter and the child's imports included. About a second per artifact: `--no-footprint`
(or BERTEDGE_FOOTPRINT=0, as the test suite sets) leaves the fields empty.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bertedge.runtime.artifacts import artifact_kind
from bertedge.runtime.bundle import TOKENIZER, artifact_payload, build_bundle, bundle_fields
from bertedge.runtime.meta import ModelMeta
from bertedge.toolchain.bench.coldstart import measure_cold_start, predictor_spec
from bertedge.toolchain.export.args import ExportArgs
from bertedge.toolchain.export.report import ExportReport


def measure_footprints(args: ExportArgs, report: ExportReport, out: Path, info: ModelMeta) -> None:
    """With `args.footprint`, fill `cold_start_s` and `peak_rss_mb` of every CPU artifact left in
    the export folder `out` (checksums recorded); one that cannot be measured is a warning."""
    if not args.footprint:
        return
    saved = report.to_dict()  # package reads the report as JSON
    for artifact, record in zip(report.artifacts, saved["artifacts"], strict=True):
        if not artifact.file or not artifact_kind(artifact.name).cpu_candidate:
            continue
        try:
            artifact.cold_start_s, artifact.peak_rss_mb = footprint(out, saved, record, info, args.threads)
        except Exception as e:  # the artifact was gated already: a failed measure is not a failed export
            why = str(e).strip().splitlines()[:1] or ["no message"]
            report.warnings.append(f"{artifact.name}: footprint not measured ({type(e).__name__}: {why[0][:200]})")


def footprint(export_dir: Path, report: dict[str, Any], record: dict[str, Any], info: ModelMeta,
              threads: int = 0) -> tuple[float, float]:
    """(seconds from a fresh process's spawn to its first answer, that process's peak RSS in MB)
    for the export-report `record`, packaged into a temporary bundle."""
    with tempfile.TemporaryDirectory(prefix="bertedge-footprint-") as tmp:
        sources, engine, cascade = artifact_payload(export_dir, report, record)
        bundle = build_bundle(Path(tmp) / "bundle", sources, export_dir / TOKENIZER,
                              **bundle_fields(info, record, engine, cascade))
        text, pair = info.task.example_item
        sample = measure_cold_start(predictor_spec(bundle.root, text if pair is None else [text, pair], threads),
                                    runs=1)
    return round(sample.seconds, 3), round(sample.peak_rss_mb, 1)
