"""Per experiment and block: sigma and lambda pooled over the replicates' steps, sigma_fit across them.

`sigma_mean`/`sigma_sem` are the paper's per-run estimator extended across seeds: the mean and
SEM (ddof = 1) over every valid IMP step of every replicate, pooled. Relevance is decided on
them. `sigma_between_sem` is the SEM of the per-run means (ddof = 1): the spread between seeds
only, which ignores the spread over rounds within each run and so is far smaller; it is kept as
its own column, never used for relevance.
"""

from __future__ import annotations

import polars as pl

from flowscan.flow import relevance
from flowscan.stats.groups import Grouping

KEYS = ("experiment", "block", "quantity")


def _mean_sem(column: str, name: str) -> list[pl.Expr]:
    finite = pl.col(column).filter(pl.col(column).is_finite())
    return [finite.mean().fill_null(float("nan")).alias(f"{name}_mean"),
            (finite.std(ddof=1) / finite.count().sqrt()).fill_null(float("nan")).alias(f"{name}_sem")]


def aggregate(eigen: pl.DataFrame, runs: pl.DataFrame, steps: pl.DataFrame,
              grouping: Grouping = Grouping()) -> pl.DataFrame:
    """experiments table: experiment, block, quantity, n_runs, n_steps, sigma/lambda `_mean` and
    `_sem` pooled over valid steps, sigma_between_sem, sigma_fit `_mean`/`_sem` across runs,
    relevance, task, architecture."""
    ok = runs.filter(pl.col("status") == "ok")["run"].to_list()
    members = grouping.membership(ok)
    per_run = (eigen.join(members, on="run", how="inner").group_by(KEYS).agg(
        pl.col("run").n_unique().cast(pl.Int64).alias("n_runs"),
        *_mean_sem("sigma_fit", "sigma_fit"),
        _mean_sem("sigma_mean", "between")[1].alias("sigma_between_sem"),
        pl.col("task").drop_nulls().first(), pl.col("architecture").drop_nulls().first()))
    pooled = (steps.filter(pl.col("valid")).join(members.select("run", "experiment"), on="run", how="inner")
              .group_by(KEYS).agg(pl.len().cast(pl.Int64).alias("n_steps"), *_mean_sem("sigma", "sigma"),
                                  *_mean_sem("lambda", "lambda")))
    # blocks keep their model order (first appearance in the eigen table), not label order
    order = eigen.with_row_index("_row").group_by("block").agg(pl.col("_row").min())
    frame = (per_run.join(pooled, on=KEYS, how="left").join(order, on="block")
             .sort("experiment", "quantity", "_row").drop("_row")
             .with_columns(pl.col("n_steps").fill_null(0),
                           *[pl.col(c).fill_null(float("nan")) for c in
                             ("sigma_mean", "sigma_sem", "lambda_mean", "lambda_sem")]))
    columns = ["experiment", "block", "quantity", "n_runs", "n_steps", "sigma_mean", "sigma_sem",
               "sigma_between_sem", "lambda_mean", "lambda_sem", "sigma_fit_mean", "sigma_fit_sem",
               "task", "architecture"]
    frame = frame.select(columns)
    classes = [relevance(m, s) for m, s in zip(frame["sigma_mean"], frame["sigma_sem"])]
    return frame.with_columns(pl.Series("relevance", classes, dtype=pl.String))
