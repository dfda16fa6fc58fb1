"""bertedge export: parity of every artifact with PyTorch, the INT8 budget search, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from click.testing import CliRunner
from tiny import make_tiny_model, sentiment_rows, write_csv, write_jsonl

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.toolchain import quantize as q
from bertedge.toolchain.export import (
    ExportArgs,
    ExportReport,
    Optimization,
    Quantization,
    agreement_counts,
    export,
    max_abs_diff,
)

TEXTS = ["a good film", "the plot was very dull and the acting was poor", "superb", "boring movie"]
INT8_ATOL = 1e-2  # tiny random models have logits ~1e-3; INT8 error stays well under this


def torch_and_onnx(model_dir: Path, onnx_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Logits of the PyTorch model and of an ONNX file on TEXTS, and the graph's input names."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = tok(TEXTS, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {n: enc[n].astype(np.int64) for n in names}
    with torch.no_grad():
        ref = model(**{n: torch.from_numpy(v) for n, v in feeds.items()}).logits.numpy()
    return ref, session.run(None, feeds)[0], names


@pytest.fixture(scope="module")
def bert_export(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportReport]:
    """One full default export (fused + dynamic INT8 + FP16) of the tiny BERT, gated on --eval."""
    out = tmp_path_factory.mktemp("bert_export") / "export"
    return out, export(ExportArgs(tiny_bert, out, eval_file=sentiment_csv[1], fp16=True))


def test_fp32_parity_bert(tiny_bert: Path, bert_export: tuple[Path, ExportReport]) -> None:
    out, report = bert_export
    ref, got, names = torch_and_onnx(tiny_bert, out / "model.onnx")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert names == ["input_ids", "attention_mask", "token_type_ids"] == report.input_names


def test_fused_parity_and_fusion(tiny_bert: Path, bert_export: tuple[Path, ExportReport]) -> None:
    out, report = bert_export
    ref, got, _ = torch_and_onnx(tiny_bert, out / "model-fused.onnx")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    ops = {n.op_type for n in onnx.load(str(out / "model-fused.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    fused = report.artifact("fused")
    assert fused is not None and fused.passed and "Attention x2" in fused.notes


def test_int8_agreement_and_report(tiny_bert: Path, bert_export: tuple[Path, ExportReport]) -> None:
    out, report = bert_export
    ref, got, _ = torch_and_onnx(tiny_bert, out / "model-int8.onnx")
    assert np.abs(got - ref).max() < INT8_ATOL
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    int8 = report.artifact("int8")
    assert int8 is not None and int8.passed and int8.quantization is not None
    assert int8.label_agreement >= 0.995 and int8.metric is not None
    assert int8.metric.name == "accuracy" and int8.metric.drop_points <= 0.5
    # Every candidate is validated; only a batch-invariant one can pass the default gate.
    assert [t.candidate for t in report.int8_search][:3] == [c.label() for c in q.candidates(q.Int8Config())]
    assert int8.quantization["batch_invariant"] and int8.batch_invariance is not None
    assert int8.batch_invariance.passed and int8.batch_invariance.max_prob_diff <= 1e-5
    # Chosen by measurement: the recommended artifact is the passer with the lowest timed cost.
    passed = [a for a in report.artifacts if a.passed and a.cost_ms is not None]
    assert report.recommended == min(passed, key=lambda a: a.cost_ms or 0.0).name
    assert set(int8.timings_ms) == set(report.targets) and len(report.targets) == 2
    saved = json.loads((out / "export-report.json").read_text())
    assert saved["recommended"] == report.recommended and set(saved["cpu"]) >= {"model", "avx2", "avx512_vnni"}
    assert saved["artifacts"][0]["validated_on"]["avx512_vnni"] in (True, False)
    # and bf16-openvino where OpenVINO runs bf16 (tests/test_bf16.py)
    assert {a["name"] for a in saved["artifacts"]} - {"bf16-openvino"} == {"fp32", "fused", "int8", "fp16"}
    for name in ("tokenizer.json", "config.json", "bertedge.json"):
        assert (out / name).is_file()
    assert json.loads((out / "bertedge.json").read_text())["labels"] == ["negative", "positive"]
    assert not list(out.parent.glob(".export.*"))  # the temp build folder is gone


def test_fp16_without_cuda_is_not_claimed_validated(bert_export: tuple[Path, ExportReport]) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA present: test_fp16_on_cuda covers it")
    fp16 = bert_export[1].artifact("fp16")
    assert fp16 is not None and (bert_export[0] / "model-fp16.onnx").is_file()
    assert not fp16.validated and not fp16.passed and fp16.notes.startswith("not validated: no CUDA provider")


@pytest.mark.gpu
def test_fp16_on_cuda(tiny_bert: Path, tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    report = export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.NONE, fp16=True))
    fp16 = report.artifact("fp16")
    assert fp16 is not None and fp16.validated and fp16.passed


def test_distilbert_has_no_token_type_ids(tiny_distilbert: Path, tmp_path: Path) -> None:
    report = export(ExportArgs(tiny_distilbert, tmp_path / "out", quantize=Quantization.NONE))
    for file in ("model.onnx", "model-fused.onnx"):
        ref, got, names = torch_and_onnx(tiny_distilbert, tmp_path / "out" / file)
        assert names == ["input_ids", "attention_mask"]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert report.recommended in ("fused", "fp32") and report.int8_search == []


NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC")


@pytest.mark.parametrize("task", ["ner", "qa"])
def test_per_token_tasks_export_generically(task: str, tmp_path: Path) -> None:
    """NER and QA go through the same code: per-token axes, masked comparison, task metric."""
    labels = NER_LABELS if task == "ner" else ("negative", "positive")
    model = make_tiny_model(tmp_path / "model", task=task, labels=labels)
    rows: list[dict[str, object]]
    if task == "ner":
        rows = [{"tokens": ["john", "smith", "lives", "in", "paris"],
                 "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]}] * 6
    else:
        context = "john smith lives in paris and works at acme corp"
        rows = [{"question": "where does john live ?", "context": context,
                 "answers": {"text": ["paris"], "answer_start": [context.index("paris")]}}] * 6
    data = write_jsonl(tmp_path / f"{task}.jsonl", rows)
    report = export(ExportArgs(model, tmp_path / "out", eval_file=data))
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert all(o.shape[:2] == ["batch", "sequence"] for o in session.get_outputs())
    for a in report.artifacts:
        assert a.validated and a.metric is not None and a.metric.name == "f1"
    assert report.artifact("fused").passed  # type: ignore[union-attr]
    int8 = report.artifact("int8")
    assert int8 is not None and int8.passed and int8.batch_invariance is not None and int8.batch_invariance.passed
    assert report.recommended in ("int8", "fused", "fp32")


def test_impossible_budget_tries_every_mitigation(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    """A budget of -1 point cannot be met: export still succeeds, INT8 is marked failed, and the
    sensitivity search tried keeping the most error-prone nodes in fp32 (1, 2, 4, ... of them)."""
    report = export(ExportArgs(tiny_bert, tmp_path / "out", eval_file=sentiment_csv[1], max_accuracy_drop=-1,
                               max_fp32_nodes=2))
    tried = [t.candidate for t in report.int8_search]
    ladder = q.distinct(q.candidates(q.Int8Config()), onnx.load(str(tmp_path / "out" / "model-fused.onnx")))
    assert tried[:3] == [c.label() for c in ladder]
    assert tried[3:] == ["dynamic per-channel ops=MatMul fp32-nodes=1 per-token",
                         "dynamic per-channel ops=MatMul fp32-nodes=2 per-token"]
    ranked = [r.node for r in report.sensitivity]
    assert report.int8_search[4].recipe["fp32_nodes"] == ranked[:2]
    assert abs(sum(r.share for r in report.sensitivity) - 1.0) < 1e-6
    int8 = report.artifact("int8")
    assert int8 is not None and not int8.passed and "failed budget" in int8.notes
    assert report.recommended in ("fused", "fp32")
    assert any("recommended falls back to" in w for w in report.warnings)


def test_sensitivity_probing_has_a_time_cap(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """--sensitivity-seconds 0 probes one node (the last one the recipe quantizes) and says so."""
    report = export(ExportArgs(tiny_bert, tmp_path / "out", eval_file=sentiment_csv[1], max_accuracy_drop=-1,
                               max_fp32_nodes=1, sensitivity_seconds=0.0, openvino="off"))
    assert len(report.sensitivity) == 1
    total = int(report.sensitivity[0].probed.split(" of ")[1])
    assert report.sensitivity[0].probed == f"1 of {total}" and total > 1
    with pytest.raises(BertedgeError, match="--sensitivity-seconds"):
        ExportArgs(tiny_bert, tmp_path / "x", sensitivity_seconds=-1)


def test_require_int8_fails_and_leaves_no_folder(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(BertedgeError, match="no INT8 candidate met the budget"):
        export(ExportArgs(tiny_bert, tmp_path / "out", min_agreement=1.0, max_accuracy_drop=-1,
                          eval_file=write_csv(tmp_path / "e.csv", sentiment_rows(8)), require_int8=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.csv"]


def test_search_all_keeps_fastest_passer(tiny_bert: Path, tmp_path: Path) -> None:
    """Without --eval the gate is agreement on real inputs (built-in sentences here)."""
    report = export(ExportArgs(tiny_bert, tmp_path / "out", search_all=True, min_agreement=0.5,
                               batch_invariance=False, timing_rounds=0))
    assert len(report.int8_search) >= 4 and report.sensitivity  # --search-all runs the sensitivity search too
    fastest = min(t.cost_ms or 0.0 for t in report.int8_search if t.passed)
    int8 = report.artifact("int8")
    assert int8 is not None and int8.cost_ms == fastest
    assert "agreement with PyTorch >= 0.5" in report.gate and "built-in" in report.validation_inputs
    assert not list((tmp_path / "out").glob("*candidate*"))


def test_static_qdq_with_calibration(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    report = export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.STATIC,
                               optimization=Optimization.NONE, calibration=sentiment_csv[0], calibration_rows=40))
    static = report.artifact("int8-static")
    assert static is not None and static.passed and static.quantization is not None
    assert static.quantization["format"] == "QDQ" and static.max_abs_diff_real is not None
    assert static.max_abs_diff_real < INT8_ATOL
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model-int8-static.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert static.batch_invariance is not None and static.batch_invariance.passed
    assert report.recommended in ("int8-static", "fp32") and "rows of" in report.validation_inputs
    assert report.int8_search[0].candidate == "static ops=MatMul minmax"  # passes the invariance gate


def test_agreement_also_counts_unlabelled_texts_but_not_the_calibration_rows(
        tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """--agreement-data sharpens the agreement budget: eval rows + unlabelled rows, never the
    rows calibration drew from the same file."""
    train, dev = sentiment_csv
    report = export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.NONE, optimization=Optimization.NONE,
                               eval_file=dev, calibration=train, calibration_rows=40, agreement_data=train,
                               agreement_rows=1000))
    fp32 = report.artifact("fp32")
    assert fp32 is not None and fp32.passed and fp32.answers_compared == 60 + 200 - 40
    assert fp32.answers_changed == 0 and "160 unlabelled rows of" in report.validation_inputs
    with pytest.raises(BertedgeError, match="calibration uses all its 200 rows"):
        export(ExportArgs(tiny_bert, tmp_path / "out2", quantize=Quantization.NONE, calibration=train,
                          calibration_rows=500, agreement_data=train))


def test_excluded_nodes_groups(bert_export: tuple[Path, ExportReport]) -> None:
    model = onnx.load(str(bert_export[0] / "model-fused.onnx"))
    head = q.excluded_nodes(model, [q.Keep.HEAD])
    assert head and all("classifier" in n or "pooler" in n for n in head)
    emb = q.excluded_nodes(model, [q.Keep.EMBEDDINGS])
    assert "EmbedLayerNormalization_0" in emb
    edges = q.excluded_nodes(model, [q.Keep.FIRST_LAST_LAYERS])
    assert {"Attention_0", "Attention_1"} <= set(edges)  # 2 layers: both are first or last
    assert not any("classifier" in n for n in edges)


def test_distinct_drops_no_op_exclusions(bert_export: tuple[Path, ExportReport]) -> None:
    """The classifier is a Gemm, which dynamic quantization never touches: keeping it is a no-op."""
    model = onnx.load(str(bert_export[0] / "model-fused.onnx"))
    plain = q.Int8Config(per_channel=True)
    assert q.distinct([plain, q.Int8Config(per_channel=True, keep_fp32=(q.Keep.HEAD,))], model) == [plain]
    static = [c.label() for c in q.distinct(q.candidates(q.Int8Config(q.Method.STATIC)), model)]
    assert "static per-channel reduce-range keep-fp32=head minmax" in static


def test_per_token_comparison_ignores_padding() -> None:
    mask = np.array([[1, 1, 0]])
    ref = [{"logits": np.array([[[0.0, 1.0], [1.0, 0.0], [5.0, 0.0]]])}]
    got = [{"logits": np.array([[[0.0, 1.0], [1.0, 0.0], [0.0, 9.0]]])}]  # differs only at padding
    assert agreement_counts(ref, got, [{"attention_mask": mask}], per_token=True) == (2, 2)
    assert max_abs_diff(ref, got, [{"attention_mask": mask}], per_token=True) == 0.0
    assert agreement_counts(ref, got, [{"attention_mask": mask}], per_token=False) == (2, 3)


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_not_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertedgeError, match="not a model folder"):
        export(ExportArgs(tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny_bert: Path, tmp_path: Path) -> None:
    model = _broken_copy(tiny_bert, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BertedgeError, match="cannot load the weights"):
        export(ExportArgs(model, tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_unsupported_architecture_and_missing_tokenizer(tiny_bert: Path, tmp_path: Path) -> None:
    model = _broken_copy(tiny_bert, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(BertedgeError, match="model_type 'gpt2'.*not supported"):
        export(ExportArgs(model, tmp_path / "out"))
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").unlink()
    with pytest.raises(BertedgeError, match="no tokenizer.json"):
        export(ExportArgs(model, tmp_path / "out"))


def test_calibration_with_wrong_columns(tiny_bert: Path, tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "calib.csv", sentiment_rows(10), text_col="review")
    with pytest.raises(BertedgeError, match="no text column"):
        export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.STATIC, calibration=bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.csv"]


def test_bad_options_and_existing_out(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(BertedgeError, match="needs --calibration"):
        ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.STATIC)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(BertedgeError, match="already exists"):
        export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.NONE))
    export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.NONE, optimization=Optimization.NONE,
                      overwrite=True))
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.onnx").is_file()


def test_cli_export(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["export", str(tiny_bert), "--out", str(tmp_path / "out"),
                             "--eval", str(sentiment_csv[1]), "--max-eval-rows", "20"])
    assert ok.exit_code == 0, ok.output
    assert "recommended: " in ok.output and "INT8 candidates" in ok.output
    assert (tmp_path / "out" / "model-int8.onnx").is_file()
    strict = runner.invoke(cli, ["export", str(tiny_bert), "--out", str(tmp_path / "strict"),
                                 "--min-agreement", "1.0", "--max-accuracy-drop", "-1",
                                 "--eval", str(sentiment_csv[1]), "--require-int8"])
    assert strict.exit_code != 0 and "no INT8 candidate met the budget" in strict.output
    assert not (tmp_path / "strict").exists()
    bad = runner.invoke(cli, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and bad.output.count("\n") == 1 and "Error:" in bad.output


def test_int8_candidate_that_cannot_load_is_recorded_and_skipped(
        tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate that quantizes but writes a file onnxruntime cannot load does not abort export."""
    real = q.quantize

    def broken_first(src: Path, dst: Path, config: q.Int8Config, calibration: object = ()) -> None:
        if not config.per_channel:  # the first rung: plain dynamic
            dst.write_bytes(b"not an onnx graph")
            return
        real(src, dst, config, calibration)  # type: ignore[arg-type]

    monkeypatch.setattr(q, "quantize", broken_first)
    report = export(ExportArgs(tiny_bert, tmp_path / "out", eval_file=sentiment_csv[1]))
    first, second = report.int8_search[0], report.int8_search[1]
    assert first.candidate == "dynamic" and "cannot load or run" in str(first.error)
    assert not first.passed and second.error is None
    int8 = report.artifact("int8")
    assert int8 is not None and int8.passed and int8.quantization is not None and int8.quantization["per_channel"]
    assert not list((tmp_path / "out").glob("*candidate*"))


SIGTERM_SCRIPT = """
import sys
from pathlib import Path
from bertedge.toolchain.export import ExportArgs, export
export(ExportArgs(Path(sys.argv[1]), Path(sys.argv[2]), search_all=True, min_agreement=0.5))
"""


def test_sigterm_during_export_leaves_no_partial_folder(tiny_bert: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "work" / "out"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(tiny_bert), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".out.partial-*/model.onnx")) and proc.poll() is None:
        assert time.monotonic() < deadline, "export never started writing"
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0].decode()  # still exporting: the signal lands mid-work
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []


def test_unwritable_out_parent_fails_before_work(tiny_bert: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from bertedge.toolchain.export import stage

    monkeypatch.setattr(stage, "load_source", lambda *a: pytest.fail("work started"))
    with pytest.raises(BertedgeError, match="cannot write the export"):  # root cannot write /sys either
        export(ExportArgs(tiny_bert, Path("/sys/bertedge-test/out")))
    if os.geteuid() != 0:  # root ignores file modes
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(BertedgeError, match="cannot write the export"):
            export(ExportArgs(tiny_bert, ro / "out"))
    runner = CliRunner()
    bad = runner.invoke(cli, ["export", str(tiny_bert), "--out", "/sys/bertedge-test/out"])
    assert bad.exit_code != 0 and bad.output.count("\n") == 1 and "cannot write the export" in bad.output


def test_agreement_is_a_budget_with_and_without_eval() -> None:
    """An artifact within the metric budget still fails when it keeps too few of fp32's answers."""
    from bertedge.toolchain.export import ArtifactReport, BatchInvariance, Metric, Reference

    ref = Reference.__new__(Reference)
    ref.args = ExportArgs(Path("m"), Path("o"))  # defaults: drop <= 0.5 points, agreement >= 0.995
    report = ArtifactReport("int8", "f", "int8", "fused", label_agreement=0.99, answers_changed=9, answers_compared=900,
                            metric=Metric("accuracy", 0.9, 0.9, 0.0))
    ok, why = ref._gate(report, lossy=True)
    assert not ok and "agreement 0.9900 < 0.995 (9 of 900 answers changed; the budget allows 4)" in why
    report.metric = None  # no --eval: the same budget
    assert not ref._gate(report, lossy=True)[0]
    report.label_agreement = 0.996
    assert ref._gate(report, lossy=True) == (True, "")
    report.batch_invariance = BatchInvariance(8, 32, 64, max_prob_diff=3e-4, answers_changed=1, passed=False)
    ok, why = ref._gate(report, lossy=True)
    assert not ok and "not batch-invariant" in why


def test_qa_agreement_is_span_level() -> None:
    mask = np.ones((2, 4), dtype=np.int64)
    start = np.array([[0.0, 5.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    end = np.array([[0.0, 1.0, 5.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    moved = end.copy()
    moved[1] = [0.0, 0.0, 3.0, 0.0]  # row 1: same start, different end -> a different span
    ref = [{"start_logits": start, "end_logits": end}]
    got = [{"start_logits": start, "end_logits": moved}]
    assert agreement_counts(ref, got, [{"attention_mask": mask}], per_token=True) == (1, 2)


def _feeds(rows: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 60, (rows, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1:, seq // 2:] = 0  # ragged: padding the per-tensor scale would see
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_per_token_rewrite_is_batch_invariant(bert_export: tuple[Path, ExportReport], tmp_path: Path) -> None:
    """Plain dynamic INT8 answers a row differently in another batch; the per-token rewrite does not."""
    out = bert_export[0]
    unfused = tmp_path / "unfused.onnx"
    from bertedge.runtime.meta import read_model_meta
    from bertedge.toolchain.export import fuse_without_attention

    fuse_without_attention(read_model_meta(out), out / "model.onnx", unfused)
    plain, per_token = tmp_path / "plain.onnx", tmp_path / "per_token.onnx"
    q.quantize(unfused, plain, q.Int8Config(per_channel=True, operators=("MatMul",)))
    q.quantize(unfused, per_token, q.Int8Config(per_channel=True, operators=("MatMul",),
                                                activations=q.Activations.PER_TOKEN))
    ops = {n.op_type for n in onnx.load(str(per_token)).graph.node}
    assert "DynamicQuantizeLinear" not in ops and {"QuantizeLinear", "MatMulInteger"} <= ops
    batch = _feeds(8, 12, seed=0)
    alone = {k: v[:1, :12] for k, v in batch.items()}
    diffs = {}
    for path in (plain, per_token):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        in_batch = session.run(None, {n: batch[n] for n in names})[0][0]
        diffs[path.stem] = float(np.abs(session.run(None, {n: alone[n] for n in names})[0][0] - in_batch).max())
    assert diffs["plain"] > 1e-6 and diffs["per_token"] == 0.0
    with pytest.raises(ValueError, match="QAttention"):  # the fused Attention takes one scale per batch
        model = onnx.load(str(out / "model-int8.onnx"))
        q.quantize(out / "model-fused.onnx", tmp_path / "x.onnx", q.Int8Config(per_channel=True))
        q.per_token_activations(onnx.load(str(tmp_path / "x.onnx")))
    assert model is not None


def test_bundle_answers_a_text_the_same_in_any_batch(bert_export: tuple[Path, ExportReport], tmp_path: Path) -> None:
    """What export validated is what predict runs: the INT8 bundle, alone vs batched vs padded."""
    from bertedge.runtime.bundle import PackageArgs, package
    from bertedge.runtime.predictor import Predictor

    out = bert_export[0]
    bundle = package(PackageArgs(export_dir=out, out=tmp_path / "bundle", artifact="int8"))
    predictor = Predictor(bundle.root)
    rng = np.random.default_rng(1)
    words = ["good", "bad", "film", "plot", "dull", "superb", "the", "acting", "was", "very"]
    others = [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(31)]
    longest = " ".join(["the"] * 200)  # truncated to max_length: every batch mate is padded to it
    text = "the plot was very dull"
    alone = predictor.predict([text])[0]
    batched = predictor.predict([*others, text])[-1]
    padded = predictor.predict([text, longest])[0]
    for other in (batched, padded):
        assert other["label"] == alone["label"]
        for label, p in alone["probabilities"].items():
            assert abs(other["probabilities"][label] - p) <= 1e-5


def test_targets_are_timed_and_parsed(tiny_bert: Path, tmp_path: Path) -> None:
    from bertedge.toolchain.export import parse_targets

    assert parse_targets("") == () and parse_targets("1x8, 4X16") == ((1, 8), (4, 16))
    with pytest.raises(BertedgeError, match="BATCHxSEQUENCE"):
        parse_targets("32")
    report = export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.NONE, targets=((1, 8), (4, 16)),
                               timing_seconds=0.05))
    assert report.targets == ["1x8", "4x16"]
    assert all(set(a.timings_ms) == {"1x8", "4x16"} and a.cost_ms for a in report.artifacts)


def test_the_passers_are_timed_again_side_by_side(tiny_bert: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each artifact is first timed when built; the recommendation compares interleaved re-timings."""
    from bertedge.toolchain.export import gate

    calls: list[tuple[int, int]] = []

    def fake_time_run(run: Any, feeds: dict[str, Any], seconds: float) -> float:
        calls.append(feeds["input_ids"].shape)
        return float(len(calls))  # 1, 2, 3, ... in call order

    monkeypatch.setattr(gate, "time_run", fake_time_run)
    report = export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.NONE, targets=((1, 8), (4, 16)),
                               timing_rounds=2))
    assert [a.name for a in report.artifacts] == ["fp32", "fused"] and all(a.passed for a in report.artifacts)
    assert calls == [(1, 8), (4, 16)] * 6  # built: fp32, fused; round 1: fp32, fused; round 2: fused, fp32
    fp32, fused = report.artifact("fp32"), report.artifact("fused")
    assert fp32 is not None and fused is not None
    assert fp32.timings_ms == {"1x8": 8.0, "4x16": 9.0}  # medians of calls 5, 11 and 6, 12
    assert fused.timings_ms == {"1x8": 8.0, "4x16": 9.0}  # medians of calls 7, 9 and 8, 10


def test_bundle_records_validated_isa_and_warns_without_vnni(bert_export: tuple[Path, ExportReport], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from bertedge.runtime import bundle as bundle_module
    from bertedge.runtime.bundle import PackageArgs, isa_warning, package
    from bertedge.runtime.predictor import Predictor

    built = package(PackageArgs(export_dir=bert_export[0], out=tmp_path / "bundle", artifact="int8"))
    validated = built.manifest.provenance["artifact"]["validated_on"]
    assert {"model", "avx2", "avx512_vnni", "avx_vnni"} <= set(validated)
    vnni = {"precision": "int8", "provenance": {"artifact": {"validated_on": {"model": "x", "avx512_vnni": True}}}}
    assert "validated on a CPU with VNNI" in (isa_warning(vnni, {"avx2", "fma"}) or "")
    assert isa_warning(vnni, {"avx2", "avx512_vnni"}) is None
    assert isa_warning({**vnni, "precision": "fp32"}, {"avx2"}) is None
    if not validated["avx512_vnni"] and not validated["avx_vnni"]:
        pytest.skip("this CPU has no VNNI: nothing to warn about at load")
    monkeypatch.setattr(bundle_module, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.warns(RuntimeWarning, match="validated on a CPU with VNNI"):
        Predictor(built.root)


# ----------------------------------------------------------------------------- issue 24


def test_report_records_the_sha256_of_every_artifact_file(bert_export: tuple[Path, ExportReport]) -> None:
    """`package` can check that the files it ships are the ones export validated."""
    import hashlib

    out, report = bert_export
    saved = json.loads((out / "export-report.json").read_text())
    for a in saved["artifacts"]:
        if a["file"]:
            assert a["file"] in a["sha256"], a["name"]
        for name, digest in a["sha256"].items():
            assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    assert saved["metadata_sha256"]["tokenizer.json"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert report.artifact("int8").sha256 == {"model-int8.onnx": hashlib.sha256(  # type: ignore[union-attr]
        (out / "model-int8.onnx").read_bytes()).hexdigest()}


@pytest.mark.parametrize("option", ["max_accuracy_drop", "min_agreement", "atol", "invariance_tol", "timing_seconds",
                                    "sensitivity_seconds"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_float_options_are_refused(option: str, value: float) -> None:
    flag = "--" + option.replace("_", "-")
    with pytest.raises(BertedgeError, match=f"{flag} must be a finite number"):
        ExportArgs(Path("m"), Path("o"), **{option: value})  # type: ignore[arg-type]


def test_cli_refuses_nan_in_one_line(tiny_bert: Path, tmp_path: Path) -> None:
    for flag in ("--max-accuracy-drop", "--atol"):
        bad = CliRunner().invoke(cli, ["export", str(tiny_bert), "--out", str(tmp_path / "out"), flag, "nan"])
        assert bad.exit_code != 0 and bad.output.count("\n") == 1 and f"{flag} must be a finite number" in bad.output
    assert not (tmp_path / "out").exists()


def test_target_longer_than_the_position_table_is_refused_in_one_line(tiny_bert: Path, tmp_path: Path) -> None:
    bad = CliRunner().invoke(cli, ["export", str(tiny_bert), "--out", str(tmp_path / "out"), "--target", "1x100000"])
    assert bad.exit_code != 0 and bad.output.count("\n") == 1, bad.output
    assert "--target 1x100000 is longer than the model's 128 positions" in bad.output
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_bert: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from bertedge.toolchain.export import stage

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stage, "copy_metadata", full)
    with pytest.raises(BertedgeError, match=r"cannot write the export .*\(No space left on device\)"):
        export(ExportArgs(tiny_bert, tmp_path / "out", quantize=Quantization.NONE, optimization=Optimization.NONE,
                          timing_seconds=0.05, timing_rounds=0))
    assert list(tmp_path.iterdir()) == []  # no partial folder, no lock file
