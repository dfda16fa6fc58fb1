"""bertedge bench: latency, throughput, cold start, memory and accuracy per backend and shape.

A benchmark is a slimmed copy of the hot loop: every backend gets the same realistic token
inputs (real sentences cut to exactly the requested length), a warm-up, then timed runs with
`time.perf_counter()`. Backends are data (`BACKENDS`): how to load them and which file they
read. Cold start and peak RSS are measured in a fresh process per backend that imports only
what that backend needs (`python -m bertedge.build.bench _cold-start SPEC`), as a user meets them.

Keep the module-level imports light (stdlib, numpy, torch-free bertedge modules): the
cold-start child imports this module before it starts the clock on its own imports.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertedge import __version__
from bertedge.errors import BertedgeError
from bertedge.runtime.data import Columns, TextExamples, load_text_classification, seeded_subset
from bertedge.runtime.features import load_tokenizer, pad_batch, pad_id
from bertedge.runtime.meta import read_model_meta
from bertedge.runtime.sessions import make_session
from bertedge.runtime.tasks import CLASSIFICATION, get_task

Feeds = dict[str, np.ndarray]
Call = Callable[[], object]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_SEQ_LENS = (16, 64, 128, 256)
DEFAULT_DURATION_S = 2.0
MIN_TIMED_RUNS = 3  # percentiles of fewer runs mean nothing, even with --duration
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "onnx", "torch", "transformers",
             "optimum", "optimum-onnx")
# Varied English used to fill inputs when --data is not given: lengths, punctuation, names,
# numbers and rare words, so WordPiece produces a realistic mix of whole words and pieces.
BUILTIN_SENTENCES = (
    "The service was quick and the staff were friendly, though the coffee arrived lukewarm.",
    "I would not recommend this hotel to anyone who values a good night's sleep.",
    "It arrived three days late and the box had clearly been dropped at least once.",
    "An absolute delight from start to finish, with a soundtrack I keep humming.",
    "The plot was thin, but Ms. Okonkwo's performance carried every scene she was in.",
    "Battery life is roughly 40% shorter than the 18 hours the manufacturer advertises.",
    "What time does the Rijksmuseum open on Sundays during the winter holidays?",
    "She moved to Berlin in 2019 to work on speech recognition at a small start-up.",
    "Terrible sound quality; I returned the headphones the very next morning.",
    "A solid, dependable choice for the price, if a little heavy to carry around.",
    "The quarterly meeting has been moved to Thursday afternoon in conference room B.",
    "Honestly the best margherita pizza I have had since my trip to Naples.",
    "The assembly instructions were confusing, incomplete and printed in tiny type.",
    "Researchers at the university reported a modest improvement over the baseline.",
    "Not bad at all, although the sequel handled the same themes with more subtlety.",
    "After the firmware update, every crash I had reported simply disappeared.",
    "Why would anyone design a kettle whose lid burns your fingers when you open it?",
    "The documentary follows three families through a drought in southern Kenya.",
    "Customer support kept me on hold for forty-five minutes and then hung up.",
    "Its understated charm and witty dialogue make it a quiet triumph of the genre.",
    "Prices rose by 3.2 percent in March, driven mainly by energy and housing costs.",
    "The new bridge, designed by a Danish firm, will open to cyclists next spring.",
    "I'm disappointed: the colours faded after a single wash at thirty degrees.",
    "Watching it felt like sitting through an endless, badly lit slideshow.",
    "Our guide, Tomás, knew every bird by its call and most by their Latin names.",
    "The recipe calls for two cups of flour, a pinch of salt and unsalted butter.",
    "Despite a sluggish first act, the film builds to a genuinely moving finale.",
    "Shipping was free, the packaging recyclable, and the fit exactly as described.",
    "The committee postponed its decision until the environmental review is complete.",
    "Frankly, the app drains my phone and asks for permissions it has no need for.",
    "A sharp, funny and surprisingly tender portrait of growing up in the suburbs.",
    "Please send the signed contract to the legal department by Friday at noon.",
)


# ----------------------------------------------------------------------------- backends as data


@dataclass(frozen=True)
class Backend:
    """One way to run the model: which engine loads it, from which file, on which provider."""

    name: str
    engine: str  # "torch" or "onnxruntime": the key into LOADERS
    files: tuple[str, ...]  # ONNX files in the folder, first present wins (() for torch)
    provider: str  # onnxruntime execution provider asked for ("" for torch)
    precision: str  # what the file usually holds; an export report or manifest may say otherwise
    io_binding: bool = False  # inputs and outputs stay on the device while timed
    description: str = ""

    @property
    def gpu(self) -> bool:
        return self.provider in (CUDA, TENSORRT)


BACKENDS: tuple[Backend, ...] = (
    Backend("torch", "torch", (), "", "fp32", description="PyTorch eager (transformers), CPU"),
    Backend("onnx", "onnxruntime", ("model.onnx",), CPU, "fp32", description="ONNX fp32, CPU EP"),
    Backend("onnx-fused", "onnxruntime", ("model-fused.onnx",), CPU, "fp32",
            description="ONNX fused by the transformer optimizer, CPU EP"),
    Backend("int8", "onnxruntime", ("model-int8.onnx",), CPU, "int8", description="dynamic INT8, CPU EP"),
    Backend("int8-static", "onnxruntime", ("model-int8-static.onnx",), CPU, "int8",
            description="static INT8 (QDQ), CPU EP"),
    Backend("cuda", "onnxruntime", ("model.onnx",), CUDA, "fp32", io_binding=True,
            description="ONNX fp32, CUDA EP, IO binding"),
    Backend("cuda-fp16", "onnxruntime", ("model-fp16.onnx",), CUDA, "fp16", io_binding=True,
            description="ONNX fp16, CUDA EP, IO binding"),
    Backend("tensorrt", "onnxruntime", ("model.onnx",), TENSORRT, "fp16", io_binding=True,
            description="TensorRT EP (fp16 engine), IO binding"),
)
BACKEND_BY_NAME = {b.name: b for b in BACKENDS}
TENSORRT_OPTIONS = {"trt_fp16_enable": True, "trt_engine_cache_enable": False}


# ----------------------------------------------------------------------------- arguments


@dataclass
class BenchArgs:
    """Everything `bertedge bench` needs."""

    model: Path  # export folder, bundle folder, or Hugging Face model folder
    backends: tuple[str, ...] = ()  # () = every backend the folder has (+ GPU ones when usable)
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # sequences per timed call
    seq_lens: tuple[int, ...] = ()  # () = 16,64,128,256 up to the model's position limit
    threads: int = 0  # intra-op threads for every backend (0 = the CPUs this process may use)
    duration: float = 0.0  # seconds of timed runs per shape (default 2 s when runs is 0)
    runs: int = 0  # fixed number of timed runs per shape instead of --duration
    warmup: int = 3  # untimed runs per shape first
    data: Path | None = None  # texts (labelled: accuracy) for inputs and the accuracy pass
    columns: Columns = field(default_factory=Columns)  # column names in --data
    max_data_rows: int = 0  # seeded subset of --data (0 = all rows)
    data_batch_size: int = 32  # batch size of the length-bucketed --data pass
    out: Path | None = None  # folder for bench.json, bench.md and the plots (None: write nothing)
    cold_start: bool = True  # measure cold start and peak RSS in a fresh process per backend
    cold_start_runs: int = 3  # fresh processes per backend; the median is reported
    plots: bool = True  # write the PNG plots
    seed: int = 0  # seeds input construction and the --data subset

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.data = Path(self.data) if self.data is not None else None
        self.out = Path(self.out) if self.out is not None else None
        self.backends, self.batch_sizes = tuple(self.backends), tuple(self.batch_sizes)
        self.seq_lens = tuple(self.seq_lens)
        problems = [p for p in (self._count_problem(), self._shape_problem()) if p]
        unknown = [b for b in self.backends if b not in BACKEND_BY_NAME]
        if unknown:
            problems.append(f"unknown backend {', '.join(unknown)} (known: {', '.join(BACKEND_BY_NAME)})")
        if self.threads < 0 or self.warmup < 0 or self.max_data_rows < 0:
            problems.append("--threads, --warmup and --max-data-rows must be >= 0")
        if self.data_batch_size < 1 or self.cold_start_runs < 1:
            problems.append("--data-batch-size and --cold-start-runs must be >= 1")
        if problems:
            raise BertedgeError("; ".join(problems), "fix the options above (see `bertedge bench --help`)")
        if not self.runs and not self.duration:
            self.duration = DEFAULT_DURATION_S

    def _count_problem(self) -> str:
        if self.duration and self.runs:
            return "give --duration or --runs, not both"
        if self.duration < 0 or self.runs < 0:
            return "--duration and --runs must be positive"
        return ""

    def _shape_problem(self) -> str:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            return "--batch-sizes must list integers >= 1"
        if self.seq_lens and min(self.seq_lens) < 4:
            return "--seq-lens must be >= 4 ([CLS], [SEP] and some text)"
        return ""


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles, mean ± sample std and throughput of one shape's timed runs."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    sequences_per_s: float
    tokens_per_s: float
    total_s: float


def latency_stats(latencies_s: Sequence[float], batch_size: int, seq_len: int) -> LatencyStats:
    """Summarize per-call latencies (seconds) of calls that each ran `batch_size` x `seq_len` tokens.

    Throughput is sequences over the summed call time, so it matches batch / mean latency.

    >>> s = latency_stats([0.010, 0.020, 0.030, 0.040], batch_size=8, seq_len=16)
    >>> s.p50_ms, s.mean_ms, s.sequences_per_s, s.tokens_per_s
    (25.0, 25.0, 320.0, 5120.0)
    """
    if len(latencies_s) == 0:
        raise ValueError("no latencies to summarize")
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
    total_s = float(ms.sum() / 1e3)
    seqs = batch_size * len(ms) / total_s if total_s > 0 else 0.0
    return LatencyStats(
        runs=len(ms), p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, min_ms=float(ms.min()),
        max_ms=float(ms.max()), sequences_per_s=seqs, tokens_per_s=seqs * seq_len, total_s=total_s,
    )


def time_calls(call: Call, warmup: int, runs: int, duration: float) -> list[float]:
    """Warm up, then time `call` `runs` times, or for `duration` seconds (at least 3 runs)."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    deadline = time.perf_counter() + duration
    while (len(latencies) < runs) if runs else (time.perf_counter() < deadline or len(latencies) < MIN_TIMED_RUNS):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return latencies


# ----------------------------------------------------------------------------- the source folder


@dataclass(frozen=True)
class Source:
    """What bench reads from the folder it is given."""

    root: Path
    kind: str  # "export", "bundle" or "model"
    task: str
    labels: tuple[str, ...]
    max_length: int  # truncation length for --data
    max_positions: int  # longest sequence the model accepts
    model_type: str
    tokenizer: Path  # tokenizer.json
    torch_dir: Path | None  # Hugging Face folder for the torch backend, when one exists
    precisions: dict[str, str]  # ONNX file name -> precision, from the export report or manifest

    def file_for(self, backend: Backend) -> Path | None:
        """The ONNX file this backend runs, if the folder has one."""
        return next((self.root / f for f in backend.files if (self.root / f).is_file()), None)

    def missing(self, backend: Backend) -> str:
        """Why this folder cannot run the backend ('' when it can)."""
        if backend.engine == "torch":
            return "" if self.torch_dir else f"no PyTorch model folder for '{self.root}' (a {self.kind} folder)"
        if self.file_for(backend) is None:
            return f"no {' / '.join(backend.files)} in '{self.root}'"
        return ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BertedgeError(f"cannot read '{path}' ({e})", "rebuild the folder with bertedge") from None
    if not isinstance(data, dict):
        raise BertedgeError(f"'{path}' is not a JSON object", "rebuild the folder with bertedge")
    return data


def _model_dir(value: object) -> Path | None:
    path = Path(str(value)) if value else None
    return path if path is not None and (path / "config.json").is_file() else None


def _max_positions(folders: Sequence[Path | None], fallback: int) -> int:
    for folder in folders:
        if folder is not None and (folder / "config.json").is_file():
            return int(_read_json(folder / "config.json").get("max_position_embeddings") or fallback)
    return fallback


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
    if (root / "config.json").is_file():
        info = read_model_meta(root)
        return Source(root, "model", info.task.name, info.labels, info.max_length,
                      info.max_positions, info.model_type, root / "tokenizer.json", root, {})
    raise BertedgeError(f"'{root}' has no manifest.json, export-report.json or config.json",
                        "pass the --out folder of `bertedge export`, `bertedge package` or `bertedge finetune`")


def _bundle_source(root: Path) -> Source:
    from bertedge.runtime.bundle import read_manifest

    m = read_manifest(root)
    torch_dir = _model_dir(m.get("provenance", {}).get("model_dir"))
    return Source(root, "bundle", m["task"], tuple(m["labels"]), int(m["max_length"]),
                  _max_positions([torch_dir], int(m["max_length"])), str(m["model_type"]),
                  root / "tokenizer.json", torch_dir, {"model.onnx": str(m.get("precision") or "")})


def _export_source(root: Path) -> Source:
    report = _read_json(root / "export-report.json")
    info = read_model_meta(root)
    torch_dir = _model_dir(report.get("model_dir"))
    precisions = {a["file"]: str(a.get("precision", "")) for a in report.get("artifacts", []) if a.get("file")}
    return Source(root, "export", info.task.name, info.labels, info.max_length, info.max_positions,
                  info.model_type, root / "tokenizer.json", torch_dir, precisions)


# ----------------------------------------------------------------------------- realistic inputs


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    ids = tokenizer.encode("", add_special_tokens=True).ids
    if len(ids) == 2:
        return int(ids[0]), int(ids[1])
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise BertedgeError("the tokenizer has no [CLS] / [SEP] template", "bench a BERT-family tokenizer")
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


# ----------------------------------------------------------------------------- loading backends


@dataclass
class Loaded:
    """A backend ready to run: host call for accuracy, prepared call for timing, what it really used."""

    run: Callable[[Feeds], np.ndarray]  # host feeds -> logits on the host
    prepare: Callable[[Feeds], Call]  # host feeds -> a zero-argument call to time
    providers: list[str]  # execution providers the session really has ([] for torch)
    threads: int  # intra-op threads really in use, as measured or reported by the engine
    threads_how: str  # how `threads` was found
    load_s: float
    file: Path | None
    notes: list[str] = field(default_factory=list)
    keep: Any = None  # the session or model, kept alive while timing
    run_outputs: Callable[[Feeds], dict[str, np.ndarray]] | None = None  # every graph output, by name


def _os_threads() -> int | None:
    try:
        import psutil

        return int(psutil.Process().num_threads())
    except Exception:  # psutil is optional at runtime; without it we fall back to the setting
        return None


def load_torch(source: Source, backend: Backend, threads: int) -> Loaded:
    """transformers Auto class from the task record; fp32 eager, inference_mode, `threads` threads."""
    import inspect

    import torch
    import transformers

    torch.set_num_threads(threads)
    start = time.perf_counter()
    auto = getattr(transformers, get_task(source.task).hf_auto_class)
    model = auto.from_pretrained(source.torch_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    names = [n for n in TOKEN_INPUTS if n in inspect.signature(model.forward).parameters]

    def prepare(feeds: Feeds) -> Call:
        tensors = {n: torch.from_numpy(feeds[n]) for n in names}

        def call() -> Any:
            with torch.inference_mode():
                return model(**tensors)

        return call

    output_names = get_task(source.task).output_names

    def run_outputs(feeds: Feeds) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = model(**{n: torch.from_numpy(feeds[n]) for n in names})
        return {k: out[k].float().numpy() for k in output_names}

    def run(feeds: Feeds) -> np.ndarray:
        return run_outputs(feeds)[output_names[0]]

    return Loaded(run, prepare, [], torch.get_num_threads(), "torch.get_num_threads()", load_s, None, keep=model,
                  run_outputs=run_outputs)


def provider_list(backend: Backend) -> list[Any]:
    """The providers to ask onnxruntime for, with options, CPU last as its own fallback."""
    if backend.provider == TENSORRT:
        return [(TENSORRT, TENSORRT_OPTIONS), CUDA, CPU]
    return list(dict.fromkeys([backend.provider, CPU]))


def load_ort(source: Source, backend: Backend, threads: int) -> Loaded:
    """An onnxruntime session on the backend's file; IO binding for device backends."""

    path = source.file_for(backend)
    assert path is not None, "select_backends checks the file exists"
    before = _os_threads()
    start = time.perf_counter()
    session = make_session(path, provider_list(backend), threads, fix="run `bertedge export` again")
    load_s = time.perf_counter() - start
    after = _os_threads()
    names = [i.name for i in session.get_inputs()]
    if backend.provider == CPU and before is not None and after is not None:
        # The intra-op pool is created with the session: n threads = the caller + (n - 1) new ones.
        used, how = after - before + 1, "OS threads created by the session + 1 (psutil)"
    else:
        used, how = int(session.get_session_options().intra_op_num_threads), "session options"

    output_names = [o.name for o in session.get_outputs()]

    def run_outputs(feeds: Feeds) -> dict[str, np.ndarray]:
        outs = session.run(None, {n: feeds[n] for n in names})
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(output_names, outs, strict=True)}

    def run(feeds: Feeds) -> np.ndarray:
        return run_outputs(feeds)[output_names[0]]

    prepare = (_bound_call(session, names) if backend.io_binding
               else lambda feeds: _host_call(session, {n: feeds[n] for n in names}))
    return Loaded(run, prepare, list(session.get_providers()), used, how, load_s, path, keep=session,
                  run_outputs=run_outputs)


def _host_call(session: Any, feeds: Feeds) -> Call:
    return lambda: session.run(None, feeds)


def _bound_call(session: Any, names: Sequence[str]) -> Callable[[Feeds], Call]:
    """IO binding: copy the inputs to the GPU once; each timed call runs and waits on the device."""
    import onnxruntime as ort

    def prepare(feeds: Feeds) -> Call:
        binding = session.io_binding()
        device_inputs = [ort.OrtValue.ortvalue_from_numpy(feeds[n], "cuda", 0) for n in names]
        for name, value in zip(names, device_inputs, strict=True):
            binding.bind_ortvalue_input(name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda", 0)

        def call() -> None:
            _ = device_inputs  # the device copies must outlive the binding
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return call

    return prepare


LOADERS: dict[str, Callable[[Source, Backend, int], Loaded]] = {"torch": load_torch, "onnxruntime": load_ort}


# ----------------------------------------------------------------------------- results


@dataclass
class ShapeResult:
    """One backend at one batch size x sequence length."""

    batch_size: int
    seq_len: int
    stats: LatencyStats


@dataclass
class ColdStart:
    """Fresh-process start: interpreter + imports + load + first inference, and peak memory."""

    runs: int
    seconds: float  # median of runs, from process spawn to the first prediction
    seconds_all: list[float]
    import_s: float
    load_s: float
    first_inference_s: float
    peak_rss_mb: float  # the child's peak resident memory (median)
    imports_torch: bool  # whether the child ended up with torch loaded (ONNX backends should not)
    gpu_memory_mb: float | None  # the child's GPU memory (nvidia-smi), GPU backends only


@dataclass
class Accuracy:
    """The --data pass: metric, agreement with the reference backend, and its throughput."""

    rows: int
    accuracy: float | None  # None when --data has no labels
    agreement: float | None  # share of labels equal to the reference backend's
    max_abs_logit_diff: float | None
    reference: str
    seconds: float
    sequences_per_s: float
    tokens_per_s: float


@dataclass
class BackendResult:
    """Everything measured for one backend; `status` is ok, skipped or failed (with `reason`)."""

    name: str
    description: str
    status: str = "ok"
    reason: str = ""
    file: str | None = None
    precision: str = ""
    size_mb: float | None = None
    provider_requested: str = ""
    providers_used: list[str] = field(default_factory=list)
    io_binding: bool = False
    threads_requested: int = 0
    threads_used: int | None = None
    threads_how: str = ""
    load_s: float | None = None
    rss_delta_mb: float | None = None  # in-process RSS growth over load + timing (rough)
    gpu_memory_mb: float | None = None  # this process, after timing (GPU backends)
    cold_start: ColdStart | None = None
    cold_start_note: str = ""
    accuracy: Accuracy | None = None
    task_metric: dict[str, Any] | None = None  # NER / QA: the task's metric on labelled --data
    shapes: list[ShapeResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class BenchReport:
    """bench.json: settings, environment, one entry per backend, and every warning."""

    created: str
    source: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    backends: list[BackendResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    schema: str = "bertedge-bench/1"

    def backend(self, name: str) -> BackendResult | None:
        """The result for backend `name`, if it was selected."""
        return next((b for b in self.backends if b.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- environment


def cpu_facts() -> dict[str, Any]:
    """CPU model, cores and the ISA flags that decide INT8 speed and accuracy."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    models = [v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if k.strip() == "model name"]
    flag_lines = [v.split() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if k.strip() == "flags"]
    model = models[0] if models else (platform.processor() or "unknown")
    flags = set(flag_lines[0]) if flag_lines else set()
    return {"model": model, "logical_cores": os.cpu_count(), "physical_cores": _physical_cores(),
            "usable_cores": _usable_cores(), "isa": {f: f in flags for f in ISA_FLAGS}}


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or the platform hides it
        return None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def library_versions() -> dict[str, str | None]:
    """Installed versions (from package metadata, so nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "bertedge": __version__}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def gpu_memory_mb(pid: int) -> float | None:
    """GPU memory held by process `pid`, from nvidia-smi (None without a GPU or nvidia-smi)."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(mem) for p, _, mem in (line.partition(",") for line in text.splitlines())
            if p.strip() == str(pid) and mem.strip().replace(".", "").isdigit()]
    return sum(used) if used else None


def gpu_names() -> list[str]:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def environment() -> dict[str, Any]:
    """Machine facts recorded with every figure: CPU and ISA, memory, load, OS, GPUs, versions."""
    import onnxruntime as ort

    try:
        import psutil

        memory_gb: float | None = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil is optional
        memory_gb = None
    return {"cpu": cpu_facts(), "memory_gb": memory_gb, "load_average_start": list(os.getloadavg()),
            "os": platform.platform(), "gpus": gpu_names(), "onnxruntime_providers": ort.get_available_providers(),
            "versions": library_versions()}


# ----------------------------------------------------------------------------- selection


def select_backends(args: BenchArgs, source: Source, available_providers: Sequence[str]) -> list[tuple[Backend, str]]:
    """(backend, skip reason or '') for each backend to bench.

    Explicitly requested backends the folder cannot run are an error (all listed at once);
    GPU backends without their execution provider are skipped with the reason recorded.
    """
    def provider_gap(b: Backend) -> str:
        if b.gpu and b.provider not in available_providers:
            return (f"{b.provider} is not available in this onnxruntime (available: {', '.join(available_providers)};"
                    " install onnxruntime-gpu on a CUDA machine)")
        return ""

    if not args.backends:
        chosen = [b for b in BACKENDS if not source.missing(b) and not provider_gap(b)]
        if not chosen:
            raise BertedgeError(f"'{source.root}' has nothing bench can run", "export the model first")
        return [(b, "") for b in chosen]
    wanted = [BACKEND_BY_NAME[n] for n in dict.fromkeys(args.backends)]
    problems = [f"{b.name}: {m}" for b in wanted if (m := source.missing(b))]
    if problems:
        runnable = [b.name for b in BACKENDS if not source.missing(b)]
        raise BertedgeError("cannot run " + "; ".join(problems),
                            f"this folder can run: {', '.join(runnable) or 'nothing'}")
    return [(b, provider_gap(b)) for b in wanted]


def choose_seq_lens(args: BenchArgs, source: Source, notes: list[str]) -> tuple[int, ...]:
    """The requested lengths; defaults beyond the model's position limit are dropped with a warning."""
    if args.seq_lens:
        too_long = [n for n in args.seq_lens if n > source.max_positions]
        if too_long:
            raise BertedgeError(f"--seq-lens {', '.join(map(str, too_long))} exceed the model's "
                                f"{source.max_positions} positions", f"use lengths <= {source.max_positions}")
        return args.seq_lens
    kept = tuple(n for n in DEFAULT_SEQ_LENS if n <= source.max_positions)
    if len(kept) < len(DEFAULT_SEQ_LENS):
        dropped = [n for n in DEFAULT_SEQ_LENS if n not in kept]
        notes.append(f"default sequence lengths {dropped} exceed the model's {source.max_positions} "
                     "positions and were left out")
    return kept or (source.max_positions,)


def resolve_threads(requested: int) -> int:
    """0 means every CPU this process may run on; the same number is given to every backend."""
    return requested or _usable_cores()


def thread_and_provider_warnings(result: BackendResult, usable_cores: int) -> list[str]:
    """Warnings when the threads or providers really used differ from what was asked.

    >>> r = BackendResult("int8", "", threads_requested=2, threads_used=1, threads_how="OS threads created by the session + 1",
    ...                   provider_requested="CPUExecutionProvider", providers_used=["CPUExecutionProvider"])
    >>> thread_and_provider_warnings(r, usable_cores=2)
    ['int8: asked for 2 threads, it uses 1 (OS threads created by the session)']
    """
    out = []
    how = result.threads_how.split(" + ")[0]
    if result.threads_used is not None and result.threads_used != result.threads_requested:
        out.append(f"{result.name}: asked for {result.threads_requested} threads, it uses {result.threads_used} ({how})")
    if result.threads_requested > usable_cores:
        out.append(f"{result.name}: {result.threads_requested} threads on {usable_cores} usable cores "
                   "oversubscribes the CPU; latencies will be noisy")
    if result.provider_requested and result.providers_used and result.providers_used[0] != result.provider_requested:
        out.append(f"{result.name}: asked for {result.provider_requested}, onnxruntime runs on "
                   f"{', '.join(result.providers_used)} (silent fallback)")
    return out


# ----------------------------------------------------------------------------- measuring


def _rss_mb() -> float | None:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss / 2**20)
    except Exception:  # psutil is optional
        return None


def _size_mb(source: Source, backend: Backend, file: Path | None) -> float | None:
    if file is not None:
        return file.stat().st_size / 1e6
    if source.torch_dir is None:
        return None
    weights = [p for p in source.torch_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in weights) / 1e6 if weights else None


def measure_shapes(loaded: Loaded, inputs: dict[tuple[int, int], Feeds], args: BenchArgs) -> list[ShapeResult]:
    """Warm-up and timed runs for every (batch size, sequence length)."""
    results = []
    for (batch, seq), feeds in inputs.items():
        latencies = time_calls(loaded.prepare(feeds), args.warmup, args.runs, args.duration)
        results.append(ShapeResult(batch, seq, latency_stats(latencies, batch, seq)))
    return results


@dataclass
class TaskData:
    """NER / QA --data as the task record reads it: examples, model windows, labels."""

    task: Any
    examples: Any
    features: Any
    labels: tuple[str, ...]
    pad: int


def load_task_data(path: Path, source: Source) -> TaskData:
    """Read labelled NER (CoNLL / JSONL) or QA (SQuAD) data and cut it into model windows."""
    from bertedge.runtime.data import BadRows

    task = get_task(source.task)
    tokenizer = load_tokenizer(source.tokenizer)
    examples = task.load(path, Columns(), list(source.labels) or None, BadRows.ERROR)
    stride = min(128, source.max_length // 2)
    features = task.encode(tokenizer, examples, source.max_length, stride)
    return TaskData(task, examples, features, source.labels, pad_id(tokenizer))


def task_metric(run_outputs: Callable[[Feeds], dict[str, np.ndarray]], data: TaskData) -> dict[str, Any]:
    """The task's own metric (entity F1, SQuAD F1 / EM) through load -> encode -> run -> predict -> score."""
    from bertedge.runtime.features import run_windows

    start = time.perf_counter()
    outputs = run_windows(run_outputs, data.features, data.pad, data.task.per_token_outputs)
    seconds = time.perf_counter() - start
    scores = data.task.score(data.task.predict(outputs, data.features, data.examples, data.labels),
                             data.examples, data.labels)
    keep = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    return {"name": data.task.metric, "value": float(scores[data.task.metric]), "scores": keep,
            "examples": len(data.examples), "windows": len(data.features), "seconds": seconds}


def data_logits(loaded: Loaded, data: DataSet) -> tuple[np.ndarray, float]:
    """Logits for every --data row, in file order, and the seconds the model calls took."""
    outs, seconds = [], 0.0
    for feeds in data.batches:
        start = time.perf_counter()
        outs.append(loaded.run(feeds))
        seconds += time.perf_counter() - start
    logits = np.empty((len(data.order), outs[0].shape[-1]), dtype=np.float32)
    logits[data.order] = np.concatenate(outs)
    return logits, seconds


def score(name: str, logits: np.ndarray, seconds: float, data: DataSet,
          reference: tuple[str, np.ndarray] | None) -> Accuracy:
    """Accuracy (when labelled), agreement and max |logit diff| against the reference backend."""
    predicted = logits.argmax(-1)
    gold = data.examples.labels
    accuracy = float((predicted == np.asarray(gold)).mean()) if gold is not None else None
    ref_name, ref = reference if reference is not None else (name, logits)
    return Accuracy(rows=len(predicted), accuracy=accuracy, agreement=float((predicted == ref.argmax(-1)).mean()),
                    max_abs_logit_diff=float(np.abs(logits - ref).max()), reference=ref_name, seconds=seconds,
                    sequences_per_s=len(predicted) / seconds if seconds else 0.0,
                    tokens_per_s=data.tokens / seconds if seconds else 0.0)


def bench_backend(backend: Backend, source: Source, inputs: dict[tuple[int, int], Feeds], args: BenchArgs,
                  threads: int, data: DataSet | None, reference: tuple[str, np.ndarray] | None,
                  task_data: TaskData | None = None) -> tuple[BackendResult, np.ndarray | None]:
    """Load one backend in this process, time every shape and run the --data pass."""
    result = BackendResult(backend.name, backend.description, provider_requested=backend.provider,
                           io_binding=backend.io_binding, threads_requested=threads)
    rss_before = _rss_mb()
    loaded = LOADERS[backend.engine](source, backend, threads)
    result.file = str(loaded.file) if loaded.file else (str(source.torch_dir) if source.torch_dir else None)
    result.precision = (source.precisions.get(loaded.file.name, "") if loaded.file else "") or backend.precision
    result.size_mb = _size_mb(source, backend, loaded.file)
    result.providers_used, result.threads_used, result.threads_how = loaded.providers, loaded.threads, loaded.threads_how
    result.load_s = loaded.load_s
    if backend.gpu and loaded.providers and loaded.providers[0] != backend.provider:
        result.status, result.reason = "skipped", f"onnxruntime fell back to {', '.join(loaded.providers)}"
        return result, None
    result.shapes = measure_shapes(loaded, inputs, args)
    logits = None
    if data is not None:
        logits, seconds = data_logits(loaded, data)
        result.accuracy = score(backend.name, logits, seconds, data, reference)
    if task_data is not None and loaded.run_outputs is not None:
        result.task_metric = task_metric(loaded.run_outputs, task_data)
    rss_after = _rss_mb()
    result.rss_delta_mb = rss_after - rss_before if rss_after is not None and rss_before is not None else None
    result.gpu_memory_mb = gpu_memory_mb(os.getpid()) if backend.gpu else None
    del loaded
    gc.collect()
    return result, logits


# ----------------------------------------------------------------------------- cold start


def cold_start_spec(backend: Backend, source: Source, threads: int, text: str) -> dict[str, Any]:
    """What the fresh process needs to load this backend and predict `text` once."""
    file = source.file_for(backend)
    return {"engine": backend.engine, "file": str(file) if file else None, "torch_dir": str(source.torch_dir),
            "auto_class": get_task(source.task).hf_auto_class, "tokenizer": str(source.tokenizer),
            "providers": provider_list(backend), "threads": threads, "text": text, "gpu": backend.gpu}


def measure_cold_start(spec: dict[str, Any], runs: int) -> ColdStart:
    """Run the backend `runs` times in fresh processes; medians of each phase.

    Raises:
        RuntimeError: the child process failed (its stderr is in the message).
    """
    samples = [_cold_start_once(spec) for _ in range(runs)]

    def median(key: str) -> float:
        return float(np.median([s[key] for s in samples]))

    gpu = [s["gpu_memory_mb"] for s in samples if s.get("gpu_memory_mb") is not None]
    return ColdStart(runs=runs, seconds=median("seconds"), seconds_all=[s["seconds"] for s in samples],
                     import_s=median("import_s"), load_s=median("load_s"),
                     first_inference_s=median("first_inference_s"), peak_rss_mb=median("peak_rss_mb"),
                     imports_torch=any(s["imports_torch"] for s in samples),
                     gpu_memory_mb=float(np.median(gpu)) if gpu else None)


def _cold_start_once(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "bertedge.build.bench", "_cold-start", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start process failed: {proc.stderr.strip().splitlines()[-1:]}")
    sample: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    sample["seconds"] = sample.pop("done_at") - spawned
    return sample


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM restarts at exec; ru_maxrss can keep the forking parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cold_start_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the fresh process: import, load and predict once, the way a user would."""
    t0 = time.perf_counter()
    if spec["engine"] == "torch":
        import torch
        import transformers

        t1 = time.perf_counter()
        torch.set_num_threads(spec["threads"])
        model = getattr(transformers, spec["auto_class"]).from_pretrained(spec["torch_dir"]).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["torch_dir"])
        t2 = time.perf_counter()
        with torch.inference_mode():
            model(**tokenizer([spec["text"]], return_tensors="pt"))
    else:
        from tokenizers import Tokenizer

        from bertedge.runtime.sessions import make_session as open_session

        t1 = time.perf_counter()
        providers = [tuple(p) if isinstance(p, list) else p for p in spec["providers"]]
        session = open_session(Path(spec["file"]), providers, spec["threads"])
        tokenizer = Tokenizer.from_file(spec["tokenizer"])
        t2 = time.perf_counter()
        enc = tokenizer.encode(spec["text"])
        arrays = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
        session.run(None, {i.name: np.asarray([arrays[i.name]], dtype=np.int64) for i in session.get_inputs()})
    t3 = time.perf_counter()
    done_at = time.time()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_inference_s": t3 - t2, "done_at": done_at,
            "peak_rss_mb": _peak_rss_mb(), "imports_torch": "torch" in sys.modules,
            "gpu_memory_mb": gpu_memory_mb(os.getpid()) if spec["gpu"] else None}


# ----------------------------------------------------------------------------- the stage


def _sentences(data: TextExamples | None) -> list[str]:
    return list(data.texts) if data is not None else list(BUILTIN_SENTENCES)


def _task_sentences(data: TaskData) -> list[str]:
    """Real text from NER sentences (words joined) or QA contexts, to fill the timed inputs."""
    if hasattr(data.examples, "words"):
        return [" ".join(w) for w in data.examples.words]
    return [e.context for e in data.examples.items]


def load_data(args: BenchArgs, source: Source) -> TextExamples | None:
    """Classification --data (labels optional), a seeded subset with --max-data-rows."""
    if args.data is None or get_task(source.task).per_token_outputs:
        return None  # NER / QA data is read by the task record (load_task_data)
    examples = load_text_classification(args.data, args.columns, label_names=list(source.labels) or None,
                                        require_labels=False)
    return seeded_subset(examples, args.max_data_rows, args.seed)


def settings(args: BenchArgs, threads: int, seq_lens: Sequence[int], chosen: Sequence[tuple[Backend, str]]) -> dict[str, Any]:
    """The settings block printed first and stored in bench.json."""
    timing = f"{args.runs} runs" if args.runs else f"{args.duration:g} s (>= {MIN_TIMED_RUNS} runs)"
    return {"model": str(args.model), "backends": [b.name for b, _ in chosen], "batch_sizes": list(args.batch_sizes),
            "seq_lens": list(seq_lens), "threads": threads, "threads_requested": args.threads,
            "inter_op_threads": 1, "warmup": args.warmup, "runs": args.runs, "duration_s": args.duration,
            "timing": timing, "data": str(args.data) if args.data else None, "max_data_rows": args.max_data_rows,
            "data_batch_size": args.data_batch_size, "cold_start": args.cold_start,
            "cold_start_runs": args.cold_start_runs, "seed": args.seed,
            "inputs": "real sentences cut to exactly seq_len tokens ([CLS] ... [SEP]), attention mask all ones",
            "timed": "model call only; tokenization excluded. IO-binding backends keep inputs and outputs on the device"}


def bench(args: BenchArgs, echo: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark every selected backend on every shape; write bench.json / .md / plots to `args.out`.

    Args:
        args: what to bench and how.
        echo: where progress lines go (settings first); None prints nothing.

    Raises:
        BertedgeError: bad folder, options or data; a requested backend the folder lacks;
            no backend produced a result.
    """
    import onnxruntime as ort

    say = echo or (lambda _: None)
    start = time.perf_counter()
    source = resolve_source(args.model)
    notes: list[str] = []
    seq_lens = choose_seq_lens(args, source, notes)
    chosen = select_backends(args, source, ort.get_available_providers())
    threads = resolve_threads(args.threads)
    examples = load_data(args, source)
    report = BenchReport(created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         source=source.to_dict(), settings=settings(args, threads, seq_lens, chosen),
                         environment=environment(), warnings=notes)
    for key, value in report.settings.items():
        say(f"{key:18s} {value}")
    tokenizer = load_tokenizer(source.tokenizer)
    task_data = load_task_data(args.data, source) if args.data is not None and examples is None else None
    sentences = _task_sentences(task_data) if task_data is not None else _sentences(examples)
    inputs = {(b, s): realistic_batch(tokenizer, sentences, b, s, seed=args.seed + 1000 * b + s)
              for b in args.batch_sizes for s in seq_lens}
    data = None
    if examples is not None:
        data = tokenize_dataset(tokenizer, examples, source.max_length, args.data_batch_size)
    if data is not None and data.truncated:
        notes.append(f"{data.truncated} of {len(examples or [])} --data rows are longer than {source.max_length} tokens and were truncated")
    _run_backends(report, chosen, source, inputs, args, threads, data, say, task_data)
    report.environment["load_average_end"] = list(os.getloadavg())
    report.seconds = time.perf_counter() - start
    if not any(b.status == "ok" for b in report.backends):
        raise BertedgeError("no backend produced a result: " + "; ".join(f"{b.name}: {b.reason}" for b in report.backends),
                            "bench a CPU backend, e.g. --backends onnx")
    if args.out is not None:
        report.files = write_outputs(report, args.out, args.plots)
    return report


def _run_backends(report: BenchReport, chosen: Sequence[tuple[Backend, str]], source: Source,
                  inputs: dict[tuple[int, int], Feeds], args: BenchArgs, threads: int,
                  data: DataSet | None, say: Callable[[str], None], task_data: TaskData | None = None) -> None:
    reference: tuple[str, np.ndarray] | None = None
    usable = _usable_cores()
    for backend, skip in _reference_first(chosen):
        if skip:
            report.backends.append(BackendResult(backend.name, backend.description, status="skipped", reason=skip,
                                                 provider_requested=backend.provider, threads_requested=threads))
            report.warnings.append(f"{backend.name} skipped: {skip}")
            say(f"{backend.name}: skipped ({skip})")
            continue
        say(f"{backend.name}: timing {len(inputs)} shapes ...")
        result, logits = _bench_one(backend, source, inputs, args, threads, data, reference, task_data)
        if result.task_metric is not None:
            say(f"{backend.name}: {result.task_metric['name']} {result.task_metric['value']:.4f} "
                f"on {result.task_metric['examples']} --data examples")
        if reference is None and logits is not None:
            reference = (backend.name, logits)
        result.warnings = thread_and_provider_warnings(result, usable)
        report.warnings.extend(result.warnings + ([f"{backend.name} {result.status}: {result.reason}"]
                                                  if result.status != "ok" else []))
        if result.status == "ok" and args.cold_start:
            _add_cold_start(result, cold_start_spec(backend, source, threads, BUILTIN_SENTENCES[0]), args.cold_start_runs)
        report.backends.append(result)
    report.backends.sort(key=lambda r: [b.name for b, _ in chosen].index(r.name))


def _bench_one(backend: Backend, source: Source, inputs: dict[tuple[int, int], Feeds], args: BenchArgs,
               threads: int, data: DataSet | None, reference: tuple[str, np.ndarray] | None,
               task_data: TaskData | None = None) -> tuple[BackendResult, np.ndarray | None]:
    try:
        return bench_backend(backend, source, inputs, args, threads, data, reference, task_data)
    except BertedgeError:
        raise
    except Exception as e:  # an engine that cannot load or run a file is reported, not fatal
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return BackendResult(backend.name, backend.description, status="failed", reason=first[:300],
                             provider_requested=backend.provider, threads_requested=threads), None


def _reference_first(chosen: Sequence[tuple[Backend, str]]) -> list[tuple[Backend, str]]:
    """torch first, else ONNX fp32: agreement is measured against the first backend that ran."""
    rank = {"torch": 0, "onnx": 1}
    return sorted(chosen, key=lambda c: rank.get(c[0].name, 2))


def _add_cold_start(result: BackendResult, spec: dict[str, Any], runs: int) -> None:
    try:
        result.cold_start = measure_cold_start(spec, runs)
    except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
        result.cold_start_note = f"cold start not measured: {e}"
        result.warnings.append(f"{result.name}: {result.cold_start_note}")


# ----------------------------------------------------------------------------- output


def summary_rows(report: BenchReport) -> list[dict[str, str]]:
    """One row per backend: file, size, provider, threads, cold start, memory, accuracy, status."""
    rows = []
    for b in report.backends:
        cs, acc = b.cold_start, b.accuracy
        rows.append({
            "backend": b.name, "status": b.status if b.status == "ok" else f"{b.status}: {b.reason}",
            "precision": b.precision, "file": Path(b.file).name if b.file else "-", "MB": _fmt(b.size_mb, ".1f"),
            "provider": ", ".join(p.replace("ExecutionProvider", "") for p in b.providers_used) or ("torch" if b.name == "torch" else "-"),
            "threads": f"{b.threads_used}/{b.threads_requested}" if b.threads_used is not None else "-",
            "cold start s": _fmt(cs.seconds if cs else None, ".2f"),
            "peak RSS MB": _fmt(cs.peak_rss_mb if cs else None, ".0f"),
            "GPU MB": _fmt(b.gpu_memory_mb if b.gpu_memory_mb is not None else (cs.gpu_memory_mb if cs else None), ".0f"),
            "accuracy": (f"{b.task_metric['name']} {100 * b.task_metric['value']:.2f}" if b.task_metric
                         else _fmt(acc.accuracy * 100 if acc and acc.accuracy is not None else None, ".2f")),
            f"agreement vs {acc.reference if acc else 'ref'}": _fmt(acc.agreement * 100 if acc and acc.agreement is not None else None, ".1f"),
            "max|Δlogit|": _fmt(acc.max_abs_logit_diff if acc else None, ".2e"),
            "data sent/s": _fmt(acc.sequences_per_s if acc else None, ".0f"),
        })
    return rows


def shape_rows(report: BenchReport) -> list[dict[str, str]]:
    """One row per backend x shape: latency percentiles, mean ± std, throughput."""
    return [{"backend": b.name, "batch": str(s.batch_size), "seq": str(s.seq_len), "runs": str(s.stats.runs),
             "p50 ms": f"{s.stats.p50_ms:.2f}", "p90 ms": f"{s.stats.p90_ms:.2f}", "p99 ms": f"{s.stats.p99_ms:.2f}",
             "mean ± std ms": f"{s.stats.mean_ms:.2f} ± {s.stats.std_ms:.2f}",
             "seq/s": f"{s.stats.sequences_per_s:.1f}", "tok/s": f"{s.stats.tokens_per_s:.0f}"}
            for b in report.backends for s in b.shapes]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: BenchReport) -> list[Any]:
    """rich tables for the terminal: per-shape timings, then one summary row per backend."""
    from rich.table import Table

    tables = []
    for title, rows in (("latency and throughput", shape_rows(report)), ("backends", summary_rows(report))):
        if not rows:
            continue
        table = Table(title=f"bertedge bench: {title}")
        for col in _columns(rows):
            table.add_column(col, justify="left" if col in ("backend", "status", "file", "provider", "precision") else "right")
        for row in rows:
            table.add_row(*(row.get(c, "") for c in _columns(rows)))
        tables.append(table)
    return tables


def _columns(rows: Sequence[dict[str, str]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def markdown(report: BenchReport) -> str:
    """bench.md: settings, environment, the two tables and the warnings."""
    env, cpu = report.environment, report.environment["cpu"]
    isa = ", ".join(k for k, v in cpu["isa"].items() if v) or "none"
    lines = [f"# bertedge bench: {report.source['root']}", "",
             f"{report.created}; {cpu['model']}, {cpu['usable_cores']} usable cores, ISA: {isa}; "
             f"onnxruntime {env['versions'].get('onnxruntime')}, torch {env['versions'].get('torch')}, "
             f"transformers {env['versions'].get('transformers')}", "",
             "## Settings", "", *(f"- {k}: {v}" for k, v in report.settings.items()), ""]
    for title, rows in (("Latency and throughput", shape_rows(report)), ("Backends", summary_rows(report))):
        cols = _columns(rows)
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                  *("| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows), ""]
    if report.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in report.warnings), ""]
    return "\n".join(lines)


def plot(report: BenchReport, out: Path) -> dict[str, str]:
    """Latency vs sequence length (one panel per batch size) and throughput vs batch size (per length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [b for b in report.backends if b.shapes]
    batches = sorted({s.batch_size for b in ok for s in b.shapes})
    lens = sorted({s.seq_len for b in ok for s in b.shapes})
    files = {}
    for name, panels, x_of, y_of, xlabel, ylabel in (
        ("latency_vs_seq_len.png", [("batch", v) for v in batches], lambda s: s.seq_len,
         lambda s: s.stats.p50_ms, "sequence length (tokens)", "p50 latency (ms)"),
        ("throughput_vs_batch_size.png", [("seq", v) for v in lens], lambda s: s.batch_size,
         lambda s: s.stats.sequences_per_s, "batch size", "throughput (sequences/s)"),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
        for ax, (key, value) in zip(axes[0], panels, strict=True):
            for b in ok:
                pts = sorted((x_of(s), y_of(s)) for s in b.shapes
                             if (s.batch_size if key == "batch" else s.seq_len) == value)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b.name)
            ax.set(title=f"{key} {value}", xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"bertedge bench, {report.settings['threads']} threads")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files[name.split(".")[0]] = str(out / name)
    return files


def write_outputs(report: BenchReport, out: Path, plots: bool) -> dict[str, str]:
    """bench.json, bench.md, the PNG plots, and one summary line appended to bench-history.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "bench.json"), "markdown": str(out / "bench.md"), "history": str(out / "bench-history.jsonl")}
    if plots:
        files.update(plot(report, out))
    report.files = files
    (out / "bench.json").write_text(json.dumps(report.to_dict(), indent=2, default=_jsonable) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown(report), encoding="utf-8")
    line = {"created": report.created, "model": report.source["root"], "threads": report.settings["threads"],
            "cpu": report.environment["cpu"]["model"],
            "results": {b.name: {f"{s.batch_size}x{s.seq_len}": round(s.stats.sequences_per_s, 2) for s in b.shapes}
                        for b in report.backends}}
    with (out / "bench-history.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return files


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def _main(argv: Sequence[str]) -> int:
    """Hidden entry for the cold-start child: `python -m bertedge.build.bench _cold-start SPEC_JSON`."""
    if len(argv) != 2 or argv[0] != "_cold-start":
        print("usage: python -m bertedge.build.bench _cold-start SPEC_JSON (internal; use `bertedge bench`)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(json.dumps(_cold_start_child(json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
