"""Footprint: INT8 artifacts store the word-embedding table as int8 rows (a scale per token id),
and export reports each artifact's size, cold start and peak RSS (a fresh `Predictor` process)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bertedge.runtime.artifacts import artifact_kind
from bertedge.toolchain import quantize as q
from bertedge.toolchain.embeddings import SUFFIX, embedding_gathers, quantize_embeddings
from bertedge.toolchain.export import (
    ExportArgs,
    ExportReport,
    render,
)

WORD_TABLE = "model.bert.embeddings.word_embeddings.weight"


def feeds(rows: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids, the rows after the first padded from half-way (a batch the first row could be in)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 140, (rows, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1:, seq // 2:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def logits(path: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {i.name: batch[i.name] for i in session.get_inputs()})[0])


def tables(path: Path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def test_word_table_becomes_int8_rows_with_a_scale_each(cascade_export: tuple[Path, ExportReport],
                                                        tmp_path: Path) -> None:
    """Only the table input_ids indexes is rewritten; each row is its fp32 row within half a step;
    the file shrinks; answers stay close to the fp32 table's and ignore batch mates."""
    src = cascade_export[0] / "model.onnx"
    model = onnx.load(str(src))
    assert list(embedding_gathers(model)) == [WORD_TABLE]  # not the position or segment tables
    table = numpy_helper.to_array(tables(src)[WORD_TABLE])
    assert quantize_embeddings(model) == [WORD_TABLE]
    dst = tmp_path / "int8-words.onnx"
    onnx.save(model, str(dst))
    after = tables(dst)
    assert WORD_TABLE not in after and after[WORD_TABLE + SUFFIX].data_type == onnx.TensorProto.INT8
    rows = numpy_helper.to_array(after[WORD_TABLE + SUFFIX]).astype(np.float32)
    scales = numpy_helper.to_array(after[WORD_TABLE + "_int8_row_scales"])
    assert scales.shape == (table.shape[0], 1)
    assert np.all(np.abs(rows * scales - table) <= scales / 2 + 1e-7)
    for other in ("position_embeddings", "token_type_embeddings"):
        assert after[f"model.bert.embeddings.{other}.weight"].data_type == onnx.TensorProto.FLOAT
    assert dst.stat().st_size < src.stat().st_size - 2 * table.size
    batch = feeds(8, 12)
    ref, got = logits(src, batch), logits(dst, batch)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    alone = logits(dst, {k: v[:1, :12] for k, v in batch.items()})
    assert np.abs(alone[0] - got[0]).max() < 1e-6  # a gathered row depends on its token id alone
    assert quantize_embeddings(onnx.load(str(src)), keep_fp32={"/model/bert/embeddings/word_embeddings/Gather"}) == []


def test_every_onnxruntime_int8_recipe_stores_the_word_table_int8(cascade_export: tuple[Path, ExportReport],
                                                                 tmp_path: Path) -> None:
    """Dynamic per-token and static (the export's gated file) alike; a recipe can keep it fp32."""
    out, report = cascade_export
    static = report.artifact("int8-static")
    assert static is not None and static.passed and static.quantization is not None
    assert static.quantization["int8_embeddings"] and static.batch_invariance is not None
    assert static.batch_invariance.passed
    assert tables(out / "model-int8-static.onnx")[WORD_TABLE + SUFFIX].data_type == onnx.TensorProto.INT8
    per_token = q.Int8Config(per_channel=True, operators=("MatMul",), activations=q.Activations.PER_TOKEN)
    sizes = {}
    for name, config in (("int8", per_token), ("fp32", replace(per_token, int8_embeddings=False)),
                         ("kept", replace(per_token, keep_fp32=(q.Keep.EMBEDDINGS,)))):
        q.quantize(out / "model.onnx", tmp_path / f"{name}.onnx", config)
        sizes[name] = (tmp_path / f"{name}.onnx").stat().st_size
        assert (WORD_TABLE + SUFFIX in tables(tmp_path / f"{name}.onnx")) == (name == "int8")
    assert sizes["int8"] < sizes["fp32"] == sizes["kept"]
    assert replace(per_token, int8_embeddings=False).label().endswith("fp32-embeddings")
    batch = feeds(8, 12)
    ref, got = logits(tmp_path / "fp32.onnx", batch), logits(tmp_path / "int8.onnx", batch)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    alone = logits(tmp_path / "int8.onnx", {k: v[:1, :12] for k, v in batch.items()})
    assert np.abs(alone[0] - got[0]).max() == 0.0
    # the word Gather counts as quantized: keeping the embeddings in fp32 is a recipe of its own
    static_ladder = [c.label() for c in q.distinct(q.candidates(q.Int8Config(q.Method.STATIC, operators=("MatMul",))),
                                                   onnx.load(str(out / "model.onnx")))]
    assert any("keep-fp32=head+embeddings" in label for label in static_ladder)


def test_nncf_already_stores_openvino_embedding_tables_int8(cascade_export: tuple[Path, ExportReport],
                                                           tmp_path: Path) -> None:
    """Why the OpenVINO kinds need no rewrite: NNCF's static recipe and its weights-only rung both
    keep the word table as int8 (Constant i8 -> Convert -> Multiply by a scale per row)."""
    pytest.importorskip("nncf")
    ov = pytest.importorskip("openvino")
    from bertedge.toolchain import openvino_int8

    rows = [{k: v[i:i + 1, :8] for k, v in feeds(8, 8, seed=1).items()} for i in range(8)]
    for recipe in (openvino_int8.Recipe(8), openvino_int8.Recipe(weights_only=True)):
        xml = tmp_path / "ir.xml"
        openvino_int8.quantize(cascade_export[0] / "model.onnx", xml, rows, recipe)
        gather = next(op for op in ov.Core().read_model(str(xml)).get_ordered_ops()
                      if op.get_friendly_name() == "/model/bert/embeddings/word_embeddings/Gather")
        source = gather.input_value(0).get_node()
        while source.get_type_name() != "Constant":
            source = source.input_value(0).get_node()
        assert str(source.get_element_type()) == "<Type: 'int8_t'>", recipe.label()


def test_export_reports_cold_start_and_peak_rss_per_artifact(cascade_export: tuple[Path, ExportReport],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out, report = cascade_export
    measured = {a.name: a for a in report.artifacts if a.file and artifact_kind(a.name).cpu_candidate}
    assert {"fp32", "int8-static", "cascade"} <= set(measured), report.warnings
    for a in measured.values():
        assert a.cold_start_s is not None and 0 < a.cold_start_s < 120, a.name
        assert a.peak_rss_mb is not None and a.peak_rss_mb > 20, a.name
    cascade = measured["cascade"]
    assert cascade.cascade is not None
    first = measured[cascade.cascade.stages[0]["artifact"]]
    assert cascade.peak_rss_mb is not None and first.peak_rss_mb is not None
    assert cascade.peak_rss_mb >= first.peak_rss_mb  # its stages are loaded together
    saved = {a["name"]: a for a in json.loads((out / "export-report.json").read_text())["artifacts"]}
    assert saved["cascade"]["peak_rss_mb"] == cascade.peak_rss_mb and saved["fp32"]["cold_start_s"] > 0
    assert any("footprint" in str(getattr(t, "title", "")) for t in render(report))
    monkeypatch.setenv("BERTEDGE_FOOTPRINT", "0")  # as tests/conftest.py sets it: the other exports skip it
    assert not ExportArgs(Path("m"), Path("o")).footprint


def test_a_footprint_that_cannot_be_measured_is_a_warning(cascade_export: tuple[Path, ExportReport],
                                                          tmp_path: Path) -> None:
    from bertedge.runtime.meta import read_model_meta
    from bertedge.toolchain.export.footprint import measure_footprints

    out = tmp_path / "export"
    shutil.copytree(cascade_export[0], out)
    (out / "model.onnx").write_bytes(b"not a graph")  # its SHA-256 no longer matches the report
    report = copy.deepcopy(cascade_export[1])
    report.artifacts = [a for a in report.artifacts if a.name == "fp32"]
    fp32 = report.artifacts[0]
    fp32.cold_start_s = fp32.peak_rss_mb = None
    measure_footprints(ExportArgs(Path("m"), out, footprint=True), report, out, read_model_meta(out))
    assert fp32.cold_start_s is None and any(w.startswith("fp32: footprint not measured") for w in report.warnings)


def test_bench_sizes_what_a_backend_loads_every_stage_and_ir_weights(cascade_export: tuple[Path, ExportReport]) -> None:
    """bench's MB column: a cascade is its stages' files (its cascade.json is a few hundred bytes),
    an OpenVINO IR its .xml and .bin."""
    from bertedge.toolchain.bench import BenchArgs, bench

    out, report = cascade_export
    row = report.artifact("cascade")
    assert row is not None and row.cascade is not None
    names = ["cascade", *(k for k in ("int8-openvino",) if (out / artifact_kind(k).graph).is_file())]
    rep = bench(BenchArgs(out, backends=tuple(names), batch_sizes=(1,), seq_lens=(8,), runs=2, warmup=0, threads=1,
                          cold_start=False, plots=False))
    sizes = {b.name: b.size_mb for b in rep.backends}
    stage_files = [f for s in row.cascade.stages for f in s["files"]]
    assert sizes["cascade"] == pytest.approx(sum((out / f).stat().st_size for f in stage_files) / 1e6
                                             + (out / "cascade.json").stat().st_size / 1e6)
    if "int8-openvino" in sizes:
        assert sizes["int8-openvino"] == pytest.approx(sum((out / f).stat().st_size
                                                           for f in artifact_kind("int8-openvino").files) / 1e6)
