"""`bertedge predict`, `serve` and `bench`: running a bundle (predict and serve share one
runtime option group, `runtime_options`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bertedge.cli.common import (
    THREADS_HELP,
    columns_from,
    csv_list,
    data_options,
    int_list,
    runtime_from,
    runtime_options,
    user_errors,
)
from bertedge.errors import BertedgeError


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--input", "-i", "input_", type=click.Path(path_type=Path, allow_dash=True),
              help="Input file (.txt, .csv, .tsv, .jsonl); '-' or no texts reads stdin.")
@click.option("--format", "format_", type=click.Choice(["txt", "csv", "tsv", "jsonl"]), default=None,
              help="Input format (default: from the file suffix; stdin: one text per line).")
@click.option("--text-column", default="text,sentence,content", show_default=True,
              help="CSV column / JSONL field with the text; comma-separated alternatives, the first present wins.")
@click.option("--text-pair-column", default=None, help="Column / field with the second text of a pair (JSONL default: text_pair).")
@click.option("--output", type=click.Choice(["jsonl", "table"]), default="jsonl", show_default=True,
              help="Output format: one JSON object per input line, or a table.")
@runtime_options
@click.option("--quiet", "-q", is_flag=True, help="No summary / latency report on stderr.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: stream stdin/--input to stdout; ray: Ray Data actors, --input file/folder/glob to --out.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Write predictions here instead of stdout, complete or not at all (ray: a .parquet / "
                   ".jsonl file in input order, or a folder of part files).")
@click.option("--errors", "errors_out", type=click.Path(path_type=Path), default=None,
              help="[ray] Error rows as JSONL (default: OUT.errors.jsonl).")
@click.option("--id-column", default=None, help="[ray] Id column kept in the output (default: 'id' if present, else the row number).")
@click.option("--address", default=None, help="[ray] Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--actors", type=int, default=None, help="[ray] Predictor actors (default: cluster CPUs / --threads-per-actor).")
@click.option("--threads-per-actor", type=int, default=1, show_default=True,
              help="[ray] CPUs Ray reserves per actor (its session threads when --threads is 0).")
@click.option("--ship-bundle/--shared-bundle", default=None,
              help="[ray] Ship the bundle through the object store, or load BUNDLE's path on every node "
                   "(default: ship when connecting to a cluster).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (ray: and its errors file).")
@user_errors
def predict(**opts: Any) -> None:
    """Predict with a bundle; JSONL (or a table) on stdout, latency report on stderr.

    \b
    Examples:
      bertedge predict runs/bundle "a gripping film" "a tedious mess"
      bertedge predict runs/bundle --input reviews.csv --text-column review > predictions.jsonl
      cat texts.txt | bertedge predict runs/bundle.tar.gz --output table
      bertedge predict runs/bundle --engine ray --input 'data/*.parquet' --out preds.parquet
    \b
    Every input line gives exactly one output line, in order; an empty or non-UTF-8 line
    gives {"line": N, "error": ...} instead of stopping the run. A row whose inference fails
    gets an error record too, and the run then exits non-zero. With --engine ray, such rows
    go to OUT.errors.jsonl and rows in = predicted + errors is checked at the end.
    """
    if opts["engine"] == "ray":
        predict_ray(opts)
        return
    ray_only = [f"--{k.replace('_', '-')}" for k in ("errors_out", "id_column", "address", "actors")
                if opts[k] is not None]
    if ray_only:
        raise click.UsageError(f"{', '.join(ray_only)}: for --engine ray only")
    import sys

    from bertedge.runtime.predict import PredictArgs

    args = PredictArgs(
        bundle=opts["bundle"], texts=list(opts["texts"]), input=opts["input_"], format=opts["format_"],
        text_columns=tuple(csv_list(opts["text_column"])), pair_columns=tuple(csv_list(opts["text_pair_column"])),
        output=opts["output"], out=opts["out"], overwrite=opts["overwrite"], runtime=runtime_from(opts),
        report=not opts["quiet"])
    if sys.stdout is None and args.out is None:  # started with stdout closed (`>&-`): no sys.stdout
        raise BertedgeError("stdout is closed, so predictions have nowhere to go",
                            "redirect it instead: > predictions.jsonl, or pass --out FILE")
    summary = run_local(args)
    if summary.failed:
        raise BertedgeError(f"{summary.failed} row(s) could not be predicted (inference failed); every "
                            "row has its output line, those rows an error record",
                            "see the error records for the engine's message")


def run_local(args: Any) -> Any:
    """`run_predict` on the real stdout: a closed pipe (`| head`) or a full disk ends it in one line."""
    import sys

    from bertedge.runtime.predict import StdoutError, run_predict

    try:
        return run_predict(args, sys.stdout, sys.stderr)
    except BrokenPipeError:  # `| head` closed the pipe: stop quietly, like other Unix tools
        quiet_stdout()
        sys.exit(1)
    except StdoutError:  # e.g. > /dev/full: the exit's own flush must not fail a second time
        quiet_stdout()
        raise


def quiet_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so what is still buffered flushes without an error."""
    import os
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. click's test runner)
        pass


def predict_ray(opts: dict[str, Any]) -> None:
    """`predict --engine ray`: options -> DistributedArgs (with the RuntimeOptions) -> summary on stderr."""
    from bertedge.edges.ray import BundleTransport, DistributedArgs, predict_dataset

    if opts["texts"]:
        raise click.UsageError("--engine ray reads --input, not texts on the command line")
    if not opts["input_"] or not opts["out"]:
        raise click.UsageError("--engine ray needs --input (a file, folder or glob) and --out")
    if opts["format_"] or opts["output"] != "jsonl":
        raise click.UsageError("--engine ray takes the format from each file's suffix and the output "
                               "format from --out; drop --format / --output")
    ship = opts["ship_bundle"]
    report = predict_dataset(DistributedArgs(
        bundle=opts["bundle"], inputs=[str(opts["input_"])], output=opts["out"], errors=opts["errors_out"],
        text_columns=tuple(csv_list(opts["text_column"])), pair_columns=tuple(csv_list(opts["text_pair_column"])),
        id_column=opts["id_column"], address=opts["address"], actors=opts["actors"],
        threads_per_actor=opts["threads_per_actor"], runtime=runtime_from(opts), progress=not opts["quiet"],
        transport=BundleTransport.AUTO if ship is None else BundleTransport.SHIP if ship else BundleTransport.PATH,
        overwrite=opts["overwrite"],
    ))
    click.echo(report.format(), err=True)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch-size", default=32, show_default=True,
              help="Most texts coalesced from concurrent requests into one batch (1 = one call per request).")
@click.option("--max-batch-tokens", default=0, show_default=True,
              help="Most padded tokens (texts x the longest) per batch, so one long text does not pad "
                   "many short ones (0 = no cap).")
@click.option("--max-wait-ms", default=5.0, show_default=True,
              help="Longest a request waits for others to join its batch.")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="Let idle onnxruntime threads busy-wait between runs (faster on dedicated cores; "
                   "on cores shared with the server and its clients it costs throughput).")
@click.option("--workers", default=1, show_default=True,
              help="Batches predicted at once, each on its own thread (e.g. --threads 1 --workers 4 on 4 cores).")
@click.option("--max-queue", default=512, show_default=True,
              help="Most texts waiting for a batch; beyond it requests get 503 with Retry-After.")
@click.option("--request-timeout", default=30.0, show_default=True,
              help="Seconds a request may wait for its prediction before a 504 (0 = no deadline).")
@runtime_options
@click.option("--max-texts", default=64, show_default=True, help="Most texts in one request.")
@click.option("--max-chars", default=20_000, show_default=True, help="Most characters in one text (or text_pair).")
@click.option("--graceful-timeout", default=30, show_default=True,
              help="Seconds in-flight requests may take to finish on shutdown.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True, help="Server log level.")
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
@user_errors
def serve(**opts: Any) -> None:
    """Serve a bundle over HTTP with dynamic batching (needs `pip install bertedge[serve]`).

    \b
    Examples:
      bertedge serve runs/bundle --port 8000
      curl -s localhost:8000/v1/predict -d '{"texts": ["a gripping film", "a tedious mess"]}'
    \b
    Endpoints: POST /v1/predict, GET /v1/model, /healthz, /readyz, /metrics, /docs.
    """
    try:
        from bertedge.edges.serve import ServeArgs, ServeConfig
        from bertedge.edges.serve import serve as run
    except ImportError as e:
        raise BertedgeError(f"bertedge serve needs FastAPI, uvicorn and prometheus-client ({e})",
                            "pip install 'bertedge[serve]'") from None

    config = ServeConfig(max_batch_size=opts["max_batch_size"], max_wait_ms=opts["max_wait_ms"],
                         max_batch_tokens=opts["max_batch_tokens"] or None, run_batch_size=opts["batch_size"],
                         max_texts=opts["max_texts"], max_chars=opts["max_chars"], max_queue=opts["max_queue"],
                         request_timeout_s=opts["request_timeout"], workers=opts["workers"],
                         runtime=runtime_from(opts, spin=opts["spin"]))
    run(ServeArgs(bundle=opts["bundle"], host=opts["host"], port=opts["port"], config=config,
                  log_level=opts["log_level"], access_log=opts["access_log"],
                  graceful_timeout_s=opts["graceful_timeout"]))


@click.command()
@click.argument("model_or_bundle", type=click.Path(path_type=Path))
@click.option("--backends", default="", help="Comma-separated: torch, an artifact kind of the folder (fp32, fused, int8, int8-static, "
              "int8-openvino, cascade, ...), cuda, cuda-fp16, tensorrt (default: every one the folder has, GPU ones when their provider works).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Sequences per call.")
@click.option("--seq-lens", default=None, help="Tokens per sequence [default: 16,64,128,256 up to the model's limit].")
@click.option("--threads", default=0, show_default=True, help=THREADS_HELP)
@click.option("--duration", default=0.0, help="Seconds of timed runs per shape [default: 2 when --runs is not given].")
@click.option("--runs", default=0, help="Fixed number of timed runs per shape instead of --duration.")
@click.option("--warmup", default=3, show_default=True, help="Untimed runs per shape first.")
@click.option("--data", type=click.Path(path_type=Path), help="Texts for the inputs; labelled: accuracy and agreement per backend.")
@data_options
@click.option("--max-data-rows", default=0, show_default=True, help="Seeded subset of --data (0 = all rows).")
@click.option("--data-batch-size", default=32, show_default=True, help="Batch size of the length-bucketed --data pass.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Folder for bench.json, bench.md and plots [default: MODEL_OR_BUNDLE-bench].")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Measure cold start and peak RSS in a fresh process per backend.")
@click.option("--cold-start-runs", default=3, show_default=True, help="Fresh processes per backend (median reported).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--seed", default=0, show_default=True, help="Seed for input construction and --max-data-rows.")
@user_errors
def bench(**opts: Any) -> None:
    """Benchmark an export folder, a bundle or a model folder: latency, throughput, memory, accuracy.

    \b
    Examples:
      bertedge bench runs/export --batch-sizes 1,32 --seq-lens 16,128 --threads 2
      bertedge bench runs/export --backends torch,int8 --data dev.tsv --text-column content --runs 50
      bertedge bench runs/bundle --backends fp32,cuda --out runs/bench-gpu
    \b
    Writes bench.json (with CPU, ISA flags and library versions), bench.md and PNG plots.
    """
    from rich.console import Console

    from bertedge.toolchain.bench import BenchArgs, render
    from bertedge.toolchain.bench import bench as run

    model: Path = opts["model_or_bundle"]
    args = BenchArgs(
        model=model, backends=tuple(csv_list(opts["backends"])), batch_sizes=tuple(int_list(opts["batch_sizes"])),
        seq_lens=tuple(int_list(opts["seq_lens"] or "")), threads=opts["threads"], duration=opts["duration"],
        runs=opts["runs"], warmup=opts["warmup"], data=opts["data"],
        columns=columns_from(opts["text_column"], opts["text_pair_column"], opts["label_column"]),
        max_data_rows=opts["max_data_rows"], data_batch_size=opts["data_batch_size"],
        out=opts["out"] or model.parent / f"{model.resolve().name}-bench", cold_start=opts["cold_start"],
        cold_start_runs=opts["cold_start_runs"], plots=not opts["no_plots"], seed=opts["seed"],
    )
    report = run(args, echo=click.echo)
    console = Console(width=max(Console().width, 160))
    for table in render(report):
        console.print(table)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"results written to {report.files.get('json')}")
