"""One self-contained HTML page per analysis: figures inline (SVG), tables, provenance.

Nothing is loaded from outside the file, so it opens offline and can go in a supplement.
"""

from __future__ import annotations

import html
import io
import math
import platform
import re
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from typing import Sequence

import polars as pl

from flowscan import __version__
from flowscan.plot.standard import Figures, standard_figures
from flowscan.stats.compare import sigma_table
from flowscan.stats.loading import Analysis
from flowscan.summary import sigma_grid

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
div.scroll{overflow-x:auto;max-width:100%;margin:.5em 0 1.5em}table{border-collapse:collapse;font-size:.82em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;white-space:nowrap}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.3em 0;white-space:nowrap}figure{margin:1em 0 2em}figure svg{max-width:100%;height:auto}figcaption{font-size:.9em;color:#555}
code{background:#f4f4f4;padding:.1em .3em}.error{color:#b00}nav a{margin-right:1em}
"""
PACKAGES = ("numpy", "scipy", "polars", "pyarrow", "matplotlib", "safetensors", "click")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return html.escape(str(value))


# every table gets a visible heading of its own
CAPTIONS = {'provenance': 'Where these results come from', 'versions': 'Software versions', 'runs': 'Runs analysed', 'failed': 'Runs that could not be read', 'sigma': 'σ per block and run', 'eigen': 'Per-block summary: λ, σ, σ_fit and the eigenfunction test', 'experiments': 'σ per block and experiment', 'scaling': 'Fits of Eq. 15 (γ is a measurement only where status is ok or nuisance_at_bound)', 'classes': 'Universality classes', 'compare': 'Pairs of units: σ distances and relevance agreement', 'lmc_summary': 'Linear mode connectivity between successive rounds', 'sharpness': 'Top Hessian eigenvalue per round', 'fraction_probe': 'Largest fraction that stays matching'}


def html_table(frame: pl.DataFrame, table_id: str, columns: Sequence[str] | None = None,
               max_rows: int = 500) -> str:
    """A table with a caption (its heading), scrolling sideways when wide, at most `max_rows` rows."""
    frame = frame.select(columns) if columns else frame
    caption = f"<caption>{html.escape(CAPTIONS.get(table_id, table_id))}</caption>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{_cell(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
        else f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in frame.head(max_rows).iter_rows())
    more = f"<p>{frame.height - max_rows} more rows in the parquet file.</p>" if frame.height > max_rows else ""
    # the wrapper scrolls sideways, so a wide table is never clipped at the page's edge
    return (f'<div class="scroll"><table id="table-{table_id}">{caption}<thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>{more}')


def svg_of(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline in HTML


def _versions() -> list[tuple[str, str]]:
    rows = [("flowscan", __version__), ("python", platform.python_version())]
    for name in PACKAGES:
        try:
            rows.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def _sigma_wide(sigmas: pl.DataFrame) -> pl.DataFrame:
    columns, rows = sigma_grid(sigmas, sem=True)
    return pl.DataFrame(rows, schema=["unit", *columns], orient="row")


def render(analysis: Analysis, command: str, figures: Figures | None = None) -> str:
    t = analysis.tables
    figures = figures or standard_figures(t, analysis.experiments, analysis.points, analysis.scaling,
                                          landscape=analysis.landscape,
                                          comparison=(analysis.compare, analysis.classes),
                                          transfer=analysis.transfer)
    runs = t["runs"]
    failed = runs.filter(pl.col("status") != "ok")
    ok_runs = runs.filter(pl.col("status") == "ok")["run"].to_list()
    parts = [f"<h1>flowscan report: {html.escape(str(analysis.out))}</h1>",
             '<nav><a href="#provenance">provenance</a><a href="#runs">runs</a><a href="#sigma">σ</a>'
             '<a href="#experiments">experiments</a><a href="#scaling">scaling</a>'
             '<a href="#compare">universality</a>'
             + ('<a href="#transfer">transfer</a>' if analysis.transfer else '')
             + '<a href="#figures">figures</a></nav>']

    parts.append('<h2 id="provenance">Provenance</h2>')
    prov = pl.DataFrame({"item": ["report command", "analysis command", "block rules", "written"],
                         "value": [command, analysis.metadata.get("command", "?"),
                                   analysis.metadata.get("blocks", "?"),
                                   datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]})
    parts.append(html_table(prov, "provenance"))
    parts.append(html_table(pl.DataFrame(_versions(), schema=["package", "version"], orient="row"), "versions"))

    parts.append(f'<h2 id="runs">Runs ({len(ok_runs)} analysed, {failed.height} failed)</h2>')
    parts.append(html_table(runs, "runs", ["run", "format", "n_rounds", "n_prunable_tensors", "n_prunable_params",
                                           "status", "blocks", "mask_source"]))
    if failed.height:
        parts.append('<p class="error">Runs that could not be read:</p>')
        parts.append(html_table(failed, "failed", ["run", "path", "error"]))

    parts.append('<h2 id="sigma">σ per block and run (M, mean ± SEM over steps)</h2>')
    eigen_ok = t["eigen"].filter(pl.col("run").is_in(ok_runs))
    parts.append(html_table(_sigma_wide(sigma_table(eigen_ok, "run")), "sigma"))
    parts.append("<p>Full per-block summary: λ per round ± SEM, σ ± SEM, σ_fit, the paper's eigenfunction test "
                 "(<code>eigen_ok</code>) and the one that can fail (<code>exponential_ok</code>: σ neither drifts "
                 "over the rounds nor ln M curves in Σ ln c beyond the run's noise; docs/definitions.md):</p>")
    parts.append(html_table(eigen_ok.filter(pl.col("quantity") == "M"), "eigen",
                            ["run", "block", "n_pairs", "lambda_mean", "lambda_sem", "sigma_mean", "sigma_sem",
                             "sigma_fit", "sigma_fit_se", "eigen_ok", "sigma_trend_p", "exponential_ok",
                             "relevance"]))

    parts.append('<h2 id="experiments">Experiments (replicates pooled)</h2>')
    parts.append(html_table(analysis.experiments.filter(pl.col("quantity") == "M"), "experiments",
                            ["experiment", "block", "n_runs", "n_steps", "sigma_mean", "sigma_sem",
                             "sigma_pooled_sem", "sigma_between_sem", "lambda_mean", "lambda_sem", "sigma_fit_mean",
                             "sigma_fit_sem", "relevance"]))
    parts.append("<p><code>sigma_sem</code>, on which relevance is decided, is the larger of the pooled SEM (every "
                 "step of every seed) and the between-seed SEM (of the seeds' means).</p>")

    parts.append('<h2 id="scaling">Critical exponent γ (error against density, Eq. 15)</h2>')
    if analysis.scaling is not None and analysis.scaling.height:
        parts.append(html_table(analysis.scaling, "scaling",
                                ["level", "name", "metric", "n_points", "gamma", "gamma_se", "gamma_ci_low",
                                 "gamma_ci_high", "epsilon_np", "epsilon_dagger", "epsilon_dagger_max", "p",
                                 "status", "error"]))
    else:
        parts.append('<p id="table-scaling">No accuracy metric recorded in these runs: nothing to fit.</p>')

    parts.append('<h2 id="compare">Universality: σ distances and relevance agreement</h2>')
    classes = pl.DataFrame({"unit": list(analysis.classes), "class": list(analysis.classes.values())},
                           schema={"unit": pl.String, "class": pl.Int64})
    parts.append(html_table(classes.sort("class"), "classes"))
    parts.append(html_table(analysis.compare.sort("rms", nulls_last=True), "compare",
                            ["a", "b", "n_shared_blocks", "rms", "euclidean", "cosine_distance",
                             "relevance_agree", "conflict_blocks", "same_class"]))

    if "lmc_summary" in analysis.landscape:
        parts.append('<h2 id="landscape">Error landscape (Paul et al.)</h2>')
        parts.append("<p>The barrier is the largest rise of the test error above the chord between the path's "
                     "ends; <code>instability</code> (Frankle et al.) measures it from the ends' mean instead, so "
                     "it adds (err(1) − err(0))/2 at most and tracks a round that is not matching through that "
                     "term, not through the path: read it beside <code>matching</code>. A pair that spans "
                     "several rounds (<code>span</code> &gt; 1) crosses a missing round. With BatchNorm the "
                     "path's ends carry re-estimated statistics; <code>stored_error_start</code> and "
                     "<code>next_error</code> are the networks as stored, and <code>ends_differ</code> marks "
                     "pairs where the two disagree by more than the tolerance.</p>")
        parts.append(html_table(analysis.landscape["lmc_summary"], "lmc_summary"))
    for name in ("sharpness", "fraction_probe"):
        if name in analysis.landscape:
            parts.append(html_table(analysis.landscape[name], name))

    if analysis.transfer:
        transfer = analysis.transfer
        parts.append('<h2 id="transfer">Ticket transfer</h2>')
        parts.append(f"<p>{html.escape(transfer['transfer_correlation']['statement'][0])}.</p>")
        parts.append(html_table(transfer["transfer_pairs"], "transfer_pairs",
                                ["source", "target", "n_rounds", "n_seeds", "gap_mean", "gap_sem", "own_gap_mean",
                                 "sigma_rms", "n_conflicts", "overlap_mean", "chance_mean", "same_archive"]))
        parts.append("<p>Per arm (mean ± SEM over seeds; gap: the arm minus the per-layer random mask, "
                     "paired by seed):</p>")
        parts.append(html_table(transfer["transfer_summary"], "transfer_summary",
                                ["source", "target", "source_round", "arm", "n_seeds", "density", "accuracy_mean",
                                 "accuracy_sem", "gap_mean", "gap_sem"]))
        parts.append(html_table(transfer["transfer_overlap"], "transfer_overlap",
                                ["source", "target", "seed", "source_round", "own_round", "overlap", "chance",
                                 "overlap_ratio", "jaccard"]))

    parts.append('<h2 id="figures">Figures</h2>')
    parts += [f"<p>{html.escape(note)}</p>" for note in figures.notes]
    for name, (fig, caption) in figures.items.items():
        parts.append(f'<figure id="fig-{name}">{svg_of(fig)}<figcaption>{html.escape(caption)}</figcaption></figure>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>flowscan report: {html.escape(str(analysis.out))}</title><style>{STYLE}</style></head>'
            f"<body>\n{body}\n</body></html>\n")


def figure_ids(page: str) -> list[str]:
    return re.findall(r'<figure id="fig-([^"]+)">', page)


def write_report(out, command: str, grouping=None, bootstrap: int = 100, output=None) -> tuple[object, list[str]]:
    """Render OUT's tables into `output` (default OUT/report.html): (the file, warnings)."""
    from pathlib import Path

    from flowscan.io.atomic import write_text
    from flowscan.stats.groups import Grouping
    from flowscan.stats.loading import load_analysis

    analysis = load_analysis(out, grouping or Grouping(), bootstrap)
    output = Path(output) if output else Path(out) / "report.html"
    write_text(output, render(analysis, command))
    return output, list(analysis.warnings)
