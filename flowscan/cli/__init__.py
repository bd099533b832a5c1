"""The `flowscan` command. Commands are thin: parse options, call the library, print."""

from __future__ import annotations

import sys
import time

STARTED = time.monotonic()   # the command's own start (before torch and the rest are imported)
_INVOKED = False

import click  # noqa: E402 - after the clock

from flowscan import __version__, cpu
from flowscan.errors import terminal_safe

cpu.prefer_passive_waiting()   # before anything imports torch: see flowscan/cpu.py
from flowscan.cli.analyze import analyze
from flowscan.cli.inspect import formats, inspect
from flowscan.cli.landscape import lmc, sharpness
from flowscan.cli.produce import produce
from flowscan.cli.stats import aggregate, compare, fit, plot, report, table
from flowscan.cli.transfer import transfer

# what to tell a user who pressed Ctrl-C, for the commands that can pick up where they stopped
RESUME_HINTS = {
    "analyze": "run the same command again: rounds already read come from OUT/.cache",
    "produce": "run the same command again: it resumes after each seed's last complete round",
    "transfer": "run the same command again: it trains only what is not in OUT/transfer-runs yet",
}


class FlowscanGroup(click.Group):
    def invoke(self, ctx):
        global STARTED, _INVOKED
        if _INVOKED:   # a second command in this process (tests, scripts): its clock starts now
            STARTED = time.monotonic()
        _INVOKED = True
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:   # its message may hold names from the files scanned
            exc.message = terminal_safe(exc.message)
            raise
        except KeyboardInterrupt:
            hint = RESUME_HINTS.get(ctx.invoked_subcommand or "")
            if hint and "--no-cache" in sys.argv:   # nothing was cached: say so rather than promise it
                hint = "run the same command again (with --no-cache every round is read again)"
            click.echo("\ninterrupted" + (f"; {hint}" if hint else ""), err=True)
            ctx.exit(130)


@click.group(cls=FlowscanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowscan")
def main() -> None:
    """RG-flow analysis of iterative magnitude pruning (IMP) checkpoints."""


for command in (analyze, inspect, formats, aggregate, fit, compare, table, plot, report, produce, transfer, lmc,
                sharpness):
    main.add_command(command)
