"""Tables of ticket transfer (see produce/transfer.py): per cell, per arm, per pair, and the test.

- `transfer`: one row per (source, target, seed, source_round, arm): accuracy, loss, steps.
- `transfer_summary`: mean ± SEM over seeds per arm, and each arm's gap to the per-layer random
  mask (`random_layer`), paired by seed: the mean and SEM of the per-seed differences. The
  transferred arm's gap is the transfer effect: > 0 means the ticket carries more than its
  layer densities.
- `transfer_overlap`: the transferred ticket against the target's own, observed vs chance.
- `transfer_pairs`: per pair, the transfer gap (mean over the chosen densities) beside the sigma
  distance `compare` measures; `transfer_correlation`: with >= 4 pairs, Spearman's rho between
  the two. The universality prediction is a negative rho: the closer the sigma vectors, the
  better the ticket transfers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl

# the arms of a transfer (produce/transfer.py trains them), in the order figures list them
ARMS = ("own", "transferred", "transferred_source_init", "shuffled", "random_layer", "random_global")
DEFAULT_ARMS = tuple(a for a in ARMS if a != "shuffled")
BASELINE = "random_layer"
MIN_PAIRS = 4

TRANSFER_SCHEMA = {
    "source": pl.String, "target": pl.String, "seed": pl.Int64, "source_round": pl.Int64, "arm": pl.String,
    "density": pl.Float64, "ticket_density": pl.Float64, "init": pl.String, "accuracy": pl.Float64,
    "loss": pl.Float64, "steps": pl.Int64, "train_seconds": pl.Float64, "own_round": pl.Int64,
    "recorded_accuracy": pl.Float64, "source_run": pl.String, "target_run": pl.String, "n_filled": pl.Int64,
}
OVERLAP_SCHEMA = {
    "source": pl.String, "target": pl.String, "seed": pl.Int64, "source_round": pl.Int64, "own_round": pl.Int64,
    "ticket_density": pl.Float64, "own_density": pl.Float64, "kept_ticket": pl.Int64, "kept_own": pl.Int64,
    "kept_both": pl.Int64, "overlap": pl.Float64, "chance": pl.Float64, "overlap_ratio": pl.Float64,
    "jaccard": pl.Float64,
}
PAIRS_SCHEMA = {
    "source": pl.String, "target": pl.String, "n_rounds": pl.Int64, "n_seeds": pl.Int64, "gap_mean": pl.Float64,
    "gap_sem": pl.Float64, "own_gap_mean": pl.Float64, "sigma_rms": pl.Float64, "n_shared_blocks": pl.Int64,
    "n_conflicts": pl.Int64, "conflict_blocks": pl.String, "overlap_mean": pl.Float64, "chance_mean": pl.Float64,
    "same_archive": pl.Boolean,
}
CORRELATION_SCHEMA = {"n_pairs": pl.Int64, "spearman_rho": pl.Float64, "p_value": pl.Float64,
                      "statement": pl.String}


def read_cells(cells: Path) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    """(every cell, sigma distance per pair) under OUT/transfer-runs/."""
    rows, sigma = [], {}
    for pair in sorted(p for p in Path(cells).iterdir() if p.is_dir()) if Path(cells).is_dir() else ():
        found = [json.loads(f.read_text()) for f in sorted(pair.glob("*/seed_*/round_*.json"))]
        rows += found
        if found and (pair / "sigma.json").is_file():
            sigma[(found[0]["source"], found[0]["target"])] = json.loads((pair / "sigma.json").read_text())
    return rows, sigma


def cell_table(cells: list[dict]) -> pl.DataFrame:
    rows = [{"source": c["source"], "target": c["target"], "seed": c["seed"], "source_round": c["source_round"],
             "arm": c["arm"], "density": c["density"], "ticket_density": c["ticket_density"], "init": c["init"],
             "accuracy": c["metrics"]["test_accuracy"], "loss": c["metrics"]["test_loss"],
             "steps": int(c["metrics"]["train_steps"]), "train_seconds": c["metrics"].get("train_seconds"),
             "own_round": c["own_round"] if c["arm"] == "own" else None,
             "recorded_accuracy": c.get("recorded_accuracy"), "source_run": c["source_run"],
             "target_run": c["target_run"], "n_filled": len(c.get("filled", []))} for c in cells]
    frame = pl.DataFrame(rows, schema=TRANSFER_SCHEMA) if rows else pl.DataFrame(schema=TRANSFER_SCHEMA)
    return frame.sort("source", "target", "source_round", "arm", "seed")


def overlap_table(cells: list[dict]) -> pl.DataFrame:
    seen, rows = set(), []
    for c in cells:
        key = (c["source"], c["target"], c["seed"], c["source_round"])
        if key in seen:
            continue
        seen.add(key)
        o = c["overlap"]
        rows.append({"source": c["source"], "target": c["target"], "seed": c["seed"],
                     "source_round": c["source_round"], "own_round": c["own_round"],
                     "ticket_density": c["ticket_density"], "own_density": c["own_density"],
                     "kept_ticket": int(o["kept_a"]), "kept_own": int(o["kept_b"]), "kept_both": int(o["both"]),
                     "overlap": o["overlap"], "chance": o["chance"],
                     "overlap_ratio": o["overlap"] / o["chance"] if o["chance"] else math.nan,
                     "jaccard": o["jaccard"]})
    frame = pl.DataFrame(rows, schema=OVERLAP_SCHEMA) if rows else pl.DataFrame(schema=OVERLAP_SCHEMA)
    return frame.sort("source", "target", "source_round", "seed")


def _sem(values: pl.Expr) -> pl.Expr:
    return (values.std(ddof=1) / values.count().sqrt()).fill_null(math.nan)


def summary(cells: pl.DataFrame) -> pl.DataFrame:
    """Mean ± SEM per (pair, source round, arm), and the gap to `random_layer` paired by seed."""
    keys = ["source", "target", "source_round"]
    baseline = cells.filter(pl.col("arm") == BASELINE).select(*keys, "seed", pl.col("accuracy").alias("_base"))
    paired = cells.join(baseline, on=[*keys, "seed"], how="left").with_columns(
        (pl.col("accuracy") - pl.col("_base")).alias("_gap"))
    return (paired.group_by(*keys, "arm").agg(
        pl.col("seed").n_unique().cast(pl.Int64).alias("n_seeds"),
        pl.col("density").mean().alias("density"),
        pl.col("accuracy").mean().alias("accuracy_mean"), _sem(pl.col("accuracy")).alias("accuracy_sem"),
        pl.col("loss").mean().alias("loss_mean"), _sem(pl.col("loss")).alias("loss_sem"),
        pl.col("_gap").drop_nulls().count().cast(pl.Int64).alias("n_paired"),
        pl.col("_gap").drop_nulls().mean().fill_null(math.nan).alias("gap_mean"),
        _sem(pl.col("_gap").drop_nulls()).alias("gap_sem"))
        .sort(*keys, "arm"))


def pairs(summary_frame: pl.DataFrame, overlap: pl.DataFrame, sigma: dict[tuple[str, str], dict],
          cells: pl.DataFrame) -> pl.DataFrame:
    """Per pair: the transferred arm's gap averaged over its densities (SEM: the per-density SEMs
    combined as independent), the own ticket's gap, the sigma distance, the mask overlap, and
    whether source and target are one archive (its tickets transferred to itself)."""
    rows = []
    for (source, target), part in summary_frame.group_by("source", "target", maintain_order=True):
        moved = part.filter(pl.col("arm") == "transferred")
        own = part.filter(pl.col("arm") == "own")
        sems = moved["gap_sem"].to_numpy()
        gap_sem = float(np.sqrt(np.sum(sems ** 2)) / len(sems)) if len(sems) and np.isfinite(sems).all() else math.nan
        o = overlap.filter((pl.col("source") == source) & (pl.col("target") == target))
        s = sigma.get((source, target), {})
        runs = cells.filter((pl.col("source") == source) & (pl.col("target") == target))
        same = bool(runs.height) and bool((runs["source_run"] == runs["target_run"]).all())
        rows.append({"source": source, "target": target, "n_rounds": moved.height, "same_archive": same,
                     "n_seeds": int(part["n_seeds"].max()) if part.height else 0,
                     "gap_mean": _mean(moved["gap_mean"]), "gap_sem": gap_sem, "own_gap_mean": _mean(own["gap_mean"]),
                     "sigma_rms": s.get("rms", math.nan), "n_shared_blocks": s.get("n_shared_blocks"),
                     "n_conflicts": s.get("n_conflicts"), "conflict_blocks": s.get("conflict_blocks"),
                     "overlap_mean": _mean(o["overlap"]), "chance_mean": _mean(o["chance"])})
    return pl.DataFrame(rows, schema=PAIRS_SCHEMA) if rows else pl.DataFrame(schema=PAIRS_SCHEMA)


def _mean(series: pl.Series) -> float:
    values = series.drop_nulls().to_numpy()
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def correlation(pairs_frame: pl.DataFrame) -> pl.DataFrame:
    """Spearman's rho between sigma distance and transfer gap over the pairs that have both.
    An archive transferred to itself is left out: its ticket is the target's own and its distance
    0 by construction, so it would only pull rho towards the prediction."""
    from scipy.stats import spearmanr

    usable = pairs_frame.filter(pl.col("sigma_rms").is_finite() & pl.col("gap_mean").is_finite()
                                & ~pl.col("same_archive").fill_null(False))
    n = usable.height
    if n < MIN_PAIRS:
        statement = (f"{n} pair(s) of two archives with both a sigma distance and a transfer gap; the "
                     f"correlation needs at least {MIN_PAIRS}")
        return pl.DataFrame([[n, math.nan, math.nan, statement]], schema=CORRELATION_SCHEMA, orient="row")
    distance, gap = usable["sigma_rms"].to_numpy(), usable["gap_mean"].to_numpy()
    if np.ptp(distance) == 0 or np.ptp(gap) == 0:
        statement = f"{n} pairs, but sigma distance or gap is constant across them: no rank correlation"
        return pl.DataFrame([[n, math.nan, math.nan, statement]], schema=CORRELATION_SCHEMA, orient="row")
    result = spearmanr(distance, gap)
    rho, p = float(result.statistic), float(result.pvalue)
    verdict = ("as predicted, closer sigma vectors transfer better" if rho < 0 else
               "against the prediction: closer sigma vectors do not transfer better")
    statement = f"Spearman rho = {rho:+.3f} over {n} pairs (p = {p:.3g}): {verdict}"
    return pl.DataFrame([[n, rho, p, statement]], schema=CORRELATION_SCHEMA, orient="row")


def transfer_tables(cells_folder: Path) -> dict[str, pl.DataFrame]:
    cells, sigma = read_cells(cells_folder)
    table = cell_table(cells)
    overlap = overlap_table(cells)
    summ = summary(table)
    pair_frame = pairs(summ, overlap, sigma, table)
    return {"transfer": table, "transfer_summary": summ, "transfer_overlap": overlap,
            "transfer_pairs": pair_frame, "transfer_correlation": correlation(pair_frame)}
