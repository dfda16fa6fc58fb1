"""Output: the rich tables, bench.json, bench.md and the PNG plots."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.toolchain.bench.results import BenchReport

# ----------------------------------------------------------------------------- output


def summary_rows(report: BenchReport) -> list[dict[str, str]]:
    """One row per backend: file, size, provider, threads, cold start, memory, accuracy, status."""
    rows = []
    for b in report.backends:
        cs, acc = b.cold_start, b.accuracy
        rows.append({
            "backend": b.name, "status": b.status if b.status == "ok" else f"{b.status}: {b.reason}",
            "precision": b.precision, "file": Path(b.file).name if b.file else "-", "MB": _fmt(b.size_mb, ".1f"),
            "provider": ", ".join(p.replace("ExecutionProvider", "") for p in b.providers_used) or ("torch" if b.name == "torch" else "-"),
            "threads": f"{b.threads_used}/{b.threads_requested}" if b.threads_used is not None else "-",
            "cold start s": _fmt(cs.seconds if cs else None, ".2f"),
            "peak RSS MB": _fmt(cs.peak_rss_mb if cs else None, ".0f"),
            "GPU MB": _fmt(b.gpu_memory_mb if b.gpu_memory_mb is not None else (cs.gpu_memory_mb if cs else None), ".0f"),
            "accuracy": (f"{b.task_metric['name']} {100 * b.task_metric['value']:.2f}" if b.task_metric
                         else _fmt(acc.accuracy * 100 if acc and acc.accuracy is not None else None, ".2f")),
            f"agreement vs {acc.reference if acc else 'ref'}": _fmt(acc.agreement * 100 if acc and acc.agreement is not None else None, ".1f"),
            "max|Δlogit|": _fmt(acc.max_abs_logit_diff if acc else None, ".2e"),
            "data sent/s": _fmt(acc.sequences_per_s if acc else None, ".0f"),
        })
    return rows


def shape_rows(report: BenchReport) -> list[dict[str, str]]:
    """One row per backend x shape: latency percentiles, mean ± std, throughput."""
    return [{"backend": b.name, "batch": str(s.batch_size), "seq": str(s.seq_len), "runs": str(s.stats.runs),
             "p50 ms": f"{s.stats.p50_ms:.2f}", "p90 ms": f"{s.stats.p90_ms:.2f}", "p99 ms": f"{s.stats.p99_ms:.2f}",
             "mean ± std ms": f"{s.stats.mean_ms:.2f} ± {s.stats.std_ms:.2f}",
             "seq/s": f"{s.stats.sequences_per_s:.1f}", "tok/s": f"{s.stats.tokens_per_s:.0f}"}
            for b in report.backends for s in b.shapes]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: BenchReport) -> list[Any]:
    """rich tables for the terminal: per-shape timings, then one summary row per backend."""
    from rich.table import Table

    tables = []
    for title, rows in (("latency and throughput", shape_rows(report)), ("backends", summary_rows(report))):
        if not rows:
            continue
        table = Table(title=f"bertedge bench: {title}")
        for col in _columns(rows):
            table.add_column(col, justify="left" if col in ("backend", "status", "file", "provider", "precision") else "right")
        for row in rows:
            table.add_row(*(row.get(c, "") for c in _columns(rows)))
        tables.append(table)
    return tables


def _columns(rows: Sequence[dict[str, str]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def markdown(report: BenchReport) -> str:
    """bench.md: settings, environment, the two tables and the warnings."""
    env, cpu = report.environment, report.environment["cpu"]
    isa = ", ".join(k for k, v in cpu["isa"].items() if v) or "none"
    lines = [f"# bertedge bench: {report.source['root']}", "",
             f"{report.created}; {cpu['model']}, {cpu['usable_cores']} usable cores, ISA: {isa}; "
             f"onnxruntime {env['versions'].get('onnxruntime')}, torch {env['versions'].get('torch')}, "
             f"transformers {env['versions'].get('transformers')}", "",
             "## Settings", "", *(f"- {k}: {v}" for k, v in report.settings.items()), ""]
    for title, rows in (("Latency and throughput", shape_rows(report)), ("Backends", summary_rows(report))):
        cols = _columns(rows)
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                  *("| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows), ""]
    if report.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in report.warnings), ""]
    return "\n".join(lines)


def plot(report: BenchReport, out: Path) -> dict[str, str]:
    """Latency vs sequence length (one panel per batch size) and throughput vs batch size (per length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [b for b in report.backends if b.shapes]
    batches = sorted({s.batch_size for b in ok for s in b.shapes})
    lens = sorted({s.seq_len for b in ok for s in b.shapes})
    files = {}
    for name, panels, x_of, y_of, xlabel, ylabel in (
        ("latency_vs_seq_len.png", [("batch", v) for v in batches], lambda s: s.seq_len,
         lambda s: s.stats.p50_ms, "sequence length (tokens)", "p50 latency (ms)"),
        ("throughput_vs_batch_size.png", [("seq", v) for v in lens], lambda s: s.batch_size,
         lambda s: s.stats.sequences_per_s, "batch size", "throughput (sequences/s)"),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
        for ax, (key, value) in zip(axes[0], panels, strict=True):
            for b in ok:
                pts = sorted((x_of(s), y_of(s)) for s in b.shapes
                             if (s.batch_size if key == "batch" else s.seq_len) == value)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b.name)
            ax.set(title=f"{key} {value}", xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"bertedge bench, {report.settings['threads']} threads")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files[name.split(".")[0]] = str(out / name)
    return files


def write_outputs(report: BenchReport, out: Path, plots: bool) -> dict[str, str]:
    """bench.json, bench.md, the PNG plots, and one summary line appended to bench-history.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "bench.json"), "markdown": str(out / "bench.md"), "history": str(out / "bench-history.jsonl")}
    if plots:
        files.update(plot(report, out))
    report.files = files
    (out / "bench.json").write_text(json.dumps(report.to_dict(), indent=2, default=_jsonable) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown(report), encoding="utf-8")
    line = {"created": report.created, "model": report.source["root"], "threads": report.settings["threads"],
            "cpu": report.environment["cpu"]["model"],
            "results": {b.name: {f"{s.batch_size}x{s.seq_len}": round(s.stats.sequences_per_s, 2) for s in b.shapes}
                        for b in report.backends}}
    with (out / "bench-history.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return files


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def append_history(path: Path, record: dict[str, Any]) -> None:
    """Append one benchmark run as a JSON line, stamped with the UTC time (nanoGPT-style history)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **record}
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(stamped, default=str) + "\n")
    print(f"appended to {path}")
