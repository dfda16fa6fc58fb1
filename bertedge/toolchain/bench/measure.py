"""Measuring one backend: timed shapes, the --data pass and its score against the reference."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.runtime.data import Columns
from bertedge.runtime.features import load_tokenizer, pad_id
from bertedge.runtime.tasks import Task, get_task
from bertedge.toolchain.bench.backends import LOADERS, Loaded
from bertedge.toolchain.bench.environment import gpu_memory_mb
from bertedge.toolchain.bench.inputs import DataSet, Source
from bertedge.toolchain.bench.results import (
    Accuracy,
    BackendResult,
    ShapeResult,
    latency_stats,
    time_calls,
)
from bertedge.toolchain.bench.spec import Backend, BenchArgs, Feeds

# ----------------------------------------------------------------------------- measuring


def _rss_mb() -> float | None:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss / 2**20)
    except Exception:  # psutil is optional
        return None


def _size_mb(source: Source, loaded: Loaded) -> float | None:
    """What the backend loads from disk: its file and the files beside it (an IR's weights, a
    cascade's stages), or the torch folder's weights."""
    if loaded.file is not None:
        return sum(f.stat().st_size for f in (loaded.file, *loaded.weights) if f.is_file()) / 1e6
    if source.torch_dir is None:
        return None
    weights = [p for p in source.torch_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in weights) / 1e6 if weights else None


def measure_shapes(loaded: Loaded, inputs: dict[tuple[int, int], Feeds], args: BenchArgs) -> list[ShapeResult]:
    """Warm-up and timed runs for every (batch size, sequence length)."""
    results = []
    for (batch, seq), feeds in inputs.items():
        latencies = time_calls(loaded.prepare(feeds), args.warmup, args.runs, args.duration)
        results.append(ShapeResult(batch, seq, latency_stats(latencies, batch, seq)))
    return results


@dataclass
class TaskData:
    """NER / QA --data as the task record reads it: examples, model windows, labels."""

    task: Task
    examples: Any
    features: Any
    labels: tuple[str, ...]
    pad: int


def load_task_data(path: Path, source: Source) -> TaskData:
    """Read labelled NER (CoNLL / JSONL) or QA (SQuAD) data and cut it into model windows."""
    from bertedge.runtime.data import BadRows

    task = get_task(source.task)
    tokenizer = load_tokenizer(source.tokenizer)
    examples = task.load(path, Columns(), list(source.labels) or None, BadRows.ERROR)
    features = task.encode(tokenizer, examples, source.max_length, source.stride)
    return TaskData(task, examples, features, source.labels, pad_id(tokenizer))


def task_metric(run_outputs: Callable[[Feeds], dict[str, np.ndarray]], data: TaskData) -> dict[str, Any]:
    """The task's own metric (entity F1, SQuAD F1 / EM) through load -> encode -> run -> predict -> score."""
    from bertedge.runtime.features import run_windows

    start = time.perf_counter()
    outputs = run_windows(run_outputs, data.features, data.pad, data.task.per_token_outputs)
    seconds = time.perf_counter() - start
    scores = data.task.score(data.task.predict(outputs, data.features, data.examples, data.labels),
                             data.examples, data.labels)
    keep = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    return {"name": data.task.metric, "value": float(scores[data.task.metric]), "scores": keep,
            "examples": len(data.examples), "windows": len(data.features), "seconds": seconds}


def data_logits(loaded: Loaded, data: DataSet) -> tuple[np.ndarray, float]:
    """Logits for every --data row, in file order, and the seconds the model calls took."""
    outs, seconds = [], 0.0
    for feeds in data.batches:
        start = time.perf_counter()
        outs.append(loaded.run(feeds))
        seconds += time.perf_counter() - start
    logits = np.empty((len(data.order), outs[0].shape[-1]), dtype=np.float32)
    logits[data.order] = np.concatenate(outs)
    return logits, seconds


def score(name: str, logits: np.ndarray, seconds: float, data: DataSet,
          reference: tuple[str, np.ndarray] | None) -> Accuracy:
    """Accuracy (when labelled), agreement and max |logit diff| against the reference backend."""
    predicted = logits.argmax(-1)
    gold = data.examples.labels
    accuracy = float((predicted == np.asarray(gold)).mean()) if gold is not None else None
    ref_name, ref = reference if reference is not None else (name, logits)
    return Accuracy(rows=len(predicted), accuracy=accuracy, agreement=float((predicted == ref.argmax(-1)).mean()),
                    max_abs_logit_diff=float(np.abs(logits - ref).max()), reference=ref_name, seconds=seconds,
                    sequences_per_s=len(predicted) / seconds if seconds else 0.0,
                    tokens_per_s=data.tokens / seconds if seconds else 0.0)


def bench_backend(backend: Backend, source: Source, inputs: dict[tuple[int, int], Feeds], args: BenchArgs,
                  threads: int, data: DataSet | None, reference: tuple[str, np.ndarray] | None,
                  task_data: TaskData | None = None) -> tuple[BackendResult, np.ndarray | None]:
    """Load one backend in this process, time every shape and run the --data pass."""
    result = BackendResult(backend.name, backend.description, provider_requested=backend.provider,
                           io_binding=backend.io_binding, threads_requested=threads)
    rss_before = _rss_mb()
    loaded = LOADERS[backend.engine](source, backend, threads)
    result.file = str(loaded.file) if loaded.file else (str(source.torch_dir) if source.torch_dir else None)
    result.precision = (source.precisions.get(loaded.file.name, "") if loaded.file else "") or backend.precision
    result.size_mb = _size_mb(source, loaded)
    result.providers_used, result.threads_used, result.threads_how = loaded.providers, loaded.threads, loaded.threads_how
    result.load_s = loaded.load_s
    if backend.gpu and loaded.providers and loaded.providers[0] != backend.provider:
        result.status, result.reason = "skipped", f"onnxruntime fell back to {', '.join(loaded.providers)}"
        return result, None
    result.shapes = measure_shapes(loaded, inputs, args)
    logits = None
    if data is not None:
        logits, seconds = data_logits(loaded, data)
        result.accuracy = score(backend.name, logits, seconds, data, reference)
    if task_data is not None and loaded.run_outputs is not None:
        result.task_metric = task_metric(loaded.run_outputs, task_data)
    rss_after = _rss_mb()
    result.rss_delta_mb = rss_after - rss_before if rss_after is not None and rss_before is not None else None
    result.gpu_memory_mb = gpu_memory_mb(os.getpid()) if backend.gpu else None
    del loaded
    gc.collect()
    return result, logits
