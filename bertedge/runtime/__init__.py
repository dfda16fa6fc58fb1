"""The torch-free runtime: what ships to the edge box.

Everything under `bertedge.runtime` imports only the stdlib, numpy, onnxruntime and tokenizers
(`tests/test_runtime.py` checks that torch and transformers stay out of `sys.modules`):

    bundle     the packaged format: verified model.onnx + tokenizer.json + manifest.json
    meta       model metadata (task, labels, max length, stride, model type, positions)
    sessions   the one place onnxruntime sessions are built
    records    input records: formats, lines, decoding, pairs, ids (both predict engines)
    tasks      one record per task: reading, encoding, targets, metric, decoding
    predictor  `Predictor`: bundle -> tokenizer + session + the task's decoder
    predict    the `bertedge predict` command's local engine

The build side (`bertedge.toolchain`: finetune, export, quantize, bench) imports from here, never
the other way round. The edges (`bertedge.edges`: serve, ray) are thin transport on `Predictor`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Predictor": "bertedge.runtime.predictor",
    "LatencyRecorder": "bertedge.runtime.latency",
    "LatencyReport": "bertedge.runtime.latency",
    "PredictArgs": "bertedge.runtime.predict",
    "run_predict": "bertedge.runtime.predict",
}


def __getattr__(name: str) -> Any:
    """`from bertedge.runtime import Predictor` without importing onnxruntime for the submodules."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bertedge.runtime' has no attribute '{name}'")


__all__ = list(_EXPORTS)
