"""INT8 word embeddings: each row of the vocabulary table (one per token id) stored as int8
with its own fp32 scale.

onnxruntime's quantizers leave an embedding table in fp32 unless Gather is among the quantized
op types, and then they give the whole 30,522 x 384 table one scale (`GatherQuant` quantizes it
like an activation, per tensor). Here every row gets a symmetric scale of its own:

    Gather(table, input_ids)  ->  Mul(Cast(Gather(int8 rows, input_ids)), Gather(row scales, input_ids))

A gathered row is its fp32 row up to rounding (at most half a step, max|row| / 254), computed
from that row alone, so a text's answer still ignores its batch mates. Only the gathered rows are
dequantized: a DequantizeLinear on the table would rebuild all of it in fp32 on every call (or
once at load, giving the memory back).

Only the vocabulary table (the one `input_ids` indexes): the position and segment tables are
small (512 and 2 rows on BERT: 0.6 MB saved) and every token adds one of their rows, so their
rounding reaches every token alike. On the demo model (fp32 graph, 872 SST-2 dev rows) the word
table alone moved logits by at most 0.027 (1 answer changed, a near-tie), all three tables by
0.073 (2 changed). Used by every onnxruntime INT8 recipe (`bertedge.toolchain.quantize`); NNCF
already stores OpenVINO's embedding tables as int8 per row (`bertedge.toolchain.openvino_int8`).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

SUFFIX = "_int8_rows"  # of the int8 table's name; its scales end in "_int8_row_scales"


def embedding_gathers(model: onnx.ModelProto, ids: str = "input_ids") -> dict[str, list[onnx.NodeProto]]:
    """The tables indexed by the graph input `ids`: fp32 2-D initializers read only as the data
    of axis-0 Gathers, each with the Gathers reading it."""
    tables = {i.name: i for i in model.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    inputs = {i.name for i in model.graph.input} & {ids}
    readers: dict[str, list[onnx.NodeProto]] = {}
    other: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in tables:
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if node.op_type == "Gather" and k == 0 and axis == 0 and node.input[1] in inputs:
                readers.setdefault(name, []).append(node)
            else:
                other.add(name)
    return {name: nodes for name, nodes in readers.items() if name not in other}


def quantize_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows, fp32 scales of shape (rows, 1)): symmetric, one scale per row.

    >>> q, s = quantize_table(np.array([[0.5, -1.0], [0.0, 0.0]], np.float32))
    >>> q.tolist(), bool(np.allclose(s.ravel(), [1 / 127, 1.0]))
    ([[64, -127], [0, 0]], True)
    """
    peak = np.abs(table).max(axis=1, keepdims=True)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    rows = np.clip(np.round(table / scales), -127, 127).astype(np.int8)
    return rows, scales


def quantize_embeddings(model: onnx.ModelProto, keep_fp32: Collection[str] = (), ids: str = "input_ids") -> list[str]:
    """Store the table(s) indexed by the graph input `ids` as int8 rows with per-row scales, in place.

    A table stays fp32 when any Gather reading it is named in `keep_fp32` (the recipe's
    nodes_to_exclude: `Keep.EMBEDDINGS`, or nodes the sensitivity search keeps in fp32).

    Returns:
        The names of the tables rewritten.
    """
    graph = model.graph
    tables = {name: nodes for name, nodes in embedding_gathers(model, ids).items()
              if not any(n.name in keep_fp32 for n in nodes)}
    if not tables:
        return []
    inits = {i.name: i for i in graph.initializer}
    after: dict[int, list[onnx.NodeProto]] = {}  # id(Gather) -> the nodes that replace it
    for name, gathers in tables.items():
        rows, scales = quantize_table(numpy_helper.to_array(inits[name]))
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(rows, name + SUFFIX),
                                  numpy_helper.from_array(scales, name + "_int8_row_scales")])
        for g in gathers:
            after[id(g)] = _dequantized_gather(g, name)
    nodes = [new for node in graph.node for new in after.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    return sorted(tables)


def _dequantized_gather(gather: onnx.NodeProto, table: str) -> list[onnx.NodeProto]:
    """Gather(int8 rows) -> Cast -> Mul(Gather(row scales)), writing the Gather's own output."""
    ids, out, p = gather.input[1], gather.output[0], gather.name or gather.output[0]
    return [
        helper.make_node("Gather", [table + SUFFIX, ids], [f"{p}_int8"], name=gather.name),
        helper.make_node("Gather", [table + "_int8_row_scales", ids], [f"{p}_scale"], name=f"{p}_scale"),
        helper.make_node("Cast", [f"{p}_int8"], [f"{p}_rows"], name=f"{p}_rows", to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}_rows", f"{p}_scale"], [out], name=f"{p}_dequantized"),
    ]
