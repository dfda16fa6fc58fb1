"""INT8 quantization of an exported encoder: dynamic, static (QDQ + calibration), and the fallback search.

The search knows nothing about what "good enough" means: `export.py` passes a `check`
callback that validates each candidate file and says whether it meets the accuracy budget.
Candidates run fastest-first (docs: /work/shared/PERF-NOTES.md): the plain recipe on the
given graph; then per-channel + reduce_range, which cut label flips on AVX2 CPUs without
VNNI (the u8 x s8 16-bit intermediate saturates); then ever larger parts of the network
kept in fp32 (classifier head, embeddings, first and last encoder layers).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

Feeds = dict[str, np.ndarray]


class Method(str, Enum):
    """How activations get their INT8 scales."""

    DYNAMIC = "dynamic"  # computed per batch at run time: no calibration data needed
    STATIC = "static"  # fixed from a calibration set, stored as QuantizeLinear/DequantizeLinear pairs


class Keep(str, Enum):
    """A group of nodes that a candidate may leave in fp32 (nodes_to_exclude)."""

    HEAD = "head"  # classifier / pooler / QA span head
    EMBEDDINGS = "embeddings"  # token, position and segment embeddings
    FIRST_LAST_LAYERS = "first_last_layers"  # the first and the last encoder layer


@dataclass(frozen=True)
class Int8Config:
    """One INT8 recipe: what the search tries and the report records."""

    method: Method = Method.DYNAMIC
    per_channel: bool = False  # one weight scale per output channel instead of per tensor
    reduce_range: bool = False  # 7-bit weights: avoids u8 x s8 saturation on AVX2 without VNNI
    operators: tuple[str, ...] = ()  # op types to quantize; () = onnxruntime's default set
    keep_fp32: tuple[Keep, ...] = ()  # node groups excluded from quantization

    def label(self) -> str:
        """Short human-readable name, e.g. 'dynamic per-channel reduce-range keep=head'."""
        parts = [self.method.value]
        parts += ["per-channel"] if self.per_channel else []
        parts += ["reduce-range"] if self.reduce_range else []
        parts += [f"ops={','.join(self.operators)}"] if self.operators else []
        parts += [f"keep-fp32={'+'.join(k.value for k in self.keep_fp32)}"] if self.keep_fp32 else []
        return " ".join(parts)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description (enums as their values)."""
        d = asdict(self)
        d["method"] = self.method.value
        d["operators"] = list(self.operators) or "onnxruntime default"
        d["keep_fp32"] = [k.value for k in self.keep_fp32]
        d["weight_type"] = "int8"
        d["activation_type"] = "uint8" if self.method is Method.STATIC else "uint8 (dynamic)"
        d["format"] = "QDQ" if self.method is Method.STATIC else "QOperator"
        return d


def candidates(base: Int8Config) -> list[Int8Config]:
    """The fallback ladder from `base`, fastest first, without duplicates.

    >>> [c.label() for c in candidates(Int8Config())][:2]
    ['dynamic', 'dynamic per-channel reduce-range']
    >>> len(candidates(Int8Config()))
    5
    """
    mitigated = replace(base, per_channel=True, reduce_range=True)
    ladder = [base, mitigated]
    keep: tuple[Keep, ...] = ()
    for group in Keep:
        keep = keep + (group,)
        ladder.append(replace(mitigated, keep_fp32=keep))
    unique: list[Int8Config] = []
    for c in ladder:
        if c not in unique:
            unique.append(c)
    return unique


def distinct(ladder: Sequence[Int8Config], model: onnx.ModelProto) -> list[Int8Config]:
    """Drop recipes that would quantize exactly what an earlier one did.

    Keeping the classifier in fp32 changes nothing under dynamic quantization of a
    classification graph, for instance: its Gemm is not an op dynamic quantization touches.
    """
    seen: set[tuple[object, ...]] = set()
    kept = []
    for config in ladder:
        excluded = frozenset(excluded_nodes(model, config.keep_fp32)) & _touched(model, config)
        key = (config.method, config.per_channel, config.reduce_range, config.operators, excluded)
        if key not in seen:
            seen.add(key)
            kept.append(config)
    return kept


def _touched(model: onnx.ModelProto, config: Int8Config) -> set[str]:
    """Nodes the recipe would quantize: dynamic INT8 only touches ops with a weight initializer
    (for Gather: an initializer as its data, i.e. an embedding table, not a constant index)."""
    ops = set(config.operators) or set(_DEFAULT_OPS[config.method])
    weights = {i.name for i in model.graph.initializer}

    def has_weight(n: onnx.NodeProto) -> bool:
        return n.input[0] in weights if n.op_type == "Gather" else any(i in weights for i in n.input)

    return {n.name for n in model.graph.node if n.op_type in ops
            and (config.method is Method.STATIC or has_weight(n))}


_DEFAULT_OPS = {Method.DYNAMIC: tuple(IntegerOpsRegistry), Method.STATIC: tuple(QDQRegistry)}

# Node names come from the PyTorch module path (legacy exporter), e.g.
# "/model/bert/encoder/layer.3/intermediate/dense/MatMul"; fused nodes are named "Attention_3".
_HEAD = re.compile(r"classifier|pooler|qa_outputs")
_LAYER = re.compile(r"layer[._](\d+)")
_EMBEDDING_OPS = {"EmbedLayerNormalization"}


def excluded_nodes(model: onnx.ModelProto, keep: Sequence[Keep]) -> list[str]:
    """Names of the nodes in the groups `keep` asks to leave in fp32.

    A node without a layer in its name (a fused `Attention_k`) belongs to the layer of the
    next named node in topological order: every node of layer k depends on its attention.
    """
    nodes = list(model.graph.node)
    layers = _node_layers(nodes)
    known = [v for v in layers.values() if v is not None]
    edge_layers = {min(known), max(known)} if known else set()
    chosen = []
    for node in nodes:
        if (
            (Keep.HEAD in keep and _HEAD.search(node.name))
            or (Keep.EMBEDDINGS in keep and _is_embedding(node))
            or (Keep.FIRST_LAST_LAYERS in keep and layers.get(node.name) in edge_layers)
        ):
            chosen.append(node.name)
    return chosen


def _is_embedding(node: onnx.NodeProto) -> bool:
    return node.op_type in _EMBEDDING_OPS or "embeddings" in node.name


def _node_layers(nodes: Sequence[onnx.NodeProto]) -> dict[str, int | None]:
    layers: dict[str, int | None] = {}
    pending: list[str] = []  # unnamed encoder nodes waiting for the next named one
    for node in nodes:
        if _is_embedding(node) or _HEAD.search(node.name):
            layers[node.name] = None
            continue
        match = _LAYER.search(node.name)
        if match is None:
            pending.append(node.name)
            continue
        layers[node.name] = int(match.group(1))
        layers.update(dict.fromkeys(pending, int(match.group(1))))
        pending = []
    layers.update(dict.fromkeys(pending))
    return layers


class FeedReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime under the graph's own input names."""

    def __init__(self, batches: Sequence[Feeds], input_names: Sequence[str]) -> None:
        self._feeds = [{n: _input(b, n) for n in input_names} for b in batches]
        self._next = iter(self._feeds)

    def get_next(self) -> Feeds | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._feeds)


def _input(batch: Feeds, name: str) -> np.ndarray:
    if name in batch:
        return batch[name].astype(np.int64)
    return np.zeros_like(batch["input_ids"], dtype=np.int64)  # e.g. token_type_ids the tokenizer omits


@contextlib.contextmanager
def _quiet_onnxruntime_advice() -> Iterator[None]:
    """onnxruntime.quantization logs advice ('consider pre-processing') through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(src: Path, dst: Path, config: Int8Config, calibration: Sequence[Feeds] = ()) -> None:
    """Write an INT8 copy of the ONNX graph `src` to `dst`.

    `DefaultTensorType=FLOAT` works around onnxruntime 1.32 failing on graphs fused by its
    transformer optimizer ("Unable to find data type for weight_name=...").

    Raises:
        ValueError: static quantization without calibration batches.
    """
    model = onnx.load(str(src))
    exclude = excluded_nodes(model, config.keep_fp32)
    common = dict(
        op_types_to_quantize=list(config.operators) or None,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    with _quiet_onnxruntime_advice():
        if config.method is Method.DYNAMIC:
            quantize_dynamic(src, dst, **common)  # type: ignore[arg-type]
            return
        if not calibration:
            raise ValueError("static quantization needs calibration batches")
        reader = FeedReader(calibration, [i.name for i in model.graph.input])
        quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ,  # type: ignore[arg-type]
                        activation_type=QuantType.QUInt8, **common)


class Verdict(Protocol):
    """What the search needs from a validation result."""

    passed: bool
    label_agreement: float


V = TypeVar("V", bound=Verdict)


@dataclass
class Attempt(Generic[V]):
    """One candidate tried: its recipe, how it validated (or why it could not be built)."""

    config: Int8Config
    seconds: float
    verdict: V | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict is not None and self.verdict.passed


@dataclass
class SearchResult(Generic[V]):
    """Every attempt in order, and the index of the one whose file now sits at `dst`."""

    attempts: list[Attempt[V]] = field(default_factory=list)
    chosen: int | None = None  # None: no candidate could be built at all

    @property
    def passed(self) -> bool:
        return self.chosen is not None and self.attempts[self.chosen].passed


def search(
    src: Path,
    dst: Path,
    ladder: Sequence[Int8Config],
    check: Callable[[Path, Int8Config], V],
    calibration: Sequence[Feeds] = (),
    search_all: bool = False,
) -> SearchResult[V]:
    """Quantize `src` with each recipe in `ladder` until one passes `check`; keep it at `dst`.

    With `search_all`, every recipe is tried and the passer with the highest label agreement
    wins. When none passes, the highest-agreement candidate is kept (marked failed by its
    verdict) so the user can inspect it; a recipe that raises is recorded and skipped.
    """
    result: SearchResult[V] = SearchResult()
    for i, config in enumerate(ladder):
        attempt = _try(src, dst.with_name(f"{dst.stem}.candidate{i}{dst.suffix}"), config, check, calibration)
        result.attempts.append(attempt)
        if attempt.verdict is not None and _better(attempt, result):
            result.chosen = i
        if attempt.passed and not search_all:
            break
    for i in range(len(result.attempts)):
        tmp = dst.with_name(f"{dst.stem}.candidate{i}{dst.suffix}")
        if i == result.chosen:
            shutil.move(tmp, dst)
        else:
            tmp.unlink(missing_ok=True)
    return result


def _try(src: Path, path: Path, config: Int8Config, check: Callable[[Path, Int8Config], V],
         calibration: Sequence[Feeds]) -> Attempt[V]:
    start = time.perf_counter()
    try:
        quantize(src, path, config, calibration)
    except Exception as e:  # an onnxruntime quantizer failure ends this recipe, not the search
        path.unlink(missing_ok=True)
        return Attempt(config, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
    try:
        verdict = check(path, config)
    except Exception as e:  # it quantized, but onnxruntime cannot load or run the file: skip it
        path.unlink(missing_ok=True)
        return Attempt(config, time.perf_counter() - start, error=f"cannot load or run: {type(e).__name__}: {e}")
    return Attempt(config, time.perf_counter() - start, verdict=verdict)


def _better(attempt: Attempt[V], result: SearchResult[V]) -> bool:
    """Passing beats failing; then higher label agreement; ties keep the earlier (faster) one."""
    if result.chosen is None:
        return True
    current = result.attempts[result.chosen]
    assert attempt.verdict is not None and current.verdict is not None
    if attempt.passed != current.passed:
        return attempt.passed
    return attempt.verdict.label_agreement > current.verdict.label_agreement
