"""export-report.json as typed records, and its rendering as terminal tables.

`ExportReport.to_dict()` is the file: one row per artifact (`ArtifactReport`), one row per INT8
candidate of every ladder (`CandidateRow`, the onnxruntime and the OpenVINO ones alike), and the
sensitivity table (`bertedge.toolchain.quantize.NodeSensitivity`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from bertedge.runtime.artifacts import ONNXRUNTIME, artifact_kind
from bertedge.toolchain.cascade import Calibration
from bertedge.toolchain.quantize import NodeSensitivity


@dataclass
class Metric:
    """The task's headline metric on --eval, for an artifact and for PyTorch."""

    name: str  # "accuracy", "f1", ...
    value: float  # the artifact's, 0..1
    pytorch_value: float  # PyTorch's on the same rows
    drop_points: float  # (PyTorch - artifact) x 100: what --max-accuracy-drop budgets


@dataclass
class BatchInvariance:
    """The same text alone, in a batch of others, and padded: how far its answer moved."""

    texts: int  # texts probed
    batch: int  # size of the batch each was put in
    padded_to: int  # width each was padded to
    max_prob_diff: float  # worst |probability difference| against the text alone
    answers_changed: int
    passed: bool  # every difference within --invariance-tol and no answer changed


@dataclass
class CascadeReport:
    """How a cascade row was built: its stages, the delta calibration and its real-text timings."""

    stages: list[dict[str, Any]]  # cascade.json: artifact, engine, files (in the export folder), delta
    rows: int  # rows delta was calibrated on: --eval examples and --agreement-data rows
    calibration: Calibration  # stage 1's: the curve on all rows, the choosing and the confirming half
    later: list[Calibration] = field(default_factory=list)  # a chain's later steps, stage 2 first
    escalated: dict[str, float] = field(default_factory=dict)  # "BxS" -> share of the timed texts escalated
    first_stage_ms: dict[str, float] = field(default_factory=dict)  # "BxS" -> stage 1 alone, same texts, beside it
    draft: str | None = None  # the student's export folder stage 1 came from (--draft)
    draft_files: list[str] = field(default_factory=list)  # its files, copied into this export folder


@dataclass
class ArtifactReport:
    """One validated artifact, as written to export-report.json."""

    name: str  # a key of bertedge.runtime.artifacts.ARTIFACT_KINDS
    file: str  # its graph file in the export folder ("" once removed)
    precision: str
    optimization: str
    engine: str = ONNXRUNTIME  # what runs it: onnxruntime, or openvino (`bertedge[openvino]`)
    quantization: dict[str, object] | None = None  # the recipe (INT8 only)
    size_mb: float = 0.0
    cold_start_s: float | None = None  # fresh process spawn -> first answer, bundled as `package` would (footprint)
    peak_rss_mb: float | None = None  # that process's peak resident memory; None: --no-footprint or not on CPU
    max_abs_diff_real: float | None = None
    max_abs_diff_random: float | None = None
    label_agreement: float = 0.0
    answers_changed: int | None = None  # of answers_compared: rows, real tokens (NER) or spans (QA)
    answers_compared: int | None = None
    metric: Metric | None = None
    batch_invariance: BatchInvariance | None = None  # alone vs in a batch of 32 vs padded
    timings_ms: dict[str, float] = field(default_factory=dict)  # "BxS" -> p50 ms at each target shape
    cost_ms: float | None = None  # geometric mean of timings_ms: what "fastest" compares
    validated_on: dict[str, object] = field(default_factory=dict)  # CPU and ISA flags of this check
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 of every file of the artifact
    cascade: CascadeReport | None = None  # a cascade's stages, delta curve and timings
    passed: bool = False
    validated: bool = False
    notes: str = ""
    seconds: float = 0.0

    def files(self) -> tuple[str, ...]:
        """Its files in the export folder: its kind's, and a cascade's copied draft stage."""
        return artifact_kind(self.name).files + tuple(self.cascade.draft_files if self.cascade else ())

    @classmethod
    def of_kind(cls, name: str, optimization: str = "none") -> ArtifactReport:
        """An empty row for the artifact kind `name`: file, precision and engine from the table."""
        kind = artifact_kind(name)
        return cls(name=name, file=kind.graph, precision=kind.precision, optimization=optimization,
                   engine=kind.engine)


@dataclass
class CandidateRow:
    """One recipe an INT8 ladder tried (onnxruntime or OpenVINO): the agreement / speed curve."""

    candidate: str  # the recipe's label
    recipe: dict[str, object]  # the recipe's fields (flattened into the row in the JSON)
    agreement: float | None = None  # None: it could not be built or run
    answers_changed: int | None = None
    metric: Metric | None = None
    max_abs_diff_real: float | None = None
    batch_invariance: BatchInvariance | None = None
    timings_ms: dict[str, float] | None = None
    cost_ms: float | None = None
    notes: str = ""
    passed: bool = False
    error: str | None = None  # why it could not be built or run
    seconds: float = 0.0

    @classmethod
    def of(cls, label: str, recipe: dict[str, object], verdict: ArtifactReport | None, error: str | None,
           seconds: float) -> CandidateRow:
        """The row for one attempt: its verdict's numbers, or the error that stopped it."""
        if verdict is None:
            return cls(label, recipe, error=error, seconds=round(seconds, 3))
        return cls(label, recipe, verdict.label_agreement, verdict.answers_changed, verdict.metric,
                   verdict.max_abs_diff_real, verdict.batch_invariance, verdict.timings_ms, verdict.cost_ms,
                   verdict.notes, verdict.passed, error, round(seconds, 3))

    def to_dict(self) -> dict[str, Any]:
        """The JSON row: `candidate`, the recipe's fields, then the verdict's."""
        d = asdict(self)
        del d["recipe"]
        return {"candidate": self.candidate, **self.recipe, **d}


@dataclass
class ExportReport:
    """The export-report.json contents; `recommended` names the artifact to package."""

    model_dir: str
    task: str
    labels: list[str]
    opset: int
    input_names: list[str]
    output_names: list[str]
    cpu: dict[str, object]
    onnxruntime_version: str
    gate: str = ""
    validation_inputs: str = ""
    artifacts: list[ArtifactReport] = field(default_factory=list)
    int8_search: list[CandidateRow] = field(default_factory=list)
    sensitivity: list[NodeSensitivity] = field(default_factory=list)  # per node: share of the INT8 error
    targets: list[str] = field(default_factory=list)  # shapes every validated artifact was timed at
    metadata_sha256: dict[str, str] = field(default_factory=dict)  # tokenizer / config files copied beside
    recommended: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def artifact(self, name: str) -> ArtifactReport | None:
        """The artifact called `name`, if it was built."""
        return next((a for a in self.artifacts if a.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (candidate rows flattened)."""
        d = asdict(self)
        d["int8_search"] = [r.to_dict() for r in self.int8_search]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportReport:
        """The report `to_dict` wrote, read back (export-report.json, for the plot or a re-render)."""
        return cls(**{**_known(cls, d), "artifacts": [_artifact(a) for a in d.get("artifacts", [])],
                      "int8_search": [_candidate(r) for r in d.get("int8_search", [])],
                      "sensitivity": [NodeSensitivity(**_known(NodeSensitivity, r)) for r in d.get("sensitivity", [])]})


def _known(cls: Any, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of `d` that are fields of the dataclass `cls`."""
    return {f.name: d[f.name] for f in fields(cls) if f.name in d}


def _artifact(d: dict[str, Any]) -> ArtifactReport:
    c = d.get("cascade")
    cascade = None if c is None else CascadeReport(**{
        **_known(CascadeReport, c), "calibration": Calibration.from_dict(c["calibration"]),
        "later": [Calibration.from_dict(x) for x in c.get("later", [])]})
    return ArtifactReport(**{**_known(ArtifactReport, d), "metric": _metric(d.get("metric")),
                             "batch_invariance": _invariance(d.get("batch_invariance")), "cascade": cascade})


def _candidate(d: dict[str, Any]) -> CandidateRow:
    names = {f.name for f in fields(CandidateRow)} | {"candidate"}
    return CandidateRow(**{**_known(CandidateRow, d), "recipe": {k: v for k, v in d.items() if k not in names},
                           "metric": _metric(d.get("metric")), "batch_invariance": _invariance(d.get("batch_invariance"))})


def _metric(d: dict[str, Any] | None) -> Metric | None:
    return None if d is None else Metric(**d)


def _invariance(d: dict[str, Any] | None) -> BatchInvariance | None:
    return None if d is None else BatchInvariance(**d)


# ----------------------------------------------------------------------------- rendering


def render(report: ExportReport) -> list[Any]:
    """What export prints, sized for an 80-column log: the artifacts (one short line each, their
    notes below the table), the INT8 candidates tried, the cascade's curve, the sensitive nodes.
    Every figure is also in export-report.json, with the details the terminal leaves out."""
    from rich.table import Table
    from rich.text import Text

    metric = next((a.metric.name for a in report.artifacts if a.metric is not None), "metric")
    table = compact(Table(title=f"bertedge export: {report.task} ({report.seconds:.1f} s); "
                                f"p50 ms at {' / '.join(report.targets)}"))
    for col in ("artifact", "MB", "agreement", metric, "invariant", "p50 ms", "ok"):
        table.add_column(col, overflow="fold")
    for a in report.artifacts:
        mark = "[green]yes[/]" if a.passed else ("[yellow]-[/]" if not a.validated else "[red]no[/]")
        star = " *" if a.name == report.recommended else ""
        table.add_row(a.name + star, f"{a.size_mb:.1f}", agreement_text(a.label_agreement, a.answers_changed, True),
                      "-" if a.metric is None else f"{a.metric.value * 100:.2f}",
                      "-" if a.batch_invariance is None else ("yes" if a.batch_invariance.passed else "no"),
                      "/".join(f"{v:.3g}" for v in a.timings_ms.values()) or "-", mark)
    notes = Text("\n".join(f"{a.name}: {a.notes}" for a in report.artifacts if a.notes and a.passed))
    tables: list[Any] = [table, notes] if notes.plain else [table]
    if report.int8_search:
        search = compact(Table(title="INT8 candidates (all validated; the fastest passer is kept)"))
        for col in ("candidate", "agreement", "invariant", "p50 ms", "ok", "s"):
            search.add_column(col, overflow="fold")
        for t in report.int8_search:
            search.add_row(t.candidate, agreement_text(t.agreement, t.answers_changed, True),
                           "-" if t.batch_invariance is None else ("yes" if t.batch_invariance.passed else "no"),
                           "/".join(f"{v:.3g}" for v in (t.timings_ms or {}).values()) or "-",
                           "yes" if t.passed else ("error" if t.error else "no"), f"{t.seconds:.0f}")
        tables.append(search)
    tables += [cascade_table(a) for a in report.artifacts if a.cascade is not None]
    if any(a.cold_start_s is not None for a in report.artifacts):
        tables.append(footprint_table(report))
    if report.sensitivity:
        nodes = compact(Table(title="INT8 sensitivity: share of the output error per node (top 8)"))
        for col in ("node", "share", "error, node in fp32", "error, all INT8"):
            nodes.add_column(col, overflow="fold")
        for r in report.sensitivity[:8]:
            nodes.add_row(r.node, f"{r.share:.3f}", f"{r.error_with_node_fp32:.2e}", f"{r.error_all_int8:.2e}")
        tables.append(nodes)
    return tables


def footprint_table(report: ExportReport) -> Any:
    """Each measured artifact's size on disk, cold start and peak RSS (a cascade: its stages together)."""
    from rich.table import Table

    table = compact(Table(title="footprint: a fresh process loads the bundle, answers once"))
    for col in ("artifact", "MB on disk", "cold start s", "peak RSS MB"):
        table.add_column(col)
    for a in report.artifacts:
        if a.cold_start_s is not None and a.peak_rss_mb is not None:
            table.add_row(a.name, f"{a.size_mb:.1f}", f"{a.cold_start_s:.2f}", f"{a.peak_rss_mb:.0f}")
    return table


def compact(table: Any) -> Any:
    """A rich Table without side borders or column rules: more of 80 columns left for figures."""
    from rich import box

    table.box, table.show_edge, table.padding = box.SIMPLE_HEAD, False, (0, 1, 0, 0)
    return table


def cascade_table(a: ArtifactReport, points: int = 10) -> Any:
    """The cascade's delta curve, thinned to about `points` rows, the chosen delta marked."""
    from rich.table import Table

    assert a.cascade is not None
    cal = a.cascade.calibration
    stages = " -> ".join(str(s["artifact"]) for s in a.cascade.stages)
    chosen = "none met the budgets" if cal.delta is None else f"{cal.delta:.4g}"
    table = compact(Table(title=f"cascade {stages}: delta {chosen} (rows: {a.cascade.rows}; "
                                f"confirmed on the other half: {'yes' if cal.confirmed else 'no'})"))
    for col in ("delta", "escalated", "agreement", "metric", "ms (estimated)"):
        table.add_column(col)
    curve = list(cal.curve)
    picks = {round(i * (len(curve) - 1) / max(points - 1, 1)) for i in range(points)} if curve else set()
    picks |= {i for i, p in enumerate(curve) if p.delta == cal.delta}
    for p in [curve[i] for i in sorted(picks)]:
        mark = " *" if cal.delta is not None and p.delta == cal.delta else ""
        table.add_row(f"{p.delta:.4g}{mark}", f"{p.escalated:.3f}", agreement_text(p.agreement, p.changed, True),
                      "-" if p.metric is None else f"{p.metric:.4f}",
                      "/".join(f"{v:.3g}" for v in p.cost_ms.values()) or "-")
    return table


def agreement_text(agreement: float | None, changed: int | None, short: bool = False) -> str:
    """'0.9931 (6 changed)' (short: '0.9931 (6)'): the share, and how many answers that is.

    >>> agreement_text(0.99312, 6), agreement_text(0.99312, 6, short=True), agreement_text(None, None)
    ('0.9931 (6 changed)', '0.9931 (6)', '-')
    """
    if agreement is None:
        return "-"
    return f"{agreement:.4f}" + (f" ({changed}{'' if short else ' changed'})" if changed is not None else "")


def invariance_text(inv: BatchInvariance | None) -> str:
    """'yes (3e-07)': whether the check passed, and the worst probability difference."""
    return "-" if inv is None else f"{'yes' if inv.passed else 'no'} ({inv.max_prob_diff:.0e})"


def timings_text(timings: dict[str, float] | None) -> str:
    """'0.41 / 3.20': p50 milliseconds at each target shape."""
    return " / ".join(f"{v:.2f}" for v in timings.values()) if timings else "-"


def metric_text(m: Metric | None) -> str:
    """'accuracy 0.9100 (Δ +0.20 pts)'.

    >>> metric_text(Metric("accuracy", 0.91, 0.912, 0.2))
    'accuracy 0.9100 (Δ +0.20 pts)'
    """
    return "-" if m is None else f"{m.name} {m.value:.4f} (Δ {m.drop_points:+.2f} pts)"


def _num(x: float | None, fmt: str = ".2e") -> str:
    return "-" if x is None else format(x, fmt)
