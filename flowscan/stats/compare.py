"""Universality comparison: how alike the sigma vectors of runs (or experiments) are.

For each pair: Euclidean, RMS (Euclidean / sqrt(shared blocks), comparable across block
counts) and cosine distances over the blocks both have, and whether their relevant and
irrelevant blocks agree (Redman et al.'s proxy for "winning tickets transfer": a conflict is a
block relevant in one and irrelevant in the other; marginal blocks conflict with nothing).
Units are clustered hierarchically (average linkage on the RMS distance) into classes, cut at a
threshold taken by default from the data's own uncertainty: twice the median over pairs of the
RMS distance that the SEMs alone would produce (`noise_rms`), so units whose sigma vectors differ
by no more than their error bars fall together. A class never holds two units whose relevance
conflicts on a shared block: such a class is split (greedily, in linkage order). `tree()` gives
the dendrogram as a table, for the figure and for anyone who wants another cut. A block that is
never pruned in a unit (relevance `never_pruned`) is left out of that unit's vector: its shares
move only because the others are pruned, so its sigma says nothing about the flow.
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
    "conflict_blocks": pl.String, "noise_rms": pl.Float64, "threshold": pl.Float64,
    "class_a": pl.Int64, "class_b": pl.Int64, "same_class": pl.Boolean,
}
TREE_SCHEMA = {"step": pl.Int64, "left": pl.String, "right": pl.String, "distance": pl.Float64, "size": pl.Int64}
FALLBACK_THRESHOLD = 0.1   # when no pair has finite SEMs to derive one from
NOISE_FACTOR = 2.0         # distances within twice the SEM-only distance are indistinguishable


def sigma_table(frame: pl.DataFrame, unit: str, quantity: str = "M") -> pl.DataFrame:
    """unit, block, sigma, sigma_sem, relevance (null where the table has none) from an eigen
    (unit='run') or experiments table."""
    if "sigma_sem" in frame.columns and "sigma_mean" in frame.columns:
        verdict = pl.col("relevance") if "relevance" in frame.columns else pl.lit(None, pl.String)
        return (frame.filter(pl.col("quantity") == quantity)
                .select(pl.col(unit).alias("unit"), "block", pl.col("sigma_mean").alias("sigma"), "sigma_sem",
                        verdict.alias("relevance")))
    raise ValueError("need a table with sigma_mean and sigma_sem columns")


def compare(sigmas: pl.DataFrame, threshold: float | None = None) -> tuple[pl.DataFrame, dict[str, int]]:
    """(pairs table, class of each unit). `sigmas` has unit, block, sigma, sigma_sem; without a
    `threshold`, one is derived from the SEMs (module docstring)."""
    units = list(dict.fromkeys(sigmas["unit"].to_list()))
    vectors = {u: {} for u in units}
    verdicts = sigmas["relevance"] if "relevance" in sigmas.columns else [None] * sigmas.height
    for (u, block, sigma, sem), verdict in zip(sigmas.select("unit", "block", "sigma", "sigma_sem").iter_rows(),
                                               verdicts):
        if sigma is not None and math.isfinite(sigma) and verdict != "never_pruned":
            vectors[u][block] = (sigma, sem if sem is not None else math.nan)
    pairs, dist = [], np.full((len(units), len(units)), 0.0)
    conflicting = set()
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
        var = [vectors[a][blk][1] ** 2 + vectors[b][blk][1] ** 2 for blk in shared]
        noise = math.sqrt(float(np.mean(var))) if shared and all(map(math.isfinite, var)) else math.nan
        if conflicts:
            conflicting.add(frozenset((a, b)))
        pairs.append([a, b, len(shared), euclid, rms, cosine, len(conflicts), bool(shared) and not conflicts,
                      ", ".join(conflicts) or None, noise])
        dist[i, j] = dist[j, i] = rms
    if threshold is None:
        noises = [p[-1] for p in pairs if math.isfinite(p[-1])]
        threshold = NOISE_FACTOR * float(np.median(noises)) if noises and np.median(noises) > 0 else FALLBACK_THRESHOLD
    classes = _classes(units, dist, threshold, conflicting)
    rows = [p + [threshold, classes[p[0]], classes[p[1]], classes[p[0]] == classes[p[1]]] for p in pairs]
    table = pl.DataFrame(rows, schema=COMPARE_SCHEMA, orient="row") if rows else pl.DataFrame(schema=COMPARE_SCHEMA)
    return table, classes


def _filled(dist: np.ndarray) -> np.ndarray:
    """Units without shared blocks are as far apart as anything measured, and then some."""
    finite = dist[np.isfinite(dist)]
    return np.where(np.isfinite(dist), dist, (finite.max() if finite.size else 1.0) * 10 + 1.0)


def _classes(units: list[str], dist: np.ndarray, threshold: float, conflicting: set) -> dict[str, int]:
    if len(units) < 2:
        return {u: 1 for u in units}
    labels = fcluster(linkage(squareform(_filled(dist), checks=False), method="average"), t=threshold,
                      criterion="distance")
    groups: dict[int, list[str]] = {}
    for u, c in zip(units, labels):
        groups.setdefault(int(c), []).append(u)
    classes, next_id = {}, 1
    for members in (groups[c] for c in sorted(groups)):
        parts: list[list[str]] = []
        for u in members:   # split a class along its conflicts: first part without one, else a new part
            home = next((part for part in parts if not any(frozenset((u, v)) in conflicting for v in part)), None)
            if home is None:
                parts.append([u])
            else:
                home.append(u)
        for part in parts:
            for u in part:
                classes[u] = next_id
            next_id += 1
    return classes


def tree(pairs: pl.DataFrame, units: list[str]) -> pl.DataFrame:
    """The average-linkage dendrogram of `units` on the pairs' RMS distances, one merge a row
    (left/right name a unit or an earlier merge as '#step')."""
    if len(units) < 2:
        return pl.DataFrame(schema=TREE_SCHEMA)
    index = {u: i for i, u in enumerate(units)}
    dist = np.full((len(units), len(units)), 0.0)
    for a, b, rms in pairs.select("a", "b", "rms").iter_rows():
        dist[index[a], index[b]] = dist[index[b], index[a]] = rms if rms is not None else math.nan
    merges = linkage(squareform(_filled(dist), checks=False), method="average")
    names = list(units)
    rows = []
    for step, (left, right, distance, size) in enumerate(merges, start=1):
        rows.append((step, names[int(left)], names[int(right)], float(distance), int(size)))
        names.append(f"#{step}")
    return pl.DataFrame(rows, schema=TREE_SCHEMA, orient="row")
