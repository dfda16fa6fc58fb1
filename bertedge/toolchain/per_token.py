"""Per-token activation quantization: a rewrite of onnxruntime's dynamic INT8 graph.

onnxruntime's DynamicQuantizeLinear picks one scale and zero point for a whole input tensor, so
a text's INT8 answer depends on its batch mates and its padding. `per_token_activations` gives
every row (token) its own scale and zero point, which makes dynamic INT8 batch-invariant.
Used by `bertedge.toolchain.quantize`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_PT = "bertedge_per_token_"  # prefix of the constants the per-token rewrite adds


def per_token_activations(model: onnx.ModelProto) -> int:
    """Rewrite every DynamicQuantizeLinear into per-token asymmetric quantization, in place.

    onnxruntime's dynamic INT8 computes one scale and zero point over the whole input tensor,
    so a text's activations are rounded on a grid set by its batch mates and its padding: the
    same text can get another label in another batch. Here each token row gets its own
    uint8 grid over [min(row, 0), max(row, 0)], applied by one per-axis QuantizeLinear on the
    row-flattened input. MatMulInteger only takes a scalar activation zero point, so it runs
    with zero point 0 and the row's zero point comes off afterwards in float:
    `y = s_row * s_w * (q @ w - z_row * colsum(w))`; the u8 x s8 kernels (VNNI on AVX-512)
    stay. Each row then depends on that row alone.

    Returns:
        How many quantize nodes were rewritten.

    Raises:
        ValueError: a quantized activation feeds something other than MatMulInteger / Mul
            (e.g. QAttention, which only takes one scale): such a graph cannot be per-token.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {i.name: i for i in graph.initializer}
    targets = [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]
    for node in targets:
        wrong = {c.op_type for out in node.output for c in consumers.get(out, [])} - {"MatMulInteger", "Mul"}
        if wrong:
            raise ValueError(f"per-token activations: {node.name} feeds {', '.join(sorted(wrong))}; "
                             "quantize MatMul only (attention unfused or kept in fp32)")
    constants = {"255": np.float32(255.0), "eps": np.float32(1e-12), "zero_f": np.float32(0.0),
                 "flat": np.array([-1], np.int64), "zp0": np.uint8(0)}
    graph.initializer.extend(numpy_helper.from_array(np.array(v), _PT + k) for k, v in constants.items())
    after: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert right after it
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            rewritten.append(node)
            rewritten += after.pop(node.name, [])
            continue
        x, q, scale = node.input[0], node.output[0], node.output[1]
        matmuls = [c for c in consumers.get(q, []) if c.op_type == "MatMulInteger"]
        inner = {int(weights[c.input[1]].dims[0]) for c in matmuls if c.input[1] in weights}
        if len(inner) != 1 or len(matmuls) != sum(c.input[1] in weights for c in matmuls):
            raise ValueError(f"per-token activations: {node.name} does not feed weight MatMuls only")
        p = f"{node.name}_per_token"
        graph.initializer.append(numpy_helper.from_array(np.array([-1, inner.pop()], np.int64), f"{p}_2d"))
        rewritten += [
            helper.make_node("ReduceMax", [x], [f"{p}_hi"], name=f"{p}_hi", axes=[-1], keepdims=1),
            helper.make_node("ReduceMin", [x], [f"{p}_lo"], name=f"{p}_lo", axes=[-1], keepdims=1),
            helper.make_node("Max", [f"{p}_hi", _PT + "zero_f"], [f"{p}_hi0"], name=f"{p}_hi0"),
            helper.make_node("Min", [f"{p}_lo", _PT + "zero_f"], [f"{p}_lo0"], name=f"{p}_lo0"),
            helper.make_node("Sub", [f"{p}_hi0", f"{p}_lo0"], [f"{p}_range"], name=f"{p}_range"),
            helper.make_node("Div", [f"{p}_range", _PT + "255"], [f"{p}_step"], name=f"{p}_step"),
            helper.make_node("Max", [f"{p}_step", _PT + "eps"], [scale], name=f"{p}_scale"),  # (..., 1)
            helper.make_node("Div", [f"{p}_lo0", scale], [f"{p}_lo_steps"], name=f"{p}_lo_steps"),
            helper.make_node("Neg", [f"{p}_lo_steps"], [f"{p}_zneg"], name=f"{p}_zneg"),
            helper.make_node("Round", [f"{p}_zneg"], [f"{p}_zf"], name=f"{p}_zf"),  # (..., 1), 0..255
            helper.make_node("Reshape", [scale, _PT + "flat"], [f"{p}_rows"], name=f"{p}_rows"),
            helper.make_node("Reshape", [f"{p}_zf", _PT + "flat"], [f"{p}_zrows_f"], name=f"{p}_zrows_f"),
            helper.make_node("Cast", [f"{p}_zrows_f"], [f"{p}_zrows"], name=f"{p}_zrows", to=onnx.TensorProto.UINT8),
            helper.make_node("Reshape", [x, f"{p}_2d"], [f"{p}_x2d"], name=f"{p}_x2d"),
            helper.make_node("QuantizeLinear", [f"{p}_x2d", f"{p}_rows", f"{p}_zrows"], [f"{p}_q2d"],
                             name=f"{p}_q2d", axis=0),
            helper.make_node("Shape", [x], [f"{p}_shape"], name=f"{p}_shape"),
            helper.make_node("Reshape", [f"{p}_q2d", f"{p}_shape"], [q], name=f"{p}_q"),
        ]
        for mm in matmuls:
            _subtract_row_zero_point(graph, mm, consumers, weights, f"{p}_zf", after)
    del graph.node[:]
    graph.node.extend(rewritten)
    return len(targets)


def _subtract_row_zero_point(graph: onnx.GraphProto, mm: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                             weights: dict[str, onnx.TensorProto], zero_f: str,
                             after: dict[str, list[onnx.NodeProto]]) -> None:
    """MatMulInteger -> Cast -> Mul(scales) becomes MatMulInteger(zp 0) -> Cast -> Sub(z_row * colsum) -> Mul."""
    casts = consumers.get(mm.output[0], [])
    if len(casts) != 1 or casts[0].op_type != "Cast":
        raise ValueError(f"per-token activations: {mm.name} is not followed by a Cast")
    w = numpy_helper.to_array(weights[mm.input[1]]).astype(np.int64)
    wz = numpy_helper.to_array(weights[mm.input[3]]).astype(np.int64) if len(mm.input) > 3 and mm.input[3] in weights else 0
    colsum = (w.sum(axis=0) - w.shape[0] * wz).astype(np.float32)
    mm.input[2] = _PT + "zp0"
    p = f"{mm.name}_row_zero_point"
    graph.initializer.append(numpy_helper.from_array(colsum, f"{p}_colsum"))
    cast_out = casts[0].output[0]
    for user in consumers.get(cast_out, []):
        for i, name in enumerate(user.input):
            if name == cast_out:
                user.input[i] = f"{p}_out"
    after[casts[0].name] = [
        helper.make_node("Mul", [zero_f, f"{p}_colsum"], [f"{p}_offset"], name=f"{p}_offset"),
        helper.make_node("Sub", [cast_out, f"{p}_offset"], [f"{p}_out"], name=f"{p}_out"),
    ]
