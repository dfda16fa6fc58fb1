"""The INT8 candidates: onnxruntime's ladders (dynamic, static QDQ) and NNCF's for OpenVINO.

Both run through one loop, `bertedge.toolchain.quantize.search`: each recipe is built, validated
and timed by the gate; the search keeps the fastest passer (or stops at the first, for the
ladders ordered fastest first); every attempt becomes a `CandidateRow` of the report's INT8
search table, the agreement / speed curve of every recipe tried.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import artifact_kind
from bertedge.toolchain import quantize as q
from bertedge.toolchain.export.args import Quantization
from bertedge.toolchain.export.compare import Feeds, rows
from bertedge.toolchain.export.gate import BuildContext, ort_runner, size_mb
from bertedge.toolchain.export.graphs import fuse_without_attention
from bertedge.toolchain.export.report import ArtifactReport, CandidateRow


def build_int8(ctx: BuildContext) -> list[ArtifactReport]:
    """model-int8.onnx: the dynamic ladder, from the best fp32 graph (with --quantize dynamic)."""
    if ctx.args.quantize is not Quantization.DYNAMIC:
        return []
    return [onnxruntime_ladder(ctx, "int8", ctx.best_fp())]


def build_int8_static(ctx: BuildContext) -> list[ArtifactReport]:
    """model-int8-static.onnx: the static ladder (--quantize static), or beside dynamic INT8 one
    calibrated QDQ recipe (static scales are batch-invariant by construction) when --calibration is given.

    Static QDQ quantization of the fused graph fails in onnxruntime 1.32 (Attention has no QDQ
    support and the classifier bias loses its scale), so static starts from model.onnx.
    """
    args = ctx.args
    if args.quantize is Quantization.STATIC:
        return [onnxruntime_ladder(ctx, "int8-static", "fp32")]
    if args.quantize is Quantization.DYNAMIC and ctx.calibration:
        static = q.Int8Config(q.Method.STATIC, per_channel=True, operators=("MatMul",), calibrate=args.calibrate_method)
        return [onnxruntime_ladder(ctx, "int8-static", "fp32", config=static)]
    return []


def onnxruntime_ladder(ctx: BuildContext, name: str, base_name: str,
                       config: q.Int8Config | None = None) -> ArtifactReport:
    """The INT8 search for kind `name` from the graph of kind `base_name`; `config`: that recipe only.

    Every candidate of the ladder is validated and (when it passes) timed; the fastest passer
    wins. When no batch-invariant candidate passes (or with --search-all), the sensitivity
    search keeps the most error-prone nodes of the per-token recipe in fp32, fewest first.
    """
    import onnx

    args, out = ctx.args, ctx.out
    method = q.Method(args.quantize.value) if config is None else config.method
    # Static QDQ of every op type clips the additive attention mask (-10000) to the calibrated
    # range, so padding leaks into attention and answers change with batch mates: MatMul only.
    operators = args.int8_operators or (("MatMul",) if method is q.Method.STATIC else ())
    base = config or q.Int8Config(method, args.per_channel, args.reduce_range, operators,
                                  calibrate=args.calibrate_method)
    optimization = "fused" if base_name == "fused" else "none"

    def check(path: Path, recipe: q.Int8Config) -> ArtifactReport:
        report = ArtifactReport.of_kind(name, optimization)
        report.quantization, report.size_mb = recipe.to_dict(), round(path.stat().st_size / 1e6, 3)
        return ctx.ref.check(report, ort_runner(path, threads=args.threads), lossy=artifact_kind(name).lossy)

    src = ctx.path(base_name)
    ladder = [base] if config is not None else q.distinct(q.candidates(base), onnx.load(str(src)))
    unfused = out / ".model-unfused-attention.onnx"  # removed below: not an artifact
    if base_name == "fused" and any(c.activations is q.Activations.PER_TOKEN for c in ladder):
        fuse_without_attention(ctx.source.info, ctx.path("fp32"), unfused)

    def source(recipe: q.Int8Config) -> Path:
        return unfused if recipe.activations is q.Activations.PER_TOKEN and unfused.is_file() else src

    def guided(result: q.SearchResult[q.Int8Config, ArtifactReport]) -> Iterator[q.Int8Config]:
        seed = next((c for c in ladder if c.activations is q.Activations.PER_TOKEN), None)
        invariant_passed = any(a.passed and a.config.batch_invariant for a in result.attempts)
        if seed is None or not args.sensitivity or args.max_fp32_nodes == 0 or (invariant_passed and not args.search_all):
            return
        seed_src = source(seed)
        table = q.sensitivity(seed_src, seed, q.touched_nodes(onnx.load(str(seed_src)), seed), ctx.ref.output_error,
                              out, seconds=args.sensitivity_seconds)
        ctx.report.sensitivity.extend(table)
        ranked = [r.node for r in table if r.gain > 0]
        k = 1
        while ranked and k <= min(args.max_fp32_nodes, len(ranked)):
            yield replace(seed, fp32_nodes=tuple(ranked[:k]))
            k *= 2

    try:
        # The dynamic ladder is three recipes of similar cost: validate and time them all. The
        # static ladder falls back to ever more fp32, so it stops at its first passer.
        every = method is q.Method.DYNAMIC or args.search_all
        result = q.search(source, ctx.path(name), ladder, check, ctx.calibration, search_all=every,
                          extend=guided if config is None else None)
    finally:
        unfused.unlink(missing_ok=True)
    return outcome(ctx, name, optimization, result)


def build_openvino(ctx: BuildContext) -> list[ArtifactReport]:
    """NNCF's static INT8 run by OpenVINO (`bertedge.toolchain.openvino_int8`): validated and timed
    through the runtime's OpenVINO session like any artifact; its ladder stops at the first passer."""
    from bertedge.toolchain import openvino_int8 as ov

    args = ctx.args
    if args.openvino == "off" or args.quantize is Quantization.NONE:
        return []
    if not ctx.calibration:
        if args.openvino == "auto":
            ctx.report.warnings.append("int8-openvino: not tried (needs --calibration texts)")
        return []
    why_not = ov.missing()
    if why_not is not None:
        if args.openvino == "on":
            raise BertedgeError(f"--openvino on: {why_not}", "pip install 'bertedge[openvino]', or pass --openvino off")
        return []
    from bertedge.runtime.sessions import openvino_version

    name, version = "int8-openvino", openvino_version()
    src, dst = ctx.path("fp32"), ctx.path(name)
    unpadded = rows(ctx.calibration)  # one per call: NNCF collects statistics per row
    ranked = [r.node for r in ctx.report.sensitivity if r.gain > 0]
    recipes = ov.recipes(src, len(unpadded), ranked, args.max_fp32_nodes if args.sensitivity else 0)

    def check(path: Path, recipe: ov.Recipe) -> ArtifactReport:
        report = ArtifactReport.of_kind(name)
        report.quantization = {**recipe.to_dict(), "openvino": version}
        report.size_mb = ov.size_mb(path)
        return ctx.ref.check(report, ort_runner(path, threads=args.threads, engine=report.engine),
                             lossy=artifact_kind(name).lossy)

    def build(source: Path, path: Path, recipe: ov.Recipe, calibration: Sequence[Feeds]) -> None:
        ov.quantize(source, path, calibration, recipe)

    result = q.search(src, dst, recipes, check, unpadded, build=build)
    ctx.searches[name] = result
    artifact = outcome(ctx, name, "none", result, extra={"openvino": version})
    invariant = artifact.batch_invariance is not None and artifact.batch_invariance.passed
    if not artifact.passed and artifact.file and args.cascade and invariant:
        ctx.tentative.add(name)  # a cascade may start with it: `stage.build` removes it unless one does
    elif not artifact.passed and artifact.file:  # a failed IR is not kept: nothing should package it
        ov.remove(dst)
        artifact.file, artifact.notes = "", f"{artifact.notes}; files removed"
    return [artifact]


def build_openvino_fast(ctx: BuildContext) -> list[ArtifactReport]:
    """int8-openvino-fast: the OpenVINO ladder keeps its most faithful recipe, but a cascade's stage 1
    wants its fastest batch-invariant one (later stages fix what it gets wrong). When a cascade may
    be built and the two differ, that recipe is built again and gated like any artifact; when it
    fails the budgets alone it stays only while a cascade may start with it."""
    from bertedge.runtime.sessions import openvino_version
    from bertedge.toolchain import openvino_int8 as ov

    result = ctx.searches.get("int8-openvino")
    if result is None or not ctx.args.cascade:
        return []
    invariant = [(a.verdict.cost_ms, i) for i, a in enumerate(result.attempts)
                 if a.verdict is not None and a.verdict.cost_ms and a.verdict.batch_invariance is not None
                 and a.verdict.batch_invariance.passed]
    if not invariant:
        return []
    fastest = min(invariant)[1]
    kept = ctx.report.artifact("int8-openvino")
    if fastest == result.chosen and kept is not None and kept.file:
        return []  # the kept IR is already the fastest batch-invariant one
    recipe: ov.Recipe = result.attempts[fastest].config
    name = "int8-openvino-fast"
    ov.quantize(ctx.path("fp32"), ctx.path(name), rows(ctx.calibration), recipe)
    report = ctx.validate(name, notes=f"the int8-openvino ladder's fastest batch-invariant recipe ({recipe.label()})")
    report.quantization = {**recipe.to_dict(), "openvino": openvino_version()}
    if not report.passed and report.file:
        ctx.tentative.add(name)  # `stage.build` removes it unless a cascade starts with it
    return [report]


def outcome(ctx: BuildContext, name: str, optimization: str, result: q.SearchResult[Any, ArtifactReport],
            extra: dict[str, object] | None = None) -> ArtifactReport:
    """Record every attempt in the search table; the chosen attempt's verdict is the artifact."""
    tried = [CandidateRow.of(a.config.label(), {**a.config.to_dict(), **(extra or {})}, a.verdict, a.error, a.seconds)
             for a in result.attempts]
    ctx.report.int8_search.extend(tried)
    if result.chosen is None:
        report = ArtifactReport.of_kind(name, optimization)
        report.notes = "every INT8 candidate failed to build: " + "; ".join(str(t.error) for t in tried)
        report.file = ""
        return report
    chosen = result.attempts[result.chosen]
    assert chosen.verdict is not None
    report = chosen.verdict
    report.size_mb = size_mb(ctx.out, name) or report.size_mb
    report.notes = "; ".join(x for x in (report.notes, search_note(result)) if x)
    return report


def search_note(result: q.SearchResult[Any, ArtifactReport]) -> str:
    """How the kept candidate was chosen, for the artifact's notes."""
    assert result.chosen is not None
    label = result.attempts[result.chosen].config.label()
    tried = len(result.attempts)
    if result.passed:
        return f"chosen '{label}': the fastest passer (candidate {result.chosen + 1} of {tried} tried)"
    return f"no candidate met the budget; kept the highest-agreement one '{label}' of {tried} tried"
