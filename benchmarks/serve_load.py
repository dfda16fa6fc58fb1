"""Load test of `bertedge serve`: dynamic batching on vs off, side by side, nanoGPT bench.py style.

Starts the server (a `python -m bertedge serve` subprocess on a free loopback port) once per
mode: "on" (`--max-batch-size N --max-wait-ms W`) and "off" (`--max-batch-size 1`: one
onnxruntime call per request). Each mode is driven by a bounded closed-loop async client at
each concurrency (a fixed request count, a time cap, a warm-up first) with real SST-2
sentences. Reports p50/p90/p99 latency, requests/s, texts/s, errors and lost responses, plus
the server's mean batch size from /metrics. Writes JSON + Markdown + a PNG (latency vs
throughput) to --out, and appends one JSON line per run to serve_load.jsonl for history.

    python benchmarks/serve_load.py runs/bundle --requests 2000 --time-cap 60
    python benchmarks/serve_load.py /tmp/bundle --requests 60 --concurrency 1,8 --time-cap 10
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"  # loopback only


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz / .zip")
    p.add_argument("--data", type=Path, default=DATA, help="TSV / CSV file of sentences")
    p.add_argument("--column", default="content", help="column holding the sentence")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client concurrencies")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per (mode, concurrency)")
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds per (mode, concurrency) at most")
    p.add_argument("--warmup", type=int, default=50,
                   help="untimed requests before each timed run (at least 2 x concurrency)")
    p.add_argument("--texts-per-request", type=int, default=1, help="sentences in each request")
    p.add_argument("--max-batch-size", type=int, default=32, help="server --max-batch-size when batching is on")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms when batching is on")
    p.add_argument("--threads", type=int, default=0, help="server onnxruntime threads (0 = per core)")
    p.add_argument("--modes", default="on,off", help="on (dynamic batching), off (--max-batch-size 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sentence order")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine state)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for serve_load.{json,md,png,jsonl}")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - {"on", "off"} or min(args.concurrency) < 1 or args.requests < 1:
        p.error("--modes takes on,off; --concurrency and --requests must be >= 1")
    return args


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


@contextlib.contextmanager
def server(args: argparse.Namespace, mode: str, log_path: Path) -> Iterator[tuple[str, int]]:
    """A `bertedge serve` subprocess for one mode; (its URL, its pid) once /readyz says 200."""
    port = free_port()
    batch = args.max_batch_size if mode == "on" else 1
    wait = args.max_wait_ms if mode == "on" else 0
    cmd = [sys.executable, "-m", "bertedge", "serve", str(args.bundle), "--host", HOST, "--port", str(port),
           "--max-batch-size", str(batch), "--max-wait-ms", str(wait), "--threads", str(args.threads),
           "--max-texts", str(max(64, args.texts_per_request)), "--log-level", "warning"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        url = f"http://{HOST}:{port}"
        try:
            wait_ready(proc, url, log_path)
            yield url, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with code {proc.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    sys.exit(f"server not ready after {timeout_s} s:\n{log_path.read_text()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counters(url: str) -> tuple[float, float]:
    """(texts, onnxruntime calls) so far, from the server's batch-size histogram."""
    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for s in f.samples if s.name.startswith("bertedge_batch_size_")}
    return values.get("bertedge_batch_size_sum", 0.0), values.get("bertedge_batch_size_count", 0.0)


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the loopback server.

    httpx costs ~5 ms of CPU per request here, more than the server spends: on a 2-core box
    the load generator would be the bottleneck. This one sends pre-built requests and reads
    Content-Length responses for a few tens of microseconds.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
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
    """One (mode, concurrency) measurement."""

    mode: str
    concurrency: int
    requests: int  # requests sent in the timed window
    ok: int  # 200 with exactly one prediction per text
    errors: int  # non-200, transport errors, timeouts
    lost: int  # texts sent in a 200 request that came back without their prediction
    wall_s: float
    requests_s: float
    texts_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float  # texts per predictor call (coalesced batch) on the server
    server_cpu_ms_per_text: float  # server process CPU time per text: less noisy than wall time


async def drive(conns: list[Connection], texts: list[str], n_requests: int, time_cap_s: float,
                per_request: int, start: int) -> tuple[list[float], int, int, int, float]:
    """Closed loop: one worker per connection sends requests until n_requests or the time cap.

    Returns (latencies in s of good answers, requests sent, errors, lost texts, wall seconds).
    """
    latencies: list[float] = []
    counts = {"sent": 0, "errors": 0, "lost": 0}
    began = time.perf_counter()

    async def worker(conn: Connection) -> None:
        while counts["sent"] < n_requests and time.perf_counter() - began < time_cap_s:
            first = start + counts["sent"] * per_request
            counts["sent"] += 1
            batch = [texts[(first + k) % len(texts)] for k in range(per_request)]
            body = json.dumps({"texts": batch}).encode()
            t0 = time.perf_counter()
            try:
                status, payload = await asyncio.wait_for(conn.post("/v1/predict", body), 120)
            except (OSError, asyncio.IncompleteReadError, IndexError, ValueError, TimeoutError):
                counts["errors"] += 1
                continue
            if status != 200:
                counts["errors"] += 1
                continue
            got = len(json.loads(payload).get("predictions", []))
            if got != len(batch):
                counts["lost"] += len(batch) - got
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(c) for c in conns))
    return latencies, counts["sent"], counts["errors"], counts["lost"], time.perf_counter() - began


async def warm_then_time(url: str, pid: int, args: argparse.Namespace, concurrency: int, texts: list[str],
                         ) -> tuple[tuple[list[float], int, int, int, float], tuple[float, ...]]:
    """Warm-up (which also opens every connection), then the timed run on the same client."""
    port = int(url.rsplit(":", 1)[1])
    conns = [Connection(HOST, port) for _ in range(concurrency)]
    try:
        warmup = max(args.warmup, 2 * concurrency)
        await drive(conns, texts, warmup, args.time_cap, args.texts_per_request, 0)
        before = (*batch_counters(url), cpu_seconds(pid))
        timed = await drive(conns, texts, args.requests, args.time_cap, args.texts_per_request,
                            warmup * args.texts_per_request)
        return timed, (*before, *batch_counters(url), cpu_seconds(pid))
    finally:
        for c in conns:
            await c.close()


def measure(url: str, pid: int, args: argparse.Namespace, mode: str, concurrency: int,
            texts: list[str]) -> Run:
    (lat, sent, errors, lost, wall), (texts0, calls0, cpu0, texts1, calls1, cpu1) = asyncio.run(
        warm_then_time(url, pid, args, concurrency, texts))
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    ok = len(lat)
    return Run(mode=mode, concurrency=concurrency, requests=sent, ok=ok, errors=errors, lost=lost,
               wall_s=round(wall, 3), requests_s=round(ok / wall, 2),
               texts_s=round(ok * args.texts_per_request / wall, 2),
               p50_ms=round(float(np.percentile(ms, 50)), 2), p90_ms=round(float(np.percentile(ms, 90)), 2),
               p99_ms=round(float(np.percentile(ms, 99)), 2),
               mean_batch=round((texts1 - texts0) / max(calls1 - calls0, 1), 2),
               server_cpu_ms_per_text=round(1000 * (cpu1 - cpu0) / max(texts1 - texts0, 1), 3))


def verdict(runs: list[Run], at: int = 32) -> dict[str, Any]:
    """The target: at concurrency 32, batching >= 1.5x texts/s, lower p99, no errors or losses."""
    on = next((r for r in runs if r.mode == "on" and r.concurrency == at), None)
    off = next((r for r in runs if r.mode == "off" and r.concurrency == at), None)
    if on is None or off is None:
        return {"concurrency": at, "measured": False}
    speedup = on.texts_s / off.texts_s if off.texts_s else float("inf")
    clean = all(r.errors == 0 and r.lost == 0 and r.ok == r.requests for r in runs)
    cpu_ratio = off.server_cpu_ms_per_text / on.server_cpu_ms_per_text if on.server_cpu_ms_per_text else 0
    return {"concurrency": at, "measured": True, "texts_s_speedup": round(speedup, 2),
            "server_cpu_per_text_off_over_on": round(cpu_ratio, 2),
            "p99_on_ms": on.p99_ms, "p99_off_ms": off.p99_ms, "no_errors_no_losses": clean,
            "passed": bool(speedup >= 1.5 and on.p99_ms < off.p99_ms and clean)}


def markdown(runs: list[Run], settings: dict[str, Any], result: dict[str, Any]) -> str:
    lines = ["# bertedge serve load test", "",
             f"{settings['when']} · {settings['cpu']} · {settings['cores']} cores · bundle "
             f"`{settings['bundle']}` ({settings['precision']}) · {settings['texts_per_request']} "
             f"text(s)/request from `{Path(settings['data']).name}` · on = `--max-batch-size "
             f"{settings['max_batch_size']} --max-wait-ms {settings['max_wait_ms']}`, off = "
             "`--max-batch-size 1`", *(["", f"Note: {settings['note']}"] if settings["note"] else []), "",
             "| batching | concurrency | requests | errors | lost | req/s | texts/s | p50 ms | p90 ms "
             "| p99 ms | mean batch | server CPU ms/text |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.mode} | {r.concurrency} | {r.requests} | {r.errors} | {r.lost} | {r.requests_s} "
                     f"| {r.texts_s} | {r.p50_ms} | {r.p90_ms} | {r.p99_ms} | {r.mean_batch} "
                     f"| {r.server_cpu_ms_per_text} |")
    if result.get("measured"):
        lines += ["", f"At concurrency {result['concurrency']}: dynamic batching gives "
                  f"**{result['texts_s_speedup']}x** the texts/s of one call per request (target >= 1.5x), "
                  f"p99 {result['p99_on_ms']} ms vs {result['p99_off_ms']} ms; server CPU per text "
                  f"off / on {result['server_cpu_per_text_off_over_on']}x; errors or losses: "
                  f"{'none' if result['no_errors_no_losses'] else 'SOME'} -> "
                  f"**{'PASS' if result['passed'] else 'FAIL'}**."]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, color in (("on", "tab:blue"), ("off", "tab:orange")):
        rs = sorted((r for r in runs if r.mode == mode), key=lambda r: r.concurrency)
        if not rs:
            continue
        label = "dynamic batching" if mode == "on" else "one call per request"
        ax.plot([r.texts_s for r in rs], [r.p99_ms for r in rs], "o-", color=color, label=f"{label}, p99")
        ax.plot([r.texts_s for r in rs], [r.p50_ms for r in rs], "s--", color=color, alpha=0.6,
                label=f"{label}, p50")
        for r in rs:
            ax.annotate(f"c={r.concurrency}", (r.texts_s, r.p99_ms), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (texts/s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_yscale("log")
    ax.set_title("bertedge serve: latency vs throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    args = parse_args()
    texts = read_texts(args.data, args.column)
    random.Random(args.seed).shuffle(texts)
    manifest = json.loads((args.bundle / "manifest.json").read_text()) if args.bundle.is_dir() else {}
    settings = {"when": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                "cores": os.cpu_count(), "bundle": str(args.bundle), "precision": manifest.get("precision"),
                "data": str(args.data), "sentences": len(texts), "concurrency": args.concurrency,
                "requests": args.requests, "time_cap_s": args.time_cap, "warmup": args.warmup,
                "texts_per_request": args.texts_per_request, "max_batch_size": args.max_batch_size,
                "max_wait_ms": args.max_wait_ms, "threads": args.threads, "modes": args.modes,
                "seed": args.seed, "python": platform.python_version(), "note": args.note}
    print("settings:", json.dumps(settings))
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))  # printed if a server fails to start
    for mode in args.modes:
        with server(args, mode, logs / f"server_{mode}.log") as (url, pid):
            for concurrency in args.concurrency:
                run = measure(url, pid, args, mode, concurrency, texts)
                runs.append(run)
                print(f"batching {mode:3s} c={concurrency:<3d} {run.requests:5d} req  {run.errors} err  "
                      f"{run.lost} lost  {run.requests_s:8.1f} req/s  {run.texts_s:8.1f} texts/s  "
                      f"p50 {run.p50_ms:7.2f}  p90 {run.p90_ms:7.2f}  p99 {run.p99_ms:7.2f} ms  "
                      f"batch {run.mean_batch:.1f}  cpu {run.server_cpu_ms_per_text:.2f} ms/text", flush=True)
    result = verdict(runs)
    report = {"settings": settings, "runs": [asdict(r) for r in runs], "target": result}
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    with (args.out / "serve_load.jsonl").open("a") as f:
        f.write(json.dumps(report) + "\n")
    (args.out / "serve_load.md").write_text(markdown(runs, settings, result))
    plot(runs, args.out / "serve_load.png")
    print(markdown(runs, settings, result).splitlines()[-1])
    print(f"wrote {args.out}/serve_load.{{json,jsonl,md,png}}")


if __name__ == "__main__":
    main()
