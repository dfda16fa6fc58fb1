"""The cascade candidate: static INT8 answers the texts it is sure of, a more faithful artifact the rest.

Built after every other candidate, from their files and verdicts:

- stage 1: the fastest validated, batch-invariant artifact of a kind that may start a cascade
  (`ArtifactKind.first_stage`: static INT8, onnxruntime's or NNCF's on OpenVINO), whether or not
  it met the budgets on its own: the cascade exists to fix the answers it is unsure of;
- last stage: the fastest artifact that passed and is faithful: fp32 parity (fp32, fused), or
  more of PyTorch's answers kept than stage 1 (per-token INT8, say); when no delta meets the
  budgets with it, the next fastest such artifact is tried (up to `MAX_LAST_STAGES`);
- with `--draft STUDENT_EXPORT_DIR`, a distilled student's artifact goes first (`draft`): a
  chain of three stages when the teacher has a static INT8 one, its deltas calibrated from the
  back (`calibrate_chain`).

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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bertedge.runtime.artifacts import CASCADE, artifact_kind
from bertedge.runtime.cascade import CascadeSpec, CascadeStats
from bertedge.runtime.stages import SPEC_FILE, OpenedCascade, open_cascade
from bertedge.toolchain.cascade import Budgets, ChainCalibration, calibrate_chain, whole_answer
from bertedge.toolchain.export.compare import Feeds, Outputs, cost_ms, rows, stack
from bertedge.toolchain.export.draft import StagePlan, copy_draft, of_artifact
from bertedge.toolchain.export.gate import BuildContext, Reference, time_run
from bertedge.toolchain.export.report import ArtifactReport, CascadeReport
from bertedge.toolchain.export.source import example_predictions

TIMED_ROWS = 256  # real texts per timed pass at each shape (2 batches at least)
MAX_LAST_STAGES = 3  # last-stage candidates tried, fastest first, until one meets the budgets


def build_cascade(ctx: BuildContext) -> list[ArtifactReport]:
    """cascade.json (with --cascade, the default): stage 1 (with --draft: the student's, then the
    teacher's static INT8 when there is one), a more faithful last stage, and their deltas."""
    chains = plan_chains(ctx)
    for i, chain in enumerate(chains):
        opened = open_cascade(ctx.out, CascadeSpec(tuple(p.stage for p in chain)), ctx.ref.task, ctx.ref.pad,
                              threads=ctx.args.threads or None, fix="re-run `bertedge export`")
        found, count = calibrate_deltas(ctx.ref, opened)
        if found.deltas is not None or i == len(chains) - 1:
            break
        ctx.report.warnings.append(f"cascade: no delta meets the budgets with {chain[-1].name} as the last stage; "
                                   f"trying {chains[i + 1][-1].name}")
    else:
        return []
    report = ArtifactReport.of_kind(CASCADE)
    report.quantization = {"stages": {p.name: p.quantization for p in chain}}
    report.size_mb = round(sum(p.size_mb for p in chain), 3)
    report.cascade = CascadeReport(opened.spec.to_dict()["stages"], count, found.steps[0], list(found.steps[1:]),
                                   draft=str(ctx.args.draft) if ctx.args.draft is not None else None,
                                   draft_files=[f for p in chain if p.name.startswith("draft ") for f in p.stage.files])
    if found.deltas is None:
        return [not_calibrated(ctx, report, len(chain) - len(found.steps))]
    opened.spec = CascadeSpec(tuple(replace(p.stage, delta=d) for p, d in zip(chain, (*found.deltas, 0.0), strict=True)))
    report.cascade.stages = opened.spec.to_dict()["stages"]
    (ctx.out / SPEC_FILE).write_text(json.dumps(opened.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    ctx.tentative.difference_update(p.name for p in chain)  # their files stay: the cascade ships them
    timer = CascadeTimer(opened, real_rows(ctx.ref), ctx.args.timing_seconds, ctx.args.seed)
    ctx.ref.check(report, opened.run_batch, lossy=True, timer=timer)
    report.cascade.escalated = dict(timer.escalated)
    report.cascade.first_stage_ms = {f"{b}x{n}": round(timer.first_stage(b, n), 3) for b, n in ctx.ref.shapes}
    report.passed = report.passed and all(step.confirmed for step in found.steps)
    report.notes = "; ".join(x for x in (report.notes, describe(report, chain[0].name)) if x)
    ctx.timers[report.name] = timer
    return [report]


def plan_chains(ctx: BuildContext) -> list[list[StagePlan]]:
    """The chains to try, first to last stage, one per last-stage candidate (fastest first, the
    first whose deltas meet the budgets is built); [] when there is no cascade to build (the
    report says why)."""
    if not ctx.args.cascade:
        return []
    first, lasts = pick_stages(ctx.report.artifacts)
    if first is None and ctx.args.draft is None:
        return []
    if not lasts or (ctx.ref.eval_set is None and not ctx.ref.extra):
        why = (f"no artifact that passed is more faithful than {first.name if first else 'the draft'}"
               if not lasts else "it needs --eval or --agreement-data rows to choose its delta on")
        ctx.report.warnings.append(f"cascade: not built ({why})")
        return []
    head = [*([copy_draft(ctx)] if ctx.args.draft is not None else []),
            *([of_artifact(ctx, first.name)] if first is not None else [])]
    return [[*head, of_artifact(ctx, last.name)] for last in lasts[:MAX_LAST_STAGES]]


def not_calibrated(ctx: BuildContext, report: ArtifactReport, stage: int) -> ArtifactReport:
    """The row of a cascade no delta of stage `stage` (1-based) made meet the budgets: no file."""
    assert report.cascade is not None
    for name in report.cascade.draft_files:
        (ctx.out / name).unlink(missing_ok=True)
    report.file, report.cascade.draft_files = "", []
    report.notes = (f"no delta for stage {stage} meets the budgets on the choosing half (escalating every row "
                    f"keeps {report.cascade.calibration.choose.agreement:.4f} of the answers)")
    return report


def pick_stages(artifacts: Sequence[ArtifactReport]) -> tuple[ArtifactReport | None, list[ArtifactReport]]:
    """(stage 1, the last-stage candidates, fastest first) of the export's own artifacts, see the
    module docstring; None / [] where there is none (with no stage 1, any artifact that passed may
    be the last)."""
    def invariant(a: ArtifactReport) -> bool:
        return a.batch_invariance is not None and a.batch_invariance.passed

    firsts = [a for a in artifacts if artifact_kind(a.name).first_stage and a.validated and a.file and invariant(a)
              and a.cost_ms is not None]
    first = min(firsts, key=lambda a: float(a.cost_ms or 0.0)) if firsts else None
    lasts = [a for a in artifacts if a.passed and a.file and a.cost_ms is not None and a is not first
             and artifact_kind(a.name).cpu_candidate and artifact_kind(a.name).engine != CASCADE
             and (first is None or not artifact_kind(a.name).lossy or a.label_agreement > first.label_agreement)]
    return first, sorted(lasts, key=lambda a: float(a.cost_ms or 0.0))


def describe(report: ArtifactReport, first: str) -> str:
    """The row's note: delta, how much escalates, the confirmation, the cost against stage 1 alone."""
    assert report.cascade is not None
    cal, c = report.cascade.calibration, report.cascade
    text = (f"delta {cal.delta:.4g}: {cal.choose.escalated:.1%} escalated, agreement {cal.choose.agreement:.4f} "
            f"(choosing half) / {cal.confirm.agreement:.4f} (other half"
            f"{')' if cal.confirmed else ', over budget: not confirmed)'}")
    if cal.delta == 0.0:
        text += f"; {first} keeps the budgets alone, so this cascade (it plus overhead) is never recommended"
    alone, both = cost_ms(c.first_stage_ms), cost_ms(report.timings_ms)
    if alone and both:
        verdict = "not faster than" if both >= alone else "faster than"
        text += f"; {both / alone:.2f}x the time of {first} alone on the same texts: {verdict} its stage 1"
    return text


# ----------------------------------------------------------------------------- cost along the curve


def price_curves(artifacts: Sequence[ArtifactReport]) -> None:
    """Put `cost_ms` on every point of each cascade's delta curve, once every stage is timed
    (after `retime`): "BxS" -> ms per call at that delta, estimated from the stages' own timings as
    stage 1's ms (alone, on the cascade's timed texts) + the escalated share x the later stages' ms
    (escalations pooled into full batches, as `predict` pools them). A chain of three or more
    stages moves stage 1's delta only: its later stages stay at their chosen deltas (`tail_ms`).
    The curve gets no cost where a stage has no timing or a later delta was not found."""
    timings = {a.name: a.timings_ms for a in artifacts}
    for a in artifacts:
        if a.cascade is None:
            continue
        c, tail = a.cascade, tail_ms(a.cascade, timings)
        first = c.first_stage_ms or timings.get(str(c.stages[0]["artifact"]), {})
        curve = tuple(replace(p, cost_ms={k: round(first[k] + p.escalated * v, 3) for k, v in tail.items()
                                          if k in first}) for p in c.calibration.curve)
        c.calibration = replace(c.calibration, curve=curve)


def tail_ms(c: CascadeReport, timings: dict[str, dict[str, float]]) -> dict[str, float]:
    """"BxS" -> ms of what stage 1 escalates to: stage 2 alone in a two-stage cascade; in a chain,
    stage 2 + its escalated share (on all rows, at its chosen delta) x the stages after it."""
    later = [timings.get(str(s["artifact"]), {}) for s in c.stages[1:]]
    if len(c.later) != len(later) - 1 or any(step.delta is None for step in c.later):
        return {}
    shares = [next((p.escalated for p in step.curve if p.delta == step.delta), step.choose.escalated)
              for step in c.later]
    return {shape: chain_ms([ms[shape] for ms in later], shares)
            for shape in later[0] if all(shape in ms for ms in later)}


def chain_ms(stage_ms: Sequence[float], shares: Sequence[float]) -> float:
    """ms of stages run one after the other, each on its share of the texts before it.

    >>> chain_ms([4.0], []), chain_ms([4.0, 10.0, 100.0], [0.5, 0.1])
    (4.0, 14.0)
    """
    total = stage_ms[-1]
    for ms, share in zip(reversed(stage_ms[:-1]), reversed(shares), strict=True):
        total = ms + share * total
    return float(total)


# ----------------------------------------------------------------------------- calibration


def calibrate_deltas(ref: Reference, opened: OpenedCascade) -> tuple[ChainCalibration, int]:
    """Calibrate every stage's delta but the last's (`calibrate_chain`, from the back) on the
    --eval examples and the --agreement-data rows; the number of rows."""
    task, labels, args = ref.task, ref.labels, ref.args
    answers: list[list[Any]] = [[] for _ in range(len(opened.runners) + 1)]  # the reference's, then each stage's
    margins: list[list[float]] = [[] for _ in opened.runners[:-1]]
    eval_set = ref.eval_set
    if eval_set is not None:
        outs = [[run(b) for b in ref.real] for run in opened.runners]
        for found, got in zip(answers, (ref.ref_real, *outs), strict=True):
            found += example_predictions(got, eval_set, task, labels)
        for found, got in zip(margins, outs, strict=False):
            found += example_margins(got, ref)
    gold: list[Any] = list(range(len(answers[0])))  # --eval examples by index; metric() scores them
    outs = [[run(b) for b in ref.extra] for run in opened.runners]
    for found, got in zip(answers, (ref.ref_extra, *outs), strict=True):
        found += [a for o, b in zip(got, ref.extra, strict=True)
                  for a in row_answers(o, b, task.output_names, task.per_token_outputs)]
    for found, got in zip(margins, outs, strict=False):
        found += [float(m) for o, b in zip(got, ref.extra, strict=True) for m in task.margin(o, b)]
    gold += [None] * (len(answers[0]) - len(gold))

    def metric(predictions: Sequence[Any], examples: Sequence[Any]) -> float:
        assert eval_set is not None
        subset = eval_set.examples.subset(list(examples))
        return float(task.score(list(predictions), subset, labels)[task.metric])

    budgets = Budgets(args.min_agreement, args.max_accuracy_drop)
    per_token = any(np.asarray(v).ndim == 3 for out in (*ref.ref_real[:1], *ref.ref_extra[:1]) for v in out.values())
    found_chain = calibrate_chain(answers[0], [np.asarray(m) for m in margins], answers[1:], budgets, gold, metric,
                                  seed=args.seed, units=token_labels if per_token else whole_answer)
    return found_chain, len(answers[0])


def token_labels(answer: Any, reference: Any) -> tuple[int, int]:
    """Per-token labels (NER) count token by token, as the gate counts them (`agreement_counts`):
    an --eval example's word tags, or an agreement row's `row_answers` ((label ids...),).

    >>> token_labels(((1, 0, 2),), ((1, 1, 2),)), token_labels(["O", "B-PER"], ["O", "B-PER"])
    ((2, 3), (2, 2))
    """
    def tokens(x: Any) -> Sequence[Any] | None:
        if isinstance(x, tuple) and len(x) == 1 and isinstance(x[0], tuple):
            return x[0]
        return x if isinstance(x, list) else None

    a, r = tokens(answer), tokens(reference)
    if a is None or r is None or len(a) != len(r):
        return whole_answer(answer, reference)
    return sum(x == y for x, y in zip(a, r, strict=True)), len(r)


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
