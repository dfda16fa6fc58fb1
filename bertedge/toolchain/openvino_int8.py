"""INT8 for the OpenVINO engine: NNCF post-training quantization of the fp32 ONNX graph.

OpenVINO reads the fp32 ONNX graph; NNCF (OpenVINO's compression library) calibrates static
activation scales on the user's texts (`model_type=TRANSFORMER`: SmoothQuant, fast bias
correction, the attention patterns it knows to leave alone) and inserts FakeQuantize ops, which
OpenVINO's CPU plugin runs as INT8 kernels: on Intel CPUs with VNNI a BERT encoder runs faster at
batch 32 than with onnxruntime's INT8. Static scales make the answer independent of batch mates.

The artifact is an OpenVINO IR (`model-int8-openvino.xml` + `.bin`). Measured on the demo model
(Intel Xeon, AVX-512 VNNI, 2 threads), NNCF's ONNX backend (a QDQ `.onnx` that OpenVINO reads)
ran 15% slower at 32x128 than this path, so the bundle carries the IR and names the engine
(`bertedge.runtime.sessions`). When the first recipe misses the budget, the next ones keep more
matrix multiplies in fp32 (`recipes`): the attention products, the FFN output projections, then
the sensitivity table's nodes; the last rung quantizes the weights only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Feeds = dict[str, np.ndarray]
NNCF_ALPHA = 0.95  # NNCF's SmoothQuant alpha for MatMuls with model_type=TRANSFORMER


def missing() -> str | None:
    """Why the OpenVINO candidate cannot be built here, or None when `bertedge[openvino]` is installed."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        return f"the OpenVINO engine needs '{e.name}' (pip install 'bertedge[openvino]')"
    return None


@dataclass(frozen=True)
class Recipe:
    """One NNCF recipe: static INT8 (calibration subset, nodes kept in fp32), or INT8 weights only.

    `weights_only`: `nncf.compress_weights` (INT8 per-channel symmetric weights, no calibration);
    the matrix multiplies run in fp32 on weights decompressed in cache (the session turns
    OpenVINO's dynamic activation quantization off: it picks kernels by batch size, which moved
    probabilities by 3e-3 between a text alone and in a batch). Slower than static INT8, but on
    the demo model it kept 99.66% of the answers where static kept 99.31%.

    `smooth_quant`: SmoothQuant's alpha for the MatMuls (NNCF's transformer default: 0.95), the
    share of each activation channel's range moved into the weights before per-tensor scales
    are set. The ladder keeps NNCF's: on the demo model alpha 0.8 changed fewer dev answers over
    four calibration draws (5.0 against 7.0 of 872) but not fewer held-out ones (22.5 against
    21.5 of 4,000; `benchmarks/smoothquant_alpha.py`), so a rung at 0.8 would only be a second
    draw at the eval set's luck. No smoothing (12-15) and alpha 0.5 (10-16) changed more dev answers.
    """

    subset_size: int = 300
    fp32_nodes: tuple[str, ...] = ()
    weights_only: bool = False
    kept: tuple[str, ...] = ()  # what the fp32 nodes are, for the report: "attention products", ...
    smooth_quant: float = NNCF_ALPHA

    def label(self) -> str:
        if self.weights_only:
            return "nncf INT8 weights only (fp32 activations)"
        what = f": {' + '.join(self.kept)}" if self.kept else ""
        kept = f", {len(self.fp32_nodes)} MatMuls kept fp32{what}" if self.fp32_nodes else ""
        alpha = f", SmoothQuant alpha {self.smooth_quant:g}" if self.smooth_quant != NNCF_ALPHA else ""
        return f"nncf static INT8 (transformer{alpha}{kept})"

    def to_dict(self) -> dict[str, object]:
        if self.weights_only:
            return {"method": "weights-only", "library": "nncf", "engine": "openvino",
                    "weights": "per-channel symmetric", "activations": "fp32"}
        return {"method": "static", "library": "nncf", "engine": "openvino", "weights": "per-channel symmetric",
                "activations": "per-tensor static", "calibration_rows": self.subset_size,
                "smooth_quant_alpha": self.smooth_quant, "fp32_nodes": list(self.fp32_nodes), "fp32_groups": list(self.kept)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF's progress bars and INFO lines off (export prints its own table); telemetry off."""
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's switch for its telemetry (no network use on an edge box)
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def quantize(src: Path, dst: Path, rows: Sequence[Feeds], recipe: Recipe) -> None:
    """Write `dst` (.xml, weights in .bin beside it): `src` (an fp32 ONNX graph) with NNCF's
    static INT8, calibrated on `rows`."""
    with _quiet():
        import nncf
        import openvino as ov

        model = ov.Core().read_model(str(src))
        if recipe.weights_only:
            compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
            ov.save_model(compressed, str(dst), compress_to_fp16=False)
            return
        names = {p.get_any_name() for p in model.inputs}
        data = [{k: v for k, v in r.items() if k in names} for r in rows]
        kwargs: dict[str, Any] = {}
        if recipe.smooth_quant != NNCF_ALPHA:
            from nncf.quantization.advanced_parameters import (
                AdvancedQuantizationParameters,
                AdvancedSmoothQuantParameters,
            )

            kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=recipe.smooth_quant))
        if recipe.fp32_nodes:
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(recipe.fp32_nodes), validate=False)
        quantized = nncf.quantize(model, nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=min(recipe.subset_size, len(data)), **kwargs)
        ov.save_model(quantized, str(dst), compress_to_fp16=False)


def size_mb(xml: Path) -> float:
    """Megabytes of an IR: graph plus weights."""
    return round(sum(p.stat().st_size for p in (xml, xml.with_suffix(".bin")) if p.is_file()) / 1e6, 3)


def remove(xml: Path) -> None:
    """Delete an IR's two files."""
    for p in (xml, xml.with_suffix(".bin")):
        p.unlink(missing_ok=True)


def fp32_groups(src: Path) -> dict[str, list[str]]:
    """The MatMul groups the ladder keeps in fp32, as OpenVINO names them, from one read of `src`.

    - "attention products": the MatMuls with no weight (query x key, scores x value). Their two
      activation inputs get per-tensor static scales; on the demo model, over six calibration
      draws, keeping these twelve in fp32 changed 3-9 of 872 answers where full static INT8
      changed 6-9, and at 25 tokens it ran faster (no FakeQuantize ops). On a QA model at 158+
      tokens it was not batch-invariant (3e-3): the invariance gate decides.
    - "FFN output projections": the MatMul after each GELU, whose outliers a per-tensor scale
      handles worst (99.43% on the demo model, at twice the static recipe's time at 32x25).
    """
    import openvino as ov

    attention, ffn = [], []
    for op in ov.Core().read_model(str(src)).get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        feeds = [op.input_value(i).get_node().get_type_name() for i in (0, 1)]
        if "Constant" not in feeds and "Convert" not in feeds:
            attention.append(op.get_friendly_name())
        elif feeds[1] == "Constant" and feeds[0] in ("Multiply", "Gelu"):
            ffn.append(op.get_friendly_name())
    return {"attention products": attention, "FFN output projections": ffn}


def recipes(src: Path, rows: int, ranked: Sequence[str] = (), max_fp32_nodes: int = 8) -> list[Recipe]:
    """The ladder, fastest first (export stops at the first passer), each rung keeping more in fp32:
    NNCF's static transformer recipe; the attention products in fp32; the FFN output projections
    too; as many of the sensitivity table's nodes (most error first) as `max_fp32_nodes` allows;
    INT8 weights only.

    `max_fp32_nodes=0` leaves out the recipes that keep nodes in fp32.
    """
    size = min(300, rows)
    ladder = [Recipe(size)]
    if max_fp32_nodes:
        nodes: tuple[str, ...] = ()
        kept: tuple[str, ...] = ()
        for group, names in fp32_groups(src).items():
            if names:
                nodes, kept = nodes + tuple(names), (*kept, group)
                ladder.append(Recipe(size, nodes, kept=kept))
        extra = [n for n in ranked if n not in nodes][:max_fp32_nodes]
        if extra:
            ladder.append(Recipe(size, nodes + tuple(extra), kept=(*kept, f"{len(extra)} most sensitive")))
    return [*ladder, Recipe(weights_only=True)]
