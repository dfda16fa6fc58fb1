"""Load test of `bertedge serve` against what users deploy today: FastAPI around a transformers
`pipeline()`, on the same model and the same texts, side by side (nanoGPT bench.py style).

Each system runs as a subprocess on a free loopback port:
  bertedge           `python -m bertedge serve BUNDLE` (dynamic batching, its defaults)
  bertedge-unbatched the same with `--max-batch-size 1` (one onnxruntime call per request)
  pipeline           the tutorial recipe: a sync FastAPI endpoint calling
                     `pipeline("text-classification", model=MODEL_DIR)` (PyTorch, fp32)
and is driven by a closed-loop client (one keep-alive connection per concurrent caller, a
warm-up first, then a fixed request count or a time cap) with real SST-2 sentences, one per
request. Reported per (system, concurrency): texts/s, p50/p99 latency, errors, lost answers,
the server's mean batch and CPU per text. The bertedge target is checked at concurrency 32:
texts/s >= 1.5x its own at concurrency 1, and p99 <= 4x the mean batch inference time.

`--soak SECONDS` then drives bertedge open-loop at `--soak-rate` texts/s (default: 2x the
texts/s it sustained at the highest concurrency) and reports requests sent, answered, shed
(503), timed out (504), errors and lost (no answer at all: must be 0), answers that are not
their own text's (checked against a local Predictor on the same bundle), and the server's RSS
over time. Writes serve_load.{json,md} to --out and appends a JSON line to serve_load.jsonl.

    python benchmarks/serve_load.py runs/demo/bundle --model runs/demo/model \
        --concurrency 1,8,32,128 --requests 2000 --time-cap 60 --soak 300
    python benchmarks/serve_load.py /tmp/bundle --systems bertedge --requests 20 --time-cap 5  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.toolchain.bench.environment import cpu_facts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"  # loopback only
SYSTEMS = ("bertedge", "bertedge-unbatched", "pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz / .zip")
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model folder for the pipeline baseline (default: the bundle's "
                        "provenance model_dir)")
    p.add_argument("--systems", default="bertedge,pipeline", help=f"comma-separated: {', '.join(SYSTEMS)}")
    p.add_argument("--data", type=Path, default=DATA, help="TSV / CSV file of sentences")
    p.add_argument("--column", default="content", help="column holding the sentence")
    p.add_argument("--concurrency", default="1,8,32,128", help="comma-separated client concurrencies")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per (system, concurrency)")
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds per (system, concurrency) at most")
    p.add_argument("--warmup", type=int, default=50, help="untimed requests first (at least 2 x concurrency)")
    p.add_argument("--threads", type=int, default=0, help="server threads, both systems (0 = their default)")
    p.add_argument("--serve-args", default="", help="extra `bertedge serve` options, e.g. '--workers 2'")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of open-loop soak on bertedge (0 = none)")
    p.add_argument("--soak-rate", type=float, default=0.0,
                   help="soak arrival rate in texts/s (0 = 2x the texts/s bertedge sustained)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sentence order")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine state)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for serve_load.{json,md,jsonl}")
    p.add_argument("--baseline-server", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.systems = [m.strip() for m in args.systems.split(",") if m.strip()]
    if set(args.systems) - set(SYSTEMS) or min(args.concurrency) < 1 or args.requests < 1:
        p.error(f"--systems takes {', '.join(SYSTEMS)}; --concurrency and --requests must be >= 1")
    return args


# ----------------------------------------------------------------------------- the baseline


def baseline_app(model_dir: Path, threads: int) -> Any:
    """FastAPI + transformers pipeline(), as the deployment tutorials write it."""
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    if threads:
        torch.set_num_threads(threads)
    classifier = pipeline("text-classification", model=str(model_dir), tokenizer=str(model_dir), device=-1)
    app = FastAPI()

    class Texts(BaseModel):
        texts: list[str]

    def predict(body: Texts) -> dict[str, Any]:  # sync: FastAPI runs it in its thread pool
        return {"predictions": classifier(body.texts, truncation=True)}

    predict.__annotations__ = {"body": Texts, "return": dict}  # a local class: no string annotations
    app.post("/v1/predict")(predict)

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def run_baseline_server(model_dir: Path, port: int, threads: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(model_dir, threads), host=HOST, port=port, log_level="warning")


# ----------------------------------------------------------------------------- servers


def read_texts(path: Path, column: str) -> list[str]:
    """The non-empty `column` cells of a TSV / CSV file."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        texts = [row[column].strip() for row in rows if (row.get(column) or "").strip()]
    if not texts:
        sys.exit(f"no texts in column '{column}' of {path}")
    return texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_command(args: argparse.Namespace, system: str, port: int) -> list[str]:
    if system == "pipeline":
        model = args.model or baseline_model(args.bundle)
        return [sys.executable, str(Path(__file__).resolve()), str(args.bundle), "--baseline-server",
                str(model), "--port", str(port), "--threads", str(args.threads)]
    batch = ["--max-batch-size", "1"] if system == "bertedge-unbatched" else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    return [sys.executable, "-m", "bertedge", "serve", str(args.bundle), "--host", HOST, "--port", str(port),
            "--log-level", "warning", *batch, *threads, *args.serve_args.split()]


def baseline_model(bundle: Path) -> Path:
    """The fine-tuned model folder the bundle was exported from (its provenance)."""
    from bertedge.runtime.bundle import open_bundle

    with open_bundle(bundle) as b:
        model_dir = b.manifest.provenance.get("export", {}).get("model_dir")
    if not model_dir or not Path(model_dir).is_dir():
        sys.exit(f"the pipeline baseline needs --model (the bundle names no existing model_dir: {model_dir})")
    return Path(model_dir)


@contextlib.contextmanager
def server(args: argparse.Namespace, system: str, log_path: Path) -> Iterator[tuple[int, int]]:
    """A server subprocess for one system; (its port, its pid) once /readyz says 200."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(server_command(args, system, port), stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env)
        try:
            wait_ready(proc, port, log_path)
            yield port, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with code {proc.returncode}:\n{log_path.read_text()}")
        if get(port, "/readyz")[0] == 200:
            return
        time.sleep(0.2)
    sys.exit(f"server not ready after {timeout_s} s:\n{log_path.read_text()}")


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET, (0, "") when nothing answers."""
    import http.client

    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError:
        return 0, ""


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc; NaN elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def server_batches(port: int) -> tuple[float, float, float]:
    """(texts, predictor calls, seconds in predictor calls) so far, from bertedge's /metrics."""
    status, text = get(port, "/metrics")
    if status != 200:
        return 0.0, 0.0, 0.0
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return (values.get("bertedge_batch_size_sum", 0.0), values.get("bertedge_batch_size_count", 0.0),
            values.get("bertedge_batch_duration_seconds_sum", 0.0))


# ----------------------------------------------------------------------------- the client


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the loopback server.

    httpx costs ~5 ms of CPU per request here, more than the server spends: on a 2-core box
    the load generator would be the bottleneck. This one sends pre-built requests and reads
    Content-Length responses for a few tens of microseconds.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.last_used = time.perf_counter()  # when its last answer arrived
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            self.writer.write(head.encode() + body)
            status = int((await self.reader.readline()).split()[1])
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                close |= name.lower() == "connection" and value.strip().lower() == "close"
            payload = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            await self.close()
            raise
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


@dataclass
class Run:
    """One (system, concurrency) measurement."""

    system: str
    concurrency: int
    requests: int  # requests sent in the timed window
    ok: int  # 200 with exactly one prediction per text
    errors: int  # non-200, transport errors, timeouts
    lost: int  # 200 answers missing a prediction
    wall_s: float
    texts_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float  # texts per predictor call on the server (bertedge only; else NaN)
    batch_ms: float  # mean predictor call time on the server (bertedge only; else NaN)
    server_cpu_ms_per_text: float  # server process CPU time per answered text


async def drive(conns: list[Connection], texts: list[str], n_requests: int, time_cap_s: float,
                start: int) -> tuple[list[float], int, int, int, float]:
    """Closed loop: one caller per connection sends one text per request until n_requests or the cap.

    Returns (latencies in s of good answers, requests sent, errors, lost texts, wall seconds).
    """
    latencies: list[float] = []
    counts = {"sent": 0, "errors": 0, "lost": 0}
    began = time.perf_counter()

    async def caller(conn: Connection) -> None:
        while counts["sent"] < n_requests and time.perf_counter() - began < time_cap_s:
            body = json.dumps({"texts": [texts[(start + counts["sent"]) % len(texts)]]}).encode()
            counts["sent"] += 1
            t0 = time.perf_counter()
            try:
                status, payload = await asyncio.wait_for(conn.post("/v1/predict", body), 120)
            except (OSError, asyncio.IncompleteReadError, IndexError, ValueError, asyncio.TimeoutError):
                counts["errors"] += 1
                continue
            if status != 200:
                counts["errors"] += 1
            elif len(json.loads(payload).get("predictions", [])) != 1:
                counts["lost"] += 1
            else:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(caller(c) for c in conns))
    return latencies, counts["sent"], counts["errors"], counts["lost"], time.perf_counter() - began


def measure(port: int, pid: int, args: argparse.Namespace, system: str, concurrency: int,
            texts: list[str]) -> Run:
    async def main() -> tuple[tuple[list[float], int, int, int, float], tuple[float, ...]]:
        conns = [Connection(HOST, port) for _ in range(concurrency)]
        try:
            warmup = max(args.warmup, 2 * concurrency)
            await drive(conns, texts, warmup, args.time_cap, 0)
            before = (*server_batches(port), cpu_seconds(pid))
            timed = await drive(conns, texts, args.requests, args.time_cap, warmup)
            return timed, (*before, *server_batches(port), cpu_seconds(pid))
        finally:
            for c in conns:
                await c.close()

    (lat, sent, errors, lost, wall), (t0, c0, s0, cpu0, t1, c1, s1, cpu1) = asyncio.run(main())
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    calls = c1 - c0
    return Run(system=system, concurrency=concurrency, requests=sent, ok=len(lat), errors=errors, lost=lost,
               wall_s=round(wall, 3), texts_s=round(len(lat) / wall, 2),
               p50_ms=round(float(np.percentile(ms, 50)), 2), p99_ms=round(float(np.percentile(ms, 99)), 2),
               mean_batch=round((t1 - t0) / calls, 2) if calls else float("nan"),
               batch_ms=round(1000 * (s1 - s0) / calls, 2) if calls else float("nan"),
               server_cpu_ms_per_text=round(1000 * (cpu1 - cpu0) / max(len(lat), 1), 3))


@dataclass
class Soak:
    """An open-loop run at a fixed arrival rate."""

    seconds: float
    rate_texts_s: float
    sent: int = 0
    answered: int = 0  # 200 with one prediction
    shed: int = 0  # 503 (queue full)
    timed_out: int = 0  # 504 (request timeout)
    errors: int = 0  # any other status or a transport error
    error_kinds: dict[str, int] = field(default_factory=dict)  # "status 500", "ConnectionResetError", ...
    stale_retries: int = 0  # requests resent once because an idle connection had just been closed
    stale_idle_min_s: float | None = None  # the shortest idle time of such a connection
    lost: int = 0  # no answer at all by the end of the drain
    not_their_own: int = 0  # an answer whose label and score are not its text's
    rss_mb: list[float] = field(default_factory=list)  # the server's RSS, sampled every ~5 s


def soak(port: int, pid: int, texts: list[str], reference: list[dict[str, Any]], rate: float,
         seconds: float) -> Soak:
    """Send one text per request at `rate` texts/s for `seconds`, reusing idle connections."""
    result = Soak(seconds=seconds, rate_texts_s=round(rate, 1))

    def failed(kind: str) -> None:
        result.errors += 1
        result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1

    async def one(i: int, idle: list[Connection]) -> None:
        reused = bool(idle)
        conn = idle.pop() if idle else Connection(HOST, port)
        k = i % len(texts)
        body = json.dumps({"texts": [texts[k]]}).encode()
        try:
            try:
                status, payload = await asyncio.wait_for(conn.post("/v1/predict", body), 120)
            except (IndexError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                # The server closed this idle keep-alive connection (uvicorn's keep-alive timeout)
                # just as it was reused: retry once on a new one, as HTTP clients do.
                result.stale_retries += 1
                idle_s = round(time.perf_counter() - conn.last_used, 2)
                result.stale_idle_min_s = min(result.stale_idle_min_s or idle_s, idle_s)
                await conn.close()
                status, payload = await asyncio.wait_for(conn.post("/v1/predict", body), 120)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError, asyncio.TimeoutError) as e:
            failed(type(e).__name__)
            await conn.close()
            return
        conn.last_used = time.perf_counter()
        idle.append(conn)
        if status == 503:
            result.shed += 1
        elif status == 504:
            result.timed_out += 1
        elif status != 200:
            failed(f"status {status}")
        else:
            got = json.loads(payload).get("predictions", [])
            result.answered += 1
            if len(got) != 1 or not same_answer(got[0], reference[k]):
                result.not_their_own += 1

    async def main() -> None:
        idle: list[Connection] = []
        tasks: list[asyncio.Task[None]] = []
        began = time.perf_counter()
        next_rss = began
        while (now := time.perf_counter()) - began < seconds:
            due = int((now - began) * rate) + 1
            while result.sent < due:
                tasks.append(asyncio.ensure_future(one(result.sent, idle)))
                result.sent += 1
            if now >= next_rss:
                result.rss_mb.append(round(rss_mb(pid), 1))
                next_rss = now + 5
            await asyncio.sleep(min(0.002, 1 / rate))
        done, pending = await asyncio.wait(tasks, timeout=150) if tasks else (set(), set())
        result.lost = len(pending)
        for task in pending:
            task.cancel()
        result.rss_mb.append(round(rss_mb(pid), 1))
        for conn in idle:
            await conn.close()

    asyncio.run(main())
    return result


def same_answer(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """The same label, or a score within 0.05 where the reference is close to a tie.

    INT8 activations are quantized per batch, so another batch composition can move a score a
    little; another text's answer moves it far more on a trained model.
    """
    if got.get("label") == want.get("label"):
        return abs(float(got.get("score", 0)) - float(want.get("score", 0))) < 0.05
    return abs(float(want.get("score", 1)) - 0.5) < 0.05


# ----------------------------------------------------------------------------- report


def verdict(runs: list[Run]) -> dict[str, Any]:
    """The bertedge targets at c=32: texts/s >= 1.5x its c=1, p99 <= 4x the mean batch time."""
    by = {(r.system, r.concurrency): r for r in runs}
    one, busy = by.get(("bertedge", 1)), by.get(("bertedge", 32))
    if one is None or busy is None:
        return {"measured": False}
    scale = busy.texts_s / one.texts_s if one.texts_s else float("nan")
    p99_ratio = busy.p99_ms / busy.batch_ms if busy.batch_ms else float("nan")
    base = by.get(("pipeline", 32))
    return {"measured": True, "c32_over_c1_texts_s": round(scale, 2), "p99_over_batch_ms": round(p99_ratio, 2),
            "vs_pipeline_texts_s_c32": round(busy.texts_s / base.texts_s, 2) if base and base.texts_s else None,
            "passed": bool(scale >= 1.5 and p99_ratio <= 4 and busy.errors == 0 and busy.lost == 0)}


def markdown(runs: list[Run], settings: dict[str, Any], result: dict[str, Any], soaked: Soak | None) -> str:
    lines = ["# bertedge serve vs FastAPI + transformers pipeline()", "",
             f"{settings['when']} · {settings['cpu']} · {settings['cores']} cores · bundle "
             f"`{settings['bundle']}` ({settings['precision']}) · baseline model `{settings['model']}` · "
             f"1 text/request from `{Path(settings['data']).name}`",
             *(["", f"Note: {settings['note']}"] if settings["note"] else []), "",
             "| system | concurrency | requests | errors | lost | texts/s | p50 ms | p99 ms | mean batch "
             "| batch ms | server CPU ms/text |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.system} | {r.concurrency} | {r.requests} | {r.errors} | {r.lost} | {r.texts_s} "
                     f"| {r.p50_ms} | {r.p99_ms} | {r.mean_batch} | {r.batch_ms} | {r.server_cpu_ms_per_text} |")
    if result.get("measured"):
        versus = (f"{result['vs_pipeline_texts_s_c32']}x the pipeline's texts/s "
                  if result["vs_pipeline_texts_s_c32"] else "")
        lines += ["", f"bertedge at c=32: {result['c32_over_c1_texts_s']}x its c=1 texts/s (target >= 1.5), "
                  f"p99 {result['p99_over_batch_ms']}x the mean batch time (target <= 4), {versus}-> "
                  f"**{'PASS' if result['passed'] else 'FAIL'}**."]
    if soaked is not None:
        lines += ["", f"Soak: {soaked.seconds:g} s at {soaked.rate_texts_s} texts/s: sent {soaked.sent}, "
                  f"answered {soaked.answered}, shed {soaked.shed}, timed out {soaked.timed_out}, errors "
                  f"{soaked.errors} {soaked.error_kinds or ''}, lost {soaked.lost}, not their own {soaked.not_their_own}; server RSS "
                  f"{soaked.rss_mb[0] if soaked.rss_mb else 'n/a'} -> {soaked.rss_mb[-1] if soaked.rss_mb else 'n/a'} MB "
                  f"(max {max(soaked.rss_mb) if soaked.rss_mb else 'n/a'})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.baseline_server is not None:  # the baseline's own process
        run_baseline_server(args.baseline_server, args.port, args.threads)
        return {}
    texts = read_texts(args.data, args.column)
    random.Random(args.seed).shuffle(texts)
    from bertedge.runtime.bundle import open_bundle

    with open_bundle(args.bundle) as b:
        manifest = b.manifest
    model = args.model or (baseline_model(args.bundle) if "pipeline" in args.systems else None)
    settings = {"when": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_facts(),
                "cores": os.cpu_count(), "bundle": str(args.bundle), "precision": manifest.precision,
                "model": str(model), "data": str(args.data), "sentences": len(texts),
                "systems": args.systems, "concurrency": args.concurrency, "requests": args.requests,
                "time_cap_s": args.time_cap, "warmup": args.warmup, "threads": args.threads,
                "serve_args": args.serve_args, "soak_s": args.soak, "seed": args.seed,
                "python": platform.python_version(), "note": args.note}
    print("settings:", json.dumps(settings), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    soaked: Soak | None = None
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))  # printed if a server fails to start
    for system in args.systems:
        with server(args, system, logs / f"{system}.log") as (port, pid):
            for concurrency in args.concurrency:
                run = measure(port, pid, args, system, concurrency, texts)
                runs.append(run)
                print(f"{system:18s} c={concurrency:<4d} {run.requests:6d} req  {run.errors} err  {run.lost} lost "
                      f"{run.texts_s:8.1f} texts/s  p50 {run.p50_ms:8.2f}  p99 {run.p99_ms:8.2f} ms  "
                      f"batch {run.mean_batch:5.1f} ({run.batch_ms} ms)  cpu {run.server_cpu_ms_per_text:.2f} "
                      "ms/text", flush=True)
            if system == "bertedge" and args.soak > 0:
                from bertedge.runtime import Predictor

                reference = Predictor(args.bundle).predict(texts)
                rate = args.soak_rate or 2 * max(r.texts_s for r in runs if r.system == "bertedge")
                soaked = soak(port, pid, texts, reference, rate, args.soak)
                print("soak:", json.dumps(asdict(soaked)), flush=True)
    result = verdict(runs)
    report = {"settings": settings, "runs": [asdict(r) for r in runs], "target": result,
              "soak": asdict(soaked) if soaked else None}
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    with (args.out / "serve_load.jsonl").open("a") as f:
        f.write(json.dumps(report) + "\n")
    text = markdown(runs, settings, result, soaked)
    (args.out / "serve_load.md").write_text(text)
    print(text)
    print(f"wrote {args.out}/serve_load.{{json,jsonl,md}}")
    return report


if __name__ == "__main__":
    main()
