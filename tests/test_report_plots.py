"""Figures, the HTML report and the statistics commands, end to end through the CLI."""

from __future__ import annotations

import html.parser
import re
import shutil
import subprocess

import polars as pl
import pytest

from conftest import FIXTURES, analyze, run_cli
from flowscan.plot.standard import standard_figures
from flowscan.report import figure_ids
from flowscan.stats.loading import load_analysis


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    analyze(FIXTURES, out)
    return out


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.svgs, self.external = [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "svg":
            self.svgs += 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("#", "data:")):
                self.external.append(value)


def test_report_is_self_contained_with_every_figure_and_table(analysed):
    result = run_cli("report", analysed)
    page_path = analysed / "report.html"
    assert result.output.strip() == f"wrote {page_path}"
    page = page_path.read_text()
    parser = _Page()
    parser.feed(page)
    a = load_analysis(analysed)
    expected = standard_figures(a.tables, a.experiments, a.points, a.scaling, comparison=(a.compare, a.classes)).items
    assert "compare-dendrogram" in expected
    assert figure_ids(page) == list(expected)
    assert parser.svgs >= len(expected)  # every figure is an inline SVG
    for table in ("provenance", "versions", "runs", "sigma", "eigen", "experiments", "scaling",
                  "classes", "compare"):
        assert f"table-{table}" in parser.ids, table
    assert parser.external == []  # nothing loaded from outside the file
    assert "flowscan analyze" in page and "matplotlib" in page
    assert "closed-form/flowscan" in page


# measured by the browser itself once the page is laid out, written where --dump-dom shows it
_PROBE = """<script>
window.addEventListener("load", () => {
  const figures = [...document.querySelectorAll("figure")];
  const drawn = figures.filter(f => { const r = f.querySelector("svg")?.getBoundingClientRect();
                                     return r && r.width > 100 && r.height > 100; });
  const wraps = [...document.querySelectorAll("div.scroll")];
  const wide = wraps.filter(d => d.scrollWidth > d.clientWidth);
  const scrolls = wide.filter(d => getComputedStyle(d).overflowX === "auto");
  const page = document.body.getBoundingClientRect();
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({figures: figures.length, drawn: drawn.length, tables: wraps.length,
                                    wide: wide.length, scrolls: scrolls.length, width: page.width,
                                    height: page.height, viewport: window.innerWidth});
  document.body.appendChild(out);
});
</script>"""


def _chromium(*args, tmp_path):
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000", *args],
                          check=True, capture_output=True, timeout=120, text=True)


@pytest.mark.skipif(not shutil.which("chromium"), reason="no headless browser on this machine")
def test_report_renders_in_headless_chromium(analysed, tmp_path):
    import json

    run_cli("report", analysed)
    page = (analysed / "report.html").read_text()
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", (analysed / "report.html").as_uri(), tmp_path=tmp_path)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", _PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri(), tmp_path=tmp_path).stdout
    found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert found["figures"] == page.count("<figure") > 5
    assert found["drawn"] == found["figures"], found          # every figure laid out at a readable size
    assert found["height"] > 3000 and found["width"] <= found["viewport"], found   # no sideways page
    assert found["wide"] >= 1 and found["scrolls"] == found["wide"], found   # wide tables scroll in place


def test_plot_writes_png_and_svg_for_each_figure(analysed, tmp_path):
    result = run_cli("plot", analysed, "-o", tmp_path / "figs")
    written = [line.removeprefix("wrote ") for line in result.output.splitlines() if line.startswith("wrote ")]
    names = {p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in written}
    assert {"sigma-heatmap", "eigen-bert-tickets-mrpc", "survival-bert-tickets-mrpc"} <= names
    for name in names:
        png = tmp_path / "figs" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "figs" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_aggregate_groups_open_lth_replicates(analysed):
    result = run_cli("aggregate", analysed)
    experiments = pl.read_parquet(analysed / "experiments.parquet")
    lth = experiments.filter(pl.col("experiment") == "open_lth/lottery_0123456789abcdef0123456789abcdef",
                             pl.col("quantity") == "M")
    assert lth["n_runs"].to_list() == [2] * 5
    assert lth["block"].to_list() == ["stem", "stage1", "stage2", "stage3", "fc"]
    eigen = pl.read_parquet(analysed / "eigen.parquet").filter(pl.col("run").str.starts_with("open_lth"),
                                                                pl.col("quantity") == "M", pl.col("block") == "fc")
    assert lth.filter(block="fc")["sigma_mean"][0] == pytest.approx(eigen["sigma_mean"].mean())
    assert "open_lth/lottery_0123456789abcdef0123456789abcdef" in result.output
    members = pl.read_parquet(analysed / "experiment_runs.parquet")
    assert members.filter(pl.col("run") == "torch-prune/seed0")["experiment"][0] == "torch-prune"


def test_table_paper_style_and_markdown(analysed):
    out = run_cli("table", analysed).output.splitlines()
    assert out[0].split()[:4] == ["RUN", "σ(layer0)", "σ(layer1)", "σ(pooler)"]
    row = next(line for line in out if line.startswith("closed-form/flowscan"))
    # the other fixtures' blocks (open_lth, torch-prune, flax kernels, ...) are empty for this run
    cells = row.split()[1:]
    assert cells[:7] == ["—", "—", "—", "0.500", "-1.000", "-1.000", "0.302"] and set(cells[7:]) == {"—"}
    md = run_cli("table", analysed, "--style", "markdown", "--level", "experiment").output.splitlines()
    assert md[0].startswith("| experiment | σ(") and md[1].startswith("|---|")


def test_compare_across_two_analysis_folders(analysed, tmp_path):
    other = tmp_path / "other"
    analyze(FIXTURES / "closed-form", other)
    result = run_cli("compare", analysed, other, "-o", tmp_path / "cmp.parquet")
    pairs = pl.read_parquet(tmp_path / "cmp.parquet")
    same = pairs.filter(pl.col("a") == f"{analysed.name}:closed-form/npz", pl.col("b") == "other:npz")
    assert same["rms"][0] == pytest.approx(0.0, abs=1e-12) and same["same_class"][0]
    assert "classes:" in result.output


def test_fit_command_writes_scaling_and_flags_unfittable_runs(analysed, tmp_path):
    import numpy as np

    from flowscan.stats import scaling_function

    csv = tmp_path / "points.csv"
    d = 0.8 ** np.arange(20)
    pl.DataFrame({"density": d, "error": scaling_function(d, 0.08, 0.9, -1.5, 0.02)}).write_csv(csv)
    result = run_cli("fit", analysed, "--csv", csv, "--bootstrap", "20")
    scaling = pl.read_parquet(analysed / "scaling.parquet")
    assert scaling.filter(level="run")["gamma"][0] == pytest.approx(-1.5, rel=1e-3)
    assert "-1.5000" in result.output
    result = run_cli("fit", analysed, "--bootstrap", "0")
    scaling = pl.read_parquet(analysed / "scaling.parquet")
    assert scaling.filter(name="torch-prune/seed0")["status"][0] == "error"  # 4 rounds: too few points
    assert "need at least 5" in result.output


def test_stats_commands_need_an_analysis_folder(tmp_path):
    result = run_cli("aggregate", tmp_path, expect=1)
    assert "missing runs.parquet" in result.output and "flowscan analyze" in result.output


def test_plot_flow_for_chosen_block_pairs(tmp_path):
    out = tmp_path / "out"
    analyze(FIXTURES / "open_lth", out)
    result = run_cli("plot", out, "-o", tmp_path / "figs", "--format", "svg", "--pair", "stage1,stage3",
                     "--pair", "stem,fc")
    assert f"{tmp_path / 'figs' / 'flow.svg'}" in result.output.split()
    svg = (tmp_path / "figs" / "flow.svg").read_text()
    for label in ("M(stage1)", "M(stage3)", "M(stem)", "M(fc)"):
        assert label in svg
    assert "M(stage2)" not in svg
    bad = run_cli("plot", out, "--pair", "stage1", expect=2)
    assert "two block labels" in bad.output


def test_plot_says_when_there_is_nothing_to_plot(tmp_path):
    bad = tmp_path / "runs" / "bad"
    bad.mkdir(parents=True)
    for r in range(2):
        (bad / f"round_{r}.safetensors").write_bytes(b"\x00" * 12)
    run_cli("analyze", tmp_path / "runs", "-o", tmp_path / "out", "-q", expect=1)
    result = run_cli("plot", tmp_path / "out", "-q")
    assert "warning: " in result.output and "nothing to plot (0 run(s) analysed without error)" in result.output
    figures = tmp_path / "out" / "figures"
    assert not figures.exists() or not any(figures.iterdir())
