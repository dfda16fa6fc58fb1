"""The one place that opens inference sessions: engine, providers, options, threads, fallback
warning, feed plan.

Runtime, bench, export and bundle all build their sessions here, so a provider alias, a thread
setting or the CPU-fallback warning means the same thing in every stage. Two engines run the same
`.onnx` file: onnxruntime (the default, always installed) and OpenVINO (`bertedge[openvino]`,
faster INT8 on Intel CPUs), behind the same three calls (`get_inputs`, `get_outputs`, `run`).
Torch-free.
"""

from __future__ import annotations

import importlib.metadata
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bertedge.errors import BertedgeError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_ALIASES = {
    "cpu": CPU, "cuda": CUDA, "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider", "rocm": "ROCMExecutionProvider",
}
# Graph input name -> which tokenizer array feeds it (old TF-style exports use the second names).
FEED_SOURCES = {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids",
                "input_mask": "attention_mask", "segment_ids": "token_type_ids"}
ONNX_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
ENGINES = (ONNXRUNTIME, OPENVINO)
F32 = "f32"
# OpenVINO inference precision -> the CPU plugin's OPTIMIZATION_CAPABILITIES entry that runs it natively
OV_CAPABILITIES = {"bf16": "BF16", "f16": "FP16"}
OV_TYPES = {"i64": "tensor(int64)", "i32": "tensor(int32)", "f32": "tensor(float)", "f16": "tensor(float16)"}
# The GPU build replaces the CPU one (pyproject's [gpu] extra pins the same version: the newest
# onnxruntime-gpu on the index). Both wheels ship the `onnxruntime` module, so the fix removes both
# before installing one: installed side by side, whichever wrote its files last is the one imported.
ORT_GPU = "onnxruntime-gpu==1.31.1"
GPU_INSTALL = f"pip uninstall -y onnxruntime onnxruntime-gpu && pip install {ORT_GPU}"
DEBUG_INFO = "python -c 'import onnxruntime; onnxruntime.print_debug_info()'"


# ----------------------------------------------------------------------------- providers


def resolve_providers(requested: str | Sequence[str] | None,
                      available: Sequence[str] | None = None) -> list[str]:
    """Execution providers to ask for: explicit list > CUDA when asked and available > CPU.

    >>> resolve_providers(None, [CPU])
    ['CPUExecutionProvider']
    >>> resolve_providers("auto", [CPU]), resolve_providers("auto", [CUDA, CPU])
    (['CPUExecutionProvider'], ['CUDAExecutionProvider', 'CPUExecutionProvider'])
    >>> resolve_providers(["cuda"], [CUDA, CPU])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    available = list(available if available is not None else ort.get_available_providers())
    parts = [requested] if isinstance(requested, str) else list(requested or ["cpu"])
    names = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    if [n.lower() for n in names] == ["auto"]:
        if CUDA in available:
            return [CUDA, CPU]
        if shadowed_gpu_build():
            warnings.warn(f"providers 'auto' runs on the CPU: {_build_text()}; to use CUDA, "
                          f"{GPU_INSTALL}", RuntimeWarning, stacklevel=2)
        return [CPU]
    wanted = [PROVIDER_ALIASES.get(n.lower(), n) for n in names] or [CPU]
    missing = [p for p in wanted if p not in available]
    if missing:
        cuda_fix = (f"for CUDA, install onnxruntime's GPU build in place of the CPU one: {GPU_INSTALL}; "
                    if CUDA in missing else "")
        raise BertedgeError(
            f"execution provider {', '.join(missing)} is not available in this onnxruntime "
            f"({_build_text()}; available: {', '.join(available)})",
            f"{cuda_fix}or use --providers cpu or auto")
    return list(dict.fromkeys([*wanted, CPU]))


def shadowed_gpu_build() -> str | None:
    """The version of an installed `onnxruntime-gpu` whose module the CPU build overwrote, if any.

    Both wheels install the `onnxruntime` folder: `pip install 'bertedge[gpu]'` alone leaves both
    distributions listed and imports whichever wrote its files last.
    """
    if getattr(ort, "package_name", "onnxruntime") == "onnxruntime-gpu":
        return None
    try:
        return importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def _build_text() -> str:
    """Which onnxruntime is imported, for messages about a provider it lacks."""
    name = getattr(ort, "package_name", "onnxruntime")
    text = f"{name} {ort.__version__}" + (", the CPU build" if name == "onnxruntime" else "")
    gpu = shadowed_gpu_build()
    return text + (f"; onnxruntime-gpu {gpu} is installed too, but the CPU build's files replaced "
                   "its module" if gpu else "")


def _fallback_fix(lost: Sequence[str]) -> str:
    """What to check when a session silently dropped the providers in `lost`."""
    if CUDA not in lost:
        return f"check that provider's libraries ({DEBUG_INFO} lists what onnxruntime finds)"
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime has no CUDA provider ({_build_text()}); to use CUDA, {GPU_INSTALL}"
    cuda = getattr(ort, "cuda_version", "") or "?"
    return (f"{getattr(ort, 'package_name', 'onnxruntime')} {ort.__version__} needs an NVIDIA driver and the CUDA {cuda} and "
            f"cuDNN libraries it was built for on the library path ({DEBUG_INFO} lists what it finds)")


def session_options(threads: int | None, optimize: bool = True, spin: bool = True) -> ort.SessionOptions:
    """ORT_ENABLE_ALL (or no graph rewrites), `threads` intra-op threads, one inter-op, sequential.

    `spin=False` lets idle intra-op threads sleep instead of busy-waiting for the next run: on
    cores shared with a server's event loop and its clients, spinning threads steal them.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = int(threads or 0)  # 0: onnxruntime picks (physical cores)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def make_session(model: Path, providers: Sequence[Any] = (CPU,), threads: int | None = None,
                 optimize: bool = True, fix: str = "rebuild the bundle with `bertedge package`",
                 spin: bool = True, engine: str = ONNXRUNTIME, inference_precision: str = F32) -> Any:
    """An inference session on `model`; warns when a requested accelerator silently fell back to CPU.

    Args:
        model: the .onnx file.
        providers: provider names (or (name, options) tuples), most preferred first (onnxruntime).
        threads: intra-op threads (None or 0: the engine picks one per physical core).
        optimize: apply onnxruntime's graph optimizations (off: read the graph as written).
        fix: what the error tells the user to do when the file cannot be loaded.
        spin: let idle intra-op threads busy-wait (onnxruntime's default; see `session_options`).
        engine: "onnxruntime" (an `ort.InferenceSession`) or "openvino" (an `OpenVINOSession`
            on the CPU; `providers`, `optimize` and `spin` do not apply).
        inference_precision: what OpenVINO runs unquantized ops in, the artifact kind's
            (`bertedge.runtime.artifacts.inference_precision`): "f32" or "bf16" (onnxruntime: f32).

    Raises:
        BertedgeError: an unknown engine, a missing OpenVINO install, or the engine cannot load
            or initialise the model.
    """
    if engine == OPENVINO:
        return OpenVINOSession(model, threads, fix, inference_precision)
    if engine != ONNXRUNTIME:
        raise BertedgeError(f"unknown engine {engine!r} (this bertedge runs {', '.join(ENGINES)})",
                            "upgrade bertedge, or rebuild the bundle with `bertedge package`")
    try:
        session = ort.InferenceSession(str(model), session_options(threads, optimize, spin),
                                       providers=list(providers))
    except Exception as e:  # onnxruntime raises untyped errors (Fail, InvalidGraph, ...)
        raise BertedgeError(f"onnxruntime cannot load '{model.name}' ({_first_line(e)})", fix) from None
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    lost = [p for p in names if p not in session.get_providers()]
    if lost:
        warnings.warn(f"onnxruntime could not use {', '.join(lost)} and fell back to "
                      f"{', '.join(session.get_providers())}: {_fallback_fix(lost)}",
                      RuntimeWarning, stacklevel=3)
    return session


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class _Node:
    """What the runtime reads of a graph input or output: its name and ONNX-style type."""

    def __init__(self, name: str, type_: str) -> None:
        self.name, self.type = name, type_


def openvino_version() -> str | None:
    """The installed OpenVINO runtime's version, or None when `bertedge[openvino]` is absent."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.get_version()).split("-")[0]


def openvino_config(threads: int | None, inference_precision: str = F32) -> dict[str, Any]:
    """The CPU plugin settings of every `OpenVINOSession` (benchmarks profile with the same).

    Latency hint, one stream, `inference_precision` for everything not quantized (f32, so a CPU
    with bf16 units does not silently lower it, unless the artifact kind is a bf16 one), `threads`
    inference threads (None or 0: OpenVINO picks), and dynamic activation quantization off: the
    CPU plugin applies it to INT8-weight MatMuls by batch size, so a text's probabilities moved by
    3e-3 between alone and in a batch.

    >>> openvino_config(2, "bf16")["INFERENCE_PRECISION_HINT"], openvino_config(None)["INFERENCE_PRECISION_HINT"]
    ('bf16', 'f32')
    """
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision,
                              "NUM_STREAMS": 1, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def openvino_runs(inference_precision: str, core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin runs `inference_precision` natively on this CPU (f32 always;
    bf16 where the plugin lists "BF16" in OPTIMIZATION_CAPABILITIES: AVX512_BF16, AMX or AVX2-VNNI-2).

    Asked for bf16 without it, the plugin emulates bf16 on AVX-512 CPUs (slower than f32) and
    quietly runs f32 on AVX2 ones; `OpenVINOSession` compiles f32 there and says so instead.
    """
    wanted = OV_CAPABILITIES.get(inference_precision)
    if wanted is None:
        return True
    if core is None:
        import openvino as ov

        core = ov.Core()
    return wanted in {str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


_told_f32: set[str] = set()  # precisions this process already warned it runs in f32 instead


def _runnable_precision(inference_precision: str, core: Any) -> str:
    """`inference_precision` when this CPU runs it, else f32 with one warning per process."""
    if openvino_runs(inference_precision, core):
        return inference_precision
    if inference_precision not in _told_f32:
        _told_f32.add(inference_precision)
        warnings.warn(f"this CPU has no {inference_precision} support in OpenVINO, so the {inference_precision} "
                      "artifact runs in f32 here: slower than export measured, answers closer to fp32 than it "
                      "validated", RuntimeWarning, stacklevel=4)
    return F32


class OpenVINOSession:
    """An OpenVINO CPU model behind the calls the runtime makes of an onnxruntime session.

    The model (an OpenVINO IR `.xml`, or an `.onnx` file through OpenVINO's ONNX frontend) is
    compiled for the CPU with a latency hint, `threads` inference threads, the artifact kind's
    `inference_precision` for everything not quantized (f32 unless the kind is a bf16 one, so a
    CPU with bf16 units does not silently lower it; bf16 on a CPU without bf16 runs f32, with a
    warning) and no dynamic activation quantization (see `openvino_config`). Each thread gets its
    own infer request, so `run` is thread-safe.
    """

    def __init__(self, model: Path, threads: int | None = None,
                 fix: str = "rebuild the bundle with `bertedge package`", inference_precision: str = F32) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BertedgeError(f"'{model.name}' runs on the OpenVINO engine, which is not installed",
                                "pip install 'bertedge[openvino]' (or package an onnxruntime artifact)") from None
        try:
            core = ov.Core()
            graph = core.read_model(str(model))
            self.inference_precision = _runnable_precision(inference_precision, core)
            self.compiled = core.compile_model(graph, "CPU", openvino_config(threads, self.inference_precision))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line texts
            raise BertedgeError(f"OpenVINO cannot load '{model.name}' ({_first_line(e)})", fix) from None
        # Names from the model as read: a compiled output can carry extra internal tensor names
        # (e.g. '/model/classifier/MatMul_output_0' beside 'logits'), in the same port order.
        self._inputs = [_Node(p.get_any_name(), OV_TYPES.get(p.get_element_type().get_type_name(), "?"))
                        for p in graph.inputs]
        self._outputs = [_Node(p.get_any_name(), OV_TYPES.get(p.get_element_type().get_type_name(), "?"))
                         for p in graph.outputs]
        self._ports = {o.name: i for i, o in enumerate(self._outputs)}
        self._local = threading.local()

    def get_inputs(self) -> list[_Node]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Node]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return ["OpenVINO:CPU"]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs (all when None) for one batch of feeds, as numpy copies."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({n: np.ascontiguousarray(v) for n, v in feeds.items()})
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        return [np.array(request.get_output_tensor(self._ports[n]).data) for n in names]


def feed_plan(session: Any) -> dict[str, tuple[str, type]]:
    """Graph input name -> (tokenizer array, dtype); DistilBERT simply has no token_type_ids."""
    plan: dict[str, tuple[str, type]] = {}
    unknown: list[str] = []
    for node in session.get_inputs():
        if node.name in FEED_SOURCES and node.type in ONNX_INT_TYPES:
            plan[node.name] = (FEED_SOURCES[node.name], ONNX_INT_TYPES[node.type])
        else:
            unknown.append(f"{node.name} ({node.type})")
    if unknown or "input_ids" not in plan:
        raise BertedgeError(f"the model's graph inputs {', '.join(unknown) or '(no input_ids)'} "
                            "are not BERT-style token inputs",
                            "package an ONNX model made by `bertedge export`")
    return plan

