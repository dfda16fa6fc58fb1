"""export-tradeoff.png and the cascade curve's cost: on a tiny export, on the demo's report, and
when matplotlib fails (the export stays whole, with a warning)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from rich.console import Console

from bertedge.toolchain.cascade import Calibration, CurvePoint, HalfFigures
from bertedge.toolchain.export import (
    ArtifactReport,
    ExportArgs,
    ExportReport,
    Optimization,
    Quantization,
    export,
    render,
)
from bertedge.toolchain.export.cascade import price_curves
from bertedge.toolchain.export.plot import TRADEOFF_FILE, plot_tradeoff
from bertedge.toolchain.export.report import CascadeReport

DEMO_REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "export-report-sst2-cascade.json"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_export_draws_the_tradeoff_and_prices_the_cascade_curve(cascade_export: tuple[Path, ExportReport]) -> None:
    out, report = cascade_export
    width, height = png_size(out / TRADEOFF_FILE)
    assert 1000 <= width <= 3000 and 600 <= height <= 2500 and (out / TRADEOFF_FILE).stat().st_size > 20_000
    row = report.artifact("cascade")
    assert row is not None and row.cascade is not None, report.warnings
    curve = sorted(row.cascade.calibration.curve, key=lambda p: p.escalated)
    assert all(set(p.cost_ms) == set(report.targets) == {"1x16", "4x32"} for p in curve)
    for shape in report.targets:
        costs = [p.cost_ms[shape] for p in curve]
        assert costs == sorted(costs), shape  # more escalated, never cheaper
        assert costs[0] == row.cascade.first_stage_ms[shape]  # nothing escalated: stage 1 alone
    saved = json.loads((out / "export-report.json").read_text())
    assert json.loads(json.dumps(ExportReport.from_dict(saved).to_dict())) == saved  # the file reads back whole
    cascade = next(a for a in saved["artifacts"] if a["name"] == "cascade")
    assert set(cascade["cascade"]["calibration"]["curve"][-1]["cost_ms"]) == {"1x16", "4x32"}
    assert not [w for w in report.warnings if TRADEOFF_FILE in w]


def test_a_plot_failure_leaves_the_export_whole_with_a_warning(tiny_bert: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("no backend here\nsecond line")

    monkeypatch.setattr(matplotlib, "use", broken)
    out = tmp_path / "export"
    report = export(ExportArgs(tiny_bert, out, optimization=Optimization.NONE, quantize=Quantization.NONE,
                               cascade=False, sensitivity=False, timing_seconds=0.02, timing_rounds=0, threads=1,
                               openvino="off"))
    assert report.recommended == "fp32" and (out / "model.onnx").is_file() and not (out / TRADEOFF_FILE).exists()
    want = f"{TRADEOFF_FILE} not written: RuntimeError: no backend here"
    assert want in report.warnings
    assert want in json.loads((out / "export-report.json").read_text())["warnings"]


def test_the_demo_report_reads_back_draws_and_its_tables_fit_80_columns(tmp_path: Path) -> None:
    report = ExportReport.from_dict(json.loads(DEMO_REPORT.read_text()))
    price_curves(report.artifacts)  # the saved demo predates the curve's cost
    width, _ = png_size(plot_tradeoff(report, tmp_path / TRADEOFF_FILE, 0.999))
    assert width >= 1000
    console = Console(width=80, record=True)
    for table in render(report):
        console.print(table)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    for a in report.artifacts:  # every artifact row whole on one line: no name or figure folded
        star = " *" if a.name == report.recommended else ""
        assert any(line.startswith(a.name + star + " ") and f"{a.label_agreement:.4f}" in line for line in lines), a.name


def calibration(delta: float, shares: list[float]) -> Calibration:
    half = HalfFigures(10, delta, 0.0, 1.0, 0, None, None, True)
    return Calibration(delta, True, tuple(CurvePoint(d, e, 1.0, 0, None) for d, e in zip([0.0, delta, 1.0], shares,
                                                                                         strict=True)), half, half)


def test_a_chains_curve_is_priced_with_its_later_stages_at_their_chosen_deltas() -> None:
    chain = ArtifactReport.of_kind("cascade")
    chain.cascade = CascadeReport([{"artifact": "draft int8-static"}, {"artifact": "int8-static"}, {"artifact": "fp32"}],
                                  10, calibration(0.4, [0.0, 0.5, 1.0]), [calibration(0.3, [0.0, 0.2, 1.0])],
                                  first_stage_ms={"1x8": 1.0, "4x8": 3.0})
    stages = [ArtifactReport.of_kind("int8-static"), ArtifactReport.of_kind("fp32")]
    stages[0].timings_ms, stages[1].timings_ms = {"1x8": 2.0, "4x8": 5.0}, {"1x8": 10.0}  # fp32 not timed at 4x8
    price_curves([*stages, chain])
    # stage 2 + 0.2 (its escalated share at its chosen delta 0.3) x stage 3 = 4 ms for what stage 1 escalates
    assert [p.cost_ms for p in chain.cascade.calibration.curve] == [{"1x8": 1.0}, {"1x8": 3.0}, {"1x8": 5.0}]
