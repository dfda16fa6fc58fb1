#!/usr/bin/env bash
# Every figure quoted in the closing notes, in order, on a quiet machine (nothing else running).
# Run `make demo` first: it writes runs/demo/{model,export,bundle,bench}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-../shared/data}
B=runs/demo/bundle

# 1. head-to-head: PyTorch eager vs the Optimum path vs bertedge, batch 1 x 128 and 32 x 128, 2 threads
make bench DATA="$DATA"
# 2. the thin runtime: batch-1 latency (short and 128-token inputs) and throughput on SST-2 dev
$PY benchmarks/runtime_latency.py $B --input "$DATA/sst2/dev.tsv" --threads 2 \
    --results benchmarks/results/runtime_latency.jsonl
# 3. HTTP serving: dynamic batching on vs off at concurrency 1, 8, 32, 64
$PY benchmarks/serve_load.py $B --data "$DATA/sst2/dev.tsv" --requests 2000 --time-cap 60 --threads 1 \
    --out benchmarks/results
# 4. Ray Data vs the local engine on all 67,349 SST-2 training sentences
$PY benchmarks/ray_predict.py --bundle $B --data "$DATA/sst2/train.tsv"
