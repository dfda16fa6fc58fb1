"""bertedge serve: endpoints, bad input, the dynamic batcher, a real uvicorn, shutdown, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bertedge.cli import cli
from bertedge.edges.serve import (
    Batcher,
    Failed,
    Metrics,
    NotAccepting,
    Refused,
    ServeConfig,
    create_app,
)
from bertedge.errors import BertedgeError
from bertedge.runtime import Predictor
from bertedge.runtime.bundle import PackageArgs, package
from bertedge.runtime.options import RuntimeOptions

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["good", "bad", "film", "plot", "acting", "boring", "superb", "dull", "paris", "story"]
LIMITS = ServeConfig(max_texts=8, max_chars=500, max_wait_ms=2)


@pytest.fixture(scope="module")
def bundle(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT through the real pipeline: `export` (fp32 only) then `package`."""
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    base = tmp_path_factory.mktemp("serve")
    export(ExportArgs(tiny_bert, base / "export", optimization=Optimization.NONE, quantize=Quantization.NONE))
    return package(PackageArgs(base / "export", base / "bundle")).root


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> Predictor:
    return Predictor(bundle, RuntimeOptions(threads=1))


@pytest.fixture
def client(predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(predictor, LIMITS)) as c:
        yield c


def assert_same(got: Sequence[dict[str, Any]], want: Sequence[dict[str, Any]]) -> None:
    """Same labels and keys; probabilities equal up to float noise from different padding."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and g["label"] == w["label"]
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-6)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text output (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ----------------------------------------------------------------------------- endpoints


def test_import_keeps_torch_out() -> None:
    code = ("import sys, bertedge.edges.serve; bad = {'torch', 'transformers'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_health_ready_model_docs(client: TestClient, predictor: Predictor) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/model").json()
    assert info["task"] == "classification" and info["labels"] == ["negative", "positive"]
    assert info["max_length"] == predictor.max_length and info["precision"] == "fp32"
    assert info["checksums"]["model.onnx"] == predictor.model_files()["model.onnx"]
    assert info["model_files"] == predictor.model_files() and info["output_schema"]["label"] == "string"
    assert info["limits"]["max_texts"] == 8 and info["limits"]["max_chars"] == 500
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) >= {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics"}
    assert "texts" in schema["components"]["schemas"]["PredictRequest"]["properties"]
    assert client.get("/docs").status_code == 200


def test_predict_shapes_match_predictor(client: TestClient, predictor: Predictor) -> None:
    items = ["a good film", ["is it good?", "it is superb"], {"text": "dull plot", "text_pair": "yes"},
             {"text": "boring"}]
    body = client.post("/v1/predict", json={"texts": items}).json()
    want = predictor.predict(["a good film", ("is it good?", "it is superb"), ("dull plot", "yes"),
                              "boring"])
    assert_same(body["predictions"], want)
    assert body["truncated"] == 0 and body["model"]["task"] == "classification"
    assert body["model"]["digest"] == predictor.digest  # which bundle answered
    assert client.get("/v1/model").json()["digest"] == body["model"]["digest"]
    one = client.post("/v1/predict", json={"texts": "a good film"}).json()
    assert_same(one["predictions"], want[:1])


def test_long_text_is_truncated_and_says_so(client: TestClient, predictor: Predictor) -> None:
    long = "q " * 200  # 200 tokens > max_length (128), 400 characters < max_chars (500)
    body = client.post("/v1/predict", json={"texts": [long, "good"]}).json()
    assert body["truncated"] == 1
    assert body["predictions"][0]["truncated"] is True and "truncated" not in body["predictions"][1]
    assert_same(body["predictions"], predictor.predict([long, "good"]))


@pytest.fixture(scope="module")
def task_predictors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Predictor]:
    """Tiny QA and NER bundles through the real pipeline, loaded."""
    from tiny import make_tiny_model

    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    base, loaded = tmp_path_factory.mktemp("tasks"), {}
    for task, labels in (("qa", ("start", "end")), ("ner", ("O", "B-PER", "I-PER", "B-LOC", "I-LOC"))):
        model = make_tiny_model(base / f"{task}-model", task=task, labels=labels)
        export(ExportArgs(model, base / f"{task}-export", optimization=Optimization.NONE,
                          quantize=Quantization.NONE))
        loaded[task] = Predictor(package(PackageArgs(base / f"{task}-export", base / task)).root)
    return loaded


def test_qa_and_ner_bundles_answer_like_predict(task_predictors: dict[str, Predictor]) -> None:
    qa, ner = task_predictors["qa"], task_predictors["ner"]
    with TestClient(create_app(qa, LIMITS)) as client:
        items = [{"question": "who lives in paris?", "context": "john smith lives in paris"},
                 ["where does john live?", "john lives in paris"]]
        body = client.post("/v1/predict", json={"texts": items}).json()
        want = qa.predict([("who lives in paris?", "john smith lives in paris"),
                           ("where does john live?", "john lives in paris")])
        assert [p["answer"] for p in body["predictions"]] == [w["answer"] for w in want]
        assert body["predictions"][0].keys() == want[0].keys()
        r = client.post("/v1/predict", json={"texts": ["ok?", ["q?", "a context"]]})
        assert r.status_code == 422 and [p["field"] for p in r.json()["problems"]] == ["texts[0]"]
    with TestClient(create_app(ner, LIMITS)) as client:
        body = client.post("/v1/predict", json={"texts": "john smith lives in paris"}).json()
        assert body["predictions"] == ner.predict(["john smith lives in paris"])
        r = client.post("/v1/predict", json={"texts": ["fine", ["a", "pair"]]})
        assert r.status_code == 422 and [p["field"] for p in r.json()["problems"]] == ["texts[1]"]


def test_an_over_long_qa_question_fails_alone_in_a_shared_batch(task_predictors: dict[str, Predictor]) -> None:
    qa = task_predictors["qa"]
    good = ("who lives in paris?", "john smith lives in paris")
    long_question = (" ".join(["who"] * (qa.max_length + 10)) + "?", "john lives in paris")

    async def main() -> list[Any]:
        batcher = Batcher(qa, ServeConfig(max_batch_size=8, max_wait_ms=200), Metrics())
        batcher.start()
        with batcher.receiving():  # hold the batch open so all three share it
            calls = [asyncio.ensure_future(batcher.submit([item])) for item in (good, long_question, good)]
            await asyncio.sleep(0.05)
        out = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.close()
        return out

    first, bad, last = asyncio.run(main())
    assert first[0]["answer"] == last[0]["answer"] == qa.predict([good])[0]["answer"]
    assert isinstance(bad, Refused), bad


BAD_INPUTS = [  # (body, status, field named, limit named)
    (b'{"texts": ["a", ', 400, "body", None),
    (b'{"texts": ["caf\xe9"]}', 400, "body", None),
    (b"", 400, "body", None),
    (b"[" * 50_000, 400, "body", None),
    (b'{"texts": 3}', 422, "texts", None),
    (b'{"texts": [1]}', 422, "texts[0]", None),
    (b'{"texts": ["a", ["b"]]}', 422, "texts[1][1]", None),
    (b'{"texts": ["a", {"text": 5}]}', 422, "texts[1].text", None),
    (b'{"texts": ["a", ["b", "c", "d"]]}', 422, "texts[1]", None),
    (b'{"texts": []}', 422, "texts", 8),
    (b'{"texts": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}', 422, "texts", 8),
    (b'{"texts": ["ok", "' + b"x" * 501 + b'"]}', 422, "texts[1]", 500),
    (b'{"texts": [["ok", "' + b"x" * 501 + b'"]]}', 422, "texts[0].text_pair", 500),
    (b'{"texts": ["ok", "   "]}', 422, "texts[1]", None),
    (b'{"txt": "a"}', 422, "texts", None),
    (b'["a"]', 422, "body", None),
    (b'{"texts": "' + b"x" * 200_000 + b'"}', 413, "body", LIMITS.body_limit),
]


@pytest.mark.parametrize(("raw", "status", "field", "limit"), BAD_INPUTS,
                         ids=["malformed-json", "not-utf8", "empty-body", "deep-nesting", "texts-int",
                              "item-int", "short-pair", "object-text-int", "long-pair", "empty-list",
                              "too-many", "text-too-long", "pair-too-long", "blank-text",
                              "missing-texts", "top-level-list", "body-too-large"])
def test_bad_input_is_a_4xx_naming_field_and_limit(client: TestClient, raw: bytes, status: int,
                                                   field: str, limit: int | None) -> None:
    r = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]
    problem = next(p for p in body["problems"] if p["field"] == field)
    assert problem.get("limit") == limit
    if limit is not None:
        assert str(limit) in body["error"] + problem["message"]


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    chunks = (b'{"texts": "' if i == 0 else b"x" * 10_000 for i in range(20))
    r = client.post("/v1/predict", content=chunks)
    assert r.status_code == 413 and r.json()["problems"][0]["limit"] == LIMITS.body_limit


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert client.get("/nope").json()["error"] == "Not Found"
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_not_ready_until_started_then_loads_a_path(bundle: Path) -> None:
    app = create_app(bundle, LIMITS)
    cold = TestClient(app)  # no `with`: the lifespan (load + warm-up) has not run
    assert cold.get("/healthz").status_code == 200
    assert cold.get("/readyz").status_code == 503
    assert cold.post("/v1/predict", json={"texts": "good"}).status_code == 503
    with TestClient(app) as warm:
        assert warm.get("/readyz").status_code == 200
        assert warm.post("/v1/predict", json={"texts": "good"}).status_code == 200
    assert metric(warm.get("/metrics").text, "bertedge_ready") == 0


def test_corrupt_bundle_fails_start_up(bundle: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(bundle, tmp_path / "bad"))
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BertedgeError, match="corrupt"), TestClient(create_app(bad, LIMITS)):
        pass


# ----------------------------------------------------------------------------- the batcher


class FakePredictor:
    """Echoes each text as its label and records every call; 'boom' is a bad input, 'crash' a
    non-BertedgeError failure (e.g. a tokenizers exception on an over-long QA question).

    It implements exactly `PredictorLike`: the server uses nothing else."""

    task_name, labels, max_length, digest = "classification", ("a", "b"), 128, "0" * 64
    providers = ["CPUExecutionProvider"]
    example_item = ("an example", None)

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[int, int | None]] = []
        self.delay_s = delay_s

    def check(self, item: tuple[str, str | None]) -> tuple[str, str | None] | str:
        return item

    def count_tokens(self, items: Sequence[tuple[str, str | None]]) -> list[int]:
        return [len(t.split()) + len((p or "").split()) + 3 for t, p in items]

    def model_files(self) -> dict[str, str]:
        return {"model.onnx": "f" * 64}

    def describe(self) -> dict[str, Any]:
        return {"task": self.task_name, "precision": "fp32"}

    def output_schema(self) -> dict[str, Any]:
        return {"label": "string", "pair": "string"}

    def predict_isolated(self, items: Sequence[tuple[str, str | None]],
                         batch_size: int | None = None) -> list[dict[str, Any]]:
        self.calls.append((len(items), batch_size))
        time.sleep(self.delay_s)
        if any(t == "boom" for t, _ in items):
            raise BertedgeError("item 0: boom")
        if any(t == "crash" for t, _ in items):
            raise RuntimeError("tokenizers: sequence too long")
        return [{"label": t, "pair": p} for t, p in items]


def run_batcher(requests: list[list[str]], max_batch_size: int, max_wait_ms: float = 50,
                delay_s: float = 0.0) -> tuple[list[Any], FakePredictor, Metrics]:
    """Submit every request at once; each one's results (or exception), and the fake."""
    fake, metrics = FakePredictor(delay_s), Metrics()

    async def main() -> list[Any]:
        batcher = Batcher(fake, ServeConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms),
                          metrics)
        batcher.start()
        tasks = [batcher.submit([(t, None) for t in r]) for r in requests]
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return out

    return asyncio.run(main()), fake, metrics


def test_batcher_coalesces_and_returns_each_its_own() -> None:
    requests = [[f"r{i}-{j}" for j in range(1 + i % 3)] for i in range(12)]
    results, fake, metrics = run_batcher(requests, max_batch_size=8)
    for request, result in zip(requests, results, strict=True):
        assert [r["label"] for r in result] == request
    sizes = [n for n, _ in fake.calls]
    assert sum(sizes) == 24 and max(sizes) <= 8 and len(sizes) < 12
    assert all(b == 8 for _, b in fake.calls)
    assert metrics.queue_depth._value.get() == 0


def test_batcher_keeps_a_request_together_and_runs_a_big_one_alone() -> None:
    results, fake, _ = run_batcher([["a", "b", "c"], ["d", "e", "f"], list("ghijklmnop")], 4)
    assert fake.calls == [(3, 4), (3, 4), (10, 4)]  # predict splits the 10 into runs of 4
    assert [r["label"] for r in results[2]] == list("ghijklmnop")


def test_a_lone_request_does_not_wait_but_an_arriving_one_is_awaited() -> None:
    async def main() -> tuple[float, list[tuple[int, int | None]]]:
        fake = FakePredictor()
        batcher = Batcher(fake, ServeConfig(max_batch_size=8, max_wait_ms=2000), Metrics())
        batcher.start()
        t0 = time.perf_counter()
        await batcher.submit([("alone", None)])
        alone_s = time.perf_counter() - t0

        async def late() -> list[dict[str, Any]]:
            with batcher.receiving():  # e.g. its body is still being read
                await asyncio.sleep(0.1)
            return await batcher.submit([("late", None)])

        first = asyncio.ensure_future(late())
        await asyncio.sleep(0.01)
        await batcher.submit([("early", None)])
        assert (await first)[0]["label"] == "late"
        await batcher.close()
        return alone_s, fake.calls

    alone_s, calls = asyncio.run(main())
    assert alone_s < 1.0  # not the 2 s max wait
    assert calls == [(1, 8), (2, 8)]  # "early" waited for "late" and they ran together


def test_run_batch_size_defaults() -> None:
    cpu, gpu = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ServeConfig().run_batch_for(cpu) == 8 and ServeConfig().run_batch_for(gpu) == 32
    assert ServeConfig(max_batch_size=4).run_batch_for(cpu) == 4
    assert ServeConfig(run_batch_size=16).run_batch_for(cpu) == 16


def test_batch_size_one_is_one_call_per_request() -> None:
    _, fake, _ = run_batcher([["a"], ["b"], ["c"], ["d"]], max_batch_size=1)
    assert fake.calls == [(1, 1)] * 4


def test_a_bad_request_fails_alone() -> None:
    results, fake, metrics = run_batcher([["a"], ["boom"], ["c"]], max_batch_size=8)
    assert results[0][0]["label"] == "a" and results[2][0]["label"] == "c"
    assert isinstance(results[1], Refused)
    assert [n for n, _ in fake.calls] == [3, 1, 1, 1]  # the coalesced call failed, then one each
    assert metrics.queue_depth._value.get() == 0


def test_a_crashing_item_fails_alone_with_a_500() -> None:
    results, fake, metrics = run_batcher([["a"], ["crash"], ["c", "d"]], max_batch_size=8)
    assert results[0][0]["label"] == "a" and [r["label"] for r in results[2]] == ["c", "d"]
    assert isinstance(results[1], Failed)
    assert "RuntimeError" in results[1].message
    assert [n for n, _ in fake.calls] == [4, 1, 1, 2]


def test_batcher_survives_a_python310_style_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """On 3.10 asyncio.wait_for raises asyncio.TimeoutError, which is not the builtin TimeoutError:
    the batcher must not depend on which one it is (here: a class neither name catches)."""

    class Py310Timeout(Exception):
        pass

    async def wait_for(aw: Any, timeout: float | None) -> Any:
        task = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return task.result()
        task.cancel()
        raise Py310Timeout

    monkeypatch.setattr(asyncio, "wait_for", wait_for)

    async def main() -> list[str]:
        batcher = Batcher(FakePredictor(), ServeConfig(max_batch_size=8, max_wait_ms=30), Metrics())
        batcher.start()
        with batcher.receiving():  # a request on its way in: the collector waits, then times out
            first = await asyncio.wait({asyncio.ensure_future(batcher.submit([("a", None)]))}, timeout=5)
        second = await asyncio.wait({asyncio.ensure_future(batcher.submit([("b", None)]))}, timeout=5)
        labels = [t.result()[0]["label"] for done, _ in (first, second) for t in done]
        await batcher.close()
        return labels

    assert asyncio.run(main()) == ["a", "b"]  # before the fix the worker died: "b" never came


def test_closed_batcher_refuses_and_drains() -> None:
    async def main() -> None:
        batcher = Batcher(FakePredictor(0.05), ServeConfig(max_batch_size=1), Metrics())
        batcher.start()
        queued = [asyncio.ensure_future(batcher.submit([(t, None)])) for t in "abc"]
        await asyncio.sleep(0)
        await batcher.close()
        assert [q.result()[0]["label"] for q in queued] == ["a", "b", "c"]
        with pytest.raises(NotAccepting, match="not accepting"):
            await batcher.submit([("d", None)])

    asyncio.run(main())


# ----------------------------------------------------------------------------- load shedding


def test_full_queue_sheds_with_503_and_retry_after() -> None:
    fake = FakePredictor(delay_s=0.3)
    with TestClient(create_app(fake, ServeConfig(max_batch_size=1, max_queue=2))) as client:
        batcher = client.app.state.server.batcher  # type: ignore[attr-defined]

        def post(text: str) -> Any:
            return client.post("/v1/predict", json={"texts": [text]})

        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(post, "running")  # taken by the worker: not in the queue
            while not fake.calls[2:]:  # two warm-up calls, then this one
                time.sleep(0.01)
            queued = [pool.submit(post, t) for t in ("q1", "q2")]
            while batcher.queued_texts < 2:
                time.sleep(0.01)
            shed = post("one too many")
            assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
            assert "queue" in shed.json()["error"] and shed.json()["problems"][0]["limit"] == 2
            assert [f.result().status_code for f in (running, *queued)] == [200, 200, 200]
        assert post("room again").status_code == 200
        text = client.get("/metrics").text
    assert metric(text, "bertedge_shed_requests_total") == 1
    assert metric(text, "bertedge_queue_depth") == 0


def test_deadline_answers_504_and_frees_the_slot() -> None:
    fake = FakePredictor(delay_s=0.4)
    config = ServeConfig(max_batch_size=1, max_queue=1, request_timeout_s=0.15)
    with TestClient(create_app(fake, config)) as client:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(client.post, "/v1/predict", json={"texts": ["slow"]})
            while not fake.calls[2:]:
                time.sleep(0.01)
            waiting = client.post("/v1/predict", json={"texts": ["waits in the queue"]})
            assert waiting.status_code == 504 and "request timeout (0.15 s)" in waiting.json()["error"]
            assert slow.result().status_code == 504  # its batch ran past the deadline too
        calls_before = len(fake.calls)
        time.sleep(0.3)  # the running batch ends; the expired request is not predicted
        assert len(fake.calls) == calls_before == 3
        relaxed = client.app.state.server.batcher  # type: ignore[attr-defined]
        assert relaxed.queued_texts == 0
        text = client.get("/metrics").text
    assert metric(text, "bertedge_timed_out_requests_total") == 2


def test_crashed_worker_is_restarted_and_not_ready_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePredictor()
    app = create_app(fake, ServeConfig(max_wait_ms=1))
    with TestClient(app) as client:
        batcher = app.state.server.batcher
        batcher.restart_delay_s = 0.5
        real_collect = batcher._collect
        crashes: list[int] = []

        async def crash_once() -> Any:
            got = await real_collect()  # the worker now holds a request
            if not crashes:
                crashes.append(1)
                raise RuntimeError("a bug in the batcher")
            return got

        monkeypatch.setattr(batcher, "_collect", crash_once)
        # The worker already waits inside the real _collect: this request takes it round once.
        assert client.post("/v1/predict", json={"texts": ["before"]}).status_code == 200
        lost = client.post("/v1/predict", json={"texts": ["held by the crashed worker"]})
        assert lost.status_code == 503 and "crashed" in lost.json()["error"]
        assert client.get("/readyz").status_code == 503  # restarting
        assert metric(client.get("/metrics").text, "bertedge_worker_up") == 0
        with ThreadPoolExecutor(1) as pool:  # queued while down: answered after the restart
            during = pool.submit(client.post, "/v1/predict", json={"texts": ["queued meanwhile"]})
            deadline = time.monotonic() + 5
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the worker was not restarted"
                time.sleep(0.02)
            assert during.result().json()["predictions"][0]["label"] == "queued meanwhile"
        assert client.post("/v1/predict", json={"texts": ["after"]}).status_code == 200
        text = client.get("/metrics").text
    assert metric(text, "bertedge_worker_restarts_total") == 1 and metric(text, "bertedge_worker_up") == 1


def test_max_batch_tokens_keeps_a_long_text_from_padding_short_ones() -> None:
    long = " ".join(["word"] * 40)  # 43 tokens by the fake's count; a short text counts 4
    requests = [["a"], [long], ["b"], ["c"], ["d"]]

    def run(max_batch_tokens: int | None) -> list[int]:
        fake = FakePredictor()

        async def main() -> None:
            config = ServeConfig(max_batch_size=8, max_wait_ms=50, max_batch_tokens=max_batch_tokens)
            batcher = Batcher(fake, config, Metrics())
            batcher.start()
            await asyncio.gather(*(batcher.submit([(t, None) for t in r]) for r in requests))
            await batcher.close()

        asyncio.run(main())
        return [n for n, _ in fake.calls]

    assert run(None) == [5]  # everything in one batch, padded to 43 tokens: 215
    assert run(64) == [1, 1, 3]  # "a" + long would be 2 x 43 > 64: the long text runs alone


def test_count_tokens_counts_what_the_predictor_runs(predictor: Predictor) -> None:
    short, long = predictor.count_tokens([("a good film", None), ("good " * 500, None)])
    assert short == len(predictor.tokenizer.encode("a good film").ids) == 5  # [CLS] a good film [SEP]
    assert long == predictor.max_length  # truncated as the runtime truncates it


def test_workers_run_batches_at_once() -> None:
    def run(workers: int) -> float:
        fake = FakePredictor(delay_s=0.2)

        async def main() -> float:
            batcher = Batcher(fake, ServeConfig(max_batch_size=1, workers=workers), Metrics())
            batcher.start()
            t0 = time.perf_counter()
            results = await asyncio.gather(*(batcher.submit([(t, None)]) for t in "abcd"))
            assert [r[0]["label"] for r in results] == list("abcd")
            await batcher.close()
            return time.perf_counter() - t0

        return asyncio.run(main())

    assert run(1) > 0.75 and run(4) < 0.6  # four 0.2 s batches: in turn, or at once


def test_served_sessions_do_not_spin(bundle: Path) -> None:
    from bertedge.runtime.sessions import session_options

    key = "session.intra_op.allow_spinning"
    assert ServeConfig().runtime.spin is False
    assert session_options(2, spin=False).get_session_config_entry(key) == "0"
    app = create_app(bundle, ServeConfig())
    with TestClient(app):
        options = app.state.server.predictor.session.get_session_options()
        assert options.get_session_config_entry(key) == "0"


def test_serve_refuses_a_bundle_with_another_digest(bundle: Path) -> None:
    from bertedge.runtime.bundle import open_bundle

    with open_bundle(bundle) as b:
        digest = b.digest
    with TestClient(create_app(bundle, ServeConfig(runtime=RuntimeOptions(expect_digest=digest)))) as client:
        assert client.get("/readyz").status_code == 200
    with pytest.raises(BertedgeError, match="not the expected"), \
            TestClient(create_app(bundle, ServeConfig(runtime=RuntimeOptions(expect_digest="a" * 64)))):
        pass
    result = CliRunner().invoke(cli, ["serve", str(bundle), "--expect-digest", "a" * 64])
    assert result.exit_code != 0 and "not the expected" in result.output
    assert result.output.count("\n") == 1


# ----------------------------------------------------------------------------- real uvicorn


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[tuple[str, uvicorn.Server]]:
    """The app on a real uvicorn, on a free port of 127.0.0.1, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=20))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_100_concurrent_requests_on_uvicorn(predictor: Predictor) -> None:
    requests = [[" ".join(WORDS[(i + k) % 10: (i + k) % 10 + 1 + i % 4]) for k in range(1 + i % 3)]
                for i in range(100)]
    with live_server(create_app(predictor, ServeConfig(max_wait_ms=20))) as (url, _):

        async def main() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
                return await asyncio.gather(*(http.post("/v1/predict", json={"texts": r})
                                              for r in requests))

        responses = asyncio.run(main())
        metrics = httpx.get(f"{url}/metrics").text
    for request, response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        assert_same(response.json()["predictions"], predictor.predict(request))
    texts = sum(len(r) for r in requests)
    assert metric(metrics, "bertedge_requests_total", endpoint="/v1/predict", status="200") == 100
    assert metric(metrics, "bertedge_request_duration_seconds_count", endpoint="/v1/predict") == 100
    assert metric(metrics, "bertedge_texts_total") == texts
    assert metric(metrics, "bertedge_batch_size_sum") == texts
    assert metric(metrics, "bertedge_batch_size_count") < 100  # requests were coalesced
    assert metric(metrics, "bertedge_queue_depth") == 0


def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    fake = FakePredictor(delay_s=0.3)
    with live_server(create_app(fake, ServeConfig(max_batch_size=1))) as (url, server):

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                calls = [asyncio.ensure_future(http.post("/v1/predict", json={"texts": [f"t{i}"]}))
                         for i in range(4)]
                await asyncio.sleep(0.4)  # all four are in flight, one or two done
                server.should_exit = True
                return await asyncio.gather(*calls)

        responses = asyncio.run(main())
    assert [r.json()["predictions"][0]["label"] for r in responses] == ["t0", "t1", "t2", "t3"]
    assert fake.calls == [(1, 1)] * (2 + 4)  # two warm-up calls, then one per request
    with pytest.raises(httpx.TransportError):  # the server is gone, and with it the listener
        httpx.get(f"{url}/healthz", timeout=2)


class BrokenDescribe(FakePredictor):
    """A predictor whose description fails: an unexpected server bug on GET /v1/model."""

    broken = False

    def describe(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("a bug")
        return super().describe()


def test_keep_alive_after_a_500() -> None:
    import http.client

    fake = BrokenDescribe()
    with live_server(create_app(fake, ServeConfig(max_wait_ms=1))) as (url, _):
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)

        def post(text: str) -> http.client.HTTPResponse:
            conn.request("POST", "/v1/predict", body=f'{{"texts": ["{text}"]}}',
                         headers={"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response

        assert post("fine").status == 200
        sock = conn.sock
        failed = post("crash")  # the predictor fails for this request: a 500, connection kept
        assert failed.status == 500 and failed.getheader("connection") != "close"
        assert post("fine again").status == 200 and conn.sock is sock  # the same connection
        fake.broken = True
        conn.request("GET", "/v1/model")
        broken = conn.getresponse()
        broken.read()  # an unexpected error: uvicorn will close, and the answer says so
        assert broken.status == 500 and broken.getheader("connection") == "close"
        conn.close()


# ----------------------------------------------------------------------------- the CLI


def test_cli_serve_wires_options(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    result = CliRunner().invoke(cli, ["serve", str(bundle), "--port", "9123", "--max-batch-size", "8",
                                      "--max-wait-ms", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert seen["port"] == 9123 and seen["host"] == "127.0.0.1" and isinstance(seen["app"], FastAPI)


def test_cli_serve_rejects_bad_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing"), "--max-batch-size", "0"])
    assert result.exit_code != 0 and "--max-batch-size must be at least 1" in result.output
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "does not exist" in result.output


# ----------------------------------------------------------------------------- the load benchmark


def test_serve_load_benchmark_smoke(bundle: Path, tiny_bert: Path, tmp_path: Path) -> None:
    """benchmarks/serve_load.py end to end on the tiny model: both systems, a soak, the report."""
    import json

    data = tmp_path / "dev.tsv"
    data.write_text("label\tcontent\n" + "".join(f"{i % 2}\t{' '.join(WORDS[i % 7: i % 7 + 3])}\n"
                                                 for i in range(30)))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(bundle), "--model", str(tiny_bert),
           "--data", str(data), "--concurrency", "1,4", "--requests", "12", "--warmup", "2",
           "--time-cap", "10", "--threads", "1", "--soak", "2", "--soak-rate", "15", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=400, capture_output=True)
    report = json.loads((out / "serve_load.json").read_text())
    runs = {(r["system"], r["concurrency"]): r for r in report["runs"]}
    assert set(runs) == {(s, c) for s in ("bertedge", "pipeline") for c in (1, 4)}
    assert all(r["errors"] == 0 and r["lost"] == 0 and r["ok"] == r["requests"] > 0 for r in runs.values())
    assert runs[("bertedge", 4)]["mean_batch"] >= 1
    soak = report["soak"]
    assert soak["sent"] >= 20 and soak["lost"] == 0 and soak["not_their_own"] == 0
    assert soak["answered"] + soak["shed"] + soak["timed_out"] + soak["errors"] == soak["sent"]
    assert "| pipeline | 4 |" in (out / "serve_load.md").read_text()

