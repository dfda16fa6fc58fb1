"""bertedge export: PyTorch model folder -> validated ONNX / OpenVINO artifacts (fp32, fused, INT8, FP16,
a cascade of them).

    args        ExportArgs, Optimization, Quantization, --target parsing
    report      the typed rows of export-report.json, and the terminal tables
    compare     numpy maths: output differences, answers, agreement, batch invariance
    source      the PyTorch model and the real inputs (--eval, --calibration, --agreement-data)
    gate        PyTorch's reference, the checks, the timings, the recommendation
    graphs      the fp32 export, the fused graph, FP16
    int8        the INT8 ladders (onnxruntime and OpenVINO), through one search loop
    cascade     the cascade candidate: its stages, delta calibration and real-text timing
    draft       --draft: a distilled student's artifact as the cascade's first stage
    candidates  CANDIDATES: one build function per artifact kind (bertedge.runtime.artifacts)
    plot        export-tradeoff.png: every candidate's agreement against its time, per target shape
    stage       export(ExportArgs) -> ExportReport: every candidate, gated, into an atomic folder
"""

from bertedge.runtime.outputs import Terminated
from bertedge.toolchain.export.args import (
    ExportArgs,
    Optimization,
    Quantization,
    check_targets,
    parse_targets,
)
from bertedge.toolchain.export.candidates import Candidate
from bertedge.toolchain.export.compare import (
    agreement_counts,
    batch_invariance,
    cost_ms,
    max_abs_diff,
    predictions,
    probabilities,
    target_feeds,
)
from bertedge.toolchain.export.gate import (
    BuildContext,
    Reference,
    build_reference,
    cpu_info,
    ort_runner,
    recommend,
    retime,
    time_run,
)
from bertedge.toolchain.export.graphs import export_fp32, fuse, fuse_without_attention, to_fp16
from bertedge.toolchain.export.report import (
    ArtifactReport,
    BatchInvariance,
    CandidateRow,
    ExportReport,
    Metric,
    render,
)
from bertedge.toolchain.export.source import (
    BUILTIN_SENTENCES,
    SUPPORTED_MODEL_TYPES,
    EvalSet,
    Source,
    evaluate,
    load_agreement_texts,
    load_calibration,
    load_eval,
    load_source,
    random_batches,
    runtime_batches,
    tokenize,
    torch_runner,
)
from bertedge.toolchain.export.stage import copy_metadata, export

__all__ = [
    "BUILTIN_SENTENCES", "SUPPORTED_MODEL_TYPES", "ArtifactReport", "BatchInvariance", "BuildContext", "Candidate",
    "CandidateRow", "EvalSet", "ExportArgs", "ExportReport", "Metric", "Optimization", "Quantization", "Reference",
    "Source", "Terminated", "agreement_counts", "batch_invariance", "build_reference", "check_targets",
    "copy_metadata", "cost_ms", "cpu_info", "evaluate", "export", "export_fp32", "fuse", "fuse_without_attention",
    "load_agreement_texts", "load_calibration", "load_eval", "load_source", "max_abs_diff", "ort_runner",
    "parse_targets", "predictions", "probabilities", "random_batches", "recommend", "render", "retime",
    "runtime_batches", "target_feeds", "time_run", "to_fp16", "tokenize", "torch_runner",
]
