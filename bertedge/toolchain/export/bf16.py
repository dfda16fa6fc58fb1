"""The bf16 candidates: OpenVINO's CPU plugin running everything not quantized in bf16.

On a CPU with bf16 units (AVX512_BF16, AMX or AVX2-VNNI-2: OpenVINO lists "BF16" in the CPU
plugin's OPTIMIZATION_CAPABILITIES) the plugin can run an IR's unquantized ops in bf16 (the session's
INFERENCE_PRECISION_HINT, which the runtime takes from the artifact kind). Measured on the demo
MiniLM SST-2 model (AMD Zen 4, 2 threads, 32x128): the fp32 graph ran 2.2x faster in bf16 than
fused in f32, with 1 of 4,872 answers changed, NNCF's static INT8 1.5x faster than in f32. Two kinds, each with its
own files:

- `bf16-openvino`: the fp32 ONNX graph as an OpenVINO IR (weights kept fp32), run in bf16;
- `int8-openvino-bf16`: a copy of `int8-openvino`'s NNCF static INT8 IR, what is not quantized
  run in bf16; static scales, so it may start a cascade (`ArtifactKind.first_stage`);
- `int8-openvino-fast-bf16`: the same for `int8-openvino-fast` (the ladder's fastest
  batch-invariant recipe, built for a cascade's stage 1), where export built one.

Both are gated like every lossy artifact (metric, agreement, batch invariance). bf16 is not
batch-invariant at the default --invariance-tol 1e-5 (on the demo a text's probabilities moved
by up to 1.9e-3, 4.0e-4 for the INT8 IR, between alone, in a batch and padded), so they normally
fail that gate, and their files are removed unless a cascade starts with them; with a looser
--invariance-tol (e.g. 5e-3) they can pass. They are built with the OpenVINO candidates (not with
--openvino off or --quantize none) where OpenVINO is installed and runs bf16; elsewhere the
report's warnings say why not.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from bertedge.runtime import sessions
from bertedge.toolchain.export.args import Quantization
from bertedge.toolchain.export.gate import BuildContext
from bertedge.toolchain.export.report import ArtifactReport

BF16 = "bf16"


def wanted(ctx: BuildContext) -> bool:
    """The options ask for OpenVINO's lossy candidates (not --openvino off, not --quantize none)."""
    return ctx.args.openvino != "off" and ctx.args.quantize is not Quantization.NONE


def why_not() -> str | None:
    """Why this machine cannot build the bf16 candidates, or None when it can."""
    if sessions.openvino_version() is None:
        return "OpenVINO is not installed: pip install 'bertedge[openvino]'"
    if not sessions.openvino_runs(BF16):
        return ("this CPU has no bf16 in OpenVINO (no BF16 among the CPU plugin's OPTIMIZATION_CAPABILITIES; "
                "it needs AVX512_BF16, AMX or AVX2-VNNI-2)")
    return None


def can_build(ctx: BuildContext, name: str) -> bool:
    """True when kind `name` may be built here; else False, with the reason in the report's warnings."""
    if not wanted(ctx):
        return False
    why = why_not()
    if why is not None:
        ctx.report.warnings.append(f"{name}: not built ({why})")
    return why is None


def build_bf16_openvino(ctx: BuildContext) -> list[ArtifactReport]:
    """model-bf16-openvino.xml + .bin: model.onnx as an OpenVINO IR, gated as run in bf16."""
    name = "bf16-openvino"
    if not can_build(ctx, name):
        return []
    return [gated(ctx, name, "model.onnx as an OpenVINO IR, unquantized ops in bf16",
                  lambda: to_ir(ctx.path("fp32"), ctx.path(name)))]


def build_int8_openvino_bf16(ctx: BuildContext) -> list[ArtifactReport]:
    """model-int8-openvino-bf16.xml + .bin: a copy of int8-openvino's IR, gated as run in bf16
    (left out when int8-openvino kept no IR)."""
    return bf16_copy(ctx, "int8-openvino-bf16", "int8-openvino")


def build_int8_openvino_fast_bf16(ctx: BuildContext) -> list[ArtifactReport]:
    """model-int8-openvino-fast-bf16.xml + .bin: a copy of int8-openvino-fast's IR (the ladder's
    fastest batch-invariant recipe, built for a cascade's stage 1), gated as run in bf16; left out
    when export built no int8-openvino-fast (no cascade, or the kept recipe is already the fastest:
    then int8-openvino-bf16 is this)."""
    if ctx.report.artifact("int8-openvino-fast") is None:
        return []
    return bf16_copy(ctx, "int8-openvino-fast-bf16", "int8-openvino-fast")


def bf16_copy(ctx: BuildContext, name: str, base: str) -> list[ArtifactReport]:
    """Kind `name`: a copy of NNCF IR `base`, gated as run in bf16 (left out when `base` kept no IR)."""
    if not can_build(ctx, name):
        return []
    source = ctx.report.artifact(base)
    if source is None or not source.file:
        ctx.report.warnings.append(f"{name}: not built (it runs {base}'s IR, which this export did not keep)")
        return []

    def copy() -> None:
        for src, dst in zip(ir_files(ctx.path(base)), ir_files(ctx.path(name)), strict=True):
            shutil.copyfile(src, dst)

    report = gated(ctx, name, f"{base}'s NNCF static INT8 IR, unquantized ops in bf16", copy)
    report.quantization = {**(source.quantization or {}), "inference_precision": BF16}
    return [report]


def gated(ctx: BuildContext, name: str, notes: str, write: Callable[[], None]) -> ArtifactReport:
    """Write kind `name`'s files, then validate and time it (in its own inference precision); a
    failed one stays only while a cascade may start with it (`stage.build` removes it unless one
    does). When OpenVINO cannot convert or compile it in bf16, the row says so and the export goes on."""
    try:
        write()
        report = ctx.validate(name, notes=notes)
    except Exception as e:  # OpenVINO's errors are RuntimeError subclasses (or BertedgeError from the session)
        for path in ir_files(ctx.path(name)):
            path.unlink(missing_ok=True)
        report = ArtifactReport.of_kind(name)
        report.file = ""
        report.notes = f"not built: OpenVINO failed in bf16 ({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
        return report
    if not report.passed and report.file:
        ctx.tentative.add(name)
    return report


def to_ir(onnx_file: Path, xml: Path) -> None:
    """Write `xml` (+ `.bin` beside it): the ONNX graph as an OpenVINO IR, weights kept fp32."""
    import openvino as ov

    ov.save_model(ov.Core().read_model(str(onnx_file)), str(xml), compress_to_fp16=False)


def ir_files(xml: Path) -> tuple[Path, Path]:
    """An IR's graph and its weights beside it."""
    return xml, xml.with_suffix(".bin")
