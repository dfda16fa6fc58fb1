"""The OpenVINO engine: NNCF INT8 built and validated by export, shipped in a bundle, run by Predictor.

Tiny random models; `make test` installs `bertedge[openvino]`, so these run there (they skip
only where the extra is absent, e.g. a runtime-only install).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import make_tiny_model, sentiment_rows, write_csv

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime import Predictor
from bertedge.runtime.artifacts import artifact_kind
from bertedge.runtime.bundle import PackageArgs, manifest_problems, package
from bertedge.runtime.sessions import OpenVINOSession, make_session
from bertedge.toolchain.export import ExportArgs, Optimization, export

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def ov_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(export folder with an int8-openvino artifact, eval csv) of a tiny BERT."""
    d = tmp_path_factory.mktemp("ov")
    model = make_tiny_model(d / "model", arch="bert")
    train = write_csv(d / "train.csv", sentiment_rows(120, seed=1))
    dev = write_csv(d / "dev.csv", sentiment_rows(48, seed=2))
    export(ExportArgs(model, d / "export", optimization=Optimization.NONE, eval_file=dev, calibration=train,
                      calibration_rows=60, max_accuracy_drop=100.0, min_agreement=0.8, sensitivity=False,
                      timing_seconds=0.1, threads=1))
    return d / "export", dev


def test_export_builds_validates_and_times_the_openvino_candidate(ov_export: tuple[Path, Path]) -> None:
    out, _ = ov_export
    report = json.loads((out / "export-report.json").read_text())
    ov = next(a for a in report["artifacts"] if a["name"] == "int8-openvino")
    assert ov["engine"] == "openvino" and ov["validated"] and ov["passed"], ov["notes"]
    assert ov["quantization"]["library"] == "nncf" and ov["quantization"]["openvino"]
    assert ov["batch_invariance"]["passed"]  # static scales: the same answer in any batch
    assert set(ov["timings_ms"]) == set(report["targets"]) and ov["cost_ms"] > 0
    assert (out / "model-int8-openvino.xml").is_file() and (out / "model-int8-openvino.bin").is_file()
    rows = [r for r in report["int8_search"] if r.get("library") == "nncf"]
    assert rows and rows[-1]["passed"]
    engines = {a["name"]: a["engine"] for a in report["artifacts"] if a["name"] != "cascade"}
    assert engines == {n: artifact_kind(n).engine for n in engines}  # bf16 kinds too, where the CPU runs bf16


def test_openvino_bundle_predicts_like_its_validation(ov_export: tuple[Path, Path], tmp_path: Path) -> None:
    out, dev = ov_export
    bundle = package(PackageArgs(export_dir=out, out=tmp_path / "bundle", artifact="int8-openvino"))
    assert bundle.manifest.engine == "openvino" and not manifest_problems(bundle.manifest)
    predictor = Predictor(tmp_path / "bundle", threads=1)
    assert isinstance(predictor.session, OpenVINOSession)
    assert predictor.describe()["engine"] == "openvino" and predictor.providers == ["OpenVINO:CPU"]
    texts = [line.split(",")[0] for line in dev.read_text().splitlines()[1:20]]
    one_by_one = [predictor.predict([t])[0] for t in texts]
    batched = predictor.predict(texts)
    assert [r["label"] for r in one_by_one] == [r["label"] for r in batched]
    for a, b in zip(one_by_one, batched, strict=True):
        assert abs(a["score"] - b["score"]) < 1e-5  # batch-invariant, as export checked
    fp32 = package(PackageArgs(export_dir=out, out=tmp_path / "fp32", artifact="fp32"))
    assert fp32.manifest.engine == "onnxruntime"
    agree = np.mean([a["label"] == b["label"] for a, b in zip(batched, Predictor(tmp_path / "fp32").predict(texts),
                                                              strict=True)])
    assert agree >= 0.8


def test_cli_predict_on_an_openvino_bundle(ov_export: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = ov_export
    runner = CliRunner()
    r = runner.invoke(cli, ["package", str(out), "--out", str(tmp_path / "b"), "--artifact", "int8-openvino"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["predict", str(tmp_path / "b")], input="a good film\na bad film\n")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and all("label" in x for x in lines)


def test_an_openvino_bundle_without_openvino_names_the_install(ov_export: tuple[Path, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = ov_export
    package(PackageArgs(export_dir=out, out=tmp_path / "b", artifact="int8-openvino"))
    monkeypatch.setitem(sys.modules, "openvino", None)  # as on a runtime-only install
    with pytest.raises(BertedgeError, match=r"pip install 'bertedge\[openvino\]'"):
        Predictor(tmp_path / "b")


def test_unknown_engine_is_a_manifest_problem() -> None:
    problems = manifest_problems({"engine": "tensorrt-llm"})
    assert any("engine 'tensorrt-llm' is not one this bertedge runs" in p for p in problems)
    assert not any("engine" in p for p in manifest_problems({"engine": "openvino"}))
    with pytest.raises(BertedgeError, match="unknown engine"):
        make_session(Path("x.onnx"), engine="tvm")


def test_openvino_off_and_without_calibration(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", arch="bert")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40, seed=1))
    off = export(ExportArgs(model, tmp_path / "off", optimization=Optimization.NONE, calibration=train,
                            openvino="off", sensitivity=False, timing_seconds=0.05))
    assert off.artifact("int8-openvino") is None
    bare = export(ExportArgs(model, tmp_path / "bare", optimization=Optimization.NONE, sensitivity=False,
                             timing_seconds=0.05))
    assert bare.artifact("int8-openvino") is None
    assert any("int8-openvino: not tried (needs --calibration" in w for w in bare.warnings)
    with pytest.raises(BertedgeError, match="--openvino on needs --calibration"):
        ExportArgs(model, tmp_path / "on", openvino="on")


def test_bench_times_the_openvino_backend(ov_export: tuple[Path, Path], tmp_path: Path) -> None:
    from bertedge.toolchain.bench import BenchArgs, bench

    out, dev = ov_export
    report = bench(BenchArgs(out, backends=("fp32", "int8-openvino"), batch_sizes=(1, 4), seq_lens=(16,), runs=3,
                             warmup=1, threads=1, data=dev, cold_start=True, cold_start_runs=1, plots=False))
    ov = report.backend("int8-openvino")
    assert ov is not None and ov.status == "ok", ov and ov.reason
    assert ov.providers_used == ["OpenVINO:CPU"] and ov.threads_used == 1 and ov.accuracy is not None
    assert ov.accuracy.agreement is not None and ov.accuracy.agreement >= 0.8 and ov.shapes
    assert ov.cold_start is not None, ov.cold_start_note


def test_the_ladder_keeps_attention_then_ffn_output_projections_then_sensitive_nodes(
        ov_export: tuple[Path, Path]) -> None:
    from bertedge.toolchain import openvino_int8 as ov

    src = ov_export[0] / "model.onnx"
    groups = ov.fp32_groups(src)
    attention, ffn = groups["attention products"], groups["FFN output projections"]
    assert len(ffn) == 2 and all("output/dense" in n and "attention" not in n for n in ffn)  # 2 layers
    assert len(attention) == 4 and all("attention/self" in n for n in attention)  # q x k and scores x v per layer
    ladder = ov.recipes(src, 50, ranked=["/extra/MatMul", ffn[0]], max_fp32_nodes=8)
    assert [r.fp32_nodes for r in ladder] == [(), tuple(attention), (*attention, *ffn),
                                              (*attention, *ffn, "/extra/MatMul"), ()]
    assert [r.weights_only for r in ladder] == [False, False, False, False, True]
    assert ladder[0].subset_size == 50 and "4 MatMuls kept fp32: attention products" in ladder[1].label()
    assert ladder[3].to_dict()["fp32_groups"] == ["attention products", "FFN output projections", "1 most sensitive"]
    assert ov.recipes(src, 500, max_fp32_nodes=0) == [ov.Recipe(300), ov.Recipe(weights_only=True)]
    other = ov.Recipe(50, smooth_quant=0.8)  # benchmarks/smoothquant_alpha.py's knob; the ladder keeps NNCF's
    assert "SmoothQuant alpha 0.8" in other.label() and "alpha" not in ladder[0].label()
    assert other.to_dict()["smooth_quant_alpha"] == 0.8 and ladder[0].to_dict()["smooth_quant_alpha"] == ov.NNCF_ALPHA


def test_serve_answers_from_an_openvino_bundle(ov_export: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bertedge.edges.serve import create_app

    package(PackageArgs(export_dir=ov_export[0], out=tmp_path / "b", artifact="int8-openvino"))
    with TestClient(create_app(tmp_path / "b")) as client:
        response = client.post("/v1/predict", json={"texts": ["a good film", "a bad film", "fine"]})
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 3
        assert client.get("/v1/model").json()["engine"] == "openvino"


@pytest.mark.parametrize("task", ["ner", "qa"])
def test_openvino_int8_for_token_and_span_tasks(task: str, tmp_path: Path) -> None:
    """NER (per-token logits) and QA (start/end logits) through the same candidate, bundle and runtime."""
    from test_matrix import GOOD, MAX_LENGTH, QA_CONTEXT, TASK_LABELS, check_result
    from tiny import write_jsonl

    from bertedge.runtime.data import Columns

    model = make_tiny_model(tmp_path / "model", arch="bert", task=task, labels=TASK_LABELS[task])
    meta = {"task": task, "labels": list(TASK_LABELS[task]), "max_length": MAX_LENGTH[task], "stride": 8}
    (model / "bertedge.json").write_text(json.dumps(meta), encoding="utf-8")
    if task == "ner":
        calibration = write_jsonl(tmp_path / "c.jsonl", [{"text": f"john smith lives in paris {i}"} for i in range(30)])
        columns = Columns()
    else:
        calibration = write_jsonl(tmp_path / "c.jsonl", [{"question": f"where does john live {i} ?",
                                                          "context": QA_CONTEXT} for i in range(30)])
        columns = Columns(text=("question",), text_pair=("context",))
    report = export(ExportArgs(model, tmp_path / "export", optimization=Optimization.NONE, calibration=calibration,
                               columns=columns, min_agreement=0.0, sensitivity=False, timing_seconds=0.05))
    ov = report.artifact("int8-openvino")
    assert ov is not None and ov.validated and ov.passed and ov.engine == "openvino", ov and ov.notes
    package(PackageArgs(export_dir=tmp_path / "export", out=tmp_path / "b", artifact="int8-openvino"))
    items = [r["text"] for r in GOOD[task]] if task == "ner" else [
        {"question": r["question"], "context": r["context"]} for r in GOOD[task]]
    results = Predictor(tmp_path / "b", threads=1).predict(items)
    assert len(results) == len(items)
    for r in results:
        check_result(task, r)


def test_weights_only_recipe_runs_close_to_fp32_and_batch_invariant(ov_export: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    from bertedge.toolchain import openvino_int8 as ov

    src = ov_export[0] / "model.onnx"
    ov.quantize(src, tmp_path / "w.xml", [], ov.Recipe(weights_only=True))
    session, ref = make_session(tmp_path / "w.xml", threads=1, engine="openvino"), make_session(src, threads=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 90, (4, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got, want = session.run(None, feeds)[0], ref.run(None, feeds)[0]
    assert np.abs(got - want).max() < 0.05
    alone = session.run(None, {k: v[2:3, :7] for k, v in feeds.items()})[0]
    assert np.abs(alone - got[2:3]).max() < 1e-5
