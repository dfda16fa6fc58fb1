"""What `bertedge export` is asked to do: `ExportArgs`, its choices, and the --target parser."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from bertedge.errors import BertedgeError
from bertedge.runtime.data import Columns
from bertedge.runtime.meta import ModelMeta
from bertedge.runtime.options import finite
from bertedge.toolchain import quantize as q

OPENVINO_CHOICES = ("auto", "on", "off")
TIMING_ENV = "BERTEDGE_TIMING_SECONDS"  # the default of --timing-seconds (smoke runs and tests: 0.02)
FOOTPRINT_ENV = "BERTEDGE_FOOTPRINT"  # the default of --footprint/--no-footprint (the test suite: 0)


def default_timing_seconds() -> float:
    """Seconds of timed calls per artifact and shape: $BERTEDGE_TIMING_SECONDS, else 1.

    A short budget still times every artifact (at least three calls each); only the figures
    get noisier, which suits a smoke run or a test suite, never a recommendation you ship.

    >>> import os; os.environ.pop(TIMING_ENV, None) and None; default_timing_seconds()
    1.0
    """
    value = os.environ.get(TIMING_ENV, "").strip()
    try:
        return float(value) if value else 1.0
    except ValueError:
        raise BertedgeError(f"${TIMING_ENV}={value[:40]!r} is not a number of seconds",
                            f"unset {TIMING_ENV} or set it to e.g. 0.5") from None


def default_footprint() -> bool:
    """Whether export measures each artifact's cold start and peak RSS: $BERTEDGE_FOOTPRINT, else yes.

    About a second per artifact (a fresh process each), so a test suite of tiny exports turns it off.

    >>> import os; saved = os.environ.pop(FOOTPRINT_ENV, None); default_footprint()
    True
    >>> os.environ[FOOTPRINT_ENV] = "off"; default_footprint()
    False
    >>> _ = os.environ.pop(FOOTPRINT_ENV); os.environ.update({FOOTPRINT_ENV: saved} if saved is not None else {})
    """
    value = os.environ.get(FOOTPRINT_ENV, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BertedgeError(f"${FOOTPRINT_ENV}={value[:40]!r} is neither 1 nor 0",
                        f"unset {FOOTPRINT_ENV} or set it to 0 (skip the measure) or 1")


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
    timing_seconds: float = field(default_factory=default_timing_seconds)  # timed seconds per artifact and shape
    timing_rounds: int = 3  # the passers are timed again in this many interleaved rounds (0: no re-timing)
    footprint: bool = field(default_factory=default_footprint)  # cold start and peak RSS of each artifact, fresh process
    threads: int = 0  # intra-op threads while timing (0: onnxruntime picks)
    sensitivity: bool = True  # keep the most error-prone nodes in fp32 when no invariant INT8 passes
    max_fp32_nodes: int = 8  # the most nodes the sensitivity search may keep in fp32
    sensitivity_seconds: float = 600.0  # cap on the sensitivity probing (one quantization per node)
    calibrate_method: str = "minmax"  # static INT8 calibration: minmax, percentile or entropy
    openvino: str = "auto"  # NNCF INT8 for the OpenVINO engine: auto (when installed and --calibration given), on, off; not off: the bf16 kinds too
    cascade: bool = True  # also build a cascade: static INT8 first, a more faithful artifact for low margins
    draft: Path | None = None  # a distilled student's export folder: its artifact starts the cascade
    seed: int = 0  # seeds random inputs and row subsets
    overwrite: bool = False  # replace an existing --out folder

    def __post_init__(self) -> None:
        self.model_dir, self.out = Path(self.model_dir), Path(self.out)
        self.draft = Path(self.draft) if self.draft is not None else None
        self.optimization = Optimization(self.optimization)
        self.quantize = Quantization(self.quantize)
        problems = self._float_problems() + self._count_problems() + self._combination_problems()
        if problems:
            raise BertedgeError("; ".join(problems), "fix the options above (see `bertedge export --help`)")

    def _float_problems(self) -> list[str]:
        """NaN or infinity in any float option, and each float's own range."""
        checks = [finite("--max-accuracy-drop", self.max_accuracy_drop, -100.0),
                  finite("--min-agreement", self.min_agreement), finite("--atol", self.atol),
                  finite("--invariance-tol", self.invariance_tol), finite("--timing-seconds", self.timing_seconds),
                  finite("--sensitivity-seconds", self.sensitivity_seconds)]
        problems = [p for p in checks if p]
        if not problems:
            if self.min_agreement > 1.0:
                problems.append(f"--min-agreement {self.min_agreement} is not between 0 and 1")
            if self.atol <= 0 or self.invariance_tol <= 0:
                problems.append("--atol and --invariance-tol must be positive")
            if self.timing_seconds <= 0:
                problems.append("--timing-seconds must be positive")
        return problems

    def _count_problems(self) -> list[str]:
        problems = []
        if not 14 <= self.opset <= 20:
            problems.append(f"--opset {self.opset} is outside 14..20")
        if self.calibration_rows < 1 or self.batch_size < 1 or self.max_eval_rows < 0 or self.agreement_rows < 1:
            problems.append("--calibration-rows, --agreement-rows and --batch-size must be >= 1, --max-eval-rows >= 0")
        if any(b < 1 or n < 2 for b, n in self.targets):
            problems.append("--target shapes need batch >= 1 and sequence >= 2 (e.g. 1x32,32x128)")
        if self.max_fp32_nodes < 0 or self.threads < 0 or self.timing_rounds < 0:
            problems.append("--max-fp32-nodes, --threads and --timing-rounds must be >= 0")
        return problems

    def _combination_problems(self) -> list[str]:
        problems = []
        if self.calibrate_method not in q.CALIBRATE:
            problems.append(f"--calibrate-method must be one of {', '.join(q.CALIBRATE)}")
        if self.openvino not in OPENVINO_CHOICES:
            problems.append(f"--openvino must be auto, on or off (got {self.openvino!r})")
        if self.openvino == "on" and (self.calibration is None or self.quantize is Quantization.NONE):
            problems.append("--openvino on needs --calibration FILE (texts from your data) and INT8 (not --quantize none)")
        if self.quantize is Quantization.STATIC and self.calibration is None:
            problems.append("--quantize static needs --calibration FILE (texts from your data)")
        if self.require_int8 and self.quantize is Quantization.NONE:
            problems.append("--require-int8 contradicts --quantize none")
        if self.out.resolve() == self.model_dir.resolve():
            problems.append("--out must differ from the model folder")
        if self.draft is not None and (not self.cascade or self.draft.resolve() == self.out.resolve()):
            problems.append("--draft needs --cascade and a student export folder other than --out")
        return problems


def check_targets(targets: tuple[tuple[int, int], ...], info: ModelMeta) -> None:
    """Refuse --target lengths the model's position table cannot hold (one line, before any work).

    >>> from bertedge.runtime.tasks import CLASSIFICATION
    >>> meta = ModelMeta(CLASSIFICATION, ("a", "b"), 64, 32, "bert", 64)
    >>> check_targets(((1, 100000),), meta)
    Traceback (most recent call last):
    ...
    bertedge.errors.BertedgeError: --target 1x100000 is longer than the model's 64 positions -- use sequence lengths <= 64 (e.g. --target 1x64)
    """
    too_long = [f"{b}x{n}" for b, n in targets if n > info.max_positions]
    if too_long:
        raise BertedgeError(f"--target {', '.join(too_long)} is longer than the model's {info.max_positions} positions",
                            f"use sequence lengths <= {info.max_positions} (e.g. --target 1x{info.max_positions})")


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
