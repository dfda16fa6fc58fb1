"""`--draft STUDENT_EXPORT_DIR`: a distilled student's artifact as a cascade's first stage.

A student with fewer layers (`bertedge distill`) exported on its own does less work per text than
any artifact of the teacher. With `--draft`, the teacher's cascade starts with the student's
fastest validated, batch-invariant artifact (a static INT8 kind when it has one, else its
recommended artifact), then the teacher's own stages. The student must read the teacher's
tokens: the same task, labels and tokenizer.json, and room for the teacher's max length. Its
files are checked against the student's export report and copied into the teacher's export
folder as `draft-<file>`; the cascade row checksums them, and agreement is measured against the
teacher's PyTorch outputs like every stage's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import ARTIFACT_KINDS, ENGINES, ONNXRUNTIME, artifact_kind
from bertedge.runtime.bundle import check_artifact_files, read_export, sha256_of
from bertedge.runtime.cascade import CascadeStage
from bertedge.runtime.meta import ModelMeta
from bertedge.toolchain.export.gate import BuildContext, size_mb

DRAFT_PREFIX = "draft-"


@dataclass(frozen=True)
class StagePlan:
    """A cascade stage before its delta is chosen."""

    name: str  # the export report's artifact, or "draft <kind>" for a student's
    stage: CascadeStage  # its files in the export folder, delta 0
    quantization: dict[str, Any] | None
    size_mb: float
    agreement: float | None = None  # with PyTorch, as its own export measured it (a draft: its student's)


def of_artifact(ctx: BuildContext, name: str) -> StagePlan:
    """The plan that runs the export's own artifact `name`."""
    a = ctx.report.artifact(name)
    assert a is not None
    kind = artifact_kind(name)
    return StagePlan(name, CascadeStage(name, kind.engine, kind.files, 0.0), a.quantization, size_mb(ctx.out, name),
                     a.label_agreement)


def check_draft(folder: Path, model_dir: Path, info: ModelMeta) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the student's export report, the artifact record to start with), checked before any work.

    Raises:
        BertedgeError: the folder is no export, reads other tokens, or has no usable artifact.
    """
    report, meta = read_export(folder)
    problems = []
    if meta.task.name != info.task.name or tuple(meta.labels) != tuple(info.labels):
        problems.append(f"its task and labels ({meta.task.name}: {', '.join(meta.labels)}) are not the teacher's")
    if sha256_of(folder / "tokenizer.json") != sha256_of(model_dir / "tokenizer.json"):
        problems.append("its tokenizer.json is not the teacher's")
    if meta.max_positions < info.max_length:
        problems.append(f"it holds {meta.max_positions} positions, fewer than the teacher's max length {info.max_length}")
    record = pick_draft(report)
    if record is None:
        problems.append("its export has no validated, batch-invariant artifact")
    if problems:
        raise BertedgeError(f"--draft '{folder}': {'; '.join(problems)}",
                            "pass the export folder of a student distilled from this model (`bertedge distill`)")
    assert record is not None
    check_artifact_files(folder, report, record, str(record.get("engine") or ONNXRUNTIME))
    return report, record


def copy_draft(ctx: BuildContext) -> StagePlan:
    """The student's stage, its files copied into the export folder (see the module docstring)."""
    folder = ctx.args.draft
    assert folder is not None
    _, record = check_draft(folder, ctx.args.model_dir, ctx.source.info)
    kind = artifact_kind(str(record["name"]))
    files = tuple(DRAFT_PREFIX + f for f in kind.files)
    for src, dst in zip(kind.files, files, strict=True):
        shutil.copyfile(folder / src, ctx.out / dst)
    size = round(sum((ctx.out / f).stat().st_size for f in files) / 1e6, 3)
    return StagePlan(f"draft {kind.name}", CascadeStage(kind.name, kind.engine, files, 0.0),
                     record.get("quantization"), size)


def pick_draft(report: dict[str, Any]) -> dict[str, Any] | None:
    """The student's fastest validated, batch-invariant static artifact, else its recommended one
    when batch-invariant; None when it has neither."""
    def invariant(a: dict[str, Any]) -> bool:
        inv = a.get("batch_invariance")
        return isinstance(inv, dict) and bool(inv.get("passed"))

    firsts = {k.name for k in ARTIFACT_KINDS.values() if k.first_stage}
    rows = [a for a in report["artifacts"] if a.get("name") in firsts and a.get("validated") and a.get("file")
            and invariant(a) and a.get("cost_ms") is not None]
    if rows:
        return min(rows, key=lambda a: float(a["cost_ms"]))
    chosen = next((a for a in report["artifacts"] if a.get("name") == report.get("recommended")), None)
    if chosen is None or not chosen.get("file") or chosen.get("name") not in ARTIFACT_KINDS:
        return None
    kind = ARTIFACT_KINDS[chosen["name"]]
    return chosen if kind.engine in ENGINES and (invariant(chosen) or not kind.lossy) else None
