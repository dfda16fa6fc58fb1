"""Property-based `predict`: random bytes, random JSONL / CSV lines and random unicode in, exactly
one result or error record per input line (CSV: per row) out, and no exception escaping.

Local engine on every task's tiny bundle; `--engine ray` on a few examples in one Ray session,
checked against the local engine on the same file.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_matrix import TASKS, ray_local, task_bundle

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.predict import OutputFormat, format_result, predict_stream
from bertedge.runtime.predictor import Predictor
from bertedge.runtime.records import InputFormat, read_records

FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LINE_LIMIT = 256  # bytes per line in the fuzzed reader: exercises cut lines too

# Text with what breaks naive pipelines: lone surrogates, controls, combining marks, RTL, emoji.
nasty_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "e\u0301", "🙂" * 30, " ", "\ufeff", "\r"]),
)
utf8_text = nasty_text.filter(lambda t: not any("\ud800" <= ch <= "\udfff" for ch in t))  # a UTF-8 file cannot hold these
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | nasty_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
                           max_leaves=6)
json_record = st.fixed_dictionaries({}, optional={
    "id": st.integers() | nasty_text, "text": json_values, "text_pair": json_values, "question": json_values,
    "context": json_values}) | json_values
jsonl_line = st.one_of(json_record.map(json.dumps), nasty_text.map(lambda t: t.replace("\n", " ")),
                       st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ").decode("latin-1")))


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Predictor]:
    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    return {task: Predictor(task_bundle(root, task), threads=1, batch_size=4) for task in TASKS}


def physical_lines(data: bytes) -> int:
    """Lines as the reader counts them: each newline ends one, and a last unterminated one counts."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def run_local(predictor: Predictor, data: bytes, fmt: InputFormat) -> list[dict[str, Any]]:
    """The local engine on bytes, through the same reader, stream and writer as `bertedge predict`."""
    text_columns, pair_columns = predictor.task.columns(("text",), ())
    records = read_records(io.BytesIO(data), fmt, text_columns, pair_columns, LINE_LIMIT)
    out = [format_result(r, res, OutputFormat.JSONL) for r, res in predict_stream(predictor, records, window=8)]
    for line in out:
        line.encode("utf-8")  # every output line is writable to a UTF-8 stdout
    return [json.loads(line) for line in out]


def check_one_per_line(results: list[dict[str, Any]], n_lines: int) -> None:
    assert [r["line"] for r in results] == list(range(1, n_lines + 1))
    for r in results:
        assert ("error" in r) != any(k in r for k in ("label", "entities", "answer")), r


@FUZZ
@given(task=st.sampled_from(TASKS), data=st.binary(max_size=600), fmt=st.sampled_from([InputFormat.TXT,
                                                                                        InputFormat.JSONL]))
def test_random_bytes(predictors: dict[str, Predictor], task: str, data: bytes, fmt: InputFormat) -> None:
    check_one_per_line(run_local(predictors[task], data, fmt), physical_lines(data))


@FUZZ
@given(task=st.sampled_from(TASKS), lines=st.lists(jsonl_line, max_size=12))
def test_random_jsonl_lines(predictors: dict[str, Predictor], task: str, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    results = run_local(predictors[task], data, InputFormat.JSONL)
    check_one_per_line(results, len(lines))
    for line, result in zip(lines, results, strict=True):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        readable = len(line.encode("utf-8", "surrogatepass")) < LINE_LIMIT  # a cut line is not parsed
        if readable and isinstance(value, dict) and "id" in value and not (
                isinstance(value["id"], str) and "\\ud" in json.dumps(value["id"])):  # a lone surrogate id is an error
            assert result["id"] == value["id"]  # ids pass through unchanged


@FUZZ
@given(task=st.sampled_from(TASKS), rows=st.lists(st.tuples(utf8_text, utf8_text), max_size=10))
def test_random_csv_rows(predictors: dict[str, Predictor], task: str, rows: list[tuple[str, str]]) -> None:
    """Well-formed CSV (quoted by the csv module, newlines inside fields included): one record per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)  # a bare "\r" is not CSV
    writer.writerow(["id", "text", "question", "context"])
    for i, (a, b) in enumerate(rows):
        writer.writerow([i, a, a, b])
    data = buffer.getvalue().encode("utf-8")
    if any(len(line) >= LINE_LIMIT for line in data.split(b"\n")):  # a cut line is an error record: not this test
        return
    results = run_local(predictors[task], data, InputFormat.CSV)
    assert len(results) == len(rows)
    assert [r["id"] for r in results] == [str(i) for i in range(len(rows))]
    lines = [r["line"] for r in results]
    assert lines == sorted(lines) and len(set(lines)) == len(lines)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_csv_bytes(predictors: dict[str, Predictor], data: bytes) -> None:
    """Any bytes as CSV: ordered records or one clean error (a header without a text column)."""
    try:
        results = run_local(predictors["classification"], b"text\n" + data, InputFormat.CSV)
    except BertedgeError:
        return
    lines = [r["line"] for r in results]
    assert lines == sorted(lines) and len(set(lines)) == len(lines)
    assert all(2 <= n <= physical_lines(b"text\n" + data) for n in lines)


@settings(max_examples=5, deadline=None)
@given(data=st.binary(max_size=200), fmt=st.sampled_from(["txt", "jsonl", "csv"]))
def test_cli_never_shows_a_traceback(data: bytes, fmt: str) -> None:
    """The whole command on random bytes: exit 0 with records, or exit 1 with one line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"in.{fmt}"
        path.write_bytes(data)
        result = CliRunner().invoke(cli, ["predict", str(BUNDLES["classification"]), "-i", str(path), "-q"])
    assert result.exit_code in (0, 1), result.output
    if result.exit_code:
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    else:
        assert result.exception is None


BUNDLES: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def bundle_paths(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    BUNDLES.update({task: task_bundle(root, task) for task in TASKS})


# ----------------------------------------------------------------------------- Ray (one session: test_matrix.ray_local)

__all__ = ["ray_local"]  # the shared session fixture, imported for pytest


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(TASKS), lines=st.lists(jsonl_line, min_size=1, max_size=8))
def test_ray_matches_local_on_random_lines(predictors: dict[str, Predictor], ray_local: Any, task: str,
                                           lines: list[str]) -> None:
    from bertedge.edges.ray import DistributedArgs, predict_dataset

    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    local = run_local(predictors[task], data, InputFormat.JSONL)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(data)
        out = Path(tmp) / "out.jsonl"
        report = predict_dataset(DistributedArgs(bundle=BUNDLES[task], inputs=[str(path)], output=out, actors=1,
                                                 runtime=RuntimeOptions(batch_size=4), progress=False,
                                                 max_line_bytes=LINE_LIMIT))
        got = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
        errors_path = Path(f"{out}.errors.jsonl")
        errors = [json.loads(x) for x in errors_path.read_text(encoding="utf-8").splitlines()] if errors_path.exists() else []
    assert report.rows_in == len(lines) == report.rows_ok + report.rows_error
    assert [r["line"] for r in got] == [r["line"] for r in local if "error" not in r]
    assert [e["line"] for e in errors] == [r["line"] for r in local if "error" in r]
