"""`sts`: one command, a subcommand per tool, every option from the shared groups (cli/options.py)."""
from __future__ import annotations

import click

from sts_export import __version__
from sts_export.cli.bench import main as bench
from sts_export.cli.export import main as export
from sts_export.cli.options import CONTEXT, ENVIRONMENT
from sts_export.cli.run import main as run
from sts_export.cli.serve import main as serve
from sts_export.cli.show import main as show
from sts_export.cli.tools import check, ort_form, selftest


@click.group(context_settings=CONTEXT, epilog=ENVIRONMENT)
@click.version_option(__version__, prog_name="sts")
def main() -> None:
    """sts-export: vision-language models to ONNX / TensorRT / AOTInductor with STS visual-token pruning inside the
    graphs. `sts COMMAND --help` for each command."""


for command in (export, run, bench, show, serve, check, selftest, ort_form):
    main.add_command(command)
