"""Artifact kinds are data: a new kind is one row in ARTIFACT_KINDS plus one build function in
CANDIDATES, and export builds, gates, reports, recommends it and bench runs it with no other change."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bertedge.runtime import artifacts
from bertedge.runtime.artifacts import ONNXRUNTIME, ArtifactKind
from bertedge.toolchain.bench import BenchArgs, bench, known_backends
from bertedge.toolchain.export import (
    ArtifactReport,
    BuildContext,
    Candidate,
    ExportArgs,
    Optimization,
    Quantization,
    candidates,
    export,
    gate,
    recommend,
)

COPY = ArtifactKind("fp32-copy", ("model-copy.onnx",), ONNXRUNTIME, "fp32", lossy=False, cpu_candidate=True,
                    description="a byte copy of model.onnx (test kind)")


def build_copy(ctx: BuildContext) -> list[ArtifactReport]:
    shutil.copy(ctx.path("fp32"), ctx.path("fp32-copy"))
    return [ctx.validate("fp32-copy", notes="copied")]


@pytest.fixture
def copy_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The throw-away kind: one table row, one candidate."""
    monkeypatch.setitem(artifacts.ARTIFACT_KINDS, COPY.name, COPY)
    monkeypatch.setattr(candidates, "CANDIDATES", [*candidates.CANDIDATES, Candidate(COPY.name, build_copy)])


def test_a_new_kind_is_built_validated_reported_recommended_and_benched(
        copy_kind: None, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def later_is_faster(run: Any, feeds: dict[str, Any], seconds: float) -> float:
        calls.append(1)
        return 100.0 - len(calls)  # every timing is faster than the one before: the copy, built last, wins

    monkeypatch.setattr(gate, "time_run", later_is_faster)
    out = tmp_path / "export"
    report = export(ExportArgs(tiny_bert, out, quantize=Quantization.NONE, optimization=Optimization.NONE,
                               targets=((1, 8),), timing_rounds=0))
    assert [a.name for a in report.artifacts] == ["fp32", "fp32-copy"]
    copy = report.artifact("fp32-copy")
    assert copy is not None and copy.validated and copy.passed and copy.notes == "copied"
    assert copy.file == "model-copy.onnx" and copy.engine == ONNXRUNTIME and copy.precision == "fp32"
    fp32 = report.artifact("fp32")
    assert fp32 is not None and copy.max_abs_diff_real == fp32.max_abs_diff_real  # the same graph, the same gate
    assert copy.timings_ms == {"1x8": 98.0} and copy.size_mb == fp32.size_mb > 0
    assert report.recommended == "fp32-copy"
    saved = json.loads((out / "export-report.json").read_text())
    row = next(a for a in saved["artifacts"] if a["name"] == "fp32-copy")
    assert row["sha256"] == {"model-copy.onnx": hashlib.sha256((out / "model-copy.onnx").read_bytes()).hexdigest()}
    assert saved["recommended"] == "fp32-copy"

    assert "fp32-copy" in [b.name for b in known_backends()]
    rep = bench(BenchArgs(out, backends=("fp32-copy",), batch_sizes=(1,), seq_lens=(8,), runs=2, warmup=0,
                          threads=1, cold_start=False, plots=False))
    result = rep.backend("fp32-copy")
    assert result is not None and result.status == "ok" and result.file == str(out / "model-copy.onnx")
    default = bench(BenchArgs(out, batch_sizes=(1,), seq_lens=(8,), runs=2, warmup=0, threads=1,
                              cold_start=False, plots=False))
    assert "fp32-copy" in [b.name for b in default.backends]


def test_recommend_reads_the_table(copy_kind: None) -> None:
    """Fastest passing CPU candidate by cost (ties: built first); never a kind that is not a CPU candidate."""
    def row(name: str, cost: float | None, passed: bool = True) -> ArtifactReport:
        r = ArtifactReport.of_kind(name)
        r.passed, r.cost_ms = passed, cost
        return r

    assert recommend([row("fp32", 2.0), row("fp32-copy", 1.0)]) == "fp32-copy"
    assert recommend([row("fp32", 1.0), row("fp32-copy", 1.0)]) == "fp32"  # a tie keeps the first built
    assert recommend([row("fp32", 2.0), row("fp32-copy", 1.0, passed=False)]) == "fp32"
    assert recommend([row("fp32", 2.0), row("fp16", 0.5)]) == "fp32"  # fp16 is a GPU artifact
    assert recommend([row("fp32", None), row("fused", None), row("int8", None)]) == "int8"  # untimed: lossy first
    assert recommend([row("fp32", None), row("fused", None)]) == "fused"


def test_every_kind_has_a_candidate_and_every_cpu_kind_a_backend() -> None:
    kinds = list(artifacts.ARTIFACT_KINDS)
    assert [c.kind for c in candidates.CANDIDATES] == kinds
    cpu = [b.name for b in known_backends() if b.kind is not None and not b.gpu]
    assert cpu == [k for k in kinds if artifacts.ARTIFACT_KINDS[k].cpu_candidate]
