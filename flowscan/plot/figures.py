"""The papers' plots from the tables: IMP flow, sigma per block, eigenfunction check, error scaling."""

from __future__ import annotations

import itertools
import math
import re
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator
import polars as pl
from matplotlib.collections import LineCollection
from matplotlib.cm import ScalarMappable
from matplotlib.colors import CenteredNorm, Normalize
from matplotlib.lines import Line2D

from flowscan.plot.style import DIVERGING, SEQUENTIAL, color, marker, new_figure


def slug(text: str) -> str:
    """A file-name-safe form of a run or experiment name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


def _density_axis(ax, label: str = "density (fraction of weights remaining)") -> None:
    """Log density, decreasing to the right: pruning reads left to right. Ticks at round numbers in
    plain decimals (1, 0.5, 0.2, 0.1, 0.05, ...), not 9×10⁻¹ minor labels, and the axis reaches a
    tick beyond the sparsest point, so every point lies between two labelled ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_xscale("log")
    low, high = ax.dataLim.intervalx
    if not (np.isfinite(low) and np.isfinite(high) and 0 < low <= high):
        low, high = 0.01, 1.0   # nothing drawn yet
    ticks = [m * 10.0 ** e for e in range(-9, 2) for m in (1, 2, 5)]
    floor = max([t for t in ticks if t <= low * 1.0001] or [ticks[0]])   # the tick at or below the sparsest
    shown = [t for t in ticks if floor <= t <= high * 1.0001]
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(high * 1.05, floor / 1.05)   # decreasing to the right
    ax.set_xlabel(label)


def _blocks(frame: pl.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["block"].to_list()))


LABEL_CHARS = 28   # a legend entry or tick label; longer names keep their two ends
TITLE_CHARS = 48   # a run's name in a title


def elide(text: str, limit: int) -> str:
    """`text` cut in the middle to at most `limit` characters: 'lottery_0123…abcdef/replicate_1'."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 5
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head):]}"


def short_labels(names: Sequence[str], limit: int = LABEL_CHARS) -> dict[str, str]:
    """Names without the folders they all share ('a/b/seed0', 'a/b/seed1' -> 'seed0', 'seed1'), long
    ones elided in the middle, as long as that keeps them apart."""
    parts = [n.split("/") for n in names]
    common = 0
    while len(names) > 1 and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    full = {n: "/".join(p[common:]) for n, p in zip(names, parts)}
    for width in (limit, 2 * limit, 4 * limit):
        short = {n: elide(label, width) for n, label in full.items()}
        if len(set(short.values())) == len(short):
            return short
    return full


def flow_projection(rounds: pl.DataFrame, pairs: Sequence[tuple[str, str]] | None = None,
                    runs: Sequence[str] | None = None, max_pairs: int = 6):
    """Redman et al. Fig. 2: M_i(n) against M_j(n), one line per run, coloured by round."""
    runs = list(runs or dict.fromkeys(rounds["run"].to_list()))
    blocks = [b for b in _blocks(rounds) if b != "(other)"] or _blocks(rounds)
    pairs = list(pairs or itertools.combinations(blocks, 2))[:max_pairs] or [(blocks[0], blocks[0])]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = new_figure(3.4 * cols + 0.8, 3.0 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    norm = Normalize(rounds["round"].min(), rounds["round"].max())
    labels = short_labels(runs)
    mappable = None
    for ax, (bx, by) in zip(axes, pairs):
        for k, run in enumerate(runs):
            part = rounds.filter(pl.col("run") == run)
            x = part.filter(pl.col("block") == bx).sort("round")
            y = part.filter(pl.col("block") == by).sort("round")
            if x.height == 0 or y.height == 0:
                continue
            xy = np.column_stack([x["M"].to_numpy(), y["M"].to_numpy()])
            segments = np.stack([xy[:-1], xy[1:]], axis=1)
            lines = LineCollection(segments, cmap=SEQUENTIAL, norm=norm, linewidths=1.6)
            lines.set_array(x["round"].to_numpy()[:-1].astype(float))
            mappable = ax.add_collection(lines)
            ax.scatter(xy[:, 0], xy[:, 1], c=x["round"].to_numpy(), cmap=SEQUENTIAL, norm=norm,
                       marker=marker(k), s=22, edgecolors="none", label=labels[run], zorder=3)
        ax.set_xlabel(f"M({bx})")
        ax.set_ylabel(f"M({by})")
        ax.autoscale_view()
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    if len(runs) <= 12:
        # the marker tells the run (the colour is the round): grey proxies, not the plotted artists
        handles = [Line2D([], [], marker=marker(k), linestyle="", color="0.35", label=labels[run])
                   for k, run in enumerate(runs)]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(runs)), frameon=False)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes[: len(pairs)].tolist(), label="round")
        bar.locator = MaxNLocator(integer=True)   # rounds are whole numbers
        bar.update_ticks()
    fig.suptitle("IMP flow projected on block shares")
    return fig


def _sigma_matrix(sigmas: pl.DataFrame):
    units = list(dict.fromkeys(sigmas["unit"].to_list()))
    blocks = _blocks(sigmas)
    value = np.full((len(units), len(blocks)), np.nan)
    error = np.full_like(value, np.nan)
    for u, b, s, e in sigmas.select("unit", "block", "sigma", "sigma_sem").iter_rows():
        value[units.index(u), blocks.index(b)] = s if s is not None else np.nan
        error[units.index(u), blocks.index(b)] = e if e is not None else np.nan
    return units, blocks, value, error


MAX_BARS = 48   # beyond this many bars, σ is shown as a heatmap instead


def sigma_overview(sigmas: pl.DataFrame, title: str = "σ per block (mean ± SEM)"):
    """Bars while they stay readable, else a heatmap: a layout for any number of blocks and units."""
    units, blocks, _value, _error = _sigma_matrix(sigmas)
    if len(units) * len(blocks) <= MAX_BARS:
        return sigma_bars(sigmas, title)
    return sigma_heatmap(sigmas, title)


def sigma_bars(sigmas: pl.DataFrame, title: str = "σ per block (mean ± SEM)"):
    """The form of Redman et al.'s Tables 2-6: sigma per block, units side by side, SEM bars."""
    units, blocks, value, error = _sigma_matrix(sigmas)
    fig = new_figure(min(12.0, max(5.0, 0.35 * len(blocks) * len(units) + 2)), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(units)
    x = np.arange(len(blocks))
    for k, unit in enumerate(units):
        ax.bar(x + (k - (len(units) - 1) / 2) * width, value[k], width, yerr=np.nan_to_num(error[k]),
               color=color(k), label=short_labels(units)[unit], capsize=2, error_kw={"linewidth": 0.8})
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, blocks, rotation=30 if len(blocks) > 6 else 0, ha="right" if len(blocks) > 6 else "center")
    ax.set_ylabel("σ  (λ ~ c^σ)")
    ax.set_title(title)
    if len(units) <= 12:
        ax.legend(frameon=False)
    return fig


def sigma_heatmap(sigmas: pl.DataFrame, title: str = "σ per block"):
    """Units x blocks, diverging around 0 (relevant red, irrelevant blue)."""
    units, blocks, value, _ = _sigma_matrix(sigmas)
    fig = new_figure(min(14.0, max(4.0, 0.55 * len(blocks) + 2.5)), min(14.0, max(2.5, 0.35 * len(units) + 1.5)))
    ax = fig.subplots()
    finite = value[np.isfinite(value)]
    image = ax.imshow(np.ma.masked_invalid(value), cmap=DIVERGING, aspect="auto",
                      norm=CenteredNorm(0, max(abs(finite).max(), 1e-9) if finite.size else 1.0))
    ax.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right")
    ax.set_yticks(range(len(units)), [short_labels(units)[u] for u in units])
    ax.grid(False)
    if value.size <= 400:
        limit = image.norm.halfrange
        for (i, j), v in np.ndenumerate(value):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * limit else "black")
    fig.colorbar(image, ax=ax, label="σ")
    ax.set_title(title)
    return fig


def log_share_fit(rounds: pl.DataFrame, eigen: pl.DataFrame, run: str, quantity: str = "M"):
    """ln M_i(n) against the cumulative ln c, with the sigma_fit lines (the eigenfunction check)."""
    part = rounds.filter(pl.col("run") == run)
    density = part.group_by("round").agg(pl.col("global_density").first()).sort("round")
    scale = dict(zip(density["round"], np.log(density["global_density"][0] / density["global_density"].to_numpy())))
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    for k, block in enumerate(_blocks(part)):
        rows = part.filter(pl.col("block") == block).sort("round")
        share = rows[quantity].to_numpy()
        keep = share > 0
        s = np.array([scale[r] for r in rows["round"]])[keep]
        y = np.log(share[keep])
        ax.plot(s, y, marker(k), color=color(k), label=block)
        fit = eigen.filter((pl.col("run") == run) & (pl.col("block") == block) & (pl.col("quantity") == quantity))
        if fit.height and s.size >= 2 and np.isfinite(fit["sigma_fit"][0]):
            slope = fit["sigma_fit"][0]
            intercept = float(np.mean(y - slope * s))
            ax.plot(s, intercept + slope * s, "-", color=color(k), linewidth=1)
    ax.set_xlabel("cumulative coarse-graining  Σ ln c")
    ax.set_ylabel(f"ln {quantity}_i(n)")
    ax.set_title(f"{elide(run, TITLE_CHARS)}\nstraight lines = eigenfunctions (slope σ_fit)")
    ax.legend(frameon=False, fontsize=7, ncol=2 if len(_blocks(part)) > 8 else 1)
    return fig


def error_density(points: pl.DataFrame, scaling: pl.DataFrame | None = None, runs: Sequence[str] | None = None):
    """Redman et al. Fig. 3: error against density for several runs, with the fitted Eq. 15 curves."""
    from flowscan.stats.critical import MEASURED, scaling_function

    runs = list(runs or dict.fromkeys(points["run"].to_list()))
    labels = short_labels(runs)
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    for k, run in enumerate(runs):
        part = points.filter(pl.col("run") == run).sort("density")
        ax.plot(part["density"], part["error"], marker(k), color=color(k), label=labels[run], markersize=4)
        if scaling is not None:
            fit = scaling.filter((pl.col("level") == "run") & (pl.col("name") == run) & (pl.col("status") != "error"))
            if fit.height and fit["status"][0] in MEASURED:
                r = fit.row(0, named=True)
                d = np.geomspace(part["density"].min(), part["density"].max(), 200)
                ax.plot(d, scaling_function(d, r["epsilon_np"], r["epsilon_dagger"], r["gamma"], r["p"]),
                        "-", color=color(k), linewidth=1, label=f"fit, γ = {r['gamma']:.2f}")
            elif fit.height:  # a fit that is not a measurement is not drawn; the legend says so
                ax.plot([], [], " ", label=f"no fit drawn ({fit['status'][0]})")
    _density_axis(ax)
    ax.set_ylabel("error")
    ax.set_title("error against density")
    if len(runs) <= 10:
        ax.legend(frameon=False, fontsize=7)
    return fig


def survival_curves(survival: pl.DataFrame, run: str):
    """Fraction of round n's kept weights still kept in round n+1, per block."""
    part = survival.filter(pl.col("run") == run)
    fig = new_figure(6.0, 3.8)
    ax = fig.subplots()
    for k, block in enumerate(_blocks(part)):
        rows = part.filter(pl.col("block") == block).sort("round")
        ax.plot(rows["round"], rows["survival"], marker=marker(k), color=color(k), label=block)
    ax.set_xlabel("round n")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("survival n → n+1")
    ax.set_title(f"{elide(run, TITLE_CHARS)}\nmask survival")
    ax.set_ylim(top=1.02)
    ax.legend(frameon=False, fontsize=7)
    return fig


def lmc_barriers(summary: pl.DataFrame):
    """Paul et al.: the error barrier between rounds n and n+1 against the density of n+1;
    filled markers: round n+1 is matching."""
    runs = list(dict.fromkeys(summary["run"].to_list()))
    labels = short_labels(runs)
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    for k, run in enumerate(runs):
        part = summary.filter(pl.col("run") == run).sort("round")
        ax.plot(part["density"], part["barrier"], "-", color=color(k), linewidth=1, label=labels[run])
        for matching, face in ((True, color(k)), (False, "white")):
            sel = part.filter(pl.col("matching") == matching)
            ax.scatter(sel["density"], sel["barrier"], marker=marker(k), facecolors=face, edgecolors=color(k),
                       zorder=3)
        unknown = part.filter(pl.col("matching").is_null())   # the run has no round 0 to compare with
        if unknown.height:
            ax.scatter(unknown["density"], unknown["barrier"], marker="x", color=color(k), zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    _density_axis(ax, "density of round n+1")
    ax.set_ylabel("error barrier, round n → n+1")
    title = "linear mode connectivity (filled: n+1 matching"
    ax.set_title(title + ("; x: unknown, no round 0)" if summary["matching"].null_count() else ")"))
    if len(runs) <= 10:
        ax.legend(frameon=False, fontsize=7)
    return fig


def lmc_curves(curves: pl.DataFrame, run: str):
    """Test error along each segment n → n+1, coloured by round."""
    part = curves.filter(pl.col("run") == run)
    rounds = sorted(part["round"].unique().to_list())
    norm = Normalize(min(rounds), max(max(rounds), min(rounds) + 1))
    cmap = matplotlib.colormaps[SEQUENTIAL]
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    for r in rounds:
        seg = part.filter(pl.col("round") == r).sort("alpha")
        end = seg["next_round"][0] if "next_round" in seg.columns else r + 1   # tables of older releases
        ax.plot(seg["alpha"], seg["error"], "-o", markersize=3, color=cmap(norm(r)), label=f"{r} → {end}")
    ax.set_xlabel("α (0: round n, 1: the next round analysed)")
    ax.set_ylabel("test error")
    ax.set_title(f"{elide(run, TITLE_CHARS)}\nerror along the linear path")
    # the colour bar reads the round at any count; a legend as well while it stays short
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    bar.set_label("round n of the segment n → n+1")
    if len(rounds) <= 6:
        ax.legend(frameon=False, fontsize=7)
    return fig


def sharpness_plot(sharpness: pl.DataFrame, probe: pl.DataFrame | None = None):
    """Top Hessian eigenvalue per round; with a probe, the largest matching pruning fraction."""
    runs = list(dict.fromkeys(sharpness["run"].to_list()))
    labels = short_labels(runs)
    fig = new_figure(10.0 if probe is not None else 6.0, 4.0)
    axes = fig.subplots(1, 2 if probe is not None else 1, squeeze=False).ravel()
    for k, run in enumerate(runs):
        part = sharpness.filter(pl.col("run") == run).sort("round")
        axes[0].plot(part["density"], part["lambda_max"], marker=marker(k), color=color(k), label=labels[run])
    _density_axis(axes[0])
    axes[0].set_ylabel("top Hessian eigenvalue λ_max")
    axes[0].set_title("sharpness at the end of each round")
    axes[0].legend(frameon=False, fontsize=7)
    if probe is not None:
        best = (probe.filter(pl.col("matching")).group_by("run", "round").agg(pl.col("fraction").max())
                .join(sharpness, on=["run", "round"]))
        for k, run in enumerate(runs):
            part = best.filter(pl.col("run") == run)
            axes[1].scatter(part["lambda_max"], part["fraction"], marker=marker(k), color=color(k), label=labels[run])
        axes[1].set_xlabel("λ_max of round n")
        axes[1].set_ylabel("largest fraction still matching")
        axes[1].set_title("flatness limits the pruning step")
    return fig


def dendrogram(tree: pl.DataFrame, units: Sequence[str], threshold: float):
    """The universality classes' dendrogram (average linkage on RMS sigma distance), with the cut."""
    from scipy.cluster.hierarchy import dendrogram as draw

    index = {u: i for i, u in enumerate(units)}
    for step in tree["step"].to_list():
        index[f"#{step}"] = len(units) + step - 1
    z = np.array([[index[r["left"]], index[r["right"]], r["distance"], r["size"]] for r in tree.iter_rows(named=True)],
                 dtype=np.float64)
    labels = short_labels(list(units))
    slanted = len(units) > 6
    longest = max((len(v) for v in labels.values()), default=0)
    fig = new_figure(min(14.0, max(5.0, 0.4 * len(units) + 2)), 4.0 + (0.06 * longest if slanted else 0.0))
    ax = fig.subplots()
    draw(z, labels=[labels[u] for u in units], ax=ax, color_threshold=threshold, above_threshold_color="#999999",
         leaf_rotation=0)
    if slanted:   # anchored at their right end, so the layout makes room below for the whole label
        for text in ax.get_xticklabels():
            text.set_rotation(45)
            text.set_ha("right")
            text.set_rotation_mode("anchor")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"cut at {threshold:.3g}")
    top = max([threshold, *(z[:, 2] if len(z) else [0.0])])
    ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)   # the cut is drawn inside the axis, however high
    ax.set_ylabel("RMS σ distance (average linkage)")
    ax.set_title("universality classes")
    ax.legend(frameon=False)
    return fig


def transfer_accuracy(summary: pl.DataFrame, source: str, target: str):
    """Test accuracy on the target against the ticket's density, one line per arm (mean ± SEM
    over seeds): the transferred ticket between the target's own and the random masks."""
    part = summary.filter((pl.col("source") == source) & (pl.col("target") == target))
    from flowscan.stats.transfer import ARMS

    arms = [a for a in ARMS if a in set(part["arm"].to_list())]
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    for k, arm in enumerate(arms):
        rows = part.filter(pl.col("arm") == arm).sort("density", descending=True)
        ax.errorbar(rows["density"], rows["accuracy_mean"], yerr=rows["accuracy_sem"].fill_nan(0),
                    marker=marker(k), color=color(k), linewidth=1, capsize=2, label=arm.replace("_", " "))
    _density_axis(ax, "density of the source ticket")
    ax.set_ylabel(f"test accuracy on {target}")
    ax.set_title(f"ticket transfer {source} → {target} (mean ± SEM over seeds)")
    ax.legend(frameon=False, fontsize=7)
    return fig


def transfer_sigma_gap(pairs: pl.DataFrame, correlation: str | None = None):
    """Universality tested: each pair's transfer gap (transferred − per-layer random, ± SEM)
    against its sigma distance; the prediction is a falling trend."""
    fig = new_figure(5.6, 4.2)
    ax = fig.subplots()
    usable = pairs.filter(pl.col("sigma_rms").is_finite() & pl.col("gap_mean").is_finite())
    conflict = usable["n_conflicts"].fill_null(0) > 0
    for k, (flag, face) in enumerate(((False, color(0)), (True, "white"))):
        sel = usable.filter(conflict == flag)
        if sel.height:
            ax.errorbar(sel["sigma_rms"], sel["gap_mean"], yerr=sel["gap_sem"].fill_nan(0), fmt="o",
                        color=color(0), markerfacecolor=face, capsize=2,
                        label="relevance conflict" if flag else "relevance agrees")
    for row in usable.iter_rows(named=True):
        ax.annotate(f"{row['source']}→{row['target']}", (row["sigma_rms"], row["gap_mean"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("σ distance (RMS over shared blocks)")
    ax.set_ylabel("transfer gap: transferred − per-layer random")
    ax.set_title(correlation or "σ distance against transfer gap", fontsize=9)
    if usable.height:
        ax.legend(frameon=False, fontsize=7)
    return fig
