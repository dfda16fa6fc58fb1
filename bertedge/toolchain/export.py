"""bertedge export: PyTorch model folder -> validated ONNX artifacts (fp32, fused, INT8, FP16).

Every artifact is checked against PyTorch before the export folder appears, in the batches the
runtime builds (length-sorted groups of `batch_size`, padded to their longest): max |output
difference| on real and random inputs, agreement with PyTorch's answers, the task metric on
`--eval` data, and batch invariance (a text alone, among 31 others, padded). INT8 candidates
(`bertedge.toolchain.quantize`) must meet the metric and agreement budgets and stay batch-invariant;
every validated artifact is timed at the target shapes and the fastest passer is recommended.
The folder is built next to `--out` and moved into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.toolchain import quantize as q
from bertedge.toolchain.families import FAMILIES, family
from bertedge.errors import BertedgeError
from bertedge.runtime.bundle import cpu_model_and_flags
from bertedge.runtime.data import (
    BadRows,
    Columns,
    load_text_classification,
    seeded_indices,
    seeded_subset,
)
from bertedge.runtime.features import (
    Features,
    length_sorted_batches,
    load_tokenizer,
    pad_batch,
    pad_id,
)
from bertedge.runtime.meta import ModelMeta, read_model_meta, write_meta
from bertedge.runtime.sessions import ONNXRUNTIME, OPENVINO, make_session, openvino_version
from bertedge.runtime.tasks import Task

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Run = Callable[[Feeds], Outputs]

# config model_type -> onnxruntime optimizer type, for every family in bertedge.toolchain.families
SUPPORTED_MODEL_TYPES = {f.model_type: f.optimizer_type for f in FAMILIES if f.exportable}
ARTIFACT_FILES = {"fp32": "model.onnx", "fused": "model-fused.onnx", "int8": "model-int8.onnx",
                  "int8-static": "model-int8-static.onnx", "int8-openvino": "model-int8-openvino.xml",
                  "fp16": "model-fp16.onnx"}
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "bertedge.json")
# Used for label agreement when the user gives neither --eval nor --calibration.
BUILTIN_SENTENCES = (
    "The service was quick and the staff were friendly.", "I would not recommend this to anyone.",
    "It arrived late and the box was damaged.", "An absolute delight from start to finish.",
    "The plot was thin but the acting saved it.", "Battery life is shorter than advertised.",
    "What time does the museum open on Sundays?", "She moved to Berlin in 2019 to work at Siemens.",
    "Terrible sound quality, returned it the next day.", "A solid, dependable choice for the price.",
    "The meeting has been moved to Thursday afternoon.", "Honestly the best pizza I have had in years.",
    "The instructions were confusing and incomplete.", "Paris is the capital of France.",
    "Not bad, though the sequel was better.", "The update fixed every crash I had seen.",
)


class Optimization(str, Enum):
    """Graph optimization applied after export."""

    NONE = "none"
    FUSED = "fused"  # onnxruntime transformer optimizer: Attention, SkipLayerNorm, BiasGelu, ...


class Quantization(str, Enum):
    """Which INT8 artifact to build."""

    NONE = "none"
    DYNAMIC = "dynamic"
    STATIC = "static"


@dataclass
class ExportArgs:
    """Everything `bertedge export` needs."""

    model_dir: Path  # output of `bertedge finetune`, or any HF model folder with a head
    out: Path  # export folder to create
    optimization: Optimization = Optimization.FUSED  # also write model-fused.onnx
    quantize: Quantization = Quantization.DYNAMIC  # INT8 variant to build
    fp16: bool = False  # also write model-fp16.onnx for the CUDA execution provider
    opset: int = 17  # ONNX opset for the legacy TorchScript exporter
    calibration: Path | None = None  # texts for static INT8 calibration (and agreement if no --eval)
    calibration_rows: int = 200  # calibration rows drawn (seeded) from --calibration
    agreement_data: Path | None = None  # unlabelled texts the agreement budget also counts (beside --eval)
    agreement_rows: int = 2000  # rows drawn (seeded) from --agreement-data, never calibration rows
    eval_file: Path | None = None  # labelled data: metric of every artifact vs PyTorch
    max_eval_rows: int = 0  # seeded subset of --eval (0 = all rows)
    columns: Columns = field(default_factory=Columns)  # column names in --eval / --calibration
    max_accuracy_drop: float = 0.5  # budget in metric points for lossy artifacts (with --eval)
    min_agreement: float = 0.995  # budget: share of fp32's answers a lossy artifact must keep (always)
    per_channel: bool = False  # start the INT8 search per-channel
    reduce_range: bool = False  # start the INT8 search with 7-bit weights
    int8_operators: tuple[str, ...] = ()  # op types to quantize; () = onnxruntime default
    search_all: bool = False  # also run the sensitivity search when a plain candidate already passed
    require_int8: bool = False  # fail the export when no INT8 candidate meets the budget
    atol: float = 1e-3  # max |output diff| allowed for fp32 and fused graphs
    batch_size: int = 32  # validation batch size: the runtime's length-sorted batches of this size
    batch_invariance: bool = True  # lossy artifacts must answer a text the same alone, in a batch, padded
    invariance_tol: float = 1e-5  # max |probability difference| the batch-invariance check allows
    targets: tuple[tuple[int, int], ...] = ()  # (batch, seq) shapes timed; () = 1 and 32 at typical length
    timing_seconds: float = 1.0  # seconds of timed calls per artifact and target shape
    timing_rounds: int = 3  # the passers are timed again in this many interleaved rounds (0: no re-timing)
    threads: int = 0  # intra-op threads while timing (0: onnxruntime picks)
    sensitivity: bool = True  # keep the most error-prone nodes in fp32 when no invariant INT8 passes
    max_fp32_nodes: int = 8  # the most nodes the sensitivity search may keep in fp32
    sensitivity_seconds: float = 600.0  # cap on the sensitivity probing (one quantization per node)
    calibrate_method: str = "minmax"  # static INT8 calibration: minmax, percentile or entropy
    openvino: str = "auto"  # NNCF INT8 for the OpenVINO engine: auto (when installed and --calibration given), on, off
    seed: int = 0  # seeds random inputs and row subsets
    overwrite: bool = False  # replace an existing --out folder

    def __post_init__(self) -> None:
        self.model_dir, self.out = Path(self.model_dir), Path(self.out)
        self.optimization = Optimization(self.optimization)
        self.quantize = Quantization(self.quantize)
        problems = []
        if not 14 <= self.opset <= 20:
            problems.append(f"--opset {self.opset} is outside 14..20")
        if self.calibration_rows < 1 or self.batch_size < 1 or self.max_eval_rows < 0 or self.agreement_rows < 1:
            problems.append("--calibration-rows, --agreement-rows and --batch-size must be >= 1, --max-eval-rows >= 0")
        if not 0.0 <= self.min_agreement <= 1.0:
            problems.append(f"--min-agreement {self.min_agreement} is not between 0 and 1")
        if self.atol <= 0 or self.invariance_tol <= 0:
            problems.append("--atol and --invariance-tol must be positive")
        if any(b < 1 or n < 2 for b, n in self.targets):
            problems.append("--target shapes need batch >= 1 and sequence >= 2 (e.g. 1x32,32x128)")
        if self.calibrate_method not in q.CALIBRATE:
            problems.append(f"--calibrate-method must be one of {', '.join(q.CALIBRATE)}")
        if (self.max_fp32_nodes < 0 or self.timing_seconds <= 0 or self.threads < 0 or self.timing_rounds < 0
                or not self.sensitivity_seconds >= 0):
            problems.append("--max-fp32-nodes, --threads, --timing-rounds and --sensitivity-seconds must be >= 0, "
                            "--timing-seconds positive")
        if self.openvino not in ("auto", "on", "off"):
            problems.append(f"--openvino must be auto, on or off (got {self.openvino!r})")
        if self.openvino == "on" and (self.calibration is None or self.quantize is Quantization.NONE):
            problems.append("--openvino on needs --calibration FILE (texts from your data) and INT8 (not --quantize none)")
        if self.quantize is Quantization.STATIC and self.calibration is None:
            problems.append("--quantize static needs --calibration FILE (texts from your data)")
        if self.require_int8 and self.quantize is Quantization.NONE:
            problems.append("--require-int8 contradicts --quantize none")
        if self.out.resolve() == self.model_dir.resolve():
            problems.append("--out must differ from the model folder")
        if problems:
            raise BertedgeError("; ".join(problems), "fix the options above (see `bertedge export --help`)")


@dataclass
class ArtifactReport:
    """One validated artifact, as written to export-report.json."""

    name: str
    file: str
    precision: str
    optimization: str
    engine: str = ONNXRUNTIME  # what runs it: onnxruntime, or openvino (`bertedge[openvino]`)
    quantization: dict[str, object] | None = None
    size_mb: float = 0.0
    max_abs_diff_real: float | None = None
    max_abs_diff_random: float | None = None
    label_agreement: float = 0.0
    answers_changed: int | None = None  # of answers_compared: rows, real tokens (NER) or spans (QA)
    answers_compared: int | None = None
    metric: dict[str, object] | None = None
    batch_invariance: dict[str, object] | None = None  # alone vs in a batch of 32 vs padded
    timings_ms: dict[str, float] = field(default_factory=dict)  # "BxS" -> p50 ms at each target shape
    cost_ms: float | None = None  # geometric mean of timings_ms: what "fastest" compares
    validated_on: dict[str, object] = field(default_factory=dict)  # CPU and ISA flags of this check
    passed: bool = False
    validated: bool = False
    notes: str = ""
    seconds: float = 0.0


@dataclass
class ExportReport:
    """The export-report.json contents; `recommended` names the artifact to package."""

    model_dir: str
    task: str
    labels: list[str]
    opset: int
    input_names: list[str]
    output_names: list[str]
    cpu: dict[str, object]
    onnxruntime_version: str
    gate: str = ""
    validation_inputs: str = ""
    artifacts: list[ArtifactReport] = field(default_factory=list)
    int8_search: list[dict[str, object]] = field(default_factory=list)
    sensitivity: list[dict[str, object]] = field(default_factory=list)  # per node: share of the INT8 error
    targets: list[str] = field(default_factory=list)  # shapes every validated artifact was timed at
    recommended: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def artifact(self, name: str) -> ArtifactReport | None:
        """The artifact called `name`, if it was built."""
        return next((a for a in self.artifacts if a.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- source model


@dataclass
class Source:
    """The PyTorch side: model, tokenizer and what the graph's inputs are."""

    info: ModelMeta
    model: Any  # transformers.PreTrainedModel, in eval mode
    tokenizer: Any  # tokenizers.Tokenizer from tokenizer.json: the runtime's own tokenization
    input_names: list[str]
    stride: int  # QA window overlap, from bertedge.json (finetune writes it)


def load_source(model_dir: Path) -> Source:
    """Load model and tokenizer from a model folder, turning every failure into a BertedgeError."""
    if not model_dir.is_dir():
        raise BertedgeError(f"model folder '{model_dir}' does not exist", "pass the --out folder of `bertedge finetune`")
    info = read_model_meta(model_dir)
    found = family(info.model_type, str(model_dir / "config.json"))
    if not found.exportable:
        raise BertedgeError(f"{found.name} cannot be exported to ONNX: {found.blocker}",
                            f"export one of: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if not (model_dir / "tokenizer.json").is_file():
        raise BertedgeError(
            f"'{model_dir}' has no tokenizer.json (the runtime needs the fast tokenizer file)",
            "re-save the tokenizer with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`",
        )
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    model = _load_pretrained(model_dir, info.task)
    return Source(info, model, tokenizer, _input_names(model), info.stride)


def _load_pretrained(model_dir: Path, task: Task) -> Any:
    import transformers

    try:
        return getattr(transformers, task.hf_auto_class).from_pretrained(model_dir).eval()
    except Exception as e:  # truncated safetensors, missing weights, mismatched shapes ...
        raise BertedgeError(
            f"cannot load the weights in '{model_dir}' ({type(e).__name__}: {_first_line(e)})",
            "restore model.safetensors or re-run `bertedge finetune`",
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _input_names(model: Any) -> list[str]:
    """The graph inputs: the family's signature, less anything this forward() does not accept.

    DistilBERT, MPNet and ModernBERT take no token_type_ids; RoBERTa / XLM-R (one token type)
    and DeBERTa-v3 (none) accept them but ignore them, so the graph leaves them out.
    """
    import inspect

    accepted = inspect.signature(model.forward).parameters
    wanted = family(model.config.model_type).input_names(int(getattr(model.config, "type_vocab_size", 0) or 0))
    return [n for n in wanted if n in accepted]


# ----------------------------------------------------------------------------- inputs and eval


def tokenize(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int,
             batch_size: int) -> list[Feeds]:
    """Tokenize (truncating to max_length) into int64 batches, each padded to its longest row."""
    tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch(list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts))
    tokenizer.no_truncation()
    return _batches(encodings, pad_id(tokenizer), batch_size)


def _batches(encodings: Sequence[Any], pad: int, batch_size: int) -> list[Feeds]:
    return runtime_batches(encodings, pad, batch_size)[0]


def runtime_batches(encodings: Sequence[Any], pad: int, batch_size: int) -> tuple[list[Feeds], list[list[int]]]:
    """Batches exactly as `predict` and `serve` build them: length-sorted, padded to their longest.

    Validating any other batching would validate something the runtime never runs: dynamic
    INT8's scales, and so its answers, depend on a text's batch mates and padding.
    """
    order = list(length_sorted_batches([len(e.ids) for e in encodings], batch_size))
    return [pad_batch([encodings[i] for i in idx], pad) for idx in order], order


def random_batches(vocab_size: int, max_length: int, seed: int) -> list[Feeds]:
    """Random token ids with ragged attention masks: inputs no tokenizer would make."""
    rng = np.random.default_rng(seed)
    batches = []
    for batch, seq in ((4, 16), (2, min(max_length, 64))):
        lengths = rng.integers(2, seq + 1, size=batch)
        lengths[0] = seq  # one full row so the padded length is really `seq`
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64) * mask
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids)})
    return batches


@dataclass
class EvalSet:
    """Labelled --eval rows, encoded by the task into model windows and padded batches."""

    examples: Any  # the task's examples (TextExamples, NerExamples, QaExamples, ...)
    features: Features  # one window per row (QA: per context window)
    batches: list[Feeds]  # the windows in the runtime's length-sorted batches of batch_size
    order: list[list[int]]  # window indices of each batch
    rows: int
    source: str


def load_eval(args: ExportArgs, source: Source) -> EvalSet | None:
    """The --eval set read and encoded by the task record, or None without --eval."""
    if args.eval_file is None:
        return None
    task, info = source.info.task, source.info
    examples = task.load(args.eval_file, args.columns, list(info.labels) or None, BadRows.ERROR)
    if 0 < args.max_eval_rows < len(examples):
        examples = examples.subset(seeded_indices(len(examples), args.max_eval_rows, args.seed))
    features = task.encode(source.tokenizer, examples, info.max_length, source.stride)
    batches, order = runtime_batches(features.encodings, pad_id(source.tokenizer), args.batch_size)
    return EvalSet(examples, features, batches, order, len(examples), str(args.eval_file))


def _windows(outputs: Sequence[Outputs], batches: Sequence[Feeds], order: Sequence[list[int]],
             per_token: bool) -> list[Outputs]:
    """Batched outputs -> one dict per window in window order, per-token outputs cut to length."""
    windows: list[Outputs] = [{} for _ in range(sum(len(i) for i in order))]
    for out, batch, idx in zip(outputs, batches, order, strict=True):
        for row, (i, length) in enumerate(zip(idx, batch["attention_mask"].sum(axis=1), strict=True)):
            windows[i] = {k: v[row, :length] if per_token else v[row] for k, v in out.items()}
    return windows


def evaluate(outputs: Sequence[Outputs], eval_set: EvalSet, task: Task, labels: Sequence[str]) -> float:
    """The task's headline metric (0..1) from outputs on `eval_set.batches`: predict, then score.

    Uses the task record's own `predict` and `score`, so classification accuracy, NER entity
    F1 and QA SQuAD F1 all flow through here unchanged.
    """
    windows = _windows(outputs, eval_set.batches, eval_set.order, task.per_token_outputs)
    predictions = task.predict(windows, eval_set.features, eval_set.examples, labels)
    return float(task.score(predictions, eval_set.examples, labels)[task.metric])


def load_calibration(args: ExportArgs, source: Source) -> list[Feeds]:
    """Up to --calibration-rows texts (and pairs) from --calibration, tokenized; labels not needed.

    Calibration only needs realistic activations, so any task reads plain text columns here
    (QA: --text-column question --text-pair-column context).
    """
    if args.calibration is None:
        return []
    examples = load_text_classification(args.calibration, args.columns, require_labels=False)
    examples = seeded_subset(examples, args.calibration_rows, args.seed)
    return tokenize(source.tokenizer, examples.texts, examples.pairs, source.info.max_length,
                    args.batch_size)


def load_agreement_texts(args: ExportArgs, source: Source) -> list[Feeds]:
    """Up to --agreement-rows texts of --agreement-data, tokenized, for the agreement budget only.

    A small eval set measures agreement coarsely (872 rows: one answer is 0.11%), so a static
    INT8 recipe can pass or miss by its calibration draw's luck. Unlabelled texts sharpen it at
    no labelling cost. From the --calibration file itself, the rows calibration drew are left
    out: agreement on the texts the scales were fitted to would flatter static INT8.
    """
    if args.agreement_data is None:
        return []
    examples = load_text_classification(args.agreement_data, args.columns, require_labels=False)
    same_file = args.calibration is not None and args.calibration.resolve() == args.agreement_data.resolve()
    if same_file and 0 < args.calibration_rows < len(examples):
        drawn = set(seeded_indices(len(examples), args.calibration_rows, args.seed))  # load_calibration's rows
        examples = examples.subset([i for i in range(len(examples)) if i not in drawn])
    elif same_file:
        raise BertedgeError(f"--agreement-data is the --calibration file and calibration uses all its "
                            f"{len(examples)} rows", "give --agreement-data other texts, or lower --calibration-rows")
    examples = seeded_subset(examples, args.agreement_rows, args.seed + 1)
    return tokenize(source.tokenizer, examples.texts, examples.pairs, source.info.max_length, args.batch_size)


# ----------------------------------------------------------------------------- runners, comparison


def torch_runner(source: Source) -> Run:
    """Run the PyTorch model on a feed, returning the task's outputs as numpy."""
    import torch

    names = source.info.task.output_names

    def run(feeds: Feeds) -> Outputs:
        with torch.no_grad():
            out = source.model(**{n: torch.from_numpy(_feed(feeds, n)) for n in source.input_names})
        return {n: getattr(out, n).numpy() for n in names}

    return run


def ort_runner(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
               engine: str = ONNXRUNTIME) -> Run:
    """Run an ONNX file with the engine the runtime will use, feeding the graph's own input names."""
    session = make_session(path, providers, threads=threads or None, engine=engine,
                           fix="re-run `bertedge export`; report the error if it persists")
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def run(feeds: Feeds) -> Outputs:
        values = session.run(outputs, {n: _feed(feeds, n) for n in inputs})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(outputs, values, strict=True)}

    return run


def _feed(feeds: Feeds, name: str) -> np.ndarray:
    return feeds[name] if name in feeds else np.zeros_like(feeds["input_ids"])


def _valid(x: np.ndarray, mask: np.ndarray, per_token: bool) -> np.ndarray:
    """Values at real tokens only: padding positions of per-token outputs are meaningless."""
    return x[mask.astype(bool)] if per_token else x


def max_abs_diff(ref: Sequence[Outputs], got: Sequence[Outputs], batches: Sequence[Feeds],
                 per_token: bool) -> float:
    """Largest |reference - candidate| over every output, batch and real position."""
    diffs = [np.abs(_valid(r[n], b["attention_mask"], per_token) - _valid(g[n], b["attention_mask"], per_token))
             for r, g, b in zip(ref, got, batches, strict=True) for n in r]
    return float(max((d.max() for d in diffs if d.size), default=0.0))


def predictions(x: np.ndarray, mask: np.ndarray, per_token: bool) -> np.ndarray:
    """Argmax labels: one per row, one per real token (NER), or one position per row (QA span ends).

    >>> predictions(np.array([[1.0, 9.0, 5.0]]), np.array([[1, 0, 1]]), per_token=True).tolist()
    [2]
    """
    if not per_token:
        return x.argmax(-1)
    if x.ndim == 2:  # (batch, sequence) position scores: never pick a padding position
        return np.where(mask.astype(bool), x, -np.inf).argmax(-1)
    return x.argmax(-1)[mask.astype(bool)]


def agreement_counts(ref: Sequence[Outputs], got: Sequence[Outputs], batches: Sequence[Feeds],
                     per_token: bool) -> tuple[int, int]:
    """(answers equal, answers compared) between reference and candidate.

    Classification: labels per row; NER: labels per real token; QA (per-row position scores):
    spans per row, equal only when the start and the end position both are.
    """
    same = total = 0
    for r, g, b in zip(ref, got, batches, strict=True):
        spans: np.ndarray | None = None
        for n in r:
            a = predictions(r[n], b["attention_mask"], per_token)
            c = predictions(g[n], b["attention_mask"], per_token)
            if per_token and r[n].ndim == 2:
                spans = (a == c) if spans is None else spans & (a == c)
            else:
                same, total = same + int((a == c).sum()), total + a.size
        if spans is not None:
            same, total = same + int(spans.sum()), total + spans.size
    return same, total


def _changed_text(r: ArtifactReport, min_agreement: float) -> str:
    """' (6 of 872 answers changed; the budget allows 4)': how far a miss is, in answers."""
    if r.answers_changed is None or not r.answers_compared:
        return ""
    allowed = int(np.floor((1.0 - min_agreement) * r.answers_compared + 1e-9))
    return f" ({r.answers_changed} of {r.answers_compared} answers changed; the budget allows {allowed})"


def probabilities(x: np.ndarray, mask: np.ndarray, per_token: bool) -> np.ndarray:
    """Softmax over classes (per row, or per real token), or over real positions (QA scores)."""
    if per_token and x.ndim == 2:
        x = np.where(mask.astype(bool), x, -np.inf)
    z = np.exp(x - x.max(-1, keepdims=True))
    p = z / z.sum(-1, keepdims=True)
    return p[mask.astype(bool)] if per_token and p.ndim == 3 else p


def _rows(batches: Sequence[Feeds]) -> list[Feeds]:
    """Every row of `batches`, unpadded, as a batch of one."""
    rows = []
    for b in batches:
        for r, n in enumerate(b["attention_mask"].sum(axis=1)):
            rows.append({k: v[r:r + 1, :n] for k, v in b.items()})
    return rows


def _stack(rows: Sequence[Feeds], pad: int, width: int = 0) -> Feeds:
    """Right-pad unpadded rows to their longest (or `width`), like `pad_batch` does."""
    width = max(width, *(r["input_ids"].shape[1] for r in rows))
    out = {}
    for k in rows[0]:
        fill = pad if k == "input_ids" else 0
        out[k] = np.full((len(rows), width), fill, dtype=np.int64)
        for i, r in enumerate(rows):
            out[k][i, :r[k].shape[1]] = r[k][0]
    return out


def batch_invariance(run: Run, probes: Sequence[Feeds], pool: Sequence[Feeds], pad: int, width: int,
                     per_token: bool, seed: int, tol: float) -> dict[str, object]:
    """The same text alone, in a batch with 31 random others, and padded to `width`.

    Returns the worst |probability difference| against the text alone, how many answers
    changed, and whether every difference stayed within `tol`.
    """
    rng = np.random.default_rng(seed)
    worst, changed = 0.0, 0
    for probe in probes:
        alone = run(probe)
        mates = [pool[int(i)] for i in rng.choice(len(pool), size=min(31, len(pool)), replace=True)]
        at = int(rng.integers(len(mates) + 1))
        batch = _stack([*mates[:at], probe, *mates[at:]], pad)
        variants = [({k: v[at:at + 1] for k, v in run(batch).items()}, batch["attention_mask"][at:at + 1]),
                    (run(_stack([probe], pad, width)), _stack([probe], pad, width)["attention_mask"])]
        base_mask = probe["attention_mask"]
        n = base_mask.shape[1]
        for out, mask in variants:
            for name, ref in alone.items():
                got = out[name][:, :n] if per_token else out[name]
                p_ref, p_got = probabilities(ref, base_mask, per_token), probabilities(got, mask[:, :n], per_token)
                worst = max(worst, float(np.abs(p_ref - p_got).max()))
                changed += int((predictions(ref, base_mask, per_token) != predictions(got, mask[:, :n], per_token)).sum())
    return {"texts": len(probes), "batch": min(31, len(pool)) + 1, "padded_to": width,
            "max_prob_diff": worst, "answers_changed": changed, "passed": worst <= tol and changed == 0}


def target_feeds(rows: Sequence[Feeds], batch: int, seq: int, seed: int) -> Feeds:
    """`batch` rows of real tokens, each exactly `seq` long: real texts run together, no padding."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([r["input_ids"][0] for r in rows])
    types = np.zeros(seq, dtype=np.int64)
    starts = rng.integers(0, max(1, len(ids) - seq), size=batch)
    tiled = np.stack([np.resize(ids[s:], seq) for s in starts]).astype(np.int64)
    return {"input_ids": tiled, "attention_mask": np.ones_like(tiled), "token_type_ids": np.tile(types, (batch, 1))}


def cost_ms(timings_ms: dict[str, float]) -> float | None:
    """The geometric mean of the timings at the target shapes: what "fastest" compares."""
    return round(float(np.exp(np.mean(np.log(list(timings_ms.values()))))), 3) if timings_ms else None


def time_run(run: Run, feeds: Feeds, seconds: float) -> float:
    """Median milliseconds of `run(feeds)` over about `seconds` (at least 3 calls, 1 warm-up)."""
    run(feeds)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        t = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


# ----------------------------------------------------------------------------- validation


@dataclass
class Reference:
    """PyTorch outputs and gates every artifact is validated against."""

    task: Task
    labels: tuple[str, ...]
    real: list[Feeds]
    random: list[Feeds]
    ref_real: list[Outputs]
    ref_random: list[Outputs]
    eval_set: EvalSet | None
    pytorch_metric: float | None
    args: ExportArgs
    info: ModelMeta | None = None  # the model's metadata (heads and hidden size for graph rewrites)
    pad: int = 0  # the tokenizer's padding id
    width: int = 128  # the padded width of the batch-invariance check
    shapes: tuple[tuple[int, int], ...] = ()  # target shapes every validated artifact is timed at
    cpu: dict[str, object] = field(default_factory=dict)
    extra: list[Feeds] = field(default_factory=list)  # --agreement-data batches: agreement only
    ref_extra: list[Outputs] = field(default_factory=list)

    def check(self, report: ArtifactReport, run: Run, lossy: bool) -> ArtifactReport:
        """Fill `report` with diffs, agreement, metric, batch invariance and timings; decide `passed`."""
        per_token = self.task.per_token_outputs
        got_real = [run(b) for b in self.real]
        got_random = [run(b) for b in self.random]
        report.max_abs_diff_real = max_abs_diff(self.ref_real, got_real, self.real, per_token)
        report.max_abs_diff_random = max_abs_diff(self.ref_random, got_random, self.random, per_token)
        same, total = agreement_counts(self.ref_real, got_real, self.real, per_token)
        if self.extra:
            more = agreement_counts(self.ref_extra, [run(b) for b in self.extra], self.extra, per_token)
            same, total = same + more[0], total + more[1]
        report.label_agreement = same / total if total else 1.0
        report.answers_changed, report.answers_compared = total - same, total
        report.metric = self._metric(got_real)
        rows = _rows(self.real)
        probes = rows[:: max(1, len(rows) // 8)][:8]
        report.batch_invariance = batch_invariance(run, probes, rows, self.pad, self.width, per_token,
                                                   self.args.seed, self.args.invariance_tol)
        report.validated, report.validated_on = True, self.cpu
        report.passed, why = self._gate(report, lossy)
        report.notes = "; ".join(x for x in (report.notes, why) if x)
        self.time(report, run, rows)  # failed ones too: the report shows the whole agreement / speed curve
        return report

    def output_error(self, path: Path) -> float:
        """Mean |output difference| from PyTorch on a spread of up to 4 real batches (sensitivity)."""
        run, per_token = ort_runner(path), self.task.per_token_outputs
        picks = list(range(0, len(self.real), max(1, len(self.real) // 4)))[:4]
        diffs = [np.abs(_valid(self.ref_real[i][n], self.real[i]["attention_mask"], per_token)
                        - _valid(out[n], self.real[i]["attention_mask"], per_token)).mean()
                 for i in picks for out in [run(self.real[i])] for n in out]
        return float(np.mean(diffs))

    def time(self, report: ArtifactReport, run: Run, rows: Sequence[Feeds]) -> None:
        """p50 milliseconds at each target shape on real tokens; `cost_ms` is their geometric mean."""
        for batch, seq in self.shapes:
            feeds = target_feeds(rows, batch, seq, self.args.seed)
            report.timings_ms[f"{batch}x{seq}"] = round(time_run(run, feeds, self.args.timing_seconds), 3)
        report.cost_ms = cost_ms(report.timings_ms)

    def _metric(self, got_real: list[Outputs]) -> dict[str, object] | None:
        if self.eval_set is None or self.pytorch_metric is None:
            return None
        value = evaluate(got_real, self.eval_set, self.task, self.labels)
        return {"name": self.task.metric, "value": value, "pytorch_value": self.pytorch_metric,
                "drop_points": round((self.pytorch_metric - value) * 100, 4)}

    def _gate(self, r: ArtifactReport, lossy: bool) -> tuple[bool, str]:
        if not lossy:
            worst = max(r.max_abs_diff_real or 0.0, r.max_abs_diff_random or 0.0)
            ok = worst <= self.args.atol
            return ok, "" if ok else f"failed parity: max |diff| {worst:.2e} > atol {self.args.atol:g}"
        why = []
        if r.metric is not None and float(r.metric["drop_points"]) > self.args.max_accuracy_drop:  # type: ignore[arg-type]
            why.append(f"failed budget: {float(r.metric['drop_points']):.2f} point drop "  # type: ignore[arg-type]
                       f"> {self.args.max_accuracy_drop:g}")
        if r.label_agreement < self.args.min_agreement:
            why.append(f"failed budget: agreement {r.label_agreement:.4f} < {self.args.min_agreement:g}"
                       f"{_changed_text(r, self.args.min_agreement)}")
        inv = r.batch_invariance or {}
        if self.args.batch_invariance and not inv.get("passed", True):
            why.append(f"not batch-invariant: max |prob diff| {float(inv['max_prob_diff']):.1e} "  # type: ignore[arg-type]
                       f"(> {self.args.invariance_tol:g}), {inv['answers_changed']} answers changed")
        return not why, "; ".join(why)

    def gate_text(self) -> str:
        """How lossy artifacts (INT8, FP16) are judged, for the report."""
        a = self.args
        inv = (f"; same answer alone / in a batch of 32 / padded to {self.width} "
               f"(probabilities within {a.invariance_tol:g})" if a.batch_invariance else "")
        where = (f"{self.eval_set.source} ({self.eval_set.rows} rows)" if self.eval_set is not None
                 else "the real inputs (no --eval)")
        metric = (f"{self.task.metric} drop <= {a.max_accuracy_drop:g} points and " if self.eval_set is not None else "")
        return (f"lossy artifacts: {metric}agreement with PyTorch >= {a.min_agreement:g} on {where}{inv}; "
                f"fp32/fused: max |diff| <= {a.atol:g}")


def build_reference(args: ExportArgs, source: Source, eval_set: EvalSet | None,
                    calibration: list[Feeds], extra: Sequence[Feeds] = ()) -> tuple[Reference, str]:
    """Run PyTorch once on real and random inputs; real = eval rows > calibration rows > built-ins;
    `extra` (--agreement-data) counts in the agreement budget only."""
    if eval_set is not None:
        real, what = eval_set.batches, f"{eval_set.rows} rows of {eval_set.source}"
    elif calibration:
        real, what = calibration, f"{sum(len(b['input_ids']) for b in calibration)} rows of {args.calibration}"
    else:
        real = tokenize(source.tokenizer, BUILTIN_SENTENCES, None, source.info.max_length, args.batch_size)
        what = f"{len(BUILTIN_SENTENCES)} built-in English sentences (no --eval or --calibration given)"
    noise = random_batches(int(source.model.config.vocab_size), source.info.max_length, args.seed)
    run = torch_runner(source)
    ref_real = [run(b) for b in real]
    task, labels = source.info.task, source.info.labels
    metric = evaluate(ref_real, eval_set, task, labels) if eval_set is not None else None
    lengths = sorted(int(n) for b in real for n in b["attention_mask"].sum(axis=1))
    typical = max(2, lengths[len(lengths) // 2])  # median real length: the default target shapes
    ref = Reference(task, labels, real, noise, ref_real, [run(b) for b in noise], eval_set, metric, args,
                    info=source.info, pad=pad_id(source.tokenizer), width=min(128, source.info.max_length),
                    shapes=args.targets or ((1, typical), (32, typical)), cpu=cpu_info(),
                    extra=list(extra), ref_extra=[run(b) for b in extra])
    if extra:
        what += (f"; agreement also on {sum(len(b['input_ids']) for b in extra)} unlabelled rows of "
                 f"{args.agreement_data}")
    return ref, what + "; random inputs: 2 batches of random token ids with ragged masks"


# ----------------------------------------------------------------------------- artifacts


def _traceable(model: Any, input_names: Sequence[str], output_names: Sequence[str]) -> Any:
    """The module the exporter traces: positional inputs -> tuple of the task's named outputs."""
    import torch

    class Traceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(**dict(zip(input_names, args, strict=True)))
            return tuple(getattr(out, n) for n in output_names)

    # eval() matters: after tracing, the exporter restores this module's training flag on the whole tree
    return Traceable().eval()


def export_fp32(source: Source, path: Path, opset: int) -> None:
    """Export with torch.onnx.export(dynamo=False): dynamic batch and sequence axes.

    The legacy TorchScript exporter is what Optimum uses for BERT-family models and handles
    them reliably; torch 2.13 defaults to the dynamo exporter, so we ask for the legacy one.
    """
    import torch

    task = source.info.task
    dummy = tokenize(source.tokenizer, ["a short one", "a somewhat longer second example text"], None,
                     source.info.max_length, 2)[0]
    args = tuple(torch.from_numpy(_feed(dummy, n)) for n in source.input_names)
    token_axes = {0: "batch", 1: "sequence"}
    axes = {n: token_axes for n in source.input_names}
    axes.update({n: token_axes if task.per_token_outputs else {0: "batch"} for n in task.output_names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; validation checks the result
        torch.onnx.export(
            _traceable(source.model, source.input_names, task.output_names), args, str(path),
            input_names=source.input_names, output_names=list(task.output_names),
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    source.model.eval()


def fuse(info: ModelMeta, src: Path, dst: Path) -> str:
    """Fuse attention / layer-norm / GELU subgraphs with onnxruntime's transformer optimizer."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type=SUPPORTED_MODEL_TYPES[info.model_type],
                           num_heads=info.num_heads, hidden_size=info.hidden_size)
    model.save_model_to_file(str(dst))
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    return "fused: " + ", ".join(f"{k} x{v}" for k, v in stats.items()) if stats else "no subgraph was fused"


def to_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and compute with fp32 inputs/outputs (keep_io_types), for CUDA."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))


def fuse_without_attention(info: ModelMeta, src: Path, dst: Path) -> None:
    """The fused graph less the Attention fusion: the base of per-token INT8.

    A fused Attention quantizes to QAttention, which takes one activation scale for the whole
    batch; left as MatMuls, the Q/K/V projections can be quantized per token.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = SUPPORTED_MODEL_TYPES[info.model_type]
    options = FusionOptions(kind)
    options.enable_attention = False
    model = optimize_model(str(src), model_type=kind, num_heads=info.num_heads, hidden_size=info.hidden_size,
                           optimization_options=options)
    model.save_model_to_file(str(dst))


def parse_targets(text: str) -> tuple[tuple[int, int], ...]:
    """'1x32,32x128' -> ((1, 32), (32, 128)); '' -> () (the default shapes).

    >>> parse_targets("1x32, 32X128")
    ((1, 32), (32, 128))
    """
    shapes = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        batch, _, seq = part.partition("x")
        if not (batch.isdigit() and seq.isdigit()):
            raise BertedgeError(f"--target '{part}' is not BATCHxSEQUENCE", "write e.g. --target 1x32,32x128")
        shapes.append((int(batch), int(seq)))
    return tuple(shapes)


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 3)


def _artifact(name: str, precision: str, optimization: str) -> ArtifactReport:
    return ArtifactReport(name=name, file=ARTIFACT_FILES[name], precision=precision, optimization=optimization)


def build_fp32(source: Source, ref: Reference, out: Path, opset: int) -> ArtifactReport:
    """model.onnx; a parity failure here means the export itself is wrong, so it is fatal."""
    start = time.perf_counter()
    report = _artifact("fp32", "fp32", "none")
    export_fp32(source, out / report.file, opset)
    ref.check(report, ort_runner(out / report.file, threads=ref.args.threads), lossy=False)
    report.size_mb, report.seconds = _size_mb(out / report.file), time.perf_counter() - start
    if not report.passed:
        raise BertedgeError(f"the ONNX export does not match PyTorch ({report.notes})",
                            "report this with the model's config.json; try another --opset")
    return report


def build_fused(source: Source, ref: Reference, out: Path) -> ArtifactReport:
    """model-fused.onnx, validated like fp32."""
    start = time.perf_counter()
    report = _artifact("fused", "fp32", "fused")
    report.notes = fuse(source.info, out / ARTIFACT_FILES["fp32"], out / report.file)
    ref.check(report, ort_runner(out / report.file, threads=ref.args.threads), lossy=False)
    report.size_mb, report.seconds = _size_mb(out / report.file), time.perf_counter() - start
    return report


def build_fp16(ref: Reference, out: Path, src_name: str) -> ArtifactReport:
    """model-fp16.onnx: validated on CUDA when onnxruntime has it, else only tried on CPU."""
    import onnxruntime as ort

    start = time.perf_counter()
    report = _artifact("fp16", "fp16", "fused" if src_name == "fused" else "none")
    path = out / report.file
    to_fp16(out / ARTIFACT_FILES[src_name], path)
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    try:
        ref.check(report, ort_runner(path, ["CUDAExecutionProvider" if cuda else "CPUExecutionProvider"]), lossy=True)
    except Exception as e:  # CPU lacks fp16 kernels for some fused ops
        report.notes = f"CPU run failed ({type(e).__name__})"
    if not cuda:
        cpu = f"CPU check: agreement {report.label_agreement:.4f}" if report.validated else report.notes
        report.validated = report.passed = False
        report.notes = f"not validated: no CUDA provider ({cpu})"
    report.size_mb, report.seconds = _size_mb(path), time.perf_counter() - start
    return report


def build_int8(args: ExportArgs, ref: Reference, out: Path, base_name: str, calibration: list[Feeds],
               config: q.Int8Config | None = None,
               ) -> tuple[ArtifactReport, list[dict[str, object]], list[dict[str, object]]]:
    """The INT8 search; the chosen candidate becomes model-int8[-static].onnx.

    Every candidate of the ladder is validated and (when it passes) timed; the fastest passer
    wins. When no batch-invariant candidate passes (or with --search-all), the sensitivity
    search keeps the most error-prone nodes of the per-token recipe in fp32, fewest first.

    Returns:
        The chosen artifact, a row per candidate tried, and the per-node sensitivity table.
    """
    import onnx

    start = time.perf_counter()
    method = q.Method(args.quantize.value) if config is None else config.method
    name = "int8" if method is q.Method.DYNAMIC else "int8-static"
    # Static QDQ of every op type clips the additive attention mask (-10000) to the calibrated
    # range, so padding leaks into attention and answers change with batch mates: MatMul only.
    operators = args.int8_operators or (("MatMul",) if method is q.Method.STATIC else ())
    base = config or q.Int8Config(method, args.per_channel, args.reduce_range, operators,
                                  calibrate=args.calibrate_method)

    def check(path: Path, config: q.Int8Config) -> ArtifactReport:
        report = _artifact(name, "int8", "fused" if base_name == "fused" else "none")
        report.quantization, report.size_mb = config.to_dict(), _size_mb(path)
        return ref.check(report, ort_runner(path, threads=args.threads), lossy=True)

    src = out / ARTIFACT_FILES[base_name]
    model = onnx.load(str(src))
    ladder = [base] if config is not None else q.distinct(q.candidates(base), model)
    table: list[dict[str, object]] = []
    unfused = out / ".model-unfused-attention.onnx"  # removed below: not an artifact
    if base_name == "fused" and ref.info is not None and any(c.activations is q.Activations.PER_TOKEN for c in ladder):
        fuse_without_attention(ref.info, out / ARTIFACT_FILES["fp32"], unfused)

    def source(config: q.Int8Config) -> Path:
        return unfused if config.activations is q.Activations.PER_TOKEN and unfused.is_file() else src

    def guided(result: q.SearchResult[ArtifactReport]) -> Iterator[q.Int8Config]:
        seed = next((c for c in ladder if c.activations is q.Activations.PER_TOKEN), None)
        invariant_passed = any(a.passed and a.config.batch_invariant for a in result.attempts)
        if seed is None or not args.sensitivity or args.max_fp32_nodes == 0 or (invariant_passed and not args.search_all):
            return
        seed_src = source(seed)
        table.extend(q.sensitivity(seed_src, seed, q.touched_nodes(onnx.load(str(seed_src)), seed), ref.output_error, out,
                                   seconds=args.sensitivity_seconds))
        ranked = [str(r["node"]) for r in table if float(r["gain"]) > 0]  # type: ignore[arg-type]
        k = 1
        while ranked and k <= min(args.max_fp32_nodes, len(ranked)):
            yield replace(seed, fp32_nodes=tuple(ranked[:k]))
            k *= 2

    try:
        # The dynamic ladder is three recipes of similar cost: validate and time them all. The
        # static ladder falls back to ever more fp32, so it stops at its first passer.
        every = method is q.Method.DYNAMIC or args.search_all
        result = q.search(source, out / ARTIFACT_FILES[name], ladder, check, calibration, search_all=every,
                          extend=guided if config is None else None)
    finally:
        unfused.unlink(missing_ok=True)
    tried = [_attempt_row(a) for a in result.attempts]
    if result.chosen is None:
        report = _artifact(name, "int8", base_name)
        report.notes = "every INT8 candidate failed to build: " + "; ".join(str(t["error"]) for t in tried)
        report.file = ""
        return report, tried, table
    chosen = result.attempts[result.chosen]
    assert chosen.verdict is not None
    report = chosen.verdict
    report.notes = "; ".join(x for x in (report.notes, _search_note(result)) if x)
    report.seconds = time.perf_counter() - start
    return report, tried, table


def _attempt_row(a: q.Attempt[ArtifactReport]) -> dict[str, object]:
    v = a.verdict
    return {"candidate": a.config.label(), **a.config.to_dict(),
            "agreement": v.label_agreement if v else None, "answers_changed": v.answers_changed if v else None,
            "metric": v.metric if v else None,
            "max_abs_diff_real": v.max_abs_diff_real if v else None,
            "batch_invariance": v.batch_invariance if v else None, "timings_ms": v.timings_ms if v else None,
            "cost_ms": v.cost_ms if v else None, "notes": v.notes if v else "",
            "passed": a.passed, "error": a.error, "seconds": round(a.seconds, 3)}


def _search_note(result: q.SearchResult[ArtifactReport]) -> str:
    assert result.chosen is not None
    label = result.attempts[result.chosen].config.label()
    tried = len(result.attempts)
    if result.passed:
        return f"chosen '{label}': the fastest passer (candidate {result.chosen + 1} of {tried} tried)"
    return f"no candidate met the budget; kept the highest-agreement one '{label}' of {tried} tried"


# ----------------------------------------------------------------------------- folder, report


def cpu_info() -> dict[str, object]:
    """CPU model and the ISA flags that decide INT8 speed and accuracy (AVX2 / AVX-512 / VNNI)."""
    model, flags = cpu_model_and_flags()
    return {"model": model, **{f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")}}


def copy_metadata(model_dir: Path, info: ModelMeta, out: Path) -> None:
    """Make the export folder self-contained for `bertedge package`."""
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    if not (out / "bertedge.json").is_file():
        write_meta(out, info)


def retime(ref: Reference, out: Path, artifacts: Sequence[ArtifactReport]) -> None:
    """Time the passers again, side by side: `--timing-rounds` rounds, each artifact at each target
    shape once per round (the order reversed every other round); `timings_ms` becomes the median
    over the rounds.

    Each artifact was first timed when it was built, minutes apart from the others; on a VM whose
    speed drifts by tens of percent within minutes that alone can pick the slower file.
    Interleaving puts every finalist under the same drift. The first timings stay in the search
    table (`int8_search`), the agreement / speed curve of every candidate.
    """
    finalists = [a for a in artifacts if a.passed and a.file and a.timings_ms and a.precision != "fp16"]
    if ref.args.timing_rounds < 1 or len(finalists) < 2:
        return
    runs = {a.name: ort_runner(out / a.file, threads=ref.args.threads, engine=a.engine) for a in finalists}
    rows = _rows(ref.real)
    feeds = {f"{b}x{n}": target_feeds(rows, b, n, ref.args.seed) for b, n in ref.shapes}
    samples: dict[str, dict[str, list[float]]] = {a.name: {k: [] for k in feeds} for a in finalists}
    for r in range(ref.args.timing_rounds):
        for a in finalists if r % 2 == 0 else finalists[::-1]:
            for shape, f in feeds.items():
                samples[a.name][shape].append(time_run(runs[a.name], f, ref.args.timing_seconds))
    for a in finalists:
        a.timings_ms = {k: round(float(np.median(v)), 3) for k, v in samples[a.name].items()}
        a.cost_ms = cost_ms(a.timings_ms)


def recommend(artifacts: Sequence[ArtifactReport]) -> str:
    """The fastest artifact that passed, by measured cost at the target shapes; untimed: INT8 >
    fused > fp32. FP16 is never recommended for the CPU."""
    passed = [a for a in artifacts if a.passed and a.precision != "fp16"]
    timed = [a for a in passed if a.cost_ms is not None]
    if timed:
        return min(timed, key=lambda a: float(a.cost_ms or 0.0)).name
    names = {a.name for a in passed}
    return next(n for n in ("int8", "int8-static", "fused", "fp32") if n in names)


def _check_out(args: ExportArgs) -> None:
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        raise BertedgeError(f"--out '{args.out}' already exists and is not empty",
                            "choose a new folder or pass --overwrite")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


# ----------------------------------------------------------------------------- the stage


def export(args: ExportArgs) -> ExportReport:
    """Export, optimize, quantize and validate; write the folder only if every step succeeded.

    Raises:
        BertedgeError: bad model folder, data or options; fp32 parity failure; with
            `require_int8`, no INT8 candidate met the budget.
    """
    start = time.perf_counter()
    _check_out(args)
    tmp = _partial_folder(args.out)  # before any work: a read-only parent fails here, in one line
    try:
        with _terminate_cleanly():
            source = load_source(args.model_dir)
            eval_set, calibration = load_eval(args, source), load_calibration(args, source)
            report = _build(args, source, eval_set, calibration, tmp, load_agreement_texts(args, source))
            report.seconds = round(time.perf_counter() - start, 3)
            (tmp / "export-report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
            _move_into_place(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _partial_folder(out: Path) -> Path:
    """The hidden build folder next to `out`; creating it is the real writability check."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise BertedgeError(f"cannot write next to --out '{out}' ({e.strerror or type(e).__name__})",
                            "choose an --out folder in a writable place") from None


class Terminated(SystemExit):
    """SIGTERM turned into an exception, so the cleanup in `export` runs before the process exits."""


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """While exporting, SIGTERM raises `Terminated` (exit status 128 + 15) instead of killing the process.

    Without this, the default action ends the process on the spot and leaves the hidden
    `.OUT.partial-*` folder behind. Signal handlers can only be set from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _build(args: ExportArgs, source: Source, eval_set: EvalSet | None, calibration: list[Feeds],
           out: Path, extra: Sequence[Feeds] = ()) -> ExportReport:
    import onnxruntime as ort

    ref, inputs_text = build_reference(args, source, eval_set, calibration, extra)
    report = ExportReport(
        model_dir=str(args.model_dir), task=source.info.task.name, labels=list(source.info.labels),
        opset=args.opset, input_names=source.input_names, output_names=list(source.info.task.output_names),
        cpu=cpu_info(), onnxruntime_version=ort.__version__, gate=ref.gate_text(),
        validation_inputs=inputs_text,
    )
    report.targets = [f"{b}x{n}" for b, n in ref.shapes]
    report.artifacts.append(build_fp32(source, ref, out, args.opset))
    best_fp = "fp32"
    if args.optimization is Optimization.FUSED:
        report.artifacts.append(build_fused(source, ref, out))
        best_fp = "fused" if report.artifacts[-1].passed else "fp32"
    _add_int8(args, ref, out, best_fp, calibration, report)
    _add_openvino(args, ref, out, calibration, report)
    if args.fp16:
        report.artifacts.append(build_fp16(ref, out, best_fp))
    _drop_failed_fused(report, out)
    copy_metadata(args.model_dir, source.info, out)
    retime(ref, out, report.artifacts)
    report.recommended = recommend(report.artifacts)
    for a in report.artifacts:
        a.seconds = round(a.seconds, 3)
    report.warnings += [f"{a.name}: {a.notes}" for a in report.artifacts if not a.passed]
    int8 = [a for a in report.artifacts if a.precision == "int8"]
    if int8 and not any(a.passed for a in int8):
        report.warnings.append(f"INT8 did not pass; recommended falls back to {report.recommended}")
    return report


def _add_int8(args: ExportArgs, ref: Reference, out: Path, best_fp: str, calibration: list[Feeds],
              report: ExportReport) -> None:
    if args.quantize is Quantization.NONE:
        return
    # Static QDQ quantization of the fused graph fails in onnxruntime 1.32 (Attention has no
    # QDQ support and the classifier bias loses its scale), so static starts from model.onnx.
    base = best_fp if args.quantize is Quantization.DYNAMIC else "fp32"
    artifact, tried, table = build_int8(args, ref, out, base, calibration)
    report.artifacts.append(artifact)
    report.int8_search, report.sensitivity = tried, table
    if args.quantize is Quantization.DYNAMIC and calibration:
        # Static scales are batch-invariant by construction: one calibrated QDQ candidate too.
        static = q.Int8Config(q.Method.STATIC, per_channel=True, operators=("MatMul",), calibrate=args.calibrate_method)
        extra, rows, _ = build_int8(args, ref, out, "fp32", calibration, config=static)
        report.artifacts.append(extra)
        report.int8_search += rows
        artifact = artifact if artifact.passed else extra
    if args.require_int8 and not artifact.passed:
        summary = ", ".join(f"{t['candidate']}: agreement {t['agreement']}" for t in tried)
        raise BertedgeError(f"no INT8 candidate met the budget ({report.gate}); tried {summary}",
                            "loosen --max-accuracy-drop / --min-agreement, or drop --require-int8")


def _add_openvino(args: ExportArgs, ref: Reference, out: Path, calibration: list[Feeds],
                  report: ExportReport) -> None:
    """NNCF's static INT8 run by OpenVINO (`bertedge.toolchain.openvino_int8`): validated and timed through
    the runtime's OpenVINO session like any artifact; recommended when it is the fastest passer."""
    from bertedge.toolchain import openvino_int8 as ov

    if args.openvino == "off" or args.quantize is Quantization.NONE:
        return
    if not calibration:
        if args.openvino == "auto":
            report.warnings.append("int8-openvino: not tried (needs --calibration texts)")
        return
    why_not = ov.missing()
    if why_not is not None:
        if args.openvino == "on":
            raise BertedgeError(f"--openvino on: {why_not}", "pip install 'bertedge[openvino]', or pass --openvino off")
        return
    start = time.perf_counter()
    src, dst = out / ARTIFACT_FILES["fp32"], out / ARTIFACT_FILES["int8-openvino"]
    rows = _rows(calibration)  # unpadded, one per call: NNCF collects statistics per row
    ranked = [str(r["node"]) for r in report.sensitivity if float(r["gain"]) > 0]  # type: ignore[arg-type]
    chosen: ArtifactReport | None = None
    for recipe in ov.recipes(src, len(rows), ranked, args.max_fp32_nodes if args.sensitivity else 0):
        t0 = time.perf_counter()
        candidate = _artifact("int8-openvino", "int8", "none")
        candidate.engine, candidate.quantization = OPENVINO, {**recipe.to_dict(), "openvino": openvino_version()}
        try:
            ov.quantize(src, dst, rows, recipe)
            candidate.size_mb = ov.size_mb(dst)
            ref.check(candidate, ort_runner(dst, threads=args.threads, engine=OPENVINO), lossy=True)
        except BertedgeError as e:  # NNCF or OpenVINO cannot build or load this recipe
            candidate.notes = f"could not build or run: {e}"
        except Exception as e:  # noqa: BLE001 - NNCF raises many types; record and go on
            candidate.notes = f"could not build or run: {_first_line(e)}"
        report.int8_search.append({"candidate": recipe.label(), **(candidate.quantization or {}),
                                   "agreement": candidate.label_agreement if candidate.validated else None,
                                   "answers_changed": candidate.answers_changed if candidate.validated else None,
                                   "metric": candidate.metric, "max_abs_diff_real": candidate.max_abs_diff_real,
                                   "batch_invariance": candidate.batch_invariance, "timings_ms": candidate.timings_ms,
                                   "passed": candidate.passed, "error": None if candidate.validated else candidate.notes,
                                   "seconds": round(time.perf_counter() - t0, 1)})
        chosen = candidate
        if candidate.passed:
            break
    assert chosen is not None
    if not chosen.passed or not chosen.validated:
        ov.remove(dst)
        chosen.file = ""
    chosen.seconds = time.perf_counter() - start
    report.artifacts.append(chosen)


def _drop_failed_fused(report: ExportReport, out: Path) -> None:
    """Keep a failed fused graph out of the folder: nothing should package it by mistake."""
    fused = report.artifact("fused")
    if fused is not None and not fused.passed and fused.file:
        (out / fused.file).unlink(missing_ok=True)
        fused.notes += "; file removed"
        fused.file = ""


def render(report: ExportReport) -> list[Any]:
    """Rich tables for the terminal: artifacts, the INT8 candidates tried, the sensitive nodes."""
    from rich.table import Table

    table = Table(title=f"bertedge export: {report.task} ({report.seconds:.1f} s)")
    for col in ("artifact", "file", "MB", "max|Δ| real", "agreement", "metric", "batch-invariant",
                f"p50 ms {'/'.join(report.targets)}", "passed", "notes"):
        table.add_column(col, overflow="fold")
    for a in report.artifacts:
        mark = "[green]yes[/]" if a.passed else ("[yellow]not validated[/]" if not a.validated else "[red]no[/]")
        star = " *" if a.name == report.recommended else ""
        table.add_row(a.name + star, a.file, f"{a.size_mb:.2f}", _num(a.max_abs_diff_real),
                      _agreement_text(a.label_agreement, a.answers_changed), _metric_text(a.metric),
                      _invariance_text(a.batch_invariance),
                      _timings_text(a.timings_ms), mark, a.notes)
    tables: list[Any] = [table]
    if report.int8_search:
        search = Table(title="INT8 candidates (all validated; the fastest passer is kept)")
        for col in ("candidate", "agreement", "metric", "batch-invariant", "p50 ms", "passed", "s"):
            search.add_column(col, overflow="fold")
        for t in report.int8_search:
            agreement = _agreement_text(t["agreement"], t.get("answers_changed"))  # type: ignore[arg-type]
            search.add_row(str(t["candidate"]), agreement, _metric_text(t["metric"]),  # type: ignore[arg-type]
                           _invariance_text(t["batch_invariance"]), _timings_text(t["timings_ms"]),  # type: ignore[arg-type]
                           "yes" if t["passed"] else ("error" if t["error"] else "no"), f"{t['seconds']:.1f}")
        tables.append(search)
    if report.sensitivity:
        nodes = Table(title="INT8 sensitivity: share of the output error per node (top 8)")
        for col in ("node", "share", "error, node in fp32", "error, all INT8"):
            nodes.add_column(col, overflow="fold")
        for r in report.sensitivity[:8]:
            nodes.add_row(str(r["node"]), f"{float(r['share']):.3f}", f"{float(r['error_with_node_fp32']):.2e}",  # type: ignore[arg-type]
                          f"{float(r['error_all_int8']):.2e}")  # type: ignore[arg-type]
        tables.append(nodes)
    return tables


def _agreement_text(agreement: float | None, changed: int | None) -> str:
    """'0.9931 (6 changed)': the share, and how many answers that is."""
    if agreement is None:
        return "-"
    return f"{agreement:.4f}" + (f" ({changed} changed)" if changed is not None else "")


def _invariance_text(inv: dict[str, object] | None) -> str:
    if not inv:
        return "-"
    return f"{'yes' if inv['passed'] else 'no'} ({float(inv['max_prob_diff']):.0e})"  # type: ignore[arg-type]


def _timings_text(timings: dict[str, float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in timings.values()) if timings else "-"


def _num(x: object, fmt: str = ".2e") -> str:
    return "-" if x is None else format(x, fmt)


def _metric_text(m: dict[str, object] | None) -> str:
    if not m:
        return "-"
    return f"{m['name']} {float(m['value']):.4f} (Δ {float(m['drop_points']):+.2f} pts)"  # type: ignore[arg-type]
