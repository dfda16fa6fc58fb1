"""The `bertedge` command line: options -> dataclass -> stage function -> printed result.

Heavy modules (torch, transformers) are imported inside each command so that `--help` and
`predict` start fast.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bertedge import __version__
from bertedge.errors import BertedgeError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn BertedgeError into a one-line click error with a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BertedgeError as e:
            raise click.ClickException(str(e)) from None

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


def main() -> None:
    cli()
