"""What is benchmarked: the source folder (export, bundle or model) and realistic token inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import ARTIFACT_KINDS
from bertedge.runtime.data import TextExamples
from bertedge.runtime.features import pad_batch, pad_id
from bertedge.runtime.meta import (
    CONFIG_FILE,
    read_config,
    read_json_object,
    read_model_meta,
)
from bertedge.runtime.tasks import CLASSIFICATION
from bertedge.toolchain.bench.spec import Backend, Feeds

# ----------------------------------------------------------------------------- the source folder


@dataclass(frozen=True)
class Source:
    """What bench reads from the folder it is given."""

    root: Path
    kind: str  # "export", "bundle" or "model"
    task: str
    labels: tuple[str, ...]
    max_length: int  # truncation length for --data
    max_positions: int  # longest sequence the model accepts (bertedge.runtime.meta.position_limit)
    stride: int  # QA: tokens shared by consecutive context windows, as the model records it
    model_type: str
    tokenizer: Path  # tokenizer.json
    torch_dir: Path | None  # Hugging Face folder for the torch backend, when one exists
    precisions: dict[str, str]  # graph file name -> precision, from the export report or manifest
    graphs: dict[str, str] = field(default_factory=dict)  # artifact kind -> its graph file in `root`

    def file_for(self, backend: Backend) -> Path | None:
        """The graph file this backend runs, if the folder has its artifact kind."""
        graph = self.graphs.get(backend.kind) if backend.kind is not None else None
        return self.root / graph if graph else None

    def missing(self, backend: Backend) -> str:
        """Why this folder cannot run the backend ('' when it can)."""
        if backend.engine == "torch":
            return "" if self.torch_dir else f"no PyTorch model folder for '{self.root}' (a {self.kind} folder)"
        if self.file_for(backend) is None:
            if self.kind == "bundle":
                return f"the bundle '{self.root}' holds {', '.join(self.graphs)}, not {backend.kind}"
            return f"no {' / '.join(backend.files)} in '{self.root}'"
        return ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _model_dir(value: object) -> Path | None:
    path = Path(str(value)) if value else None
    return path if path is not None and (path / CONFIG_FILE).is_file() else None


def resolve_source(root: Path) -> Source:
    """Recognize an export folder, a bundle folder or a Hugging Face model folder.

    Raises:
        BertedgeError: the path is none of these, or lacks tokenizer.json.
    """
    if not root.is_dir():
        raise BertedgeError(f"'{root}' is not a folder", "pass an export folder, a bundle folder or a model folder")
    if not (root / "tokenizer.json").is_file():
        raise BertedgeError(f"'{root}' has no tokenizer.json", "bench a folder made by bertedge finetune / export / package")
    if (root / "manifest.json").is_file():
        return _bundle_source(root)
    if (root / "export-report.json").is_file():
        return _export_source(root)
    if (root / CONFIG_FILE).is_file():
        info = read_model_meta(root)
        return Source(root, "model", info.task.name, info.labels, info.max_length, info.max_positions, info.stride,
                      info.model_type, root / "tokenizer.json", root, {})
    raise BertedgeError(f"'{root}' has no manifest.json, export-report.json or config.json",
                        "pass the --out folder of `bertedge export`, `bertedge package` or `bertedge finetune`")


def _bundle_source(root: Path) -> Source:
    from bertedge.runtime.bundle import read_manifest

    m = read_manifest(root)
    meta = m.meta()
    torch_dir = _model_dir(m.provenance.get("model_dir"))
    positions = meta.max_positions
    if m.max_positions is None and torch_dir is not None:  # a bundle from before the field
        positions = read_config(torch_dir).max_positions
    graph = m.model_files[0]
    return Source(root, "bundle", meta.task.name, meta.labels, meta.max_length, positions, meta.stride,
                  meta.model_type, root / "tokenizer.json", torch_dir, {graph: m.precision or ""},
                  {_bundle_kind(m.artifact, m.engine, m.precision): graph})


def _bundle_kind(artifact: str | None, engine: str, precision: str | None) -> str:
    """The artifact kind a bundle ships: the one its manifest names, else the first kind of its
    engine and precision (bundles made before the manifest recorded it).

    >>> _bundle_kind(None, "openvino", "int8"), _bundle_kind("fused", "onnxruntime", "fp32")
    ('int8-openvino', 'fused')
    """
    if artifact in ARTIFACT_KINDS:
        return str(artifact)
    same = [k.name for k in ARTIFACT_KINDS.values() if k.engine == engine and k.precision == (precision or "fp32")]
    return same[0] if same else "fp32"


def _export_source(root: Path) -> Source:
    report = read_json_object(root / "export-report.json", "run `bertedge export` again")
    info = read_model_meta(root)
    torch_dir = _model_dir(report.get("model_dir"))
    precisions = {a["file"]: str(a.get("precision", "")) for a in report.get("artifacts", []) if a.get("file")}
    graphs = {k.name: k.graph for k in ARTIFACT_KINDS.values() if all((root / f).is_file() for f in k.files)}
    return Source(root, "export", info.task.name, info.labels, info.max_length, info.max_positions, info.stride,
                  info.model_type, root / "tokenizer.json", torch_dir, precisions, graphs)


# ----------------------------------------------------------------------------- realistic inputs


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """The tokens the tokenizer's own template puts around a text: [CLS] / [SEP], <s> / </s>, ...

    An empty text may keep a piece of its own (SentencePiece's '▁'); the template's ends are
    still the first and last ids.
    """
    ids = tokenizer.encode("", add_special_tokens=True).ids
    if len(ids) >= 2:
        return int(ids[0]), int(ids[-1])
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise BertedgeError("the tokenizer adds no start / end tokens to a text",
                            "bench a model whose tokenizer.json has a post-processor template")
    return int(cls), int(sep)


def realistic_batch(tokenizer: Any, sentences: Sequence[str], batch_size: int, seq_len: int,
                    seed: int = 0) -> Feeds:
    """A batch of real text, every row exactly `seq_len` tokens: [CLS] sentences... [SEP].

    Each row starts at a different sentence and runs on through the list (repeating it when
    needed), so rows differ; the attention mask is all ones and token types all zero.
    """
    cls, sep = _special_ids(tokenizer)
    pieces = [enc.ids for enc in tokenizer.encode_batch(list(sentences), add_special_tokens=False) if enc.ids]
    if not pieces:
        raise BertedgeError("the input sentences tokenize to nothing", "give --data with real text")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch_size):
        body: list[int] = []
        i = int(rng.integers(len(pieces)))
        while len(body) < seq_len - 2:
            body.extend(pieces[i % len(pieces)])
            i += 1
        rows.append([cls, *body[: seq_len - 2], sep])
    ids = np.asarray(rows, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


@dataclass
class DataSet:
    """--data, tokenized once, in length-sorted padded batches (`order` maps rows back)."""

    examples: TextExamples
    batches: list[Feeds]
    order: np.ndarray  # row index of each output row, batches concatenated
    tokens: int  # real (unpadded) tokens in the whole set
    truncated: int  # rows longer than max_length


def tokenize_dataset(tokenizer: Any, examples: TextExamples, max_length: int, batch_size: int) -> DataSet:
    """Tokenize as the task record does (truncation at max_length); batches of similar length,
    padded to their longest."""
    features = CLASSIFICATION.encode(tokenizer, examples, max_length, 0)
    lengths = np.array([len(e.ids) for e in features.encodings])
    order = np.argsort(lengths, kind="stable")
    pad = pad_id(tokenizer)
    batches = [pad_batch([features.encodings[i] for i in order[s:s + batch_size]], pad)
               for s in range(0, len(order), batch_size)]
    return DataSet(examples, batches, order, int(lengths.sum()), sum(features.truncated))
