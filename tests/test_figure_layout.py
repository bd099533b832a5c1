"""Figures stay readable for any number of blocks and runs, and never draw a failed fit."""

from __future__ import annotations

import polars as pl

from flowscan.plot import figures


def _sigmas(n_units: int, n_blocks: int) -> pl.DataFrame:
    rows = [(f"task{u}", f"block{b}", 0.1 * (b - u), 0.01) for u in range(n_units) for b in range(n_blocks)]
    return pl.DataFrame(rows, schema=["unit", "block", "sigma", "sigma_sem"], orient="row")


def test_many_blocks_become_a_heatmap_of_bounded_size():
    fig = figures.sigma_overview(_sigmas(10, 14))
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 14 * fig.dpi and height <= 14 * fig.dpi
    assert fig.axes[0].images, "expected a heatmap"
    few = figures.sigma_overview(_sigmas(2, 5))
    assert not few.axes[0].images and few.axes[0].patches   # bars while they are readable


def test_error_density_draws_only_fits_that_are_measurements():
    points = pl.DataFrame({"run": ["a"] * 4 + ["b"] * 4, "density": [1.0, 0.5, 0.2, 0.1] * 2,
                           "error": [0.1, 0.11, 0.15, 0.3] * 2})
    scaling = pl.DataFrame({"level": ["run", "run"], "name": ["a", "b"], "status": ["ok", "at_bound"],
                            "epsilon_np": [0.1, 0.1], "epsilon_dagger": [0.9, 0.9], "gamma": [-1.0, -20.0],
                            "p": [0.05, 0.05]})
    fig = figures.error_density(points, scaling)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "fit, γ = -1.00" in labels
    assert not any("-20" in label for label in labels)
    assert "no fit drawn (at_bound)" in labels


def test_detail_figures_say_which_runs_they_leave_out(tmp_path):
    from conftest import FIXTURES, analyze
    from flowscan.plot.standard import standard_figures

    tables = analyze(FIXTURES / "closed-form", tmp_path / "out")
    figs = standard_figures(tables, max_detail_runs=2)
    assert figs.notes and "first 2 of 4 runs" in figs.notes[0] and "left out:" in figs.notes[0]


def test_every_report_table_has_a_heading(tmp_path):
    import re

    from conftest import FIXTURES, analyze, run_cli

    out = tmp_path / "out"
    analyze(FIXTURES / "closed-form", out)
    run_cli("report", out)
    page = (out / "report.html").read_text()
    tables = re.findall(r'<table id="table-[^"]+">(.{0,200})', page)
    assert tables and all(t.startswith("<caption>") for t in tables)


def test_lmc_curves_carry_a_round_colour_bar_at_any_number_of_rounds():
    for n_rounds in (3, 28):
        rows = [("r", n, a, 0.1 + 0.01 * n, 0.3) for n in range(n_rounds) for a in (0.0, 0.5, 1.0)]
        fig = figures.lmc_curves(pl.DataFrame(rows, schema=["run", "round", "alpha", "error", "loss"],
                                              orient="row"), "r")
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 1 and "round n" in bars[0].get_ylabel()
        assert bars[0].get_ylim() == (0, n_rounds - 1)
        assert (fig.axes[0].get_legend() is not None) == (n_rounds <= 6)   # a legend only while short


def test_lmc_barriers_draw_rounds_of_unknown_matching_as_crosses():
    summary = pl.DataFrame({"run": ["r"] * 3, "round": [1, 2, 3], "density": [0.8, 0.64, 0.51],
                            "barrier": [0.01, 0.02, 0.03], "matching": [None, None, None]},
                           schema={"run": pl.String, "round": pl.Int64, "density": pl.Float64,
                                   "barrier": pl.Float64, "matching": pl.Boolean})
    fig = figures.lmc_barriers(summary)
    ax = fig.axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 3     # every round drawn, none dropped
    assert "unknown" in ax.get_title()


def clipped(fig) -> list[str]:
    """The edges of a rendered figure that something is drawn across (a title, label, legend or tick
    label cut off there): nothing drawn may touch the outermost pixels, which the layout keeps blank."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    background = np.array([round(255 * c) for c in fig.get_facecolor()[:3]])
    edges = {"top": pixels[0], "bottom": pixels[-1], "left": pixels[:, 0], "right": pixels[:, -1]}
    return [side for side, line in edges.items() if np.abs(line - background).max() > 40]


def test_no_figure_text_is_clipped_at_any_run_name_or_count(tmp_path):
    import shutil
    import warnings

    from conftest import FIXTURES, analyze
    from flowscan.plot.standard import standard_figures
    from flowscan.stats import aggregate

    root = tmp_path / "archive"
    long = "lottery_0123456789abcdef0123456789abcdef0123456789abcdef"   # open_lth's names, and longer
    for k in range(12):   # many runs with long names
        shutil.copytree(FIXTURES / "open_lth" / "lottery_0123456789abcdef0123456789abcdef" / "replicate_1",
                        root / f"{long}_{k}" / "replicate_1")
    tables = analyze(root, tmp_path / "out", "--format", "open_lth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # "constrained_layout not applied" is a failure here
        figs = standard_figures(tables, aggregate(tables["eigen"], tables["runs"], tables["steps"]))
        bad = {name: clipped(fig) for name, (fig, _caption) in figs.items.items()}
        units = [f"{long}_{k}/replicate_1" for k in range(12)]
        tree = pl.DataFrame({"step": list(range(1, 12)), "left": [units[0]] + [f"#{k}" for k in range(1, 11)],
                             "right": units[1:], "distance": [0.001 * k for k in range(1, 12)],
                             "size": list(range(2, 13))})
        curves = pl.DataFrame({"run": [units[0]] * 6, "round": [0, 0, 0, 1, 1, 1], "alpha": [0.0, 0.5, 1.0] * 2,
                               "error": [0.1, 0.2, 0.1] * 2, "loss": [1.0] * 6, "next_round": [1, 1, 1, 2, 2, 2]})
        more = {"dendrogram": figures.dendrogram(tree, units, 0.467), "lmc-curves": figures.lmc_curves(curves, units[0])}
        bad.update({name: clipped(fig) for name, fig in more.items()})
    assert len(bad) >= 12 and {"flow", "sigma-heatmap", "dendrogram"} <= set(bad)
    assert not {name: edges for name, edges in bad.items() if edges}
