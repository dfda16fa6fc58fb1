"""Artifact kinds as data: the one table export, bench, package, the bundle and serve all read.

An artifact kind is what `bertedge export` can build into its folder (an fp32 ONNX graph, a
fused one, an INT8 one, an OpenVINO IR, ...). Each kind has one name, used everywhere: the
export report's `name`, `bertedge bench --backends`, `bertedge package --artifact` and the
bundle manifest's `artifact`. Adding a kind is one row here plus one build function in
`bertedge.toolchain.export.candidates`.

Torch-free: the runtime reads it to know an engine's bundle files.
"""

from __future__ import annotations

from dataclasses import dataclass

from bertedge.errors import BertedgeError

ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
CASCADE = "cascade"  # not an engine: a cascade's stages name theirs (`bertedge.runtime.cascade`)


@dataclass(frozen=True)
class Engine:
    """An inference engine the runtime can load a bundle with."""

    name: str
    bundle_files: tuple[str, ...]  # the model's files inside a bundle, graph first
    install: str  # what to install when its package is missing


ENGINES: dict[str, Engine] = {
    ONNXRUNTIME: Engine(ONNXRUNTIME, ("model.onnx",), "pip install bertedge"),
    OPENVINO: Engine(OPENVINO, ("model.xml", "model.bin"), "pip install 'bertedge[openvino]'"),
}


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact export builds; see the module docstring."""

    name: str  # the one name in reports, bench backends, package --artifact and manifests
    files: tuple[str, ...]  # its files in an export folder, graph first
    engine: str  # a key of ENGINES, or CASCADE (its files are a spec naming other kinds' files)
    precision: str  # "fp32", "fp16", "bf16" or "int8"
    lossy: bool  # judged by the metric and agreement budgets, not by the fp32 tolerance
    cpu_candidate: bool  # timed and recommendable on CPU (fp16 is a GPU artifact)
    description: str = ""
    first_stage: bool = False  # static scales (batch-invariant, the fastest INT8): may start a cascade
    inference_precision: str = "f32"  # OpenVINO's INFERENCE_PRECISION_HINT for what is not quantized: f32, bf16

    @property
    def graph(self) -> str:
        """The file a session opens (the first of `files`)."""
        return self.files[0]

    @property
    def bundle_files(self) -> tuple[str, ...]:
        """The names its files take inside a bundle (a cascade's: its stages', see `bertedge.runtime.stages`)."""
        return ENGINES[self.engine].bundle_files if self.engine in ENGINES else ()


ARTIFACT_KINDS: dict[str, ArtifactKind] = {k.name: k for k in (
    ArtifactKind("fp32", ("model.onnx",), ONNXRUNTIME, "fp32", False, True, "ONNX fp32"),
    ArtifactKind("fused", ("model-fused.onnx",), ONNXRUNTIME, "fp32", False, True,
                 "ONNX fp32 fused by onnxruntime's transformer optimizer"),
    ArtifactKind("int8", ("model-int8.onnx",), ONNXRUNTIME, "int8", True, True,
                 "onnxruntime INT8 (the ladder's winner: per-token, dynamic or static)"),
    ArtifactKind("int8-static", ("model-int8-static.onnx",), ONNXRUNTIME, "int8", True, True,
                 "onnxruntime static INT8 (QDQ, calibrated scales)", first_stage=True),
    ArtifactKind("int8-openvino", ("model-int8-openvino.xml", "model-int8-openvino.bin"), OPENVINO,
                 "int8", True, True, "NNCF static INT8, OpenVINO IR", first_stage=True),
    ArtifactKind("int8-openvino-fast", ("model-int8-openvino-fast.xml", "model-int8-openvino-fast.bin"), OPENVINO,
                 "int8", True, True, "the OpenVINO ladder's fastest batch-invariant recipe (a cascade's stage 1)",
                 first_stage=True),
    ArtifactKind("bf16-openvino", ("model-bf16-openvino.xml", "model-bf16-openvino.bin"), OPENVINO,
                 "bf16", True, True, "the fp32 graph as an OpenVINO IR, run in bf16 (CPUs with bf16 units)",
                 inference_precision="bf16"),
    ArtifactKind("int8-openvino-bf16", ("model-int8-openvino-bf16.xml", "model-int8-openvino-bf16.bin"), OPENVINO,
                 "int8", True, True, "int8-openvino's NNCF static INT8 IR, what is not quantized run in bf16",
                 first_stage=True, inference_precision="bf16"),
    ArtifactKind("int8-openvino-fast-bf16", ("model-int8-openvino-fast-bf16.xml", "model-int8-openvino-fast-bf16.bin"),
                 OPENVINO, "int8", True, True, "int8-openvino-fast's IR, what is not quantized run in bf16 "
                 "(a cascade's stage 1)", first_stage=True, inference_precision="bf16"),
    ArtifactKind("fp16", ("model-fp16.onnx",), ONNXRUNTIME, "fp16", True, False,
                 "ONNX fp16 (for the CUDA execution provider)"),
    ArtifactKind("cascade", ("cascade.json",), CASCADE, "int8", True, True,
                 "static INT8 answers the texts it is sure of, a more faithful artifact the rest"),
)}


def artifact_kind(name: str) -> ArtifactKind:
    """The kind called `name`, or one error naming the kinds there are.

    >>> artifact_kind("int8-openvino").bundle_files
    ('model.xml', 'model.bin')
    >>> artifact_kind("int3")
    Traceback (most recent call last):
    ...
    bertedge.errors.BertedgeError: unknown artifact kind 'int3' (known: fp32, fused, int8, int8-static, int8-openvino, int8-openvino-fast, bf16-openvino, int8-openvino-bf16, int8-openvino-fast-bf16, fp16, cascade) -- pick one of the known kinds
    """
    try:
        return ARTIFACT_KINDS[name]
    except KeyError:
        raise BertedgeError(f"unknown artifact kind {name!r} (known: {', '.join(ARTIFACT_KINDS)})",
                            "pick one of the known kinds") from None


def inference_precision(artifact: str | None) -> str:
    """What OpenVINO runs the artifact kind `artifact`'s unquantized ops in: the one place every
    session (bundle, cascade stage, export's gate, bench) takes it from; f32 for unknown names.

    >>> inference_precision("int8-openvino-bf16"), inference_precision("int8-openvino"), inference_precision(None)
    ('bf16', 'f32', 'f32')
    """
    kind = ARTIFACT_KINDS.get(artifact) if isinstance(artifact, str) else None
    return kind.inference_precision if kind is not None else "f32"


def engine(name: str | None) -> Engine:
    """The engine called `name` (a manifest without the field means onnxruntime).

    >>> engine(None).bundle_files, engine("openvino").bundle_files
    (('model.onnx',), ('model.xml', 'model.bin'))
    """
    key = name or ONNXRUNTIME
    if key not in ENGINES:
        raise BertedgeError(f"unknown engine {key!r} (known: {', '.join(ENGINES)})",
                            "re-run `bertedge package` with this version of bertedge")
    return ENGINES[key]
