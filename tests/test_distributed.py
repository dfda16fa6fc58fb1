"""bertedge predict --engine ray: Ray Data around the same Predictor, on a local 2-CPU Ray.

Three Ray jobs share one Ray instance (the session's, `test_matrix.ray_local`): mixed JSONL + CSV + Parquet input against
the local engine, the CLI route, and an actor killed mid-job. Tests that need Ray skip without it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_matrix import ray_local
from tiny import sentiment_rows, write_csv, write_jsonl

from bertedge.errors import BertedgeError
from bertedge.runtime.options import RuntimeOptions

__all__ = ["ray_local"]  # the shared session fixture, imported for pytest
ROWS = sentiment_rows(120, seed=3)


@pytest.fixture(scope="module")
def bundle(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pipeline on the tiny BERT: export (fp32 only) -> package."""
    from bertedge.runtime.bundle import PackageArgs, package
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    root = tmp_path_factory.mktemp("ray_bundle")
    export(ExportArgs(tiny_bert, root / "export", optimization=Optimization.NONE,
                      quantize=Quantization.NONE))
    return package(PackageArgs(root / "export", root / "bundle")).root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a.jsonl (ids, an empty and a non-UTF-8 line), b.csv (an empty text), c.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("ray_inputs")
    records: list[dict[str, object]] = [{"id": f"j{i}", "text": t} for i, (t, _) in enumerate(ROWS[:50])]
    records[7]["text"] = "   "
    path = write_jsonl(folder / "a.jsonl", records)
    with path.open("ab") as f:
        f.write(b'{"id": "j50", "text": "caf\xe9 \xff"}\n')  # latin-1 bytes: not UTF-8
    csv_rows = list(ROWS[50:90])
    csv_rows[3] = ("", 0)
    write_csv(folder / "b.csv", csv_rows)
    texts = [t for t, _ in ROWS[90:]] + [""]
    pq.write_table(pa.table({"id": list(range(100, 100 + len(texts))), "text": texts}),
                   folder / "c.parquet")
    return folder


def local_engine(bundle: Path, path: Path) -> list[dict[str, Any]]:
    """`--engine local` results for a file, through the runtime's own predict command."""
    from bertedge.runtime import PredictArgs, run_predict

    out = io.StringIO()
    run_predict(PredictArgs(bundle=bundle, input=path, report=False), out, io.StringIO())
    return [json.loads(line) for line in out.getvalue().splitlines()]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_import_wall() -> None:
    """Importing the module pulls in neither torch, transformers nor Ray (Ray loads per job)."""
    code = ("import sys, bertedge.edges.ray; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_options_are_listed_together(tmp_path: Path) -> None:
    from bertedge.edges.ray import DistributedArgs

    (tmp_path / "out.parquet").write_bytes(b"old")
    with pytest.raises(BertedgeError) as e:
        DistributedArgs(bundle=tmp_path / "nope", inputs=[str(tmp_path / "*.jsonl")],
                        output=tmp_path / "out.parquet", actors=0, threads_per_actor=0)
    message = str(e.value)
    assert "--actors must be at least 1" in message and "does not exist" in message
    assert "--threads-per-actor must be at least 1" in message and "matches no" in message
    assert "out.parquet' exists (pass --overwrite" in message
    with pytest.raises(BertedgeError, match="--top-k must be at least 1.*--aggregation must be one of"):
        RuntimeOptions(aggregation="bogus", top_k=0)  # the runtime's own options check themselves


def test_mixed_formats_match_local_engine(bundle: Path, inputs: Path, ray_local: Any,
                                          tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from bertedge.edges.ray import DistributedArgs, predict_dataset
    from bertedge.runtime import Predictor

    out = tmp_path / "preds.parquet"
    report = predict_dataset(DistributedArgs(bundle=bundle, inputs=[str(inputs)], output=out,
                                             actors=2, runtime=RuntimeOptions(batch_size=8), progress=False))
    files = sorted(str(p.resolve()) for p in inputs.iterdir())
    assert report.rows_in == 51 + 40 + 31 == report.rows_ok + report.rows_error
    assert report.rows_error == 4 and report.files == 3
    table = pq.read_table(out).to_pylist()
    assert [(r["file"], r["row"]) for r in table] == sorted((r["file"], r["row"]) for r in table)
    assert set(table[0]) >= {"file", "row", "line", "id", "label", "score", "probabilities", "truncated"}
    errors = read_jsonl(tmp_path / "preds.parquet.errors.jsonl")
    assert [(Path(e["file"]).name, e["line"], e["reason"]) for e in errors] == [
        ("a.jsonl", 8, "empty text"), ("a.jsonl", 51, "not valid UTF-8"),
        ("b.csv", 5, "empty text"), ("c.parquet", None, "empty text")]

    for name in ("a.jsonl", "b.csv"):
        local = local_engine(bundle, inputs / name)
        ours = {r["line"]: r for r in table if r["file"] == files[["a.jsonl", "b.csv"].index(name)]}
        bad = {e["line"]: e["reason"] for e in errors if e["file"].endswith(name)}
        assert len(local) == len(ours) + len(bad)
        for want in local:
            if "error" in want:
                assert bad[want["line"]] == want["error"]
            else:
                got = ours[want["line"]]
                assert got["label"] == want["label"]
                assert got["score"] == pytest.approx(want["score"], abs=1e-6)
    jsonl_ids = [r["id"] for r in table if r["file"] == files[0]]
    assert jsonl_ids[:3] == ["j0", "j1", "j2"]  # the id column is kept

    parquet_rows = [r for r in table if r["file"] == files[2]]
    want = Predictor(bundle).predict([t for t, _ in ROWS[90:]])
    assert [r["label"] for r in parquet_rows] == [w["label"] for w in want]
    assert [r["id"] for r in parquet_rows] == [str(i) for i in range(100, 130)]


def test_cli_engine_ray_matches_engine_local(bundle: Path, inputs: Path, ray_local: Any,
                                             tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bertedge.cli import cli

    runner = CliRunner()
    local = runner.invoke(cli, ["predict", str(bundle), "--input", str(inputs / "b.csv"), "-q"])
    assert local.exit_code == 0, local.output
    out = tmp_path / "preds.jsonl"
    ray = runner.invoke(cli, ["predict", str(bundle), "--engine", "ray", "--input", str(inputs / "b.csv"),
                              "--out", str(out), "--actors", "1", "--threads-per-actor", "1"])
    assert ray.exit_code == 0, ray.output
    assert "40 rows in = 39 predicted + 1 error row(s)" in ray.output
    want = [json.loads(line) for line in local.stdout.splitlines()]
    got = {r["line"]: r for r in read_jsonl(out)}
    assert [w["label"] for w in want if "label" in w] == [got[w["line"]]["label"] for w in want
                                                           if "label" in w]
    assert [r["id"] for r in read_jsonl(out)][:3] == [0, 1, 2]  # no id column: the row number
    assert read_jsonl(Path(f"{out}.errors.jsonl")) == [
        {"row": 3, "line": 5, "id": 3, "reason": "empty text"}]


def test_killed_actor_is_retried_and_output_complete(bundle: Path, ray_local: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from bertedge.edges.ray import (
        FAULT_MARKER_ENV,
        BundleTransport,
        DistributedArgs,
        predict_dataset,
    )
    from bertedge.runtime import Predictor

    rows = sentiment_rows(400, seed=5)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t, _ in rows])
    marker = tmp_path / "kill-me"
    marker.write_text("the first actor call to see this file deletes it and exits")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(marker))
    out = tmp_path / "preds.jsonl"
    report = predict_dataset(DistributedArgs(bundle=bundle, inputs=[str(path)], output=out, actors=2,
                                             runtime=RuntimeOptions(batch_size=8), progress=False,
                                             transport=BundleTransport.SHIP))  # restart re-fetches it
    assert not marker.exists()  # an actor really died
    got = read_jsonl(out)
    assert report.rows_in == report.rows_ok == len(got) == 400 and report.rows_error == 0
    assert [r["id"] for r in got] == list(range(400))
    want = Predictor(bundle).predict([t for t, _ in rows])
    assert [r["label"] for r in got] == [w["label"] for w in want]
    assert not Path(f"{out}.errors.jsonl").exists()
    assert report.transport == "ship"


def test_result_schema_comes_from_the_task(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No probe prediction: NER entities are list<struct> even when no row has one (a probe
    without entities gave list<null>), and a QA bundle has a schema at all (its probe failed)."""
    import pyarrow as pa
    from test_matrix import task_bundle

    from bertedge.edges.ray import result_schema, result_table
    from bertedge.runtime import Predictor

    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    schema = result_schema(Predictor(task_bundle(root, "ner")))
    entity = pa.struct([("type", pa.string()), ("start", pa.int64()), ("end", pa.int64()), ("text", pa.string()),
                        ("score", pa.float64())])
    assert schema.field("entities").type == pa.list_(entity)
    table = result_table([{"entities": [], "status": "ok"}, {"status": "error", "reason": "bad"}], schema)
    assert table.schema == schema and table.column("entities").to_pylist() == [[], None]
    qa = result_schema(Predictor(task_bundle(root, "qa"), top_k=2))
    assert {"answer", "start", "end", "score", "windows", "answers", "status"} <= set(qa.names)
    assert "answers" not in result_schema(Predictor(task_bundle(root, "qa"))).names
