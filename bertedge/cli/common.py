"""What several commands share: one-line user errors, list parsing, and the option groups
(data columns, training recipe, runtime options) as decorators over one dataclass each."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

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
