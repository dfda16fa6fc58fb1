"""The fp32 graph family: the ONNX export itself, the fused graph, FP16, and the fused graph less
its Attention fusion (the base of per-token INT8)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bertedge.runtime.meta import ModelMeta
from bertedge.toolchain.export.compare import feed
from bertedge.toolchain.export.source import SUPPORTED_MODEL_TYPES, Source, tokenize


def _traceable(model: Any, input_names: Sequence[str], output_names: Sequence[str]) -> Any:
    """The module the exporter traces: positional inputs -> tuple of the task's named outputs."""
    import torch

    class Traceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(**dict(zip(input_names, args, strict=True)))
            return tuple(getattr(out, n) for n in output_names)

    # eval() matters: after tracing, the exporter restores this module's training flag on the whole tree
    return Traceable().eval()


def export_fp32(source: Source, path: Path, opset: int) -> None:
    """Export with torch.onnx.export(dynamo=False): dynamic batch and sequence axes.

    The legacy TorchScript exporter is what Optimum uses for BERT-family models and handles
    them reliably; torch 2.13 defaults to the dynamo exporter, so we ask for the legacy one.
    """
    import torch

    task = source.info.task
    dummy = tokenize(source.tokenizer, ["a short one", "a somewhat longer second example text"], None,
                     source.info.max_length, 2)[0]
    args = tuple(torch.from_numpy(feed(dummy, n)) for n in source.input_names)
    token_axes = {0: "batch", 1: "sequence"}
    axes = {n: token_axes for n in source.input_names}
    axes.update({n: token_axes if task.per_token_outputs else {0: "batch"} for n in task.output_names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; validation checks the result
        torch.onnx.export(
            _traceable(source.model, source.input_names, task.output_names), args, str(path),
            input_names=source.input_names, output_names=list(task.output_names),
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    source.model.eval()


def fuse(info: ModelMeta, src: Path, dst: Path) -> str:
    """Fuse attention / layer-norm / GELU subgraphs with onnxruntime's transformer optimizer."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type=SUPPORTED_MODEL_TYPES[info.model_type],
                           num_heads=info.num_heads, hidden_size=info.hidden_size)
    model.save_model_to_file(str(dst))
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    return "fused: " + ", ".join(f"{k} x{v}" for k, v in stats.items()) if stats else "no subgraph was fused"


def to_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and compute with fp32 inputs/outputs (keep_io_types), for CUDA."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))


def fuse_without_attention(info: ModelMeta, src: Path, dst: Path) -> None:
    """The fused graph less the Attention fusion: the base of per-token INT8.

    A fused Attention quantizes to QAttention, which takes one activation scale for the whole
    batch; left as MatMuls, the Q/K/V projections can be quantized per token.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = SUPPORTED_MODEL_TYPES[info.model_type]
    options = FusionOptions(kind)
    options.enable_attention = False
    model = optimize_model(str(src), model_type=kind, num_heads=info.num_heads, hidden_size=info.hidden_size,
                           optimization_options=options)
    model.save_model_to_file(str(dst))
