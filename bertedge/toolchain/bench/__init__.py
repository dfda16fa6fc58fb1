"""bertedge bench: latency, throughput, cold start, memory and accuracy per backend and shape.

A benchmark is a slimmed copy of the hot loop: every backend gets the same realistic token
inputs (real sentences cut to exactly the requested length), a warm-up, then timed runs with
`time.perf_counter()`. Backends are data (`spec.known_backends()`): torch, one per CPU artifact
kind of `bertedge.runtime.artifacts` under the name export gives it, and the GPU ones. Cold start
and peak RSS are measured in a fresh process per backend that imports only what it needs
(`python -m bertedge.toolchain.bench _cold-start SPEC`), as a user meets them.

    spec         constants, backends as data, BenchArgs
    inputs       the source folder and realistic token inputs
    backends     loading torch / onnxruntime backends
    results      the timed loop's statistics and the result records
    measure      measuring one backend: shapes and the --data pass
    coldstart    the fresh-process cold start
    environment  CPU, ISA flags, cores, library versions, GPUs
    stage        `bench(BenchArgs) -> BenchReport`
    report       tables, JSON, Markdown, plots

Keep the module-level imports light (stdlib, numpy, torch-free bertedge modules): the
cold-start child imports this package before it starts the clock on its own imports.
"""

from bertedge.toolchain.bench.report import render
from bertedge.toolchain.bench.results import (
           BackendResult,
           BenchReport,
           LatencyStats,
           latency_stats,
           time_calls,
)
from bertedge.toolchain.bench.spec import Backend, BenchArgs, backend_named, known_backends
from bertedge.toolchain.bench.stage import bench

__all__ = ["Backend", "BackendResult", "BenchArgs", "BenchReport",
           "LatencyStats", "backend_named", "bench", "known_backends", "latency_stats", "render",
           "time_calls"]
