"""Where the time goes inside an ONNX artifact: onnxruntime's profiler, aggregated by operator type.

    python benchmarks/ort_profile.py runs/demo/export/model-int8.onnx --batch 32 --seq 128 --threads 2

Prints each op type's share of kernel time; used to explain what bounds the INT8 speed-up.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = "/tmp/bertedge-ort-profile"
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (args.batch, args.seq)).astype(np.int64)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feeds = {i.name: arrays[i.name] for i in session.get_inputs()}
    for _ in range(3 + args.runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    print(f"{args.model.name}: batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"{total / 1000 / (3 + args.runs):.1f} ms kernel time per run")
    for op, us in per_op.most_common(12):
        print(f"  {op:32s} {100 * us / total:5.1f}%")


if __name__ == "__main__":
    main()
