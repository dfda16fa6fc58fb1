"""bertedge bench: statistics on known numbers, realistic inputs, report structure, accuracy,
thread / provider recording, GPU backends skipped with a reason, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime.data import BadRows, Columns
from bertedge.runtime.features import load_tokenizer
from bertedge.toolchain.bench import (
    BenchArgs,
    BenchReport,
    backends,
    bench,
    latency_stats,
    render,
    time_calls,
)
from bertedge.toolchain.bench.inputs import realistic_batch, resolve_source
from bertedge.toolchain.bench.results import BackendResult
from bertedge.toolchain.bench.spec import BUILTIN_SENTENCES, DEFAULT_DURATION_S, MIN_TIMED_RUNS
from bertedge.toolchain.bench.stage import select_backends, thread_and_provider_warnings

FAST = dict(batch_sizes=(1, 2), seq_lens=(8, 16), runs=3, warmup=1, threads=1)
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def export_dir(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bertedge export (fp32, fused, dynamic INT8) of the tiny BERT."""
    from bertedge.toolchain.export import ExportArgs, export

    out = tmp_path_factory.mktemp("bench_export") / "export"
    export(ExportArgs(tiny_bert, out))
    return out


@pytest.fixture(scope="module")
def report(export_dir: Path, sentiment_csv: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchReport, Path]:
    """torch + fp32 + int8 on two shapes each, with the labelled --data pass, files written."""
    out = tmp_path_factory.mktemp("bench_out")
    args = BenchArgs(export_dir, backends=("torch", "fp32", "int8"), data=sentiment_csv[1], out=out,
                     cold_start=False, **FAST)  # type: ignore[arg-type]
    return bench(args), out


# ----------------------------------------------------------------------------- statistics


def test_latency_stats_on_known_numbers() -> None:
    s = latency_stats([0.010, 0.020, 0.030, 0.040], batch_size=8, seq_len=16)
    assert s.runs == 4
    assert s.p50_ms == pytest.approx(25.0)
    assert s.p90_ms == pytest.approx(37.0)  # linear interpolation: 10 + 0.9 * 3 * 10
    assert s.p99_ms == pytest.approx(39.7)
    assert s.mean_ms == pytest.approx(25.0)
    assert s.std_ms == pytest.approx(12.909944, rel=1e-6)  # sample std (ddof=1)
    assert (s.min_ms, s.max_ms) == pytest.approx((10.0, 40.0))
    assert s.sequences_per_s == pytest.approx(8 * 4 / 0.1)
    assert s.tokens_per_s == pytest.approx(8 * 4 / 0.1 * 16)
    one = latency_stats([0.5], batch_size=1, seq_len=128)
    assert (one.p50_ms, one.p99_ms, one.std_ms, one.sequences_per_s) == pytest.approx((500.0, 500.0, 0.0, 2.0))
    with pytest.raises(ValueError):
        latency_stats([], 1, 1)


def test_time_calls_counts_runs_and_duration() -> None:
    calls: list[int] = []
    assert len(time_calls(lambda: calls.append(1), warmup=2, runs=5, duration=0.0)) == 5
    assert len(calls) == 7  # warm-up calls are not timed
    timed = time_calls(lambda: None, warmup=0, runs=0, duration=0.0)
    assert len(timed) == MIN_TIMED_RUNS  # --duration always yields enough runs for percentiles


def test_bench_args_are_validated_all_at_once(export_dir: Path) -> None:
    with pytest.raises(BertedgeError) as e:
        BenchArgs(export_dir, backends=("fp32", "tpu"), duration=1.0, runs=3, batch_sizes=(0,))
    message = str(e.value)
    assert "not both" in message and "tpu" in message and "--batch-sizes" in message
    with pytest.raises(BertedgeError, match="'onnx' is now 'fp32', 'onnx-fused' is now 'fused'"):
        BenchArgs(export_dir, backends=("onnx", "onnx-fused"))
    assert BenchArgs(export_dir).duration == DEFAULT_DURATION_S


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("seq_len", [4, 16, 64, 128])
def test_realistic_inputs_have_exactly_the_requested_length(tiny_bert: Path, seq_len: int) -> None:
    tokenizer = load_tokenizer(tiny_bert / "tokenizer.json")
    cls, sep, pad = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    feeds = realistic_batch(tokenizer, BUILTIN_SENTENCES, batch_size=3, seq_len=seq_len, seed=1)
    ids = feeds["input_ids"]
    assert ids.shape == (3, seq_len) and ids.dtype == np.int64
    assert (ids[:, 0] == cls).all() and (ids[:, -1] == sep).all()
    assert not (ids[:, 1:-1] == pad).any() and not (ids[:, 1:-1] == sep).any()  # real text, no padding
    assert feeds["attention_mask"].all() and not feeds["token_type_ids"].any()
    if seq_len >= 16:
        assert len({tuple(r) for r in ids}) > 1  # rows start at different sentences


def test_realistic_inputs_come_from_real_text(tiny_bert: Path) -> None:
    tokenizer = load_tokenizer(tiny_bert / "tokenizer.json")
    feeds = realistic_batch(tokenizer, ["the film was great"], batch_size=1, seq_len=12)
    assert tokenizer.decode(feeds["input_ids"][0].tolist()).startswith("the film was great the film")


# ----------------------------------------------------------------------------- the report


def test_report_structure_and_files(report: tuple[BenchReport, Path]) -> None:
    rep, out = report
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == "bertedge-bench/1"
    assert {"created", "source", "settings", "environment", "backends", "warnings", "files"} <= set(data)
    env = data["environment"]
    assert {"avx2", "avx512f", "avx512_vnni", "avx_vnni"} <= set(env["cpu"]["isa"])
    assert env["cpu"]["model"] and env["cpu"]["logical_cores"] >= 1
    assert env["versions"]["onnxruntime"] == ort.__version__ and env["versions"]["torch"]
    assert data["source"]["kind"] == "export" and data["settings"]["threads"] == 1
    assert [x["name"] for x in data["backends"]] == ["torch", "fp32", "int8"]
    for backend in data["backends"]:
        assert backend["status"] == "ok" and backend["size_mb"] > 0 and backend["load_s"] >= 0
        assert [(s["batch_size"], s["seq_len"]) for s in backend["shapes"]] == [(1, 8), (1, 16), (2, 8), (2, 16)]
        for shape in backend["shapes"]:
            st = shape["stats"]
            assert st["runs"] == 3 and st["p50_ms"] <= st["p90_ms"] <= st["p99_ms"] <= st["max_ms"]
            assert st["tokens_per_s"] == pytest.approx(st["sequences_per_s"] * shape["seq_len"])
    assert data["backends"][2]["precision"] == "int8"
    text = (out / "bench.md").read_text()
    assert "| backend | batch | seq |" in text and "int8" in text and "avx2" in text
    for name in ("bench.json", "bench.md", "latency_vs_seq_len.png", "throughput_vs_batch_size.png",
                 "bench-history.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency_vs_seq_len.png").read_bytes()[:4] == b"\x89PNG"
    assert len(render(rep)) == 2


def test_accuracy_and_agreement(report: tuple[BenchReport, Path], tiny_bert: Path,
                                sentiment_csv: tuple[Path, Path]) -> None:
    import torch
    import transformers

    from bertedge.runtime.data import load_text_classification

    rep, _ = report
    examples = load_text_classification(sentiment_csv[1], label_names=["negative", "positive"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    enc = transformers.AutoTokenizer.from_pretrained(tiny_bert)(examples.texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = float((model(**enc).logits.argmax(-1).numpy() == np.array(examples.labels)).mean())
    torch_acc = rep.backend("torch").accuracy  # type: ignore[union-attr]
    assert torch_acc is not None and torch_acc.rows == len(examples)
    assert torch_acc.accuracy == pytest.approx(expected)
    assert torch_acc.reference == "torch" and torch_acc.agreement == 1.0
    onnx_acc = rep.backend("fp32").accuracy  # type: ignore[union-attr]
    assert onnx_acc is not None and onnx_acc.accuracy == pytest.approx(expected)
    assert onnx_acc.agreement == 1.0 and (onnx_acc.max_abs_logit_diff or 0.0) < 1e-4
    int8_acc = rep.backend("int8").accuracy  # type: ignore[union-attr]
    assert int8_acc is not None and int8_acc.agreement is not None and int8_acc.max_abs_logit_diff is not None
    assert 0.0 <= int8_acc.agreement <= 1.0 and int8_acc.max_abs_logit_diff < 0.05
    assert int8_acc.sequences_per_s > 0


def test_threads_and_providers_are_recorded(report: tuple[BenchReport, Path]) -> None:
    rep, _ = report
    for result in rep.backends:
        assert result.threads_requested == 1 and result.threads_used == 1, result
    onnx = rep.backend("fp32")
    assert onnx is not None and onnx.providers_used == ["CPUExecutionProvider"]
    assert "psutil" in onnx.threads_how  # measured from the OS, not read back from the setting
    assert not any("threads" in w or "fallback" in w for w in rep.warnings)


def test_warning_when_threads_or_provider_differ() -> None:
    result = BackendResult("cuda", "", threads_requested=2, threads_used=4, threads_how="session options",
                             provider_requested="CUDAExecutionProvider", providers_used=["CPUExecutionProvider"])
    warnings = thread_and_provider_warnings(result, usable_cores=2)
    assert any("asked for 2 threads, it uses 4" in w for w in warnings)
    assert any("silent fallback" in w for w in warnings)
    result = BackendResult("fp32", "", threads_requested=8, threads_used=8)
    assert any("oversubscribes" in w for w in thread_and_provider_warnings(result, usable_cores=2))


def test_measured_thread_mismatch_is_warned(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = iter([10, 15])  # the session appears to start 5 threads: 6 in use, 1 asked for
    monkeypatch.setattr(backends, "_os_threads", lambda: next(counts))
    rep = bench(BenchArgs(export_dir, backends=("fp32",), cold_start=False, **{**FAST, "seq_lens": (8,)}))  # type: ignore[arg-type]
    assert rep.backends[0].threads_used == 6
    assert any("asked for 1 threads, it uses 6" in w for w in rep.warnings)


# ----------------------------------------------------------------------------- GPU backends


def test_cuda_backend_is_skipped_with_a_reason_when_unavailable(export_dir: Path) -> None:
    source = resolve_source(export_dir)
    args = BenchArgs(export_dir, backends=("fp32", "cuda", "tensorrt"))
    chosen = dict((k.name, reason) for k, reason in select_backends(args, source, ["CPUExecutionProvider"]))
    assert chosen["fp32"] == ""
    assert "CUDAExecutionProvider is not available" in chosen["cuda"]
    assert "TensorrtExecutionProvider" in chosen["tensorrt"]
    default = select_backends(BenchArgs(export_dir), source, ["CPUExecutionProvider"])
    names = [k.name for k, _ in default]  # every kind the folder has (bf16 ones where the CPU runs bf16)
    assert names[:4] == ["torch", "fp32", "fused", "int8"] and not any(k.gpu for k, _ in default)
    if HAS_CUDA:
        return
    rep = bench(BenchArgs(export_dir, backends=("fp32", "cuda"), cold_start=False, **FAST))  # type: ignore[arg-type]
    cuda = rep.backend("cuda")
    assert cuda is not None and cuda.status == "skipped" and "CUDAExecutionProvider" in cuda.reason
    assert not cuda.shapes and any(w.startswith("cuda skipped") for w in rep.warnings)
    assert rep.backend("fp32").status == "ok"  # type: ignore[union-attr]


@pytest.mark.gpu
def test_cuda_backend_runs_with_io_binding(export_dir: Path) -> None:
    if not HAS_CUDA:
        pytest.skip("CUDAExecutionProvider is not available in this onnxruntime")
    rep = bench(BenchArgs(export_dir, backends=("fp32", "cuda"), cold_start=True, cold_start_runs=1, **FAST))  # type: ignore[arg-type]
    cuda = rep.backend("cuda")
    assert cuda is not None and cuda.status == "ok", cuda
    assert cuda.providers_used[0] == "CUDAExecutionProvider" and cuda.io_binding
    assert len(cuda.shapes) == 4 and cuda.cold_start is not None


# ----------------------------------------------------------------------------- sources, cold start


def test_cold_start_runs_in_a_fresh_process_without_torch(export_dir: Path) -> None:
    rep = bench(BenchArgs(export_dir, backends=("int8",), cold_start=True, cold_start_runs=2,
                          **{**FAST, "batch_sizes": (1,), "seq_lens": (8,)}))  # type: ignore[arg-type]
    cs = rep.backends[0].cold_start
    assert cs is not None and cs.runs == 2 and len(cs.seconds_all) == 2
    assert cs.seconds >= cs.import_s + cs.load_s + cs.first_inference_s > 0
    assert 10 < cs.peak_rss_mb < 300 and not cs.imports_torch


def test_model_folder_runs_torch_and_drops_default_lengths_beyond_the_limit(tiny_distilbert: Path) -> None:
    rep = bench(BenchArgs(tiny_distilbert, batch_sizes=(1,), runs=2, warmup=0, cold_start=False))
    assert rep.source["kind"] == "model" and [x.name for x in rep.backends] == ["torch"]
    assert [s.seq_len for s in rep.backends[0].shapes] == [16, 64, 128]  # DistilBERT: no token_type_ids
    assert any("[256]" in w for w in rep.warnings)
    with pytest.raises(BertedgeError, match="exceed the model's 128 positions"):
        bench(BenchArgs(tiny_distilbert, seq_lens=(512,), runs=1, cold_start=False))


def test_bundle_folder_runs_the_kind_it_ships(export_dir: Path, tmp_path: Path) -> None:
    """A bundle's graph runs under the name of the artifact kind it holds, as export names it."""
    from bertedge.runtime.bundle import PackageArgs, package

    bundle = package(PackageArgs(export_dir=export_dir, out=tmp_path / "bundle", artifact="int8")).root
    rep = bench(BenchArgs(bundle, backends=("int8",), cold_start=False, **FAST))  # type: ignore[arg-type]
    assert rep.source["kind"] == "bundle" and rep.backends[0].file == str(bundle / "model.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert rep.backends[0].precision == manifest["precision"] == "int8"
    with pytest.raises(BertedgeError, match="holds int8, not fp32"):
        bench(BenchArgs(bundle, backends=("fp32",), cold_start=False, **FAST))  # type: ignore[arg-type]


def test_missing_artifact_is_an_error_naming_what_exists(export_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "export"
    shutil.copytree(export_dir, partial)
    (partial / "model-int8.onnx").unlink()
    with pytest.raises(BertedgeError) as e:
        bench(BenchArgs(partial, backends=("int8", "int8-static"), cold_start=False, runs=1))
    assert "model-int8.onnx" in str(e.value) and "model-int8-static.onnx" in str(e.value)
    assert "fused" in e.value.fix and "int8," not in e.value.fix


# ----------------------------------------------------------------------------- CLI


def test_cli_bench(export_dir: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli-bench"
    result = CliRunner().invoke(cli, [
        "bench", str(export_dir), "--backends", "fp32,int8", "--batch-sizes", "1,2", "--seq-lens", "8,16",
        "--runs", "3", "--warmup", "1", "--threads", "1", "--no-cold-start", "--data", str(sentiment_csv[1]),
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.index("batch_sizes") < result.output.index("latency and throughput")  # settings first
    assert "int8" in result.output and str(out / "bench.json") in result.output
    data = json.loads((out / "bench.json").read_text())
    assert [x["name"] for x in data["backends"]] == ["fp32", "int8"]
    assert data["backends"][1]["accuracy"]["reference"] == "fp32"


def test_cli_bench_errors(export_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", str(export_dir), "--runs", "3", "--duration", "1"])
    assert result.exit_code != 0 and "not both" in result.output
    result = CliRunner().invoke(cli, ["bench", str(export_dir), "--backends", "int8-static", "--runs", "1"])
    assert result.exit_code != 0 and "model-int8-static.onnx" in result.output
    result = CliRunner().invoke(cli, ["bench", str(export_dir), "--seq-lens", "8,x"])
    assert result.exit_code != 0 and "comma-separated integers" in result.output


def test_ner_bench_reports_entity_f1_per_backend(tmp_path: Path) -> None:
    """NER --data is read by the task record; every backend gets the task's own metric."""
    from tiny import make_tiny_model

    from bertedge.toolchain.bench import BenchArgs, bench
    from bertedge.toolchain.export import ExportArgs, export

    model = make_tiny_model(tmp_path / "m", task="ner", labels=("O", "B-PER", "I-PER", "B-LOC", "I-LOC"))
    conll = tmp_path / "dev.txt"
    conll.write_text("john\tB-PER\nsmith\tI-PER\nlives\tO\nin\tO\nparis\tB-LOC\n\nthe\tO\nfilm\tO\n\n", encoding="utf-8")
    export(ExportArgs(model_dir=model, out=tmp_path / "x", eval_file=conll))
    report = bench(BenchArgs(model=tmp_path / "x", backends=("torch", "fp32", "int8"), batch_sizes=(1,),
                             seq_lens=(16,), runs=3, data=conll, cold_start=False, plots=False, out=tmp_path / "b"))
    metrics = {b.name: b.task_metric for b in report.backends}
    assert all(m is not None and m["name"] == "f1" and m["examples"] == 2 for m in metrics.values())
    assert metrics["fp32"]["value"] == pytest.approx(metrics["torch"]["value"])  # type: ignore[index]


@pytest.mark.parametrize("arch", ["roberta", "xlm-roberta", "mpnet", "deberta-v2"])
def test_realistic_batch_uses_the_tokenizers_own_template(arch: str, tmp_path: Path) -> None:
    from tiny import make_family_tokenizer

    make_family_tokenizer(tmp_path, arch)  # <s> / </s>, or a SentencePiece template
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    ids = realistic_batch(tokenizer, ["a good film", "the plot was dull"], 2, 16)["input_ids"]
    template = tokenizer.encode("").ids
    assert ids.shape == (2, 16) and (ids[:, 0] == template[0]).all() and (ids[:, -1] == template[-1]).all()


# ----------------------------------------------------------------------------- names, positions, stride


def test_backends_are_the_artifact_kinds_export_names() -> None:
    from bertedge.runtime.artifacts import ARTIFACT_KINDS
    from bertedge.toolchain.bench import known_backends

    names = [b.name for b in known_backends()]
    cpu_kinds = [k.name for k in ARTIFACT_KINDS.values() if k.cpu_candidate]
    assert names == ["torch", *cpu_kinds, "cuda", "cuda-fp16", "tensorrt"]
    assert {b.kind for b in known_backends() if b.gpu} == {"fp32", "fp16"}


def test_bundle_position_limit_comes_from_the_model_metadata(tmp_path: Path) -> None:
    """RoBERTa counts positions from padding_idx + 1: 130 position embeddings hold 128 tokens."""
    from tiny import make_family_model

    from bertedge.runtime.bundle import PackageArgs, package
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    model = make_family_model(tmp_path / "m", "roberta")
    export(ExportArgs(model, tmp_path / "x", quantize=Quantization.NONE, optimization=Optimization.NONE,
                      timing_seconds=0.05, timing_rounds=0))
    bundle = package(PackageArgs(export_dir=tmp_path / "x", out=tmp_path / "b")).root
    assert resolve_source(model).max_positions == resolve_source(bundle).max_positions == 128


def test_qa_windows_use_the_stride_the_model_records(tmp_path: Path) -> None:
    from tiny import make_tiny_model, write_jsonl

    from bertedge.runtime.tasks import get_task
    from bertedge.toolchain.bench.measure import load_task_data

    model = make_tiny_model(tmp_path / "m", task="qa", labels=("negative", "positive"))
    (model / "bertedge.json").write_text(json.dumps({"task": "qa", "max_length": 32, "stride": 4}), encoding="utf-8")
    context = " ".join(["john smith lives in paris and works at acme corp"] * 6)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "where does john live ?", "context": context,
                                                "answers": {"text": ["paris"], "answer_start": [context.index("paris")]}}])
    source = resolve_source(model)
    assert source.stride == 4
    windows = len(load_task_data(data, source).features)
    task, tokenizer = get_task("qa"), load_tokenizer(model / "tokenizer.json")
    examples = task.load(data, Columns(), None, BadRows.ERROR)
    assert windows == len(task.encode(tokenizer, examples, 32, 4)) != len(task.encode(tokenizer, examples, 32, 16))
