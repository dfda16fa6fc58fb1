"""The artifacts export can build, in build order: one `Candidate` per artifact kind.

A kind's name, files, engine, precision and whether it is lossy live in
`bertedge.runtime.artifacts.ARTIFACT_KINDS`; here each kind gets the function that writes its
file into the export folder and gates it. Adding a kind is one row there and one entry here:

    def build_fp32_copy(ctx: BuildContext) -> list[ArtifactReport]:
        shutil.copy(ctx.path("fp32"), ctx.path("fp32-copy"))
        return [ctx.validate("fp32-copy")]

A build function returns [] when the options leave its kind out; later builds may read the
artifacts built before them (`ctx.report`), e.g. INT8 starts from the fused graph when it passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bertedge.errors import BertedgeError
from bertedge.toolchain.export.args import Optimization
from bertedge.toolchain.export.bf16 import (
    build_bf16_openvino,
    build_int8_openvino_bf16,
    build_int8_openvino_fast_bf16,
)
from bertedge.toolchain.export.cascade import build_cascade
from bertedge.toolchain.export.gate import BuildContext, size_mb
from bertedge.toolchain.export.graphs import export_fp32, fuse, to_fp16
from bertedge.toolchain.export.int8 import (
    build_int8,
    build_int8_static,
    build_openvino,
    build_openvino_fast,
)
from bertedge.toolchain.export.report import ArtifactReport

CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Candidate:
    """One artifact kind export can build, and how."""

    kind: str  # a key of ARTIFACT_KINDS
    build: Callable[[BuildContext], list[ArtifactReport]]  # writes and gates it; [] when left out


def build_fp32(ctx: BuildContext) -> list[ArtifactReport]:
    """model.onnx; a parity failure here means the export itself is wrong, so it is fatal."""
    export_fp32(ctx.source, ctx.path("fp32"), ctx.args.opset)
    report = ctx.validate("fp32")
    if not report.passed:
        raise BertedgeError(f"the ONNX export does not match PyTorch ({report.notes})",
                            "report this with the model's config.json; try another --opset")
    return [report]


def build_fused(ctx: BuildContext) -> list[ArtifactReport]:
    """model-fused.onnx (with --optimization fused), validated like fp32."""
    if ctx.args.optimization is not Optimization.FUSED:
        return []
    notes = fuse(ctx.source.info, ctx.path("fp32"), ctx.path("fused"))
    return [ctx.validate("fused", "fused", notes)]


def build_fp16(ctx: BuildContext) -> list[ArtifactReport]:
    """model-fp16.onnx (with --fp16): validated on CUDA when onnxruntime has it, else only tried on CPU."""
    import onnxruntime as ort

    if not ctx.args.fp16:
        return []
    base = ctx.best_fp()
    to_fp16(ctx.path(base), ctx.path("fp16"))
    cuda = CUDA in ort.get_available_providers()
    optimization = "fused" if base == "fused" else "none"
    try:
        report = ctx.validate("fp16", optimization, providers=[CUDA if cuda else "CPUExecutionProvider"])
    except Exception as e:  # CPU lacks fp16 kernels for some fused ops
        report = ArtifactReport.of_kind("fp16", optimization)
        report.notes, report.size_mb = f"CPU run failed ({type(e).__name__})", size_mb(ctx.out, "fp16")
    if not cuda:
        cpu = f"CPU check: agreement {report.label_agreement:.4f}" if report.validated else report.notes
        report.validated = report.passed = False
        report.notes = f"not validated: no CUDA provider ({cpu})"
    return [report]


CANDIDATES: list[Candidate] = [
    Candidate("fp32", build_fp32),
    Candidate("fused", build_fused),
    Candidate("int8", build_int8),
    Candidate("int8-static", build_int8_static),
    Candidate("int8-openvino", build_openvino),
    Candidate("int8-openvino-fast", build_openvino_fast),  # after its ladder: a cascade's stage 1
    Candidate("bf16-openvino", build_bf16_openvino),  # CPUs that run bf16 in OpenVINO only
    Candidate("int8-openvino-bf16", build_int8_openvino_bf16),  # after int8-openvino: a copy of its IR
    Candidate("int8-openvino-fast-bf16", build_int8_openvino_fast_bf16),  # after int8-openvino-fast: a copy of its IR
    Candidate("fp16", build_fp16),
    Candidate("cascade", build_cascade),  # last: its stages are the artifacts above
]
