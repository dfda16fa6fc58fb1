"""Cascades: per-task margins, run_cascade (pooling, order, batch invariance), the spec, and delta
calibration, on synthetic numpy stages (fast) and on two tiny exported NER models; then the
cascade artifact end to end on one tiny export: its report row, package, the manifest's checks,
the Predictor (delta 0, delta above 1, batch invariance), the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import make_tiny_model, sentiment_rows

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import artifact_kind
from bertedge.runtime.bundle import PackageArgs, package
from bertedge.runtime.cascade import (
    ALWAYS,
    CascadeSpec,
    CascadeStage,
    CascadeStats,
    Feeds,
    Outputs,
    graph_runner,
    run_cascade,
)
from bertedge.runtime.features import load_tokenizer, pad_batch, pad_id
from bertedge.runtime.predictor import Predictor
from bertedge.runtime.tasks import CLASSIFICATION, MARGIN_MASK, NER, QA
from bertedge.toolchain.cascade import Budgets, calibrate, calibrate_chain, delta_grid, split_halves
from bertedge.toolchain.export import (
    ExportArgs,
    ExportReport,
    Optimization,
    Quantization,
    export,
    render,
)

# --- synthetic stages: each row's outputs depend on its own real tokens and the stage alone


def stage(k: int, per_token: bool, calls: list[int] | None = None, classes: int = 3) -> Callable[[Feeds], Outputs]:
    """A batch-invariant fake model; padding positions get the batch width (garbage that must not leak)."""

    def run(feeds: Feeds) -> Outputs:
        if calls is not None:
            calls.append(len(feeds["input_ids"]))
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        width = ids.shape[1]
        pos = np.arange(width)[None, :, None]
        logits = 3 * np.sin(ids[..., None] * (1.0 + 0.37 * np.arange(classes)) + 0.11 * pos + 0.5 * k)
        logits = np.where(mask[..., None] == 1, logits, float(width))
        if per_token:
            return {"logits": logits.astype(np.float32)}
        n = mask.sum(axis=1)
        return {"logits": np.stack([logits[r, :n[r]].mean(axis=0) for r in range(len(ids))]).astype(np.float32)}

    return run


def random_rows(n: int, seed: int = 0, longest: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, 60, size=int(rng.integers(2, longest + 1)))) for _ in range(n)]


def pad(rows: list[list[int]], width: int | None = None) -> Feeds:
    width = width or max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def answers(rows: list[list[int]], batch_of: int, delta: float, per_token: bool, width: int | None = None,
            calls: list[int] | None = None, stages: int = 2) -> list[tuple[int, np.ndarray]]:
    """(stage, outputs over real tokens) per row, in input order, from batches of `batch_of` rows."""
    batches = [pad(rows[i:i + batch_of], width) for i in range(0, len(rows), batch_of)]
    runners = [stage(0, per_token)] + [stage(k, per_token, calls) for k in range(1, stages)]
    margin = NER.margin if per_token else CLASSIFICATION.margin
    out, which = run_cascade(batches, runners, [delta] * (stages - 1), margin, 0, 32, per_token=per_token)
    found = []
    for b, batch in enumerate(batches):
        for r, n in enumerate(batch["attention_mask"].sum(axis=1)):
            found.append((int(which[b][r]), out[b]["logits"][r, :n] if per_token else out[b]["logits"][r]))
    return found


def expected(row: list[int], k: int, per_token: bool) -> np.ndarray:
    logits = stage(k, per_token)(pad([row]))["logits"][0]
    return logits[:len(row)] if per_token else logits


@pytest.mark.parametrize("per_token", [False, True])
def test_delta_zero_answers_like_stage_one_and_above_one_like_the_last(per_token: bool) -> None:
    rows = random_rows(70)
    calls: list[int] = []
    for (which, got), row in zip(answers(rows, 16, 0.0, per_token, calls=calls), rows, strict=True):
        assert which == 0 and np.array_equal(got, expected(row, 0, per_token))
    assert calls == []  # stage 2 never ran
    for (which, got), row in zip(answers(rows, 16, 1.01, per_token, calls=calls), rows, strict=True):
        assert which == 1 and np.array_equal(got, expected(row, 1, per_token))
    assert calls == [32, 32, 6]  # every row, pooled into full batches


@pytest.mark.parametrize("per_token", [False, True])
def test_rows_keep_input_order_and_each_row_answers_as_alone(per_token: bool) -> None:
    rows = random_rows(75, seed=3)
    margin = NER.margin if per_token else CLASSIFICATION.margin
    delta = float(np.median([margin(stage(0, per_token)(pad([r])), pad([r]))[0] for r in rows]))
    alone = answers(rows, 1, delta, per_token)
    assert 0 < sum(w for w, _ in alone) < len(rows)  # some rows escalate, some do not
    assert {which for which, _ in alone} == {0, 1}
    for found in (answers(rows, 32, delta, per_token), answers(rows, 32, delta, per_token, width=48),
                  answers(rows, 7, delta, per_token)):
        assert len(found) == len(rows)
        for ((w1, a1), (w2, a2)), row in zip(zip(alone, found, strict=True), rows, strict=True):
            assert w1 == w2 and np.array_equal(a1, a2) and np.array_equal(a1, expected(row, w1, per_token))


def test_escalations_are_pooled_across_batches_and_padding_is_kept() -> None:
    rows = random_rows(32, seed=5)
    lowest = [3, 0, 7, 5]  # the one unsure row of each batch of 8: it starts with token 99
    for b, r in enumerate(lowest):
        rows[b * 8 + r][0] = 99
    batches = [pad(rows[i:i + 8]) for i in range(0, 32, 8)]

    def margin(outputs: Outputs, feeds: Feeds) -> np.ndarray:
        return np.where(feeds["input_ids"][:, 0] == 99, 0.0, 1.0)

    delta = 0.5
    calls: list[int] = []
    before = [stage(0, True)(b)["logits"] for b in batches]
    out, which = run_cascade(batches, [stage(0, True), stage(1, True, calls)], [delta], margin, 0, 32,
                             per_token=True)
    assert calls == [4]  # one pooled call for the four escalated rows, not four calls
    assert [int(w.sum()) for w in which] == [1, 1, 1, 1]
    stats = CascadeStats.count(which, 2)
    assert stats.rows == (28, 4) and stats.to_dict()["escalated_share"] == 4 / 32
    for b, (batch, old) in enumerate(zip(batches, before, strict=True)):
        r, n = lowest[b], int(batch["attention_mask"][lowest[b]].sum())
        assert np.array_equal(out[b]["logits"][r, :n], expected(rows[b * 8 + r], 1, True))
        assert np.array_equal(out[b]["logits"][r, n:], old[r, n:])  # padding as the batch had it
        assert out[b]["logits"].shape == old.shape


def test_three_stages_and_groups_escalate_together() -> None:
    rows = random_rows(40, seed=7)
    found = answers(rows, 10, 0.6, False, stages=3)
    assert {w for w, _ in found} <= {0, 1, 2}
    for (w, got), row in zip(found, rows, strict=True):
        assert np.array_equal(got, expected(row, w, False))
    batches = [pad(rows[:20]), pad(rows[20:])]
    margins = [CLASSIFICATION.margin(stage(0, False)(b), b) for b in batches]
    delta = float(np.median(np.concatenate(margins)))
    groups = [[i // 2 for i in range(20)], [10 + i // 2 for i in range(20)]]  # items of two windows
    _, which = run_cascade(batches, [stage(0, False), stage(1, False)], [delta], CLASSIFICATION.margin, 0, 8,
                           per_token=False, groups=groups)
    for b in range(2):
        low = margins[b] < delta
        for i in range(0, 20, 2):
            assert which[b][i] == which[b][i + 1] == int(low[i] or low[i + 1])


def test_bad_calls_are_refused_in_one_line() -> None:
    with pytest.raises(BertedgeError, match="3 deltas for 2 stages.*not all finite") as err:
        run_cascade([pad([[1, 2]])], [stage(0, False)] * 2, [math.nan, 1.0, 0.5], CLASSIFICATION.margin, 0, 8,
                    per_token=False)
    assert "\n" not in str(err.value)


# --- the spec


def stages_dict() -> dict[str, object]:
    return {"stages": [{"artifact": "int8-openvino", "engine": "openvino", "files": ["stage1.xml", "stage1.bin"],
                        "delta": 0.2},
                       {"artifact": "int8", "engine": "onnxruntime", "files": ["stage2.onnx"], "delta": 0}]}


def test_spec_round_trips_and_refuses_bad_specs_in_one_line() -> None:
    spec = CascadeSpec.from_dict(json.loads(json.dumps(stages_dict())))
    assert spec.deltas == (0.2,) and CascadeSpec.from_dict(spec.to_dict()) == spec
    bad = stages_dict()
    bad["stages"][0]["delta"] = float("nan")  # type: ignore[index]
    with pytest.raises(BertedgeError, match=r"stage 1 delta nan is not a number in \[0, 1\]") as err:
        CascadeSpec.from_dict(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(BertedgeError, match="it has 1 stage"):
        CascadeSpec.from_dict({"stages": stages_dict()["stages"][:1]})  # type: ignore[index]
    with pytest.raises(BertedgeError, match="stage 2 has no 'delta'"):
        CascadeSpec.from_dict({"stages": [stages_dict()["stages"][0], {"artifact": "x", "engine": "onnxruntime",  # type: ignore[index]
                                                                        "files": ["a.onnx"]}]})
    with pytest.raises(BertedgeError, match=r"not plain file names; stage 1 delta -1.0 .*; stage 2 engine .tensorrt. is unknown"):
        CascadeSpec((CascadeStage("int8", "onnxruntime", ("../a.onnx",), -1.0),
                     CascadeStage("fp32", "tensorrt", ("b.plan",), 0.0)))
    with pytest.raises(BertedgeError, match="share file names"):
        CascadeSpec((CascadeStage("int8", "onnxruntime", ("m.onnx",), 0.1),
                     CascadeStage("fp32", "onnxruntime", ("m.onnx",), 0.0)))


# --- the tasks' margins on real encodings


def test_margin_masks_skip_specials_and_the_question(tiny_bert: Path) -> None:
    tok = load_tokenizer(tiny_bert / "tokenizer.json")
    NER.setup_tokenizer(tok, 32, 0)
    enc = NER.encode_items(tok, [("john lives in paris", None)], 10_000).encodings[0]
    mask = NER.margin_mask([enc], len(enc.ids) + 2)[0]
    assert mask.tolist() == [0, 1, 1, 1, 1, 0, 0, 0]  # [CLS] and [SEP] and padding do not count
    QA.setup_tokenizer(tok, 32, 8)
    enc = QA.encode_items(tok, [("where", "john lives in paris")], 10_000).encodings[0]
    assert QA.margin_mask([enc], len(enc.ids))[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    logits = np.zeros((1, len(enc.ids)))
    logits[0, 6] = 10.0  # "paris" is clearly the answer; the question's tokens are ignored
    feeds = {MARGIN_MASK: QA.margin_mask([enc], len(enc.ids))}
    assert QA.margin({"start_logits": logits, "end_logits": logits}, feeds)[0] > 0.99
    assert QA.margin({"start_logits": 0 * logits, "end_logits": 0 * logits}, feeds)[0] == pytest.approx(0.0)


# --- calibration


def test_calibration_picks_the_smallest_passing_delta_and_reports_both_halves() -> None:
    rng = np.random.default_rng(0)
    n = 400
    reference = rng.integers(0, 2, n)
    margins = rng.uniform(0, 1, n)
    first = np.where(margins < 0.15, 1 - reference, reference)  # stage 1 errs only where unsure
    last = reference.copy()
    gold = [int(r) if i % 2 else None for i, r in enumerate(reference)]  # half the rows have gold
    cal = calibrate(list(reference), margins, list(first), list(last), Budgets(1.0, 0.0), gold)
    choose, confirm = split_halves(n, gold, seed=0)
    flips = margins < 0.15
    grid = delta_grid(margins, 200)  # 400 distinct margins thinned to 200 deltas
    assert cal.delta is not None
    assert cal.delta == grid[grid > margins[choose][flips[choose]].max()].min()  # the first above its last flip
    assert cal.choose.rows == len(choose) and cal.confirm.rows == len(confirm) == n // 2
    assert cal.choose.changed == 0 and cal.choose.metric == cal.choose.reference_metric
    missed = int((flips[confirm] & (margins[confirm] >= cal.delta)).sum())  # the other half may differ
    assert cal.confirm.changed == missed and cal.confirmed == (missed == 0)
    smaller = [p for p in cal.curve if p.delta < cal.delta]
    assert smaller and all(p.changed > 0 for p in smaller)
    assert cal.curve[0].delta == 0 and cal.curve[0].escalated == 0 and cal.curve[-1].escalated == 1
    assert len(cal.curve) <= 200 and json.dumps(cal.to_dict())
    loose = calibrate(list(reference), margins, list(first), list(last), Budgets(0.95, 100.0), gold)
    assert loose.delta is not None and loose.delta < cal.delta and loose.choose.agreement >= 0.95
    never = calibrate(list(reference), margins, list(first), list(1 - reference), Budgets(0.99, 0.0), gold)
    assert never.delta is None and not never.confirmed and never.choose.delta == never.curve[-1].delta


def test_chain_calibration_goes_from_the_back() -> None:
    rng = np.random.default_rng(1)
    n = 300
    reference = rng.integers(0, 3, n)
    m1, m2 = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    s1 = np.where(m1 < 0.5, (reference + 1) % 3, reference)
    s2 = np.where(m2 < 0.2, (reference + 2) % 3, reference)
    chain = calibrate_chain(list(reference), [m1, m2], [list(s1), list(s2), list(reference)], Budgets(1.0, 0.0))
    assert chain.deltas is not None and len(chain.steps) == 2
    d1, d2 = chain.deltas
    choose, _ = split_halves(n, None, seed=0)
    grid = delta_grid(m2, 200)
    assert d2 == grid[grid > m2[choose][(m2 < 0.2)[choose]].max()].min()  # half way to the next margin up
    assert not np.isin(d2, m2) and (m2 < d2).sum() == (m2 <= m2[choose][(m2 < 0.2)[choose]].max()).sum()
    tail = np.where(m2 < d2, reference, s2)
    answer = np.where(m1 < d1, tail, s1)
    assert np.array_equal(answer[choose], reference[choose])  # the chain meets the budget where chosen
    assert chain.steps[0].confirm.changed == int((answer != reference).sum())  # and reports the rest
    assert delta_grid(np.array([]), 200).tolist() == [0.0]


def test_ner_agreement_counts_tokens_as_the_gate_does() -> None:
    """A cascade's agreement counts what the gate counts for the artifacts beside it: NER tokens,
    not whole sentences (one changed token in each of 10 rows is 75% of 40 tokens, not 0% of rows)."""
    from bertedge.toolchain.export.cascade import token_labels

    ref, first = [((1, 1, 1, 1),)] * 10, [((1, 1, 1, 0),)] * 10
    tokens = calibrate(ref, np.full(10, 0.9), first, ref, Budgets(0.5, 100.0), units=token_labels)
    assert tokens.delta == 0.0 and tokens.curve[0].agreement == 0.75 and tokens.curve[0].changed == 10
    rows = calibrate(ref, np.full(10, 0.9), first, ref, Budgets(0.5, 100.0))
    assert rows.curve[0].agreement == 0.0 and rows.delta is not None and rows.delta > 0.9


def test_a_cascade_that_escalates_nothing_is_never_recommended() -> None:
    """delta 0 makes a cascade its stage 1 plus overhead: timing noise must not recommend it."""
    from bertedge.toolchain.export import ArtifactReport, recommend
    from bertedge.toolchain.export.report import CascadeReport

    stage1, cascade = ArtifactReport.of_kind("int8-openvino"), ArtifactReport.of_kind("cascade")
    for row, ms in ((stage1, 1.0), (cascade, 0.9)):
        row.passed, row.cost_ms = True, ms
    cal = calibrate([0, 1] * 4, np.full(8, 0.9), [0, 1] * 4, [0, 1] * 4, Budgets(1.0, 0.0))
    cascade.cascade = CascadeReport([{"artifact": "int8-openvino", "delta": 0.0}, {"artifact": "fused", "delta": 0.0}],
                                    8, cal)
    assert cal.delta == 0.0 and recommend([stage1, cascade]) == "int8-openvino"
    cascade.cascade.stages[0]["delta"] = 0.2
    assert recommend([stage1, cascade]) == "cascade"


def test_calibration_refuses_mismatched_inputs() -> None:
    with pytest.raises(BertedgeError, match="cannot calibrate"):
        calibrate([0, 1], np.array([0.1]), [0, 1], [0, 1], Budgets())
    with pytest.raises(BertedgeError, match="out of range"):
        Budgets(min_agreement=math.nan)


def test_importing_the_cascade_leaves_torch_out() -> None:
    code = ("import sys, bertedge.runtime.cascade, bertedge.runtime.stages, bertedge.toolchain.cascade; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- two tiny exported NER models through onnxruntime


def export_ner(folder: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForTokenClassification

    model_dir = make_tiny_model(folder / "model", task="ner", labels=("O", "B-PER", "I-PER"), seed=seed)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "logits"]}
    torch.onnx.export(model, tuple(torch.ones(2, 8, dtype=torch.long) for _ in names), str(folder / "model.onnx"),
                      input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return folder


def test_tiny_exported_models_cascade(tmp_path: Path) -> None:
    from bertedge.runtime.sessions import feed_plan, make_session

    folders = [export_ner(tmp_path / f"m{seed}", seed) for seed in (1, 0)]  # stage 1: seed 1, stage 2: seed 0
    sessions = [make_session(f / "model.onnx", threads=1) for f in folders]
    runners = [graph_runner(s, ["logits"], feed_plan(s)) for s in sessions]
    tok = load_tokenizer(folders[0] / "model" / "tokenizer.json")
    NER.setup_tokenizer(tok, 32, 0)
    words = ["john", "smith", "lives", "in", "paris", "works", "at", "acme", "corp", "good", "film", "the"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(40)]
    encodings = NER.encode_items(tok, [(t, None) for t in texts], 10_000).encodings

    def batch(encs: list, width: int | None = None) -> Feeds:  # type: ignore[type-arg]
        feeds = pad_batch(encs, pad_id(tok))
        if width:
            feeds = {k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in feeds.items()}
        return {**feeds, MARGIN_MASK: NER.margin_mask(encs, feeds["input_ids"].shape[1])}

    def cascade(size: int, delta: float, width: int | None = None) -> list[tuple[int, np.ndarray]]:
        batches = [batch(encodings[i:i + size], width) for i in range(0, len(encodings), size)]
        out, which = run_cascade(batches, runners, [delta], NER.margin, pad_id(tok), 32, per_token=True)
        return [(int(which[b][r]), out[b]["logits"][r, :len(encodings[b * size + r].ids)])
                for b in range(len(batches)) for r in range(len(which[b]))]

    alone = [runner(batch([e])) for runner in runners for e in encodings]
    for k, delta in ((0, 0.0), (1, 2.0)):
        found = cascade(8, delta)
        assert {w for w, _ in found} == {k}
        for (_, got), ref in zip(found, alone[k * 40:(k + 1) * 40], strict=True):
            np.testing.assert_allclose(got, ref["logits"][0], atol=1e-5)
    margins = np.sort([NER.margin(a, batch([e]))[0] for a, e in zip(alone[:40], encodings, strict=True)])
    gaps = np.diff(margins[10:30])
    delta = float((margins[10 + gaps.argmax()] + margins[11 + gaps.argmax()]) / 2)  # far from any margin
    one, many, wide = cascade(1, delta), cascade(32, delta), cascade(32, delta, width=40)
    assert 0 < sum(w for w, _ in one) < 40
    for (w1, a1), (w2, a2), (w3, a3) in zip(one, many, wide, strict=True):
        assert w1 == w2 == w3
        np.testing.assert_allclose(a1, a2, atol=1e-5)
        np.testing.assert_allclose(a1, a3, atol=1e-5)


# --- the cascade artifact, end to end: export -> package -> Predictor -> CLI (one tiny export)


TEXTS = [text for text, _ in sentiment_rows(30, seed=5)] + [
    "good", "the film", "a very dull story and the plot was boring", "superb acting , lovely story",
    "john smith lives in paris", "what a tedious , ugly and poor movie . the acting was awful", "fun", "bad film",
    "the story is the story is the story", "brilliant and wonderful and great and excellent"]


@dataclass(frozen=True)
class Bundles:
    cascade: Path
    first: Path  # stage 1's artifact packaged alone
    last: Path  # the last stage's artifact packaged alone


@pytest.fixture(scope="module")
def bundles(cascade_export: tuple[Path, ExportReport], tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    out, report = cascade_export
    row = report.artifact("cascade")
    assert row is not None and row.cascade is not None
    root = tmp_path_factory.mktemp("bundles")
    first, last = row.cascade.stages[0]["artifact"], row.cascade.stages[-1]["artifact"]
    for name, kind in (("cascade", "cascade"), ("first", first), ("last", last)):
        package(PackageArgs(export_dir=out, out=root / name, artifact=kind, force=True))
    return Bundles(root / "cascade", root / "first", root / "last")


def with_delta(bundle: Path, to: Path, delta: float) -> Path:
    """A copy of a cascade bundle whose stage 1 escalates below `delta` (its digest changes)."""
    shutil.copytree(bundle, to)
    manifest = json.loads((to / "manifest.json").read_text())
    manifest["cascade"]["stages"][0]["delta"] = delta
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def same_answers(got: list[dict[str, Any]], want: list[dict[str, Any]], atol: float) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        for label, p in w["probabilities"].items():
            assert g["probabilities"][label] == pytest.approx(p, abs=atol)


def test_export_builds_a_calibrated_and_timed_cascade_row(cascade_export: tuple[Path, ExportReport]) -> None:
    out, report = cascade_export
    row = report.artifact("cascade")
    assert row is not None and row.validated and row.passed and row.file == "cascade.json", row and row.notes
    c = row.cascade
    assert c is not None and [s["files"] for s in c.stages][0]
    first, last = (report.artifact(s["artifact"]) for s in (c.stages[0], c.stages[-1]))
    assert first is not None and last is not None and artifact_kind(first.name).first_stage
    assert last.passed and (not artifact_kind(last.name).lossy or last.label_agreement > first.label_agreement)
    cal = c.calibration
    assert c.rows == 60 + 100  # the --eval examples and the --agreement-data rows, never calibration rows
    assert cal.choose.rows + cal.confirm.rows == c.rows and abs(cal.choose.rows - cal.confirm.rows) <= 1
    assert cal.choose.metric is not None and cal.confirm.reference_metric is not None  # --eval rows on both sides
    assert cal.delta is not None and cal.confirmed and c.stages[0]["delta"] == cal.delta
    assert cal.curve[0].delta == 0 and cal.curve[0].escalated == 0 and cal.curve[-1].escalated == 1
    assert json.loads((out / "cascade.json").read_text()) == {"stages": c.stages}
    assert set(row.timings_ms) == set(report.targets) == set(c.first_stage_ms) == set(c.escalated)
    assert row.cost_ms is not None and "its stage 1" in row.notes  # faster or not, the row says so
    assert row.sha256 == {"cascade.json": hashlib.sha256((out / "cascade.json").read_bytes()).hexdigest()}
    saved = next(a for a in json.loads((out / "export-report.json").read_text())["artifacts"] if a["name"] == "cascade")
    assert {"choose", "confirm", "curve", "delta"} <= set(saved["cascade"]["calibration"])
    titles = [str(getattr(t, "title", "")) for t in render(report)]
    assert any(t.startswith(f"cascade {first.name} -> {last.name}") for t in titles)


def test_delta_zero_answers_like_stage_one_and_always_like_the_last_stage(bundles: Bundles, tmp_path: Path) -> None:
    alone_first = Predictor(bundles.first, threads=1).predict(TEXTS)
    alone_last = Predictor(bundles.last, threads=1).predict(TEXTS)
    assert all("stage" not in r for r in alone_first)  # only cascade bundles say which stage answered
    zero = Predictor(with_delta(bundles.cascade, tmp_path / "zero", 0.0), threads=1).predict(TEXTS)
    assert {r["stage"] for r in zero} == {1}
    same_answers(zero, alone_first, 1e-6)
    always = Predictor(with_delta(bundles.cascade, tmp_path / "always", ALWAYS), threads=1).predict(TEXTS)
    assert {r["stage"] for r in always} == {2}
    same_answers(always, alone_last, 1e-5)


def margin_split(results: list[dict[str, Any]]) -> float:
    """A delta half way across the widest gap between the middle results' top-two margins."""
    margins = np.sort([np.subtract(*sorted(r["probabilities"].values(), reverse=True)[:2]) for r in results])
    middle = margins[len(margins) // 4: 3 * len(margins) // 4 + 1]
    gap = int(np.diff(middle).argmax())
    return float(middle[gap] + middle[gap + 1]) / 2


def test_a_text_gets_the_same_answer_and_stage_alone_and_in_any_batch(bundles: Bundles, tmp_path: Path) -> None:
    alone_first = Predictor(bundles.first, threads=1).predict(TEXTS)
    alone_last = Predictor(bundles.last, threads=1).predict(TEXTS)
    predictor = Predictor(with_delta(bundles.cascade, tmp_path / "split", margin_split(alone_first)), threads=1)
    alone = [predictor.predict([t])[0] for t in TEXTS]
    assert {r["stage"] for r in alone} == {1, 2}
    for found in (predictor.predict(TEXTS), predictor.predict(TEXTS, batch_size=7),
                  predictor.predict_isolated(TEXTS[::-1], batch_size=3)[::-1]):
        assert [r["stage"] for r in found] == [r["stage"] for r in alone]
        same_answers(found, alone, 1e-5)
    for r, first, last in zip(alone, alone_first, alone_last, strict=True):
        same_answers([r], [first if r["stage"] == 1 else last], 1e-5)
    described = predictor.describe()
    assert [s["artifact"] for s in described["stages"]] == [json.loads(
        (bundles.cascade / "manifest.json").read_text())["cascade"]["stages"][k]["artifact"] for k in (0, 1)]
    assert predictor.output_schema()["stage"] == "int64" and list(predictor.model_files()) == ["stage1.onnx",
                                                                                                 "stage2.onnx"]


def tamper(manifest: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with value REMOVE, delete) the field at 'a.b.0.c' in the manifest."""
    *parents, last = path.split(".")
    node: Any = manifest
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is REMOVE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value


REMOVE = object()
TAMPERED = [
    ("cascade.stages.0.delta", float("nan"), r"stage 1 delta nan is not a number in \[0, 1\]"),
    ("cascade.stages.0.delta", -0.5, r"stage 1 delta -0.5 is not"),
    ("cascade.stages.0.delta", 1.5, r"stage 1 delta 1.5 is not"),
    ("cascade.stages.1", REMOVE, r"it has 1 stage"),
    ("cascade.stages.1.engine", "tensorrt", r"stage 2 engine 'tensorrt' is unknown"),
    ("cascade.stages.1.artifact", "int8-openvino", r"stage 2 engine 'onnxruntime' is not its artifact"),
    ("cascade.stages.1.files", ["stage9.onnx"], r"no checksum for stage9.onnx"),
    ("cascade.stages.1.files", ["../stage2.onnx"], r"not plain file names"),
    ("cascade", REMOVE, r"artifact 'cascade' needs a cascade field"),
    ("artifact", "fp32", r"a cascade field goes with artifact 'cascade'"),
    ("engine", "openvino", r"engine 'openvino' is not stage 1's"),
]


@pytest.mark.parametrize(("path", "value", "match"), TAMPERED, ids=[f"{p}={v!r}" for p, v, _ in TAMPERED])
def test_a_tampered_cascade_field_is_refused_in_one_line(bundles: Bundles, tmp_path: Path, path: str, value: Any,
                                                         match: str) -> None:
    copy = shutil.copytree(bundles.cascade, tmp_path / "b")
    manifest = json.loads((copy / "manifest.json").read_text())
    tamper(manifest, path, value)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BertedgeError, match=match) as err:
        Predictor(copy, threads=1)
    assert "\n" not in str(err.value)


def test_stage_files_and_the_digest_pin_guard_a_cascade_bundle(bundles: Bundles, tmp_path: Path) -> None:
    digest = Predictor(bundles.cascade, threads=1).digest
    with pytest.raises(BertedgeError, match="another or a modified bundle"):
        Predictor(with_delta(bundles.cascade, tmp_path / "moved", 0.5), expect_digest=digest)
    corrupt = shutil.copytree(bundles.cascade, tmp_path / "corrupt")
    data = bytearray((corrupt / "stage2.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "stage2.onnx").write_bytes(bytes(data))
    with pytest.raises(BertedgeError, match="file 'stage2.onnx' is corrupt"):
        Predictor(corrupt, threads=1)
    (corrupt / "stage2.onnx").unlink()
    with pytest.raises(BertedgeError, match="file 'stage2.onnx' is missing"):
        Predictor(corrupt, threads=1)


def test_cli_packages_and_predicts_a_cascade(cascade_export: tuple[Path, ExportReport], tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["package", str(cascade_export[0]), "--out", str(tmp_path / "b"), "--artifact", "cascade"])
    assert r.exit_code == 0, r.output
    assert "packaged artifact 'cascade'" in r.output
    r = runner.invoke(cli, ["predict", str(tmp_path / "b"), "--threads", "1"], input="a good film\na bad film\n")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and all(x["stage"] in (1, 2) and "label" in x for x in lines)
    assert "cascade: " in r.output and " of 2 items escalated" in r.output  # the latency report counts them


def test_an_openvino_first_stage_ships_as_stage1_xml_and_bin(cascade_export: tuple[Path, ExportReport],
                                                             tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    out, report = cascade_export
    ov = report.artifact("int8-openvino")
    if ov is None or not ov.file:
        pytest.skip("this export has no int8-openvino artifact")
    copy = shutil.copytree(out, tmp_path / "export")
    stages = json.loads((copy / "cascade.json").read_text())["stages"]
    stages[0] = {"artifact": "int8-openvino", "engine": "openvino", "files": list(artifact_kind(ov.name).files),
                 "delta": 0.5}
    (copy / "cascade.json").write_text(json.dumps({"stages": stages}))
    saved = json.loads((copy / "export-report.json").read_text())
    row = next(a for a in saved["artifacts"] if a["name"] == "cascade")
    row["sha256"] = {"cascade.json": hashlib.sha256((copy / "cascade.json").read_bytes()).hexdigest()}
    (copy / "export-report.json").write_text(json.dumps(saved))
    bundle = package(PackageArgs(export_dir=copy, out=tmp_path / "b", artifact="cascade"))
    assert bundle.manifest.engine == "openvino" and bundle.manifest.model_files == ("stage1.xml", "stage1.bin",
                                                                                    "stage2.onnx")
    predictor = Predictor(tmp_path / "b", threads=1)
    assert [s["engine"] for s in predictor.describe()["stages"]] == ["openvino", "onnxruntime"]
    alone = [predictor.predict([t])[0] for t in TEXTS]
    batched = predictor.predict(TEXTS)
    assert [r["stage"] for r in batched] == [r["stage"] for r in alone]
    same_answers(batched, alone, 1e-5)
    (copy / ov.file).write_bytes((copy / ov.file).read_bytes() + b" ")  # a stage's file changed after export
    with pytest.raises(BertedgeError, match="changed since export"):
        package(PackageArgs(export_dir=copy, out=tmp_path / "b2", artifact="cascade"))


def test_a_draft_students_artifact_starts_a_three_stage_chain(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    train, dev = sentiment_csv
    student = make_tiny_model(tmp_path / "student", seed=3)  # the same tokenizer and labels, other weights
    common: dict[str, Any] = dict(optimization=Optimization.NONE, quantize=Quantization.STATIC, calibration=train,
                                  calibration_rows=40, sensitivity=False, timing_seconds=0.02, timing_rounds=0,
                                  threads=1, openvino="off", min_agreement=0.0, max_accuracy_drop=100.0)
    export(ExportArgs(student, tmp_path / "student-export", **common))
    report = export(ExportArgs(tiny_bert, tmp_path / "export", eval_file=dev, agreement_data=train, agreement_rows=60,
                               draft=tmp_path / "student-export", **common))
    row = report.artifact("cascade")
    assert row is not None and row.cascade is not None and row.passed, row and row.notes
    assert [s["files"] for s in row.cascade.stages] == [["draft-model-int8-static.onnx"], ["model-int8-static.onnx"],
                                                        ["model.onnx"]]
    assert len(row.cascade.later) == 1 and row.cascade.draft == str(tmp_path / "student-export")
    assert all(set(p.cost_ms) == set(report.targets) for p in row.cascade.calibration.curve)  # the chain is priced
    assert set(row.sha256) == {"cascade.json", "draft-model-int8-static.onnx"}
    bundle = package(PackageArgs(export_dir=tmp_path / "export", out=tmp_path / "b", artifact="cascade"))
    assert bundle.manifest.model_files == ("stage1.onnx", "stage2.onnx", "stage3.onnx")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    for stage, delta in zip(manifest["cascade"]["stages"], (ALWAYS, 0.0, 0.0), strict=True):
        stage["delta"] = delta  # the student escalates everything, the teacher's INT8 nothing
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    via_two = Predictor(tmp_path / "b", threads=1).predict(TEXTS)
    assert {r["stage"] for r in via_two} == {2}
    package(PackageArgs(export_dir=tmp_path / "export", out=tmp_path / "int8", artifact="int8-static", force=True))
    same_answers(via_two, Predictor(tmp_path / "int8", threads=1).predict(TEXTS), 1e-6)
    other = shutil.copytree(tmp_path / "student-export", tmp_path / "other")
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"[UNK]"', '"[unk]"'))
    with pytest.raises(BertedgeError, match="--draft .*its tokenizer.json is not the teacher's"):
        export(ExportArgs(tiny_bert, tmp_path / "refused", eval_file=dev, draft=other, **common))


def test_a_cascade_no_delta_can_save_is_reported_without_a_file(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    train, dev = sentiment_csv
    report = export(ExportArgs(tiny_bert, tmp_path / "export", optimization=Optimization.NONE,
                               quantize=Quantization.STATIC, eval_file=dev, calibration=train, calibration_rows=40,
                               sensitivity=False, timing_seconds=0.02, timing_rounds=0, threads=1, openvino="off",
                               max_accuracy_drop=-100.0))  # a budget no artifact can keep, fp32 aside
    row = report.artifact("cascade")
    assert row is not None and not row.passed and row.file == "" and row.cascade is not None
    assert row.cascade.calibration.delta is None and "no delta for stage 1 meets the budgets" in row.notes
    assert not (tmp_path / "export" / "cascade.json").exists() and report.recommended == "fp32"
    for force in (False, True):
        with pytest.raises(BertedgeError, match=r"artifact 'cascade' left no file in the export \(no delta for stage 1"):
            package(PackageArgs(export_dir=tmp_path / "export", out=tmp_path / "b", artifact="cascade", force=force))


def test_serve_answers_a_cascade_and_counts_texts_by_stage(bundles: Bundles, tmp_path: Path) -> None:
    """serve runs a cascade bundle unchanged (through Predictor): each answer names its stage and
    /metrics counts the texts each stage answered."""
    from fastapi.testclient import TestClient

    from bertedge.edges.serve import ServeConfig, create_app

    alone_first = Predictor(bundles.first, threads=1).predict(TEXTS)
    predictor = Predictor(with_delta(bundles.cascade, tmp_path / "split", margin_split(alone_first)), threads=1)
    want = [r["stage"] for r in predictor.predict(TEXTS)]
    with TestClient(create_app(predictor, ServeConfig(max_texts=len(TEXTS), max_wait_ms=2))) as client:
        response = client.post("/v1/predict", json={"texts": TEXTS})
        assert response.status_code == 200, response.text
        assert [r["stage"] for r in response.json()["predictions"]] == want
        metrics = client.get("/metrics").text
    for stage in (1, 2):
        line = f'bertedge_cascade_stage_texts_total{{stage="{stage}"}} {float(want.count(stage))}'
        assert line in metrics, [m for m in metrics.splitlines() if "cascade" in m]
