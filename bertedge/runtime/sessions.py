"""The one place that opens onnxruntime sessions: providers, options, threads, fallback warning, feed plan.

Runtime, bench, export and bundle all build their sessions here, so a provider alias, a thread
setting or the CPU-fallback warning means the same thing in every stage. Torch-free.
"""

from __future__ import annotations

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
        return [CUDA, CPU] if CUDA in available else [CPU]
    wanted = [PROVIDER_ALIASES.get(n.lower(), n) for n in names] or [CPU]
    missing = [p for p in wanted if p not in available]
    if missing:
        gpu_hint = " (install onnxruntime-gpu for CUDA)" if CUDA in missing else ""
        raise BertedgeError(
            f"execution provider {', '.join(missing)} is not available in this onnxruntime "
            f"(available: {', '.join(available)})",
            f"use --providers cpu or auto{gpu_hint}")
    return list(dict.fromkeys([*wanted, CPU]))


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
                 spin: bool = True) -> ort.InferenceSession:
    """An onnxruntime session; warns when a requested accelerator silently fell back to CPU.

    Args:
        model: the .onnx file.
        providers: provider names (or (name, options) tuples), most preferred first.
        threads: intra-op threads (None or 0: onnxruntime picks one per physical core).
        optimize: apply onnxruntime's graph optimizations (off: read the graph as written).
        fix: what the error tells the user to do when the file cannot be loaded.
        spin: let idle intra-op threads busy-wait (onnxruntime's default; see `session_options`).

    Raises:
        BertedgeError: onnxruntime cannot load or initialise the model.
    """
    try:
        session = ort.InferenceSession(str(model), session_options(threads, optimize, spin),
                                       providers=list(providers))
    except Exception as e:  # onnxruntime raises untyped errors (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BertedgeError(f"onnxruntime cannot load '{model.name}' ({first})", fix) from None
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    lost = [p for p in names if p not in session.get_providers()]
    if lost:
        warnings.warn(f"onnxruntime could not use {', '.join(lost)} and fell back to "
                      f"{', '.join(session.get_providers())}; check the CUDA / cuDNN install",
                      RuntimeWarning, stacklevel=3)
    return session


def feed_plan(session: ort.InferenceSession) -> dict[str, tuple[str, type]]:
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

