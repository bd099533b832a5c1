"""`flowscan inspect PATH` and `flowscan formats`: what would be analysed, without any math."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flowscan.cli.options import scan_options


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@scan_options
def inspect(path: Path, scan: dict) -> None:
    """List runs, formats, rounds, prunable tensors and their blocks."""
    from flowscan import pipeline, summary
    from flowscan.errors import FlowscanError

    options = pipeline.Options(**scan)
    try:
        runs = pipeline.find_runs(path, options)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    items = [pipeline.inspect_run(run, options) for run in runs]
    click.echo(summary.inspection_text(items))
    if any(item.error for item in items):
        sys.exit(1)


@click.command()
def formats() -> None:
    """List checkpoint formats (readers) and block presets."""
    from flowscan.blocks import PRESETS
    from flowscan.readers import registry

    click.echo("formats (auto-detected in this order; force one with --format):")
    for reader in registry.all_readers():
        click.echo(f"  {reader.name:<14} {reader.description}")
    click.echo("block presets (--blocks NAME):")
    for preset in PRESETS.values():
        click.echo(f"  {preset.name:<22} {preset.description}")
