"""`flowscan lmc` and `flowscan sharpness`: Paul et al.'s error-landscape analyses of an archive."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from flowscan.cli.app import app_options, device_option
from flowscan.cli.options import command_line, requires, writable_output


def model_options(command):
    @click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
                  default=Path("flowscan-out"), show_default=True,
                  help="Folder for the tables and figures (use analyze's, so that they join).")
    @click.option("--model", help="Model (a flowscan or open_lth name, or package.module:function); default: from "
                                   "the archive (produce's manifest, open_lth's hparams.log, the tensor names).")
    @click.option("--data", "data_spec", metavar="NAME[:ARG]",
                  help="Dataset, e.g. mnist:DIR or cifar10:DIR; default: from produce's manifest. Normalized as the "
                       "archive's recipe did (open_lth's, Chen et al.'s), which is printed and recorded.")
    @click.option("--accuracy-tolerance", type=click.FloatRange(0, 1), default=0.02, show_default=True,
                  help="Largest difference between the test accuracy the archive records for a round and the one "
                       "measured before anything is computed (a larger one stops: wrong model, data or "
                       "preprocessing).")
    @device_option
    @click.option("--select", metavar="PREFIX", help="Only tensors under PREFIX, prefix removed.")
    @click.option("--strip-model-prefix", is_flag=True, help="Drop a leading 'model.' from tensor names.")
    @click.option("--format", "format_", metavar="NAME", help="Force a reader instead of auto-detecting.")
    @click.option("--runs", "runs", metavar="PATTERN",
                  help="Only runs whose name (as analyze names them) matches this shell pattern, e.g. 'seed_*'.")
    @click.option("--rounds", "rounds", metavar="SPEC",
                  help="Only these rounds, e.g. 0-4,8,12- (round 0 is still read for the dense error).")
    @functools.wraps(command)
    def wrapper(path, out, model, data_spec, accuracy_tolerance, device, select, strip_model_prefix, format_,
                runs, rounds, **kwargs):
        writable_output(out)
        from flowscan.errors import FlowscanError
        from flowscan.landscape.analysis import Setup
        from flowscan.landscape.selection import RoundSpec
        from flowscan.train.trainer import resolve_device
        from flowscan.readers.base import NameOptions

        try:
            spec = RoundSpec.parse(rounds)
        except FlowscanError as exc:
            raise click.BadParameter(str(exc), param_hint="--rounds") from None
        setup = Setup(model, data_spec, str(resolve_device(device)), NameOptions(strip_model_prefix, select),
                      format_, accuracy_tolerance, runs, spec)
        return command(path, out, setup, **kwargs)
    return wrapper


def _write(frames: dict, figures: dict, out: Path, source: Path, app) -> None:
    """The results on stdout, the tables (tagged with the archive they come from), then the
    figures; lists every file."""
    from flowscan import summary, tables
    from flowscan.plot import save

    app.result(summary.landscape_text(frames))

    app.wrote(tables.write_tables(frames, out, tables.metadata(command_line(), "",
                                                               source=str(Path(source).resolve()))))
    for name, fig in figures.items():
        app.wrote(save(fig, out / "figures" / name))


@click.command()
@requires("torch")
@model_options
@click.option("--points", type=click.IntRange(2), default=11, show_default=True, help="Points on [0, 1].")
@click.option("--tolerance", type=click.FloatRange(0), default=0.01, show_default=True,
              help="Matching: test error within this of the dense network's.")
@click.option("--bn-batches", type=click.IntRange(1), default=20, show_default=True,
              help="Training batches to re-estimate BatchNorm statistics at each alpha.")
@click.option("--path", "path_kind", type=click.Choice(["linear", "projected"]), default="linear",
              show_default=True, help="linear: Paul et al.'s path, each end with its own mask; projected: the "
                                      "interior masked with round n+1's mask (measures pruning damage).")
@app_options()
def lmc(path, out, setup, points, tolerance, bn_batches, path_kind, app) -> None:
    """Error along the line between successive rounds, and its barrier -> lmc*.parquet."""
    from flowscan.errors import FlowscanError
    from flowscan.landscape.analysis import lmc_tables
    from flowscan.plot import figures

    try:
        curves, summary = lmc_tables(path, setup, points, tolerance, bn_batches, progress=app.note,
                                     path_kind=path_kind, warn=app.warn)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    plots = {}
    if summary.height:
        plots["lmc-barrier"] = figures.lmc_barriers(summary)
        for run in summary["run"].unique(maintain_order=True):
            plots[f"lmc-curves-{figures.slug(run)}"] = figures.lmc_curves(curves, run)
    _write({"lmc": curves, "lmc_summary": summary}, plots, out, path, app)


@click.command()
@requires("torch")
@model_options
@click.option("--subset", type=click.IntRange(1), default=512, show_default=True,
              help="Training examples the Hessian is taken over (fixed).")
@click.option("--tol", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True,
              help="Relative change of the eigenvalue estimate that ends the power iteration.")
@click.option("--max-iter", type=click.IntRange(1), default=100, show_default=True,
              help="Most power iterations per round.")
@click.option("--probe", "probe", metavar="F1,F2,...",
              help="Also prune each fraction from every round of every run, retrain as the run was trained "
                   "(produce and open_lth runs), and record which stay matching (fraction_probe.parquet).")
@click.option("--tolerance", type=click.FloatRange(0), default=0.01, show_default=True,
              help="With --probe: matching = test error within this of the dense network's.")
@app_options()
def sharpness(path, out, setup, subset, tol, max_iter, probe, tolerance, app) -> None:
    """Top Hessian eigenvalue of the training loss per round -> sharpness.parquet."""
    from flowscan.errors import FlowscanError
    from flowscan.landscape.analysis import probe_fractions, probe_runs, sharpness_table
    from flowscan.plot import figures

    try:
        fractions = [float(f) for f in probe.split(",")] if probe else []
    except ValueError:
        raise click.BadParameter(f"expected fractions like 0.2,0.4, got {probe!r}", param_hint="--probe") from None
    if any(not 0 < f < 1 for f in fractions):
        raise click.BadParameter("fractions must lie strictly between 0 and 1", param_hint="--probe")
    try:
        if fractions:
            probe_runs(path, setup)   # every run can be probed: checked before the Hessian work
        frames = {"sharpness": sharpness_table(path, setup, subset, tol, max_iter, progress=app.note)}
        if fractions:
            frames["fraction_probe"] = probe_fractions(path, fractions, tolerance, setup, progress=app.note)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    _write(frames, {"sharpness": figures.sharpness_plot(frames["sharpness"], frames.get("fraction_probe"))},
           out, path, app)
