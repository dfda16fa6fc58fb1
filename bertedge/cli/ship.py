"""`bertedge export` and `package`: validated ONNX / OpenVINO artifacts, then a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bertedge.cli.common import columns_from, csv_list, data_options, user_errors


@click.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Export folder to create.")
@click.option("--opt", type=click.Choice(["fused", "none"]), default="fused", show_default=True,
              help="Also write a graph fused by onnxruntime's transformer optimizer.")
@click.option("--quantize", type=click.Choice(["dynamic", "static", "none"]), default="dynamic", show_default=True,
              help="INT8 variant: dynamic, or static QDQ calibrated on --calibration.")
@click.option("--fp16", is_flag=True, help="Also write an FP16 graph for the CUDA execution provider.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset (14..20).")
@click.option("--calibration", type=click.Path(path_type=Path), help="Texts for static calibration (.csv/.tsv/.jsonl).")
@click.option("--calibration-rows", default=200, show_default=True, help="Calibration rows drawn from --calibration.")
@click.option("--agreement-data", type=click.Path(path_type=Path),
              help="Unlabelled texts the agreement budget also counts, beside --eval (calibration rows left out).")
@click.option("--agreement-rows", default=2000, show_default=True, help="Rows drawn from --agreement-data.")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help="Labelled file: metric of every artifact vs PyTorch.")
@click.option("--max-eval-rows", default=0, show_default=True, help="Seeded subset of --eval (0 = all rows).")
@data_options
@click.option("--max-accuracy-drop", default=0.5, show_default=True, help="INT8/FP16 budget in metric points (with --eval).")
@click.option("--min-agreement", default=0.995, show_default=True,
              help="Share of PyTorch's answers INT8/FP16 must keep (labels, NER tokens, QA spans), with or without --eval.")
@click.option("--batch-invariance/--no-batch-invariance", default=True, show_default=True,
              help="Require the same answer for a text alone, in a batch of 32 and padded (INT8/FP16).")
@click.option("--invariance-tol", default=1e-5, show_default=True, help="Max |probability difference| for batch invariance.")
@click.option("--target", "targets", default="", help="Shapes to time every artifact at, e.g. 1x32,32x128 "
              "(default: batch 1 and 32 at the data's median length); the fastest passer is recommended.")
@click.option("--timing-seconds", default=None, type=float,
              help="Timed seconds per artifact and shape (default: $BERTEDGE_TIMING_SECONDS, else 1).")
@click.option("--timing-rounds", default=3, show_default=True,
              help="The artifacts that passed are timed again side by side in this many rounds (0: off).")
@click.option("--threads", default=0, show_default=True, help="Intra-op threads while timing (0: onnxruntime picks).")
@click.option("--footprint/--no-footprint", default=None,
              help="Measure each artifact's cold start and peak RSS in a fresh process, ~1 s each "
                   "(default: $BERTEDGE_FOOTPRINT, else on).")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
              help="When no batch-invariant INT8 passes, keep the most error-prone nodes in fp32.")
@click.option("--max-fp32-nodes", default=8, show_default=True, help="Most nodes the sensitivity search keeps in fp32.")
@click.option("--sensitivity-seconds", default=600.0, show_default=True,
              help="Cap on the sensitivity probing (one quantization per node, from the output backwards).")
@click.option("--calibrate-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="Static INT8 calibration (a static candidate is tried whenever --calibration is given).")
@click.option("--openvino", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Also try NNCF static INT8 on the OpenVINO engine (auto: when bertedge[openvino] is "
                   "installed and --calibration is given; on: required), and where the CPU runs bf16, "
                   "bf16-openvino, int8-openvino-bf16 and int8-openvino-fast-bf16.")
@click.option("--cascade/--no-cascade", default=True, show_default=True,
              help="Also build a cascade: static INT8 answers the texts it is sure of, a more faithful "
                   "artifact the rest (delta calibrated on --eval / --agreement-data rows).")
@click.option("--draft", type=click.Path(path_type=Path), default=None,
              help="A distilled student's export folder: its artifact becomes the cascade's first stage "
                   "(then this model's static INT8, then a faithful artifact).")
@click.option("--per-channel", is_flag=True, help="Start the INT8 search with per-channel weight scales.")
@click.option("--reduce-range", is_flag=True, help="Start the INT8 search with 7-bit weights.")
@click.option("--int8-ops", default="", help="Op types to quantize, e.g. MatMul,Attention (default: onnxruntime's set).")
@click.option("--search-all", is_flag=True, help="Also run the sensitivity search when a candidate already passed.")
@click.option("--require-int8", is_flag=True, help="Fail (non-zero exit, no folder) when no INT8 candidate passes.")
@click.option("--atol", default=1e-3, show_default=True, help="Max |output diff| for the fp32 and fused graphs.")
@click.option("--batch-size", default=32, show_default=True, help="Validation batch size.")
@click.option("--seed", default=0, show_default=True, help="Seed for random inputs and row subsets.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="Also package the recommended artifact as a bundle here (folder, or .tar.gz / .zip).")
@user_errors
def export_cmd(**opts: Any) -> None:
    """Export MODEL_DIR to validated ONNX: fp32, fused, INT8 (with accuracy budget), FP16.

    \b
    Examples:
      bertedge export runs/model --out runs/export --eval dev.csv
      bertedge export runs/model --out runs/export-static --quantize static --calibration train.csv
      bertedge export runs/model --out runs/export --bundle runs/bundle.tar.gz
    \b
    Writes model*.onnx, tokenizer/config files and export-report.json; `recommended` names the
    fastest artifact (timed at --target) that passed validation: PyTorch parity for fp32/fused;
    for INT8, the metric budget, the agreement budget and batch invariance.
    """
    from rich.console import Console

    from bertedge.toolchain.export import (
        ExportArgs,
        Optimization,
        Quantization,
        export,
        parse_targets,
        render,
    )
    from bertedge.toolchain.export.args import default_footprint, default_timing_seconds
    from bertedge.toolchain.export.plot import TRADEOFF_FILE

    report = export(ExportArgs(
        model_dir=opts["model_dir"], out=opts["out"], optimization=Optimization(opts["opt"]),
        quantize=Quantization(opts["quantize"]), fp16=opts["fp16"], opset=opts["opset"],
        calibration=opts["calibration"], calibration_rows=opts["calibration_rows"],
        agreement_data=opts["agreement_data"], agreement_rows=opts["agreement_rows"], eval_file=opts["eval_"],
        max_eval_rows=opts["max_eval_rows"],
        columns=columns_from(opts["text_column"], opts["text_pair_column"], opts["label_column"]),
        max_accuracy_drop=opts["max_accuracy_drop"], min_agreement=opts["min_agreement"],
        per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
        int8_operators=tuple(csv_list(opts["int8_ops"])), search_all=opts["search_all"],
        require_int8=opts["require_int8"], atol=opts["atol"], batch_size=opts["batch_size"],
        batch_invariance=opts["batch_invariance"], invariance_tol=opts["invariance_tol"],
        targets=parse_targets(opts["targets"]),
        timing_seconds=default_timing_seconds() if opts["timing_seconds"] is None else opts["timing_seconds"],
        timing_rounds=opts["timing_rounds"], threads=opts["threads"],
        footprint=default_footprint() if opts["footprint"] is None else opts["footprint"],
        sensitivity=opts["sensitivity"], max_fp32_nodes=opts["max_fp32_nodes"],
        sensitivity_seconds=opts["sensitivity_seconds"],
        calibrate_method=opts["calibrate_method"], openvino=opts["openvino"], cascade=opts["cascade"],
        draft=opts["draft"], seed=opts["seed"],
        overwrite=opts["overwrite"],
    ))
    console = Console()  # the terminal's width; 80 columns in a log
    for table in render(report):
        console.print(table)
    if (opts["out"] / TRADEOFF_FILE).is_file():
        click.echo(f"trade-off picture: {opts['out'] / TRADEOFF_FILE}")
    click.echo(f"gate: {report.gate}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"recommended: {report.recommended}  ->  {opts['out']}/export-report.json")
    if opts["bundle"] is not None:
        from bertedge.runtime.bundle import PackageArgs, package

        bundle = package(PackageArgs(export_dir=opts["out"], out=opts["bundle"], overwrite=opts["overwrite"]))
        click.echo(f"bundle: {bundle.root}  digest: {bundle.digest}")


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Bundle folder, or archive file when it ends in .tar.gz / .zip.")
@click.option("--artifact", default=None, help="Artifact name from export-report.json (default: the recommended one).")
@click.option("--archive", type=click.Choice(["tar.gz", "zip"]), default=None,
              help="Ship one archive file instead of a folder (default: from the --out suffix).")
@click.option("--force", is_flag=True, help="Package an artifact that failed or skipped validation.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder or archive at --out.")
@user_errors
def package(export_dir: Path, out: Path, artifact: str | None, archive: str | None, force: bool,
            overwrite: bool) -> None:
    """Package an export as a bundle: model.onnx + tokenizer.json + manifest.json (checksums).

    \b
    Examples:
      bertedge package runs/export --out runs/bundle
      bertedge package runs/export --out runs/bundle.tar.gz --artifact fp32
    """
    from bertedge.runtime.bundle import ArchiveFormat, PackageArgs
    from bertedge.runtime.bundle import package as run

    bundle = run(PackageArgs(export_dir=export_dir, out=out, artifact=artifact, force=force,
                             archive=ArchiveFormat(archive) if archive else None, overwrite=overwrite))
    m = bundle.manifest
    click.echo(f"packaged artifact '{m.artifact}' ({m.precision}, {m.task}, "
               f"{len(m.labels)} labels, max length {m.max_length})")
    click.echo(f"bundle written to {bundle.root}")
    click.echo(f"digest: {bundle.digest}  (pin it: bertedge predict|serve BUNDLE --expect-digest DIGEST)")
