"""Where the time goes inside an OpenVINO artifact: the CPU plugin's per-node counters by node type.

    python benchmarks/openvino_profile.py runs/demo/export/model-int8-openvino.xml --batch 32 --seq 128

Compiles the model with the runtime's settings (`bertedge.runtime.sessions.openvino_config`,
plus PERF_COUNT), runs --runs calls on random token ids, and prints each (node type,
kernel) pair's share of the summed node time. The matrix-multiply rate divides the weighted
MatMuls' operations (2 x tokens x K x N each, from the weight shapes) by the FullyConnected
nodes' time: how close the INT8 kernels run to the CPU's peak, i.e. what a recipe could still
gain on the same kernels.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np

from bertedge.runtime.sessions import openvino_config


def weighted_matmul_ops(model: object, batch: int, seq: int) -> float:
    """2 x rows x K x N summed over the MatMuls whose second input is a (decompressed) weight;
    rows = batch x seq for per-token MatMuls, batch for the pooler and classifier."""
    total = 0.0
    for op in model.get_ordered_ops():  # type: ignore[attr-defined]
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1)
        if weight.get_node().get_type_name() in ("Parameter",) or not weight.get_partial_shape().is_static:
            continue  # an activation x activation product (attention)
        shape = [int(d) for d in weight.get_shape()]
        rows = batch * seq if op.get_output_partial_shape(0).rank.get_length() == 3 else batch
        if len(shape) == 2:
            total += 2.0 * rows * shape[0] * shape[1]
    return total


def main() -> None:
    import openvino as ov

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="an OpenVINO IR (.xml) or an .onnx file")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    core = ov.Core()
    model = core.read_model(str(args.model))
    compiled = core.compile_model(model, "CPU", {**openvino_config(args.threads), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (args.batch, args.seq)).astype(np.int64)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feeds = {p.get_any_name(): arrays[p.get_any_name()] for p in model.inputs}
    for _ in range(3):
        request.infer(feeds)
    per_node: collections.Counter[tuple[str, str]] = collections.Counter()
    for _ in range(args.runs):
        request.infer(feeds)
        for info in request.profiling_info:
            per_node[(info.node_type, info.exec_type)] += info.real_time.total_seconds() * 1e3 / args.runs
    total = sum(per_node.values())
    print(f"{args.model.name} at {args.batch}x{args.seq}, {args.threads} threads: {total:.1f} ms of node time per call")
    for (node, kernel), ms in per_node.most_common(args.top):
        print(f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {node} ({kernel})")
    fc_ms = sum(ms for (node, _), ms in per_node.items() if node.startswith("FullyConnected"))
    ops = weighted_matmul_ops(model, args.batch, args.seq)
    if fc_ms and ops:
        print(f"FullyConnected: {fc_ms:.1f} ms ({100 * fc_ms / total:.0f}%), {ops / 1e9:.1f} GOP -> "
              f"{ops / fc_ms / 1e6:.0f} GOP/s")


if __name__ == "__main__":
    main()
