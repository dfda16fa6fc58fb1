"""Ray batch prediction vs the local engine: rows/s on SST-2 sentences, Ray's start-up overhead.

    python benchmarks/ray_predict.py --bundle runs/bundle --data train.tsv

Runs, side by side in one process on the same input file: `--engine local` (the streaming
predictor, onnxruntime on all cores), then `--engine ray` with each of `--actors` (default 1 and
2; a fresh local Ray per run, so its start-up is measured every time). Prints settings first, a
table, the scaling note below, and appends one JSON line per run set to
benchmarks/results/ray_predict.jsonl (the last set also to ray_predict.json).

What the numbers mean. `predict rows/s` is the Ray predict stage alone (actors started, bundle
loaded and verified, all rows through `Predictor.predict`); `end-to-end rows/s` divides by the whole
wall time, Ray start-up, reading and writing included. `overhead s` = wall - (predict - first
batch): what the job costs beyond the per-row work.

How throughput grows with nodes. Per-row work (tokenize, ONNX inference, decode) is done by the
actors and splits evenly over them: with N nodes of C cores and T threads per actor, the predict
stage should reach about N*C/T times the one-actor rate, as long as each actor has whole cores to
itself (on this 2-core box 2 actors compete with the driver, Ray's raylet and the reader, so
expect less than 2x). The fixed part does not shrink with nodes: starting or joining Ray (seconds),
one bundle load and SHA-256 check per actor (grows with model size; shipping the bundle adds one
object-store transfer per node), reading and parsing each input file in one task (split big inputs
into many files), and the driver streaming the single ordered output file (write a folder of part
files instead at cluster scale). So Ray pays off once rows / (rate per actor) is well above those
fixed seconds: for tens of thousands of rows on one small machine the local engine is as fast or
faster; for millions of rows over several nodes, Ray's rate scales with cores.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from bertedge.edges.ray import DistributedArgs, predict_dataset
from bertedge.runtime import PredictArgs, Predictor, run_predict
from bertedge.runtime.options import RuntimeOptions

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder or archive")
    p.add_argument("--data", type=Path, required=True, help="texts to predict, e.g. SST-2's train.tsv")
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--rows", type=int, default=0, help="first N rows of --data (0 = all)")
    p.add_argument("--actors", default="1,2", help="Ray actor counts to run")
    p.add_argument("--threads-per-actor", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    p.add_argument("--out", type=Path, default=RESULTS / "ray_predict.jsonl")
    p.add_argument("--min-rows", type=int, default=50_000, help="warn when fewer rows are measured")
    return p.parse_args()


def subset(data: Path, rows: int, column: str, folder: Path) -> tuple[Path, int]:
    """The first `rows` rows (0 = all) of a TSV / CSV as a file both engines read; its row count."""
    delimiter = "\t" if data.suffix.lower() == ".tsv" else ","
    with data.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        texts = [r[column] for r, _ in zip(reader, range(rows or sys.maxsize))]
    path = folder / f"input{data.suffix}"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow([column])
        writer.writerows([t] for t in texts)
    return path, len(texts)


def run_local(args: argparse.Namespace, path: Path, n: int) -> dict[str, float]:
    """--engine local on the file: stream it through the predictor, stdout discarded."""
    Predictor(args.bundle).predict(["warm up the page cache"])  # not timed: first disk read of the model
    t0 = time.perf_counter()
    summary = run_predict(PredictArgs(bundle=args.bundle, input=path, text_columns=(args.text_column,),
                                      runtime=RuntimeOptions(batch_size=args.batch_size), report=False),
                          io.StringIO(), io.StringIO())
    wall = time.perf_counter() - t0
    assert summary.items + summary.errors == n, (summary.items, summary.errors, n)
    return {"rows": n, "wall_s": wall, "rows_per_s": n / wall, "errors": summary.errors}


def run_ray(args: argparse.Namespace, path: Path, n: int, actors: int, folder: Path) -> dict[str, float]:
    """--engine ray with a fresh local Ray of --num-cpus CPUs."""
    out = folder / f"ray-{actors}.parquet"
    report = predict_dataset(DistributedArgs(
        bundle=args.bundle, inputs=[str(path)], output=out, text_columns=(args.text_column,),
        actors=actors, threads_per_actor=args.threads_per_actor, runtime=RuntimeOptions(batch_size=args.batch_size),
        num_cpus=args.num_cpus, progress=False, overwrite=True))
    assert report.rows_in == n == report.rows_ok + report.rows_error, report
    steady = report.predict_s - report.first_batch_s
    return {"actors": actors, "rows": n, "wall_s": report.wall_s, "rows_per_s": n / report.wall_s,
            "predict_rows_per_s": report.rows_per_s, "steady_rows_per_s": n / max(steady, 1e-9),
            "init_s": report.init_s, "read_s": report.read_s, "first_batch_s": report.first_batch_s,
            "predict_s": report.predict_s, "write_s": report.write_s,
            "overhead_s": report.wall_s - steady, "errors": report.rows_error}


def main() -> None:
    args = parse_args()
    import ray

    actors = [int(a) for a in args.actors.split(",") if a.strip()]
    manifest = json.loads((args.bundle / "manifest.json").read_text()) if args.bundle.is_dir() else {}
    settings = {
        "data": str(args.data), "rows_requested": args.rows, "bundle": str(args.bundle),
        "precision": manifest.get("precision"), "model_type": manifest.get("model_type"),
        "max_length": manifest.get("max_length"), "actors": actors,
        "threads_per_actor": args.threads_per_actor, "batch_size": args.batch_size,
        "num_cpus": args.num_cpus, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(), "ray": ray.__version__, "onnxruntime": ort.__version__,
    }
    print("settings:", json.dumps(settings))
    with tempfile.TemporaryDirectory(prefix="bertedge-ray-bench-") as tmp:
        path, n = subset(args.data, args.rows, args.text_column, Path(tmp))
        if n < args.min_rows:
            print(f"warning: {n} rows < {args.min_rows}: a smoke run, not a benchmark", file=sys.stderr)
        local = run_local(args, path, n)
        print(f"local engine: {n} rows in {local['wall_s']:.1f} s, {local['rows_per_s']:.0f} rows/s")
        runs = []
        for a in actors:
            r = run_ray(args, path, n, a, Path(tmp))
            runs.append(r)
            print(f"ray {a} actor(s): wall {r['wall_s']:.1f} s, ray init {r['init_s']:.1f} s, "
                  f"first batch {r['first_batch_s']:.1f} s, predict {r['predict_s']:.1f} s")
    print()
    print(f"{'engine':<16}{'end-to-end rows/s':>18}{'predict rows/s':>16}{'vs local':>10}{'overhead s':>12}")
    print(f"{'local':<16}{local['rows_per_s']:>18.0f}{local['rows_per_s']:>16.0f}{1.0:>10.2f}{0.0:>12.1f}")
    for r in runs:
        print(f"{'ray x' + str(int(r['actors'])):<16}{r['rows_per_s']:>18.0f}{r['steady_rows_per_s']:>16.0f}"
              f"{r['rows_per_s'] / local['rows_per_s']:>10.2f}{r['overhead_s']:>12.1f}")
    if len(runs) > 1:
        print(f"\nactor scaling (steady predict rate): x{runs[-1]['steady_rows_per_s'] / runs[0]['steady_rows_per_s']:.2f} "
              f"from {int(runs[0]['actors'])} to {int(runs[-1]['actors'])} actors")
    print("\n" + __doc__.split("How throughput grows with nodes.")[1].strip())
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": settings, "rows": n,
              "local": local, "ray": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
