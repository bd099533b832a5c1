"""Per experiment and block: mean ± SEM across replicates of sigma, lambda and sigma_fit."""

from __future__ import annotations

import polars as pl

from flowscan.flow import relevance
from flowscan.stats.groups import Grouping

# experiments column prefix -> eigen column averaged across the replicates
STATS = {"sigma": "sigma_mean", "lambda": "lambda_mean", "sigma_fit": "sigma_fit"}


def aggregate(eigen: pl.DataFrame, runs: pl.DataFrame, grouping: Grouping = Grouping()) -> pl.DataFrame:
    """experiments table: experiment, block, quantity, n_runs, <stat>_mean, <stat>_sem, relevance,
    task, architecture. The SEM is across replicates (ddof = 1; NaN for a single run)."""
    ok = runs.filter(pl.col("status") == "ok")["run"].to_list()
    joined = eigen.join(grouping.membership(ok), on="run", how="inner")
    aggs = [pl.col("run").n_unique().cast(pl.Int64).alias("n_runs")]
    for name, column in STATS.items():
        finite = pl.col(column).filter(pl.col(column).is_finite())
        aggs += [finite.mean().fill_null(float("nan")).alias(f"{name}_mean"),
                 (finite.std(ddof=1) / finite.count().sqrt()).fill_null(float("nan")).alias(f"{name}_sem")]
    aggs += [pl.col("task").drop_nulls().first(), pl.col("architecture").drop_nulls().first()]
    # blocks keep their model order (first appearance in the eigen table), not label order
    order = eigen.with_row_index("_row").group_by("block").agg(pl.col("_row").min())
    frame = (joined.group_by("experiment", "block", "quantity").agg(aggs)
             .join(order, on="block").sort("experiment", "quantity", "_row").drop("_row"))
    classes = [relevance(m, s) for m, s in zip(frame["sigma_mean"], frame["sigma_sem"])]
    return frame.with_columns(pl.Series("relevance", classes, dtype=pl.String))
