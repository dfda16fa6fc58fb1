"""`bertedge predict --engine ray`: the same `Predictor`, fanned out over CPUs or nodes by Ray Data.

This package adds transport only. Every input format is parsed by
`bertedge.runtime.records.read_records` (so error rows and line numbers match `--engine local`
exactly), and every actor opens the bundle the way local predict does: a
`bertedge.runtime.Predictor` over `open_bundle` (checksums and `--expect-digest` verified), whose
`predict_isolated` does tokenization, batching, post-processing and per-row failure isolation.

    driver: verify bundle + digest, expand inputs, lock --out      fails here, before Ray starts
    from_items(file indices) -> map_batches(inputs.parse_files)     rows with file, row, line, id, text, error
      -> materialize                                                rows in: counted before predicting
      -> map_batches(actors.BundlePredictor, actor pool)            one verified bundle per actor
      -> writer: ok rows in (file, row) order -> output; error rows -> errors JSONL
      -> rows out == ok + errors == rows in, asserted; outputs renamed into place

Modules: `args` (DistributedArgs, DistributedReport), `inputs` (the read stage), `actors` (the
predict stage), `writer` (the write stage), `run` (`predict_dataset`: Ray start-up, signals, the
job).

Ids. Every output row carries `row` (0-based data row within its file), `line` (1-based physical
line, the `line` of `--engine local`; empty for Parquet) and `id`: the input's id column
(`id_column`, default "id" when present; integers stay integers, CSV ids are text, an integer id
beyond 64 bits makes an error row) or else `row`. With several input files the rows also carry
`file` (the path), and the id is the pair (file, row). Output is ordered by (file, row) so it
diffs line by line with `--engine local`.

How the bundle reaches the workers. `BundleTransport.PATH` loads the bundle path on each worker:
right for a local instance and for clusters with a shared filesystem (NFS, a baked image).
`BundleTransport.SHIP` packs the bundle into one archive in the Ray object store; each actor
writes it to a temp dir and `Predictor` verifies it there (checksums, digest pin), so no shared
path is needed (the default when connecting to a cluster with `address` / RAY_ADDRESS). Workers
need `pip install bertedge[ray]` only: no torch, no transformers.

Inputs and outputs. Input files are read by Ray tasks, so they must be readable from the workers
(a shared path); a pipe or device (/dev/stdin, `<(...)`) is read once by the driver and shipped.
The output is written by the driver (a single ordered file) or by the workers (a folder), under
a hidden partial path renamed into place only when the job succeeded
(`bertedge.runtime.outputs.atomic_output`); an existing output is refused unless `overwrite`.
SIGTERM or Ctrl-C shuts down the Ray the job started and exits 143 (130) after one line.

Scaling. Per-row work (tokenize + ONNX inference + decode) is spread over actors and grows
linearly with their count as long as each actor gets whole cores (`threads_per_actor` = its CPU
reservation; its session runs `runtime.threads` intra-op threads, 0 meaning that reservation).
Fixed costs do not shrink with nodes: Ray start-up or connection, one bundle load + checksum per
actor, reading and parsing each file (one task per file: split big inputs into several files),
and the driver's ordered write of a single output file. On N nodes of C cores expect about
N * C / threads_per_actor times the one-actor rate for large inputs, minus those fixed seconds;
write to a folder (no driver funnel) at that scale.
"""

from bertedge.edges.ray.actors import (
    FAULT_MARKER_ENV,
    FAULT_TEXT_ENV,
    BundlePredictor,
    PredictorLike,
    arrow_type,
    result_schema,
    result_table,
)
from bertedge.edges.ray.args import (
    BundleTransport,
    DistributedArgs,
    DistributedReport,
    OutputFormat,
)
from bertedge.edges.ray.run import predict_dataset

__all__ = ["FAULT_MARKER_ENV", "FAULT_TEXT_ENV", "BundlePredictor", "BundleTransport", "DistributedArgs",
           "DistributedReport", "OutputFormat", "PredictorLike", "arrow_type", "predict_dataset",
           "result_schema", "result_table"]
