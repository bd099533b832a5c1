"""One look for every figure: colour-blind-safe colours, readable sizes, PNG and SVG output."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from matplotlib.figure import Figure

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
SEQUENTIAL = "viridis"     # rounds
DIVERGING = "RdBu_r"       # sigma: red relevant, blue irrelevant

RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "svg.fonttype": "none", "svg.hashsalt": "flowscan"}


def new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    import matplotlib

    matplotlib.rcParams.update(RC)
    return Figure(figsize=(width, height), layout="constrained")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def save(fig: Figure, stem: Path, formats: Iterable[str] = ("png", "svg")) -> list[Path]:
    """Write `stem.png`, `stem.svg`, ... atomically; returns the paths."""
    from flowscan.io.atomic import atomic_path

    paths = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    return paths
