"""Sigma per unit (run or experiment) and block, from one or more analysis folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import polars as pl

from flowscan.stats.aggregate import aggregate
from flowscan.stats.compare import sigma_table
from flowscan.stats.groups import Grouping


def sigma_units(outs: Sequence[Path], level: str = "run", quantity: str = "M",
                grouping: Grouping = Grouping()) -> pl.DataFrame:
    """unit, block, sigma, sigma_sem; units are prefixed by their folder when several are given."""
    from flowscan.tables import read_tables

    frames = []
    labels = _labels(outs)
    for out, label in zip(outs, labels):
        t = read_tables(out, ("runs", "eigen", "steps"))
        if level == "experiment":
            frame = sigma_table(aggregate(t["eigen"], t["runs"], t["steps"], grouping.for_folder(out)),
                                "experiment", quantity)
        else:
            ok = t["runs"].filter(pl.col("status") == "ok")["run"]
            frame = sigma_table(t["eigen"].filter(pl.col("run").is_in(ok.to_list())), "run", quantity)
        if len(outs) > 1:
            frame = frame.with_columns((pl.lit(f"{label}:") + pl.col("unit")).alias("unit"))
        frames.append(frame)
    return pl.concat(frames)


def _labels(outs: Sequence[Path]) -> list[str]:
    names = [Path(o).resolve().name for o in outs]
    return names if len(set(names)) == len(names) else [f"{i}-{n}" for i, n in enumerate(names, 1)]


@dataclass
class Analysis:
    """An analysis folder's tables plus the statistics derived from them."""

    out: Path
    tables: dict[str, pl.DataFrame]
    experiments: pl.DataFrame
    points: pl.DataFrame | None            # (density, error) for the scaling fit, if any metric
    scaling: pl.DataFrame | None
    compare: pl.DataFrame
    classes: dict[str, int]
    metadata: dict[str, str]
    landscape: dict[str, pl.DataFrame] = field(default_factory=dict)  # lmc*, sharpness, if computed
    warnings: list[str] = field(default_factory=list)                 # derived tables left out
    transfer: dict[str, pl.DataFrame] = field(default_factory=dict)   # transfer*, if `transfer` ran here


# from `flowscan transfer`: they join pairs of archives, so they belong to no one analysis
TRANSFER_TABLES = ("transfer", "transfer_summary", "transfer_overlap", "transfer_pairs", "transfer_correlation")


def load_analysis(out: Path, grouping: Grouping = Grouping(), bootstrap: int = 100,
                  quantity: str = "M") -> Analysis:
    """Read the tables; use experiments/scaling tables written earlier, else compute them."""
    from flowscan.errors import FlowscanError
    from flowscan.stats.compare import compare
    from flowscan.stats.critical import error_points, fit_scaling
    from flowscan.tables import LANDSCAPE_TABLES, read_derived, read_metadata, read_tables

    out = Path(out)
    grouping = grouping.for_folder(out)
    warnings: list[str] = []
    tables = read_tables(out, optional=("survival",))
    experiments = read_derived(out, "experiments", warnings)
    if experiments is None:
        experiments = aggregate(tables["eigen"], tables["runs"], tables["steps"], grouping)
    try:
        points = error_points(tables["metrics"], tables["rounds"])
    except FlowscanError:
        points = None
    scaling = read_derived(out, "scaling", warnings)
    if scaling is None:
        scaling = fit_scaling(points, grouping, n_bootstrap=bootstrap) if points is not None else None
    pairs, classes = compare(sigma_units([out], "run", quantity, grouping))
    landscape = {n: frame for n in LANDSCAPE_TABLES if (frame := read_derived(out, n, warnings)) is not None}
    transfer = {n: pl.read_parquet(out / f"{n}.parquet") for n in TRANSFER_TABLES}  \
        if all((out / f"{n}.parquet").is_file() for n in TRANSFER_TABLES) else {}
    return Analysis(out, tables, experiments, points, scaling, pairs, classes,
                    read_metadata(out / "runs.parquet"), landscape, warnings, transfer)
