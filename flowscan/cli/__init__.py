"""The `flowscan` command. Commands are thin: parse options, call the library, print."""

from __future__ import annotations

import click

from flowscan import __version__
from flowscan.cli.analyze import analyze
from flowscan.cli.inspect import formats, inspect
from flowscan.cli.landscape import lmc, sharpness
from flowscan.cli.produce import produce
from flowscan.cli.stats import aggregate, compare, fit, plot, report, table


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowscan")
def main() -> None:
    """RG-flow analysis of iterative magnitude pruning (IMP) checkpoints."""


main.add_command(analyze)
main.add_command(inspect)
for command in (formats, aggregate, fit, compare, table, plot, report, produce, lmc, sharpness):
    main.add_command(command)
