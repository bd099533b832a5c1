"""The standard set of figures for an analysis folder (used by `flowscan plot` and the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import polars as pl
from matplotlib.figure import Figure

from flowscan.plot import figures
from flowscan.plot.figures import slug


@dataclass
class Figures:
    """Figures by name, with a caption each, in reading order."""

    items: dict[str, tuple[Figure, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what was left out, and why

    def add(self, name: str, fig: Figure, caption: str) -> None:
        self.items[name] = (fig, caption)


def standard_figures(tables: Mapping[str, pl.DataFrame], experiments: pl.DataFrame | None = None,
                     points: pl.DataFrame | None = None, scaling: pl.DataFrame | None = None,
                     quantity: str = "M", max_detail_runs: int = 6,
                     pairs: Sequence[tuple[str, str]] | None = None,
                     landscape: Mapping[str, pl.DataFrame] | None = None,
                     comparison: tuple[pl.DataFrame, dict[str, int]] | None = None,
                     transfer: Mapping[str, pl.DataFrame] | None = None) -> Figures:
    """Figures for an analysis; `pairs` picks the block pairs of the flow projection (default: all)."""
    from flowscan.stats.compare import sigma_table

    out = Figures()
    runs = tables["runs"].filter(pl.col("status") == "ok")["run"].to_list()
    eigen = tables["eigen"].filter(pl.col("run").is_in(runs))
    # runs with the same blocks (one architecture and block rule) share a flow plot and a bar chart
    families: dict[tuple[str, ...], list[str]] = {}
    for run in runs:
        blocks = tuple(dict.fromkeys(eigen.filter(pl.col("run") == run)["block"].to_list()))
        families.setdefault(blocks, []).append(run)
    for k, (blocks, members) in enumerate(families.items(), start=1):
        tag = f"-{k}" if len(families) > 1 else ""
        label = f" ({', '.join(blocks[:4])}{', ...' if len(blocks) > 4 else ''})" if len(families) > 1 else ""
        rounds = tables["rounds"].filter(pl.col("run").is_in(members))
        chosen = [p for p in pairs if set(p) <= set(blocks)] if pairs else None
        if pairs and not chosen:
            continue  # the chosen blocks belong to another family of runs
        out.add(f"flow{tag}", figures.flow_projection(rounds, chosen, max_pairs=len(chosen) if chosen else 6),
                f"IMP flow{label}: M_i(n) against M_j(n) for pairs of blocks, one marker per run, "
                "coloured by round (Redman et al. Fig. 2).")
        sig = sigma_table(eigen.filter(pl.col("run").is_in(members)), "run", quantity)
        out.add(f"sigma-runs{tag}", figures.sigma_overview(sig),
                f"σ per block and run{label}, mean ± SEM over the IMP steps (cf. Tables 2-6).")
    if runs:
        out.add("sigma-heatmap", figures.sigma_heatmap(sigma_table(eigen, "run", quantity)),
                "σ of every run and block; red: relevant (σ > 0), blue: irrelevant (σ < 0).")
    if comparison is not None and len(comparison[1]) >= 3:
        from flowscan.stats.compare import tree

        pairs, classes = comparison
        out.add("compare-dendrogram", figures.dendrogram(tree(pairs, list(classes)), list(classes),
                                                         float(pairs["threshold"][0])),
                "Universality classes: average-linkage dendrogram of the RMS σ distances between runs; "
                "the dashed line is the cut (twice the distance the SEMs alone would give, unless set); "
                "runs whose relevance conflicts are split even below it.")
    if experiments is not None and experiments.height and experiments["n_runs"].max() > 1:
        sig = sigma_table(experiments, "experiment", quantity)
        out.add("sigma-experiments", figures.sigma_overview(sig, "σ per block (mean ± SEM across replicates)"),
                "σ per block and experiment: mean ± the SEM its verdict uses (the larger of the pooled and the "
                "between-seed SEM).")
    if points is not None and points.height:
        out.add("error-density", figures.error_density(points, scaling),
                "Error against density with the fitted scaling function (Eq. 15); only fits whose "
                "γ is a measurement are drawn (status ok, or nuisance_at_bound: γ identified, its interval "
                "off γ's bounds, while ε† alone, a nuisance parameter, sits on its bound).")
    landscape = landscape or {}
    if "lmc_summary" in landscape and landscape["lmc_summary"].height:
        out.add("lmc-barrier", figures.lmc_barriers(landscape["lmc_summary"]),
                "Error barrier on the line from round n to n+1 against the density of n+1 "
                "(filled: n+1 matching; Paul et al.).")
    if "lmc" in landscape and landscape["lmc"].height:
        lmc_runs = list(dict.fromkeys(landscape["lmc"]["run"].to_list()))
        for run in lmc_runs[:max_detail_runs]:
            out.add(f"lmc-curves-{slug(run)}", figures.lmc_curves(landscape["lmc"], run),
                    f"{run}: test error along the path from round n to the next analysed round, one curve per "
                    "segment, coloured by n (colour bar).")
        if len(lmc_runs) > max_detail_runs:
            out.notes.append(f"lmc curves for the first {max_detail_runs} of {len(lmc_runs)} runs")
    if "sharpness" in landscape and landscape["sharpness"].height:
        sharp = landscape["sharpness"]
        rounds = ", ".join(f"{run}: {_rounds(part['round'].to_list())}"
                           for (run,), part in sharp.group_by("run", maintain_order=True))
        out.add("sharpness", figures.sharpness_plot(sharp, landscape.get("fraction_probe")),
                f"Top Hessian eigenvalue of the training loss at the end of each round computed ({rounds}).")
    if transfer:
        transfer_figures(transfer, out)
    if len(runs) > max_detail_runs:
        left = runs[max_detail_runs:]
        out.notes.append(f"per-run figures (eigen, survival) for the first {max_detail_runs} of {len(runs)} runs; "
                         f"left out: {', '.join(left[:10])}{', ...' if len(left) > 10 else ''}")
    for run in runs[:max_detail_runs]:
        out.add(f"eigen-{slug(run)}", figures.log_share_fit(tables["rounds"], tables["eigen"], run, quantity),
                f"{run}: ln {quantity}_i(n) against Σ ln c; straight lines mean {quantity}_i is an eigenfunction.")
        if "survival" in tables and tables["survival"].filter(pl.col("run") == run).height:
            out.add(f"survival-{slug(run)}", figures.survival_curves(tables["survival"], run),
                    f"{run}: fraction of round n's kept weights still kept in round n+1.")
    return out


def transfer_figures(frames: Mapping[str, pl.DataFrame], out: Figures | None = None) -> Figures:
    """Ticket transfer: accuracy against density per arm for every pair, and sigma distance
    against transfer gap over the pairs (the universality test)."""
    out = out or Figures()
    summary, pair_frame = frames["transfer_summary"], frames["transfer_pairs"]
    for source, target in pair_frame.select("source", "target").iter_rows():
        out.add(f"transfer-{slug(source)}-to-{slug(target)}", figures.transfer_accuracy(summary, source, target),
                f"{source}'s tickets trained on {target}: test accuracy against the ticket's density per arm, "
                "mean ± SEM over seeds (own: the target's ticket at the nearest density; random layer: the "
                "ticket's per-tensor densities at random positions).")
    if pair_frame.height:
        statement = frames["transfer_correlation"]["statement"][0]
        out.add("transfer-sigma-gap", figures.transfer_sigma_gap(pair_frame, statement),
                "Universality tested: each pair's transfer gap (transferred − per-layer random, mean over the "
                f"densities ± SEM) against the σ distance of the two archives. {statement}.")
    return out


def _rounds(indices) -> str:
    """Round numbers as ranges: 0-4, 8, 12-15."""
    out, start, prev = [], None, None
    for n in sorted(indices):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else str(start))
    return ", ".join(out)
