"""Universality comparison: how alike the sigma vectors of runs (or experiments) are.

For each pair: Euclidean, RMS (Euclidean / sqrt(shared blocks), comparable across block
counts) and cosine distances over the blocks both have, and whether their relevant and
irrelevant blocks agree (Redman et al.'s proxy for "winning tickets transfer": a conflict is a
block relevant in one and irrelevant in the other; marginal blocks conflict with nothing).
Units are clustered hierarchically (average linkage on the RMS distance) into classes.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from flowscan.flow import relevance

COMPARE_SCHEMA = {
    "a": pl.String, "b": pl.String, "n_shared_blocks": pl.Int64, "euclidean": pl.Float64, "rms": pl.Float64,
    "cosine_distance": pl.Float64, "n_conflicts": pl.Int64, "relevance_agree": pl.Boolean,
    "conflict_blocks": pl.String, "class_a": pl.Int64, "class_b": pl.Int64, "same_class": pl.Boolean,
}


def sigma_table(frame: pl.DataFrame, unit: str, quantity: str = "M") -> pl.DataFrame:
    """unit, block, sigma, sigma_sem from an eigen (unit='run') or experiments table."""
    if "sigma_sem" in frame.columns and "sigma_mean" in frame.columns:
        return (frame.filter(pl.col("quantity") == quantity)
                .select(pl.col(unit).alias("unit"), "block", pl.col("sigma_mean").alias("sigma"), "sigma_sem"))
    raise ValueError("need a table with sigma_mean and sigma_sem columns")


def compare(sigmas: pl.DataFrame, threshold: float = 0.1) -> tuple[pl.DataFrame, dict[str, int]]:
    """(pairs table, class of each unit). `sigmas` has unit, block, sigma, sigma_sem."""
    units = list(dict.fromkeys(sigmas["unit"].to_list()))
    vectors = {u: {} for u in units}
    for u, block, sigma, sem in sigmas.iter_rows():
        if sigma is not None and math.isfinite(sigma):
            vectors[u][block] = (sigma, sem if sem is not None else math.nan)
    pairs, dist = [], np.zeros((len(units), len(units)))
    for (i, a), (j, b) in itertools.combinations(enumerate(units), 2):
        shared = [blk for blk in vectors[a] if blk in vectors[b]]
        va = np.array([vectors[a][blk][0] for blk in shared])
        vb = np.array([vectors[b][blk][0] for blk in shared])
        euclid = float(np.linalg.norm(va - vb)) if shared else math.nan
        rms = euclid / math.sqrt(len(shared)) if shared else math.nan
        norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
        cosine = 1.0 - float(va @ vb) / norm if shared and norm > 0 else math.nan
        conflicts = [blk for blk in shared if {relevance(*vectors[a][blk]), relevance(*vectors[b][blk])}
                     == {"relevant", "irrelevant"}]
        pairs.append([a, b, len(shared), euclid, rms, cosine, len(conflicts), bool(shared) and not conflicts,
                      ", ".join(conflicts) or None])
        dist[i, j] = dist[j, i] = rms
    classes = _classes(units, dist, threshold)
    rows = [p + [classes[p[0]], classes[p[1]], classes[p[0]] == classes[p[1]]] for p in pairs]
    table = pl.DataFrame(rows, schema=COMPARE_SCHEMA, orient="row") if rows else pl.DataFrame(schema=COMPARE_SCHEMA)
    return table, classes


def _classes(units: list[str], dist: np.ndarray, threshold: float) -> dict[str, int]:
    if len(units) < 2:
        return {u: 1 for u in units}
    finite = dist[np.isfinite(dist)]
    # units without shared blocks are as far apart as anything measured, and then some
    dist = np.where(np.isfinite(dist), dist, (finite.max() if finite.size else 1.0) * 10 + threshold)
    labels = fcluster(linkage(squareform(dist, checks=False), method="average"), t=threshold, criterion="distance")
    return {u: int(c) for u, c in zip(units, labels)}
