"""Every task through every edge: classification, NER and QA x local `predict`, `--engine ray`,
`serve` (TestClient), `bench --data` and `export --eval`, each with good and bad items, every
row accounted for (rows in = results + error records).

The bundles come from the real `bertedge export` (fp32 only) of tiny random models, built once
per session; `task_bundle` is imported by the other runtime test modules.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tiny import make_tiny_model, write_jsonl

from bertedge.cli import cli

NER_LABELS = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
TASK_LABELS = {"classification": ("negative", "positive"), "ner": NER_LABELS, "qa": ("start", "end")}
MAX_LENGTH = {"classification": 32, "ner": 32, "qa": 32}
QA_CONTEXT = "the film was good . john smith lives in paris and works at acme corp ."

# Per task: good items (JSONL records) and bad ones (each must give exactly one error record).
GOOD: dict[str, list[dict[str, Any]]] = {
    "classification": [{"id": 1, "text": "a good film"}, {"id": 2, "text": "the plot was awful"},
                       {"id": 3, "text": "great " * 40}],  # truncated, not an error
    "ner": [{"id": 1, "text": "john smith lives in paris ."}, {"id": 2, "text": "acme corp , in france"}],
    "qa": [{"id": 1, "question": "where does john live ?", "context": QA_CONTEXT},
           {"id": 2, "question": "who works at acme ?", "context": QA_CONTEXT * 6}],  # several windows
}
BAD: dict[str, list[dict[str, Any]]] = {
    "classification": [{"id": 10, "text": "   "}, {"id": 11, "text": "bad \ud800"}, {"id": 12, "other": "x"}],
    "ner": [{"id": 10, "text": ""}, {"id": 11, "text": "bad \ud800"}, {"id": 12, "text": 5}],
    "qa": [{"id": 10, "question": "where ?"},  # no context
           {"id": 11, "question": "who " * 40, "context": QA_CONTEXT},  # question longer than a window
           {"id": 12, "question": "bad \ud800", "context": QA_CONTEXT}],
}
TASKS = tuple(GOOD)


def task_bundle(root: Path, task: str) -> Path:
    """A bundle of a tiny random `task` model through the real export (fp32) and package; cached in root."""
    from bertedge.runtime.bundle import PackageArgs, package
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    bundle = root / f"bundle-{task}"
    if (bundle / "manifest.json").is_file():
        return bundle
    model = make_tiny_model(root / f"model-{task}", arch="bert", task=task, labels=TASK_LABELS[task])
    meta = {"task": task, "labels": list(TASK_LABELS[task]), "max_length": MAX_LENGTH[task], "stride": 8}
    (model / "bertedge.json").write_text(json.dumps(meta), encoding="utf-8")
    export(ExportArgs(model, root / f"export-{task}", optimization=Optimization.NONE, quantize=Quantization.NONE))
    return package(PackageArgs(root / f"export-{task}", bundle)).root


def input_lines(task: str) -> list[str]:
    """Good and bad records interleaved, plus a line that is not JSON at all."""
    good, bad = GOOD[task], BAD[task]
    lines = [json.dumps(r) for pair in zip(good, bad) for r in pair]
    lines += [json.dumps(r) for r in good[len(bad):] + bad[len(good):]]
    return [*lines, "{not json"]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    return {task: task_bundle(root, task) for task in TASKS}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("matrix-inputs")
    out = {}
    for task in TASKS:
        path = folder / f"{task}.jsonl"
        path.write_text("\n".join(input_lines(task)) + "\n", encoding="utf-8")
        out[task] = path
    return out


def check_result(task: str, record: dict[str, Any]) -> None:
    """A good item's result has the task's fields, with consistent values."""
    if task == "classification":
        assert record["label"] in TASK_LABELS[task] and 0.5 <= record["score"] <= 1.0
    elif task == "ner":
        assert isinstance(record["entities"], list)
        for e in record["entities"]:
            assert e["type"] in ("LOC", "PER") and e["start"] < e["end"]
    else:
        assert isinstance(record["answer"], str) and record["windows"] >= 1


def expected_errors(task: str) -> int:
    return len(BAD[task]) + 1  # the bad items and the line that is not JSON


# ----------------------------------------------------------------------------- local predict


@pytest.mark.parametrize("task", TASKS)
def test_local_predict(task: str, bundles: dict[str, Path], inputs: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["predict", str(bundles[task]), "-i", str(inputs[task]), "-q",
                                      "--top-k", "2", "--aggregation", "average"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    lines = input_lines(task)
    assert [r["line"] for r in out] == list(range(1, len(lines) + 1))  # rows in == rows out, in order
    errors = [r for r in out if "error" in r]
    assert len(errors) == expected_errors(task)
    sent = [json.loads(x) if x.startswith('{"') else None for x in lines]
    for record, given in zip(out, sent, strict=True):
        if given is not None:
            assert record["id"] == given["id"]  # ids pass through unchanged (ints stay ints)
        if "error" not in record:
            check_result(task, record)
    if task == "qa":
        assert all(len(r["answers"]) <= 2 for r in out if "answers" in r)
        long_question = next(r for r in out if r.get("id") == 11)
        assert "question" in long_question["error"] and "shorten the question" in long_question["error"]
    if task == "classification":
        assert next(r for r in out if r.get("id") == 3)["truncated"] is True


# ----------------------------------------------------------------------------- serve


@pytest.mark.parametrize("task", TASKS)
def test_serve(task: str, bundles: dict[str, Path]) -> None:
    """The HTTP edge on the same bundles: good items answer, a bad item is a 4xx, never a 500."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bertedge.edges.serve import create_app

    with TestClient(create_app(bundles[task])) as client:
        good = GOOD[task]
        items = [r["text"] for r in good] if task != "qa" else [
            {"question": r["question"], "context": r["context"]} for r in good]
        response = client.post("/v1/predict", json={"texts": items})
        assert response.status_code == 200, response.text
        body = response.json()
        predictions = body.get("predictions", body.get("results"))
        assert predictions is not None and len(predictions) == len(items)
        for p in predictions:
            check_result(task, p)
        bad = {"texts": ["   "]} if task != "qa" else {"texts": [{"question": "who " * 40, "context": QA_CONTEXT}]}
        response = client.post("/v1/predict", json=bad)
        assert 400 <= response.status_code < 500, response.text


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """One local Ray (2 CPUs) for every Ray test of the session (Ray takes seconds to start):
    started here unless one is already up, and shut down only by whoever started it."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_every_task(bundles: dict[str, Path], inputs: dict[str, Path], ray_local: Any,
                        tmp_path: Path) -> None:
    """`--engine ray` per task (one Ray session): same results and errors as the local engine."""
    from bertedge.edges.ray import DistributedArgs, predict_dataset
    from bertedge.runtime import PredictArgs, run_predict
    from bertedge.runtime.options import RuntimeOptions

    for task in TASKS:
        out = tmp_path / f"{task}.jsonl"
        report = predict_dataset(DistributedArgs(bundle=bundles[task], inputs=[str(inputs[task])], output=out,
                                                 actors=1, progress=False,
                                                 runtime=RuntimeOptions(batch_size=4, aggregation="average",
                                                                        top_k=2)))
        rows = len(input_lines(task))
        assert report.rows_in == rows == report.rows_ok + report.rows_error, task
        assert report.rows_error == expected_errors(task), task
        got = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
        errors = [json.loads(x) for x in Path(f"{out}.errors.jsonl").read_text(encoding="utf-8").splitlines()]
        import io

        local_out = io.StringIO()
        run_predict(PredictArgs(bundle=bundles[task], input=inputs[task], report=False,
                                runtime=RuntimeOptions(top_k=2, aggregation="average")), local_out, io.StringIO())
        local = [json.loads(x) for x in local_out.getvalue().splitlines()]
        assert [r["line"] for r in got] == [r["line"] for r in local if "error" not in r], task
        assert sorted(e["line"] for e in errors) == [r["line"] for r in local if "error" in r], task
        for mine, theirs in zip(got, [r for r in local if "error" not in r], strict=True):
            assert mine["id"] == theirs["id"] and isinstance(mine["id"], int)  # ints stay ints
            check_result(task, mine)
            if task == "ner":
                assert [(e["type"], e["start"], e["end"]) for e in mine["entities"]] == [
                    (e["type"], e["start"], e["end"]) for e in theirs["entities"]]
            elif task == "qa":
                assert (mine["start"], mine["end"]) == (theirs["start"], theirs["end"])
                assert len(mine["answers"]) == len(theirs["answers"])
            else:
                assert mine["label"] == theirs["label"]


def test_ray_corrupt_bundle_is_one_line(bundles: dict[str, Path], inputs: dict[str, Path],
                                        tmp_path: Path) -> None:
    """A damaged bundle fails on the driver, before Ray starts: one line, non-zero exit."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundles["classification"], broken)
    with (broken / "model.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    result = CliRunner().invoke(cli, ["predict", str(broken), "--engine", "ray", "-i",
                                      str(inputs["classification"]), "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "checksum" in result.output or "sha256" in result.output or "corrupt" in result.output


# ----------------------------------------------------------------------------- bench --data, export --eval


LABELLED_ROWS = {"classification": 4, "ner": 2, "qa": 2}


def labelled_files(folder: Path, task: str) -> Path:
    """A small labelled file in the task's training format, good rows only (the readers refuse
    bad rows loudly; that is tested with each reader)."""
    if task == "classification":
        path = folder / "cls.jsonl"
        return write_jsonl(path, [{"text": t, "label": lab} for t, lab in
                                  [("a good film", 1), ("awful plot", 0), ("great fun", 1), ("dull", 0)]])
    if task == "ner":
        path = folder / "ner.txt"
        sentences = [[("john", "B-PER"), ("lives", "O"), ("in", "O"), ("paris", "B-LOC")],
                     [("smith", "B-PER"), ("is", "O"), ("in", "O"), ("france", "B-LOC")]]
        path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in s) + "\n" for s in sentences), encoding="utf-8")
        return path
    path = folder / "qa.jsonl"
    start = QA_CONTEXT.index("paris")
    return write_jsonl(path, [{"id": "a", "question": "where does john live ?", "context": QA_CONTEXT,
                               "answers": {"text": ["paris"], "answer_start": [start]}},
                              {"id": "b", "question": "who lives in paris ?", "context": QA_CONTEXT,
                               "answers": {"text": ["john smith"], "answer_start": [QA_CONTEXT.index("john")]}}])


@pytest.mark.parametrize("task", TASKS)
def test_export_eval_and_bench_data(task: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    """export --eval scores every artifact on the task's metric; bench --data runs the same rows."""
    data = labelled_files(tmp_path, task)
    root = bundles[task].parent
    out = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export", str(root / f"model-{task}"), "--out", str(out), "--opt", "none",
                                      "--quantize", "none", "--eval", str(data)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export-report.json").read_text())
    fp32 = next(a for a in report["artifacts"] if a["name"] == "fp32")
    assert fp32["passed"] and fp32["metric"]["name"] == {"classification": "accuracy"}.get(task, "f1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"oops": 1}\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["export", str(root / f"model-{task}"), "--out", str(tmp_path / "x2"),
                                      "--opt", "none", "--quantize", "none", "--eval", str(bad)])
    assert result.exit_code != 0 and "Traceback" not in result.output  # a bad --eval file: one clean error

    result = CliRunner().invoke(cli, ["bench", str(out), "--backends", "fp32", "--batch-sizes", "1",
                                      "--seq-lens", "16", "--runs", "2", "--warmup", "1", "--no-cold-start",
                                      "--no-plots", "--data", str(data), "--out", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    onnx = next(b for b in json.loads((tmp_path / "bench" / "bench.json").read_text())["backends"] if b["name"] == "fp32")
    # bench reports classification as "accuracy" {rows, accuracy}, NER / QA as "task_metric" {examples, value}
    scored, value = ((onnx["accuracy"]["rows"], onnx["accuracy"]["accuracy"]) if task == "classification"
                     else (onnx["task_metric"]["examples"], onnx["task_metric"]["value"]))
    assert onnx["status"] == "ok" and scored == LABELLED_ROWS[task]  # every labelled row scored
    assert value == pytest.approx(fp32["metric"]["value"], abs=1e-6)  # the same rows, the same model
    result = CliRunner().invoke(cli, ["bench", str(out), "--backends", "fp32", "--batch-sizes", "1", "--seq-lens", "16",
                                      "--runs", "1", "--warmup", "0", "--no-cold-start", "--no-plots", "--data", str(bad),
                                      "--out", str(tmp_path / "bench-bad")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
