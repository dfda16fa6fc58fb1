"""Property-based: hostile manifests, damaged archives and random request bodies.

Every outcome is a loaded bundle, a clean `BertedgeError` (one line) or an HTTP 4xx / 200;
never another exception and never a 500.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bertedge.edges.serve import ServeConfig, create_app
from bertedge.errors import BertedgeError
from bertedge.runtime import Predictor
from bertedge.runtime.artifacts import ARTIFACT_KINDS
from bertedge.runtime.bundle import ArchiveFormat, PackageArgs, package

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ["format", "format_version", "task", "labels", "max_length", "max_positions", "stride",
          "model_type", "inputs", "files", "precision", "provenance"]
LIMITS = ServeConfig(max_texts=8, max_chars=300, max_wait_ms=1)


@pytest.fixture(scope="module")
def export_dir(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    out = tmp_path_factory.mktemp("fuzz") / "export"
    export(ExportArgs(tiny_bert, out, optimization=Optimization.NONE, quantize=Quantization.NONE))
    return out


@pytest.fixture(scope="module")
def bundle(export_dir: Path) -> Path:
    return package(PackageArgs(export_dir, export_dir.parent / "bundle")).root


@pytest.fixture(scope="module")
def archives(export_dir: Path) -> dict[ArchiveFormat, bytes]:
    return {fmt: package(PackageArgs(export_dir, export_dir.parent / "b", archive=fmt)).root.read_bytes()
            for fmt in ArchiveFormat}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder each example empties and reuses (hypothesis runs many examples per test)."""
    yield tmp_path_factory.mktemp("scratch")


def loads_or_refuses_cleanly(path: Path) -> None:
    """Predictor(path) either loads and predicts, or raises one clean BertedgeError."""
    try:
        predictor = Predictor(path, threads=1)
    except BertedgeError as e:
        assert str(e) and "\n" not in str(e)
        return
    predictor.predict(["a good film"])


# ----------------------------------------------------------------------------- manifests


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=4),
       dropped=st.sets(st.sampled_from(FIELDS), max_size=2))
def test_random_manifest_fields(bundle: Path, scratch: Path, changes: dict[str, Any],
                                dropped: set[str]) -> None:
    copy = Path(tempfile.mkdtemp(dir=scratch))
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(bundle / name, copy / name)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    for key in dropped:
        manifest.pop(key, None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    loads_or_refuses_cleanly(copy)
    shutil.rmtree(copy)


SIZES = st.sampled_from([0, 1, 7, 8, 31, 32, 33, 127, 128, 129, 512, 10**30, -1, True]) | st.integers(-10, 10**6)
MUTATIONS = {  # values near every range's edges, names this bertedge does and does not know
    "task": st.sampled_from(["classification", "ner", "qa", "poetry", ""]) | JSON,
    "labels": st.lists(st.sampled_from(["negative", "positive", "a", "a", ""]), max_size=4) | JSON,
    "max_length": SIZES, "max_positions": SIZES, "stride": SIZES, "format_version": SIZES,
    "precision": st.sampled_from(["fp32", "fp16", "int8", "int3", None]) | JSON,
    "engine": st.sampled_from(["onnxruntime", "openvino", "tensorrt"]) | JSON,
    "artifact": st.sampled_from([*ARTIFACT_KINDS, "int9"]) | JSON,
    "model_type": st.sampled_from(["bert", "roberta", "distilbert", ""]) | JSON,
    "inputs": st.lists(st.sampled_from(["input_ids", "attention_mask", "x"]), max_size=3) | JSON,
}


@FUZZ
@given(changes=st.fixed_dictionaries({}, optional=MUTATIONS))  # type: ignore[arg-type]
def test_manifest_mutations_checked_against_the_graph(bundle: Path, scratch: Path, changes: dict[str, Any]) -> None:
    """Random field mutations of a real tiny bundle: a load that then predicts a window longer
    than the position table without an onnxruntime error, or one BertedgeError line."""
    copy = Path(tempfile.mkdtemp(dir=scratch))
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(bundle / name, copy / name)
    manifest = json.loads((bundle / "manifest.json").read_text()) | changes
    (copy / "manifest.json").write_text(json.dumps(manifest))
    try:
        predictor = Predictor(copy, threads=1)
    except BertedgeError as e:
        assert str(e) and "\n" not in str(e) and len(str(e)) < 2000
    else:
        predictor.predict(["a good film " * 100, ("what a story", "it was great " * 100)])
    shutil.rmtree(copy)


@FUZZ
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_random_manifest_documents(bundle: Path, scratch: Path, raw: bytes) -> None:
    copy = Path(tempfile.mkdtemp(dir=scratch))
    shutil.copy(bundle / "tokenizer.json", copy / "tokenizer.json")
    (copy / "manifest.json").write_bytes(raw)
    loads_or_refuses_cleanly(copy)
    shutil.rmtree(copy)


# ----------------------------------------------------------------------------- archives


@FUZZ
@given(fmt=st.sampled_from(list(ArchiveFormat)), cut=st.floats(0, 1), flips=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3))
def test_truncated_or_damaged_archives(archives: dict[ArchiveFormat, bytes], scratch: Path,
                                       fmt: ArchiveFormat, cut: float,
                                       flips: list[tuple[float, int]]) -> None:
    data = bytearray(archives[fmt][: int(len(archives[fmt]) * cut)])
    for where, mask in flips:
        if data:
            data[int(where * len(data))] ^= mask
    path = Path(tempfile.mkdtemp(dir=scratch)) / f"bundle.{fmt.value}"
    path.write_bytes(bytes(data))
    loads_or_refuses_cleanly(path)
    shutil.rmtree(path.parent)


# ----------------------------------------------------------------------------- request bodies


@pytest.fixture(scope="module")
def client(bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Predictor(bundle, threads=1), LIMITS)) as c:
        yield c


TEXT = st.text(max_size=40) | st.sampled_from(["", " ", "a good film", "x" * 301, "\ud800"])
ITEM = TEXT | st.lists(TEXT, max_size=3) | st.dictionaries(
    st.sampled_from(["text", "text_pair", "question", "context", "other"]), TEXT | JSON, max_size=3)


def assert_clean(response: Any) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code != 200:
        assert body["error"] and isinstance(body["problems"], list)
    else:
        assert len(body["predictions"]) >= 1


@FUZZ
@given(body=JSON | st.fixed_dictionaries({"texts": TEXT | st.lists(ITEM, max_size=10) | JSON}))
def test_random_json_bodies(client: TestClient, body: Any) -> None:
    raw = json.dumps(body).encode()  # json.dumps escapes lone surrogates as \ud800
    assert_clean(client.post("/v1/predict", content=raw, headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_bodies(client: TestClient, raw: bytes) -> None:
    assert_clean(client.post("/v1/predict", content=raw, headers={"content-type": "application/json"}))


@pytest.fixture(scope="module")
def qa_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A tiny QA bundle behind the app: long questions and odd contexts are the risky inputs."""
    from tiny import make_tiny_model

    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    base = tmp_path_factory.mktemp("fuzz-qa")
    model = make_tiny_model(base / "model", task="qa", labels=("start", "end"))
    export(ExportArgs(model, base / "export", optimization=Optimization.NONE, quantize=Quantization.NONE))
    predictor = Predictor(package(PackageArgs(base / "export", base / "bundle")).root, threads=1)
    with TestClient(create_app(predictor, LIMITS)) as c:
        yield c


WORDS = st.sampled_from(["who", "lives", "in", "paris", "john", "?", "the", "city", "x" * 30, "é", "\u200b"])
PHRASE = st.lists(WORDS, max_size=120).map(" ".join) | TEXT


@FUZZ
@given(items=st.lists(st.fixed_dictionaries({"question": PHRASE, "context": PHRASE})
                      | st.lists(PHRASE, min_size=1, max_size=2) | PHRASE, min_size=1, max_size=6))
def test_random_qa_requests(qa_client: TestClient, items: list[Any]) -> None:
    raw = json.dumps({"texts": items}).encode()  # escapes lone surrogates as \ud800
    assert_clean(qa_client.post("/v1/predict", content=raw, headers={"content-type": "application/json"}))
