"""Latency and throughput of a bundle through `bertedge.runtime`, nanoGPT bench.py style.

Settings are printed first; then warm-up, then timed runs with time.perf_counter():
  * per-item latency at batch 1 for a short input (~8 tokens) and a 128-token input
    (side by side in one run: their ratio holds on a noisy machine, absolute times do not),
  * throughput over a file of texts (or seeded synthetic texts) through the same streaming
    path as `bertedge predict`, with the tokenize / inference / decode split.
One JSON line is appended to benchmarks/results/runtime_latency.jsonl for history.

    python benchmarks/runtime_latency.py runs/demo/bundle --threads 2
    python benchmarks/runtime_latency.py runs/demo/bundle.tar.gz --input dev.txt --batch-size 64
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.predict import predict_stream
from bertedge.runtime.predictor import LatencyRecorder, Predictor
from bertedge.runtime.records import InputFormat, input_format_of, read_records, records_from_texts
from bertedge.toolchain.bench.environment import cpu_facts
from bertedge.toolchain.bench.report import append_history

WORDS = ("the film was a gripping and beautifully acted story with a plot that never once "
         "felt tedious or dull").split()
RESULTS = Path(__file__).parent / "results" / "runtime_latency.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz / .zip")
    p.add_argument("--input", type=Path, default=None, help="texts for the throughput run (default: synthetic)")
    p.add_argument("--format", choices=[f.value for f in InputFormat], default=None, help="input format")
    p.add_argument("--text-column", default="text,sentence,content",
                   help="CSV/TSV column or JSONL field with the text (first present wins)")
    p.add_argument("--synthetic", type=int, default=2000, help="synthetic texts when no --input")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = the engine's default: one per usable CPU)")
    p.add_argument("--providers", default="cpu", help="cpu, auto, cuda or provider names")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput run")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls before each timed loop")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per input length")
    p.add_argument("--seed", type=int, default=1337, help="seeds the synthetic texts")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSONL file the result line is appended to")
    return p.parse_args()


def text_of_length(predictor: Predictor, tokens: int) -> tuple[str, int]:
    """A sentence that tokenizes to `tokens` tokens (capped by the bundle's max length)."""
    words: list[str] = []
    while True:
        words.append(WORDS[len(words) % len(WORDS)])
        n = len(predictor.tokenizer.encode(" ".join(words)).ids)
        if n >= min(tokens, predictor.max_length):
            return " ".join(words), n


def time_batch1(predictor: Predictor, text: str, warmup: int, runs: int) -> dict[str, float]:
    """Per-item latency percentiles of predict([text]) at batch 1, in ms."""
    for _ in range(warmup):
        predictor.predict([text], batch_size=1)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        predictor.predict([text], batch_size=1)
        times[i] = time.perf_counter() - t0
    ms = times * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def synthetic_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 40))) for _ in range(n)]


def throughput(predictor: Predictor, args: argparse.Namespace) -> dict[str, Any]:
    """Stream the file (or synthetic texts) through predict_stream, as `bertedge predict` does."""
    window = 8 * args.batch_size
    texts = synthetic_texts(args.synthetic, args.seed) if args.input is None else None
    predictor.predict((texts or ["warm-up text"] * window)[:window], batch_size=args.batch_size)
    recorder = LatencyRecorder()
    if texts is not None:
        records = records_from_texts(texts)
        n = sum(1 for _ in predict_stream(predictor, records, window, recorder))
    else:
        fmt = InputFormat(args.format) if args.format else input_format_of(args.input)
        with args.input.open("rb") as f:
            n = sum(1 for _ in predict_stream(predictor, read_records(f, fmt, tuple(args.text_column.split(","))),
                                                window, recorder))
    return {"lines": n, **recorder.report().to_dict()}


def main() -> None:
    args = parse_args()
    predictor = Predictor(args.bundle, RuntimeOptions(providers=args.providers, threads=args.threads,
                                                      batch_size=args.batch_size))
    facts = predictor.describe()
    settings = {
        "bundle": str(args.bundle), "input": str(args.input or f"synthetic x{args.synthetic}"),
        "precision": facts["precision"], "model_type": facts["model_type"],
        "providers": predictor.providers, "threads": args.threads, "batch_size": args.batch_size,
        "warmup": args.warmup, "runs": args.runs, "seed": args.seed, "onnxruntime": ort.__version__,
        "cpu": cpu_facts(), "python": platform.python_version(),
    }
    for key, value in settings.items():
        print(f"{key:>12}: {value}")
    short_text, short_tokens = text_of_length(predictor, 8)
    long_text, long_tokens = text_of_length(predictor, 128)
    short = {"tokens": short_tokens, **time_batch1(predictor, short_text, args.warmup, args.runs)}
    long = {"tokens": long_tokens, **time_batch1(predictor, long_text, args.warmup, args.runs)}
    for name, r in (("short", short), ("long", long)):
        print(f"batch 1, {r['tokens']:>3} tokens ({name}): p50 {r['p50_ms']:.3f} ms  "
              f"p90 {r['p90_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    ratio = long["p50_ms"] / max(short["p50_ms"], 1e-9)
    print(f"long / short p50 ratio: {ratio:.2f}")
    tput = throughput(predictor, args)
    print(f"throughput: {tput['lines']} lines, {tput['throughput_items_s']:.1f} items/s at batch "
          f"{args.batch_size} (tokenize {tput['tokenize_s']:.3f} s, inference {tput['inference_s']:.3f} s, "
          f"decode {tput['decode_s']:.3f} s)")
    line = {**settings,
            "short": short, "long": long, "long_short_ratio": ratio, "throughput": tput}
    append_history(args.results, line)


if __name__ == "__main__":
    main()
