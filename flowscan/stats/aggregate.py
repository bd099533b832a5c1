"""Per experiment and block: sigma and lambda pooled over the replicates' steps, sigma_fit across them.

Steps of one seed are not independent of each other in the way steps of different seeds are: seeds
differ by their initialisation and data order, and a block can flow faster in one seed than in
another. So the error bar of an experiment's sigma (`sigma_sem`, on which relevance is decided) is
the larger of two estimates, never the smaller:

- `sigma_pooled_sem`: the SEM (ddof = 1) over every valid step of every replicate, pooled (the
  paper's per-run estimator extended across seeds): right when seeds agree, too small when they
  differ, since it counts steps of one seed as independent draws of the experiment's sigma;
- `sigma_between_sem`: the SEM (ddof = 1) of the per-run means: the spread between seeds, with each
  run's own step noise inside it (it needs two runs or more).

tests/test_stats.py checks this against simulated seeds that differ by construction. lambda gets
the same treatment, after each step's lambda is normalised to one round (lambda^(1/span)). A block
that no run prunes is `never_pruned`.
"""

from __future__ import annotations

import polars as pl

from flowscan.flow import relevance
from flowscan.stats.groups import Grouping

KEYS = ("experiment", "block", "quantity")


def _finite(column: str) -> pl.Expr:
    return pl.col(column).filter(pl.col(column).is_finite())


def _mean_sem(column: str, name: str) -> list[pl.Expr]:
    finite = _finite(column)
    return [finite.mean().fill_null(float("nan")).alias(f"{name}_mean"),
            (finite.std(ddof=1) / finite.count().sqrt()).fill_null(float("nan")).alias(f"{name}_sem")]


def _larger(a: str, b: str) -> pl.Expr:
    """The larger of two SEMs where both are finite; the one that is finite otherwise."""
    return (pl.when(pl.col(a).is_nan()).then(pl.col(b))
            .when(pl.col(b).is_nan()).then(pl.col(a))
            .otherwise(pl.max_horizontal(a, b)))


def aggregate(eigen: pl.DataFrame, runs: pl.DataFrame, steps: pl.DataFrame,
              grouping: Grouping = Grouping()) -> pl.DataFrame:
    """experiments table: experiment, block, quantity, n_runs, n_steps, sigma/lambda `_mean`, `_sem`
    (the larger of the pooled and the between-seed SEM), `_pooled_sem`, `_between_sem`, sigma_fit
    `_mean`/`_sem` across runs, relevance, task, architecture."""
    ok = runs.filter(pl.col("status") == "ok")["run"].to_list()
    members = grouping.membership(ok)
    valid = (steps.filter(pl.col("valid")).join(members.select("run", "experiment"), on="run", how="inner")
             .with_columns((pl.col("lambda") ** (1.0 / pl.col("span"))).alias("lambda")))
    run_means = valid.group_by("run", *KEYS).agg(_finite("sigma").mean().alias("run_sigma"),
                                                  _finite("lambda").mean().alias("run_lambda"))
    between = run_means.group_by(KEYS).agg(_mean_sem("run_sigma", "sigma_between")[1],
                                           _mean_sem("run_lambda", "lambda_between")[1])
    per_run = (eigen.join(members, on="run", how="inner").group_by(KEYS).agg(
        pl.col("run").n_unique().cast(pl.Int64).alias("n_runs"),
        *_mean_sem("sigma_fit", "sigma_fit"),
        (pl.col("relevance") == "never_pruned").all().alias("never_pruned"),
        pl.col("task").drop_nulls().first(), pl.col("architecture").drop_nulls().first()))
    pooled = valid.group_by(KEYS).agg(pl.len().cast(pl.Int64).alias("n_steps"),
                                      *_mean_sem("sigma", "sigma"), *_mean_sem("lambda", "lambda"))
    pooled = pooled.rename({"sigma_sem": "sigma_pooled_sem", "lambda_sem": "lambda_pooled_sem"})
    nan = float("nan")
    # blocks keep their model order (first appearance in the eigen table), not label order
    order = eigen.with_row_index("_row").group_by("block").agg(pl.col("_row").min())
    frame = (per_run.join(pooled, on=KEYS, how="left").join(between, on=KEYS, how="left").join(order, on="block")
             .sort("experiment", "quantity", "_row").drop("_row")
             .with_columns(pl.col("n_steps").fill_null(0),
                           *[pl.col(c).fill_null(nan) for c in
                             ("sigma_mean", "sigma_pooled_sem", "lambda_mean", "lambda_pooled_sem",
                              "sigma_between_sem", "lambda_between_sem")])
             .with_columns(_larger("sigma_pooled_sem", "sigma_between_sem").alias("sigma_sem"),
                           _larger("lambda_pooled_sem", "lambda_between_sem").alias("lambda_sem")))
    columns = ["experiment", "block", "quantity", "n_runs", "n_steps", "sigma_mean", "sigma_sem",
               "sigma_pooled_sem", "sigma_between_sem", "lambda_mean", "lambda_sem", "lambda_pooled_sem",
               "lambda_between_sem", "sigma_fit_mean", "sigma_fit_sem", "task", "architecture"]
    classes = [relevance(m, s, never) for m, s, never in zip(frame["sigma_mean"], frame["sigma_sem"],
                                                              frame["never_pruned"])]
    return frame.select(columns).with_columns(pl.Series("relevance", classes, dtype=pl.String))
