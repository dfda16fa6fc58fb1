"""The gate every artifact passes: PyTorch's reference outputs, the checks against them, the
timings at the target shapes, and the recommendation (the fastest artifact that passed).

Non-lossy kinds (`ArtifactKind.lossy` False: fp32, fused) must match PyTorch within --atol.
Lossy kinds (INT8, FP16) must keep the metric within --max-accuracy-drop points, keep
--min-agreement of PyTorch's answers, and answer a text the same alone, in a batch and padded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.runtime.artifacts import ARTIFACT_KINDS, ONNXRUNTIME, artifact_kind
from bertedge.runtime.bundle import cpu_model_and_flags
from bertedge.runtime.features import pad_id
from bertedge.runtime.meta import ModelMeta
from bertedge.runtime.sessions import make_session
from bertedge.runtime.tasks import Task
from bertedge.toolchain.export.args import ExportArgs
from bertedge.toolchain.export.compare import (
    Feeds,
    Outputs,
    Run,
    agreement_counts,
    allowed_changes,
    batch_invariance,
    cost_ms,
    feed,
    max_abs_diff,
    rows,
    target_feeds,
    valid,
)
from bertedge.toolchain.export.report import ArtifactReport, ExportReport, Metric
from bertedge.toolchain.export.source import (
    BUILTIN_SENTENCES,
    EvalSet,
    Source,
    evaluate,
    random_batches,
    tokenize,
    torch_runner,
)

Timer = Callable[[int, int], float]  # (batch, sequence) -> p50 milliseconds of one call at that shape

# texts each artifact's batch-invariance check puts alone, in a batch of 32 and padded: on the demo
# model, bf16-openvino moved 7.5e-6 on 8 (passing 1e-5), 2.7e-4 on 32 and 6.1e-4 on 64
INVARIANCE_PROBES = 32


def ort_runner(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
               engine: str = ONNXRUNTIME, inference_precision: str = "f32") -> Run:
    """Run a model file as the runtime will (its kind's engine and inference precision), feeding
    the graph's own input names."""
    session = make_session(path, providers, threads=threads or None, engine=engine,
                           inference_precision=inference_precision,
                           fix="re-run `bertedge export`; report the error if it persists")
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def run(feeds: Feeds) -> Outputs:
        values = session.run(outputs, {n: feed(feeds, n) for n in inputs})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(outputs, values, strict=True)}

    return run


def kind_runner(folder: Path, name: str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> Run:
    """`ort_runner` on the artifact kind `name`'s graph in `folder`, with its engine and inference precision."""
    kind = artifact_kind(name)
    return ort_runner(folder / kind.graph, providers, threads, kind.engine, kind.inference_precision)


def time_run(run: Run, feeds: Feeds, seconds: float) -> float:
    """Median milliseconds of `run(feeds)` over about `seconds` (at least 3 calls, 1 warm-up)."""
    run(feeds)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        t = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def cpu_info() -> dict[str, object]:
    """CPU model and the ISA flags that decide INT8 and bf16 speed and accuracy (AVX2 / AVX-512 / VNNI / BF16)."""
    model, flags = cpu_model_and_flags()
    return {"model": model, **{f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                         "amx_bf16")}}


@dataclass
class Reference:
    """PyTorch outputs and gates every artifact is validated against."""

    task: Task
    labels: tuple[str, ...]
    real: list[Feeds]
    random: list[Feeds]
    ref_real: list[Outputs]
    ref_random: list[Outputs]
    eval_set: EvalSet | None
    pytorch_metric: float | None
    args: ExportArgs
    info: ModelMeta | None = None  # the model's metadata (heads and hidden size for graph rewrites)
    pad: int = 0  # the tokenizer's padding id
    width: int = 128  # the padded width of the batch-invariance check
    shapes: tuple[tuple[int, int], ...] = ()  # target shapes every validated artifact is timed at
    cpu: dict[str, object] = field(default_factory=dict)
    extra: list[Feeds] = field(default_factory=list)  # --agreement-data batches: agreement only
    ref_extra: list[Outputs] = field(default_factory=list)

    def check(self, report: ArtifactReport, run: Run, lossy: bool, timer: Timer | None = None) -> ArtifactReport:
        """Fill `report` with diffs, agreement, metric, batch invariance and timings (by `timer`
        when given: ms at (batch, sequence), e.g. a cascade's on real texts); decide `passed`."""
        per_token = self.task.per_token_outputs
        got_real = [run(b) for b in self.real]
        got_random = [run(b) for b in self.random]
        report.max_abs_diff_real = max_abs_diff(self.ref_real, got_real, self.real, per_token)
        report.max_abs_diff_random = max_abs_diff(self.ref_random, got_random, self.random, per_token)
        same, total = agreement_counts(self.ref_real, got_real, self.real, per_token)
        if self.extra:
            more = agreement_counts(self.ref_extra, [run(b) for b in self.extra], self.extra, per_token)
            same, total = same + more[0], total + more[1]
        report.label_agreement = same / total if total else 1.0
        report.answers_changed, report.answers_compared = total - same, total
        report.metric = self._metric(got_real)
        unpadded = rows(self.real)
        probes = unpadded[:: max(1, len(unpadded) // INVARIANCE_PROBES)][:INVARIANCE_PROBES]
        report.batch_invariance = batch_invariance(run, probes, unpadded, self.pad, self.width, per_token,
                                                   self.args.seed, self.args.invariance_tol)
        report.validated, report.validated_on = True, self.cpu
        report.passed, why = self._gate(report, lossy)
        report.notes = "; ".join(x for x in (report.notes, why) if x)
        self.time(report, run, unpadded, timer)  # failed ones too: the report shows the whole agreement / speed curve
        return report

    def output_error(self, path: Path) -> float:
        """Mean |output difference| from PyTorch on a spread of up to 4 real batches (sensitivity)."""
        run, per_token = ort_runner(path), self.task.per_token_outputs
        picks = list(range(0, len(self.real), max(1, len(self.real) // 4)))[:4]
        diffs = [np.abs(valid(self.ref_real[i][n], self.real[i]["attention_mask"], per_token)
                        - valid(out[n], self.real[i]["attention_mask"], per_token)).mean()
                 for i in picks for out in [run(self.real[i])] for n in out]
        return float(np.mean(diffs))

    def time(self, report: ArtifactReport, run: Run, unpadded: Sequence[Feeds], timer: Timer | None = None) -> None:
        """p50 milliseconds at each target shape on real tokens; `cost_ms` is their geometric mean."""
        for batch, seq in self.shapes:
            if timer is not None:
                report.timings_ms[f"{batch}x{seq}"] = round(timer(batch, seq), 3)
                continue
            feeds = target_feeds(unpadded, batch, seq, self.args.seed)
            report.timings_ms[f"{batch}x{seq}"] = round(time_run(run, feeds, self.args.timing_seconds), 3)
        report.cost_ms = cost_ms(report.timings_ms)

    def _metric(self, got_real: list[Outputs]) -> Metric | None:
        if self.eval_set is None or self.pytorch_metric is None:
            return None
        value = evaluate(got_real, self.eval_set, self.task, self.labels)
        return Metric(self.task.metric, value, self.pytorch_metric, round((self.pytorch_metric - value) * 100, 4))

    def _gate(self, r: ArtifactReport, lossy: bool) -> tuple[bool, str]:
        if not lossy:
            worst = max(r.max_abs_diff_real or 0.0, r.max_abs_diff_random or 0.0)
            ok = worst <= self.args.atol
            return ok, "" if ok else f"failed parity: max |diff| {worst:.2e} > atol {self.args.atol:g}"
        why = []
        if r.metric is not None and r.metric.drop_points > self.args.max_accuracy_drop:
            why.append(f"failed budget: {r.metric.drop_points:.2f} point drop > {self.args.max_accuracy_drop:g}")
        if r.label_agreement < self.args.min_agreement:
            why.append(f"failed budget: agreement {r.label_agreement:.4f} < {self.args.min_agreement:g}"
                       f"{_changed_text(r, self.args.min_agreement)}")
        inv = r.batch_invariance
        if self.args.batch_invariance and inv is not None and not inv.passed:
            why.append(f"not batch-invariant: max |prob diff| {inv.max_prob_diff:.1e} "
                       f"(> {self.args.invariance_tol:g}), {inv.answers_changed} answers changed")
        return not why, "; ".join(why)

    def gate_text(self) -> str:
        """How lossy artifacts (INT8, FP16) are judged, for the report."""
        a = self.args
        inv = (f"; same answer alone / in a batch of 32 / padded to {self.width} "
               f"(probabilities within {a.invariance_tol:g})" if a.batch_invariance else "")
        where = (f"{self.eval_set.source} ({self.eval_set.rows} rows)" if self.eval_set is not None
                 else "the real inputs (no --eval)")
        metric = (f"{self.task.metric} drop <= {a.max_accuracy_drop:g} points and " if self.eval_set is not None else "")
        return (f"lossy artifacts: {metric}agreement with PyTorch >= {a.min_agreement:g} on {where}{inv}; "
                f"fp32/fused: max |diff| <= {a.atol:g}")


def build_reference(args: ExportArgs, source: Source, eval_set: EvalSet | None,
                    calibration: list[Feeds], extra: Sequence[Feeds] = ()) -> tuple[Reference, str]:
    """Run PyTorch once on real and random inputs; real = eval rows > calibration rows > built-ins;
    `extra` (--agreement-data) counts in the agreement budget only."""
    if eval_set is not None:
        real, what = eval_set.batches, f"{eval_set.rows} rows of {eval_set.source}"
    elif calibration:
        real, what = calibration, f"{sum(len(b['input_ids']) for b in calibration)} rows of {args.calibration}"
    else:
        real = tokenize(source.tokenizer, BUILTIN_SENTENCES, None, source.info.max_length, args.batch_size)
        what = f"{len(BUILTIN_SENTENCES)} built-in English sentences (no --eval or --calibration given)"
    noise = random_batches(int(source.model.config.vocab_size), source.info.max_length, args.seed)
    run = torch_runner(source)
    ref_real = [run(b) for b in real]
    task, labels = source.info.task, source.info.labels
    metric = evaluate(ref_real, eval_set, task, labels) if eval_set is not None else None
    lengths = sorted(int(n) for b in real for n in b["attention_mask"].sum(axis=1))
    typical = max(2, lengths[len(lengths) // 2])  # median real length: the default target shapes
    ref = Reference(task, labels, real, noise, ref_real, [run(b) for b in noise], eval_set, metric, args,
                    info=source.info, pad=pad_id(source.tokenizer), width=min(128, source.info.max_length),
                    shapes=args.targets or ((1, typical), (32, typical)), cpu=cpu_info(),
                    extra=list(extra), ref_extra=[run(b) for b in extra])
    if extra:
        what += (f"; agreement also on {sum(len(b['input_ids']) for b in extra)} unlabelled rows of "
                 f"{args.agreement_data}")
    return ref, what + "; random inputs: 2 batches of random token ids with ragged masks"


def retime(ref: Reference, out: Path, artifacts: Sequence[ArtifactReport],
           timers: Mapping[str, Timer] | None = None) -> None:
    """Time the passers again, side by side: `--timing-rounds` rounds, each artifact at each target
    shape once per round (the order reversed every other round); `timings_ms` becomes the median
    over the rounds. An artifact with an entry in `timers` (a cascade) is timed by it.

    Each artifact was first timed when it was built, minutes apart from the others; on a VM whose
    speed drifts by tens of percent within minutes that alone can pick the slower file.
    Interleaving puts every finalist under the same drift. The first timings stay in the search
    table (`int8_search`), the agreement / speed curve of every candidate.
    """
    finalists = [a for a in artifacts if a.passed and a.file and a.timings_ms and artifact_kind(a.name).cpu_candidate]
    if ref.args.timing_rounds < 1 or len(finalists) < 2:
        return
    timers = timers or {}
    unpadded = rows(ref.real)
    feeds = {(b, n): target_feeds(unpadded, b, n, ref.args.seed) for b, n in ref.shapes}
    runs = {a.name: timers.get(a.name) or feeds_timer(kind_runner(out, a.name, threads=ref.args.threads),
                                                      feeds, ref.args.timing_seconds)
            for a in finalists}
    samples: dict[str, dict[str, list[float]]] = {a.name: {f"{b}x{n}": [] for b, n in feeds} for a in finalists}
    for r in range(ref.args.timing_rounds):
        for a in finalists if r % 2 == 0 else finalists[::-1]:
            for b, n in feeds:
                samples[a.name][f"{b}x{n}"].append(runs[a.name](b, n))
    for a in finalists:
        a.timings_ms = {k: round(float(np.median(v)), 3) for k, v in samples[a.name].items()}
        a.cost_ms = cost_ms(a.timings_ms)


def feeds_timer(run: Run, feeds: Mapping[tuple[int, int], Feeds], seconds: float) -> Timer:
    """A Timer over one prepared feed per shape (`time_run`)."""
    return lambda batch, seq: time_run(run, feeds[(batch, seq)], seconds)


def _changed_text(r: ArtifactReport, min_agreement: float) -> str:
    """' (6 of 872 answers changed; the budget allows 4)': how far a miss is, in answers."""
    if r.answers_changed is None or not r.answers_compared:
        return ""
    allowed = allowed_changes(min_agreement, r.answers_compared)
    return f" ({r.answers_changed} of {r.answers_compared} answers changed; the budget allows {allowed})"


def recommend(artifacts: Sequence[ArtifactReport]) -> str:
    """The fastest passing CPU candidate (`ArtifactKind.cpu_candidate`) by measured cost at the
    target shapes; ties go to the one built first. Untimed: the lossy kinds in table order, then
    the others, the last-listed (most optimized) first. A cascade whose stage 1 escalates nothing
    (delta 0) is that stage plus overhead: its stage is recommended, never it."""
    passed = [a for a in artifacts if a.passed and artifact_kind(a.name).cpu_candidate
              and not (a.cascade is not None and a.cascade.stages and a.cascade.stages[0].get("delta") == 0.0)]
    timed = [a for a in passed if a.cost_ms is not None]
    if timed:
        return min(timed, key=lambda a: float(a.cost_ms or 0.0)).name
    kinds = list(ARTIFACT_KINDS.values())
    order = [k.name for k in kinds if k.lossy] + [k.name for k in reversed(kinds) if not k.lossy]
    names = {a.name for a in passed}
    return next(n for n in order if n in names)


# ----------------------------------------------------------------------------- building and gating


@dataclass
class BuildContext:
    """What a candidate's build function gets: the options, the source, the gate and the folder."""

    args: ExportArgs
    source: Source
    ref: Reference
    out: Path  # the (hidden, staged) export folder being built
    calibration: list[Feeds]
    report: ExportReport  # artifacts built so far, the INT8 search rows, the sensitivity table
    timers: dict[str, Timer] = field(default_factory=dict)  # artifacts `retime` times their own way (a cascade)
    tentative: set[str] = field(default_factory=set)  # failed artifacts kept only while a cascade may use them
    searches: dict[str, Any] = field(default_factory=dict)  # kind -> its INT8 ladder (quantize.SearchResult)

    def path(self, name: str) -> Path:
        """Where the artifact kind `name` keeps its graph in the folder."""
        return self.out / artifact_kind(name).graph

    def best_fp(self) -> str:
        """The fp32 graph later kinds start from: the fused one when it passed, else model.onnx."""
        fused = self.report.artifact("fused")
        return "fused" if fused is not None and fused.passed else "fp32"

    def validate(self, name: str, optimization: str = "none", notes: str = "",
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> ArtifactReport:
        """Gate the file of kind `name` already written to the folder: parity or budgets, timings."""
        kind = artifact_kind(name)
        report = ArtifactReport.of_kind(name, optimization)
        report.notes = notes
        run = kind_runner(self.out, name, providers, threads=self.args.threads)
        self.ref.check(report, run, lossy=kind.lossy)
        report.size_mb = size_mb(self.out, name)
        return report


def size_mb(folder: Path, name: str) -> float:
    """Megabytes of every file of the artifact kind `name` in `folder`."""
    files = [folder / f for f in artifact_kind(name).files]
    return round(sum(p.stat().st_size for p in files if p.is_file()) / 1e6, 3)
