"""`bench(BenchArgs) -> BenchReport`: choose backends, lengths and threads, measure each, write the outputs."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.runtime.data import TextExamples, load_text_classification, seeded_subset
from bertedge.runtime.features import load_tokenizer
from bertedge.runtime.tasks import get_task
from bertedge.toolchain.bench.coldstart import cold_start_spec, measure_cold_start
from bertedge.toolchain.bench.environment import environment, usable_cores
from bertedge.toolchain.bench.inputs import (
    DataSet,
    Source,
    realistic_batch,
    resolve_source,
    tokenize_dataset,
)
from bertedge.toolchain.bench.measure import TaskData, bench_backend, load_task_data
from bertedge.toolchain.bench.report import write_outputs
from bertedge.toolchain.bench.results import BackendResult, BenchReport
from bertedge.toolchain.bench.spec import (
    BUILTIN_SENTENCES,
    DEFAULT_SEQ_LENS,
    MIN_TIMED_RUNS,
    Backend,
    BenchArgs,
    Feeds,
    backend_named,
    known_backends,
)

# ----------------------------------------------------------------------------- selection


def select_backends(args: BenchArgs, source: Source, available_providers: Sequence[str]) -> list[tuple[Backend, str]]:
    """(backend, skip reason or '') for each backend to bench.

    Explicitly requested backends the folder cannot run are an error (all listed at once);
    GPU backends without their execution provider are skipped with the reason recorded.
    """
    def provider_gap(b: Backend) -> str:
        if b.gpu and b.provider not in available_providers:
            return (f"{b.provider} is not available in this onnxruntime (available: {', '.join(available_providers)};"
                    " install onnxruntime-gpu on a CUDA machine)")
        return ""

    if not args.backends:
        chosen = [b for b in known_backends() if not source.missing(b) and not provider_gap(b)]
        if not chosen:
            raise BertedgeError(f"'{source.root}' has nothing bench can run", "export the model first")
        return [(b, "") for b in chosen]
    wanted = [backend_named(n) for n in dict.fromkeys(args.backends)]
    problems = [f"{b.name}: {m}" for b in wanted if (m := source.missing(b))]
    if problems:
        runnable = [b.name for b in known_backends() if not source.missing(b)]
        raise BertedgeError("cannot run " + "; ".join(problems),
                            f"this folder can run: {', '.join(runnable) or 'nothing'}")
    return [(b, provider_gap(b)) for b in wanted]


def choose_seq_lens(args: BenchArgs, source: Source, notes: list[str]) -> tuple[int, ...]:
    """The requested lengths; defaults beyond the model's position limit are dropped with a warning."""
    if args.seq_lens:
        too_long = [n for n in args.seq_lens if n > source.max_positions]
        if too_long:
            raise BertedgeError(f"--seq-lens {', '.join(map(str, too_long))} exceed the model's "
                                f"{source.max_positions} positions", f"use lengths <= {source.max_positions}")
        return args.seq_lens
    kept = tuple(n for n in DEFAULT_SEQ_LENS if n <= source.max_positions)
    if len(kept) < len(DEFAULT_SEQ_LENS):
        dropped = [n for n in DEFAULT_SEQ_LENS if n not in kept]
        notes.append(f"default sequence lengths {dropped} exceed the model's {source.max_positions} "
                     "positions and were left out")
    return kept or (source.max_positions,)


def resolve_threads(requested: int) -> int:
    """0 means every CPU this process may run on; the same number is given to every backend."""
    return requested or usable_cores()


def thread_and_provider_warnings(result: BackendResult, usable_cores: int) -> list[str]:
    """Warnings when the threads or providers really used differ from what was asked.

    >>> r = BackendResult("int8", "", threads_requested=2, threads_used=1, threads_how="OS threads created by the session + 1",
    ...                   provider_requested="CPUExecutionProvider", providers_used=["CPUExecutionProvider"])
    >>> thread_and_provider_warnings(r, usable_cores=2)
    ['int8: asked for 2 threads, it uses 1 (OS threads created by the session)']
    """
    out = []
    how = result.threads_how.split(" + ")[0]
    if result.threads_used is not None and result.threads_used != result.threads_requested:
        out.append(f"{result.name}: asked for {result.threads_requested} threads, it uses {result.threads_used} ({how})")
    if result.threads_requested > usable_cores:
        out.append(f"{result.name}: {result.threads_requested} threads on {usable_cores} usable cores "
                   "oversubscribes the CPU; latencies will be noisy")
    if result.provider_requested and result.providers_used and result.providers_used[0] != result.provider_requested:
        out.append(f"{result.name}: asked for {result.provider_requested}, onnxruntime runs on "
                   f"{', '.join(result.providers_used)} (silent fallback)")
    return out


# ----------------------------------------------------------------------------- the stage


def _sentences(data: TextExamples | None) -> list[str]:
    return list(data.texts) if data is not None else list(BUILTIN_SENTENCES)


def _task_sentences(data: TaskData) -> list[str]:
    """Real text from NER sentences (words joined) or QA contexts, to fill the timed inputs."""
    return data.task.texts(data.examples)


def load_data(args: BenchArgs, source: Source) -> TextExamples | None:
    """Classification --data (labels optional), a seeded subset with --max-data-rows."""
    if args.data is None or get_task(source.task).per_token_outputs:
        return None  # NER / QA data is read by the task record (load_task_data)
    examples = load_text_classification(args.data, args.columns, label_names=list(source.labels) or None,
                                        require_labels=False)
    return seeded_subset(examples, args.max_data_rows, args.seed)


def settings(args: BenchArgs, threads: int, seq_lens: Sequence[int], chosen: Sequence[tuple[Backend, str]]) -> dict[str, Any]:
    """The settings block printed first and stored in bench.json."""
    timing = f"{args.runs} runs" if args.runs else f"{args.duration:g} s (>= {MIN_TIMED_RUNS} runs)"
    return {"model": str(args.model), "backends": [b.name for b, _ in chosen], "batch_sizes": list(args.batch_sizes),
            "seq_lens": list(seq_lens), "threads": threads, "threads_requested": args.threads,
            "inter_op_threads": 1, "warmup": args.warmup, "runs": args.runs, "duration_s": args.duration,
            "timing": timing, "data": str(args.data) if args.data else None, "max_data_rows": args.max_data_rows,
            "data_batch_size": args.data_batch_size, "cold_start": args.cold_start,
            "cold_start_runs": args.cold_start_runs, "seed": args.seed,
            "inputs": "real sentences cut to exactly seq_len tokens ([CLS] ... [SEP]), attention mask all ones",
            "timed": "model call only; tokenization excluded. IO-binding backends keep inputs and outputs on the device"}


def bench(args: BenchArgs, echo: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark every selected backend on every shape; write bench.json / .md / plots to `args.out`.

    Args:
        args: what to bench and how.
        echo: where progress lines go (settings first); None prints nothing.

    Raises:
        BertedgeError: bad folder, options or data; a requested backend the folder lacks;
            no backend produced a result.
    """
    import onnxruntime as ort

    say = echo or (lambda _: None)
    start = time.perf_counter()
    source = resolve_source(args.model)
    notes: list[str] = []
    seq_lens = choose_seq_lens(args, source, notes)
    chosen = select_backends(args, source, ort.get_available_providers())
    threads = resolve_threads(args.threads)
    examples = load_data(args, source)
    report = BenchReport(created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         source=source.to_dict(), settings=settings(args, threads, seq_lens, chosen),
                         environment=environment(), warnings=notes)
    for key, value in report.settings.items():
        say(f"{key:18s} {value}")
    tokenizer = load_tokenizer(source.tokenizer)
    task_data = load_task_data(args.data, source) if args.data is not None and examples is None else None
    sentences = _task_sentences(task_data) if task_data is not None else _sentences(examples)
    inputs = {(b, s): realistic_batch(tokenizer, sentences, b, s, seed=args.seed + 1000 * b + s)
              for b in args.batch_sizes for s in seq_lens}
    data = None
    if examples is not None:
        data = tokenize_dataset(tokenizer, examples, source.max_length, args.data_batch_size)
    if data is not None and data.truncated:
        notes.append(f"{data.truncated} of {len(examples or [])} --data rows are longer than {source.max_length} tokens and were truncated")
    _run_backends(report, chosen, source, inputs, args, threads, data, say, task_data)
    report.environment["load_average_end"] = list(os.getloadavg())
    report.seconds = time.perf_counter() - start
    if not any(b.status == "ok" for b in report.backends):
        raise BertedgeError("no backend produced a result: " + "; ".join(f"{b.name}: {b.reason}" for b in report.backends),
                            "bench a CPU backend, e.g. --backends fp32")
    if args.out is not None:
        report.files = write_outputs(report, args.out, args.plots)
    return report


def _run_backends(report: BenchReport, chosen: Sequence[tuple[Backend, str]], source: Source,
                  inputs: dict[tuple[int, int], Feeds], args: BenchArgs, threads: int,
                  data: DataSet | None, say: Callable[[str], None], task_data: TaskData | None = None) -> None:
    reference: tuple[str, np.ndarray] | None = None
    usable = usable_cores()
    for backend, skip in _reference_first(chosen):
        if skip:
            report.backends.append(BackendResult(backend.name, backend.description, status="skipped", reason=skip,
                                                 provider_requested=backend.provider, threads_requested=threads))
            report.warnings.append(f"{backend.name} skipped: {skip}")
            say(f"{backend.name}: skipped ({skip})")
            continue
        say(f"{backend.name}: timing {len(inputs)} shapes ...")
        result, logits = _bench_one(backend, source, inputs, args, threads, data, reference, task_data)
        if result.task_metric is not None:
            say(f"{backend.name}: {result.task_metric['name']} {result.task_metric['value']:.4f} "
                f"on {result.task_metric['examples']} --data examples")
        if reference is None and logits is not None:
            reference = (backend.name, logits)
        result.warnings = thread_and_provider_warnings(result, usable)
        report.warnings.extend(result.warnings + ([f"{backend.name} {result.status}: {result.reason}"]
                                                  if result.status != "ok" else []))
        if result.status == "ok" and args.cold_start:
            _add_cold_start(result, cold_start_spec(backend, source, threads, BUILTIN_SENTENCES[0]), args.cold_start_runs)
        report.backends.append(result)
    report.backends.sort(key=lambda r: [b.name for b, _ in chosen].index(r.name))


def _bench_one(backend: Backend, source: Source, inputs: dict[tuple[int, int], Feeds], args: BenchArgs,
               threads: int, data: DataSet | None, reference: tuple[str, np.ndarray] | None,
               task_data: TaskData | None = None) -> tuple[BackendResult, np.ndarray | None]:
    try:
        return bench_backend(backend, source, inputs, args, threads, data, reference, task_data)
    except BertedgeError:
        raise
    except Exception as e:  # an engine that cannot load or run a file is reported, not fatal
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return BackendResult(backend.name, backend.description, status="failed", reason=first[:300],
                             provider_requested=backend.provider, threads_requested=threads), None


def _reference_first(chosen: Sequence[tuple[Backend, str]]) -> list[tuple[Backend, str]]:
    """torch first, else ONNX fp32: agreement is measured against the first backend that ran."""
    rank = {"torch": 0, "fp32": 1}
    return sorted(chosen, key=lambda c: rank.get(c[0].name, 2))


def _add_cold_start(result: BackendResult, spec: dict[str, Any], runs: int) -> None:
    try:
        result.cold_start = measure_cold_start(spec, runs)
    except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
        result.cold_start_note = f"cold start not measured: {e}"
        result.warnings.append(f"{result.name}: {result.cold_start_note}")
