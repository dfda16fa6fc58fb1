"""The job: check everything on the driver, start or join Ray, run the three stages, shut down."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from bertedge.edges.ray.actors import (
    FAULT_MARKER_ENV,
    FAULT_TEXT_ENV,
    BundlePredictor,
    ProgressCounter,
    ship_bundle,
)
from bertedge.edges.ray.args import BundleTransport, DistributedArgs, DistributedReport
from bertedge.edges.ray.inputs import parse_files, read_special, resolve_id_column
from bertedge.edges.ray.writer import write_errors, write_output
from bertedge.errors import BertedgeError, find_in_chain
from bertedge.runtime.outputs import Terminated, atomic_output, signal_name, terminate_cleanly

WINDOW_BATCHES = 8  # rows per actor call = 8 inference batches, as the local engine's read window
BLOCKS_PER_ACTOR = 8  # input blocks per actor: load balance and a small retry unit


def predict_dataset(args: DistributedArgs, log: TextIO | None = None) -> DistributedReport:
    """Predict every row of the inputs with a Ray actor pool; write output and error rows.

    The bundle (its `expect_digest` pin included) and the output's place are checked before Ray
    starts; SIGTERM or Ctrl-C shuts down the Ray this call started, removes partial outputs and
    exits with 143 (130) after one line on `log`.

    Args:
        args: inputs, bundle, output, runtime and cluster options.
        log: where progress lines go (default stderr; silenced by `args.progress=False`).

    Returns:
        Counts, where things were written, and the time of each stage.

    Raises:
        BertedgeError: bad options, bundle or inputs, an output that cannot be written, Ray
            missing, or rows lost (never expected).
        Terminated: SIGTERM or Ctrl-C.
    """
    try:
        import ray
    except ImportError:
        raise BertedgeError("--engine ray needs Ray", "pip install 'bertedge[ray]'") from None
    log = log or sys.stderr
    started = time.perf_counter()
    text_columns, pair_columns = bundle_task(args.bundle, args.runtime.expect_digest).columns(
        args.text_columns, args.pair_columns)
    args = replace(args, text_columns=text_columns, pair_columns=pair_columns)
    special = read_special(args.files)
    id_column, int_ids = resolve_id_column(args.files, special, args.id_column, args.max_line_bytes)
    try:
        with atomic_output(args.output, folder=not args.single_file_output, what="the predictions",
                           announce=False) as target, \
                ray_session(args):
            try:
                return run_job(args, special, id_column, int_ids, target, log, started,
                               time.perf_counter() - started)
            except Exception as e:  # Ray wraps a worker's BertedgeError; show the user the original
                cause = user_error_in(e)
                if cause is None:
                    raise
                raise BertedgeError(cause.problem, cause.fix) from None
    except (Terminated, KeyboardInterrupt) as e:  # after Ray's shutdown, so this is the last line
        code = e.code if isinstance(e, Terminated) and isinstance(e.code, int) else 130
        log.write(f"stopped by {signal_name(code)}: no output written"
                  f"{'' if ray.is_initialized() else ', Ray shut down'}\n")
        log.flush()
        raise Terminated(code) from None


@contextlib.contextmanager
def ray_session(args: DistributedArgs) -> Iterator[None]:
    """Start a local Ray (or join `address`) unless one is up; shut down the one it started on
    the way out, whatever happens. SIGTERM and SIGINT are handled here, after `ray.init` (which installs its
    own handler, under which the driver aborts and leaves Ray's agents running).
    """
    import ray

    owned = not ray.is_initialized()
    ray_data_log = logging.getLogger("ray.data")
    level = ray_data_log.level
    try:  # ray.init inside: a signal while it starts still shuts down what it started
        if owned:
            local = not (args.address or os.environ.get("RAY_ADDRESS"))
            ray.init(address=args.address, num_cpus=args.num_cpus if local else None, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True)
        import ray.data  # noqa: F401  (configures its loggers, which are quieted next)

        ray_data_log.setLevel(logging.WARNING)  # Ray Data's per-stage INFO lines drown the progress
        with terminate_cleanly((signal.SIGTERM, signal.SIGINT)):  # Ctrl-C too: Ray Data may swallow KeyboardInterrupt
            yield
    except (Terminated, KeyboardInterrupt):
        if owned:
            no_auto_init()
        raise
    finally:
        ray_data_log.setLevel(level)
        if owned:
            ray.shutdown()


def no_auto_init() -> None:
    """Keep Ray Data threads still running from starting a fresh Ray once this one is shut down
    (any Ray call auto-initializes; RAY_ENABLE_AUTO_CONNECT=0 is read only when Ray is imported)."""
    with contextlib.suppress(ImportError):  # a private module: gone in some Ray, then nothing to do
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False


def bundle_task(bundle: Path, expect_digest: str | None) -> Any:
    """The bundle's task, after verifying it here on the driver (checksums and the digest pin
    included), so a wrong, corrupt or unreadable bundle is one clean error before Ray starts."""
    from bertedge.runtime.bundle import open_bundle
    from bertedge.runtime.meta import meta_from_manifest

    with open_bundle(bundle, expect_digest=expect_digest) as opened:
        return meta_from_manifest(opened.manifest).task


def user_error_in(error: BaseException) -> BertedgeError | None:
    """The BertedgeError inside a (possibly Ray-wrapped) exception chain, if any."""
    from ray.exceptions import RayTaskError

    return find_in_chain(error, BertedgeError, lambda e: e.cause if isinstance(e, RayTaskError) else None)


def run_job(args: DistributedArgs, special: dict[int, bytes], id_column: str | None, int_ids: bool,
            target: Path, log: TextIO, started: float, init_s: float) -> DistributedReport:
    """The Ray Data pipeline on a connected Ray; see the package docstring."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own rows done / total line instead
    ctx.execution_options.preserve_order = True  # output blocks in (file, row) order: no sort
    address = cluster_address(args)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    actors = args.actors or max(1, cpus // args.threads_per_actor)
    check_capacity(actors, args.threads_per_actor, cpus)
    transport = args.transport
    if transport is BundleTransport.AUTO:
        transport = BundleTransport.SHIP if address != "local" else BundleTransport.PATH

    t0 = time.perf_counter()
    window = WINDOW_BATCHES * args.runtime.batch_size
    files = [str(f) for f in args.files]
    parse: Any = parse_files  # a generator of blocks; Ray's stubs only admit single returns
    parsed = ray.data.from_items([{"file": i} for i in range(len(files))], override_num_blocks=len(files)).map_batches(
        parse, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs={"files": files, "special": {i: ray.put(data) for i, data in special.items()},
                   "text_columns": args.text_columns, "pair_columns": args.pair_columns,
                   "id_column": id_column, "int_ids": int_ids, "max_line_bytes": args.max_line_bytes,
                   "block_rows": window}).materialize()
    rows_in = parsed.count()
    if rows_in == 0:
        raise BertedgeError(f"the input has no rows ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''} "
                            f"{'is' if len(files) == 1 else 'are'} empty)", "check --input")
    # Ray merges the parse stage's output into few large blocks; split them so every actor gets
    # work (here, before the actors hold the CPUs that this split needs).
    blocks = max(actors, min(-(-rows_in // window), BLOCKS_PER_ACTOR * actors))
    parsed = parsed.repartition(blocks, shuffle=False).materialize()
    read_s = time.perf_counter() - t0

    counter: Any = ray.remote(num_cpus=0)(ProgressCounter).remote()
    shipped = [ray.put(ship_bundle(args.bundle))] if transport is BundleTransport.SHIP else None
    t1, t1_wall = time.perf_counter(), time.time()
    predicted = parsed.map_batches(
        BundlePredictor, batch_size=window, batch_format="pyarrow",
        zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=args.threads_per_actor,
        fn_constructor_kwargs={"bundle": str(args.bundle), "shipped": shipped,
                               "options": args.runtime.replace(threads=args.session_threads),
                               "progress": counter, "fault_marker": os.environ.get(FAULT_MARKER_ENV),
                               "fault_text": os.environ.get(FAULT_TEXT_ENV)},
    )  # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: a killed actor
    # restarts and its batch is retried (tests/test_distributed.py kills one to check)
    predicted = run_with_progress(predicted, counter, rows_in, log if args.progress else None)
    predict_s = time.perf_counter() - t1
    first = ray.get(counter.state.remote())[1]
    first_batch_s = first - t1_wall if first else predict_s

    t2 = time.perf_counter()
    keep = ["file", "row", "line", "id"] if len(files) > 1 else ["row", "line", "id"]
    rows_ok, truncated, error_rows = write_output(predicted, args, files, keep, rows_in, target)
    errors = write_errors(error_rows, args.errors_path)
    write_s = time.perf_counter() - t2
    return DistributedReport(
        rows_in=rows_in, rows_ok=rows_ok, rows_error=len(error_rows), truncated=truncated, files=len(files),
        output=str(args.output), errors=str(errors) if errors else None, address=address,
        actors=actors, threads_per_actor=args.threads_per_actor, transport=transport.value,
        init_s=init_s, read_s=read_s, first_batch_s=min(max(0.0, first_batch_s), predict_s), predict_s=predict_s,
        write_s=write_s, wall_s=time.perf_counter() - started, rows_per_s=rows_in / max(predict_s, 1e-9))


def cluster_address(args: DistributedArgs) -> str:
    """'local' for an instance on this machine, else the address connected to."""
    return args.address or os.environ.get("RAY_ADDRESS") or "local"


def check_capacity(actors: int, threads: int, cpus: int) -> None:
    """Fail fast when the actor pool cannot fit: a fixed pool waits forever for missing CPUs."""
    if cpus and actors * threads > cpus:
        raise BertedgeError(f"{actors} actor(s) x {threads} thread(s) need {actors * threads} CPUs, "
                            f"the Ray cluster has {cpus}",
                            "lower --actors or --threads-per-actor, or add nodes")


def run_with_progress(ds: Any, counter: Any, total: int, log: TextIO | None,
                      every_s: float = 2.0) -> Any:
    """Materialize ds while a thread prints rows done / total and rows/s from the counter.

    Ray Data runs here, on the calling (main) thread, so SIGTERM or Ctrl-C stops it where it
    stands and it shuts its own tasks down while Ray is still up; the reporter is joined first.
    """
    import ray

    stop = threading.Event()

    def report() -> None:
        start = time.perf_counter()
        while not stop.wait(every_s) and log is not None:
            with contextlib.suppress(Exception):  # a slow answer: skip this line
                rows = min(ray.get(counter.state.remote(), timeout=every_s)[0], total)
                elapsed = time.perf_counter() - start
                log.write(f"rows {rows}/{total} ({100 * rows / total:.0f}%), "
                          f"{rows / max(elapsed, 1e-9):.0f} rows/s, {elapsed:.0f} s\n")
                log.flush()

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        return ds.materialize()
    finally:
        stop.set()
        reporter.join()
