"""`flowscan lmc` and `flowscan sharpness`: Paul et al.'s error-landscape analyses of an archive."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from flowscan.cli.options import command_line



def model_options(command):
    @click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
    @click.option("--model", help="Model (flowscan name or package.module:function); default: from produce's manifest.")
    @click.option("--data", "data_spec", metavar="NAME[:ARG]", help="Dataset; default: from produce's manifest.")
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--select", metavar="PREFIX", help="Only tensors under PREFIX, prefix removed.")
    @click.option("--strip-model-prefix", is_flag=True, help="Drop a leading 'model.' from tensor names.")
    @click.option("--format", "format_", metavar="NAME", help="Force a reader.")
    @functools.wraps(command)
    def wrapper(path, out, model, data_spec, device, select, strip_model_prefix, format_, **kwargs):
        from flowscan.landscape.analysis import Setup
        from flowscan.readers.base import NameOptions

        setup = Setup(model, data_spec, device, NameOptions(strip_model_prefix, select), format_)
        return command(path, out, setup, **kwargs)
    return wrapper


def _write(frames: dict, out: Path, source: Path) -> None:
    from flowscan import tables

    tables.write_tables(frames, out, tables.metadata(command_line(), "", source=str(Path(source).resolve())))
    click.echo(f"written: {', '.join(str(out / f'{name}.parquet') for name in frames)}")


@click.command()
@model_options
@click.option("--points", type=click.IntRange(2), default=11, show_default=True, help="Points on [0, 1].")
@click.option("--tolerance", type=click.FloatRange(0), default=0.01, show_default=True,
              help="Matching: test error within this of the dense network's.")
@click.option("--bn-batches", type=click.IntRange(1), default=20, show_default=True,
              help="Training batches to re-estimate BatchNorm statistics at each alpha.")
def lmc(path, out, setup, points, tolerance, bn_batches) -> None:
    """Error along the line between successive rounds, and its barrier -> lmc*.parquet."""
    from flowscan.errors import FlowscanError
    from flowscan.landscape.analysis import lmc_tables
    from flowscan.plot import figures, save

    try:
        curves, summary = lmc_tables(path, setup, points, tolerance, bn_batches, progress=click.echo)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    _write({"lmc": curves, "lmc_summary": summary}, out, path)
    if summary.height:
        save(figures.lmc_barriers(summary), out / "figures" / "lmc-barrier")
        for run in summary["run"].unique(maintain_order=True):
            save(figures.lmc_curves(curves, run), out / "figures" / f"lmc-curves-{figures.slug(run)}")


@click.command()
@model_options
@click.option("--subset", type=click.IntRange(1), default=512, show_default=True,
              help="Training examples the Hessian is taken over (fixed).")
@click.option("--tol", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True,
              help="Relative change of the eigenvalue estimate that ends the power iteration.")
@click.option("--max-iter", type=click.IntRange(1), default=100, show_default=True)
@click.option("--probe", "probe", metavar="F1,F2,...",
              help="Also prune each fraction from every round, retrain, and record which stay matching.")
@click.option("--tolerance", type=click.FloatRange(0), default=0.01, show_default=True,
              help="With --probe: matching = test error within this of the dense network's.")
def sharpness(path, out, setup, subset, tol, max_iter, probe, tolerance) -> None:
    """Top Hessian eigenvalue of the training loss per round -> sharpness.parquet."""
    from flowscan.errors import FlowscanError
    from flowscan.landscape.analysis import probe_fractions, sharpness_table
    from flowscan.plot import figures, save

    try:
        frames = {"sharpness": sharpness_table(path, setup, subset, tol, max_iter, progress=click.echo)}
        if probe:
            frames["fraction_probe"] = probe_fractions(path, [float(f) for f in probe.split(",")], tolerance,
                                                       setup.device)
    except (FlowscanError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _write(frames, out, path)
    save(figures.sharpness_plot(frames["sharpness"], frames.get("fraction_probe")), out / "figures" / "sharpness")
