"""Benchmark settings as data: constants, the backends (`known_backends`, from the artifact kinds) and `BenchArgs`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import ARTIFACT_KINDS, CASCADE, ONNXRUNTIME
from bertedge.runtime.data import Columns

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
    """One way to run the model: which engine loads which artifact kind, on which provider."""

    name: str  # the artifact kind's name for CPU backends (as in export's report); torch, cuda, ...
    engine: str  # "torch", "onnxruntime", "openvino" or "cascade": the key into LOADERS
    kind: str | None  # the artifact kind it runs (a key of ARTIFACT_KINDS); None for torch
    provider: str  # onnxruntime execution provider asked for ("" for torch and openvino)
    precision: str  # what the file usually holds; an export report or manifest may say otherwise
    io_binding: bool = False  # inputs and outputs stay on the device while timed
    description: str = ""

    @property
    def gpu(self) -> bool:
        return self.provider in (CUDA, TENSORRT)

    @property
    def files(self) -> tuple[str, ...]:
        """The artifact's files in an export folder (() for torch)."""
        return ARTIFACT_KINDS[self.kind].files if self.kind is not None else ()


TORCH = Backend("torch", "torch", None, "", "fp32", description="PyTorch eager (transformers), CPU")
GPU_BACKENDS = (
    Backend("cuda", ONNXRUNTIME, "fp32", CUDA, "fp32", io_binding=True, description="ONNX fp32, CUDA EP, IO binding"),
    Backend("cuda-fp16", ONNXRUNTIME, "fp16", CUDA, "fp16", io_binding=True, description="ONNX fp16, CUDA EP, IO binding"),
    Backend("tensorrt", ONNXRUNTIME, "fp32", TENSORRT, "fp16", io_binding=True,
            description="TensorRT EP (fp16 engine), IO binding"),
)
RENAMED = {"onnx": "fp32", "onnx-fused": "fused"}  # bench's names before they became export's


def known_backends() -> tuple[Backend, ...]:
    """torch, one CPU backend per CPU artifact kind (named as the kind), then the GPU backends.

    Read from `bertedge.runtime.artifacts.ARTIFACT_KINDS` on each call, so a new kind is a new
    backend with no change here.

    >>> print(", ".join(b.name for b in known_backends()))
    torch, fp32, fused, int8, int8-static, int8-openvino, int8-openvino-fast, bf16-openvino, int8-openvino-bf16, int8-openvino-fast-bf16, cascade, cuda, cuda-fp16, tensorrt
    """
    where = {ONNXRUNTIME: "CPU EP", CASCADE: "each stage on its engine"}
    cpu = tuple(Backend(k.name, k.engine, k.name, CPU if k.engine == ONNXRUNTIME else "", k.precision,
                        description=f"{k.description}, {where.get(k.engine, 'OpenVINO CPU')}")
                for k in ARTIFACT_KINDS.values() if k.cpu_candidate)
    return (TORCH, *cpu, *GPU_BACKENDS)


def backend_named(name: str) -> Backend:
    """The backend called `name` (see `known_backends`)."""
    return next(b for b in known_backends() if b.name == name)


TENSORRT_OPTIONS = {"trt_fp16_enable": True, "trt_engine_cache_enable": False}


# ----------------------------------------------------------------------------- arguments


@dataclass
class BenchArgs:
    """Everything `bertedge bench` needs."""

    model: Path  # export folder, bundle folder, or Hugging Face model folder
    backends: tuple[str, ...] = ()  # names from known_backends(); () = every one the folder has (+ GPU ones when usable)
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
        known = [b.name for b in known_backends()]
        unknown = [b for b in self.backends if b not in known]
        if unknown:
            renamed = [f"'{b}' is now '{RENAMED[b]}'" for b in unknown if b in RENAMED]
            problems.append(f"unknown backend {', '.join(unknown)} (known: {', '.join(known)}"
                            + (f"; {', '.join(renamed)}, as in export's report" if renamed else "") + ")")
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
