"""`flowscan inspect PATH` and `flowscan formats`: what would be analysed, without any math."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flowscan.cli.app import app_options
from flowscan.cli.options import ARCHIVE, parallel_options, scan_options


@click.command()
@click.argument("path", type=ARCHIVE)
@scan_options
@parallel_options
@app_options(json_output=True)
def inspect(path: Path, scan: dict, jobs: int | None, engine: str, app) -> None:
    """List runs, formats, rounds, prunable tensors and their blocks."""
    from flowscan import engines, pipeline, summary
    from flowscan.errors import FlowscanError

    options = pipeline.Options(**scan, jobs=jobs or engines.default_jobs(), engine=engine)
    try:
        runs = pipeline.find_runs(path, options)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    n_rounds = sum(len(r.rounds) for r in runs if not r.error)
    with app.progress(n_rounds, "reading headers", lines=False) as step:
        items = pipeline.inspect_runs(runs, options, progress=step)
    app.result(summary.inspection_text(items))
    app.data(summary.inspection_data(items))
    for item in items:
        for warning in item.run.completeness_warnings():
            app.warn(f"run {item.run.name}: {warning}")
    if any(item.error for item in items):
        sys.exit(1)


@click.command()
@app_options(json_output=True)
def formats(app) -> None:
    """List checkpoint formats (readers) and block presets."""
    from flowscan.blocks import PRESETS
    from flowscan.io.location import store_status
    from flowscan.readers import registry
    from flowscan.reduce import kernel_status

    readers = {r.name: (r.description, reader_status(r)) for r in registry.all_readers()}
    lines = ["formats (auto-detected in this order; force one with --format):"]
    lines += [f"  {name:<14} {description} [{status}]" for name, (description, status) in readers.items()]
    lines.append("stores (PATH may be a local folder or a URL):")
    lines += [f"  {scheme:<14} {status}" for scheme, status in store_status().items()]
    lines.append("block presets (--blocks NAME):")
    lines += [f"  {preset.name:<22} {preset.description}" for preset in PRESETS.values()]
    lines.append(f"reduction: {kernel_status()}")
    app.result("\n".join(lines))
    app.data({"formats": {name: {"description": d, "status": st} for name, (d, st) in readers.items()},
              "stores": store_status(), "presets": {p.name: p.description for p in PRESETS.values()},
              "reduction": kernel_status()})


def reader_status(reader) -> str:
    """`ready` on this machine, or the packages it still needs and how to install them."""
    from flowscan import extras

    missing = [m for m in reader.needs if not extras.ready(m)]
    return "ready" if not missing else "; ".join(f"needs {m}: {extras.install_hint(m)}" for m in missing)
