"""Choosing a cascade's deltas: the smallest escalation threshold that keeps the budgets.

Export runs every stage on the same rows (--eval plus --agreement-data) and hands this module
the reference (PyTorch fp32) answers, each stage's answers and margins, and the gold answers
where known. For a two-stage cascade, `calibrate` walks a grid of thresholds delta (0, then half
way from each distinct stage-1 margin to the next, thinned to at most `max_points`): at each delta a row whose
stage-1 margin is below delta takes the last stage's answer, the others keep stage 1's. The
curve (delta -> share escalated -> agreement with the reference -> metric) is reported on all
rows; delta is chosen as the smallest grid point meeting both budgets on one seeded half of the
rows, with half the agreement budget's slack in reserve (`Budgets.with_headroom`; without it
when no delta meets that), and confirmed on the other half at the budgets themselves (both
halves' figures are reported). Agreement counts what
export's gate counts (`units`): a row's answer whole by default, NER's tokens one by one, so a
cascade's agreement and an artifact's compare like for like.

Chains of more than two stages are calibrated stage by stage from the back (`calibrate_chain`):
first the last two stages, as a two-stage cascade; then the stage before them against that
calibrated tail as its "last stage"; and so on. Each step must meet the full budgets against the
reference, so the whole chain meets them on the choosing half by construction, and its
confirming-half figures are the first step's.

numpy only (no torch import): export imports it, and so could a runtime-side re-calibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.runtime.cascade import ALWAYS, escalates

Metric = Callable[[Sequence[Any], Sequence[Any]], float]  # (predictions, gold) -> 0..1, higher is better
# (answer, reference answer) -> (units equal, units compared): what agreement counts in a row
Units = Callable[[Any, Any], tuple[int, int]]
HEADROOM = 0.5  # share of the agreement budget's slack a delta may use on the choosing half


@dataclass(frozen=True)
class Budgets:
    """What a cascade must keep, as export's --min-agreement and --max-accuracy-drop say it."""

    min_agreement: float = 0.995  # share of the reference's answers kept, 0..1
    max_metric_drop: float = 0.5  # metric points (100 x the 0..1 metric) below the reference's

    def with_headroom(self) -> Budgets:
        """The agreement budget with half its slack kept in reserve: what a delta must meet on the
        choosing half first, so one that only just passes there (and so likely fails the other
        half) is not taken while a safer one exists.

        >>> Budgets(0.999, 0.5).with_headroom().min_agreement
        0.9995
        """
        return Budgets(round(1.0 - (1.0 - self.min_agreement) * HEADROOM, 12), self.max_metric_drop)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_agreement) and 0 <= self.min_agreement <= 1
                and math.isfinite(self.max_metric_drop)):
            raise BertedgeError(f"cascade budgets {self.min_agreement!r} agreement, {self.max_metric_drop!r} "
                                "metric points are out of range",
                                "use --min-agreement between 0 and 1 and a finite --max-accuracy-drop")


@dataclass(frozen=True)
class CurvePoint:
    """The cascade's figures at one delta."""

    delta: float
    escalated: float  # share of rows the next stage answers
    agreement: float  # share of answers equal to the reference's (rows; NER: tokens, see `Units`)
    changed: int  # answers that differ from the reference's
    metric: float | None  # on the rows with gold answers (None: there are none)
    cost_ms: dict[str, float] = field(default_factory=dict)  # "BxS" -> ms, estimated once export timed the stages


@dataclass(frozen=True)
class HalfFigures:
    """One half of the rows at one delta, with the verdict of the budgets."""

    rows: int
    delta: float
    escalated: float
    agreement: float
    changed: int
    metric: float | None
    reference_metric: float | None
    passed: bool


@dataclass(frozen=True)
class Calibration:
    """The chosen delta of one stage, the curve it was chosen from and both halves' figures."""

    delta: float | None  # None: no delta meets the budgets on the choosing half
    confirmed: bool  # the confirming half meets the budgets at delta too
    curve: tuple[CurvePoint, ...]  # on all rows
    choose: HalfFigures  # at delta (or, when none passed, at the largest delta tried)
    confirm: HalfFigures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """The record `to_dict` wrote (export-report.json's `calibration`)."""
        return cls(d["delta"], d["confirmed"], tuple(CurvePoint(**p) for p in d["curve"]),
                   HalfFigures(**d["choose"]), HalfFigures(**d["confirm"]))


@dataclass(frozen=True)
class ChainCalibration:
    """A chain's deltas (stage 1 first) and each step, stage 1's first; the chain's verdict is
    its first step's (stage 1 against the calibrated tail)."""

    deltas: tuple[float, ...] | None  # None unless every step found a delta
    steps: tuple[Calibration, ...]  # from stage 1's on; steps before a failed one are not tried


def delta_grid(margins: np.ndarray, max_points: int = 200) -> np.ndarray:
    """0, then for each distinct margin the midpoint between it and the next one above (so each
    point escalates one more margin value, and every calibrated row's margin stays as far from
    the threshold as the data allow: a margin that moves by an engine's rounding between alone
    and in a batch does not cross it), thinned evenly to at most `max_points` points in all; the
    last point, half way to 1 (or ALWAYS), escalates every row.

    >>> [round(float(d), 6) for d in delta_grid(np.array([0.5, 0.1, 0.5, np.nan]))]
    [0.0, 0.3, 0.75]
    >>> grid = delta_grid(np.linspace(0, 1, 1000), 200)
    >>> len(grid), bool(grid[-1] > 1)
    (200, True)
    """
    values = np.unique(margins[np.isfinite(margins)])
    top = float(values[-1]) if len(values) else 0.0
    above = np.append(values[1:], 1.0 if top < 1.0 else ALWAYS + (ALWAYS - 1.0))  # the next value up
    keep = np.arange(len(values))
    if len(values) > max_points - 1:
        keep = np.unique(np.linspace(0, len(values) - 1, max_points - 1).round().astype(int))
    return np.unique(np.concatenate([[0.0], (values[keep] + above[keep]) / 2]))


def calibrate(reference: Sequence[Any], margins: np.ndarray, first: Sequence[Any], last: Sequence[Any],
              budgets: Budgets, gold: Sequence[Any] | None = None, metric: Metric | None = None,
              seed: int = 0, max_points: int = 200, units: Units | None = None) -> Calibration:
    """Choose a two-stage cascade's delta; see the module docstring.

    Args:
        reference: the reference's answer per row (labels, tag lists, answer strings...).
        margins: stage 1's margin per row (the task's `margin`); the rule is `escalates`.
        first: stage 1's answer per row; last: the last stage's (or calibrated tail's) answer.
        budgets: the agreement and metric budgets.
        gold: the gold answer per row, None for rows without one (agreement-only rows).
        metric: (predictions, gold) -> 0..1 on the gold rows; default: exact-match accuracy.
        seed: seeds the split into the choosing and the confirming half (gold rows and the
            others are each split in two, so both halves hold some of each).
        max_points: the most deltas tried.
        units: what agreement counts in a row (default: the answer whole, `whole_answer`).

    >>> ref, first, last = [0, 1, 1, 0] * 5, [0, 1, 0, 0] * 5, [0, 1, 1, 0] * 5
    >>> cal = calibrate(ref, np.array([0.9, 0.8, 0.1, 0.7] * 5), first, last, Budgets(1.0, 0.0), ref)
    >>> round(cal.delta, 6), cal.confirmed, cal.choose.escalated, cal.confirm.changed
    (0.4, True, 0.3, 0)
    """
    n = len(reference)
    margins = np.asarray(margins, dtype=np.float64)
    if n < 2 or not len(margins) == len(first) == len(last) == n or (gold is not None and len(gold) != n):
        raise BertedgeError(f"cannot calibrate a cascade on {n} reference, {len(margins)} margin, {len(first)} "
                            f"stage-1 and {len(last)} last-stage answers",
                            "give one answer and margin per row, on 2 or more rows")
    rows = _Rows(reference, first, last, gold, metric or _accuracy, units or whole_answer)
    grid = delta_grid(margins, max_points)
    everyone = np.arange(n)
    curve = tuple(rows.point(everyone, margins, float(d)) for d in grid)
    choose, confirm = split_halves(n, gold, seed)
    for target in (budgets.with_headroom(), budgets):
        for d in grid:
            if rows.half(choose, margins, float(d), target).passed:
                figures, check = (rows.half(half, margins, float(d), budgets) for half in (choose, confirm))
                return Calibration(float(d), check.passed, curve, figures, check)
    top = float(grid[-1])
    return Calibration(None, False, curve, rows.half(choose, margins, top, budgets),
                       rows.half(confirm, margins, top, budgets))


def calibrate_chain(reference: Sequence[Any], margins: Sequence[np.ndarray], answers: Sequence[Sequence[Any]],
                    budgets: Budgets, gold: Sequence[Any] | None = None, metric: Metric | None = None,
                    seed: int = 0, max_points: int = 200, units: Units | None = None) -> ChainCalibration:
    """Calibrate a chain of stages from the back (see the module docstring).

    Args:
        margins: each stage's margin per row, all stages but the last.
        answers: each stage's answer per row, all stages.
        The rest: as `calibrate`.

    >>> ref = [0, 1, 1, 0] * 5
    >>> chain = calibrate_chain(ref, [np.array([0.9, 0.8, 0.1, 0.7] * 5), np.array([0.5, 0.5, 0.6, 0.5] * 5)],
    ...                         [[0, 1, 0, 0] * 5, [0, 1, 0, 0] * 5, ref], Budgets(1.0, 0.0), ref)
    >>> [round(d, 6) for d in chain.deltas or ()]
    [0.4, 0.8]
    """
    if len(answers) < 2 or len(margins) != len(answers) - 1:
        raise BertedgeError(f"cannot calibrate a chain of {len(answers)} stage(s) from {len(margins)} margin arrays",
                            "give answers for 2 or more stages and margins for each stage but the last")
    tail, steps = list(answers[-1]), list[Calibration]()
    for k in range(len(margins) - 1, -1, -1):
        step = calibrate(reference, margins[k], answers[k], tail, budgets, gold, metric, seed, max_points, units)
        steps.insert(0, step)
        if step.delta is None:
            return ChainCalibration(None, tuple(steps))
        escalate = escalates(margins[k], step.delta)
        tail = [t if e else a for t, a, e in zip(tail, answers[k], escalate, strict=True)]
    return ChainCalibration(tuple(s.delta for s in steps if s.delta is not None), tuple(steps))


def _same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object)))


def whole_answer(answer: Any, reference: Any) -> tuple[int, int]:
    """A row's answer counts once: equal or not.

    >>> whole_answer((3, 5), (3, 5)), whole_answer("a", "b")
    ((1, 1), (0, 1))
    """
    return int(_same(answer, reference)), 1


def _accuracy(predictions: Sequence[Any], gold: Sequence[Any]) -> float:
    return sum(_same(p, g) for p, g in zip(predictions, gold, strict=True)) / max(len(gold), 1)


def split_halves(n: int, gold: Sequence[Any] | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded (choosing, confirming) row indices `calibrate` uses: the rows with gold answers
    and the others are each split in two, the choosing half taking the odd row out.

    >>> choose, confirm = split_halves(5, [1, None, 0, None, None], seed=0)
    >>> len(choose), len(confirm), sorted(np.concatenate([choose, confirm]).tolist())
    (3, 2, [0, 1, 2, 3, 4])
    """
    rng = np.random.default_rng(seed)
    labelled = np.array([gold is not None and g is not None for g in (gold or [None] * n)], dtype=bool)
    parts = [rng.permutation(np.flatnonzero(labelled == flag)) for flag in (True, False)]
    choose = np.sort(np.concatenate([p[: (len(p) + 1) // 2] for p in parts]))
    confirm = np.sort(np.concatenate([p[(len(p) + 1) // 2:] for p in parts]))
    return choose, confirm


class _Rows:
    """The per-row facts every delta reuses: how many units of each stage's answer equal the
    reference's, and the gold."""

    def __init__(self, reference: Sequence[Any], first: Sequence[Any], last: Sequence[Any],
                 gold: Sequence[Any] | None, metric: Metric, units: Units) -> None:
        self.first, self.last, self.reference, self.metric = list(first), list(last), list(reference), metric
        first_units = [units(a, r) for a, r in zip(first, reference, strict=True)]
        last_units = [units(a, r) for a, r in zip(last, reference, strict=True)]
        self.first_same = np.array([same for same, _ in first_units], dtype=np.int64)
        self.last_same = np.array([same for same, _ in last_units], dtype=np.int64)
        self.units = np.array([n for _, n in first_units], dtype=np.int64)
        self.gold = list(gold) if gold is not None else [None] * len(self.first)

    def point(self, rows: np.ndarray, margins: np.ndarray, delta: float) -> CurvePoint:
        escalate = escalates(margins[rows], delta)
        same = np.where(escalate, self.last_same[rows], self.first_same[rows])
        total = int(self.units[rows].sum())
        return CurvePoint(delta, float(escalate.mean()), float(same.sum() / max(total, 1)), int(total - same.sum()),
                          self._metric(rows, escalate))

    def half(self, rows: np.ndarray, margins: np.ndarray, delta: float, budgets: Budgets) -> HalfFigures:
        p = self.point(rows, margins, delta)
        labelled = [i for i in rows if self.gold[i] is not None]
        ref_metric = self.metric([self.reference[i] for i in labelled], [self.gold[i] for i in labelled]) \
            if labelled else None
        drop_ok = p.metric is None or ref_metric is None or 100 * (ref_metric - p.metric) <= budgets.max_metric_drop
        return HalfFigures(len(rows), delta, p.escalated, p.agreement, p.changed, p.metric, ref_metric,
                           bool(p.agreement >= budgets.min_agreement and drop_ok))

    def _metric(self, rows: np.ndarray, escalate: np.ndarray) -> float | None:
        picked = [(self.last[i] if e else self.first[i], self.gold[i])
                  for i, e in zip(rows, escalate, strict=True) if self.gold[i] is not None]
        return float(self.metric([p for p, _ in picked], [g for _, g in picked])) if picked else None
