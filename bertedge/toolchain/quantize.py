"""INT8 quantization of an exported encoder: dynamic (per-tensor or per-token), static QDQ, the search.

The search knows nothing about what "good enough" means: export (`bertedge.toolchain.export.int8`)
passes a `check` callback that validates (and times) each candidate file and says whether it meets
the budgets; the same search runs OpenVINO's NNCF recipes, given their `build` function.
Dynamic candidates, each validated on the user's --eval / --agreement-data: the plain recipe;
per-channel weights; per-channel with per-token activations, the batch-invariant one; then the
per-token recipe with the nodes that carry most of the output error kept in fp32
(`sensitivity`). Static candidates: the recipe, per-channel + reduce_range, then ever larger
node groups kept in fp32 (classifier head, embeddings, first and last encoder layers).
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
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

from bertedge.toolchain.embeddings import embedding_gathers, quantize_embeddings
from bertedge.toolchain.per_token import per_token_activations

Feeds = dict[str, np.ndarray]


class Method(str, Enum):
    """How activations get their INT8 scales."""

    DYNAMIC = "dynamic"  # computed per batch at run time: no calibration data needed
    STATIC = "static"  # fixed from a calibration set, stored as QuantizeLinear/DequantizeLinear pairs


class Activations(str, Enum):
    """How a dynamic recipe scales the activations entering each MatMul."""

    PER_TENSOR = "per-tensor"  # onnxruntime's DynamicQuantizeLinear: one scale for the whole batch
    PER_TOKEN = "per-token"  # one symmetric scale per token row: a text's answer ignores its batch mates


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
    activations: Activations = Activations.PER_TENSOR  # dynamic only: per batch or per token row
    fp32_nodes: tuple[str, ...] = ()  # single nodes kept in fp32 (the sensitivity search picks them)
    calibrate: str = "minmax"  # static only: minmax, percentile or entropy
    int8_embeddings: bool = True  # the word-embedding table as int8, one scale per row (`embeddings`)

    @property
    def batch_invariant(self) -> bool:
        """Whether a text's output can depend on the other texts in its batch."""
        return self.method is Method.STATIC or self.activations is Activations.PER_TOKEN

    def label(self) -> str:
        """Short human-readable name, e.g. 'dynamic per-channel reduce-range keep=head'."""
        parts = [self.method.value]
        parts += ["per-channel"] if self.per_channel else []
        parts += ["reduce-range"] if self.reduce_range else []
        parts += [f"ops={','.join(self.operators)}"] if self.operators else []
        parts += [f"keep-fp32={'+'.join(k.value for k in self.keep_fp32)}"] if self.keep_fp32 else []
        parts += [f"fp32-nodes={len(self.fp32_nodes)}"] if self.fp32_nodes else []
        parts += ["per-token"] if self.activations is Activations.PER_TOKEN else []
        parts += [self.calibrate] if self.method is Method.STATIC else []
        parts += [] if self.int8_embeddings else ["fp32-embeddings"]
        return " ".join(parts)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description (enums as their values)."""
        d = asdict(self)
        d["method"] = self.method.value
        d["operators"] = list(self.operators) or "onnxruntime default"
        d["keep_fp32"] = [k.value for k in self.keep_fp32]
        d["fp32_nodes"] = list(self.fp32_nodes)
        d["activations"] = "static (calibrated)" if self.method is Method.STATIC else self.activations.value
        d["batch_invariant"] = self.batch_invariant
        d["weight_type"] = "int8"
        d["activation_type"] = "uint8" if self.method is Method.STATIC else "uint8 (dynamic)"
        d["format"] = "QDQ" if self.method is Method.STATIC else "QOperator"
        return d


def candidates(base: Int8Config) -> list[Int8Config]:
    """The recipes to try from `base`, without duplicates; export validates and times them all.

    Dynamic: the plain recipe, per-channel weights (3x fewer flips at the same speed, measured on
    the demo model), and
    per-channel with per-token activations on MatMul (the batch-invariant one). Sensitivity-
    guided fp32 nodes are added later, from measurement (`sensitivity`). Static: the recipe,
    per-channel + reduce_range, then ever larger node groups kept in fp32.

    >>> [c.label() for c in candidates(Int8Config())]
    ['dynamic', 'dynamic per-channel', 'dynamic per-channel ops=MatMul per-token']
    >>> len(candidates(Int8Config(Method.STATIC)))
    5
    """
    if base.method is Method.DYNAMIC:
        per_channel = replace(base, per_channel=True)
        per_token = replace(per_channel, activations=Activations.PER_TOKEN, operators=base.operators or ("MatMul",))
        ladder = [base, per_channel, per_token]
    else:
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
        excluded = frozenset([*excluded_nodes(model, config.keep_fp32), *config.fp32_nodes]) & _touched(model, config)
        key = (config.method, config.per_channel, config.reduce_range, config.operators, excluded,
               config.activations, config.calibrate, config.int8_embeddings)
        if key not in seen:
            seen.add(key)
            kept.append(config)
    return kept


def _touched(model: onnx.ModelProto, config: Int8Config) -> set[str]:
    """Nodes the recipe would quantize: dynamic INT8 only touches ops with a weight initializer
    (for Gather: an initializer as its data, i.e. an embedding table, not a constant index);
    with `int8_embeddings`, the word-embedding Gathers too."""
    ops = set(config.operators) or set(_DEFAULT_OPS[config.method])
    weights = {i.name for i in model.graph.initializer}

    def has_weight(n: onnx.NodeProto) -> bool:
        return n.input[0] in weights if n.op_type == "Gather" else any(i in weights for i in n.input)

    words = {n.name for nodes in embedding_gathers(model).values() for n in nodes} if config.int8_embeddings else set()
    return words | {n.name for n in model.graph.node if n.op_type in ops
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
    """Write an INT8 copy of the ONNX graph `src` to `dst` (with `int8_embeddings`, its word-embedding
    table too: int8 rows, one scale per token id, `bertedge.toolchain.embeddings`).

    `DefaultTensorType=FLOAT` works around onnxruntime 1.32 failing on graphs fused by its
    transformer optimizer ("Unable to find data type for weight_name=...").

    Raises:
        ValueError: static quantization without calibration batches.
    """
    model = onnx.load(str(src))
    exclude = [*excluded_nodes(model, config.keep_fp32), *config.fp32_nodes]
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
        elif not calibration:
            raise ValueError("static quantization needs calibration batches")
        else:
            reader = FeedReader(calibration, [i.name for i in model.graph.input])
            quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ,  # type: ignore[arg-type]
                            activation_type=QuantType.QUInt8, calibrate_method=CALIBRATE[config.calibrate],
                            **common)
    if config.activations is Activations.PER_TOKEN or config.int8_embeddings:
        quantized = onnx.load(str(dst))
        if config.method is Method.DYNAMIC and config.activations is Activations.PER_TOKEN:
            per_token_activations(quantized)
        if config.int8_embeddings:
            quantize_embeddings(quantized, keep_fp32=exclude)
        onnx.save(quantized, str(dst))


CALIBRATE = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}
class Verdict(Protocol):
    """What the search needs from a validation result."""

    passed: bool
    label_agreement: float
    cost_ms: float | None  # measured time at the target shapes; lower wins among passers


class Recipe(Protocol):
    """What the search needs from a recipe: `Int8Config`, or `openvino_int8.Recipe`."""

    def label(self) -> str: ...

    def to_dict(self) -> dict[str, object]: ...


V = TypeVar("V", bound=Verdict)
R = TypeVar("R", bound=Recipe)
Build = Callable[[Path, Path, R, Sequence[Feeds]], None]  # (source graph, destination, recipe, calibration)


@dataclass
class Attempt(Generic[R, V]):
    """One candidate tried: its recipe, how it validated (or why it could not be built)."""

    config: R
    seconds: float
    verdict: V | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict is not None and self.verdict.passed


@dataclass
class SearchResult(Generic[R, V]):
    """Every attempt in order, and the index of the one whose file now sits at `dst`."""

    attempts: list[Attempt[R, V]] = field(default_factory=list)
    chosen: int | None = None  # None: no candidate could be built at all

    @property
    def passed(self) -> bool:
        return self.chosen is not None and self.attempts[self.chosen].passed


def _quantize_onnx(src: Path, dst: Path, config: Any, calibration: Sequence[Feeds]) -> None:
    quantize(src, dst, config, calibration)  # looked up at call time: tests replace `quantize`


def search(
    src: Path | Callable[[R], Path],
    dst: Path,
    ladder: Sequence[R],
    check: Callable[[Path, R], V],
    calibration: Sequence[Feeds] = (),
    search_all: bool = False,
    extend: Callable[[SearchResult[R, V]], Iterator[R]] | None = None,
    build: Build[R] | None = None,
) -> SearchResult[R, V]:
    """Build `src` with each recipe in `ladder` until one passes `check`; keep it at `dst`.

    `build` writes one candidate (default: `quantize`, onnxruntime INT8); an OpenVINO IR's
    `.bin` travels with its `.xml`. `src` may be a function of the recipe (per-token recipes
    start from a graph whose attention is left unfused, since QAttention takes a single
    activation scale).

    With `search_all`, every recipe is tried and the fastest passer wins (by its verdict's
    measured cost; without timings, the highest label agreement). When none passes, the highest-agreement candidate is kept (marked failed by its
    verdict) so the user can inspect it; a recipe that raises is recorded and skipped.
    `extend`, given the ladder's result, yields further recipes (cheapest first) that are tried
    until one passes.
    """
    result: SearchResult[R, V] = SearchResult()
    write: Build[R] = build or _quantize_onnx

    def attempt(config: R) -> Attempt[R, V]:
        i = len(result.attempts)
        source = src(config) if callable(src) else src
        tried = _try(source, dst.with_name(f"{dst.stem}.candidate{i}{dst.suffix}"), config, check, calibration,
                     write)
        result.attempts.append(tried)
        if tried.verdict is not None and _better(tried, result):
            result.chosen = i
        return tried

    for config in ladder:
        if attempt(config).passed and not search_all:
            break
    for config in (extend(result) if extend is not None else ()):
        if attempt(config).passed:
            break
    for i in range(len(result.attempts)):
        tmp = dst.with_name(f"{dst.stem}.candidate{i}{dst.suffix}")
        for part, final in zip(_parts(tmp), _parts(dst), strict=True):
            if i == result.chosen and part.exists():
                shutil.move(part, final)
            else:
                part.unlink(missing_ok=True)
    return result


def _parts(path: Path) -> list[Path]:
    """A candidate's files: the graph, and an OpenVINO IR's weights beside its .xml.

    >>> [p.name for p in _parts(Path("m.candidate0.xml"))]
    ['m.candidate0.xml', 'm.candidate0.bin']
    """
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


@dataclass
class NodeSensitivity:
    """One node's share of the INT8 output error (a row of export-report.json's `sensitivity`)."""

    node: str
    error_with_node_fp32: float  # output error with this node alone left in fp32
    probed: str = ""  # "12 of 75": how many nodes the time cap let the probing measure
    error_all_int8: float = 0.0  # output error with every node quantized
    gain: float = 0.0  # error_all_int8 - error_with_node_fp32
    share: float = 0.0  # the gain over the sum of positive gains


def sensitivity(src: Path, config: Int8Config, nodes: Sequence[str], error: Callable[[Path], float],
                work: Path, seconds: float | None = None) -> list[NodeSensitivity]:
    """Each node's share of the INT8 output error: quantize with only that node left in fp32.

    `error(path)` measures a quantized file against the reference (e.g. mean |logit difference|
    on a slice of the user's data). A node's gain is how much the error falls when it alone
    stays in fp32; its share is the gain over the sum of positive gains. Sorted by gain, largest
    first: the order in which the search keeps nodes in fp32.

    `seconds` caps the probing (one quantization per node: a base-size model has ~75 nodes at
    30-60 s each): nodes are probed from the output backwards, where INT8 errors reach the head
    least filtered, and the ones left unprobed are not ranked (each row says `probed` of total).
    """
    start = time.perf_counter()
    path = work / "sensitivity.onnx"
    quantize(src, path, config)
    full = error(path)
    rows: list[NodeSensitivity] = []
    for node in reversed(list(nodes)):
        if rows and seconds is not None and time.perf_counter() - start > seconds:
            break
        quantize(src, path, replace(config, fp32_nodes=(node,)))
        rows.append(NodeSensitivity(node, error(path)))
    path.unlink(missing_ok=True)
    total = sum(max(0.0, full - r.error_with_node_fp32) for r in rows) or 1.0
    for r in rows:
        r.probed, r.error_all_int8, r.gain = f"{len(rows)} of {len(nodes)}", full, full - r.error_with_node_fp32
        r.share = max(0.0, r.gain) / total
    return sorted(rows, key=lambda r: -r.gain)


def touched_nodes(model: onnx.ModelProto, config: Int8Config) -> list[str]:
    """The nodes `config` would quantize, in graph order."""
    touched = _touched(model, config)
    return [n.name for n in model.graph.node if n.name in touched]


def _try(src: Path, path: Path, config: R, check: Callable[[Path, R], V], calibration: Sequence[Feeds],
         build: Build[R]) -> Attempt[R, V]:
    start = time.perf_counter()
    try:
        build(src, path, config, calibration)
    except Exception as e:  # a quantizer failure ends this recipe, not the search
        for part in _parts(path):
            part.unlink(missing_ok=True)
        return Attempt(config, time.perf_counter() - start, error=f"{type(e).__name__}: {_first_line(e)}")
    try:
        verdict = check(path, config)
    except Exception as e:  # it quantized, but the engine cannot load or run the file: skip it
        for part in _parts(path):
            part.unlink(missing_ok=True)
        return Attempt(config, time.perf_counter() - start,
                       error=f"cannot load or run: {type(e).__name__}: {_first_line(e)}")
    return Attempt(config, time.perf_counter() - start, verdict=verdict)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _better(attempt: Attempt[R, V], result: SearchResult[R, V]) -> bool:
    """Passing beats failing; among passers the faster (measured cost), else higher agreement;
    among failers the higher agreement; ties keep the earlier one."""
    if result.chosen is None:
        return True
    current = result.attempts[result.chosen]
    new, old = attempt.verdict, current.verdict
    assert new is not None and old is not None
    if attempt.passed != current.passed:
        return attempt.passed
    if attempt.passed and new.cost_ms is not None and old.cost_ms is not None and new.cost_ms != old.cost_ms:
        return new.cost_ms < old.cost_ms
    return new.label_agreement > old.label_agreement
