"""The `bertedge` command line: options -> dataclass -> stage function -> printed result.

Heavy modules (torch, transformers, fastapi) are imported inside each command so that `--help`
and `predict` start fast. Commands live by stage (`train`, `ship`, `run`); the option groups
several of them share are decorators in `common`.
"""

from __future__ import annotations

import click

from bertedge import __version__
from bertedge.cli.common import THREADS_HELP, runtime_from, runtime_options, user_errors
from bertedge.cli.run import bench, predict, serve
from bertedge.cli.ship import export_cmd, package
from bertedge.cli.train import distill, finetune, models


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


for command in (finetune, distill, models, export_cmd, package, predict, serve, bench):
    cli.add_command(command)


def main() -> None:
    cli()


__all__ = ["THREADS_HELP", "cli", "main", "runtime_from", "runtime_options", "user_errors"]
