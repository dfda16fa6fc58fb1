"""The cascade candidate: static INT8 answers the texts it is sure of, a more faithful artifact the rest.

Built after every other candidate, from their files and verdicts:

- stage 1: the fastest validated, batch-invariant artifact of a kind that may start a cascade
  (`ArtifactKind.first_stage`: static INT8, onnxruntime's or NNCF's on OpenVINO), whether or not
  it met the budgets on its own: the cascade exists to fix the answers it is unsure of;
- last stage: the fastest artifact that passed and is faithful: fp32 parity (fp32, fused), or
  more of PyTorch's answers kept than stage 1 (per-token INT8, say).

delta is calibrated (`bertedge.toolchain.cascade.calibrate`) on the --eval examples and the
--agreement-data rows, never the calibration texts: the smallest delta whose cascade keeps the
metric and agreement budgets against PyTorch's answers on one seeded half, confirmed on the other
(an --eval example's answer is the task's prediction, so the metric is the task's own). The
cascade is then gated like every artifact (agreement, metric, batch invariance) through the
runtime's own `run_cascade`, and timed on real texts cut or padded to each target shape,
escalations included and pooled across batches as `predict` pools them, beside stage 1 alone on
the same texts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bertedge.runtime.artifacts import CASCADE, artifact_kind
from bertedge.runtime.cascade import CascadeSpec, CascadeStage, CascadeStats
from bertedge.runtime.stages import SPEC_FILE, OpenedCascade, open_cascade
from bertedge.toolchain.cascade import Budgets, Calibration, calibrate
from bertedge.toolchain.export.compare import Feeds, Outputs, cost_ms, rows, stack
from bertedge.toolchain.export.gate import BuildContext, Reference, size_mb, time_run
from bertedge.toolchain.export.report import ArtifactReport, CascadeReport
from bertedge.toolchain.export.source import example_predictions

TIMED_ROWS = 256  # real texts per timed pass at each shape (2 batches at least)


def build_cascade(ctx: BuildContext) -> list[ArtifactReport]:
    """cascade.json (with --cascade, the default): stage 1, a more faithful last stage, delta."""
    if not ctx.args.cascade:
        return []
    first, last = pick_stages(ctx.report.artifacts)
    if first is None:
        return []
    if last is None or (ctx.ref.eval_set is None and not ctx.ref.extra):
        why = (f"no artifact that passed is more faithful than {first.name}" if last is None
               else "it needs --eval or --agreement-data rows to choose its delta on")
        ctx.report.warnings.append(f"cascade: not built ({why})")
        return []
    stages = (stage_of(first, 0.0), stage_of(last, 0.0))
    opened = open_cascade(ctx.out, CascadeSpec(stages), ctx.ref.task, ctx.ref.pad, threads=ctx.args.threads or None,
                          fix="re-run `bertedge export`")
    calibration, count = calibrate_delta(ctx.ref, opened)
    report = ArtifactReport.of_kind(CASCADE)
    report.quantization = {"stages": {a.name: a.quantization for a in (first, last)}}
    report.cascade = CascadeReport(opened.spec.to_dict()["stages"], count, calibration)
    report.size_mb = round(sum(size_mb(ctx.out, a.name) for a in (first, last)), 3)
    if calibration.delta is None:
        report.file = ""
        report.notes = (f"no delta meets the budgets on the choosing half (escalating every row keeps "
                        f"{calibration.choose.agreement:.4f} of its answers)")
        return [report]
    opened.spec = CascadeSpec((stage_of(first, calibration.delta), stages[1]))
    report.cascade.stages = opened.spec.to_dict()["stages"]
    (ctx.out / SPEC_FILE).write_text(json.dumps(opened.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    ctx.tentative.discard(first.name)  # its files stay: the cascade ships them
    timer = CascadeTimer(opened, real_rows(ctx.ref), ctx.args.timing_seconds, ctx.args.seed)
    ctx.ref.check(report, opened.run_batch, lossy=True, timer=timer)
    report.cascade.escalated = dict(timer.escalated)
    report.cascade.first_stage_ms = {f"{b}x{n}": round(timer.first_stage(b, n), 3) for b, n in ctx.ref.shapes}
    report.passed = report.passed and calibration.confirmed
    report.notes = "; ".join(x for x in (report.notes, describe(report, first.name)) if x)
    ctx.timers[report.name] = timer
    return [report]


def pick_stages(artifacts: Sequence[ArtifactReport]) -> tuple[ArtifactReport | None, ArtifactReport | None]:
    """(stage 1, last stage), see the module docstring; None where there is none."""
    def invariant(a: ArtifactReport) -> bool:
        return a.batch_invariance is not None and a.batch_invariance.passed

    firsts = [a for a in artifacts if artifact_kind(a.name).first_stage and a.validated and a.file and invariant(a)
              and a.cost_ms is not None]
    if not firsts:
        return None, None
    first = min(firsts, key=lambda a: float(a.cost_ms or 0.0))
    lasts = [a for a in artifacts if a.passed and a.file and a.cost_ms is not None and a.name != first.name
             and artifact_kind(a.name).cpu_candidate and artifact_kind(a.name).engine != CASCADE
             and (not artifact_kind(a.name).lossy or a.label_agreement > first.label_agreement)]
    return first, min(lasts, key=lambda a: float(a.cost_ms or 0.0)) if lasts else None


def stage_of(a: ArtifactReport, delta: float) -> CascadeStage:
    """The stage that runs artifact `a`'s files in the export folder."""
    kind = artifact_kind(a.name)
    return CascadeStage(a.name, kind.engine, kind.files, delta)


def describe(report: ArtifactReport, first: str) -> str:
    """The row's note: delta, how much escalates, the confirmation, the cost against stage 1 alone."""
    assert report.cascade is not None
    cal, c = report.cascade.calibration, report.cascade
    text = (f"delta {cal.delta:.4g}: {cal.choose.escalated:.1%} escalated, agreement {cal.choose.agreement:.4f} "
            f"(choosing half) / {cal.confirm.agreement:.4f} (other half"
            f"{')' if cal.confirmed else ', over budget: not confirmed)'}")
    alone, both = cost_ms(c.first_stage_ms), cost_ms(report.timings_ms)
    if alone and both:
        verdict = "not faster than" if both >= alone else "faster than"
        text += f"; {both / alone:.2f}x the time of {first} alone on the same texts: {verdict} its stage 1"
    return text


# ----------------------------------------------------------------------------- calibration


def calibrate_delta(ref: Reference, opened: OpenedCascade) -> tuple[Calibration, int]:
    """Calibrate stage 1's delta on the --eval examples and the --agreement-data rows; the row count."""
    task, labels, args = ref.task, ref.labels, ref.args
    reference: list[Any] = []
    first: list[Any] = []
    last: list[Any] = []
    margins: list[float] = []
    eval_set = ref.eval_set
    if eval_set is not None:
        outs = [[run(b) for b in ref.real] for run in (opened.runners[0], opened.runners[-1])]
        for answers, got in zip((reference, first, last), (ref.ref_real, *outs), strict=True):
            answers += example_predictions(got, eval_set, task, labels)
        margins += example_margins(outs[0], ref)
    gold: list[Any] = list(range(len(reference)))  # --eval examples by index; metric() scores them
    outs = [[run(b) for b in ref.extra] for run in (opened.runners[0], opened.runners[-1])]
    for answers, got in zip((reference, first, last), (ref.ref_extra, *outs), strict=True):
        answers += [a for o, b in zip(got, ref.extra, strict=True) for a in row_answers(o, b, task.output_names, task.per_token_outputs)]
    margins += [float(m) for o, b in zip(outs[0], ref.extra, strict=True) for m in task.margin(o, b)]
    gold += [None] * (len(reference) - len(gold))

    def metric(predictions: Sequence[Any], examples: Sequence[Any]) -> float:
        assert eval_set is not None
        subset = eval_set.examples.subset(list(examples))
        return float(task.score(list(predictions), subset, labels)[task.metric])

    budgets = Budgets(args.min_agreement, args.max_accuracy_drop)
    return calibrate(reference, np.asarray(margins), first, last, budgets, gold, metric, seed=args.seed), len(reference)


def example_margins(outputs: Sequence[Outputs], ref: Reference) -> list[float]:
    """Stage 1's margin per --eval example: its windows' lowest (any window escalates them all)."""
    assert ref.eval_set is not None
    found = [math.inf] * ref.eval_set.rows
    example_index = ref.eval_set.features.example_index
    for out, batch, idx in zip(outputs, ref.real, ref.eval_set.order, strict=True):
        for window, m in zip(idx, ref.task.margin(out, batch), strict=True):
            e = example_index[window]
            found[e] = float(m) if math.isnan(m) or m < found[e] else found[e]
    return [1.0 if math.isinf(m) else m for m in found]


def row_answers(outputs: Outputs, feeds: Feeds, names: Sequence[str], per_token: bool) -> list[tuple[Any, ...]]:
    """Each row's answer, output by output: the argmax class (per row), each real token's label
    (NER) or the best real position (QA span ends).

    >>> row_answers({"logits": np.array([[0.1, 0.9], [2.0, 1.0]])}, {"attention_mask": np.ones((2, 3))},
    ...             ["logits"], per_token=False)
    [(1,), (0,)]
    """
    lengths = np.asarray(feeds["attention_mask"]).sum(axis=1).astype(int)
    answers = []
    for r, n in enumerate(lengths):
        parts: list[Any] = []
        for name in names:
            x = np.asarray(outputs[name])[r]
            if per_token and x.ndim == 2:
                parts.append(tuple(int(v) for v in x[:n].argmax(-1)))
            else:
                parts.append(int((x[:n] if per_token else x).argmax()))
        answers.append(tuple(parts))
    return answers


# ----------------------------------------------------------------------------- timing


def real_rows(ref: Reference) -> list[Feeds]:
    """The unpadded real rows the cascade is timed on: --eval's and --agreement-data's."""
    return rows(ref.real if ref.eval_set is not None else []) + rows(ref.extra)


def cut(row: Feeds, seq: int) -> Feeds:
    """A row of at most `seq` tokens: its first seq - 1 and its last (the closing special token).

    >>> cut({"input_ids": np.array([[1, 2, 3, 4]])}, 3)["input_ids"].tolist()
    [[1, 2, 4]]
    """
    if row["input_ids"].shape[1] <= seq:
        return row
    return {k: np.concatenate([v[:, :seq - 1], v[:, -1:]], axis=1) for k, v in row.items()}


@dataclass
class CascadeTimer:
    """The cascade's `Timer`: ms per call at (batch, seq) on real texts, each cut or padded to
    `seq`, TIMED_ROWS of them per pass in batches of `batch`, later stages pooled across the
    pass's batches in batches of `batch` (as `Predictor.predict` runs a call)."""

    opened: OpenedCascade
    rows: list[Feeds]
    seconds: float
    seed: int
    escalated: dict[str, float] = field(default_factory=dict)  # "BxS" -> share escalated in the timed pass
    _batches: dict[tuple[int, int], list[Feeds]] = field(default_factory=dict)

    def batches(self, batch: int, seq: int) -> list[Feeds]:
        """The seeded real texts timed at this shape."""
        if (batch, seq) not in self._batches:
            count = batch * max(2, math.ceil(TIMED_ROWS / batch))
            picks = np.random.default_rng(self.seed).choice(len(self.rows), count, replace=len(self.rows) < count)
            chosen = [cut(self.rows[int(i)], seq) for i in picks]
            self._batches[(batch, seq)] = [stack(chosen[i:i + batch], self.opened.pad_id, seq)
                                           for i in range(0, count, batch)]
        return self._batches[(batch, seq)]

    def __call__(self, batch: int, seq: int) -> float:
        batches = self.batches(batch, seq)

        def run(_: Feeds) -> Outputs:
            stages = self.opened.run(batches, batch)[1]
            share = CascadeStats.count(stages, len(self.opened.runners)).to_dict()["escalated_share"]
            self.escalated[f"{batch}x{seq}"] = round(float(share), 4)
            return {}

        return time_run(run, {}, self.seconds) / len(batches)

    def first_stage(self, batch: int, seq: int) -> float:
        """Stage 1 alone on the same batches: what the cascade costs on top of it."""
        batches, first = self.batches(batch, seq), self.opened.runners[0]

        def run(_: Feeds) -> Outputs:
            for b in batches:
                first(b)
            return {}

        return time_run(run, {}, self.seconds) / len(batches)
