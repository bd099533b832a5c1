"""Sigma per unit (run or experiment) and block, from one or more analysis folders."""

from __future__ import annotations

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
        t = read_tables(out, ("runs", "eigen"))
        if level == "experiment":
            frame = sigma_table(aggregate(t["eigen"], t["runs"], grouping), "experiment", quantity)
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
