"""Options shared by the scanning commands, turned into a `pipeline.Options`."""

from __future__ import annotations

import functools
import shlex
import sys

import click


def command_line() -> str:
    """The command as typed, for table metadata and reports (from Python: the parsed parameters)."""
    ctx = click.get_current_context()
    if sys.argv[1:2] == [ctx.info_name]:  # `flowscan CMD ...` or `python -m flowscan CMD ...`
        return shlex.join(["flowscan", *sys.argv[1:]])
    words = ["flowscan", *ctx.command_path.split()[1:]]
    for name, value in ctx.params.items():
        for v in value if isinstance(value, tuple) else (value,):
            if v not in (None, False):
                words += [f"--{name.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return shlex.join(words)

BLOCKS_HELP = ("Block rule, repeatable, tried in order: a preset (see `flowscan formats`), "
               "LABEL=REGEX, or REGEX (label = first capture group). Default: detect a preset.")


def scan_options(command):
    @click.option("--blocks", "blocks", multiple=True, metavar="RULE", help=BLOCKS_HELP)
    @click.option("--format", "format_", metavar="NAME", help="Force a reader instead of auto-detecting.")
    @click.option("--select", metavar="PREFIX", help="Only tensors under PREFIX (e.g. encoder_q), prefix removed.")
    @click.option("--strip-model-prefix", is_flag=True, help="Drop a leading 'model.' from tensor names.")
    @click.option("--infer-masks", is_flag=True,
                  help="Infer masks from exact zeros of 2+-D tensors that have no stored mask.")
    @functools.wraps(command)
    def wrapper(*args, blocks, format_, select, strip_model_prefix, infer_masks, **kwargs):
        from flowscan.blocks import BlockRules
        from flowscan.errors import FlowscanError
        from flowscan.readers import registry
        from flowscan.readers.base import NameOptions

        try:
            if format_:
                registry.get(format_)
            rules = BlockRules.parse(blocks)
        except FlowscanError as exc:
            raise click.BadParameter(str(exc)) from None
        scan = dict(blocks=rules, names=NameOptions(strip_model_prefix, select),
                    format=format_, infer_masks=infer_masks)
        return command(*args, scan=scan, **kwargs)
    return wrapper
