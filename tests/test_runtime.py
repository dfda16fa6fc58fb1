"""The torch-free runtime: Predictor, input streams, the predict CLI and the dependency wall."""

from __future__ import annotations

import inspect
import io
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from test_bundle import LABELS, hand_export

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime.bundle import PackageArgs, package
from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.predict import predict_stream
from bertedge.runtime.predictor import LatencyRecorder, Predictor
from bertedge.runtime.records import InputFormat, read_lines, read_records
from bertedge.runtime.sessions import CPU, CUDA, make_session, resolve_providers

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a good film", "the plot was awful and very boring", "great", "the acting was dull " * 30,
         "john smith lives in paris", "superb lovely fun"]


@pytest.fixture(scope="session")
def exported(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real `bertedge export` of the tiny BERT (fp32, fused, INT8, validated)."""
    from bertedge.toolchain.export import ExportArgs, export

    out = tmp_path_factory.getbasetemp() / "real-export-bert"
    export(ExportArgs(model_dir=tiny_bert, out=out))
    return out


@pytest.fixture(scope="session")
def bundle(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick bundle of the tiny BERT (hand-made export, max length 32)."""
    export_dir = hand_export(tiny_bert, tmp_path_factory.getbasetemp() / "hand-export-bert", "bert")
    return package(PackageArgs(export_dir, tmp_path_factory.mktemp("rt") / "bundle")).root


@pytest.fixture(scope="session")
def predictor(bundle: Path) -> Predictor:
    return Predictor(bundle, RuntimeOptions(threads=1))


def torch_probabilities(model_dir: Path, items: list, max_length: int) -> np.ndarray:  # type: ignore[type-arg]
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    texts = [i if isinstance(i, str) else i[0] for i in items]
    pairs = [None if isinstance(i, str) else i[1] for i in items]
    accepted = inspect.signature(model.forward).parameters
    probs = []
    for text, pair in zip(texts, pairs, strict=True):  # one at a time: mixing pairs and singles
        enc = tok(text, pair, truncation=True, max_length=max_length, return_tensors="pt")
        feed = {k: v for k, v in enc.items() if k in accepted}  # DistilBERT takes no token_type_ids
        with torch.no_grad():
            probs.append(torch.softmax(model(**feed).logits.double(), -1)[0].numpy())
    return np.stack(probs)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_export_package_predict_matches_pytorch(exported: Path, tiny_bert: Path,
                                                           tmp_path: Path) -> None:
    items = [*TEXTS, ("is it good", "it is great"), ("the plot", "was awful " * 40)]
    want = torch_probabilities(tiny_bert, items, max_length=128)
    runner = CliRunner()
    fp32 = runner.invoke(cli, ["package", str(exported), "--out", str(tmp_path / "fp32"), "--artifact", "fp32"])
    assert fp32.exit_code == 0, fp32.output
    got = Predictor(tmp_path / "fp32").predict(items)
    got_probs = np.array([[r["probabilities"][lab] for lab in LABELS] for r in got])
    np.testing.assert_allclose(got_probs, want, atol=1e-5)
    assert [r["label"] for r in got] == [LABELS[i] for i in want.argmax(-1)]

    # The default: the recommended artifact (export picks the fastest passer, INT8 or fused on a
    # model this small, by measurement), through the CLI, from a .tar.gz.
    recommended = json.loads((exported / "export-report.json").read_text())["recommended"]
    packed = runner.invoke(cli, ["package", str(exported), "--out", str(tmp_path / "b.tar.gz")])
    assert packed.exit_code == 0 and f"packaged artifact '{recommended}'" in packed.output
    rows = "".join(json.dumps({"text": t} if isinstance(t, str) else {"text": t[0], "text_pair": t[1]}) + "\n"
                   for t in items)
    (tmp_path / "in.jsonl").write_text(rows)
    result = runner.invoke(cli, ["predict", str(tmp_path / "b.tar.gz"), "-i", str(tmp_path / "in.jsonl")])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in out] == list(range(1, len(items) + 1))
    agreement = np.mean([r["label"] == LABELS[i] for r, i in zip(out, want.argmax(-1), strict=True)])
    assert agreement >= 0.9
    assert "latency:" in result.stderr and "p99" in result.stderr


def test_distilbert_feed_has_no_token_type_ids(tiny_distilbert: Path, tmp_path: Path) -> None:
    export_dir = hand_export(tiny_distilbert, tmp_path / "export", "distilbert")
    p = Predictor(package(PackageArgs(export_dir, tmp_path / "b")).root)
    assert list(p.feeds) == ["input_ids", "attention_mask"]
    want = torch_probabilities(tiny_distilbert, TEXTS, max_length=32)
    got = np.array([[r["probabilities"][lab] for lab in LABELS] for r in p.predict(TEXTS)])
    np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- predictor


def test_results_keep_input_order_whatever_the_batching(predictor: Predictor) -> None:
    items = TEXTS * 3 + [("is it good", "it is great")]
    one_by_one = [predictor.predict([i])[0] for i in items]
    for batch_size in (1, 4, 64):
        batched = predictor.predict(items, batch_size=batch_size)
        assert [r["label"] for r in batched] == [r["label"] for r in one_by_one]
        np.testing.assert_allclose([r["score"] for r in batched], [r["score"] for r in one_by_one],
                                   atol=1e-6)


def test_result_shape_and_accepted_item_kinds(predictor: Predictor) -> None:
    r = predictor.predict(["good", ("good", "bad"), {"text": "good", "text_pair": "bad"}, ["good", "bad"]])
    assert set(r[0]) == {"label", "score", "probabilities"}
    assert r[0]["label"] in LABELS and sum(r[0]["probabilities"].values()) == pytest.approx(1.0)
    assert r[1] == r[2] == r[3]
    assert predictor.predict([]) == []


def test_truncation_is_flagged(predictor: Predictor) -> None:
    short, long = predictor.predict(["good film", "good film " * 50])
    assert "truncated" not in short and long["truncated"] is True
    huge = "great " * 500_000  # 3 MB: cut before tokenizing, so it stays fast
    t0 = time.perf_counter()
    assert predictor.predict([huge])[0]["truncated"] is True
    assert time.perf_counter() - t0 < 2


def test_options_and_their_shorthands(bundle: Path) -> None:
    p = Predictor(bundle, RuntimeOptions(threads=1, batch_size=8, top_k=3), batch_size=2)
    assert (p.runtime.threads, p.runtime.batch_size, p.runtime.top_k, p.batch_size) == (1, 2, 3, 2)
    assert p.runtime.session_threads == 1 and RuntimeOptions().session_threads is None  # 0: engine default
    with pytest.raises(BertedgeError, match="--batch-size must be at least 1"):
        Predictor(bundle, RuntimeOptions(), batch_size=0)


def test_predictor_facts_for_the_edges(predictor: Predictor) -> None:
    files = predictor.model_files()
    assert list(files) == ["model.onnx"] and len(files["model.onnx"]) == 64
    assert predictor.describe()["checksums"]["model.onnx"] == files["model.onnx"]
    assert predictor.task_name == "classification" and predictor.digest == predictor.describe()["digest"]
    assert predictor.check(predictor.example_item) == predictor.example_item
    short, long = predictor.count_tokens([("a good film", None), ("good " * 500, None)])
    assert short == 5 and long == predictor.max_length


def test_bad_items_fail_once_listing_all(predictor: Predictor) -> None:
    with pytest.raises(BertedgeError, match=r"2 bad input\(s\): item 1: empty text; item 3: a int"):
        predictor.predict(["ok", "  ", "fine", 3])  # type: ignore[list-item]


def test_concurrent_calls_give_the_same_answers(bundle: Path) -> None:
    p = Predictor(bundle, RuntimeOptions(threads=1))
    work = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
    expected = [p.predict(w) for w in work]
    timings = LatencyRecorder()
    failures: list[str] = []

    def worker(k: int) -> None:
        for _ in range(15):
            got = p.predict(work[k % len(work)], batch_size=2, timings=timings)
            want = expected[k % len(work)]
            if [g["label"] for g in got] != [w["label"] for w in want] or not np.allclose(
                    [g["score"] for g in got], [w["score"] for w in want], atol=1e-6):
                failures.append(f"thread {k}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert timings.report().items == 12 * 15 * len(TEXTS)


# ----------------------------------------------------------------------------- providers


def test_providers_resolution() -> None:
    assert resolve_providers(None, [CPU]) == [CPU]
    assert resolve_providers("auto", [CPU]) == [CPU]
    assert resolve_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers("cuda,cpu", [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers(["OpenVINOExecutionProvider"], ["OpenVINOExecutionProvider", CPU]) == [
        "OpenVINOExecutionProvider", CPU]
    with pytest.raises(BertedgeError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        resolve_providers(["cuda"], [CPU])


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA is available here")
def test_explicit_cuda_fails_fast_and_auto_uses_cpu(bundle: Path) -> None:
    with pytest.raises(BertedgeError, match="not available"):
        Predictor(bundle, RuntimeOptions(providers="cuda"))
    assert Predictor(bundle, RuntimeOptions(providers="auto")).providers == [CPU]


def test_silent_fallback_warns(bundle: Path) -> None:
    with pytest.warns(RuntimeWarning, match="could not use CUDAExecutionProvider and fell back"):
        make_session(bundle / "model.onnx", [CUDA, CPU], threads=1)


@pytest.mark.gpu
@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_cuda_predictor(bundle: Path, predictor: Predictor) -> None:
    p = Predictor(bundle, RuntimeOptions(providers="cuda"))
    assert p.providers[0] == CUDA
    assert [r["label"] for r in p.predict(TEXTS)] == [r["label"] for r in predictor.predict(TEXTS)]


# ----------------------------------------------------------------------------- dependency wall


def test_import_wall() -> None:
    code = ("import bertedge.runtime.predictor, bertedge.runtime.predict, bertedge.runtime.bundle, bertedge.runtime.meta, sys; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('torch', 'transformers'))]; "
            "assert 'onnxruntime' in sys.modules and 'tokenizers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_minimal_install_runs_a_bundle_and_the_cli(bundle: Path) -> None:
    """As after `pip install bertedge` without extras: importing torch / transformers fails."""
    code = f"""
import sys
for name in ("torch", "transformers", "onnx", "optimum"):
    sys.modules[name] = None  # `import torch` now raises ImportError, as if not installed
from bertedge.runtime import Predictor
assert Predictor({str(bundle)!r}).predict(["a good film"])[0]["label"]
from bertedge.cli import main
sys.argv = ["bertedge", "predict", {str(bundle)!r}, "a good film", "--quiet"]
main()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["line"] == 1


def test_core_dependencies_leave_out_the_build_stack() -> None:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("=")[0].split("<")[0].split(">")[0].strip().lower() for d in deps}
    assert {"onnxruntime", "tokenizers", "numpy"} <= names
    assert not names & {"torch", "transformers", "onnx", "optimum"}


# ----------------------------------------------------------------------------- input streams


def records(data: bytes, fmt: InputFormat, **kw) -> list[tuple]:  # type: ignore[no-untyped-def, type-arg]
    return [tuple(r)[:4] for r in read_records(io.BytesIO(data), fmt, **kw)]


def test_read_lines_decodes_each_line_on_its_own() -> None:
    data = "\ufeffhé\r\n\n".encode() + b"\xff\xfe\n" + "aéééé".encode() + b"\nlast1234"
    got = [tuple(x)[:3] for x in read_lines(io.BytesIO(data), max_line_bytes=8)]  # (number, text, cut)
    # 'aéééé' is 9 bytes: cut at 8, the half character is dropped rather than an error;
    # 'last1234' is exactly 8 bytes at the end of the file: complete, not cut
    assert got == [(1, "hé", False), (2, "", False), (3, None, False), (4, "aééé", True),
                   (5, "last1234", False)]
    assert [tuple(x)[:3] for x in read_lines(io.BytesIO(b"12345678\nnext"), 8)] == [
        (1, "12345678", False), (2, "next", False)]


def test_txt_records() -> None:
    got = records(b"good\n\n  \n\xffbad\nfine", InputFormat.TXT)
    assert got == [(1, ("good", None), None, False), (2, None, "empty line", False),
                   (3, None, "empty line", False), (4, None, "not valid UTF-8", False),
                   (5, ("fine", None), None, False)]


def test_jsonl_records() -> None:
    data = b'{"text": "a"}\n"bare"\n{"text": "q", "text_pair": "c"}\n{oops\n{"other": 1}\n{"text": 3}\n\n'
    got = records(data, InputFormat.JSONL)
    assert [g[1] for g in got] == [("a", None), ("bare", None), ("q", "c"), None, None, None, None]
    assert got[3][2].startswith("not valid JSON") and "no text field (has: other)" in got[4][2]
    assert got[5][2] == "text and text_pair must be strings" and got[6][2] == "empty line"
    assert records(b'{"premise": "p", "hyp": "h"}\n', InputFormat.JSONL, text_columns=["premise"],
                   pair_columns=["hyp"])[0][1] == ("p", "h")
    assert records(b'{"text": "' + b"x" * 50 + b'"}\n', InputFormat.JSONL,
                   max_line_bytes=20)[0][2] == "line is longer than 20 bytes"


def test_csv_records() -> None:
    data = (b'id,sentence,label\n1,"good, very good",1\n2,,0\n\n3,"two\nlines",1\n'
            b'\xff\xfe,x,1\n4,short\n5,fine,0\n')
    got = records(data, InputFormat.CSV, text_columns=["text", "sentence"])
    assert got == [(2, ("good, very good", None), None, False), (3, None, "empty text", False),
                   (4, None, "empty line", False), (6, ("two\nlines", None), None, False),
                   (7, None, "not valid UTF-8", False), (8, ("short", None), None, False),
                   (9, ("fine", None), None, False)]
    tsv = records(b"text\tpair\na\tb\n", InputFormat.TSV, pair_columns=["pair"])
    assert tsv == [(2, ("a", "b"), None, False)]
    with pytest.raises(BertedgeError, match="no column text / sentence.*columns: id, review"):
        records(b"id,review\n1,x\n", InputFormat.CSV, text_columns=["text", "sentence"])
    assert records(b"", InputFormat.CSV) == []


def rss_bytes() -> int:
    """Current resident set size (Linux); 0 where /proc is missing."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else 0


def test_100k_lines_stream_in_constant_memory(bundle: Path, tmp_path: Path) -> None:
    n, window = 100_000, 1024
    path = tmp_path / "big.txt"
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            out.write("\n" if i % 10_000 == 7 else ("good film\n", "awful\n", "dull plot\n")[i % 3])

    # The reader is a generator whose peak Python memory does not depend on the file size.
    with path.open("rb") as f:
        stream = read_records(f, InputFormat.TXT)
        assert isinstance(stream, types.GeneratorType)  # lazy: nothing read yet
        tracemalloc.start()
        assert sum(1 for _ in stream) == n
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1e6, f"reader peak {peak / 1e6:.1f} MB"

    # The whole pipeline holds at most one window of input and does not grow with the file.
    p = Predictor(bundle, RuntimeOptions(threads=1, batch_size=256))
    p.predict(["warm up the onnxruntime arena"] * 256)
    before = rss_bytes()
    with path.open("rb") as f:
        pulled = 0

        def counted():  # type: ignore[no-untyped-def]
            nonlocal pulled
            for record in read_records(f, InputFormat.TXT):
                pulled += 1
                yield record

        line = max_ahead = errors = 0
        for _record, result in predict_stream(p, counted(), window):
            line += 1
            assert result["line"] == line
            errors += "error" in result
            max_ahead = max(max_ahead, pulled - line)
    assert line == n and errors == 10
    assert max_ahead < window
    assert rss_bytes() - before < 40e6, f"RSS grew {(rss_bytes() - before) / 1e6:.0f} MB"


# ----------------------------------------------------------------------------- predict CLI


def test_cli_predict_file_with_bad_lines(bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"good film\n\n\xff\xfe oops\n" + b"awful " * 300 + b"\nlast one\n")
    result = CliRunner().invoke(cli, ["predict", str(bundle), "--input", str(path)])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in out] == [1, 2, 3, 4, 5]
    assert out[1] == {"line": 2, "error": "empty line"} and out[2] == {"line": 3, "error": "not valid UTF-8"}
    assert out[3]["truncated"] is True and out[0]["label"] in LABELS
    assert "3 predicted, 2 error record(s), 1 truncated to 32 tokens" in result.stderr
    assert "per batch p50" in result.stderr and "tokenize" in result.stderr


def test_cli_predict_stdin_args_table_and_quiet(bundle: Path) -> None:
    runner = CliRunner()
    piped = runner.invoke(cli, ["predict", str(bundle), "-q"], input="good film\nawful\n")
    assert piped.exit_code == 0 and len(piped.stdout.splitlines()) == 2 and piped.stderr == ""
    table = runner.invoke(cli, ["predict", str(bundle), "good film", "", "--output", "table"])
    assert table.exit_code == 0
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["line", "label", "score", "text"]
    assert rows[1].split()[0] == "1" and rows[1].endswith("good film")
    assert rows[2].split()[:2] == ["2", "ERROR"]
    empty = runner.invoke(cli, ["predict", str(bundle)], input="")
    assert empty.exit_code == 0 and empty.stdout == "" and "0 predicted" in empty.stderr


def test_cli_predict_huge_lines(bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "great " * 400_000}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    result = CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(path)])
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first == {"line": 1, "error": "line is longer than 1048576 bytes"}
    assert second["line"] == 2 and "label" in second
    txt = tmp_path / "huge.txt"
    txt.write_text("great " * 400_000 + "\nok\n")
    result = CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(txt), "-q"])
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["truncated"] is True and second["line"] == 2


def test_cli_predict_errors_are_one_line_and_non_zero(bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        ["predict", str(tmp_path / "missing")],
        ["predict", str(bundle), "--input", str(tmp_path / "nope.txt")],
        ["predict", str(bundle), "--providers", "cuda"] if CUDA not in ort.get_available_providers() else None,
        ["predict", str(bundle), "x", "--batch-size", "0"],
    ]
    (tmp_path / "in.csv").write_text("id,review\n1,good\n")
    cases.append(["predict", str(bundle), "-i", str(tmp_path / "in.csv")])
    for args in filter(None, cases):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output


def test_lone_surrogate_line_is_one_error_record(bundle: Path, tmp_path: Path) -> None:
    """A JSON escape of half a UTF-16 pair used to abort the run with no line written."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "good film"}\n{"text": "bad \\ud800"}\n{"id": "x\\udfff", "text": "ok"}\n'
                    '{"text": "awful"}\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(path), "-q"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in out] == [1, 2, 3, 4]
    assert "lone surrogate" in out[1]["error"] and "\\ud800" in out[1]["error"]
    assert "id holds a lone surrogate" in out[2]["error"]
    assert "label" in out[0] and "label" in out[3]


def test_csv_unterminated_quote_names_its_line_and_keeps_later_rows(bundle: Path, tmp_path: Path) -> None:
    """An open quote used to swallow every later row into one field: 3 rows in, 2 out, exit 0."""
    got = records(b'text,label\ngood film,1\n"awful,0\ngreat,1\n', InputFormat.CSV)
    assert [g[0] for g in got] == [2, 3, 4]
    assert got[0][1] == ("good film", None) and got[2][1] == ("great", None)
    assert got[1][1] is None and got[1][2].startswith("unterminated quote")
    # a bare carriage return inside a field (csv raised and aborted the run): an error record
    assert records(b"text\na\rb\nok\n", InputFormat.CSV) == [
        (2, None, "not valid CSV (new-line character seen in unquoted field - do you need to open the file "
                  "in universal-newline mode?)", False), (3, ("ok", None), None, False)]
    # a quoted field may still span lines
    assert records(b'text\n"two\nlines"\nnext\n', InputFormat.CSV) == [
        (3, ("two\nlines", None), None, False), (4, ("next", None), None, False)]
    path = tmp_path / "q.csv"
    path.write_bytes(b'text,label\ngood film,1\n"awful,0\ngreat,1\n')
    result = CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(path), "-q"])
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(out) == 3 and out[1]["line"] == 3 and "unterminated quote" in out[1]["error"]


def test_ids_pass_through_local_predict(bundle: Path, tmp_path: Path) -> None:
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"id": 7, "text": "good"}\n{"id": "a", "text": ""}\n{"text": "no id"}\n', encoding="utf-8")
    out = [json.loads(line) for line in CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(jl), "-q"]).stdout.splitlines()]
    assert out[0]["id"] == 7 and out[1] == {"line": 2, "id": "a", "error": "empty text"} and "id" not in out[2]
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("id,text\n0012,good\n13,\n", encoding="utf-8")
    out = [json.loads(line) for line in CliRunner().invoke(cli, ["predict", str(bundle), "-i", str(csv_path), "-q"]).stdout.splitlines()]
    assert [r["id"] for r in out] == ["0012", "13"]  # CSV ids are text, kept as written


def test_closed_stdin_and_stdout_are_one_line(bundle: Path) -> None:
    cmd = [sys.executable, "-m", "bertedge", "predict", str(bundle), "-q"]
    closed_in = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               preexec_fn=lambda: os.close(0))
    assert closed_in.returncode == 1 and closed_in.stderr.startswith("Error: stdin is closed"), closed_in.stderr
    assert closed_in.stderr.count("\n") == 1
    closed_out = subprocess.run([*cmd, "good film"], stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.close(1))
    assert closed_out.returncode == 1 and closed_out.stderr.startswith("Error: stdout is closed"), closed_out.stderr
    assert closed_out.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- per-item isolation


@pytest.fixture(scope="module")
def qa_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_matrix import task_bundle

    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    return task_bundle(root, "qa")


def test_qa_question_longer_than_a_window_is_a_clean_per_item_error(qa_bundle: Path) -> None:
    p = Predictor(qa_bundle, RuntimeOptions(threads=1))
    context = "john smith lives in paris and works at acme corp ."
    long_question = "who " * 40
    with pytest.raises(BertedgeError, match=r"item 1: the question .* tokens.*shorten the question to at most \d+ tokens"):
        p.predict([("where does john live ?", context), (long_question, context)])
    items: list[Any] = [("where does john live ?", context), (long_question, context), ("who ?", None),
                        {"question": "where ?", "context": context}]
    got = p.predict_isolated(items)
    assert "answer" in got[0] and "answer" in got[3]
    assert "shorten the question" in got[1]["error"] and got[2] == {"error": "a QA item needs a question and a context"}
    assert got[0] == p.predict([items[0]])[0]  # the bad neighbours changed nothing


def test_predict_stream_isolates_bad_items_in_a_window(qa_bundle: Path) -> None:
    from bertedge.runtime.records import InputRecord

    p = Predictor(qa_bundle, RuntimeOptions(threads=1))
    context = "john smith lives in paris ."
    recs = [InputRecord(1, ("where does john live ?", context)), InputRecord(2, ("who " * 40, context)),
            InputRecord(3, ("q", None)), InputRecord(4, ("who lives in paris ?", context), id=9)]
    out = [r for _, r in predict_stream(p, recs, window=8)]
    assert [r["line"] for r in out] == [1, 2, 3, 4] and ["error" in r for r in out] == [False, True, True, False]
    assert out[3]["id"] == 9


def test_max_length_beyond_positions_fails_at_load(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["max_positions"] = 16  # max_length is 32
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BertedgeError, match=r"max_length 32 .*outside \d+\.\.16"):
        Predictor(copy)


# ----------------------------------------------------------------------------- latency report


def test_latency_report_percentiles() -> None:
    rec = LatencyRecorder()
    for ms in range(1, 101):  # batches of 4 taking 1..100 ms
        rec.add(4, tokenize_s=ms / 4000, inference_s=ms / 2000, decode_s=ms / 4000)
    r = rec.report()
    assert (r.items, r.batches) == (400, 100)
    assert r.batch_p50_ms == pytest.approx(50, rel=0.02) and r.batch_p99_ms == pytest.approx(99, rel=0.02)
    assert r.item_p50_ms == pytest.approx(12.5, rel=0.02) and r.item_p90_ms == pytest.approx(22.5, rel=0.02)
    assert r.inference_s == pytest.approx(2 * r.tokenize_s) and r.throughput_items_s > 0
    assert "p50 50." in r.format() and "inference" in r.format()
    assert LatencyRecorder().report().format() == "latency: no items predicted"


def test_benchmark_script_runs_on_a_tiny_bundle(bundle: Path, tmp_path: Path) -> None:
    results = tmp_path / "runtime_latency.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "runtime_latency.py"), str(bundle),
                           "--warmup", "1", "--runs", "5", "--synthetic", "50", "--threads", "1",
                           "--results", str(results)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].strip().startswith("bundle:")  # settings first
    line = json.loads(results.read_text())
    assert line["short"]["p50_ms"] > 0 and line["long"]["tokens"] == 32 and line["throughput"]["lines"] == 50
