"""Commands over the tables of an earlier `analyze`: aggregate, fit, compare, table."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from flowscan.cli.app import app_options
from flowscan.cli.options import command_line

OUT_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def grouping_options(command):
    @click.option("--group", "group_regex", metavar="REGEX",
                  help="Experiment = first capture group of REGEX on the run path (default: from the layout).")
    @click.option("--mapping", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="CSV/TOML mapping run -> experiment, task, architecture.")
    @functools.wraps(command)
    def wrapper(*args, group_regex, mapping, **kwargs):
        from flowscan.stats.groups import Grouping

        grouping = Grouping.from_file(mapping, group_regex) if mapping else Grouping(group_regex)
        return command(*args, grouping=grouping, **kwargs)
    return wrapper


def _fail(exc) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command()
@click.argument("out", type=OUT_DIR)
@grouping_options
@app_options()
def aggregate(out: Path, grouping, app) -> None:
    """Mean ± SEM across replicates per experiment -> experiments.parquet."""
    from flowscan import stats, summary, tables
    from flowscan.errors import FlowscanError

    try:
        t = tables.read_tables(out, ("runs", "eigen", "steps"))
    except FlowscanError as exc:
        raise _fail(exc) from None
    grouping = grouping.for_folder(out)
    experiments = stats.aggregate(t["eigen"], t["runs"], t["steps"], grouping)
    members = grouping.membership(t["runs"]["run"].to_list())
    meta = tables.metadata(command_line(), "", analysis_id=tables.current_id(out))
    written = tables.write_tables({"experiments": experiments, "experiment_runs": members}, out, meta)
    app.result(summary.experiments_text(experiments))
    app.wrote(written)


@click.command()
@click.argument("out", type=OUT_DIR)
@click.option("--metric", help="Metric to use (default per run: test_accuracy, best_sa, best_acc1, eval_acc, ...).")
@click.option("--metric-is-error", is_flag=True, help="The metric is already an error, not an accuracy.")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Fit points from a CSV with density,error[,run] instead of the tables.")
@click.option("--bootstrap", type=click.IntRange(0), default=200, show_default=True,
              help="Bootstrap resamples for gamma's interval (0: none).")
@click.option("--np-tolerance", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="eps_np may move this fraction away from the dense error.")
@click.option("--classes", type=click.IntRange(2), default=None,
              help="Classes of the task: eps_dagger (the error at maximal pruning) is bounded by the chance error "
                   "1 - 1/CLASSES (default: the n_classes produce records; else unbounded up to 1).")
@click.option("--eps-dagger", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="VALUE",
              help="Hold eps_dagger at VALUE instead of fitting it (e.g. the chance error).")
@grouping_options
@app_options(json_output=True)
def fit(out: Path, metric, metric_is_error, csv_path, bootstrap, np_tolerance, classes, eps_dagger, grouping,
        app) -> None:
    """Critical exponent gamma of error vs density (Redman et al. Eq. 15) -> scaling.parquet."""
    from flowscan import summary, tables
    from flowscan.errors import FlowscanError
    from flowscan.stats.critical import error_points, fit_scaling, read_points_csv, run_classes

    try:
        if csv_path:
            points = read_points_csv(csv_path)
            recorded = {}
        else:
            t = tables.read_tables(out, ("rounds", "metrics"))
            points = error_points(t["metrics"], t["rounds"], metric, metric_is_error)
            recorded = run_classes(t["metrics"])
    except FlowscanError as exc:
        raise _fail(exc) from None
    runs = points["run"].unique().to_list()
    per_run = {r: classes for r in runs} if classes else recorded
    if eps_dagger is not None:
        app.note(f"eps_dagger held at {eps_dagger:g} (--eps-dagger)")
    elif per_run:
        app.note("eps_dagger bounded by the chance error 1 - 1/classes ("
                 + ("--classes" if classes else "the n_classes the archive records") + ")")
    else:
        app.note("no number of classes known: eps_dagger may reach 1 (give --classes to bound it by chance)")
    scaling = fit_scaling(points, grouping.for_folder(out), progress=app.note, classes=per_run,
                          n_bootstrap=bootstrap, np_tolerance=np_tolerance, epsilon_dagger=eps_dagger)
    written = tables.write_tables({"scaling": scaling}, out,
                                  tables.metadata(command_line(), "", analysis_id=tables.current_id(out)))
    app.result(summary.scaling_text(scaling))
    app.data(scaling)
    app.wrote(written)


@click.command()
@click.argument("outs", nargs=-1, required=True, type=OUT_DIR)
@click.option("--level", type=click.Choice(["run", "experiment"]), default="run", show_default=True,
              help="Compare runs, or experiments (replicates pooled).")
@click.option("--quantity", type=click.Choice(["M", "P"]), default="M", show_default=True,
              help="Sigma of the magnitude share M or of the parameter share P.")
@click.option("--threshold", type=click.FloatRange(0, min_open=True), default=None,
              help="Classes: clusters whose average RMS sigma distance is below this (default: twice the "
                   "median distance the SEMs alone would give).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the table (default: FIRST_OUT/compare.parquet).")
@grouping_options
@app_options(json_output=True)
def compare(outs, level, quantity, threshold, output, grouping, app) -> None:
    """Distances between sigma vectors, relevance agreement and classes -> compare.parquet."""
    from flowscan import summary, tables
    from flowscan.errors import FlowscanError
    from flowscan.stats import compare as compare_units
    from flowscan.stats.loading import sigma_units

    try:
        sigmas = sigma_units(list(outs), level, quantity, grouping)
    except FlowscanError as exc:
        raise _fail(exc) from None
    from flowscan.plot import figures, save
    from flowscan.stats.compare import tree

    pairs, classes = compare_units(sigmas, threshold)
    dendrogram = tree(pairs, list(classes))
    output = output or outs[0] / "compare.parquet"
    meta = tables.metadata(command_line(), "", analysis_id=tables.current_id(outs[0]))
    written = tables.write_tables({output.stem: pairs, f"{output.stem}_tree": dendrogram}, output.parent, meta)
    app.result(summary.compare_text(pairs, classes))
    app.data({"classes": classes, "pairs": pairs, "tree": dendrogram})
    app.wrote(written)
    if dendrogram.height:
        threshold_used = float(pairs["threshold"][0])
        app.wrote(save(figures.dendrogram(dendrogram, list(classes), threshold_used),
                       output.parent / "figures" / f"{output.stem}-dendrogram"))


@click.command()
@click.argument("out", type=OUT_DIR)
@click.option("--style", type=click.Choice(["paper", "markdown"]), default="paper", show_default=True,
              help="Plain columns as in the paper, or a Markdown table.")
@click.option("--level", type=click.Choice(["run", "experiment"]), default="run", show_default=True,
              help="One row per run, or per experiment (replicates pooled).")
@click.option("--quantity", type=click.Choice(["M", "P"]), default="M", show_default=True,
              help="Sigma of the magnitude share M or of the parameter share P.")
@grouping_options
@app_options()
def table(out, style, level, quantity, grouping, app) -> None:
    """Sigma per block, one row per run or experiment, in the layout of the paper's tables."""
    from flowscan import summary
    from flowscan.errors import FlowscanError
    from flowscan.stats.loading import sigma_units

    try:
        sigmas = sigma_units([out], level, quantity, grouping)
    except FlowscanError as exc:
        raise _fail(exc) from None
    app.result(summary.paper_table(sigmas, style, unit=level))


@click.command()
@click.argument("out", type=OUT_DIR)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the figures (default: OUT/figures).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["png", "svg", "pdf"]),
              default=("png", "svg"), show_default=True, help="Image format, repeatable.")
@click.option("--pair", "pairs", multiple=True, metavar="A,B",
              help="Block pair for the flow projection, repeatable (default: all pairs, up to 6).")
@grouping_options
@app_options()
def plot(out, output, formats, pairs, grouping, app) -> None:
    """The papers' figures as PNG and SVG files."""
    from flowscan.errors import FlowscanError
    from flowscan.plot import save
    from flowscan.plot.standard import standard_figures
    from flowscan.stats.loading import load_analysis

    try:
        a = load_analysis(out, grouping)
    except FlowscanError as exc:
        raise _fail(exc) from None
    chosen = [tuple(p.split(",", 1)) for p in pairs]
    if any(len(p) != 2 for p in chosen):
        raise click.BadParameter("expected two block labels separated by a comma", param_hint="--pair")
    for warning in a.warnings:
        app.warn(warning)
    output = output or out / "figures"
    figs = standard_figures(a.tables, a.experiments, a.points, a.scaling, pairs=chosen or None,
                            landscape=a.landscape, comparison=(a.compare, a.classes),
                            transfer=a.transfer)
    for name, (fig, _caption) in figs.items.items():
        app.wrote(save(fig, output / name, formats))
    for note in figs.notes:
        app.note(note)
    if not figs.items:   # said even with -q: an empty folder and exit 0 would read as success
        ok = int((a.tables["runs"]["status"] == "ok").sum()) if "runs" in a.tables else 0
        app.warn(f"{out}: nothing to plot ({ok} run(s) analysed without error); no figure written")


@click.command()
@click.argument("out", type=OUT_DIR)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML file (default: OUT/report.html).")
@click.option("--bootstrap", type=click.IntRange(0), default=100, show_default=True,
              help="Bootstrap resamples for gamma when scaling.parquet is absent.")
@grouping_options
@app_options()
def report(out, output, bootstrap, grouping, app) -> None:
    """One self-contained HTML page: figures, tables, command and versions."""
    from flowscan.errors import FlowscanError
    from flowscan.report import write_report

    try:
        written, warnings = write_report(out, command_line(), grouping, bootstrap, output)
    except FlowscanError as exc:
        raise _fail(exc) from None
    for warning in warnings:
        app.warn(warning)
    app.wrote([written])
