"""Issue 24 on the predictor, `bertedge predict` and `bertedge serve`, one test per cause.

    #2   one failing inference no longer loses the run: the batch is retried row by row
    #6   NUL-, control- and zero-width-only texts are empty, like blank ones
    #7   stdout that cannot be written (/dev/full, a closed pipe) ends in one line; --out is atomic
    #11  NaN and infinity are refused for every float option
    #12  a JSON integer past Python's int-string limit is a 400, not a 500
    #17  pipes and devices are read as input; a folder is named as one
    #22  whole-body items and text-embeddings-inference's {"inputs": ...} on /predict
    #23  a sentence whose word yields no tokens is not "truncated" (fix in tasks/ner.py)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from test_bundle import hand_export

from bertedge.cli import cli
from bertedge.edges.serve import ServeConfig, create_app
from bertedge.errors import BertedgeError
from bertedge.runtime.bundle import PackageArgs, package
from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.predictor import INFERENCE_FAILED, Predictor

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ServeConfig(max_texts=8, max_chars=500, max_wait_ms=1)
EMPTY_LOOKING = ["\x00", "\x00\x00 \x00", "\x01\x02\x1f", "\u200b\ufeff", " \u200d\t"]


@pytest.fixture(scope="module")
def bundle(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick bundle of the tiny BERT classifier (hand-made export, max length 32)."""
    base = tmp_path_factory.mktemp("hardening")
    return package(PackageArgs(hand_export(tiny_bert, base / "export", "bert"), base / "bundle")).root


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> Predictor:
    return Predictor(bundle, RuntimeOptions(threads=1, batch_size=4))


@pytest.fixture
def client(predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(predictor, LIMITS)) as c:
        yield c


def poison(predictor: Predictor, monkeypatch: pytest.MonkeyPatch, word: str = "paris") -> None:
    """Make inference fail (as a broken kernel would) for every batch holding `word`'s token."""
    bad_id = predictor.tokenizer.token_to_id(word)
    real = Predictor.run_encodings

    def run(self: Predictor, encodings: Sequence[Any]) -> dict[str, np.ndarray]:
        if any(bad_id in e.ids for e in encodings):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code\n"
                               + "  a stack trace\n" * 40)
        return real(self, encodings)

    monkeypatch.setattr(Predictor, "run_encodings", run)


# ----------------------------------------------------------------------------- 2: containment


def test_a_failing_batch_is_retried_row_by_row(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    items = ["a good film", "john lives in paris", "dull plot", "superb", "paris", "boring"]
    clean = predictor.predict_isolated(items)
    poison(predictor, monkeypatch)
    got = predictor.predict_isolated(items)
    assert [i for i, r in enumerate(got) if "error" in r] == [1, 4]
    assert got[1]["error"].startswith(f"{INFERENCE_FAILED} (RuntimeError: [ONNXRuntimeError]")
    assert "\n" not in got[1]["error"]  # one line, not the engine's page of stack
    for i in (0, 2, 3, 5):
        assert got[i]["label"] == clean[i]["label"]
        assert got[i]["score"] == pytest.approx(clean[i]["score"], abs=1e-6)
    with pytest.raises(BertedgeError, match=r"2 bad input\(s\): item 1: inference failed"):
        predictor.predict(items)


def test_cli_predict_writes_every_row_then_fails_in_one_line(bundle: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "in.txt"
    path.write_text("a good film\njohn lives in paris\n\ndull plot\n", encoding="utf-8")
    poison(Predictor(bundle, RuntimeOptions(threads=1)), monkeypatch)
    result = CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(path), "-q"])
    assert result.exit_code == 1
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in out] == [1, 2, 3, 4]
    assert "label" in out[0] and "label" in out[3] and out[2]["error"] == "empty line"
    assert out[1]["error"].startswith(INFERENCE_FAILED)
    assert result.stderr.startswith("Error: 1 row(s) could not be predicted") and result.stderr.count("\n") == 1


def test_serve_inference_failure_is_a_500_for_that_request_alone(bundle: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor(bundle, RuntimeOptions(threads=1))
    with TestClient(create_app(predictor, LIMITS)) as client:
        poison(predictor, monkeypatch)
        bad = client.post("/v1/predict", json={"texts": ["fine", "paris"]})
        assert bad.status_code == 500 and INFERENCE_FAILED in bad.json()["error"]
        assert client.post("/v1/predict", json={"texts": ["fine"]}).status_code == 200


# ----------------------------------------------------------------------------- 6: text emptiness


def test_control_and_zero_width_texts_are_empty_everywhere(predictor: Predictor, client: TestClient,
                                                           bundle: Path, tmp_path: Path) -> None:
    for text in EMPTY_LOOKING:
        assert predictor.check(text) == "empty text", repr(text)
        assert predictor.check((text, "ok")) == "empty text"
    assert predictor.check(("ok", "\x00")) == "empty text_pair"
    assert [r.get("error") for r in predictor.predict_isolated(["ok", *EMPTY_LOOKING])] == [
        None, *["empty text"] * len(EMPTY_LOOKING)]
    r = client.post("/v1/predict", json={"texts": ["ok", *EMPTY_LOOKING]})
    assert r.status_code == 422
    assert [p["field"] for p in r.json()["problems"]] == [f"texts[{i}]" for i in range(1, 6)]
    r = client.post("/v1/predict", json={"texts": [["ok", "\u200b"]]})
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "texts[0].text_pair"
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ok", *EMPTY_LOOKING]), encoding="utf-8")
    result = CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(path), "-q"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert "label" in out[0] and all(o["error"] == "empty text" for o in out[1:])


# ----------------------------------------------------------------------------- 7: outputs


def test_predict_into_a_full_disk_is_one_line(bundle: Path) -> None:
    cmd = [sys.executable, "-m", "bertedge", "predict", str(bundle), "good film", "awful", "-q"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Error: cannot write the predictions to stdout (No space left on device)")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_closed_pipe_stops_quietly(bundle: Path) -> None:
    cmd = [sys.executable, "-m", "bertedge", "predict", str(bundle), "-q", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    def feed() -> None:
        try:
            stdin.write(b"good film\n" * 20_000)
            stdin.close()
        except BrokenPipeError:  # the predictor stopped reading: expected
            pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert json.loads(proc.stdout.readline())["line"] == 1
    proc.stdout.close()  # `| head -1`
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 1 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    feeder.join(10)


def test_predict_out_is_written_whole_or_not_at_all(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(cli, ["predict", str(bundle), "good film", "", "--out", str(out), "-q"])
    assert result.exit_code == 0 and result.stdout == ""
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]  # no partial or lock left
    again = CliRunner().invoke(cli, ["predict", str(bundle), "awful", "--out", str(out)])
    assert again.exit_code == 1 and "pass --overwrite" in again.output and len(out.read_text().splitlines()) == 2
    again = CliRunner().invoke(cli, ["predict", str(bundle), "awful", "--out", str(out), "--overwrite", "-q"])
    assert again.exit_code == 0 and len(out.read_text().splitlines()) == 1
    result = CliRunner().invoke(cli, ["predict", str(bundle), "x", "--out", "/proc/no/preds.jsonl"])
    assert result.exit_code == 1 and result.output.startswith("Error: cannot write the predictions")
    assert result.output.count("\n") == 1


# ----------------------------------------------------------------------------- 11: float options


@pytest.mark.parametrize("option", ["--request-timeout", "--max-wait-ms"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_options_refuse_nan_and_infinity(bundle: Path, option: str, value: str) -> None:
    result = CliRunner().invoke(cli, ["serve", str(bundle), option, value])
    assert result.exit_code == 1 and f"{option} must be a finite number" in result.output
    assert result.output.count("\n") == 1
    with pytest.raises(BertedgeError, match="--request-timeout must be a finite number"):
        ServeConfig(request_timeout_s=float(value))


# ----------------------------------------------------------------------------- 12: huge integers


@pytest.mark.parametrize("body", [b'{"texts": ["a"], "n": ' + b"9" * 5000 + b"}",
                                  b'{"texts": [' + b"1" * 4301 + b"]}",
                                  b'{"inputs": [[["x", ' + b"7" * 10_000 + b"]]]}"],
                         ids=["extra-field", "item", "nested"])
def test_a_huge_json_integer_is_a_400(client: TestClient, body: bytes) -> None:
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["problems"][0] == {"field": "body", "message": "number too long"}
    assert client.post("/v1/predict", json={"texts": ["still fine"]}).status_code == 200


# ----------------------------------------------------------------------------- 17: input kinds


def test_pipes_and_devices_are_read_and_folders_named(bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    null = runner.invoke(cli, ["predict", str(bundle), "-i", "/dev/null"])
    assert null.exit_code == 0 and null.stdout == "" and "no input rows" in null.stderr
    folder = runner.invoke(cli, ["predict", str(bundle), "-i", str(tmp_path)])
    assert folder.exit_code == 1 and "is a folder" in folder.output and folder.output.count("\n") == 1
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with fifo.open("w") as f:
            f.write("good film\nawful\n")

    writer = threading.Thread(target=feed)
    writer.start()
    piped = runner.invoke(cli, ["predict", str(bundle), "-i", str(fifo), "-q"])  # like -i <(...)
    writer.join(10)
    assert piped.exit_code == 0, piped.output
    assert [json.loads(line)["line"] for line in piped.stdout.splitlines()] == [1, 2]
    stdin = subprocess.run([sys.executable, "-m", "bertedge", "predict", str(bundle), "-i", "/dev/stdin", "-q"],
                           input=b"good film\nawful\nfine\n", capture_output=True, cwd=ROOT)
    assert stdin.returncode == 0, stdin.stderr
    assert len(stdin.stdout.splitlines()) == 3


# ----------------------------------------------------------------------------- 22: body forms


def test_whole_body_items_and_tei_inputs(client: TestClient, predictor: Predictor) -> None:
    pair = client.post("/v1/predict", json={"text": "is it good?", "text_pair": "it is superb"})
    assert pair.status_code == 200, pair.text
    assert pair.json()["predictions"][0]["label"] == predictor.predict([("is it good?", "it is superb")])[0]["label"]
    one = client.post("/predict", json={"inputs": "a good film"})
    assert one.status_code == 200 and len(one.json()["predictions"]) == 1
    many = client.post("/predict", json={"inputs": ["a good film", ["is it good?", "yes"]]})
    assert many.status_code == 200 and len(many.json()["predictions"]) == 2
    assert client.post("/predict", json={"inputs": "ok", "truncate": True}).status_code == 200
    refused = client.post("/predict", json={"inputs": "ok", "truncate": False})  # we always truncate
    assert refused.status_code == 422 and "truncate" in {p["field"] for p in refused.json()["problems"]}
    bad = client.post("/predict", json={"inputs": [5]})
    assert bad.status_code == 422 and bad.json()["problems"][0]["field"] == "texts[0]"


def test_whole_body_question_and_context(tmp_path_factory: pytest.TempPathFactory) -> None:
    from test_matrix import task_bundle

    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    qa = Predictor(task_bundle(root, "qa"), RuntimeOptions(threads=1))
    item = {"question": "where does john live?", "context": "john lives in paris"}
    with TestClient(create_app(qa, LIMITS)) as client:
        r = client.post("/v1/predict", json=item)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["answer"] == qa.predict([item])[0]["answer"]
        info = client.get("/v1/model").json()
        assert info["task"] == "qa" and list(info["model_files"]) == ["model.onnx"]


# ----------------------------------------------------------------------------- 23: NER truncation


def test_a_short_sentence_with_a_tokenless_word_is_not_truncated(tmp_path: Path) -> None:
    from tiny import make_tokenizer

    from bertedge.runtime.features import load_tokenizer
    from bertedge.runtime.tasks.ner import NerExamples, encode_words

    make_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    examples = NerExamples([["\u200b", "john"], ["john", "\xad"]], None, ["O"], "two-token sentences", [1, 2])
    assert encode_words(tokenizer, examples, 32).truncated == [False, False]
