"""What a bundle's graph says about itself, read without building a session.

A session costs a third of a bundle's load time (MiniLM INT8), so the facts the manifest is
checked against (the outputs' shapes, the rows of the word- and position-embedding tables, the
ONNX metadata) are read from the protobuf's field headers: initializer payloads are skipped by
length, never copied. Anything this reader cannot parse falls back to onnxruntime, which then
reports a broken file in its own words. An OpenVINO IR (`.xml`) is read by OpenVINO without
compiling it.

Runtime side of the dependency wall: stdlib, onnxruntime or OpenVINO; never the `onnx` package.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bertedge.errors import BertedgeError

Dim = int | str | None  # a static size, a symbolic name, or unknown
REBUILD = "rebuild it with `bertedge package EXPORT_DIR --out BUNDLE` or copy it again"
# Hugging Face's embedding parameter names keep these words through export, fusion and INT8
# (quantized copies append `_quantized`); a family without such a table (ModernBERT's rotary
# positions) simply has no fact to check.
WORD_TABLE, POSITION_TABLE = "word_embeddings", "position_embeddings"


@dataclass(frozen=True)
class GraphFacts:
    """The facts of one graph a manifest must agree with."""

    outputs: dict[str, list[Dim]]  # output name -> shape
    vocab_rows: int | None = None  # rows of the word-embedding table (the largest id + 1)
    position_rows: int | None = None  # rows of the position-embedding table
    metadata: dict[str, str] = field(default_factory=dict)  # ONNX metadata_props


def graph_facts(model: Path) -> GraphFacts:
    """The outputs, embedding-table sizes and metadata of an ONNX graph or OpenVINO IR."""
    if model.suffix == ".xml":
        return ir_facts(model)
    try:
        with model.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages in only what is read
        try:
            return onnx_facts(memoryview(mapped))
        finally:
            with contextlib.suppress(BufferError):  # a view still alive: the GC closes it later
                mapped.close()
    except (StopIteration, ValueError, IndexError, TypeError, UnicodeDecodeError, OSError):
        from bertedge.runtime.sessions import make_session

        session = make_session(model, threads=1, optimize=False, fix=REBUILD)
        return GraphFacts({o.name: list(o.shape) for o in session.get_outputs()})


def onnx_facts(buf: memoryview) -> GraphFacts:
    """ModelProto: graph(7) {initializer(5), output(12)}, metadata_props(14)."""
    graph: memoryview | None = None
    metadata: dict[str, str] = {}
    for number, value in proto_fields(buf):
        if number == 7 and isinstance(value, memoryview):
            graph = value
        elif number == 14 and isinstance(value, memoryview):
            key, text = string_entry(value)
            metadata[key] = text
    if graph is None:
        raise ValueError("no graph in the model")
    outputs: dict[str, list[Dim]] = {}
    tables: dict[str, int] = {}
    for number, value in proto_fields(graph):
        if number == 12 and isinstance(value, memoryview):
            name, dims = value_info(value)
            outputs[name] = dims
        elif number == 5 and isinstance(value, memoryview):
            name, shape = tensor_header(value)
            for table in (WORD_TABLE, POSITION_TABLE):
                if table in name and len(shape) == 2 and table not in tables:
                    tables[table] = shape[0]
    return GraphFacts(outputs, tables.get(WORD_TABLE), tables.get(POSITION_TABLE), metadata)


def graph_output_shapes(model: Path) -> dict[str, list[Dim]]:
    """The graph outputs' names and shapes (see `graph_facts`)."""
    return graph_facts(model).outputs


def ir_output_shapes(model: Path) -> dict[str, list[Dim]]:
    """An OpenVINO IR's outputs and shapes (dynamic axes as None), read without compiling."""
    return ir_facts(model).outputs


def ir_facts(model: Path) -> GraphFacts:
    """An OpenVINO IR's outputs and embedding tables, read without compiling."""
    try:
        import openvino as ov
    except ImportError:
        raise BertedgeError(f"'{model.name}' is an OpenVINO model, and OpenVINO is not installed",
                            "pip install 'bertedge[openvino]'") from None
    try:
        graph = ov.Core().read_model(str(model))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BertedgeError(f"OpenVINO cannot read '{model.name}' ({first})", REBUILD) from None
    outputs = {o.get_any_name(): [d.get_length() if d.is_static else None for d in o.get_partial_shape()]
               for o in graph.outputs}
    tables: dict[str, int] = {}
    for op in graph.get_ops():
        if op.get_type_name() != "Constant":
            continue
        shape = list(op.get_output_shape(0))
        for table in (WORD_TABLE, POSITION_TABLE):
            if table in op.get_friendly_name() and len(shape) == 2 and table not in tables:
                tables[table] = int(shape[0])
    return GraphFacts(outputs, tables.get(WORD_TABLE), tables.get(POSITION_TABLE))


# ----------------------------------------------------------------------------- protobuf


def proto_fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of one protobuf message: varints as int, the rest as bytes.

    >>> [(n, bytes(v) if isinstance(v, memoryview) else v) for n, v in proto_fields(memoryview(b"\\x08\\x96\\x01\\x12\\x02hi"))]
    [(1, 150), (2, b'hi')]
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos: pos + size], pos + size
        elif wire == 2:
            size, pos = varint(buf, pos)
            value, pos = buf[pos: pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by ONNX")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """A base-128 varint at pos: (value, position after it)."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("malformed varint")


def packed_varints(buf: memoryview) -> list[int]:
    """A packed repeated varint field's values.

    >>> packed_varints(memoryview(b"\\x02\\x80\\x04"))
    [2, 512]
    """
    values, pos = [], 0
    while pos < len(buf):
        value, pos = varint(buf, pos)
        values.append(value)
    return values


def value_info(message: memoryview) -> tuple[str, list[Dim]]:
    """ValueInfoProto -> (name, dims): type(2).tensor_type(1).shape(2).dim(1).{dim_value(1) | dim_param(2)}."""
    name, dims = "", []
    for number, value in proto_fields(message):
        if number == 1:
            name = bytes(value).decode("utf-8")  # type: ignore[arg-type]
        elif number == 2:
            for tensor in submessages(value, 1):
                for shape in submessages(tensor, 2):
                    for dim in submessages(shape, 1):
                        dims.append(dimension(dim))
    return name, dims


def tensor_header(message: memoryview) -> tuple[str, list[int]]:
    """TensorProto -> (name(8), dims(1)); the payload fields are skipped, not read."""
    name, dims = "", []
    for number, value in proto_fields(message):
        if number == 8 and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8")
        elif number == 1:
            dims += packed_varints(value) if isinstance(value, memoryview) else [value]
    return name, dims


def string_entry(message: memoryview) -> tuple[str, str]:
    """StringStringEntryProto -> (key(1), value(2))."""
    key = text = ""
    for number, value in proto_fields(message):
        if isinstance(value, memoryview) and number in (1, 2):
            decoded = bytes(value).decode("utf-8")
            key, text = (decoded, text) if number == 1 else (key, decoded)
    return key, text


def metadata_entry(key: str, value: str) -> bytes:
    """One ModelProto.metadata_props(14) field, ready to append to a serialized model: protobuf
    merges fields in any order, so appending adds an entry and leaves the graph as it was.

    >>> metadata_entry("k", "v")
    b'r\\x06\\n\\x01k\\x12\\x01v'
    """
    entry = field_bytes(1, key.encode("utf-8")) + field_bytes(2, value.encode("utf-8"))
    return field_bytes(14, entry)


def field_bytes(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def submessages(message: int | memoryview, wanted: int) -> Iterator[memoryview]:
    if not isinstance(message, memoryview):
        raise ValueError("expected a sub-message")
    for number, value in proto_fields(message):
        if number == wanted and isinstance(value, memoryview):
            yield value


def dimension(message: memoryview) -> Dim:
    for number, value in proto_fields(message):
        if number == 1 and isinstance(value, int):
            return value if value < 1 << 63 else None  # a negative (unknown) size
        if number == 2 and isinstance(value, memoryview):
            return bytes(value).decode("utf-8")
    return None
